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


#: Set by :func:`indicfm.cli.main` (the ``indicfm`` console script), not by ``CliRunner`` tests: the
#: process is this one command, so its start is the command's start.
RUN_AS_COMMAND = False
#: Set by a command whose work is done and on disk: :func:`end_without_teardown` may end the process.
DONE_AND_CLOSED = False


def end_without_teardown(code: int | str | None) -> None:
    """Run the exit handlers, flush, and end the process without the interpreter's finalisation.

    Why: tearing down a JAX process (module cleanup, XLA's C++ destructors) takes 0.5-2 s on a
    busy CPU and does nothing for a run that has closed its files and checkpoints, yet it is wall
    clock the user waits for and the run's goodput, taken inside the process, cannot count.  Only
    for a command that set :data:`DONE_AND_CLOSED`; non-daemon threads left are idle pool workers."""
    import atexit
    import os
    import sys

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # jax.distributed's shutdown, logging's flush, ...
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit."""
    # soft_wrap: one line however long, so a path it names can be copied whole
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def quiet_orbax() -> None:
    """Orbax logs through absl at WARNING for routine events (opening a checkpoint read-only)."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
