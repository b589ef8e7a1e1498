"""Grouped SwiGLU kernels of dropless MoE dispatch: rows grouped by expert, one weight set per group.

Backends (``ModelConfig.grouped_matmul``): ``megablox`` (the TPU Pallas kernel), ``ragged_dot``
(XLA's op), ``tokamax`` (GPU, when
installed), ``blocks`` (each group padded to whole blocks, one batched matmul), ``rounds``
(capacity-shaped ``[groups, width]`` buffers repeated until every row is done, with a hand-written
backward: the CPU default) and ``dense`` (a masked product per group, for reference).  Every
kernel takes rows sorted into contiguous groups, ``sizes_G`` rows each, and returns zeros for the
rows past ``sum(sizes_G)``.

Shape legend: M rows, D model width, F expert hidden, G groups (experts), N blocks, P groups in a
round, W rows per group per round.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from indicfm.model.platform import target_platform


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
    if impl == "rounds":  # a whole-SwiGLU kernel (rounds_swiglu); one product alone uses blocks
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


def blocks_swiglu(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G, block: int | None = None):
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


def round_rows(sizes_G, groups_P, offset_P, width: int, num_rows: int) -> jax.Array:
    """``[P, width]`` row indices: rows ``offset_p ...`` of group ``groups_P[p]`` (groups are
    contiguous, in order); ``num_rows`` (out of range) past the end of a group."""
    starts_G = jnp.cumsum(sizes_G) - sizes_G
    pos_PxW = offset_P[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
    return jnp.where(pos_PxW < sizes_G[groups_P][:, None], starts_G[groups_P][:, None] + pos_PxW, num_rows)


def round_schedule(sizes_G, width: int, num_overflow: int, round_fn, carry):
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
def rounds_swiglu(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, sizes_G, width: int, num_overflow: int):
    """SwiGLU experts on rows grouped by expert, in rounds of ``[groups, width]`` row buffers.

    A round gathers up to ``width`` rows of each of its groups into a ``[P, width, D]`` buffer
    (round 0: all groups, the shape capacity dispatch computes on), runs the three batched
    matmuls and scatters the results back; overflow rounds (see :func:`round_schedule`) repeat
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
        rows_PxW = round_rows(sizes_G, groups_P, offset_P, width, M)
        x_PxWxD = x_MxD.at[rows_PxW].get(mode="fill", fill_value=0)
        gate_PxWxF = jnp.einsum("pwd,pdf->pwf", x_PxWxD, w_gate_GxDxF[groups_P])
        up_PxWxF = jnp.einsum("pwd,pdf->pwf", x_PxWxD, w_up_GxDxF[groups_P])
        y_PxWxD = jnp.einsum("pwf,pfd->pwd", jax.nn.silu(gate_PxWxF) * up_PxWxF, w_down_GxFxD[groups_P])
        return (y_MxD.at[rows_PxW].set(y_PxWxD, mode="drop"),
                gate_MxF.at[rows_PxW].set(gate_PxWxF, mode="drop"),
                up_MxF.at[rows_PxW].set(up_PxWxF, mode="drop"))

    zeros = (jnp.zeros((M, D), x_MxD.dtype), jnp.zeros((M, F), x_MxD.dtype), jnp.zeros((M, F), x_MxD.dtype))
    y_MxD, gate_MxF, up_MxF = round_schedule(sizes_G, width, num_overflow, one_round, zeros)
    # keep the pre-activations (as autodiff of the matmuls would) so the backward needs no recompute
    return y_MxD, (x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, sizes_G, gate_MxF, up_MxF)


def _rounds_swiglu_bwd(width, num_overflow, residuals, dy_MxD):
    """Gradients round by round: per round, the SwiGLU backward on the round's buffers; input
    gradients are scattered back to their rows, weight gradients added to the round's groups."""
    x_MxD, w_gate, w_up, w_down, sizes_G, gate_MxF, up_MxF = residuals
    M = x_MxD.shape[0]

    def one_round(carry, groups_P, offset_P):
        dx_MxD, dw_gate, dw_up, dw_down = carry
        rows_PxW = round_rows(sizes_G, groups_P, offset_P, width, M)
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
    dx, dw_gate, dw_up, dw_down = round_schedule(sizes_G, width, num_overflow, one_round, zeros)
    return dx, dw_gate, dw_up, dw_down, None


rounds_swiglu.defvjp(_rounds_swiglu_fwd, _rounds_swiglu_bwd)


def grouped_swiglu(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G, impl):
    impl = resolve_grouped_matmul(impl)
    if impl == "rounds":
        G = group_sizes_G.shape[0]
        return rounds_swiglu(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G,
                              round_width(x_MxD.shape[0], G), overflow_groups(G))
    if impl == "blocks":
        return blocks_swiglu(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G)
    h_MxF = jax.nn.silu(grouped_matmul(x_MxD, w_gate_GxDxF, group_sizes_G, impl))
    h_MxF = h_MxF * grouped_matmul(x_MxD, w_up_GxDxF, group_sizes_G, impl)
    return grouped_matmul(h_MxF, w_down_GxFxD, group_sizes_G, impl)

