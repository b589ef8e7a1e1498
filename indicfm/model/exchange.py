"""Dropless expert parallelism's exchange: each assignment's row travels to its expert's device and
back exactly once, in receive buffers sized for the useful rows, never for the worst case.

Why: the number of rows a device receives depends on the routing.  A fixed worst-case buffer
(every peer may send it all ``M`` of its rows) costs ``n`` times the useful traffic and receive
memory on an expert axis of size ``n``.  Instead:

1. **Counts first.**  Every device all-gathers the per-expert counts of its peers (``[n, E]``
   integers, a few KiB), so every device knows the whole traffic matrix and can compute, without
   further talk, which slice of whose rows lands where.
2. **Rounds of bounded buffers.**  A device receives at most ``W = round_width(M)`` rows per round
   (1.25x its own ``M``: a balanced step needs one round).  Its incoming rows are ordered by
   (local expert, sender), so the receive buffer is already grouped by expert for the grouped
   matmul, and round ``r`` carries positions ``[r*W, (r+1)*W)`` of that order.  When routing is
   skewed, overflow rounds carry the rest: nothing is dropped.  The number of rounds is
   data-dependent; it is the same on every device (a ``pmax``), so all take the same branches.
3. **Ragged transfer.**  One round is a ``jax.lax.ragged_all_to_all`` that moves only the rows of
   the round (``E`` slices per device: one per (peer, local expert)), the grouped SwiGLU on the
   ``[W, D]`` buffer, and the reverse ragged exchange of the outputs.  XLA:CPU cannot run
   ``ragged_all_to_all``, so off TPU/GPU :func:`emulated_ragged_all_to_all` implements the same
   offsets contract with a dense ``all_to_all`` (``n`` times the bytes: a test vehicle, not a fast
   path), and the index arithmetic is tested on fake CPU devices against a single device.

Differentiation: round 0 is plain differentiable code (JAX transposes ``ragged_all_to_all`` into
the reverse exchange).  Overflow rounds run in a ``scan`` over the static worst-case number of
rounds, each a ``cond`` that skips rounds not needed, under ``jax.checkpoint`` so the scan keeps no
per-round buffers for the backward pass (a skipped round costs a predicate, a needed one is
recomputed) — a ``while_loop`` would need a hand-written backward.

Shape legend: M rows (assignments) a device sends, D model width, E experts, n = N expert-axis
size, X = E/N experts per device, W rows a device receives per round, R rounds.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
from flax import struct

from indicfm.model.grouped_matmul import round_width
from indicfm.model.platform import target_platform

ExchangeImpl = Literal["ragged_all_to_all", "all_to_all"]


def resolve_exchange(impl: str, platform: str | None = None) -> ExchangeImpl:
    """'auto' -> ``ragged_all_to_all`` on TPU and GPU; ``all_to_all`` (the emulation) elsewhere,
    since XLA:CPU has no ragged-all-to-all."""
    if impl != "auto":
        return impl  # type: ignore[return-value]
    platform = platform or target_platform()
    return "ragged_all_to_all" if platform in ("tpu", "gpu") else "all_to_all"


def vary_over(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``x`` typed as varying over every shard_map axis in ``axes`` (a type cast, no communication).

    ``jax.custom_vjp`` kernels and ``lax.cond`` branches must agree exactly on how their values
    vary over the mesh axes; casting everything to vary over every axis that tokens or weights are
    split over makes them agree.  Autodiff transposes the cast into the ``psum`` each gradient
    needs.  ``pcast`` refuses an axis ``x`` already varies over.
    """
    for axis in axes:
        try:
            x = jax.lax.pcast(x, axis, to="varying")
        except ValueError:  # already varying over this axis
            pass
    return x


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """``jax.lax.ragged_all_to_all``'s contract (same arguments, same result) built from a dense
    ``all_to_all``: slice ``q`` of ``operand`` (``input_offsets[q]``, ``send_sizes[q]`` rows) goes to
    peer ``q // (len(input_offsets) / n)`` and lands at row ``output_offsets[q]`` of that peer's
    ``output``; rows nobody writes keep ``output``'s values.

    Each peer is sent a whole ``output``-shaped chunk (mostly zeros) plus a row mask, so the bytes
    are ``n`` times the payload: for XLA:CPU, which cannot run the ragged collective.
    ``recv_sizes`` is implied by the senders' ``send_sizes`` and not needed here.
    """
    del recv_sizes
    N = jax.lax.axis_size(axis_name)
    S = input_offsets.shape[0] // N  # slices per peer
    P = output.shape[0]
    io_NxS, size_NxS, oo_NxS = (a.reshape(N, S) for a in (input_offsets, send_sizes, output_offsets))
    p_P = jnp.arange(P, dtype=jnp.int32)
    inside_NxPxS = (p_P[None, :, None] >= oo_NxS[:, None, :]) & (p_P[None, :, None] < (oo_NxS + size_NxS)[:, None, :])
    src_NxP = jnp.sum(jnp.where(inside_NxPxS, io_NxS[:, None, :] + p_P[None, :, None] - oo_NxS[:, None, :], 0), -1)
    sent_NxP = jnp.any(inside_NxPxS, axis=-1)
    rows = operand[jnp.clip(src_NxP, 0, operand.shape[0] - 1)]  # [N, P, ...]
    mask = sent_NxP.reshape(N, P, *(1,) * (operand.ndim - 1))
    chunks = jnp.where(mask, rows, jnp.zeros((), operand.dtype))
    got_chunks = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # [sender, P, ...]
    got_mask = jax.lax.all_to_all(mask.astype(jnp.int8), axis_name, 0, 0, tiled=True) > 0
    received = jnp.sum(jnp.where(got_mask, got_chunks, jnp.zeros((), operand.dtype)), axis=0)
    return jnp.where(jnp.any(got_mask, axis=0), received, output)


