"""The planner: what a training config needs on some hardware, and what it costs, before spending money.

:func:`make_plan` is the entry point (``indicfm plan``, the pod-compile benchmark): it lays the
config's mesh out on the slice and asks each part of the planner for its figure, one module per job:

* ``plan_layout``: mesh sizes, the rules table the config trains with, rows per device, :class:`PlanError`;
* ``plan_trace``: the tensors the backward pass keeps, from the traced (never compiled) train step;
* ``plan_memory``: bytes per device (parameters, gradients, AdamW moments, activations, working set);
* ``plan_roofline``: step time, compute at an assumed MFU plus the communication the mesh implies;
* ``plan_search``: the fastest mesh that fits, when the config's own does not;
* ``plan_render``: the tables ``indicfm plan`` prints.

This module holds only what ties them together: the :class:`Plan` record (cost, throughput and the
time or chips to reach a token budget) and the fallback to a suggested mesh when the config's mesh
is for another device count.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from indicfm.hardware import GIB, Chip, Slice, parse_slice
from indicfm.launch.plan_layout import PlanError, mesh_sizes
from indicfm.launch.plan_memory import Memory, memory_per_device
from indicfm.launch.plan_roofline import StepTime, step_time
from indicfm.launch.plan_search import MeshOption, suggest_mesh


@dataclass
class Plan:
    """Everything ``indicfm plan`` reports for one config on one slice, as data (``to_dict`` is the JSON)."""

    hardware: str
    num_chips: int
    num_hosts: int
    chip: Chip
    mesh: dict[str, int]
    params: int
    active_params: int
    flops_per_token: float
    seq_len: int
    global_batch: int
    memory: Memory
    time: StepTime
    mfu: float
    spot: bool
    remat: str = "none"
    micro_batches: int = 1
    tokens: float | None = None
    days: float | None = None
    chips_for_days: int | None = None
    slice_for_days: str | None = None
    suggestion: MeshOption | None = None
    suggestion_note: str | None = None
    #: set when the config's mesh cannot be laid out on this hardware and a suggested one was used
    mesh_note: str | None = None

    @property
    def price_per_hour(self) -> float:
        price = self.chip.price_spot if self.spot else self.chip.price_on_demand
        return price * self.num_chips

    @property
    def tokens_per_second(self) -> float:
        return self.global_batch * self.seq_len / self.time.total

    @property
    def hours_per_billion(self) -> float:
        return 1e9 / self.tokens_per_second / 3600

    @property
    def dollars_per_billion(self) -> float:
        return self.hours_per_billion * self.price_per_hour

    def to_dict(self) -> dict:
        out = {
            "hardware": self.hardware,
            "chips": self.num_chips,
            "hosts": self.num_hosts,
            "mesh": self.mesh,
            "params": self.params,
            "active_params": self.active_params,
            "train_flops_per_token": self.flops_per_token,
            "memory_gib": {
                k: getattr(self.memory, k) / GIB for k in ("params", "grads", "optimizer", "activations", "working", "total")
            },
            "hbm_gib": self.memory.capacity / GIB,
            "fits": self.memory.fits,
            "reason": self.memory.reason(),
            "step_seconds": dataclasses.asdict(self.time) | {"total": self.time.total},
            "mfu": self.mfu,
            "tokens_per_second": self.tokens_per_second,
            "hours_per_billion_tokens": self.hours_per_billion,
            "dollars_per_billion_tokens": self.dollars_per_billion,
            "price_per_hour": self.price_per_hour,
            "spot": self.spot,
        }
        if self.tokens:
            out["tokens"] = self.tokens
            out["hours"] = self.tokens / 1e9 * self.hours_per_billion
            out["dollars"] = self.tokens / 1e9 * self.dollars_per_billion
        if self.chips_for_days:
            out["days"] = self.days
            out["chips_for_days"] = self.chips_for_days
            out["slice_for_days"] = self.slice_for_days
        if self.suggestion:
            out["suggested_mesh"] = self.suggestion.sizes
            out["suggested_remat"] = self.suggestion.remat
            out["suggested_micro_batches"] = self.suggestion.micro_batches
            out["suggested_memory_gib"] = self.suggestion.memory.total / GIB
        if self.suggestion_note:
            out["suggestion_note"] = self.suggestion_note
        if self.mesh_note:
            out["mesh_note"] = self.mesh_note
        return out

def _round_slice(chips: int, slice_: Slice) -> int:
    """Round a chip count up to an orderable size: a power of two for TPU slices, whole nodes for GPUs."""
    if slice_.chip.kind == "tpu":
        return 1 << max(0, math.ceil(math.log2(max(chips, 1))))
    per_node = slice_.chip.chips_per_host
    return per_node * math.ceil(chips / per_node) if chips > per_node else chips


def make_plan(
    cfg: Any,
    hardware: str,
    *,
    tokens: float | None = None,
    days: float | None = None,
    mfu: float | None = None,
    spot: bool = False,
) -> Plan:
    """Everything ``indicfm plan`` prints, as data."""
    from indicfm.model.flops import count_active_params, count_params, train_flops_per_token

    slice_ = parse_slice(hardware)
    mfu = mfu if mfu is not None else slice_.chip.typical_mfu
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    mesh_note = None
    try:
        sizes = mesh_sizes(cfg.mesh, slice_.num_chips)
    except PlanError as err:
        # The config's mesh is for another device count (e.g. a pod config priced on 8 GPUs):
        # plan with the best mesh that fits instead of stopping, and say so.
        option, note = suggest_mesh(cfg, slice_, mfu)
        if option is None:
            raise PlanError(f"{err}; {note}") from None
        sizes = option.sizes
        cfg = cfg.model_copy(update={
            "model": cfg.model.model_copy(update={"remat": option.remat}),
            "trainer": cfg.trainer.model_copy(update={"micro_batches": option.micro_batches}),
        })
        mesh_note = f"{err}; planned with the suggested mesh below instead"
    memory = memory_per_device(cfg, sizes, slice_.chip)
    plan = Plan(
        hardware=slice_.name,
        num_chips=slice_.num_chips,
        num_hosts=slice_.num_hosts,
        chip=slice_.chip,
        mesh=sizes,
        params=count_params(cfg.model),
        active_params=count_active_params(cfg.model),
        flops_per_token=train_flops_per_token(cfg.model, cfg.data.seq_len),
        seq_len=cfg.data.seq_len,
        global_batch=cfg.trainer.global_batch_size,
        memory=memory,
        time=step_time(cfg, sizes, slice_, mfu),
        mfu=mfu,
        spot=spot,
        remat=cfg.model.remat,
        micro_batches=cfg.trainer.micro_batches,
        tokens=tokens,
        days=days,
        mesh_note=mesh_note,
    )
    if mesh_note:
        plan.suggestion = MeshOption(sizes, memory, plan.time, cfg.model.remat, cfg.trainer.micro_batches)
    if tokens and days:
        per_chip = plan.tokens_per_second / slice_.num_chips
        needed = tokens / (days * 86400) / per_chip
        plan.chips_for_days = _round_slice(math.ceil(needed), slice_)
        plan.slice_for_days = Slice(slice_.chip, plan.chips_for_days).name
    if not memory.fits:
        plan.suggestion, plan.suggestion_note = suggest_mesh(cfg, slice_, mfu)
    return plan

