"""Mixture-of-Experts feed-forward: router, two dispatch implementations, auxiliary losses.

Flow of one MoE layer (``MoE.__call__``):

1. **Route** (plain jit code, sharded by the compiler like any activation): float32 router logits
   ``[B, L, E]``; scores are softmax probabilities or sigmoids; the top-k experts are chosen on
   ``score + bias`` (the bias is the loss-free balancing term, used for *selection only*); gates are
   the softmax probabilities of the chosen experts, or the chosen sigmoid scores renormalised to sum
   to one.  Load-balancing loss, z-loss, per-expert counts and (capacity dispatch) each
   assignment's slot in its expert's buffer are computed here over the *global* batch, so they do
   not depend on the mesh.
2. **Experts** (inside ``jax.shard_map`` when a mesh is set): tokens are grouped per expert, sent
   with ``all_to_all`` over the ``expert`` mesh axis to the devices owning their experts, run
   through the SwiGLU experts (hidden width split over ``tensor``, partial sums ``psum``-ed), and
   sent back, then combined with their gates.  Shared experts are a dense SwiGLU on every token.

Dispatch implementations (``ModelConfig.dispatch``), with T tokens per device, k = top_k,
E experts, D model width, F = d_expert, n = size of the expert mesh axis:

* ``capacity`` — token-choice top-k with a fixed buffer of ``C = ceil(capacity_factor * L * k / E)``
  slots per expert *per sequence* (a sequence is the balancing group, so results do not depend on
  how the batch is sharded).  Priority: all first choices in sequence order, then all second
  choices, ...  Assignments beyond C are dropped: the token passes through the residual only for
  that expert, and is counted in ``dropped_fraction``.  Buffers ``[E, B, C, D]`` are filled by a
  scatter and read back by a gather.  FLOPs: ``6 * E * B * C * D * F`` ≈ ``capacity_factor * 6 * T * k
  * D * F`` (padding slots are computed too); memory: ``E * B * C * (D + 2F)`` activations, i.e.
  ``capacity_factor`` times the useful ``T * k * (D + 2F)``; one all-to-all of ``T*k*cf*D`` each way.
* ``dropless`` — assignments sorted by expert and a grouped matmul (``jax.lax.ragged_dot`` on TPU;
  tokamax's grouped matmul on GPU when installed, else ``blocks``: each expert's rows padded to
  whole blocks and one batched matmul; on CPU ``rounds``: capacity-sized ``[E, width, D]`` buffers
  filled from the sorted rows and run again until the largest group is done, with a hand-written
  backward (``custom_vjp``) because autodiff cannot reverse a ``while_loop`` — never ``ragged_dot``
  on CPU/GPU, which XLA lowers to a dense product over every expert with the other rows masked).
  Nothing is dropped.
  FLOPs: exactly ``6 * T * k * D * F`` with ragged_dot/tokamax, ~1.25x that with ``blocks``, and
  ~1.25x per round with ``rounds`` (one round when no expert gets more than 1.25x its share)
  (``E`` times that with ``ragged_dot`` on CPU/GPU or the ``dense`` loop); memory ``T * k * (D + 2F)``.  With expert parallelism the number of rows a device sends
  to each peer is data-dependent, so each peer gets a worst-case buffer of ``T * k`` rows:
  all-to-all traffic and receive memory are ``n * T * k * D`` (n times the useful amount) — exact
  and never dropping, at a memory price that grows with the expert axis.

Shape legend: B batch, L length, D model, E experts, F expert hidden, C capacity slots,
k chosen experts per token, T tokens, M token-expert assignments (T*k), N expert-axis size.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from indicfm.model.config import ModelConfig
from indicfm.model.layers import SwiGLU, make_param, param_dtype, token_matmul
from indicfm.model.platform import target_platform
from indicfm.sharding import current_mesh, logical_to_spec


class RouterBias(nnx.Variable):
    """Loss-free balancing bias (DeepSeek-V3). Not an ``nnx.Param``: the optimizer never updates it;
    ``update_router_bias`` does, from the routed token counts."""


@struct.dataclass
class MoEStats:
    """Router statistics of a forward pass (a pytree, so it can leave a jitted step).

    aux_loss: scalar, already weighted: sum over MoE layers of
        ``aux_loss_weight * load_balance + z_loss_weight * z_loss`` — add it to the CE loss.
    load_balance_loss, z_loss: unweighted, mean over MoE layers (for logging).
    expert_counts: ``[num_moe_layers, E]`` token assignments routed to each expert (before drops,
        padding excluded).
    dropped_fraction: scalar, share of (non-padding) assignments dropped by capacity, mean over layers.
    """

    aux_loss: jax.Array
    load_balance_loss: jax.Array
    z_loss: jax.Array
    expert_counts: jax.Array
    dropped_fraction: jax.Array


@struct.dataclass
class Routing:
    """Routing decision of one layer for a ``[B, L]`` batch."""

    expert_BxLxk: jax.Array  # int32 chosen experts
    gate_BxLxk: jax.Array  # float32 combine weights (0 for padding tokens)
    slot_BxLxk: jax.Array  # int32 slot in the expert's per-sequence buffer; == capacity when dropped
    counts_E: jax.Array  # float32 assignments per expert (padding excluded)
    load_balance_loss: jax.Array
    z_loss: jax.Array
    dropped_fraction: jax.Array


def capacity_per_sequence(cfg: ModelConfig, seq_len: int) -> int:
    """Slots per expert for one sequence: ``ceil(capacity_factor * L * top_k / E)`` (at least 1)."""
    return max(1, math.ceil(cfg.capacity_factor * seq_len * cfg.top_k / cfg.num_experts))


def route(
    logits_BxLxE: jax.Array,
    valid_BxL: jax.Array,
    cfg: ModelConfig,
    bias_E: jax.Array | None = None,
    capacity: int | None = None,
) -> Routing:
    """Choose experts, gates, capacity slots and the balancing losses from float32 router logits.

    Load balance (Switch/GShard, generalised to top-k): ``E * sum_e f_e * P_e`` where ``f_e`` is the
    share of assignments sent to expert e and ``P_e`` the mean routing probability of e (softmax
    probabilities, or sigmoid scores normalised over all experts); 1.0 when perfectly balanced.
    z-loss: mean over tokens of ``logsumexp(logits)**2``.  Both average over non-padding tokens.
    """
    E, k = cfg.num_experts, cfg.top_k
    logits_BxLxE = logits_BxLxE.astype(jnp.float32)
    if cfg.router == "softmax":
        scores_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
        probs_BxLxE = scores_BxLxE
    else:
        scores_BxLxE = jax.nn.sigmoid(logits_BxLxE)
        probs_BxLxE = scores_BxLxE / jnp.sum(scores_BxLxE, axis=-1, keepdims=True)
    select_BxLxE = scores_BxLxE if bias_E is None else scores_BxLxE + jax.lax.stop_gradient(bias_E)
    _, expert_BxLxk = jax.lax.top_k(select_BxLxE, k)
    chosen_BxLxk = jnp.take_along_axis(scores_BxLxE, expert_BxLxk, axis=-1)
    if cfg.router == "sigmoid":
        chosen_BxLxk = chosen_BxLxk / jnp.sum(chosen_BxLxk, axis=-1, keepdims=True)
    valid = valid_BxL.astype(jnp.float32)
    gate_BxLxk = chosen_BxLxk * valid[..., None]

    onehot_BxLxkxE = jax.nn.one_hot(expert_BxLxk, E, dtype=jnp.float32) * valid[..., None, None]
    counts_E = jnp.sum(onehot_BxLxkxE, axis=(0, 1, 2))
    n_valid = jnp.maximum(jnp.sum(valid), 1.0)
    f_E = counts_E / (n_valid * k)
    p_E = jnp.sum(probs_BxLxE * valid[..., None], axis=(0, 1)) / n_valid
    load_balance = E * jnp.sum(f_E * p_E)
    z_BxL = jax.nn.logsumexp(logits_BxLxE, axis=-1) ** 2
    z_loss = jnp.sum(z_BxL * valid) / n_valid

    if capacity is None:  # dropless: every assignment is kept
        slot_BxLxk = jnp.zeros_like(expert_BxLxk)
        dropped = jnp.zeros((), jnp.float32)
    else:
        # Priority order inside a sequence: choice rank first, then position ([B, k*L] flattened).
        B, L = valid_BxL.shape
        onehot_BxKLxE = jnp.swapaxes(onehot_BxLxkxE, 1, 2).reshape(B, k * L, E).astype(jnp.int32)
        position_BxKLxE = jnp.cumsum(onehot_BxKLxE, axis=1) - 1
        slot_BxKL = jnp.sum(position_BxKLxE * onehot_BxKLxE, axis=-1)
        slot_BxLxk = jnp.swapaxes(slot_BxKL.reshape(B, k, L), 1, 2)
        kept_BxLxk = (slot_BxLxk < capacity) & valid_BxL[..., None].astype(bool)
        slot_BxLxk = jnp.where(kept_BxLxk, slot_BxLxk, capacity)
        dropped = jnp.sum(valid[..., None] * (1.0 - kept_BxLxk)) / (n_valid * k)
    return Routing(expert_BxLxk.astype(jnp.int32), gate_BxLxk, slot_BxLxk.astype(jnp.int32), counts_E,
                   load_balance, z_loss, dropped)


# --------------------------------------------------------------------------------------------
# Grouped matmul backends (dropless)


def resolve_grouped_matmul(impl: str, platform: str | None = None) -> str:
    """'auto' -> megablox on TPU (Pallas kernel, :func:`megablox_matmul`); on GPU tokamax if
    importable, else ``blocks``; on CPU ``rounds``.

    Not ragged_dot on CPU or GPU: there XLA lowers it to a dense product over *every* group with the
    other groups' rows masked (E times the FLOPs and an ``[E, M, D]`` temporary; measured 12x slower
    for the whole bench-moe train step on CPU, see the benchmarks section of the README).  ``blocks``
    pads each group to whole blocks and runs one batched matmul: about 1.25x the useful FLOPs.
    ``rounds`` runs capacity-shaped ``[E, width, D]`` buffers until every row is done: on CPU its
    small-block-free matmuls made the bench-moe MoE layer's forward+backward ~2x faster than
    ``blocks`` (``benchmarks.moe``); not yet measured on a GPU, so GPUs keep ``blocks``.
    """
    if impl != "auto":
        return impl
    platform = platform or target_platform()
    if platform == "tpu":
        return "megablox"
    if platform == "gpu":
        try:
            import tokamax  # noqa: F401
        except ImportError:
            return "blocks"
        return "tokamax"
    return "rounds"


def block_rows(num_rows: int, num_groups: int) -> int:
    """Rows per block of the ``blocks`` grouped matmul: a power of two near a quarter of the mean
    group size, within [8, 512].  The batched matmul then covers the static bound of
    ``M + G * block`` ≈ 1.25 M rows (the FLOPs of capacity dispatch at its default factor, without
    dropping), and blocks stay large enough for efficient matmuls and few enough that gathering one
    weight matrix per block stays cheap."""
    target = max(num_rows // (4 * max(num_groups, 1)), 1)
    return int(min(512, max(8, 2 ** int(math.log2(target)))))


def block_layout(group_sizes_G: jax.Array, num_rows: int, block: int) -> tuple[jax.Array, jax.Array, int]:
    """Where each row goes when every group is padded to whole blocks of ``block`` rows.

    Returns ``(dest_M, group_N, N)``: ``dest_M[i]`` is row i's index in the padded ``[N * block]``
    layout (``N * block``, i.e. out of range, for rows past ``sum(group_sizes)``); ``group_N[n]`` is
    the group of block n (blocks past the last group repeat it; they only hold zero rows).  ``N =
    ceil(num_rows / block) + G`` is a static bound: each group wastes less than one block.
    """
    G = group_sizes_G.shape[0]
    N = -(-num_rows // block) + G
    sizes_G = group_sizes_G.astype(jnp.int32)
    ends_G = jnp.cumsum(sizes_G)
    padded_G = (sizes_G + block - 1) // block * block
    padded_ends_G = jnp.cumsum(padded_G)
    rows_M = jnp.arange(num_rows, dtype=jnp.int32)
    group_M = jnp.minimum(jnp.searchsorted(ends_G, rows_M, side="right"), G - 1)
    offset_G = (padded_ends_G - padded_G) - (ends_G - sizes_G)
    dest_M = jnp.where(rows_M < ends_G[-1], rows_M + offset_G[group_M], N * block)
    starts_N = jnp.arange(N, dtype=jnp.int32) * block
    group_N = jnp.minimum(jnp.searchsorted(padded_ends_G, starts_N, side="right"), G - 1)
    return dest_M, group_N, N


#: Rows of one megablox tile; the row count is padded to a multiple of it.
MEGABLOX_ROWS = 128


def megablox_matmul(x_MxD: jax.Array, w_GxDxF: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """TPU Pallas grouped matmul (``jax.experimental.pallas.ops.tpu.megablox``, the kernel MaxText
    uses for dropless MoE): each tile of rows is multiplied by its own group's weights only, so the
    FLOPs are the useful ones plus at most one partial tile per group, and its custom VJP uses the
    same kernel for the backward pass.  Off TPU it runs in Pallas's interpreter (tests)."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    M, D = x_MxD.shape
    F = w_GxDxF.shape[-1]
    pad = -M % MEGABLOX_ROWS
    # The kernel leaves rows outside every group unwritten, in its output and in the gradient it
    # returns for x; selecting (not multiplying) them away keeps that garbage out of both.
    in_group_M = jnp.arange(M) < jnp.sum(group_sizes_G)
    x_padded = jnp.pad(jnp.where(in_group_M[:, None], x_MxD, 0), ((0, pad), (0, 0)))
    # contraction and output tiles: whole dims when small, else 512 (a multiple of TPU's 128 lanes;
    # megablox masks a last partial tile)
    tiling = (MEGABLOX_ROWS, min(D, 512), min(F, 512))
    out = gmm(
        x_padded, w_GxDxF.astype(x_MxD.dtype), group_sizes_G.astype(jnp.int32),
        x_MxD.dtype, tiling, None, None, False, target_platform() != "tpu",
    )
    return jnp.where(in_group_M[:, None], out[:M], 0)


