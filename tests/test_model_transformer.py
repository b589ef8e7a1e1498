"""Transformer end to end on one device: outputs, packing independence, remat, dtypes, router bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from indicfm.model.config import ModelConfig
from indicfm.model.moe import RouterBias, update_router_bias
from indicfm.model.transformer import Transformer


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                num_experts=8, top_k=2, d_expert=16, first_dense_layers=1, compute_dtype="float32",
                dispatch="dropless")
    base.update(kw)
    return ModelConfig(**base)


@nnx.jit
def forward(model, tokens, seg, pos):
    """Jitted forward: eager op-by-op execution on 8 fake devices is much slower to run."""
    return model(tokens, seg, pos)


def inputs(B=2, L=16):
    tokens = jax.random.randint(jax.random.key(0), (B, L), 0, 64, jnp.int32)
    return tokens, jnp.ones((B, L), jnp.int32), jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))


def test_outputs_and_stats_shapes():
    cfg = tiny_cfg()
    logits, stats = forward(Transformer(cfg, rngs=nnx.Rngs(0)), *inputs())
    assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
    assert stats.expert_counts.shape == (2, 8)  # 2 MoE layers
    np.testing.assert_allclose(np.asarray(stats.expert_counts).sum(1), [2 * 16 * 2] * 2)
    expected_aux = cfg.aux_loss_weight * 2 * stats.load_balance_loss + cfg.z_loss_weight * 2 * stats.z_loss
    assert float(stats.aux_loss) == pytest.approx(float(expected_aux), rel=1e-5)  # sum of 2 layers, means logged
    assert float(stats.dropped_fraction) == 0.0


def test_dense_only_model_has_empty_stats():
    cfg = tiny_cfg(first_dense_layers=3)
    logits, stats = forward(Transformer(cfg, rngs=nnx.Rngs(0)), *inputs())
    assert stats.expert_counts.shape == (0, 8) and float(stats.aux_loss) == 0.0
    assert np.isfinite(np.asarray(logits)).all()


def test_packed_document_equals_document_alone():
    """Segment ids + restarting positions make a packed document independent of its neighbours."""
    model = Transformer(tiny_cfg(), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 64, jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 4], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(7)) + [0] * 4], jnp.int32)
    packed, _ = forward(model, tokens, seg, pos)
    alone, _ = forward(model, tokens[:, 5:12], jnp.ones((1, 7), jnp.int32), jnp.arange(7, dtype=jnp.int32)[None])
    np.testing.assert_allclose(np.asarray(packed[0, 5:12]), np.asarray(alone[0]), rtol=1e-4, atol=1e-5)


def _loss_and_grads(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))

    def loss_fn(m):
        logits, stats = m(*inputs())
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + stats.aux_loss

    return nnx.jit(nnx.value_and_grad(loss_fn))(model)


@pytest.mark.parametrize("remat", ["attention", "full"])
def test_remat_does_not_change_gradients(remat):
    loss, grads = _loss_and_grads(tiny_cfg(num_layers=2))
    loss_r, grads_r = _loss_and_grads(tiny_cfg(num_layers=2, remat=remat))
    assert float(loss_r) == pytest.approx(float(loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", ["attention", "full"])
def test_remat_with_router_bias_under_split_grad(remat):
    """The trainer's pattern: grad w.r.t. the Params only, the router bias passed as other state.

    ``nnx.remat`` used to fail here (it wrote the bias back from an inner trace level).
    """

    def grads_for(cfg):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params, rest):
            logits, stats = nnx.merge(graphdef, params, rest)(*inputs())
            return jnp.mean(jax.nn.logsumexp(logits, -1)) + stats.aux_loss

        return jax.jit(jax.grad(loss_fn))(params, rest)

    base = dict(num_layers=2, loss_free_bias=True, router="sigmoid")
    reference = grads_for(tiny_cfg(**base))
    rematerialized = grads_for(tiny_cfg(remat=remat, **base))
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(rematerialized)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_stays_close_to_float32():
    # dense blocks only: with experts, a bf16 rounding can flip a token's top-k choice
    f32, _ = forward(Transformer(tiny_cfg(first_dense_layers=3), rngs=nnx.Rngs(0)), *inputs())
    bf16, _ = forward(Transformer(tiny_cfg(first_dense_layers=3, compute_dtype="bfloat16"), rngs=nnx.Rngs(0)),
                      *inputs())
    assert bf16.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(f32)))
    assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.05 * scale


def test_trainable_params_exclude_router_bias_and_bias_updates_in_model():
    cfg = tiny_cfg(loss_free_bias=True, router="sigmoid")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
    params = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=is_var)
    biases = jax.tree.leaves(nnx.state(model, RouterBias), is_leaf=is_var)
    assert len(biases) == 2 and not any(isinstance(p, RouterBias) for p in params)
    _, stats = forward(model, *inputs())
    update_router_bias(model, stats.expert_counts, cfg.bias_update_rate)
    counts = np.asarray(stats.expert_counts)
    for layer, row in zip(model.moe_layers(), counts):
        expected = cfg.bias_update_rate * np.sign(row.mean() - row)
        np.testing.assert_allclose(np.asarray(layer.router_bias[...]), expected, rtol=1e-6)
