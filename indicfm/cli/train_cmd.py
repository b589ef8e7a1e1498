"""`indicfm train` and `indicfm quickstart` (issue 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from indicfm.cli import common
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
    profile_steps: Annotated[
        Optional[str],
        typer.Option(
            "--profile-steps",
            metavar="A:B",
            help="write a jax.profiler trace of steps A to B to WORKDIR/profile (TensorBoard, Perfetto); "
            "the same as --set logging.profile_steps=[A,B]",
        ),
    ] = None,
) -> None:
    """Train, or resume the run in WORKDIR from its latest good checkpoint.

    Example:

        indicfm train --config configs/quickstart.yaml --workdir runs/qs --set trainer.steps=50

    Without --config the run's own WORKDIR/config.yaml is used when there is one (a run made by
    `indicfm import hf` or `indicfm upcycle`, or resumed), else the defaults.

    SIGTERM or Ctrl-C finishes the current step, saves a checkpoint and exits 0; re-running the same
    command resumes exactly where it stopped.  Metrics: WORKDIR/metrics.jsonl and TensorBoard files
    in WORKDIR/tensorboard; at the end, where the run's wall clock went (goodput).
    """
    from indicfm.train.goodput import process_started_at

    # the wall clock a user's stopwatch sees, imports included (in-process tests: from train() on)
    started_at = process_started_at() if common.RUN_AS_COMMAND else None
    sets = list(set_ or [])
    if profile_steps is not None:
        first, sep, last = profile_steps.partition(":")
        if not (sep and first.strip().isdigit() and last.strip().isdigit()):
            fail(f"--profile-steps {profile_steps!r}: expected A:B, e.g. --profile-steps 10:12")
        sets.append(f"logging.profile_steps=[{int(first)},{int(last)}]")
    if config is None and (workdir / "config.yaml").is_file():
        config = workdir / "config.yaml"  # the run's own config: what `import hf`/`upcycle` and earlier runs wrote
    cfg = load_config_or_exit(config, sets)
    from indicfm.launch.distributed import DistributedError, initialize

    try:  # before anything touches a device: join the other hosts (a no-op for one process)
        initialize(coordinator, num_processes, process_id)
    except DistributedError as err:
        fail(str(err))
    from indicfm.train.loop import train

    downstream = downstream_factory(cfg)
    try:
        result = train(cfg, workdir, console=console, started_at=started_at, downstream=downstream)
    except (ValueError, FileNotFoundError) as err:  # an unknown downstream task too
        fail(str(err))
    common.DONE_AND_CLOSED = True  # train() returned: metrics, logs and checkpoints are closed and on disk
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
    from indicfm.train.quickstart import QUICKSTART_CONFIG, run_quickstart

    cfg = load_config_or_exit(QUICKSTART_CONFIG, set_ or [])
    try:
        run_quickstart(workdir, set_ or [], console=console, downstream=downstream_factory(cfg, required=False))
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))


def downstream_factory(cfg, required: bool = True):
    """What builds the in-loop downstream evaluator (``indicfm.evaluation.in_loop``) when the config
    asks for one (``eval.downstream``), else None.  Without lm-eval installed: an error (exit 2) when
    ``required``, else a note and no downstream evaluation (the quickstart runs without the extra)."""
    if not cfg.eval.downstream.enabled:
        return None
    try:
        import lm_eval  # noqa: F401  (the eval extra)
    except ImportError as err:
        install = 'pip install "indicfm[eval]"'
        if required:
            fail(f"eval.downstream needs lm-evaluation-harness ({err}): {install}, or turn it off with "
                 "--set eval.downstream.tasks=[]")
        console.print(f"note: no downstream evaluation (eval.downstream) without lm-evaluation-harness: {install}")
        return None
    from indicfm.evaluation.in_loop import evaluator_factory

    return evaluator_factory(cfg)


def register(app: typer.Typer) -> None:
    """Add the training commands to the top-level app."""
    app.command("train")(train_command)
    app.command("quickstart")(quickstart_command)