def grouped_matmul(x_MxD: jax.Array, w_GxDxF: jax.Array, group_sizes_G: jax.Array, impl: str) -> jax.Array:
    """Rows of ``x`` are contiguous groups; group g is multiplied by ``w[g]``.  Rows past
    ``sum(group_sizes)`` produce zeros."""
    impl = resolve_grouped_matmul(impl)
    if impl == "rounds":  # a whole-SwiGLU kernel (_rounds_swiglu); one product alone uses blocks
        impl = "blocks"
    M = x_MxD.shape[0]
    ends_G = jnp.cumsum(group_sizes_G)
    in_group_M = jnp.arange(M) < ends_G[-1]
    if impl == "ragged_dot":
        out = jax.lax.ragged_dot(x_MxD, w_GxDxF, group_sizes_G.astype(jnp.int32))
    elif impl == "megablox":
        out = megablox_matmul(x_MxD, w_GxDxF, group_sizes_G)
    elif impl == "tokamax":
        import tokamax

        out = tokamax.ragged_dot(x_MxD, w_GxDxF, group_sizes_G.astype(jnp.int32))
    elif impl == "blocks":
        block = block_rows(M, w_GxDxF.shape[0])
        dest_M, group_N, N = block_layout(group_sizes_G, M, block)
        x_NxbxD = jnp.zeros((N * block, x_MxD.shape[1]), x_MxD.dtype).at[dest_M].set(x_MxD, mode="drop")
        out_NxbxF = jnp.einsum("nbd,ndf->nbf", x_NxbxD.reshape(N, block, -1), w_GxDxF[group_N])
        out = out_NxbxF.reshape(N * block, -1).at[dest_M].get(mode="fill", fill_value=0)
    elif impl == "dense":
        starts_G = ends_G - group_sizes_G
        rows_M = jnp.arange(M)

        def one_group(acc_MxF, g):
            mask_M = (rows_M >= starts_G[g]) & (rows_M < ends_G[g])
            return acc_MxF + jnp.where(mask_M[:, None], x_MxD @ w_GxDxF[g], 0), None

        zeros = jnp.zeros((M, w_GxDxF.shape[-1]), x_MxD.dtype)
        out, _ = jax.lax.scan(one_group, zeros, jnp.arange(w_GxDxF.shape[0]))
    else:
        raise ValueError(f"unknown grouped matmul implementation {impl!r}")
    return jnp.where(in_group_M[:, None], out, 0).astype(x_MxD.dtype)


