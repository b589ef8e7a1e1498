"""The ``blocks`` and ``rounds`` grouped SwiGLU kernels of dropless MoE dispatch against
hand-computed layouts, a NumPy per-group loop, and ``ragged_dot``'s gradients (on CPU an
independent dense masked lowering)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from indicfm.model.dispatch import inverse_permutation
from indicfm.model.grouped_matmul import (
    block_layout,
    block_rows,
    blocks_swiglu,
    grouped_matmul,
    overflow_groups,
    resolve_grouped_matmul,
    round_width,
    rounds_swiglu,
)


def test_block_layout_by_hand():
    # groups of 3, 0 and 5 rows, 2 trailing rows outside every group, blocks of 4 rows:
    # group 0 -> padded rows 0..3 (block 0), group 2 -> padded rows 4..11 (blocks 1, 2).
    dest, group_of_block, n_blocks = block_layout(jnp.array([3, 0, 5]), num_rows=10, block=4)
    assert n_blocks == 3 + 3  # ceil(10 / 4) + one spare block per group
    assert dest.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 24, 24]  # 24 = n_blocks * block: dropped
    assert group_of_block.tolist()[:3] == [0, 2, 2]


@pytest.mark.parametrize(("rows", "groups", "expected"), [(16384, 64, 64), (4096, 64, 16), (10, 64, 8), (10**7, 8, 512)])
def test_block_rows_quarter_of_mean_group_within_bounds(rows, groups, expected):
    assert block_rows(rows, groups) == expected


def _numpy_grouped(x, w, sizes):
    out = np.zeros((x.shape[0], w.shape[-1]))
    start = 0
    for g, size in enumerate(sizes):
        out[start:start + size] = x[start:start + size] @ w[g]
        start += size
    return out  # rows past sum(sizes) stay zero


def _random_problem(seed, sizes, extra_rows, D=12, F=10):
    rng = np.random.default_rng(seed)
    M = int(sum(sizes)) + extra_rows
    x = rng.standard_normal((M, D)).astype(np.float32)
    w = rng.standard_normal((len(sizes), D, F)).astype(np.float32)
    return x, w, np.asarray(sizes, np.int32)


@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_grouped_matmul_matches_numpy_loop(seed):
    sizes = [5, 0, 17, 1, 0, 9]  # empty groups, a group of one, sizes not multiples of any block
    x, w, sizes_G = _random_problem(seed, sizes, extra_rows=3)
    out = grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes_G), "blocks")
    ref = _numpy_grouped(x.astype(np.float64), w.astype(np.float64), sizes)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


def testblocks_swiglu_matches_numpy_and_ragged_dot_gradients():
    sizes = [7, 3, 0, 12, 2]
    x, w_gate, sizes_G = _random_problem(2, sizes, extra_rows=4, D=8, F=6)
    rng = np.random.default_rng(3)
    w_up = rng.standard_normal(w_gate.shape).astype(np.float32)
    w_down = rng.standard_normal((len(sizes), 6, 8)).astype(np.float32)

    # forward against NumPy, per group
    silu = lambda a: a / (1.0 + np.exp(-a))  # noqa: E731
    x64 = x.astype(np.float64)
    h = silu(_numpy_grouped(x64, w_gate.astype(np.float64), sizes)) * _numpy_grouped(x64, w_up.astype(np.float64), sizes)
    ref = _numpy_grouped(h, w_down.astype(np.float64), sizes)
    args = tuple(jnp.asarray(a) for a in (x, w_gate, w_up, w_down))
    out = blocks_swiglu(*args, jnp.asarray(sizes_G), block=4)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)

    # gradients against ragged_dot (XLA:CPU lowers it to a masked dense product: independent code)
    sizes_j = jnp.asarray(sizes_G)
    in_group = (jnp.arange(x.shape[0]) < sizes_G.sum())[:, None]

    def loss_ragged(x_, wg, wu, wd):
        h_ = jax.nn.silu(jax.lax.ragged_dot(x_, wg, sizes_j)) * jax.lax.ragged_dot(x_, wu, sizes_j)
        return jnp.sum(jnp.sin(jnp.where(in_group, jax.lax.ragged_dot(h_, wd, sizes_j), 0)))

    def loss_blocks(x_, wg, wu, wd):
        return jnp.sum(jnp.sin(blocks_swiglu(x_, wg, wu, wd, sizes_j, block=4)))

    grads_blocks = jax.grad(loss_blocks, argnums=(0, 1, 2, 3))(*args)
    grads_ragged = jax.grad(loss_ragged, argnums=(0, 1, 2, 3))(*args)
    for got, want in zip(grads_blocks, grads_ragged):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_auto_never_picks_ragged_dot_off_tpu():
    assert resolve_grouped_matmul("auto", "cpu") == "rounds"
    assert resolve_grouped_matmul("auto", "tpu") == "megablox"  # the Pallas kernel, through Mosaic
    assert resolve_grouped_matmul("auto", "gpu") in ("blocks", "tokamax")
    assert resolve_grouped_matmul("ragged_dot", "cpu") == "ragged_dot"  # an explicit choice is kept


def _swiglu_problem(seed, sizes, extra_rows, D=8, F=6):
    """Weights scaled by 1/sqrt(fan-in) as the model initialises them: outputs of order one, so a
    float32 kernel and a float32 reference agree to ~1e-6 whatever order they sum in."""
    x, w_gate, sizes_G = _random_problem(seed, sizes, extra_rows, D=D, F=F)
    rng = np.random.default_rng(seed + 100)
    w_gate = w_gate / np.sqrt(D)
    w_up = (rng.standard_normal(w_gate.shape) / np.sqrt(D)).astype(np.float32)
    w_down = (rng.standard_normal((len(sizes), F, D)) / np.sqrt(F)).astype(np.float32)
    return x, w_gate, w_up, w_down, sizes_G


def _numpy_swiglu(x, w_gate, w_up, w_down, sizes):
    silu = lambda a: a / (1.0 + np.exp(-a))  # noqa: E731
    x64 = x.astype(np.float64)
    h = silu(_numpy_grouped(x64, w_gate.astype(np.float64), sizes)) * _numpy_grouped(x64, w_up.astype(np.float64), sizes)
    return _numpy_grouped(h, w_down.astype(np.float64), sizes)


# width 2: round 0 + overflow rounds (1 or 2 groups each, busiest first); 5: fewer; 16: round 0 only
@pytest.mark.parametrize(("width", "num_overflow"), [(2, 1), (2, 2), (5, 1), (5, 5), (16, 1)])
def testrounds_swiglu_matches_numpy_and_ragged_dot_gradients(width, num_overflow):
    sizes = [7, 3, 0, 12, 2]  # an empty group, groups larger and smaller than a round
    x, w_gate, w_up, w_down, sizes_G = _swiglu_problem(4, sizes, extra_rows=4)
    args = tuple(jnp.asarray(a) for a in (x, w_gate, w_up, w_down))
    sizes_j = jnp.asarray(sizes_G)

    out = jax.jit(rounds_swiglu, static_argnums=(5, 6))(*args, sizes_j, width, num_overflow)
    np.testing.assert_allclose(np.asarray(out), _numpy_swiglu(x, w_gate, w_up, w_down, sizes), rtol=1e-4, atol=1e-4)
    assert not np.asarray(out)[sum(sizes):].any()  # rows outside every group stay zero

    # gradients (the hand-written backward of the custom_vjp) against autodiff of ragged_dot
    in_group = (jnp.arange(x.shape[0]) < sizes_G.sum())[:, None]
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape).astype(np.float32))

    def loss_ragged(x_, wg, wu, wd):
        h_ = jax.nn.silu(jax.lax.ragged_dot(x_, wg, sizes_j)) * jax.lax.ragged_dot(x_, wu, sizes_j)
        return jnp.sum(jnp.sin(jnp.where(in_group, jax.lax.ragged_dot(h_, wd, sizes_j), 0)) * cotangent)

    def loss_rounds(x_, wg, wu, wd):
        return jnp.sum(jnp.sin(rounds_swiglu(x_, wg, wu, wd, sizes_j, width, num_overflow)) * cotangent)

    grads_rounds = jax.jit(jax.grad(loss_rounds, argnums=(0, 1, 2, 3)))(*args)
    grads_ragged = jax.grad(loss_ragged, argnums=(0, 1, 2, 3))(*args)
    for got, want in zip(grads_rounds, grads_ragged):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def testrounds_swiglu_with_all_groups_empty_is_zero_with_zero_gradients():
    x, w_gate, w_up, w_down, _ = _swiglu_problem(6, [0, 0, 0], extra_rows=5)
    args = tuple(jnp.asarray(a) for a in (x, w_gate, w_up, w_down))
    sizes = jnp.zeros((3,), jnp.int32)
    assert not np.asarray(rounds_swiglu(*args, sizes, 4, 1)).any()
    grads = jax.grad(lambda *a: jnp.sum(rounds_swiglu(*a, sizes, 4, 1)), argnums=(0, 1, 2, 3))(*args)
    assert all(not np.asarray(g).any() for g in grads)


def test_overflow_rounds_take_a_quarter_of_the_groups():
    assert overflow_groups(64) == 16 and overflow_groups(3) == 1


def test_round_width_is_capacity_sized():
    assert round_width(8192, 64) == 160  # 1.25 x 128 rows per expert: one round when balanced
    assert round_width(10, 64) == 8  # never below 8
    assert round_width(1000, 7) % 8 == 0 and round_width(1000, 7) >= 1.25 * 1000 / 7


def test_inverse_permutation_undoes_a_gather():
    order = np.random.default_rng(0).permutation(50)
    x = np.arange(50) * 10
    np.testing.assert_array_equal(np.asarray(jnp.asarray(x[order])[inverse_permutation(jnp.asarray(order))]), x)