def ragged_exchange(impl: ExchangeImpl, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                    axis_name):
    """One ragged all-to-all over ``axis_name``: the real collective or its CPU emulation."""
    fn = jax.lax.ragged_all_to_all if impl == "ragged_all_to_all" else emulated_ragged_all_to_all
    return fn(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis_name)


@struct.dataclass
class ExchangePlan:
    """Who sends which rows to whom, from the all-gathered counts (identical on every peer).

    Indices: i sender, j receiver, x local expert of the receiver (global expert ``j * X + x``).
    """

    count_NxNxX: jax.Array  # rows sender i holds for expert x of receiver j
    send_start_NxNxX: jax.Array  # where those rows start in sender i's expert-sorted rows
    recv_start_NxXxN: jax.Array  # [j, x, i]: where they start in receiver j's (expert, sender) order
    me: jax.Array  # this device's index on the expert axis
    num_rounds: jax.Array  # rounds needed (same on every device)
    width: int = struct.field(pytree_node=False)  # W: rows a device receives per round


def plan_exchange(sizes_E: jax.Array, ep_axis: str, width: int, sync_axes: tuple[str, ...]) -> ExchangePlan:
    """The exchange plan from this device's per-expert row counts ``sizes_E`` (its rows are sorted
    by global expert; ``sum(sizes_E)`` of them at most ``M``).  ``sync_axes``: every mesh axis, so
    the round count agrees everywhere."""
    N = jax.lax.axis_size(ep_axis)
    E = sizes_E.shape[0]
    X = E // N
    counts_NxE = jax.lax.all_gather(sizes_E.astype(jnp.int32), ep_axis)  # [sender, global expert]
    send_start_NxE = jnp.cumsum(counts_NxE, axis=1) - counts_NxE
    count_NxNxX = counts_NxE.reshape(N, N, X)
    per_receiver_NxXxN = jnp.transpose(count_NxNxX, (1, 2, 0))  # [j, x, i]
    flat_NxXN = per_receiver_NxXxN.reshape(N, X * N)
    recv_start_NxXxN = (jnp.cumsum(flat_NxXN, axis=1) - flat_NxXN).reshape(N, X, N)
    most_received = jnp.max(jnp.sum(flat_NxXN, axis=1))
    num_rounds = (most_received + width - 1) // width
    for axis in sync_axes:  # the round count steers collectives: every device must agree on it
        num_rounds = jax.lax.pmax(num_rounds, axis)
    return ExchangePlan(count_NxNxX, send_start_NxE.reshape(N, N, X), recv_start_NxXxN,
                        jax.lax.axis_index(ep_axis).astype(jnp.int32), num_rounds, width)


def max_rounds(num_rows: int, num_peers: int, width: int) -> int:
    """Static bound on the rounds: every peer sends all its ``num_rows`` rows to one device."""
    return max(1, math.ceil(num_peers * num_rows / width))


