"""Tracing the train step for the planner: the tensors the backward pass keeps, read from its jaxpr.

Memory for activations is not a hand-kept formula: :func:`saved_residuals` traces ``jax.vjp`` of
the training loss at one micro-batch (``jax.make_jaxpr``, never compiled) and keeps the residuals
that are not inputs, the same trick as ``jax.ad_checkpoint.print_saved_residuals``, so the remat
policy and the attention and dispatch backends of the target platform are honoured because they
are part of what is traced. :func:`looped_conditional_bytes` walks the gradient's jaxpr for the
dropless exchange's overflow rounds (a ``scan`` of ``cond``), whose buffers exist only while one
round is differentiated.

Everything here answers in global shapes and bytes for a whole mesh; splitting them over devices
is ``indicfm.launch.plan_memory``'s job. The walks are kept apart from that accounting because they
depend on how XLA fuses and on JAX's jaxpr structure, and change when those do.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from indicfm.hardware import Chip
from indicfm.sharding import MESH_AXES


def trace_platform(chip: Chip) -> str | None:
    """The platform the model is traced for when pricing ``chip``: TPU backends (splash attention,
    the Pallas grouped matmul) are traced on any machine; other chips use the local backends."""
    return "tpu" if chip.kind == "tpu" else None


# ------------------------------------------------------------------------------- saved residuals


@dataclass(frozen=True)
class Residual:
    """One tensor the backward pass keeps: its global shape and bytes, and whether it was produced
    inside ``shard_map`` (then it is split over every mesh axis, one block per device)."""

    shape: tuple[int, ...]
    nbytes: int
    per_device_block: bool
    from_batch: bool  # computed from the tokens (split with the batch), not only from weights


def _traced_loss(model_cfg: Any, batch: int, seq_len: int) -> tuple[Callable[..., Any], Any, Any, Any]:
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


def _tracing_for(platform: str | None, mesh_shape: tuple[int, ...]) -> contextlib.ExitStack:
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

