"""The planner: what a training config needs on some hardware, and what it costs, before spending money.

Memory per device comes from the model itself, not from hand-kept formulas:

* **parameters, gradients, optimizer state**: every parameter of the abstract model
  (``nnx.eval_shape``, nothing allocated) is sharded with the one rules table of
  ``indicfm.sharding`` under the config's mesh, exactly as training shards it. AdamW keeps two
  moments per parameter in the parameter dtype (optax's default).
* **activations**: the tensors autodiff saves for the backward pass, found by tracing
  ``jax.vjp`` of the loss at one device's micro-batch (``jax.make_jaxpr``, no compilation) and
  keeping the residuals that are not inputs, the same trick as ``jax.ad_checkpoint.print_saved_residuals``.
  The remat policy of the config (``model.remat``) is part of the traced model, so it is honoured
  automatically. Residuals carrying a tensor-sharded axis (heads, MLP hidden, vocab) are divided by
  the tensor-parallel size.
* **backward working set**: while the backward pass runs, the gradient of the largest activation
  (typically the float32 logits) exists next to the saved ones; later, the block being
  differentiated holds what remat recomputes and, over an expert axis, the buffers of the
  exchange's overflow round being differentiated (the outputs of its conditionals, found by
  tracing ``jax.grad``).

Time is a roofline: model FLOPs per step (``indicfm.model.flops``) at an assumed MFU, plus the
communication the mesh implies (FSDP all-gathers and gradient reduce-scatters, data-parallel
all-reduces, expert all-to-alls, tensor-parallel all-reduces) at the interconnect bandwidth in
``configs/hardware.yaml``. Collectives XLA overlaps with compute (FSDP, data parallel) only cost what
exceeds the compute time; all-to-all and tensor-parallel all-reduces sit on the critical path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from indicfm.hardware import GIB, Chip, Slice, parse_slice

MESH_AXES = ("data", "fsdp", "expert", "tensor")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
#: fraction of HBM a run may plan to use: XLA needs room for fragmentation, collectives' buffers
#: and the program itself
USABLE_HBM_FRACTION = 0.9


class PlanError(ValueError):
    """The config cannot be planned on this hardware as given (e.g. a mesh that does not fit the slice)."""


# ------------------------------------------------------------------------------------------ mesh


def mesh_sizes(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """Sizes of the (data, fsdp, expert, tensor) axes on ``num_devices`` (-1 fills the rest): the
    trainer's own arithmetic (``indicfm.sharding.resolve_mesh_sizes``), its errors as ``PlanError``."""
    from indicfm.sharding import resolve_mesh_sizes

    try:
        return resolve_mesh_sizes(mesh_cfg, num_devices)
    except ValueError as err:
        raise PlanError(str(err)) from None


def _abstract_mesh(sizes: dict[str, int]):
    import jax

    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def describe_mesh(sizes: dict[str, int]) -> str:
    return " ".join(f"{a}={sizes[a]}" for a in MESH_AXES)


# ------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class _Var:
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


def _shard_elements(var: _Var, sizes: dict[str, int], rules: dict) -> int:
    """Elements of ``var`` one device holds under the mesh (the rules table decides the split)."""
    from indicfm.sharding import logical_to_spec

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
    from indicfm.sharding import logical_axis_rules

    rules = logical_axis_rules(cfg.mesh.shard_weights_over_data)
    everything = trainable = 0.0
    for var in _abstract_variables(cfg.model):
        nbytes = _shard_elements(var, sizes, rules) * var.itemsize
        everything += nbytes
        if var.trainable:
            trainable += nbytes
    return everything, trainable


# ----------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Residual:
    """One tensor the backward pass keeps: its global shape and bytes, and whether it was produced
    inside ``shard_map`` (then it is split over every mesh axis, one block per device)."""

    shape: tuple[int, ...]
    nbytes: int
    per_device_block: bool
    from_batch: bool  # computed from the tokens (split with the batch), not only from weights


