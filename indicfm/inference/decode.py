"""Forward pass with a key/value cache, so generation never recomputes the prefix.

The math is the model's own: this module calls the sub-modules of
:class:`~indicfm.model.transformer.Transformer` (embedding table, each block's norms,
``Attention.project_qkv`` / ``Attention.attend``, the dense or MoE MLP, final norm, output
projection) and only adds the cache between ``project_qkv`` and ``attend``.  The wiring of a block
(pre-norm, two residual adds) mirrors ``Block.__call__``; ``tests/test_generate.py`` checks the
cached path against the model's own full forward pass, logit for logit and token for token.

Cache layout: one fixed-size buffer per layer, ``[B, S, K, G]`` for keys and values, where S is the
longest sequence the call will produce (prompt + new tokens).  Column ``j`` of every buffer is
"slot j"; all rows of a batch write the same slot at the same time, so prompts of different
lengths are *left*-padded.  Per slot the cache also keeps the segment id (1 = a real token, 0 = an
empty slot or padding), so a query attends to slot j when both have the same segment id and j is
not after the query's slot — the model's segment/causal rule, applied to slots.

Shape legend (as in indicfm/model): B batch, L new tokens in this call, S cache slots, D model,
K kv heads, G head dim, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from indicfm.model.attention import SELF_ATTENTION_ONLY, resolve_impl, segment_mask
from indicfm.model.config import ModelConfig
from indicfm.model.layers import compute_dtype
from indicfm.model.transformer import Transformer


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The training config adjusted for serving: same parameters, inference-safe kernels.

    * ``dispatch="dropless"``: capacity dispatch drops tokens depending on what else is in the batch,
      so a prompt's continuation would depend on its neighbours and on the cache length; dropless
      computes every chosen expert (as Hugging Face's Qwen2-MoE does).
    * cuDNN attention applies its causal mask by index (``is_causal``), which is wrong for one new
      query against a cache of earlier keys, and TPU splash attention only attends a sequence to
      itself; the XLA kernel with the explicit slot mask is used instead of either.
    """
    impl = "xla" if resolve_impl(cfg.attention_impl) in SELF_ATTENTION_ONLY else cfg.attention_impl
    return cfg.model_copy(update={"dispatch": "dropless", "attention_impl": impl, "remat": "none"})


class KVCache(NamedTuple):
    """Keys/values of every layer for slots ``[0, S)`` (a pytree: it can cross ``jax.jit``)."""

    k_BxSxKxG: tuple[jax.Array, ...]  # one per layer, RoPE already applied
    v_BxSxKxG: tuple[jax.Array, ...]
    segment_BxS: jax.Array  # int32: 1 = filled with a real token, 0 = empty slot or padding


def init_cache(model: Transformer, batch_size: int, num_slots: int) -> KVCache:
    """An empty cache for ``batch_size`` rows and ``num_slots`` slots, in the model's compute dtype."""
    cfg = model.cfg
    shape = (batch_size, num_slots, cfg.num_kv_heads, cfg.head_dim)
    dtype = compute_dtype(cfg)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(zeros, zeros, jnp.zeros((batch_size, num_slots), jnp.int32))


def forward_with_cache(
    model: Transformer,
    tokens_BxL: jax.Array,
    segment_BxL: jax.Array,
    positions_BxL: jax.Array,
    cache: KVCache,
    start_slot: jax.Array | int,
) -> tuple[jax.Array, KVCache]:
    """Run ``L`` new tokens that occupy slots ``[start_slot, start_slot + L)``; returns their float32
    logits ``[B, L, V]`` and the cache with their keys/values written.

    Prefill is one call with the (left-padded) prompts at slot 0; each decode step is a call with
    ``L = 1``.  ``positions`` are the tokens' positions inside their document (RoPE), which differ
    from slots when a row is left-padded.  ``segment`` is 1 for real tokens and 0 for padding.
    """
    cfg = model.cfg
    if resolve_impl(cfg.attention_impl) in SELF_ATTENTION_ONLY:
        raise ValueError(f"{resolve_impl(cfg.attention_impl)} attention cannot read a KV cache; "
                         "build the model from inference_config(cfg)")
    dtype = compute_dtype(cfg)
    B, L = tokens_BxL.shape
    S = cache.segment_BxS.shape[1]
    start = jnp.asarray(start_slot, jnp.int32)

    segment_cache_BxS = jax.lax.dynamic_update_slice(cache.segment_BxS, segment_BxL.astype(jnp.int32), (0, start))
    q_slot_BxL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
    kv_slot_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    mask_Bx1xLxS = segment_mask(segment_BxL, segment_cache_BxS, q_slot_BxL, kv_slot_BxS)

    embed_VxD = model.embed_VxD[...]
    x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(dtype)
    new_k, new_v = [], []
    for block, k_cache, v_cache in zip(model.blocks, cache.k_BxSxKxG, cache.v_BxSxKxG):
        h_BxLxD = block.attn_norm(x_BxLxD)
        q_BxLxHxG, k_BxLxKxG, v_BxLxKxG = block.attn.project_qkv(h_BxLxD, positions_BxL)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_BxLxKxG.astype(k_cache.dtype), (0, start, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_BxLxKxG.astype(v_cache.dtype), (0, start, 0, 0))
        new_k.append(k_cache)
        new_v.append(v_cache)
        x_BxLxD = x_BxLxD + block.attn.attend(q_BxLxHxG, k_cache, v_cache, mask_Bx1xLxS)
        h_BxLxD = block.mlp_norm(x_BxLxD)
        if block.is_moe:
            mlp_out, _ = block.mlp(h_BxLxD, segment_BxL > 0)
        else:
            mlp_out = block.mlp(h_BxLxD)
        x_BxLxD = x_BxLxD + mlp_out

    x_BxLxD = model.final_norm(x_BxLxD)
    out_DxV = embed_VxD.T if cfg.tie_embeddings else model.unembed_DxV[...]
    logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, out_DxV.astype(dtype), preferred_element_type=jnp.float32)
    return logits_BxLxV, KVCache(tuple(new_k), tuple(new_v), segment_cache_BxS)
