"""Grouped-query self-attention: causal and segment-aware, with a backend chosen per platform.

Packed batches (issue 3) hold several documents per row: ``segment_ids`` gives each document its
own id > 0 (0 marks padding) and a token may only attend to earlier tokens of the same segment.
``jax.nn.dot_product_attention`` (jax 0.10) has no segment-id argument, so the segment rule is
passed as a boolean mask ``[B, 1, L, L]``; on cuDNN ``is_causal=True`` adds the causal part in the
kernel and the mask is turned into an additive bias by jax.  On TPU the splash-attention kernel
(:mod:`indicfm.model.splash`) takes the segment ids themselves and builds no mask.  Padding tokens
attend to padding only, so no row is fully masked (no NaNs); their outputs are ignored by the loss.

Generation passes a :class:`LayerCache` to the same ``__call__`` that training runs: the new
tokens' keys and values are written into the cache's slots between ``project_qkv`` and ``attend``,
and the queries attend to every filled slot under the cache's slot mask (see
:class:`~indicfm.model.transformer.KVCache` for the layout).

Shape legend: B batch, L query length, S key length, D model, H query heads, K kv heads, G head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from indicfm.model.config import ModelConfig
from indicfm.model.layers import RMSNorm, compute_dtype, make_param, param_dtype, rope, rope_frequencies
from indicfm.model.platform import target_platform
from indicfm.sharding import constrain


def segment_mask(q_segment_BxL: jax.Array, kv_segment_BxS: jax.Array, q_pos_BxL=None, kv_pos_BxS=None) -> jax.Array:
    """Boolean ``[B, 1, L, S]``: same segment, and (when positions of the flattened sequence are
    given) causal.  Without positions the causal part is the lower triangle of the index grid."""
    same_BxLxS = q_segment_BxL[:, :, None] == kv_segment_BxS[:, None, :]
    if q_pos_BxL is None:
        L, S = q_segment_BxL.shape[1], kv_segment_BxS.shape[1]
        causal_LxS = jnp.arange(L)[:, None] + (S - L) >= jnp.arange(S)[None, :]
        mask = same_BxLxS & causal_LxS[None]
    else:
        mask = same_BxLxS & (q_pos_BxL[:, :, None] >= kv_pos_BxS[:, None, :])
    return mask[:, None, :, :]


def reference_attention(q_BxLxHxG: jax.Array, k_BxSxKxG: jax.Array, v_BxSxKxG: jax.Array, mask_Bx1xLxS) -> jax.Array:
    """Plain float32 softmax attention with GQA head sharing; the independent check for tests."""
    B, L, H, G = q_BxLxHxG.shape
    K = k_BxSxKxG.shape[2]
    q = q_BxLxHxG.astype(jnp.float32).reshape(B, L, K, H // K, G)
    logits_BxKxRxLxS = jnp.einsum("blkrg,bskg->bkrls", q, k_BxSxKxG.astype(jnp.float32)) * G**-0.5
    logits_BxKxRxLxS = jnp.where(mask_Bx1xLxS[:, :, None], logits_BxKxRxLxS, -1e30)
    probs = jax.nn.softmax(logits_BxKxRxLxS, axis=-1)
    out = jnp.einsum("bkrls,bskg->blkrg", probs, v_BxSxKxG.astype(jnp.float32))
    return out.reshape(B, L, H, G).astype(q_BxLxHxG.dtype)


def resolve_impl(attention_impl: str, platform: str | None = None) -> str:
    """'auto' -> 'cudnn' on GPU, 'splash' on TPU, 'xla' elsewhere (``platform``: default backend)."""
    if attention_impl != "auto":
        return attention_impl
    return {"gpu": "cudnn", "tpu": "splash"}.get(platform or target_platform(), "xla")


def backend_for(attention_impl: str, q_len: int, kv_len: int) -> str:
    """The backend that runs: :func:`resolve_impl`, except that 'auto' falls back to 'xla' where
    splash can't run (queries other than the keys, or a length not a multiple of 128); an explicit
    'splash' raises there instead."""
    impl = resolve_impl(attention_impl)
    if impl == "splash" and attention_impl == "auto" and (q_len != kv_len or q_len % 128):
        return "xla"
    return impl


#: Backends that need the queries and keys to be the same tokens (no KV cache: training, scoring).
SELF_ATTENTION_ONLY = ("cudnn", "splash")


def dot_product_attention(
    q_BxLxHxG, k_BxSxKxG, v_BxSxKxG, mask_Bx1xLxS, impl: str, segment_ids_BxL=None
) -> jax.Array:
    """Dispatch to the chosen backend.  All but splash take the segment/causal mask; splash takes the
    segment ids (the queries' and keys' own, so ``L == S``) and ignores the mask."""
    impl = backend_for(impl, q_BxLxHxG.shape[1], k_BxSxKxG.shape[1])
    if impl == "splash":
        if segment_ids_BxL is None or q_BxLxHxG.shape[1] != k_BxSxKxG.shape[1]:
            raise ValueError("splash attention is self-attention over segment ids (training, scoring); "
                             "a KV cache needs attention_impl 'xla' (see indicfm.inference.decode.inference_config)")
        from indicfm.model.splash import splash_attention

        return splash_attention(q_BxLxHxG, k_BxSxKxG, v_BxSxKxG, segment_ids_BxL)
    if impl == "reference":
        return reference_attention(q_BxLxHxG, k_BxSxKxG, v_BxSxKxG, mask_Bx1xLxS)
    if impl == "cudnn":
        # cuDNN kernels need half precision; the causal part runs in-kernel.
        dtype = jnp.bfloat16 if q_BxLxHxG.dtype == jnp.float32 else q_BxLxHxG.dtype
        out = jax.nn.dot_product_attention(
            q_BxLxHxG.astype(dtype), k_BxSxKxG.astype(dtype), v_BxSxKxG.astype(dtype),
            mask=mask_Bx1xLxS, is_causal=True, implementation="cudnn",
        )
        return out.astype(q_BxLxHxG.dtype)
    return jax.nn.dot_product_attention(q_BxLxHxG, k_BxSxKxG, v_BxSxKxG, mask=mask_Bx1xLxS, implementation="xla")


class LayerCache(NamedTuple):
    """One layer's key/value buffers plus where this call's tokens go (a pytree).

    ``start_slot`` and ``mask_Bx1xLxS`` are the same for every layer of a forward pass; the
    transformer builds them once (:meth:`~indicfm.model.transformer.Transformer.__call__`).
    """

    k_BxSxKxG: jax.Array  # RoPE already applied
    v_BxSxKxG: jax.Array
    start_slot: jax.Array  # int32 scalar: the slot of this call's first token
    mask_Bx1xLxS: jax.Array  # bool: which slots each new token may attend to

    def write(self, k_BxLxKxG: jax.Array, v_BxLxKxG: jax.Array) -> "LayerCache":
        """The cache with the new tokens' keys/values stored at slots ``[start_slot, start_slot + L)``."""
        at = (0, self.start_slot, 0, 0)
        k = jax.lax.dynamic_update_slice(self.k_BxSxKxG, k_BxLxKxG.astype(self.k_BxSxKxG.dtype), at)
        v = jax.lax.dynamic_update_slice(self.v_BxSxKxG, v_BxLxKxG.astype(self.v_BxSxKxG.dtype), at)
        return self._replace(k_BxSxKxG=k, v_BxSxKxG=v)