def _traced_loss(model_cfg: Any, batch: int, seq_len: int):
    """(loss function, abstract parameters, other variables, a ``[batch, seq_len]`` token spec): the
    training loss of the abstract model, for tracing only."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from indicfm.model.transformer import Transformer
    from indicfm.train.loss import masked_cross_entropy_sum

    # The loss-free router bias only changes which experts are picked, never a shape; leaving it out
    # avoids a Flax trace-level error when it sits inside remat (seen with flax 0.12.8).
    traced_cfg = model_cfg.model_copy(update={"loss_free_bias": False})
    # the abstract model is built outside the mesh: with one set, Flax reads logical names as mesh axes
    abstract = nnx.eval_shape(lambda: Transformer(traced_cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

    def loss(params_, rest_, tokens_, segments_, positions_):
        model = nnx.merge(graphdef, params_, rest_)
        logits, stats = model(tokens_, segments_, positions_)
        ce, count = masked_cross_entropy_sum(logits, tokens_, segments_)
        return ce / jnp.maximum(count, 1.0) + stats.aux_loss

    return loss, params, rest, jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)


def _tracing_for(platform: str | None, mesh_shape: tuple[int, ...]):
    """The context a trace runs in: the target platform's backends and an abstract mesh of ``mesh_shape``."""
    import jax

    from indicfm.model.platform import compiling_for

    stack = contextlib.ExitStack()
    if platform:
        stack.enter_context(compiling_for(platform))
    stack.enter_context(jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(mesh_shape, MESH_AXES)))
    return stack


@functools.lru_cache(maxsize=64)
def saved_residuals(
    model_cfg: Any, batch: int, seq_len: int, mesh_shape: tuple[int, ...], platform: str | None = None
) -> tuple[Residual, ...]:
    """Every tensor the backward pass keeps for one micro-batch of ``batch`` rows (global shapes).

    Traced (never compiled) with ``jax.make_jaxpr`` of ``jax.vjp`` over the loss, under an abstract
    mesh of ``mesh_shape`` so expert-parallel dispatch is traced as training runs it. Residuals that
    are just the inputs (weights, tokens) are not new memory and are left out.

    ``platform`` (``"tpu"``) traces the model as it runs there: the backends differ in what they
    keep (XLA attention saves the ``L x L`` probabilities, splash attention only its output and
    log-sum-exp), so a TPU slice must not be priced with the local CPU's attention.
    """
    import jax
    import jax.numpy as jnp

    loss, params, rest, tokens = _traced_loss(model_cfg, batch, seq_len)

    def forward_for_backward(params_, rest_, tokens_, segments_, positions_):
        _, f_vjp = jax.vjp(lambda p: loss(p, rest_, tokens_, segments_, positions_), params_)
        return f_vjp

    with _tracing_for(platform, mesh_shape):
        jaxpr = jax.make_jaxpr(forward_for_backward)(params, rest, tokens, tokens, tokens).jaxpr
    inputs = set(map(id, jaxpr.invars)) | set(map(id, jaxpr.constvars))
    from_shard_map = {id(v) for eqn in jaxpr.eqns if eqn.primitive.name == "shard_map" for v in eqn.outvars}
    # data flow from the three [B, L] inputs: what depends on them is split with the batch
    batch_vars = {id(v) for v in jaxpr.invars[-3:]}
    for eqn in jaxpr.eqns:
        if any(id(v) in batch_vars for v in eqn.invars if type(v).__name__ != "Literal"):
            batch_vars.update(id(v) for v in eqn.outvars)
    if platform == "tpu":
        producer = {id(v): eqn for eqn in jaxpr.eqns for v in eqn.outvars}
        stored = _stored_buffers(jaxpr.outvars, producer, inputs)
    else:  # every residual is a buffer of its own (see _stored_buffers for why TPU differs)
        stored = list({id(v): (v, False) for v in jaxpr.outvars if _is_new_array(v, inputs)}.values())
    devices = math.prod(mesh_shape)
    residuals = []
    for var, in_shard_map in stored:
        nbytes = math.prod(var.aval.shape) * jnp.dtype(var.aval.dtype).itemsize
        if in_shard_map:  # one device's block: as the whole array over the mesh, like shard_map's outputs
            residuals.append(Residual(tuple(var.aval.shape), nbytes * devices, True, True))
        else:
            residuals.append(Residual(tuple(var.aval.shape), nbytes, id(var) in from_shard_map, id(var) in batch_vars))
    return tuple(residuals)


#: Primitives XLA fuses into whatever consumes them (elementwise maths, dtype casts, broadcasts and
#: reshapes): their results are recomputed inside the consumer's fusion instead of being written out.
_FUSIBLE = frozenset(
    """abs add and broadcast_in_dim clamp convert_element_type copy copy_p cos div eq erf exp exp2 expand_dims
    ge gt integer_pow is_finite le log log1p logistic lt max min mul ne neg not or pow reshape rsqrt select_n
    sign sin sqrt square squeeze stop_gradient sub tanh xor""".split()
)


