"""Step time for the planner: a roofline of compute plus the communication the mesh implies.

Model FLOPs per step (``indicfm.model.flops``) at an assumed MFU, plus ring-collective time for
FSDP all-gathers and gradient reduce-scatters, data-parallel all-reduces, expert all-to-alls and
tensor-parallel all-reduces at the interconnect bandwidth in ``configs/hardware.yaml``. Collectives
XLA overlaps with compute (FSDP, data parallel) only cost what exceeds the compute time; all-to-all
and tensor-parallel all-reduces sit on the critical path.

A roofline rather than a measurement, because the planner prices hardware nobody has yet; it is
enough to rank meshes against each other (``indicfm.launch.plan_search``) and to cost a run. How
the batch and the weights are split comes from the rules table (``indicfm.sharding``), as in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from indicfm.hardware import Slice
from indicfm.launch.plan_layout import rules_for
from indicfm.launch.plan_memory import state_bytes_per_device
from indicfm.sharding import MESH_AXES, batch_shards, weight_axes, weight_shards

#: bytes of one activation element in the model's compute dtype (what the all-to-alls and
#: tensor-parallel all-reduces carry)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass
class StepTime:
    """Seconds per optimizer step on the whole slice."""

    compute: float
    fsdp: float
    data_parallel: float
    all_to_all: float
    tensor_parallel: float

    @property
    def exposed_communication(self) -> float:
        overlapped = self.fsdp + self.data_parallel
        return self.all_to_all + self.tensor_parallel + max(0.0, overlapped - self.compute)

    @property
    def total(self) -> float:
        return self.compute + self.exposed_communication


def _axis_bandwidth(axis: str, sizes: dict[str, int], slice_: Slice) -> float:
    """Bytes/s one device gets in a collective over ``axis``.

    Devices are laid out with ``tensor`` innermost, then ``expert``, ``fsdp``, ``data`` (the order of
    ``indicfm.sharding.make_mesh``): on GPUs an axis whose groups span more devices than a node holds
    goes over the network; a TPU slice is all ICI.
    """
    chip = slice_.chip
    if chip.kind == "tpu":
        return chip.ici_bytes_per_s
    inner = math.prod(sizes[a] for a in MESH_AXES[MESH_AXES.index(axis) :])
    return chip.ici_bytes_per_s if inner <= slice_.chips_per_host else chip.dcn_bytes_per_s


def ring_seconds(nbytes: float, group: int, axis: str, sizes: dict[str, int], slice_: Slice) -> float:
    """Seconds one device spends in a ring collective over ``axis`` on a buffer of ``nbytes``: the
    ``(group - 1) / group`` of it that comes from the other devices, at the axis's bandwidth."""
    return 0.0 if group <= 1 else nbytes * (group - 1) / group / _axis_bandwidth(axis, sizes, slice_)


def step_time(cfg: Any, sizes: dict[str, int], slice_: Slice, mfu: float) -> StepTime:
    """Roofline compute at ``mfu`` plus ring-collective time for the traffic the mesh implies."""
    from indicfm.model.flops import train_flops_per_token

    model = cfg.model
    rules = rules_for(cfg)
    n = slice_.num_chips
    tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    compute = train_flops_per_token(model, cfg.data.seq_len) * tokens / n / (slice_.chip.peak_flops * mfu)

    _, trainable = state_bytes_per_device(cfg, sizes)
    micro = cfg.trainer.micro_batches
    act_bytes = DTYPE_BYTES[model.compute_dtype]
    tokens_per_device = tokens / batch_shards(sizes, rules)

    def ring(nbytes: float, group: int, axis: str) -> float:
        return ring_seconds(nbytes, group, axis, sizes, slice_)

    f = weight_shards(sizes, rules)
    gathered = trainable * f
    # all-gather for forward and again for backward in every micro-batch, one reduce-scatter of gradients
    fsdp = ring(gathered * (2 * micro + 1), f, "fsdp")
    # gradients all-reduced over `data`, unless the weights are sharded over it too (then the
    # reduce-scatter above covers it)
    data_parallel = 0.0 if "data" in weight_axes(rules) else ring(2 * trainable, sizes["data"], "data")
    # dispatch + combine, forward and backward, of every routed token copy in every MoE layer
    a2a_bytes = 4 * model.num_moe_layers * tokens_per_device * model.top_k * model.d_model * act_bytes
    all_to_all = ring(a2a_bytes, sizes["expert"], "expert")
    # two all-reduces (attention and MLP outputs) forward and two backward per block; all-reduce = 2x ring
    tp_bytes = 4 * 2 * model.num_layers * tokens_per_device * model.d_model * act_bytes
    tensor_parallel = ring(tp_bytes, sizes["tensor"], "tensor")
    return StepTime(compute, fsdp, data_parallel, all_to_all, tensor_parallel)

