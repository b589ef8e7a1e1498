"""`indicfm generate` and `indicfm export hf` (issue 9)."""

import typer

export_app = typer.Typer(help="Export a trained model to other ecosystems.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `indicfm generate` to the top-level app."""
