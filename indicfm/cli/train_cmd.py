"""`indicfm train` and `indicfm quickstart` (issue 6)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the training commands to the top-level app."""
