"""`indicfm plan` and `indicfm launch tpu|gpu` (issue 7). Thin: parse, call launch/, print."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from indicfm.cli.common import ConfigOption, SetOption, console, fail, load_config_or_exit

app = typer.Typer(
    help="Launch training on Cloud TPU slices or GPU clusters.\n\n"
    "Example: indicfm launch tpu --config configs/model/small-moe.yaml --tpu-type v5p-128 "
    "--zone us-east5-a --project my-proj --spot --bucket gs://my-bucket/runs --dry-run",
    no_args_is_help=True,
)

REPO = Path(__file__).resolve().parents[2]


def _resolved_config_file(config: Path | None, sets: list[str] | None, name: str) -> Path:
    """Validate the config here (errors before any money is spent) and write it fully resolved.

    The workers get this one self-contained file: ``include:`` paths and ``--set`` overrides are
    already applied, so nothing depends on files that exist only on this machine.
    """
    from indicfm.config import save_config

    cfg = load_config_or_exit(config, sets)
    out = Path(tempfile.mkdtemp(prefix="indicfm-launch-")) / f"{name}.yaml"
    save_config(cfg, out)
    return out


@app.command("tpu")
def tpu(
    config: ConfigOption = None,
    sets: SetOption = None,
    tpu_type: Annotated[Optional[str], typer.Option("--tpu-type", help="accelerator type, e.g. v5p-128, v5litepod-64, v6e-16, v4-32")] = None,
    zone: Annotated[str, typer.Option(help="Cloud zone with TPU capacity, e.g. us-east5-a")] = ...,
    project: Annotated[str, typer.Option(help="Google Cloud project id")] = ...,
    spot: Annotated[bool, typer.Option("--spot", help="spot TPUs: much cheaper, preemptible (the launcher resumes)")] = False,
    reserved: Annotated[bool, typer.Option("--reserved", help="use your reservation's capacity")] = False,
    name: Annotated[Optional[str], typer.Option(help="queued resource / TPU name (default indicfm-TYPE)")] = None,
    bucket: Annotated[Optional[str], typer.Option(help="gs:// prefix for the workdir (checkpoints survive preemption)")] = None,
    runtime_version: Annotated[Optional[str], typer.Option(help="TPU software version (default: from configs/hardware.yaml)")] = None,
    package: Annotated[Optional[str], typer.Option(help="what the workers pip install instead of this source tree: a requirement ('indicfm[tpu]==0.1.0', 'indicfm[tpu] @ git+https://...') or a wheel file here (copied to them); the tpu extra is added if missing. Needed when indicfm is installed from a wheel")] = None,
    max_restarts: Annotated[int, typer.Option(help="give up after this many preemptions")] = 100,
    poll: Annotated[float, typer.Option(help="seconds between state checks while waiting for the slice")] = 30.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print every command instead of running it")] = False,
    delete: Annotated[bool, typer.Option("--delete", help="delete the slice (queued resource and TPU VMs) and exit")] = False,
) -> None:
    """Train on a Cloud TPU slice: create (or reuse) it, install indicfm on every host, run
    `indicfm train` on all of them, and on preemption wait for a new slice and resume.

    Example:

        indicfm launch tpu --config configs/model/small-moe.yaml --set trainer.global_batch_size=256 --tpu-type v5p-128 \\
            --zone us-east5-a --project my-proj --spot --bucket gs://my-bucket/runs

        indicfm launch tpu --delete --name indicfm-v5p-128 --zone us-east5-a --project my-proj
    """
    from indicfm.launch.commands import Shell
    from indicfm.hardware import HardwareError
    from indicfm.launch.tpu import LaunchError, TpuJob, check_source_tree, delete_command, launch, parse_package

    if spot and reserved:
        fail("--spot and --reserved exclude each other")
    if not name and not tpu_type:
        fail("give --tpu-type (e.g. v5p-128), or --name of an existing slice")
    job_name = name or f"indicfm-{tpu_type}"
    shell = Shell(dry_run=dry_run, echo=lambda line: typer.echo(line))
    if delete:
        raise typer.Exit(shell.run(delete_command(TpuJob(job_name, tpu_type or "v5p-8", zone, project, Path("-")))).returncode)
    if not tpu_type:
        fail("--tpu-type is required to create a slice")
    if bucket and not bucket.startswith("gs://"):
        fail(f"--bucket must be a gs:// path, got {bucket!r}")
    if not bucket:
        console.print(
            "[yellow]warning:[/] no --bucket: checkpoints stay on the TPU VMs' disks and a preemption loses them",
            highlight=False,
        )
    try:  # what the workers install: checked here, before any slice is asked for
        if package is None:
            check_source_tree(REPO)
        to_install = parse_package(package) if package is not None else None
    except LaunchError as err:
        fail(str(err))
    if to_install is not None and to_install.added_extra:
        console.print("note: --package lacks the tpu extra; the workers install it with [tpu]", markup=False, highlight=False)
    config_file = _resolved_config_file(config, sets, job_name)
    job = TpuJob(
        name=job_name,
        tpu_type=tpu_type,
        zone=zone,
        project=project,
        config_path=config_file,
        provisioning="spot" if spot else "reserved" if reserved else "on-demand",
        bucket=bucket,
        runtime_version=runtime_version,
        package=to_install,
    )
    try:
        job.accelerator_type  # noqa: B018 - validates the type name before anything runs
        restarts = launch(
            job,
            shell,
            repo=REPO,
            archive=config_file.parent / "indicfm-src.tar.gz",
            max_restarts=max_restarts,
            poll_s=poll,
            log=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True),
        )
    except (LaunchError, HardwareError) as err:
        fail(str(err), code=1)
    if restarts:
        console.print(f"survived {restarts} preemption(s)", highlight=False)


@app.command("gpu")
def gpu(
    config: ConfigOption = None,
    sets: SetOption = None,
    nodes: Annotated[int, typer.Option(min=1, help="number of nodes (more than one writes a SLURM batch script)")] = 1,
    gpus_per_node: Annotated[int, typer.Option(min=1, help="GPUs on each node")] = 8,
    slurm: Annotated[bool, typer.Option("--slurm", help="submit through SLURM even for one node")] = False,
    workdir: Annotated[Optional[Path], typer.Option(help="run directory on a filesystem every node sees (default runs/NAME)")] = None,
    name: Annotated[str, typer.Option(help="job name")] = "indicfm",
    partition: Annotated[Optional[str], typer.Option(help="SLURM partition")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="SLURM time limit, e.g. 2-00:00:00 (the job requeues itself)")] = None,
    env_setup: Annotated[Optional[str], typer.Option(help="shell line run first on each node, e.g. 'source ~/venv/bin/activate'")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the command / batch script instead of running it")] = False,
) -> None:
    """Train on GPUs: one node runs `indicfm train` directly; several nodes get a SLURM batch script
    (jax.distributed set up, requeue on preemption) submitted with sbatch.

    Example:

        indicfm launch gpu --config configs/model/small-moe.yaml --nodes 8 --gpus-per-node 8 \\
            --workdir /shared/runs/small --time 2-00:00:00 --dry-run
    """
    from indicfm.launch.commands import Shell
    from indicfm.launch.gpu import GpuJob, launch

    run_dir = (workdir or Path("runs") / name).absolute()
    resolved = _resolved_config_file(config, sets, name)
    config_file = run_dir / "launch-config.yaml"  # next to the run: the batch script runs on other nodes
    if not dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file.write_text(resolved.read_text())
    job = GpuJob(
        name=name,
        config_path=config_file,
        workdir=run_dir,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        partition=partition,
        time_limit=time_limit,
        env_setup=env_setup,
    )
    shell = Shell(dry_run=dry_run, echo=lambda line: typer.echo(line))
    raise typer.Exit(launch(job, shell, slurm=slurm, log=lambda line: typer.echo(line)))


def register(app_: typer.Typer) -> None:
    """Add `indicfm plan` to the top-level app."""
    app_.command("plan")(plan)


def plan(
    config: ConfigOption = None,
    sets: SetOption = None,
    hardware: Annotated[str, typer.Option("--hardware", "-H", help="slice: v5p-128, v5e-256, v6e-64, h100x8, h100x64, cpux8, ...")] = ...,
    tokens: Annotated[Optional[float], typer.Option(help="training tokens to cost, e.g. 2e11")] = None,
    days: Annotated[Optional[float], typer.Option(help="finish --tokens within this many days: how many chips?")] = None,
    mfu: Annotated[Optional[float], typer.Option(help="assumed model FLOPs utilisation (default: per chip kind)")] = None,
    spot: Annotated[bool, typer.Option("--spot", help="price with spot rates")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="also compile the real train step for the TPU slice with XLA's TPU compiler (needs the tpu "
            "extra, no TPU) and print XLA:TPU's memory per chip, FLOPs and collectives beside the estimate",
        ),
    ] = False,
) -> None:
    """Memory, speed and cost of a training config on some hardware, before spending money.

    Prints parameters, per-device memory (parameters, gradients, optimizer state, activations) under the config's mesh and whether it fits, a roofline step time with communication, dollars and hours per billion tokens, and a mesh that fits when the config's does not.

    Example:

        indicfm plan --config configs/model/small-moe.yaml --hardware v5p-128 \\
            --set trainer.global_batch_size=256 --set data.seq_len=2048 --tokens 2e11 --days 7

        indicfm plan --config model/moe-8b --hardware v5p-128 --compile   # proof by XLA:TPU, on any machine
    """
    from indicfm.hardware import HardwareError

    if compile_:
        from indicfm.launch.compile import prepare_libtpu_env

        prepare_libtpu_env()  # before JAX (which the planner imports) starts, so libtpu starts quietly
    from indicfm.launch.plan import make_plan
    from indicfm.launch.plan_layout import PlanError
    from indicfm.launch.plan_render import render_plan

    cfg = load_config_or_exit(config, sets)
    if days is not None and tokens is None:
        fail("--days needs --tokens (how many tokens to finish in that time)")
    try:
        result = make_plan(cfg, hardware, tokens=tokens, days=days, mfu=mfu, spot=spot)
    except (PlanError, HardwareError) as err:
        fail(str(err))
    compiled = None
    if compile_:
        from indicfm.launch.compile import CompileError, compile_plan

        try:
            compiled = compile_plan(cfg, result)
        except CompileError as err:
            fail(str(err))
    if json_out:
        import json

        out = result.to_dict()
        if compiled is not None:
            out["compiled"] = [c.to_dict() for c in compiled]
        typer.echo(json.dumps(out, indent=2))
    else:
        render_plan(result)
        if compiled is not None:
            from indicfm.launch.compile import render_compiled

            render_compiled(compiled, result)
