"""TPU splash attention (run here in Pallas's interpreter): equal to plain attention, alone and
sharded over a mesh, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from indicfm.config import MeshConfig
from indicfm.inference.decode import inference_config
from indicfm.model.attention import Attention, backend_for, reference_attention, resolve_impl, segment_mask
from indicfm.model.config import ModelConfig
from indicfm.model.splash import block_size, splash_attention
from indicfm.sharding import make_mesh, named_sharding

L = 256  # two 128-blocks: causal block skipping and a segment crossing a block edge both occur


def _inputs(batch=2, heads=4, kv_heads=2, head_dim=32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, L, heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, L, kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, L, kv_heads, head_dim)).astype(np.float32)
    seg = np.ones((batch, L), np.int32)
    seg[0, 100:] = 2  # a document boundary inside the first block
    seg[0, 200:] = 0  # padding at the end
    seg[1 % batch, 140:] = 7
    return q, k, v, seg


def _reference(q, k, v, seg):
    seg = jnp.asarray(seg)
    return reference_attention(q, k, v, segment_mask(seg, seg))


def test_splash_equals_reference_attention_values_and_gradients():
    q, k, v, seg = _inputs()
    np.testing.assert_allclose(np.asarray(jax.jit(splash_attention)(q, k, v, seg)),
                               np.asarray(_reference(q, k, v, seg)), atol=2e-5)
    weights = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg) * weights)

    got = jax.jit(jax.grad(loss(splash_attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for g, w, name in zip(got, want, "qkv"):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("mesh_shape", [dict(data=4, tensor=2), dict(data=2, tensor=4)])
def test_splash_under_a_mesh_equals_unsharded_reference(mesh_shape):
    """data × tensor over 8 devices; with tensor=4 the 2 kv heads can't be split like the 4 query
    heads, and every device keeps all heads (the fallback path)."""
    mesh = make_mesh(MeshConfig(**mesh_shape))
    q, k, v, seg = _inputs(batch=4)
    with jax.set_mesh(mesh):  # placed as the model's activations are
        placed = [jax.device_put(x, named_sharding(("batch", None, heads, None), x.shape, mesh))
                  for x, heads in ((q, "act_heads"), (k, "act_kv_heads"), (v, "act_kv_heads"))]
        seg_placed = jax.device_put(seg, NamedSharding(mesh, PartitionSpec("data", None)))
        assert placed[0].sharding.spec[2] == "tensor"
        got = jax.jit(splash_attention)(*placed, seg_placed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(q, k, v, seg)), atol=2e-5)


def test_attention_module_with_splash_equals_reference_backend():
    cfg = ModelConfig(vocab_size=64, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                      d_ff=64, compute_dtype="float32", attention_impl="splash")
    splash = Attention(cfg, rngs=nnx.Rngs(0))
    reference = Attention(cfg.model_copy(update={"attention_impl": "reference"}), rngs=nnx.Rngs(0))
    _, _, _, seg = _inputs()
    pos = np.zeros_like(seg)
    for i in range(1, L):
        pos[:, i] = np.where(seg[:, i] == seg[:, i - 1], pos[:, i - 1] + 1, 0)
    x = jax.random.normal(jax.random.key(2), (2, L, 64))
    np.testing.assert_allclose(np.asarray(splash(x, jnp.asarray(seg), jnp.asarray(pos))),
                               np.asarray(reference(x, jnp.asarray(seg), jnp.asarray(pos))), atol=2e-5)


def test_block_size_divides_the_sequence():
    assert block_size(2048) == 512
    assert block_size(384) == 384
    assert block_size(640) == 128
    with pytest.raises(ValueError, match="multiple of 128"):
        block_size(100)


def test_tpu_chooses_splash_and_serving_switches_to_xla(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_impl("auto") == "splash"
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64)
    assert inference_config(cfg).attention_impl == "xla"  # a KV cache needs the masked XLA kernel
    # 'auto' on TPU falls back to XLA where splash can't run; an explicit 'splash' says why
    assert backend_for("auto", 256, 256) == "splash" and backend_for("auto", 100, 100) == "xla"
    assert backend_for("auto", 1, 256) == "xla" and backend_for("splash", 100, 100) == "splash"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert resolve_impl("auto") == "xla"


def test_a_kernel_first_built_under_a_mesh_also_serves_calls_without_one():
    """The kernel is cached per shape: one first built inside shard_map (or a jit trace) must not
    carry that context into a later eager call."""
    from indicfm.model import splash as splash_module

    splash_module._kernel.cache_clear()
    q, k, v, seg = _inputs(batch=4)
    with jax.set_mesh(make_mesh(MeshConfig(data=4, tensor=2))):
        jax.jit(splash_attention)(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(splash_attention(q, k, v, seg)), np.asarray(_reference(q, k, v, seg)),
                               atol=2e-5)