def _blocks_swiglu(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G, block: int | None = None):
    """SwiGLU experts on rows grouped by expert: pad each group to whole blocks once, run three
    batched matmuls with one weight matrix per block (``w[group_N]``), and unpad once.

    The dropless counterpart of capacity dispatch's ``[E, C, D]`` buffers: nothing is dropped and
    the padding is bounded by one block per group instead of a capacity factor.
    """
    M, D = x_MxD.shape
    G = group_sizes_G.shape[0]
    block = block or block_rows(M, G)
    dest_M, group_N, N = block_layout(group_sizes_G, M, block)
    x_NxbxD = jnp.zeros((N * block, D), x_MxD.dtype).at[dest_M].set(x_MxD, mode="drop").reshape(N, block, D)
    gate_NxbxF = jnp.einsum("nbd,ndf->nbf", x_NxbxD, w_gate_GxDxF[group_N])
    up_NxbxF = jnp.einsum("nbd,ndf->nbf", x_NxbxD, w_up_GxDxF[group_N])
    h_NxbxF = jax.nn.silu(gate_NxbxF) * up_NxbxF
    y_NxbxD = jnp.einsum("nbf,nfd->nbd", h_NxbxF, w_down_GxFxD[group_N])
    return y_NxbxD.reshape(N * block, D).at[dest_M].get(mode="fill", fill_value=0)


