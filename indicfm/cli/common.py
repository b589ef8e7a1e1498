"""Pieces every CLI command shares: config options and error reporting."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console(stderr=True)

ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config", "-c",
        help="YAML config file, or the name of one shipped with indicfm (model/small-moe, quickstart, ...; "
        "see configs/). Values only. Optional.",
    ),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one config value, e.g. --set trainer.steps=100. Repeatable."),
]


def load_config_or_exit(config: Path | None, sets: list[str] | None):
    """Load the config; a bad file, key or value prints the reason and exits with code 2."""
    from indicfm.config import ConfigError, load_config

    try:
        return load_config(config, sets or [])
    except ConfigError as err:
        console.print(f"[bold red]config error:[/] {err}", markup=True, highlight=False)
        raise typer.Exit(2) from None


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)