def _is_new_array(var: Any, inputs: set[int]) -> bool:
    """An array the backward pass keeps that is not already in memory as an input (weights, tokens)."""
    return type(var).__name__ != "Literal" and hasattr(getattr(var, "aval", None), "shape") and id(var) not in inputs


def _stored_buffers(outvars: Any, producer: dict, inputs: set[int]) -> list[tuple[Any, bool]]:
    """The buffers XLA keeps for the backward pass, given the residuals autodiff asks for, each with
    whether it lives inside ``shard_map`` (its shape is then one device's block).

    On TPU, a residual that is an elementwise function of other buffers (``silu(gate)``, a bf16 copy
    of an f32 activation, a broadcast mask) is not written out: the backward fusion that reads it,
    matmuls included (XLA:TPU generates its matmuls and fuses elementwise producers into their
    operands), recomputes it from its sources, the outputs of the matmuls, reductions and kernels
    before it. XLA:CPU and XLA:GPU call library matmuls (Eigen, cuBLAS) whose operands must exist
    in memory, so there every residual is priced as a buffer of its own.
    So each residual costs its sources (each counted once), unless storing the residual itself is
    cheaper. Inputs (weights, tokens) cost nothing: they are in memory anyway. The walk continues
    into ``shard_map`` and ``jit`` bodies, where the expert dispatch keeps most of its buffers.
    """
    memo: dict[int, dict[int, tuple[Any, bool]]] = {}

    def nbytes(var: Any) -> int:
        return math.prod(var.aval.shape) * var.aval.dtype.itemsize

    def walk(var: Any, scope: dict, local: bool) -> dict[int, tuple[Any, bool]]:
        """Buffers ``var`` is computed from; ``scope`` maps a body's inputs to the caller's vars."""
        if type(var).__name__ == "Literal":
            return {}
        if id(var) in memo:
            return memo[id(var)]
        found: dict[int, tuple[Any, bool]] = {}
        outer = scope["inputs"].get(id(var))
        eqn = scope["producer"].get(id(var))
        if outer is not None:
            found = walk(outer[0], outer[1], outer[2])
        elif id(var) in inputs or eqn is None:
            found = {}
        elif eqn.primitive.name in _FUSIBLE:
            for v in eqn.invars:
                found.update(walk(v, scope, local))
        elif eqn.primitive.name in ("shard_map", "pjit", "jit") and "jaxpr" in eqn.params:
            body = getattr(eqn.params["jaxpr"], "jaxpr", eqn.params["jaxpr"])
            inner = {
                "producer": {id(v): e for e in body.eqns for v in e.outvars},
                "inputs": {id(b): (o, scope, local) for b, o in zip(body.invars, eqn.invars)},
            }
            inner_local = local or eqn.primitive.name == "shard_map"
            found = walk(body.outvars[eqn.outvars.index(var)], inner, inner_local)
        else:
            found = {id(var): (var, local)}
        memo[id(var)] = found
        return found

    top = {"producer": producer, "inputs": {}}
    stored: dict[int, tuple[Any, bool]] = {}
    for var in outvars:
        if not _is_new_array(var, inputs):
            continue
        new = {k: v for k, v in walk(var, top, False).items() if k not in stored}
        if sum(nbytes(v) for v, _ in new.values()) <= nbytes(var):
            stored.update(new)
        else:
            stored[id(var)] = (var, False)
    return list(stored.values())


# ------------------------------------------------------------------- loops of conditionals


def _called_jaxprs(eqn: Any) -> list[Any]:
    """The jaxprs an equation runs (``jit``, ``shard_map`` and ``checkpoint`` bodies, ``cond``
    branches, loop bodies)."""
    called = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                called.append(inner)
    return called