# ``rounds``: capacity-shaped expert buffers, repeated until every row is done (dropless on CPU)


def round_width(num_rows: int, num_groups: int) -> int:
    """Rows per group per round of the ``rounds`` kernel: 1.25x the mean group size (capacity
    dispatch's default buffer), rounded up to a multiple of 8, so a balanced batch needs one round."""
    mean = num_rows / max(num_groups, 1)
    return max(8, -(-math.ceil(1.25 * mean) // 8) * 8)


def overflow_groups(num_groups: int) -> int:
    """Groups per overflow round of the ``rounds`` kernel: a quarter of them (at least one)."""
    return max(1, num_groups // 4)


def _round_rows(sizes_G, groups_P, offset_P, width: int, num_rows: int) -> jax.Array:
    """``[P, width]`` row indices: rows ``offset_p ...`` of group ``groups_P[p]`` (groups are
    contiguous, in order); ``num_rows`` (out of range) past the end of a group."""
    starts_G = jnp.cumsum(sizes_G) - sizes_G
    pos_PxW = offset_P[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
    return jnp.where(pos_PxW < sizes_G[groups_P][:, None], starts_G[groups_P][:, None] + pos_PxW, num_rows)


def _round_schedule(sizes_G, width: int, num_overflow: int, round_fn, carry):
    """Run ``carry = round_fn(carry, groups_P, rows_PxW)`` over every row of every group.

    Round 0 takes the first ``width`` rows of *all* groups (outside the loop, so the carry gets the
    inputs' shard_map variance before the loop needs it).  Then, while any group has rows left,
    an overflow round takes the next ``width`` rows of the ``num_overflow`` groups with the most
    rows left: a skewed batch (at initialisation the busiest expert gets 2x its share) costs a
    quarter round per extra round instead of a whole one.  The schedule depends on the sizes only,
    so the backward pass replays it exactly.
    """
    G = sizes_G.shape[0]
    all_G = jnp.arange(G, dtype=jnp.int32)
    carry = round_fn(carry, all_G, jnp.zeros((G,), jnp.int32))
    done_G = jnp.minimum(sizes_G, width)

    def more(state):
        _, done = state
        return jnp.any(done < sizes_G)

    def one_round(state):
        carry_, done = state
        _, groups_P = jax.lax.top_k(sizes_G - done, num_overflow)
        carry_ = round_fn(carry_, groups_P, done[groups_P])
        return carry_, jnp.minimum(done.at[groups_P].add(width), sizes_G)

    carry, _ = jax.lax.while_loop(more, one_round, (carry, done_G))
    return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _rounds_swiglu(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, sizes_G, width: int, num_overflow: int):
    """SwiGLU experts on rows grouped by expert, in rounds of ``[groups, width]`` row buffers.

    A round gathers up to ``width`` rows of each of its groups into a ``[P, width, D]`` buffer
    (round 0: all groups, the shape capacity dispatch computes on), runs the three batched
    matmuls and scatters the results back; overflow rounds (see :func:`_round_schedule`) repeat
    on the most-loaded groups until every row is done — a ``while_loop`` with a data-dependent
    trip count, so nothing is dropped and a balanced batch costs one round (~1.25x the useful
    FLOPs, like capacity dispatch).  Compared with ``blocks`` there are no small per-block matmuls
    and no per-block weight copies (only overflow rounds gather their groups' weights), which
    XLA:CPU runs several times faster, the backward most of all.

    ``jax.custom_vjp`` because reverse-mode autodiff cannot go through a ``while_loop``: the
    backward pass replays the same rounds (see :func:`_rounds_swiglu_bwd`).  Rows past
    ``sum(sizes)`` belong to no group and produce zeros.
    """
    return _rounds_swiglu_fwd(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, sizes_G, width, num_overflow)[0]


def _rounds_swiglu_fwd(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, sizes_G, width, num_overflow):
    M, D = x_MxD.shape
    F = w_gate_GxDxF.shape[-1]
    sizes_G = sizes_G.astype(jnp.int32)

    def one_round(carry, groups_P, offset_P):
        y_MxD, gate_MxF, up_MxF = carry
        rows_PxW = _round_rows(sizes_G, groups_P, offset_P, width, M)
        x_PxWxD = x_MxD.at[rows_PxW].get(mode="fill", fill_value=0)
        gate_PxWxF = jnp.einsum("pwd,pdf->pwf", x_PxWxD, w_gate_GxDxF[groups_P])
        up_PxWxF = jnp.einsum("pwd,pdf->pwf", x_PxWxD, w_up_GxDxF[groups_P])
        y_PxWxD = jnp.einsum("pwf,pfd->pwd", jax.nn.silu(gate_PxWxF) * up_PxWxF, w_down_GxFxD[groups_P])
        return (y_MxD.at[rows_PxW].set(y_PxWxD, mode="drop"),
                gate_MxF.at[rows_PxW].set(gate_PxWxF, mode="drop"),
                up_MxF.at[rows_PxW].set(up_PxWxF, mode="drop"))

    zeros = (jnp.zeros((M, D), x_MxD.dtype), jnp.zeros((M, F), x_MxD.dtype), jnp.zeros((M, F), x_MxD.dtype))
    y_MxD, gate_MxF, up_MxF = _round_schedule(sizes_G, width, num_overflow, one_round, zeros)
    # keep the pre-activations (as autodiff of the matmuls would) so the backward needs no recompute
    return y_MxD, (x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, sizes_G, gate_MxF, up_MxF)


def _rounds_swiglu_bwd(width, num_overflow, residuals, dy_MxD):
    """Gradients round by round: per round, the SwiGLU backward on the round's buffers; input
    gradients are scattered back to their rows, weight gradients added to the round's groups."""
    x_MxD, w_gate, w_up, w_down, sizes_G, gate_MxF, up_MxF = residuals
    M = x_MxD.shape[0]

    def one_round(carry, groups_P, offset_P):
        dx_MxD, dw_gate, dw_up, dw_down = carry
        rows_PxW = _round_rows(sizes_G, groups_P, offset_P, width, M)
        take = lambda a: a.at[rows_PxW].get(mode="fill", fill_value=0)  # noqa: E731 (empty rows -> 0)
        x_PxWxD, dy_PxWxD, gate_PxWxF, up_PxWxF = take(x_MxD), take(dy_MxD), take(gate_MxF), take(up_MxF)
        sig_PxWxF = jax.nn.sigmoid(gate_PxWxF)
        silu_PxWxF = gate_PxWxF * sig_PxWxF
        dh_PxWxF = jnp.einsum("pwd,pfd->pwf", dy_PxWxD, w_down[groups_P])
        dup_PxWxF = dh_PxWxF * silu_PxWxF
        dgate_PxWxF = dh_PxWxF * up_PxWxF * sig_PxWxF * (1 + gate_PxWxF * (1 - sig_PxWxF))
        dw_down = dw_down.at[groups_P].add(jnp.einsum("pwf,pwd->pfd", silu_PxWxF * up_PxWxF, dy_PxWxD))
        dw_gate = dw_gate.at[groups_P].add(jnp.einsum("pwd,pwf->pdf", x_PxWxD, dgate_PxWxF))
        dw_up = dw_up.at[groups_P].add(jnp.einsum("pwd,pwf->pdf", x_PxWxD, dup_PxWxF))
        dx_PxWxD = (jnp.einsum("pwf,pdf->pwd", dgate_PxWxF, w_gate[groups_P])
                    + jnp.einsum("pwf,pdf->pwd", dup_PxWxF, w_up[groups_P]))
        return dx_MxD.at[rows_PxW].set(dx_PxWxD, mode="drop"), dw_gate, dw_up, dw_down

    zeros = (jnp.zeros_like(x_MxD), jnp.zeros_like(w_gate), jnp.zeros_like(w_up), jnp.zeros_like(w_down))
    dx, dw_gate, dw_up, dw_down = _round_schedule(sizes_G, width, num_overflow, one_round, zeros)
    return dx, dw_gate, dw_up, dw_down, None


_rounds_swiglu.defvjp(_rounds_swiglu_fwd, _rounds_swiglu_bwd)


def _grouped_swiglu(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G, impl):
    impl = resolve_grouped_matmul(impl)
    if impl == "rounds":
        G = group_sizes_G.shape[0]
        return _rounds_swiglu(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G,
                              round_width(x_MxD.shape[0], G), overflow_groups(G))
    if impl == "blocks":
        return _blocks_swiglu(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G)
    h_MxF = jax.nn.silu(grouped_matmul(x_MxD, w_gate_GxDxF, group_sizes_G, impl))
    h_MxF = h_MxF * grouped_matmul(x_MxD, w_up_GxDxF, group_sizes_G, impl)
    return grouped_matmul(h_MxF, w_down_GxFxD, group_sizes_G, impl)


# --------------------------------------------------------------------------------------------
# Expert computation (runs per device inside shard_map; plain function without a mesh)


def _axis_size(axis: Any) -> int:
    return 1 if axis is None else jax.lax.axis_size(axis)


def _capacity_experts(x_BxLxD, expert_BxLxk, gate_BxLxk, slot_BxLxk, w_gate, w_up, w_down, *,
                      num_experts, capacity, ep_axis, tp_axis, gmm_impl, mesh_axes):
    """Capacity dispatch: scatter into ``[E, B, C, D]`` buffers, all-to-all, batched einsum, back."""
    del gmm_impl, mesh_axes
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


def _vary_over(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``x`` typed as varying over every shard_map axis in ``axes`` (a type cast, no communication).

    The ``rounds`` kernel is a ``jax.custom_vjp``, whose backward must return cotangents typed
    exactly like its inputs; weight gradients mix in the token-sharded activations (and input
    gradients the tensor-split weights), so all inputs are first cast to vary over every axis that
    tokens or weights are split over (what the kernel's outputs vary over anyway).
    Autodiff transposes the cast into the ``psum`` each gradient needs (weights over the batch
    axes, activations over ``tensor``).  ``pcast`` refuses an axis ``x`` already varies over.
    """
    for axis in axes:
        try:
            x = jax.lax.pcast(x, axis, to="varying")
        except ValueError:  # already varying over this axis
            pass
    return x


def _expert_swiglu(x_MxD, w_gate, w_up, w_down, sizes_G, impl: str, mesh_axes: tuple[str, ...]):
    """The grouped SwiGLU of dropless dispatch; ``mesh_axes``: axes tokens or weights are split over."""
    if resolve_grouped_matmul(impl) == "rounds" and mesh_axes:
        x_MxD, w_gate, w_up, w_down = (_vary_over(a, mesh_axes) for a in (x_MxD, w_gate, w_up, w_down))
    return _grouped_swiglu(x_MxD, w_gate, w_up, w_down, sizes_G, impl)


def _dropless_experts(x_BxLxD, expert_BxLxk, gate_BxLxk, slot_BxLxk, w_gate, w_up, w_down, *,
                      num_experts, capacity, ep_axis, tp_axis, gmm_impl, mesh_axes):
    """Dropless dispatch: sort assignments by expert, grouped matmul (see module docstring)."""
    del slot_BxLxk, capacity
    B, L, D = x_BxLxD.shape
    k = expert_BxLxk.shape[-1]
    E, M = num_experts, B * L * k
    x_TxD = x_BxLxD.reshape(B * L, D)
    expert_M = expert_BxLxk.reshape(M)
    order_M = jnp.argsort(expert_M, stable=True)
    expert_sorted_M = expert_M[order_M]
    x_sorted_MxD = x_TxD[order_M // k]
    dt = x_BxLxD.dtype
    w_gate, w_up, w_down = w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt)
    N = _axis_size(ep_axis)
    if N == 1:
        sizes_E = jnp.bincount(expert_M, length=E)
        y_sorted_MxD = _expert_swiglu(x_sorted_MxD, w_gate, w_up, w_down, sizes_E, gmm_impl, mesh_axes)
    else:
        E_loc = E // N
        per_dest_N = jnp.bincount(expert_M // E_loc, length=N)
        start_N = jnp.cumsum(per_dest_N) - per_dest_N
        i_M = jnp.arange(M)
        # send[d, i] = i-th sorted row bound for peer d (worst-case buffer of M rows per peer)
        src_NxM = jnp.clip(start_N[:, None] + i_M[None, :], 0, M - 1)
        ok_NxM = i_M[None, :] < per_dest_N[:, None]
        send_x_NxMxD = jnp.where(ok_NxM[..., None], x_sorted_MxD[src_NxM], 0)
        local_NxM = expert_sorted_M[src_NxM] - jnp.arange(N)[:, None] * E_loc
        send_e_NxM = jnp.where(ok_NxM, local_NxM, E_loc)  # E_loc marks an empty row
        recv_x_NxMxD = jax.lax.all_to_all(send_x_NxMxD, ep_axis, 0, 0, tiled=True)
        recv_e_NxM = jax.lax.all_to_all(send_e_NxM, ep_axis, 0, 0, tiled=True)
        flat_e = recv_e_NxM.reshape(N * M)
        order2 = jnp.argsort(flat_e, stable=True)
        xs = recv_x_NxMxD.reshape(N * M, D)[order2]
        sizes_Eloc = jnp.bincount(flat_e, length=E_loc + 1)[:E_loc]
        ys = _expert_swiglu(xs, w_gate, w_up, w_down, sizes_Eloc, gmm_impl, mesh_axes)
        y_flat = ys[inverse_permutation(order2)]
        back_NxMxD = jax.lax.all_to_all(y_flat.reshape(N, M, D), ep_axis, 0, 0, tiled=True)
        dest_M = expert_sorted_M // E_loc
        y_sorted_MxD = back_NxMxD[dest_M, i_M - start_N[dest_M]]
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
    static = dict(num_experts=cfg.num_experts, capacity=capacity, gmm_impl=cfg.grouped_matmul)
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
        check_vma=resolve_grouped_matmul(static.get("gmm_impl", "auto")) != "megablox",
    )
    return sharded(*args)


class MoE(nnx.Module):
    """Routed SwiGLU experts (+ optional shared experts) replacing the dense MLP of a block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F = cfg.d_model, cfg.num_experts, cfg.d_expert
        pdt = param_dtype(cfg)
        self.cfg = cfg
        self.router_DxE = make_param(rngs, (D, E), ("embed", None), pdt)
        self.w_gate_ExDxF = make_param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), pdt, fan_in=D)
        self.w_up_ExDxF = make_param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), pdt, fan_in=D)
        self.w_down_ExFxD = make_param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), pdt, fan_in=F)
        self.shared = SwiGLU(D, cfg.num_shared_experts * F, pdt, rngs=rngs) if cfg.num_shared_experts else None
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32)) if cfg.loss_free_bias else None

    def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array) -> tuple[jax.Array, Routing]:
        cfg = self.cfg
        logits_BxLxE = token_matmul(x_BxLxD.astype(jnp.float32), self.router_DxE[...].astype(jnp.float32))
        bias_E = None if self.router_bias is None else self.router_bias[...]
        capacity = capacity_per_sequence(cfg, x_BxLxD.shape[1]) if cfg.dispatch == "capacity" else None
        routing = route(logits_BxLxE, valid_BxL, cfg, bias_E, capacity)
        y_BxLxD = run_experts(x_BxLxD, routing, self.w_gate_ExDxF[...], self.w_up_ExDxF[...],
                              self.w_down_ExFxD[...], cfg, capacity)
        if self.shared is not None:
            y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
        return y_BxLxD, routing


def update_router_bias(model: nnx.Module, expert_counts: jax.Array, rate: float) -> None:
    """DeepSeek-V3 loss-free balancing: ``bias += rate * sign(mean_count - count)`` per MoE layer.

    ``expert_counts`` is ``MoEStats.expert_counts`` ``[num_moe_layers, E]`` of the last step; layers
    are matched in the model's order (a scanned model's one MoE holds a stacked ``[N, E]`` bias for
    ``N`` consecutive rows).  Under-loaded experts get a larger bias, so they are selected more
    often; the gates (and thus gradients) are unaffected.  Works eagerly or inside ``nnx.jit``.
    A no-op for models built without ``loss_free_bias``.
    """
    row = 0
    for layer in model.moe_layers():
        if layer.router_bias is None:
            continue
        bias = layer.router_bias[...]
        rows = 1 if bias.ndim == 1 else bias.shape[0]
        counts_NxE = expert_counts[row : row + rows].astype(jnp.float32)
        delta_NxE = rate * jnp.sign(jnp.mean(counts_NxE, axis=-1, keepdims=True) - counts_NxE)
        layer.router_bias[...] = bias + delta_NxE.reshape(bias.shape)
        row += rows
