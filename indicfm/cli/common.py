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
#: Paths after the options (``indicfm data prepare a b``); with each command's ``--input`` option this is also what
#: makes ``--input a b`` work: click gives ``a`` to the flag and ``b`` to these.
InputsArgument = Annotated[
    Optional[list[str]],  # str, not Path: a gs:// URL must keep its "//"
    typer.Argument(help="Input files or directories (the same as --input; list as many as you like).", show_default=False),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one config value, e.g. --set trainer.steps=100. Repeatable."),
]


def input_paths(flagged: list[str] | None, listed: list[str] | None) -> list[str | Path]:
    """The paths of ``--input`` (repeatable) and of :data:`InputsArgument`, the flag's first, in order;
    a relative ``samples/...`` path not found here is the sample shipped with indicfm; URLs
    (``gs://...``) are kept as given."""
    from indicfm.package_data import resolve_path

    return [resolve_path(p) for p in [*(flagged or []), *(listed or [])]]


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


def quiet_orbax() -> None:
    """Orbax logs through absl at WARNING for routine events (opening a checkpoint read-only)."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
