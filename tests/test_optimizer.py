"""Optimizer: schedules (hand-computed values), weight-decay mask, AdamW against a NumPy reference,
and the non-finite guard."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from indicfm.train.config import OptimizerConfig
from indicfm.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask


def test_cosine_schedule_hand_values():
    cfg = OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg, total_steps=110)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    # halfway through the cosine part: 0.1 + 0.9 * 0.5 * (1 + cos(pi/2))
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(lr(110)) == pytest.approx(0.1, rel=1e-5)


def test_wsd_schedule_plateau_then_linear_decay():
    cfg = OptimizerConfig(learning_rate=2.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    lr = learning_rate_schedule(cfg, total_steps=100)
    assert float(lr(5)) == pytest.approx(1.0)
    for step in (10, 40, 80):
        assert float(lr(step)) == pytest.approx(2.0)
    assert float(lr(90)) == pytest.approx(1.0)  # halfway through the last 20 steps
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.embed_VxD = nnx.Param(jnp.ones((6, 4)))
        self.norm = nnx.RMSNorm(4, rngs=rngs)
        self.proj = nnx.Linear(4, 3, rngs=rngs)  # kernel decays, bias does not


def test_weight_decay_mask_skips_norms_biases_and_embeddings():
    params = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
    mask = nnx.to_pure_dict(weight_decay_mask(params))
    assert mask == {"embed_VxD": False, "norm": {"scale": False}, "proj": {"kernel": True, "bias": False}}
    with_embed = nnx.to_pure_dict(weight_decay_mask(params, decay_embeddings=True))
    assert with_embed["embed_VxD"] is True and with_embed["norm"]["scale"] is False


def _numpy_adamw(params, grads, lr, cfg, decay_mask, clip):
    """One AdamW step from the paper's formulas (Loshchilov & Hutter), float64."""
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    scale = min(1.0, clip / norm) if clip > 0 else 1.0
    out = {}
    for name, p in params.items():
        g = grads[name].astype(np.float64) * scale
        m = (1 - cfg.beta1) * g
        v = (1 - cfg.beta2) * g * g
        m_hat, v_hat = m / (1 - cfg.beta1), v / (1 - cfg.beta2)
        update = m_hat / (np.sqrt(v_hat) + cfg.eps)
        if decay_mask[name]:
            update = update + cfg.weight_decay * p
        out[name] = p - lr * update
    return out


def test_adamw_step_matches_numpy_reference():
    cfg = OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip_norm=1.0)
    rng = np.random.default_rng(0)
    params = {"w_kernel": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    grads = {"w_kernel": rng.normal(size=(3, 4)).astype(np.float32) * 3, "b": rng.normal(size=(4,)).astype(np.float32)}
    tx = make_optimizer(cfg, total_steps=10, max_consecutive_nonfinite=3)
    jparams = jax.tree.map(jnp.asarray, params)
    state = tx.init(jparams)
    updates, _ = tx.update(jax.tree.map(jnp.asarray, grads), state, jparams)
    new = jax.tree.map(lambda p, u: np.asarray(p + u), jparams, updates)
    lr = float(learning_rate_schedule(cfg, 10)(0))
    expected = _numpy_adamw(params, grads, lr, cfg, {"w_kernel": True, "b": False}, clip=1.0)
    for name in params:
        np.testing.assert_allclose(new[name], expected[name], rtol=2e-5, atol=1e-6)


def test_nonfinite_gradients_skip_update_and_count():
    cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0)
    tx = make_optimizer(cfg, total_steps=10, max_consecutive_nonfinite=3)
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    bad = {"w": jnp.array([[1.0, jnp.nan], [0.0, 1.0]])}
    updates, state = tx.update(bad, state, params)
    assert np.all(np.asarray(updates["w"]) == 0)
    assert [int(state.notfinite_count), int(state.total_notfinite)] == [1, 1]
    good = {"w": jnp.ones((2, 2))}
    updates, state = tx.update(good, state, params)
    assert np.any(np.asarray(updates["w"]) != 0)
    assert [int(state.notfinite_count), int(state.total_notfinite)] == [0, 1]  # the run of bad steps is broken, total kept