def _loop_bodies_in_shard_map(jaxpr: Any, in_shard_map: bool = False) -> Iterable[Any]:
    """Bodies of the ``scan`` / ``while`` loops run inside ``shard_map`` (shapes there are one device's)."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if in_shard_map and name == "scan":
            yield eqn.params["jaxpr"].jaxpr
        elif in_shard_map and name == "while":
            yield eqn.params["body_jaxpr"].jaxpr
        for inner in _called_jaxprs(eqn):
            yield from _loop_bodies_in_shard_map(inner, in_shard_map or name == "shard_map")


def _conditionals(body: Any) -> list[Any]:
    """The ``cond`` equations one iteration of ``body`` runs (nested loops are loops of their own)."""
    found = []
    for eqn in body.eqns:
        if eqn.primitive.name == "cond":
            found.append(eqn)
        elif eqn.primitive.name not in ("scan", "while"):
            for inner in _called_jaxprs(eqn):
                found.extend(_conditionals(inner))
    return found


def _is_constant(var: Any, producer: dict, bound: dict) -> bool:
    """Whether ``var`` is a constant broadcast to a shape (``jnp.zeros``, the 0 of ``jnp.where``):
    XLA materialises those where they are read, never as a buffer. ``bound`` maps a ``jit`` body's
    inputs to the caller's operands."""
    if type(var).__name__ == "Literal":
        return True
    if id(var) in bound:
        outer, outer_producer, outer_bound = bound[id(var)]
        return _is_constant(outer, outer_producer, outer_bound)
    eqn = producer.get(id(var))
    if eqn is None:
        return False
    if eqn.primitive.name.startswith("empty"):  # JAX's uninitialised placeholder
        return True
    if eqn.primitive.name in ("broadcast_in_dim", "convert_element_type", "reshape"):
        return _is_constant(eqn.invars[0], producer, bound)
    if eqn.primitive.name in ("jit", "pjit"):
        body = eqn.params["jaxpr"].jaxpr
        inner_producer = {id(v): e for e in body.eqns for v in e.outvars}
        inner_bound = {id(b): (o, producer, bound) for b, o in zip(body.invars, eqn.invars)}
        return _is_constant(body.outvars[eqn.outvars.index(var)], inner_producer, inner_bound)
    return False


def _conditional_output_bytes(eqn: Any) -> int:
    """Bytes of the buffers a ``cond`` writes out: each output some branch computes (not a constant,
    not the uninitialised placeholder JAX puts where only the other branch has a residual), each
    variable once. Nothing fuses across a branch boundary, so every such output is a buffer of its
    own, elementwise or not."""
    written: dict[int, Any] = {}  # output position -> its variable
    for branch in eqn.params["branches"]:
        body = branch.jaxpr
        producer = {id(v): e for e in body.eqns for v in e.outvars}
        seen: set[int] = set()
        for position, var in enumerate(body.outvars):
            if not hasattr(getattr(var, "aval", None), "shape") or id(var) in seen:
                continue
            seen.add(id(var))
            if not _is_constant(var, producer, {}):
                written[position] = eqn.outvars[position]
    return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in written.values())


@functools.lru_cache(maxsize=64)
def looped_conditional_bytes(
    model_cfg: Any, batch: int, seq_len: int, mesh_shape: tuple[int, ...], platform: str | None = None
) -> int:
    """Bytes one device keeps for one iteration of the busiest loop of conditionals in the train
    step's gradient (the dropless exchange's overflow rounds), for one micro-batch of ``batch`` rows.

    The overflow rounds are a ``scan`` of ``cond`` under ``jax.checkpoint``; the backward pass runs
    each round again and then its transpose, two conditionals: the first writes out every residual
    of the round (the receive buffer, the grouped SwiGLU's projections and row masks, the expert
    weights), the second the cotangents it returns. Traced (``jax.make_jaxpr`` of ``jax.grad``,
    never compiled) like :func:`saved_residuals`.
    """
    import jax

    loss, params, rest, tokens = _traced_loss(model_cfg, batch, seq_len)
    with _tracing_for(platform, mesh_shape):
        jaxpr = jax.make_jaxpr(jax.grad(loss))(params, rest, tokens, tokens, tokens).jaxpr
    return max(
        (sum(map(_conditional_output_bytes, _conditionals(body))) for body in _loop_bodies_in_shard_map(jaxpr)),
        default=0,
    )


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
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    devices = batch_shards * sizes["tensor"]
    mesh_shape = tuple(sizes[a] for a in MESH_AXES)
    per_device = []
    for r in saved_residuals(cfg.model, micro, cfg.data.seq_len, mesh_shape, platform):
        if r.per_device_block:
            per_device.append(r.nbytes / devices)
        elif r.from_batch:
            per_device.append(r.nbytes / batch_shards / _tensor_split(r.shape, cfg.model, sizes["tensor"]))
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


def per_device_batch(cfg: Any, sizes: dict[str, int]) -> int:
    """Rows of one micro-batch on one device: the batch is split over every data-like axis."""
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = cfg.trainer.global_batch_size // cfg.trainer.micro_batches
    if micro % shards:
        raise PlanError(
            f"trainer.global_batch_size / trainer.micro_batches = {micro} rows do not split over "
            f"data x fsdp x expert = {shards} devices; make the batch a multiple of {shards} "
            f"(e.g. --set trainer.global_batch_size={shards * cfg.trainer.micro_batches * max(1, -(-micro // shards))})"
        )
    return micro // shards