class Attention(nnx.Module):
    """GQA self-attention with RoPE; heads split over the ``tensor`` mesh axis."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K, G = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt = param_dtype(cfg)
        self.w_q_DxHxG = make_param(rngs, (D, H, G), ("embed", "heads", "head_dim"), pdt)
        self.w_k_DxKxG = make_param(rngs, (D, K, G), ("embed", "kv_heads", "head_dim"), pdt)
        self.w_v_DxKxG = make_param(rngs, (D, K, G), ("embed", "kv_heads", "head_dim"), pdt)
        self.w_o_HxGxD = make_param(rngs, (H, G, D), ("heads", "head_dim", "embed"), pdt, fan_in=H * G)
        if cfg.attention_bias:
            self.b_q_HxG = make_param(rngs, (H, G), ("heads", "head_dim"), pdt, init="zeros")
            self.b_k_KxG = make_param(rngs, (K, G), ("kv_heads", "head_dim"), pdt, init="zeros")
            self.b_v_KxG = make_param(rngs, (K, G), ("kv_heads", "head_dim"), pdt, init="zeros")
        else:
            self.b_q_HxG = self.b_k_KxG = self.b_v_KxG = None
        # Qwen3: one RMSNorm over each head's G features, shared by all heads (before RoPE)
        self.q_norm = RMSNorm(G, cfg.norm_eps, pdt, rngs=rngs, names=("head_dim",)) if cfg.qk_norm else None
        self.k_norm = RMSNorm(G, cfg.norm_eps, pdt, rngs=rngs, names=("head_dim",)) if cfg.qk_norm else None
        self.rope_cfg = cfg
        self.impl = cfg.attention_impl
        self.dtype = compute_dtype(cfg)

    def project_qkv(self, x_BxLxD: jax.Array, positions_BxL: jax.Array):
        """Queries, keys and values with RoPE applied (what a KV cache would store: k, v)."""
        dt = x_BxLxD.dtype
        q = jnp.einsum("bld,dhg->blhg", x_BxLxD, self.w_q_DxHxG[...].astype(dt))
        k = jnp.einsum("bld,dkg->blkg", x_BxLxD, self.w_k_DxKxG[...].astype(dt))
        v = jnp.einsum("bld,dkg->blkg", x_BxLxD, self.w_v_DxKxG[...].astype(dt))
        if self.b_q_HxG is not None:
            q = q + self.b_q_HxG[...].astype(dt)
            k = k + self.b_k_KxG[...].astype(dt)
            v = v + self.b_v_KxG[...].astype(dt)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_frequencies(self.rope_cfg)
        q_BxLxHxG = constrain(rope(q, positions_BxL, inv_freq), ("batch", "length", "act_heads", None))
        k_BxLxKxG = constrain(rope(k, positions_BxL, inv_freq), ("batch", "length", "act_kv_heads", None))
        v_BxLxKxG = constrain(v, ("batch", "length", "act_kv_heads", None))
        return q_BxLxHxG, k_BxLxKxG, v_BxLxKxG

    def attend(self, q_BxLxHxG, k_BxSxKxG, v_BxSxKxG, mask_Bx1xLxS, segment_ids_BxL=None) -> jax.Array:
        """Attention over given keys/values and the output projection back to D."""
        out_BxLxHxG = dot_product_attention(q_BxLxHxG, k_BxSxKxG, v_BxSxKxG, mask_Bx1xLxS, self.impl, segment_ids_BxL)
        out_BxLxHxG = constrain(out_BxLxHxG, ("batch", "length", "act_heads", None))
        return jnp.einsum("blhg,hgd->bld", out_BxLxHxG, self.w_o_HxGxD[...].astype(out_BxLxHxG.dtype))

    def __call__(
        self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array, positions_BxL: jax.Array, cache: LayerCache | None = None
    ):
        """Self-attention output ``[B, L, D]``; with a ``cache``, ``(output, cache with this call's
        keys/values written)``: the queries then attend to the cache's slots, not to ``x`` alone."""
        q, k, v = self.project_qkv(x_BxLxD, positions_BxL)
        if cache is not None:
            cache = cache.write(k, v)
            return self.attend(q, cache.k_BxSxKxG, cache.v_BxSxKxG, cache.mask_Bx1xLxS), cache
        # splash attention works from the segment ids and needs no [B, 1, L, L] mask
        L = segment_ids_BxL.shape[1]
        needs_mask = backend_for(self.impl, L, L) != "splash"
        mask_Bx1xLxL = segment_mask(segment_ids_BxL, segment_ids_BxL) if needs_mask else None
        return self.attend(q, k, v, mask_Bx1xLxL, segment_ids_BxL)
