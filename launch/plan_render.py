"""Printing a plan for people: ``indicfm plan``'s few small tables and lines of text.

Kept apart from the planner's arithmetic so that the numbers (``indicfm.launch.plan.Plan``, also
printed as JSON by the CLI) never depend on how they are shown, and the wording can change without
touching a tested figure. :func:`describe_mesh` is shared with the compile report
(``indicfm.launch.compile``) so both name a mesh the same way.
"""

from __future__ import annotations

from typing import Any

from indicfm.hardware import GIB
from indicfm.launch.plan import Plan
from indicfm.sharding import MESH_AXES


def describe_mesh(sizes: dict[str, int]) -> str:
    """``data=1 fsdp=8 expert=8 tensor=1``: every axis, in the mesh's order."""
    return " ".join(f"{a}={sizes[a]}" for a in MESH_AXES)


def _gib(nbytes: float) -> str:
    """Bytes in MiB below a GiB, else in GiB: per-device figures span both."""
    if nbytes < GIB:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / GIB:.2f} GiB"


def _human(n: float) -> str:
    """A count with a K/M/B/T suffix (parameters, FLOPs, tokens)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _duration(hours: float) -> str:
    """Hours as minutes, hours or days, whichever reads best."""
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.1f} min"


def render_plan(plan: Plan, console: Any = None) -> None:
    """Print the plan as a few small tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(soft_wrap=True)
    chip = plan.chip
    price = "spot" if plan.spot else "on-demand"
    if plan.mesh_note:
        console.print(f"[bold yellow]{plan.mesh_note}[/]")
    console.print(
        f"[bold]{plan.hardware}[/]: {plan.num_chips} x {chip.name} on {plan.num_hosts} host(s), "
        f"{chip.hbm_gib:g} GiB and {chip.peak_tflops:g} bf16 TFLOP/s per chip, ${plan.price_per_hour:,.2f}/h {price}"
    )
    console.print(
        f"model: {_human(plan.params)} parameters, {_human(plan.active_params)} active per token; "
        f"{_human(plan.flops_per_token)} training FLOPs per token at sequence length {plan.seq_len}"
    )
    mem = plan.memory
    table = Table(title=f"memory per device, mesh {describe_mesh(plan.mesh)}", title_justify="left")
    table.add_column("part")
    table.add_column("per device", justify="right")
    for label, value in (
        ("parameters", mem.params),
        ("gradients", mem.grads),
        ("optimizer state (AdamW)", mem.optimizer),
        ("activations saved for backward", mem.activations),
        ("backward working set", mem.working),
        ("total", mem.total),
    ):
        table.add_row(label, _gib(value))
    console.print(table)
    for note in mem.notes:
        console.print(f"  {note}")
    console.print(("[green]" if mem.fits else "[bold red]") + mem.reason() + "[/]")

    t = plan.time
    console.print(
        f"step ({plan.global_batch} x {plan.seq_len} tokens): {t.total:.3f} s = compute {t.compute:.3f} s at "
        f"{plan.mfu:.0%} MFU + exposed communication {t.exposed_communication:.3f} s "
        f"(FSDP {t.fsdp:.3f}, data-parallel {t.data_parallel:.3f}, all-to-all {t.all_to_all:.3f}, "
        f"tensor {t.tensor_parallel:.3f})"
    )
    console.print(
        f"throughput: {plan.tokens_per_second:,.0f} tokens/s; per billion tokens: "
        f"{_duration(plan.hours_per_billion)} and ${plan.dollars_per_billion:,.2f}"
    )
    if plan.tokens:
        hours = plan.tokens / 1e9 * plan.hours_per_billion
        console.print(
            f"{_human(plan.tokens)} tokens: {_duration(hours)} and ${plan.tokens / 1e9 * plan.dollars_per_billion:,.2f}"
        )
    if plan.chips_for_days:
        console.print(
            f"to finish in {plan.days:g} days: about {plan.chips_for_days} chips ({plan.slice_for_days}), "
            "assuming throughput per chip stays the same"
        )
    if plan.suggestion:
        s = plan.suggestion
        console.print(
            f"[bold]suggested mesh[/]: {describe_mesh(s.sizes)}"
            + (f" with model.remat={s.remat}" if s.remat != "none" else "")
            + (f", {s.micro_batches} micro-batches" if s.micro_batches > 1 else "")
            + f" -> {_gib(s.memory.total)} per device, step {s.time.total:.3f} s. Set it with "
            + " ".join(f"--set mesh.{a}={s.sizes[a]}" for a in MESH_AXES)
            + (f" --set model.remat={s.remat}" if s.remat != plan.remat else "")
            + (f" --set trainer.micro_batches={s.micro_batches}" if s.micro_batches != plan.micro_batches else "")
        )
    elif plan.suggestion_note:
        console.print(f"[bold red]{plan.suggestion_note}[/]")

