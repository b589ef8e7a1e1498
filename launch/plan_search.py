"""Mesh search for the planner: the fastest mesh whose memory fits, when the config's own does not.

Candidates are the meshes a run could use on the slice (experts split evenly, tensor parallelism
inside one host and dividing the KV heads, the micro-batch splitting over the batch axes of the
rules table); they are ranked by the roofline (``indicfm.launch.plan_roofline``), which is cheap,
and only the most promising few are priced in full by ``indicfm.launch.plan_memory``, whose
activations need a trace each. If none fits, remat and then more micro-batches are tried, the
two knobs that trade time for memory without changing the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from indicfm.hardware import Slice
from indicfm.launch.plan_layout import rules_for
from indicfm.launch.plan_memory import USABLE_HBM_FRACTION, Memory, memory_per_device, state_bytes_per_device
from indicfm.launch.plan_roofline import StepTime, step_time
from indicfm.sharding import batch_shards


@dataclass
class MeshOption:
    """A layout the search found: mesh sizes, remat policy and micro-batches, with what they cost."""

    sizes: dict[str, int]
    memory: Memory
    time: StepTime
    remat: str
    micro_batches: int = 1


def _divisors(n: int) -> list[int]:
    """Every size an axis of an ``n``-device mesh can have."""
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(cfg: Any, slice_: Slice) -> Iterable[dict[str, int]]:
    """Meshes worth trying on the slice: experts split evenly, tensor parallelism inside one host and
    dividing the KV heads, and the micro-batch splitting over the axes of the ``batch`` rule."""
    n = slice_.num_chips
    model = cfg.model
    micro = cfg.trainer.global_batch_size // cfg.trainer.micro_batches
    rules = rules_for(cfg)
    for tensor in _divisors(n):
        if tensor > slice_.chips_per_host or model.num_kv_heads % tensor:
            continue
        for expert in _divisors(n // tensor):
            if model.num_experts % expert:
                continue
            for fsdp in _divisors(n // tensor // expert):
                sizes = {"data": n // tensor // expert // fsdp, "fsdp": fsdp, "expert": expert, "tensor": tensor}
                if micro % batch_shards(sizes, rules):
                    continue
                yield sizes


def suggest_mesh(cfg: Any, slice_: Slice, mfu: float, max_traces: int = 6) -> tuple[MeshOption | None, str]:
    """The fastest mesh (by the roofline) whose memory fits: first with the config's remat policy,
    then with ``remat=full``, then also splitting the batch into 2, 4, 8 times more micro-batches.

    Memory of parameters and optimizer state is cheap to get for every candidate; activations need
    a trace, so only the most promising few are traced.
    """
    micro0 = cfg.trainer.micro_batches
    options = [(cfg.model.remat, micro0, max_traces)]
    if cfg.model.remat != "full":
        options.append(("full", micro0, max_traces))
    options += [("full", micro0 * f, 2) for f in (2, 4, 8) if cfg.trainer.global_batch_size % (micro0 * f) == 0]
    for remat, micro, traces in options:
        trial = cfg.model_copy(
            update={
                "model": cfg.model.model_copy(update={"remat": remat}),
                "trainer": cfg.trainer.model_copy(update={"micro_batches": micro}),
            }
        )
        ranked = []
        for sizes in candidate_meshes(trial, slice_):
            variables, trainable = state_bytes_per_device(trial, sizes)
            if variables + 3 * trainable > slice_.chip.hbm_bytes * USABLE_HBM_FRACTION:
                continue
            ranked.append((step_time(trial, sizes, slice_, mfu).total, variables + 3 * trainable, sizes))
        ranked.sort(key=lambda item: (item[0], item[1]))
        for _, _, sizes in ranked[:traces]:
            memory = memory_per_device(trial, sizes, slice_.chip)
            if memory.fits:
                return MeshOption(sizes, memory, step_time(trial, sizes, slice_, mfu), remat, micro), ""
    return None, (
        f"no mesh fits on {slice_.num_chips} x {slice_.chip.name} even with remat=full and "
        f"{options[-1][1]} micro-batches; use more chips or a shorter sequence"
    )

