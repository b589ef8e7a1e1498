"""`indicfm train` and `indicfm quickstart` (issue 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from indicfm.cli.common import ConfigOption, SetOption, console, fail, load_config_or_exit

WorkdirOption = Annotated[Path, typer.Option("--workdir", "-w", help="Run directory: checkpoints, metrics, logs.")]


def train_command(
    workdir: WorkdirOption,
    config: ConfigOption = None,
    set_: SetOption = None,
    coordinator: Annotated[
        Optional[str], typer.Option(help="multi-host: HOST:PORT of process 0 (Cloud TPU and SLURM are detected)")
    ] = None,
    num_processes: Annotated[Optional[int], typer.Option(help="multi-host: how many processes in the job")] = None,
    process_id: Annotated[Optional[int], typer.Option(help="multi-host: this process's index, 0..N-1")] = None,
) -> None:
    """Train, or resume the run in WORKDIR from its latest good checkpoint.

    Example:

        indicfm train --config configs/quickstart.yaml --workdir runs/qs --set trainer.steps=50

    SIGTERM or Ctrl-C finishes the current step, saves a checkpoint and exits 0; re-running the same
    command resumes exactly where it stopped.  Metrics: WORKDIR/metrics.jsonl and TensorBoard files
    in WORKDIR/tensorboard.
    """
    cfg = load_config_or_exit(config, set_)
    from indicfm.launch.distributed import DistributedError, initialize

    try:  # before anything touches a device: join the other hosts (a no-op for one process)
        initialize(coordinator, num_processes, process_id)
    except DistributedError as err:
        fail(str(err))
    from indicfm.train.loop import train

    try:
        result = train(cfg, workdir, console=console)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    if result.stopped == "nonfinite":
        fail(result.message, code=1)
    console.print(
        f"{result.stopped}: step {result.final_step} of {cfg.trainer.steps}; last checkpoint at step "
        f"{result.last_checkpoint_step}"
    )


def quickstart_command(
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Where the run goes.")] = Path("runs/quickstart"),
    set_: SetOption = None,
) -> None:
    """Tokenizer → data → ~200 training steps → checkpoint → resume → bits per byte, on the shipped sample.

    Example:

        indicfm quickstart --workdir runs/quickstart

    Takes a few minutes on a 2-core CPU; uses configs/quickstart.yaml (override with --set).
    """
    from indicfm.train.quickstart import run_quickstart

    try:
        run_quickstart(workdir, set_ or [], console=console)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))


def register(app: typer.Typer) -> None:
    """Add the training commands to the top-level app."""
    app.command("train")(train_command)
    app.command("quickstart")(quickstart_command)