@struct.dataclass
class RoundArgs:
    """``ragged_all_to_all`` arguments of one round, both directions, and the received group sizes."""

    send_offsets: jax.Array  # forward, indexed by slice (j, x): rows of my sorted input
    send_sizes: jax.Array
    send_dest_offsets: jax.Array  # forward: where the slice lands in receiver j's round buffer
    recv_sizes: jax.Array  # forward, indexed by slice (i, x): rows I get from sender i for my expert x
    buffer_offsets: jax.Array  # reverse, indexed by (i, x): where sender i's rows sit in my buffer
    return_offsets: jax.Array  # reverse: where they go back to in sender i's sorted rows
    group_sizes_X: jax.Array  # rows of each of my local experts in this round's buffer


def round_args(plan: ExchangePlan, r: jax.Array) -> RoundArgs:
    """The slices of round ``r``: positions ``[r*W, (r+1)*W)`` of each receiver's (expert, sender) order."""
    W = plan.width
    count_NxXxN = jnp.transpose(plan.count_NxNxX, (1, 2, 0))  # [j, x, i]
    lo_NxXxN = jnp.clip(r * W - plan.recv_start_NxXxN, 0, count_NxXxN)
    hi_NxXxN = jnp.clip((r + 1) * W - plan.recv_start_NxXxN, 0, count_NxXxN)
    size_NxXxN = hi_NxXxN - lo_NxXxN
    pos_NxXxN = jnp.clip(plan.recv_start_NxXxN + lo_NxXxN - r * W, 0, W)  # in the receiver's round buffer
    send_start_NxXxN = jnp.transpose(plan.send_start_NxNxX, (1, 2, 0))  # [j, x, i]
    me = plan.me
    # As a sender: slices (j, x) of my rows.  As a receiver: slices (i, x) from each sender i.
    mine_as_sender = lambda a: a[:, :, me].reshape(-1)  # noqa: E731  [j, x] flattened
    mine_as_receiver = lambda a: a[me].T.reshape(-1)  # noqa: E731  [x, i] -> [i, x] flattened
    return RoundArgs(
        send_offsets=mine_as_sender(send_start_NxXxN + lo_NxXxN),
        send_sizes=mine_as_sender(size_NxXxN),
        send_dest_offsets=mine_as_sender(pos_NxXxN),
        recv_sizes=mine_as_receiver(size_NxXxN),
        buffer_offsets=mine_as_receiver(pos_NxXxN),
        return_offsets=mine_as_receiver(send_start_NxXxN + lo_NxXxN),
        group_sizes_X=jnp.sum(size_NxXxN[me], axis=1),
    )


def exchanged_experts(x_sorted_MxD: jax.Array, sizes_E: jax.Array,
                      experts: Callable[[jax.Array, jax.Array], jax.Array], *, ep_axis: str,
                      impl: ExchangeImpl, sync_axes: tuple[str, ...]) -> jax.Array:
    """Expert outputs for this device's expert-sorted rows, computed on the experts' devices.

    ``experts(buffer_WxD, group_sizes_X)`` runs the local experts on a buffer grouped by local
    expert (rows past the groups are zeros and must give zeros).  Returns ``[M, D]`` in the order
    of ``x_sorted_MxD``.
    """
    M = x_sorted_MxD.shape[0]
    N = jax.lax.axis_size(ep_axis)
    W = round_width(M, 1)
    plan = plan_exchange(sizes_E, ep_axis, W, sync_axes)
    bound = max_rounds(M, N, W)

    def one_round(x_MxD, r):
        a = round_args(plan, r)
        buffer_WxD = ragged_exchange(impl, x_MxD, jnp.zeros((W, *x_MxD.shape[1:]), x_MxD.dtype),
                                     a.send_offsets, a.send_sizes, a.send_dest_offsets, a.recv_sizes, ep_axis)
        y_WxD = experts(buffer_WxD, a.group_sizes_X)
        y_MxD = ragged_exchange(impl, y_WxD, jnp.zeros_like(x_MxD), a.buffer_offsets, a.recv_sizes,
                                a.return_offsets, a.send_sizes, ep_axis)
        return vary_over(y_MxD, sync_axes)

    y_MxD = one_round(x_sorted_MxD, jnp.int32(0))
    if bound == 1:
        return y_MxD

    @jax.checkpoint
    def overflow_round(x_MxD, r):
        skip = lambda x_, r_: vary_over(jnp.zeros_like(x_), sync_axes)  # noqa: E731
        return jax.lax.cond(r < plan.num_rounds, one_round, skip, x_MxD, r)

    def scan_body(y_acc, r):
        return y_acc + overflow_round(x_sorted_MxD, r), None

    y_MxD, _ = jax.lax.scan(scan_body, y_MxD, jnp.arange(1, bound, dtype=jnp.int32))
    return y_MxD
