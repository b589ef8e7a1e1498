"""Expert computation of one MoE layer: tokens to their experts' devices, the SwiGLU experts, back.

Runs per device inside ``jax.shard_map`` when a mesh is set (a plain function without one):
tokens split over the batch axes, experts over ``expert``, expert hidden over ``tensor``.
See :mod:`indicfm.model.moe` for the two dispatch implementations and their costs.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from indicfm.model.config import ModelConfig
from indicfm.model.exchange import exchanged_experts, resolve_exchange, vary_over
from indicfm.model.grouped_matmul import grouped_swiglu, resolve_grouped_matmul
from indicfm.model.routing import Routing
from indicfm.sharding import current_mesh, logical_to_spec


def _axis_size(axis: Any) -> int:
    return 1 if axis is None else jax.lax.axis_size(axis)


def _capacity_experts(x_BxLxD, expert_BxLxk, gate_BxLxk, slot_BxLxk, w_gate, w_up, w_down, *,
                      num_experts, capacity, ep_axis, tp_axis, gmm_impl, exchange, mesh_axes):
    """Capacity dispatch: scatter into ``[E, B, C, D]`` buffers, all-to-all, batched einsum, back."""
    del gmm_impl, exchange, mesh_axes
    B, L, D = x_BxLxD.shape
    E, C = num_experts, capacity
    b_BxLxk = jnp.broadcast_to(jnp.arange(B)[:, None, None], expert_BxLxk.shape)
    x_BxLxkxD = jnp.broadcast_to(x_BxLxD[:, :, None, :], (*expert_BxLxk.shape, D))
    buf_ExBxCxD = jnp.zeros((E, B, C, D), x_BxLxD.dtype)
    buf_ExBxCxD = buf_ExBxCxD.at[expert_BxLxk, b_BxLxk, slot_BxLxk].add(x_BxLxkxD, mode="drop")
    buf_ExMxD = buf_ExBxCxD.reshape(E, B * C, D)
    if ep_axis is not None:  # [E, B*C, D] -> [E/N local experts, N*B*C, D]
        buf_ExMxD = jax.lax.all_to_all(buf_ExMxD, ep_axis, split_axis=0, concat_axis=1, tiled=True)
    dt = x_BxLxD.dtype
    h = jax.nn.silu(jnp.einsum("emd,edf->emf", buf_ExMxD, w_gate.astype(dt)))
    h = h * jnp.einsum("emd,edf->emf", buf_ExMxD, w_up.astype(dt))
    y_ExMxD = jnp.einsum("emf,efd->emd", h, w_down.astype(dt))
    if tp_axis is not None:
        y_ExMxD = jax.lax.psum(y_ExMxD, tp_axis)
    if ep_axis is not None:
        y_ExMxD = jax.lax.all_to_all(y_ExMxD, ep_axis, split_axis=1, concat_axis=0, tiled=True)
    y_ExBxCxD = y_ExMxD.reshape(E, B, C, D)
    y_BxLxkxD = y_ExBxCxD.at[expert_BxLxk, b_BxLxk, slot_BxLxk].get(mode="fill", fill_value=0)
    return jnp.sum(y_BxLxkxD * gate_BxLxk[..., None].astype(dt), axis=2)


def inverse_permutation(order_M: jax.Array) -> jax.Array:
    """``inv`` with ``inv[order[i]] = i``, so ``sorted[inv]`` undoes ``x[order]``.

    Unsorting by this gather instead of ``zeros.at[order].set(sorted)``: JAX differentiates a
    scatter-*set* by scattering an id for every element of the updates (``[M, D]`` integer arrays
    and a second gather) to find which duplicate wins; it cannot know ``order`` is a permutation.
    That bookkeeping was ~20% of the dropless MoE layer's forward+backward on CPU.
    """
    M = order_M.shape[0]
    return jnp.zeros((M,), jnp.int32).at[order_M].set(jnp.arange(M, dtype=jnp.int32), unique_indices=True)


def _expert_swiglu(x_MxD, w_gate, w_up, w_down, sizes_G, impl: str, mesh_axes: tuple[str, ...]):
    """The grouped SwiGLU of dropless dispatch; ``mesh_axes``: axes tokens or weights are split over."""
    if resolve_grouped_matmul(impl) == "rounds" and mesh_axes:
        x_MxD, w_gate, w_up, w_down = (vary_over(a, mesh_axes) for a in (x_MxD, w_gate, w_up, w_down))
    return grouped_swiglu(x_MxD, w_gate, w_up, w_down, sizes_G, impl)


def _dropless_experts(x_BxLxD, expert_BxLxk, gate_BxLxk, slot_BxLxk, w_gate, w_up, w_down, *,
                      num_experts, capacity, ep_axis, tp_axis, gmm_impl, exchange, mesh_axes):
    """Dropless dispatch: sort assignments by expert, grouped matmul on the experts' devices (rows
    travel by :func:`indicfm.model.exchange.exchanged_experts` over an expert axis)."""
    del slot_BxLxk, capacity
    B, L, D = x_BxLxD.shape
    k = expert_BxLxk.shape[-1]
    E, M = num_experts, B * L * k
    x_TxD = x_BxLxD.reshape(B * L, D)
    expert_M = expert_BxLxk.reshape(M)
    order_M = jnp.argsort(expert_M, stable=True)
    x_sorted_MxD = x_TxD[order_M // k]
    sizes_E = jnp.bincount(expert_M, length=E)
    dt = x_BxLxD.dtype
    w_gate, w_up, w_down = w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt)

    def local_experts(rows_xD, sizes_G):
        return _expert_swiglu(rows_xD, w_gate, w_up, w_down, sizes_G, gmm_impl, mesh_axes)

    if _axis_size(ep_axis) == 1:
        y_sorted_MxD = local_experts(x_sorted_MxD, sizes_E)
    else:
        y_sorted_MxD = exchanged_experts(x_sorted_MxD, sizes_E, local_experts, ep_axis=ep_axis,
                                         impl=resolve_exchange(exchange), sync_axes=mesh_axes)
    if tp_axis is not None:
        y_sorted_MxD = jax.lax.psum(y_sorted_MxD, tp_axis)
    y_MxD = y_sorted_MxD[inverse_permutation(order_M)]
    y_BxLxkxD = y_MxD.reshape(B, L, k, D)
    return jnp.sum(y_BxLxkxD * gate_BxLxk[..., None].astype(dt), axis=2)


def _spec_axes(*specs) -> tuple[str, ...]:
    """Mesh axes named anywhere in the partition specs (entries are None, a name or a tuple)."""
    axes: list[str] = []
    for spec in specs:
        for entry in spec:
            for axis in (entry if isinstance(entry, tuple) else (entry,)):
                if axis is not None and axis not in axes:
                    axes.append(axis)
    return tuple(axes)


def run_experts(x_BxLxD, routing: Routing, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, cfg: ModelConfig,
                capacity: int | None) -> jax.Array:
    """Expert outputs combined with gates, ``[B, L, D]``; expert-parallel when a mesh is set.

    With a mesh (``jax.set_mesh``), this runs inside ``jax.shard_map`` over every mesh axis:
    tokens split over the batch axes, experts over ``expert``, expert hidden over ``tensor``
    (weights are gathered over ``fsdp`` by the compiler on the way in — FSDP).
    """
    body = _capacity_experts if cfg.dispatch == "capacity" else _dropless_experts
    static = dict(num_experts=cfg.num_experts, capacity=capacity, gmm_impl=cfg.grouped_matmul,
                  exchange=cfg.expert_exchange)
    args = (x_BxLxD, routing.expert_BxLxk, routing.gate_BxLxk, routing.slot_BxLxk,
            w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    mesh = current_mesh()
    if mesh is None:
        return body(*args, ep_axis=None, tp_axis=None, mesh_axes=(), **static)
    tok_spec = logical_to_spec(("batch", None, None), x_BxLxD.shape, mesh)
    w_in_spec = logical_to_spec(("experts", None, "expert_mlp"), w_gate_ExDxF.shape, mesh)
    w_out_spec = logical_to_spec(("experts", "expert_mlp", None), w_down_ExFxD.shape, mesh)
    ep_axis, tp_axis = w_in_spec[0], w_in_spec[2]
    fn = functools.partial(body, ep_axis=ep_axis, tp_axis=tp_axis, mesh_axes=_spec_axes(tok_spec, w_in_spec, w_out_spec), **static)
    sharded = jax.shard_map(
        fn, mesh=mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, tok_spec, w_in_spec, w_in_spec, w_out_spec),
        out_specs=tok_spec,
        # Pallas kernels (megablox) build outputs without shard_map's varying-axes types, so
        # type checking is off for them; autodiff then sums replicated inputs' cotangents itself.
        check_vma=resolve_grouped_matmul(cfg.grouped_matmul) != "megablox",
    )
    return sharded(*args)

