"""MoE layer vs a NumPy loop reference, drops at small capacity, aux/z-loss by hand, loss-free bias."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from indicfm.model.config import ModelConfig
from indicfm.model.moe import MoE, RouterBias, grouped_matmul, route, update_router_bias

D, E = 32, 8


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=D, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                num_experts=E, top_k=2, d_expert=16, first_dense_layers=1, compute_dtype="float32")
    base.update(kw)
    return ModelConfig(**base)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def numpy_moe(x_BxLxD, valid_BxL, moe: MoE, cfg: ModelConfig, capacity: int | None):
    """Loop over sequences, choice ranks and tokens, as the docstring of moe.py defines the priority.

    Returns (output, dropped set of (b, l, j)).
    """
    x = np.asarray(x_BxLxD, np.float64)
    w_r = np.asarray(moe.router_DxE[...], np.float64)
    wg, wu, wd = (np.asarray(w[...], np.float64) for w in (moe.w_gate_ExDxF, moe.w_up_ExDxF, moe.w_down_ExFxD))
    B, L, _ = x.shape
    out = np.zeros_like(x)
    dropped = set()
    for b in range(B):
        logits = x[b] @ w_r
        if cfg.router == "softmax":
            scores = np.exp(logits - logits.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
        else:
            scores = 1.0 / (1.0 + np.exp(-logits))
        choice = np.argsort(-scores, axis=-1, kind="stable")[:, : cfg.top_k]
        gates = np.take_along_axis(scores, choice, -1)
        if cfg.router == "sigmoid":
            gates /= gates.sum(-1, keepdims=True)
        fill = np.zeros(cfg.num_experts, int)
        for j in range(cfg.top_k):
            for t in range(L):
                if not valid_BxL[b, t]:
                    continue
                e = choice[t, j]
                if capacity is not None and fill[e] >= capacity:
                    dropped.add((b, t, j))
                    continue
                fill[e] += 1
                h = _silu(x[b, t] @ wg[e]) * (x[b, t] @ wu[e])
                out[b, t] += gates[t, j] * (h @ wd[e])
    return out, dropped


def _inputs(B=2, L=16, seed=0):
    x = jax.random.normal(jax.random.key(seed), (B, L, D), jnp.float32)
    valid = np.ones((B, L), bool)
    valid[1, -3:] = False  # some padding: never routed, never counted
    return x, jnp.asarray(valid)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_moe_matches_numpy_loop_without_drops(dispatch, router):
    cfg = tiny_cfg(dispatch=dispatch, router=router, capacity_factor=float(E))  # C = L*k: never full
    moe = MoE(cfg, rngs=nnx.Rngs(1))
    x, valid = _inputs()
    y, routing = moe(x, valid)
    ref, dropped = numpy_moe(np.asarray(x), np.asarray(valid), moe, cfg, None)
    assert not dropped
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)
    assert float(routing.dropped_fraction) == 0.0
    assert float(routing.counts_E.sum()) == valid.sum() * cfg.top_k


def test_capacity_drops_exactly_the_predicted_tokens():
    cfg = tiny_cfg(dispatch="capacity", capacity_factor=0.5)
    L = 16
    capacity = math.ceil(0.5 * L * cfg.top_k / E)  # = 2 slots per expert per sequence
    moe = MoE(cfg, rngs=nnx.Rngs(2))
    x, valid = _inputs(L=L, seed=3)
    y, routing = moe(x, valid)
    ref, dropped = numpy_moe(np.asarray(x), np.asarray(valid), moe, cfg, capacity)
    assert dropped, "the test needs a capacity small enough to drop something"
    got = {tuple(int(i) for i in idx) for idx in np.argwhere(np.asarray(routing.slot_BxLxk) == capacity)}
    padding = {(b, t, j) for b, t in np.argwhere(~np.asarray(valid)) for j in range(cfg.top_k)}
    assert got - padding == dropped
    n_assign = int(np.asarray(valid).sum()) * cfg.top_k
    assert float(routing.dropped_fraction) == pytest.approx(len(dropped) / n_assign)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)


def test_shared_experts_add_a_dense_swiglu():
    cfg = tiny_cfg(num_shared_experts=2, dispatch="dropless")
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x, valid = _inputs()
    y, _ = moe(x, valid)
    routed, _ = numpy_moe(np.asarray(x), np.asarray(valid), moe, cfg, None)
    xs = np.asarray(x, np.float64)
    sh = moe.shared
    h = _silu(xs @ np.asarray(sh.w_gate_DxF[...])) * (xs @ np.asarray(sh.w_up_DxF[...]))
    np.testing.assert_allclose(np.asarray(y), routed + h @ np.asarray(sh.w_down_FxD[...]), rtol=1e-4, atol=1e-5)


def test_aux_and_z_loss_match_hand_values():
    # 4 tokens, 4 experts, top-1.  Rows of probabilities chosen by hand; logits = log(p) + c_t so the
    # softmax is exactly p and logsumexp(logits) = c_t.
    p = np.array([[0.7, 0.1, 0.1, 0.1],
                  [0.6, 0.2, 0.1, 0.1],
                  [0.1, 0.5, 0.2, 0.2],
                  [0.1, 0.1, 0.1, 0.7]], np.float32)
    c = np.array([1.0, 2.0, 0.0, -1.0], np.float32)
    logits = jnp.asarray(np.log(p) + c[:, None])[None]  # [1, 4, 4]
    cfg = tiny_cfg(num_experts=4, top_k=1)
    r = route(logits, jnp.ones((1, 4), bool), cfg)
    # argmax experts: 0, 0, 1, 3 -> f = [2, 1, 0, 1] / 4 ; P = column means of p
    # P = [1.5, 0.9, 0.5, 1.1] / 4 ; lb = 4 * sum(f * P) = 4 * (3.0 + 0.9 + 0 + 1.1) / 16 = 1.25
    assert float(r.load_balance_loss) == pytest.approx(1.25, rel=1e-5)
    # z = mean(c^2) = (1 + 4 + 0 + 1) / 4 = 1.5
    assert float(r.z_loss) == pytest.approx(1.5, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(r.counts_E), [2, 1, 0, 1])
    np.testing.assert_allclose(np.asarray(r.gate_BxLxk)[0, :, 0], [0.7, 0.6, 0.5, 0.7], rtol=1e-5)


def test_sigmoid_gates_are_normalised_over_the_chosen_k():
    logits = jnp.asarray([[[0.0, 1.0, 2.0, -1.0]]])
    r = route(logits, jnp.ones((1, 1), bool), tiny_cfg(num_experts=4, top_k=2, router="sigmoid"))
    s = 1 / (1 + np.exp(-np.array([2.0, 1.0])))
    np.testing.assert_allclose(np.asarray(r.gate_BxLxk)[0, 0], s / s.sum(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.expert_BxLxk)[0, 0], [2, 1])


def test_router_bias_is_not_a_param_and_moves_load_towards_balance():
    cfg = tiny_cfg(router="sigmoid", loss_free_bias=True, top_k=1)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    assert isinstance(moe.router_bias, RouterBias)
    assert not any(isinstance(v, RouterBias) for v in jax.tree.leaves(nnx.state(moe, nnx.Param),
                                                                      is_leaf=lambda v: isinstance(v, nnx.Variable)))
    # Skew the routing: inputs with a positive mean and a router column that sums them.
    moe.router_DxE[...] = moe.router_DxE[...].at[:, 0].add(0.05)
    x = jax.random.normal(jax.random.key(0), (4, 32, D)) + 0.5
    valid = jnp.ones((4, 32), bool)

    class Holder(nnx.Module):  # update_router_bias walks a model's moe_layers()
        def __init__(self, layer):
            self.layer = layer

        def moe_layers(self):
            return [self.layer]

    holder = Holder(moe)

    def imbalance():
        counts = moe(x, valid)[1].counts_E
        return float(jnp.max(counts) - jnp.min(counts)), counts

    before, counts = imbalance()
    jitted_update = nnx.jit(update_router_bias, static_argnums=2)
    for step in range(20):
        update = jitted_update if step % 2 else update_router_bias  # eager and under nnx.jit
        update(holder, counts[None], 0.01)
        _, counts = imbalance()
    after, _ = imbalance()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("impl", ["ragged_dot", "dense", "megablox"])
def test_grouped_matmul_backends_match_a_loop(impl):
    rng = np.random.default_rng(0)
    sizes = np.array([3, 0, 5, 2])
    x = rng.normal(size=(12, 6)).astype(np.float32)  # 2 trailing rows belong to no group
    w = rng.normal(size=(4, 6, 5)).astype(np.float32)
    ref = np.zeros((12, 5), np.float32)
    start = 0
    for g, n in enumerate(sizes):
        ref[start:start + n] = x[start:start + n] @ w[g]
        start += n
    got = grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), impl)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
