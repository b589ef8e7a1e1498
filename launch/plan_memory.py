"""Memory per device for the planner: what one device holds during a train step, from the model itself.

* **parameters, gradients, optimizer state**: every parameter of the abstract model
  (``nnx.eval_shape``, nothing allocated) is sharded with the one rules table of
  ``indicfm.sharding`` under the config's mesh, exactly as training shards it. AdamW keeps two
  moments per parameter in the parameter dtype (optax's default).
* **activations**: the tensors autodiff saves for the backward pass (``indicfm.launch.plan_trace``),
  split with the batch over the axes of the ``batch`` rule. Residuals carrying a tensor-sharded axis
  (heads, MLP hidden, vocab) are divided by the tensor-parallel size.
* **backward working set**: while the backward pass runs, the gradient of the largest activation
  (typically the float32 logits) exists next to the saved ones; later, the block being
  differentiated holds what remat recomputes and, over an expert axis, the buffers of the
  exchange's overflow round being differentiated.

Hand-kept formulas drift from the model with every change to it; taking shapes from the abstract
model and its traced backward pass keeps the planner honest, and ``tests/test_plan.py`` holds it to
XLA's own memory analysis.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from indicfm.hardware import GIB, Chip
from indicfm.launch.plan_layout import per_device_batch, rules_for
from indicfm.launch.plan_trace import looped_conditional_bytes, saved_residuals, trace_platform
from indicfm.sharding import MESH_AXES, Rules, batch_shards, logical_to_spec, weight_axes

#: fraction of HBM a run may plan to use: XLA needs room for fragmentation, collectives' buffers
#: and the program itself
USABLE_HBM_FRACTION = 0.9


# ---------------------------------------------------------------- parameters and optimizer state


@dataclass(frozen=True)
class _Var:
    """One variable of the abstract model: what sharding it needs (shape, logical names) and its bytes."""

    shape: tuple[int, ...]
    itemsize: int
    names: tuple | None
    trainable: bool


@functools.lru_cache(maxsize=16)
def _abstract_variables(model_cfg: Any) -> tuple[_Var, ...]:
    """Every variable of the model with its logical axis names, from the abstract (unallocated) model."""
    import jax
    from flax import nnx

    from indicfm.model.transformer import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    out = []
    for _, var in nnx.to_flat_state(nnx.state(abstract)):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        out.append(
            _Var(
                shape=tuple(value.shape),
                itemsize=jax.numpy.dtype(value.dtype).itemsize,
                names=var.get_metadata().get("out_sharding"),
                trainable=isinstance(var, nnx.Param),
            )
        )
    return tuple(out)


def _abstract_mesh(sizes: dict[str, int]) -> Any:
    """A device-free mesh of ``sizes``: enough for the rules table to decide a split."""
    import jax

    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def _shard_elements(var: _Var, sizes: dict[str, int], rules: Rules) -> int:
    """Elements of ``var`` one device holds under the mesh (the rules table decides the split)."""
    spec = logical_to_spec(var.names, var.shape, _abstract_mesh(sizes), rules)
    elements = 1
    for dim, axes in itertools.zip_longest(var.shape, tuple(spec)):
        split = 1
        if axes is not None:
            split = math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))
        elements *= dim // split
    return elements


def state_bytes_per_device(cfg: Any, sizes: dict[str, int]) -> tuple[float, float]:
    """(all variables, trainable parameters) bytes one device holds under the mesh."""
    rules = rules_for(cfg)
    everything = trainable = 0.0
    for var in _abstract_variables(cfg.model):
        nbytes = _shard_elements(var, sizes, rules) * var.itemsize
        everything += nbytes
        if var.trainable:
            trainable += nbytes
    return everything, trainable


# ----------------------------------------------------------------------------------- activations


def overflow_round_bytes(cfg: Any, sizes: dict[str, int], platform: str | None = None) -> float:
    """Buffers per device of the expert exchange's overflow rounds in the backward pass (0 without
    an expert axis), measured on a one-block MoE model: one round is differentiated at a time."""
    if not cfg.model.num_moe_layers or sizes["expert"] == 1:
        return 0.0
    one = cfg.model.model_copy(update={"num_layers": 1, "first_dense_layers": 0})
    micro = cfg.trainer.global_batch_size // cfg.trainer.micro_batches
    return float(looped_conditional_bytes(one, micro, cfg.data.seq_len, tuple(sizes[a] for a in MESH_AXES), platform))


def _tensor_split(shape: tuple[int, ...], model_cfg: Any, tensor: int) -> int:
    """How many ways the tensor axis splits a residual: by a heads / MLP / vocab dimension it carries."""
    if tensor == 1:
        return 1
    split_dims = {model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.d_ff, model_cfg.d_expert, model_cfg.vocab_size}
    split_dims.discard(model_cfg.d_model)
    return tensor if any(d in split_dims and d % tensor == 0 for d in shape[1:]) else 1


def activation_bytes_per_device(cfg: Any, sizes: dict[str, int], platform: str | None = None) -> tuple[float, float]:
    """(saved activations, largest of them) bytes on one device for one micro-batch, traced for ``platform``."""
    micro = cfg.trainer.global_batch_size // cfg.trainer.micro_batches
    batch_split = batch_shards(sizes, rules_for(cfg))
    devices = math.prod(sizes[a] for a in MESH_AXES)
    mesh_shape = tuple(sizes[a] for a in MESH_AXES)
    per_device = []
    for r in saved_residuals(cfg.model, micro, cfg.data.seq_len, mesh_shape, platform):
        if r.per_device_block:
            per_device.append(r.nbytes / devices)
        elif r.from_batch:
            per_device.append(r.nbytes / batch_split / _tensor_split(r.shape, cfg.model, sizes["tensor"]))
        else:  # a weight in compute dtype: gathered over FSDP, still split over experts / tensor
            expert_split = sizes["expert"] if r.shape and r.shape[0] == cfg.model.num_experts else 1
            per_device.append(r.nbytes / expert_split / _tensor_split((1, *r.shape), cfg.model, sizes["tensor"]))
    return sum(per_device), max(per_device, default=0.0)


def recomputed_block_bytes(cfg: Any, sizes: dict[str, int], platform: str | None = None) -> float:
    """Activations one block recomputes in the backward pass under ``model.remat`` (0 without remat).

    Measured on one-block models of each kind the config has (dense, MoE): what the block saves
    without remat minus what it saves under the config's policy. Only one block is recomputed at a
    time, so the largest kind counts.
    """
    if cfg.model.remat == "none":
        return 0.0
    kinds = []
    if cfg.model.first_dense_layers:
        kinds.append(1)
    if cfg.model.num_moe_layers:
        kinds.append(0)
    largest = 0.0
    for dense in kinds:
        one = cfg.model.model_copy(update={"num_layers": 1, "first_dense_layers": dense})
        without = cfg.model_copy(update={"model": one.model_copy(update={"remat": "none"})})
        policy = cfg.model_copy(update={"model": one})
        largest = max(
            largest,
            activation_bytes_per_device(without, sizes, platform)[0] - activation_bytes_per_device(policy, sizes, platform)[0],
        )
    return largest


# ---------------------------------------------------------------------------------------- memory


@dataclass
class Memory:
    """Bytes per device during one train step."""

    params: float
    grads: float
    optimizer: float
    activations: float
    working: float
    capacity: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.working

    @property
    def usable(self) -> float:
        return self.capacity * USABLE_HBM_FRACTION

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def reason(self) -> str:
        if self.fits:
            return f"fits: {self.total / GIB:.2f} GiB of {self.capacity / GIB:.1f} GiB per device"
        parts = {
            "parameters": self.params,
            "gradients": self.grads,
            "optimizer state": self.optimizer,
            "activations": self.activations + self.working,
        }
        biggest = max(parts, key=lambda k: parts[k])
        return (
            f"does not fit: needs {self.total / GIB:.2f} GiB per device but only "
            f"{USABLE_HBM_FRACTION:.0%} of {self.capacity / GIB:.1f} GiB is usable; "
            f"the largest part is {biggest} ({parts[biggest] / GIB:.2f} GiB)"
        )


def _gathered_sizes(cfg: Any, sizes: dict[str, int]) -> dict[str, int]:
    """The mesh as a weight looks once FSDP has all-gathered it (no split over the weight-sharding axes)."""
    return dict(sizes, **{axis: 1 for axis in weight_axes(rules_for(cfg))})


def largest_gathered_weight(cfg: Any, sizes: dict[str, int]) -> float:
    """Bytes of the largest trainable variable after the FSDP all-gather (0 without FSDP)."""
    gathered = _gathered_sizes(cfg, sizes)
    if gathered == sizes:
        return 0.0
    rules = rules_for(cfg)
    return max(
        (_shard_elements(v, gathered, rules) * v.itemsize for v in _abstract_variables(cfg.model) if v.trainable),
        default=0.0,
    )


def memory_per_device(cfg: Any, sizes: dict[str, int], chip: Chip) -> Memory:
    """Parameters, gradients, AdamW moments, activations and backward working set of one device.

    Working set, at the worse of the backward pass's two phases: at the head, the gradient of the
    largest activation (the logits) exists next to it; later, with remat, the block being
    differentiated holds its recomputed activations while the logits and their gradient are gone,
    and a MoE block with an expert axis also the buffers of the exchange round being differentiated
    (:func:`overflow_round_bytes`). In both, with FSDP the weight in use is all-gathered in full and
    its full gradient exists before the reduce-scatter.
    """
    variables, trainable = state_bytes_per_device(cfg, sizes)
    micro_batch = per_device_batch(cfg, sizes)
    platform = trace_platform(chip)
    saved, largest_activation = activation_bytes_per_device(cfg, sizes, platform)
    recomputed = recomputed_block_bytes(cfg, sizes, platform)
    # One buffer for the logits' gradient on TPU; library matmuls (CPU, GPU) also need its f32
    # softmax written out.
    gradient_copies = 1 if platform == "tpu" else 2
    head = gradient_copies * largest_activation
    # The MoE block's backward also runs the exchange's overflow rounds, each written out as a
    # conditional's outputs (see overflow_round_bytes), next to the block's recomputed activations.
    overflow = overflow_round_bytes(cfg, sizes, platform)
    block = recomputed + overflow - largest_activation
    working = max(head, block) + 2 * largest_gathered_weight(cfg, sizes)
    grads = trainable * (2 if cfg.trainer.micro_batches > 1 else 1)  # + the accumulator
    notes = [f"micro-batch per device: {micro_batch} x {cfg.data.seq_len} tokens, remat={cfg.model.remat}"]
    if cfg.trainer.micro_batches > 1:
        notes.append(f"{cfg.trainer.micro_batches} micro-batches: gradients counted twice (accumulator)")
    if overflow:
        notes.append(f"expert exchange's overflow rounds: {overflow / 2**20:,.1f} MiB of buffers in the backward pass")
    return Memory(
        params=variables,
        grads=grads,
        optimizer=2 * trainable,  # AdamW: first and second moments in the parameter dtype
        activations=saved,
        working=working,
        capacity=chip.hbm_bytes,
        notes=notes,
    )

