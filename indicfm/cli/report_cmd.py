"""`indicfm report` and `indicfm compare` (issue 19)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from indicfm.cli.common import SetOption, console, fail


def report_command(
    workdirs: Annotated[list[Path], typer.Argument(help="One or more run directories (each with a metrics.jsonl).")],
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Where the PNGs and index.html go; default WORKDIR/report.")
    ] = None,
) -> None:
    """Plot a run: loss vs steps and FLOPs, lr, grad norm, tokens/s and MFU, MoE load balance,
    held-out bits per byte per language, and a per-expert load heat map, as PNGs and an HTML page.

    Several WORKDIRs are overlaid on the same plots to compare runs.

    Example:

        indicfm report runs/quickstart
        indicfm report runs/dense runs/moe --output runs/report
    """
    from indicfm.report.html import write_report

    target = output or Path(workdirs[0]) / "report"
    try:
        page = write_report(workdirs, target)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    console.print(f"wrote {page}", highlight=False)


def compare_command(
    config: Annotated[list[Path], typer.Option("--config", "-c", help="A config to compare; repeat for each (two or more).")],
    budget_flops: Annotated[
        float, typer.Option("--budget-flops", help="Training FLOPs per config (model FLOPs, indicfm.model.flops), e.g. 7e12.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Comparison directory: shared data, one run per config, report.")] = Path("runs/compare"),
    set_: SetOption = None,
    evals: Annotated[int, typer.Option(help="Held-out evaluations per run (at regular FLOP checkpoints), besides step 0.")] = 8,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print each config's parameters, FLOPs per step and budgeted steps, and stop.")
    ] = False,
) -> None:
    """Train each config to the same training-FLOP budget on the same data, tokenizer, seed and token
    order; print per-language bits per byte at the budget and each MoE config's FLOP speed-up over
    the dense one, and write plots against FLOPs and wall-clock (OUTPUT/index.html).

    --set overrides apply to every config.  Re-running the same command resumes unfinished runs.

    Example (the shipped CPU-scale comparison; --dry-run shows its compute per config):

        indicfm compare -c configs/compare/dense.yaml -c configs/compare/moe-8x-top2.yaml
            -c configs/compare/moe-32x-top2.yaml -c configs/compare/moe-32x-top8-shared.yaml
            --budget-flops 6e12 --output runs/compare
    """
    from indicfm.config import ConfigError
    from indicfm.report.compare import bpb_table, compute_table, describe_plan, markdown_table, plan_compare, run_compare

    if evals < 1:
        fail("--evals must be at least 1")
    try:
        if dry_run:
            plan = plan_compare(config, budget_flops, overrides=set_ or [], evals=evals)
            for line in plan.notes + describe_plan(plan, budget_flops):
                console.print(line, highlight=False)
            return
        result = run_compare(config, budget_flops, output, overrides=set_ or [], evals=evals, console=console)
    except ConfigError as err:
        console.print(f"[bold red]config error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        fail(str(err))
    print(markdown_table(*bpb_table(result)))
    print()
    print(markdown_table(*compute_table(result)))
    console.print(f"wrote {Path(output) / 'index.html'} and {Path(output) / 'compare.json'}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the report commands to the top-level app."""
    app.command("report")(report_command)
    app.command("compare")(compare_command)
