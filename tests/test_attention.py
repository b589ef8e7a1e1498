"""Segment-aware causal attention equals attention computed document by document."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from indicfm.model.attention import Attention, dot_product_attention, segment_mask
from indicfm.model.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  d_ff=64, compute_dtype="float32")


def numpy_causal_attention(q, k, v):
    """Single-document causal GQA attention in float64 NumPy."""
    L, H, G = q.shape
    K = k.shape[1]
    out = np.zeros((L, H, G))
    for h in range(H):
        kh = h // (H // K)
        s = q[:, h] @ k[:, kh].T / np.sqrt(G)
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kh]
    return out


def packed_batch():
    """Two rows: three documents + padding, and one document filling the row (L = 12)."""
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0],
                    [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]], np.int32)
    pos = np.zeros_like(seg)
    for b in range(2):
        for i in range(1, 12):
            pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
    return seg, pos


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_segment_attention_equals_per_document(impl):
    rng = np.random.default_rng(0)
    seg, _ = packed_batch()
    q = rng.normal(size=(2, 12, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 12, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 12, 2, 8)).astype(np.float32)
    out = np.asarray(dot_product_attention(q, k, v, segment_mask(jnp.asarray(seg), jnp.asarray(seg)), impl))
    for b in range(2):
        for doc in set(seg[b]) - {0}:
            idx = np.flatnonzero(seg[b] == doc)
            ref = numpy_causal_attention(q[b, idx], k[b, idx], v[b, idx])
            np.testing.assert_allclose(out[b, idx], ref, rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()  # padding rows attend to padding only: no NaNs


def test_attention_module_is_independent_of_packing():
    """A document gives the same output packed after another one as alone at the start of a row."""
    attn = Attention(CFG, rngs=nnx.Rngs(0))
    seg, pos = packed_batch()
    x = jax.random.normal(jax.random.key(1), (2, 12, 32))
    packed = attn(x, jnp.asarray(seg), jnp.asarray(pos))
    doc2 = slice(3, 7)  # second document of row 0
    alone = attn(x[:1, doc2], jnp.ones((1, 4), jnp.int32), jnp.arange(4)[None])
    np.testing.assert_allclose(np.asarray(packed[0, doc2]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_reference():
    rng = np.random.default_rng(0)
    seg = np.repeat(np.array([[1] * 64 + [2] * 64]), 2, axis=0).astype(np.int32)
    q = rng.normal(size=(2, 128, 4, 64)).astype(np.float32)
    k = rng.normal(size=(2, 128, 2, 64)).astype(np.float32)
    v = rng.normal(size=(2, 128, 2, 64)).astype(np.float32)
    mask = segment_mask(jnp.asarray(seg), jnp.asarray(seg))
    got = dot_product_attention(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16),
                                jnp.asarray(v, jnp.bfloat16), mask, "cudnn")
    ref = dot_product_attention(q, k, v, mask, "reference")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), atol=3e-2)