def _gathered_sizes(cfg: Any, sizes: dict[str, int]) -> dict[str, int]:
    """The mesh as a weight looks once FSDP has all-gathered it (no split over the weight-sharding axes)."""
    gathered = dict(sizes, fsdp=1)
    if cfg.mesh.shard_weights_over_data:
        gathered["data"] = 1
    return gathered


def largest_gathered_weight(cfg: Any, sizes: dict[str, int]) -> float:
    """Bytes of the largest trainable variable after the FSDP all-gather (0 without FSDP)."""
    from indicfm.sharding import logical_axis_rules

    gathered = _gathered_sizes(cfg, sizes)
    if gathered == sizes:
        return 0.0
    rules = logical_axis_rules(cfg.mesh.shard_weights_over_data)
    return max(
        (_shard_elements(v, gathered, rules) * v.itemsize for v in _abstract_variables(cfg.model) if v.trainable),
        default=0.0,
    )


def trace_platform(chip: Chip) -> str | None:
    """The platform the model is traced for when pricing ``chip``: TPU backends (splash attention,
    the Pallas grouped matmul) are traced on any machine; other chips use the local backends."""
    return "tpu" if chip.kind == "tpu" else None


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


# ------------------------------------------------------------------------------ time and traffic


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


def step_time(cfg: Any, sizes: dict[str, int], slice_: Slice, mfu: float) -> StepTime:
    """Roofline compute at ``mfu`` plus ring-collective time for the traffic the mesh implies."""
    from indicfm.model.flops import train_flops_per_token

    model = cfg.model
    n = slice_.num_chips
    tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    compute = train_flops_per_token(model, cfg.data.seq_len) * tokens / n / (slice_.chip.peak_flops * mfu)

    _, trainable = state_bytes_per_device(cfg, sizes)
    micro = cfg.trainer.micro_batches
    act_bytes = DTYPE_BYTES[model.compute_dtype]
    tokens_per_device = tokens / (sizes["data"] * sizes["fsdp"] * sizes["expert"])

    def ring(nbytes: float, group: int, axis: str) -> float:
        return 0.0 if group <= 1 else nbytes * (group - 1) / group / _axis_bandwidth(axis, sizes, slice_)

    f = sizes["fsdp"] * (sizes["data"] if cfg.mesh.shard_weights_over_data else 1)
    gathered = trainable * f
    # all-gather for forward and again for backward in every micro-batch, one reduce-scatter of gradients
    fsdp = ring(gathered * (2 * micro + 1), f, "fsdp")
    data_parallel = 0.0 if cfg.mesh.shard_weights_over_data else ring(2 * trainable, sizes["data"], "data")
    # dispatch + combine, forward and backward, of every routed token copy in every MoE layer
    a2a_bytes = 4 * model.num_moe_layers * tokens_per_device * model.top_k * model.d_model * act_bytes
    all_to_all = ring(a2a_bytes, sizes["expert"], "expert")
    # two all-reduces (attention and MLP outputs) forward and two backward per block; all-reduce = 2x ring
    tp_bytes = 4 * 2 * model.num_layers * tokens_per_device * model.d_model * act_bytes
    tensor_parallel = ring(tp_bytes, sizes["tensor"], "tensor")
    return StepTime(compute, fsdp, data_parallel, all_to_all, tensor_parallel)


# ------------------------------------------------------------------------------------- the plan


@dataclass
class MeshOption:
    sizes: dict[str, int]
    memory: Memory
    time: StepTime
    remat: str
    micro_batches: int = 1


@dataclass
class Plan:
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


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(cfg: Any, slice_: Slice) -> Iterable[dict[str, int]]:
    """Meshes worth trying on the slice: experts split evenly, tensor parallelism inside one host and
    dividing the KV heads, and the micro-batch splitting over the data-like axes."""
    n = slice_.num_chips
    model = cfg.model
    micro = cfg.trainer.global_batch_size // cfg.trainer.micro_batches
    for tensor in _divisors(n):
        if tensor > slice_.chips_per_host or model.num_kv_heads % tensor:
            continue
        for expert in _divisors(n // tensor):
            if model.num_experts % expert:
                continue
            for fsdp in _divisors(n // tensor // expert):
                data = n // tensor // expert // fsdp
                if micro % (data * fsdp * expert):
                    continue
                yield {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}


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


# ------------------------------------------------------------------------------------- printing


def _gib(nbytes: float) -> str:
    if nbytes < GIB:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / GIB:.2f} GiB"


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _duration(hours: float) -> str:
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

