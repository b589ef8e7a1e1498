"""`indicfm plan` and `indicfm launch tpu|gpu` (issue 7)."""

import typer

app = typer.Typer(help="Launch training on Cloud TPU slices or GPU clusters.", no_args_is_help=True)


def register(app_: typer.Typer) -> None:
    """Add `indicfm plan` to the top-level app."""
