"""Upcycling a dense model into an MoE keeps the parent's function at step 0 (the reference: the
dense parent's own logits, float32), for whole-copy experts and fine-grained ones, on one device and
with experts split over a mesh; the upcycled model trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from indicfm.config import MeshConfig
from indicfm.convert.upcycle import UpcycleError, upcycle, upcycled_config
from indicfm.model.config import ModelConfig
from indicfm.sharding import make_mesh
from indicfm.train.state import create_model

PARENT = ModelConfig(vocab_size=97, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                     first_dense_layers=3, num_experts=1, top_k=1, param_dtype="float32", compute_dtype="float32",
                     attention_impl="reference", tie_embeddings=False, qk_norm=True)


def _mesh(**sizes):
    count = int(np.prod(list(sizes.values()))) if sizes else 1
    return make_mesh(MeshConfig(**{"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **sizes}), jax.devices()[:count])


def _logits(model, tokens):
    B, L = tokens.shape
    logits, _ = model(jnp.asarray(tokens), jnp.ones((B, L), jnp.int32), jnp.broadcast_to(jnp.arange(L), (B, L)))
    return np.asarray(logits, np.float64)


@pytest.fixture(scope="module")
def parent_and_tokens():
    parent = create_model(PARENT, _mesh(), seed=3)
    tokens = np.random.default_rng(0).integers(0, PARENT.vocab_size, size=(4, 24)).astype(np.int32)
    return parent, tokens, _logits(parent, tokens)


@pytest.mark.parametrize(("experts", "top_k", "granularity", "shared", "sizes", "scan"), [
    (8, 2, 1, 0, {}, False),
    (32, 8, 4, 0, {}, False),
    (32, 8, 4, 1, {"expert": 4, "fsdp": 2}, True),
    (8, 2, 1, 0, {"expert": 8}, False),
])
def test_step_zero_logits_equal_the_dense_parent(parent_and_tokens, experts, top_k, granularity, shared, sizes, scan):
    parent, tokens, expected = parent_and_tokens
    cfg = upcycled_config(PARENT, num_experts=experts, top_k=top_k, granularity=granularity, shared_experts=shared,
                          first_dense_layers=1, scan_layers=scan)
    model = upcycle(parent, cfg, _mesh(**sizes), granularity=granularity, seed=1)
    assert len(model.moe_layers()) == (1 if scan else 2)
    got = _logits(model, tokens)
    error = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
    assert error <= 1e-4, f"max |delta logit| / max |parent logit| = {error:.2e}"


def test_the_router_is_random_per_copy_and_shared_by_a_copys_slices(parent_and_tokens):
    parent, _, _ = parent_and_tokens
    cfg = upcycled_config(PARENT, num_experts=32, top_k=8, granularity=4)
    router = np.asarray(upcycle(parent, cfg, _mesh(), granularity=4).blocks[1].mlp.router_DxE[...])
    groups = router.reshape(PARENT.d_model, 8, 4)
    assert np.all(groups == groups[:, :, :1])  # the 4 slices of a copy score alike
    assert len({groups[:, c, 0].tobytes() for c in range(8)}) == 8  # the copies differ


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"num_experts": 8, "top_k": 2, "granularity": 3}, "granularity"),
    ({"num_experts": 10, "top_k": 4, "granularity": 4}, "num_experts"),
    ({"num_experts": 8, "top_k": 2, "granularity": 4}, "top_k"),
])
def test_settings_that_cannot_be_exact_are_refused(kwargs, named):
    with pytest.raises(UpcycleError, match=named):
        upcycled_config(PARENT, **kwargs)


def test_an_moe_parent_is_refused():
    with pytest.raises(UpcycleError, match="dense"):
        upcycled_config(PARENT.model_copy(update={"first_dense_layers": 1, "num_experts": 4, "top_k": 2}),
                        num_experts=8, top_k=2)
