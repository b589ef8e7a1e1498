"""Decoder-only Mixture-of-Experts transformer (Flax NNX): one forward pass for training and decoding.

``Transformer(cfg, rngs=...)(tokens_BxL, segment_ids_BxL, positions_BxL) -> (logits_BxLxV, MoEStats)``
``Transformer(...)(tokens, segment_ids, positions, cache=..., start_slot=...) -> (logits, MoEStats, KVCache)``

Input convention (produced by the data pipeline): int32 ``[B, L]`` arrays; ``segment_ids == 0``
marks padding, each packed document has its own id > 0 and positions restart at 0 per document;
attention is causal within a segment.  Logits are float32.

Block: ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))`` where MLP is a dense SwiGLU in the
first ``first_dense_layers`` blocks and a :class:`~indicfm.model.moe.MoE` afterwards.

Two parameter layouts (``model.scan_layers``):

* *unrolled* (default): ``blocks`` holds every block, run by a Python loop (one copy of the block's
  program per layer in the compiled step);
* *scanned*: ``blocks`` holds the dense first blocks only and ``scanned_blocks`` is one MoE
  :class:`Block` whose every variable has a leading ``layers`` axis of size ``num_moe_layers``
  (created with ``nnx.vmap``, logical axis name ``layers``, unsharded); the forward pass runs it
  with one ``jax.lax.scan``, so compile time and program size no longer grow with depth.  Remat
  ``full`` rematerialises each scanned block.

Decoding passes a :class:`KVCache`: the same blocks then write the new tokens' keys/values into the
cache and attend to every filled slot.

Shape legend: B batch, L length, D model, V vocab, E experts, N scanned layers, S cache slots,
K kv heads, G head dim.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from indicfm.model.attention import SELF_ATTENTION_ONLY, Attention, LayerCache, resolve_impl, segment_mask
from indicfm.model.config import ModelConfig
from indicfm.model.layers import RMSNorm, SwiGLU, compute_dtype, make_param, param_dtype
from indicfm.model.moe import MoE, MoEStats, Routing
from indicfm.sharding import constrain

#: ``param_layout`` names, as written into checkpoint metadata.
UNROLLED, SCANNED = "unrolled", "scanned"
#: The logical name of the stacked axis of scanned blocks (a rule in ``indicfm.sharding``).
LAYERS_AXIS = "layers"


def param_layout(cfg: ModelConfig) -> str:
    """``"scanned"`` when the MoE blocks are stacked (``scan_layers`` and at least one MoE layer),
    else ``"unrolled"``; a dense-only model has the same parameters either way."""
    return SCANNED if cfg.scan_layers and cfg.num_moe_layers > 0 else UNROLLED


def rematerialized(module: nnx.Module, *args):
    """``module(*args)`` with its activations recomputed in the backward pass (``jax.checkpoint``).

    The module is split into a graph definition and plain state and rebuilt inside a pure function,
    so nothing is written back from the inner trace.  ``nnx.remat`` writes every variable back,
    which fails for the non-trainable :class:`~indicfm.model.moe.RouterBias` under ``jax.grad``
    ("Cannot mutate RouterBias from a different trace level").  Valid because a forward pass
    mutates no state (the router bias is updated by the trainer, outside the forward).
    """
    graphdef, state = nnx.split(module)

    def pure_forward(state, *args):
        return nnx.merge(graphdef, state)(*args)

    return jax.checkpoint(pure_forward)(state, *args)


class Block(nnx.Module):
    """One pre-norm transformer block; ``is_moe`` picks the MLP kind."""

    def __init__(self, cfg: ModelConfig, is_moe: bool, *, rngs: nnx.Rngs):
        pdt = param_dtype(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt, rngs=rngs)
        self.mlp = MoE(cfg, rngs=rngs) if is_moe else SwiGLU(cfg.d_model, cfg.d_ff, pdt, rngs=rngs)
        self.is_moe = is_moe
        self.remat_attention = cfg.remat == "attention"

    def __call__(
        self, x_BxLxD, segment_ids_BxL, positions_BxL, cache: LayerCache | None = None
    ) -> tuple[jax.Array, Routing | None, LayerCache | None]:
        """``(x, routing, cache)``: routing is None for a dense block, the cache None when none was passed."""
        h_BxLxD = self.attn_norm(x_BxLxD)
        args = (h_BxLxD, segment_ids_BxL, positions_BxL) + (() if cache is None else (cache,))
        attn_out = rematerialized(self.attn, *args) if self.remat_attention else self.attn(*args)
        if cache is not None:
            attn_out, cache = attn_out
        x_BxLxD = constrain(x_BxLxD + attn_out, ("batch", "length", "act_embed"))
        h_BxLxD = self.mlp_norm(x_BxLxD)
        if self.is_moe:
            mlp_out, routing = self.mlp(h_BxLxD, segment_ids_BxL > 0)
        else:
            mlp_out, routing = self.mlp(h_BxLxD), None
        return constrain(x_BxLxD + mlp_out, ("batch", "length", "act_embed")), routing, cache


def stacked_moe_blocks(cfg: ModelConfig, count: int, rngs: nnx.Rngs) -> Block:
    """``count`` MoE blocks as one :class:`Block` whose variables have a leading ``layers`` axis.

    ``nnx.vmap`` runs the constructor once per layer (each with its own split RNG key) and inserts
    :data:`LAYERS_AXIS` at the front of every parameter's logical axis names, so the sharding rules
    still place the other axes (the router bias has no names and stays replicated).
    """

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def build(layer_rngs: nnx.Rngs) -> Block:
        return Block(cfg, is_moe=True, rngs=layer_rngs)

    return build(rngs)


class LayerStats(NamedTuple):
    """What the loss and the logs need of one MoE layer's routing (a scan output stacks these)."""

    load_balance_loss: jax.Array
    z_loss: jax.Array
    counts_E: jax.Array
    dropped_fraction: jax.Array

    @classmethod
    def of(cls, routing: Routing) -> "LayerStats":
        return cls(routing.load_balance_loss, routing.z_loss, routing.counts_E, routing.dropped_fraction)


class KVCache(NamedTuple):
    """Keys/values of every layer for cache slots ``[0, S)`` (a pytree: it can cross ``jax.jit``).

    One buffer per entry of the model's block containers, in depth order: an unrolled model has one
    ``[B, S, K, G]`` buffer per block; a scanned model one per dense first block, then one
    ``[N, B, S, K, G]`` stack for its ``N`` scanned blocks.  Column ``j`` of every buffer is "slot j";
    all rows of a batch write the same slot at the same time (prompts of different lengths are
    *left*-padded).  Per slot the cache also keeps the segment id (1 = a real token, 0 = an empty
    slot or padding), so a query attends to slot j when both have the same segment id and j is not
    after the query's slot — the model's segment/causal rule, applied to slots.
    """

    k_BxSxKxG: tuple[jax.Array, ...]  # RoPE already applied
    v_BxSxKxG: tuple[jax.Array, ...]
    segment_BxS: jax.Array  # int32: 1 = filled with a real token, 0 = empty slot or padding


class Transformer(nnx.Module):
    """Token embedding, ``num_layers`` blocks, final RMSNorm, (tied or separate) output projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = param_dtype(cfg)
        self.cfg = cfg
        self.embed_VxD = make_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt, fan_in=cfg.d_model)
        scanned = param_layout(cfg) == SCANNED
        looped = cfg.first_dense_layers if scanned else cfg.num_layers
        self.blocks = nnx.List([Block(cfg, is_moe=i >= cfg.first_dense_layers, rngs=rngs) for i in range(looped)])
        self.scanned_blocks = stacked_moe_blocks(cfg, cfg.num_moe_layers, rngs) if scanned else None
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt, rngs=rngs)
        self.unembed_DxV = (
            None if cfg.tie_embeddings
            else make_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)
        )

    def moe_layers(self) -> list[MoE]:
        """The MoE modules in depth order (rows of ``MoEStats.expert_counts``); in the scanned layout
        one MoE whose variables stack all ``num_moe_layers`` layers."""
        if self.scanned_blocks is not None:
            return [self.scanned_blocks.mlp]
        return [block.mlp for block in self.blocks if block.is_moe]

    def init_cache(self, batch_size: int, num_slots: int) -> KVCache:
        """An empty cache for ``batch_size`` rows and ``num_slots`` slots, in the compute dtype."""
        cfg = self.cfg
        shape = (batch_size, num_slots, cfg.num_kv_heads, cfg.head_dim)
        shapes = [shape] * len(self.blocks)
        if self.scanned_blocks is not None:
            shapes.append((cfg.num_moe_layers, *shape))
        zeros = tuple(jnp.zeros(s, compute_dtype(cfg)) for s in shapes)
        return KVCache(zeros, zeros, jnp.zeros((batch_size, num_slots), jnp.int32))

    def __call__(
        self,
        tokens_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        cache: KVCache | None = None,
        start_slot: jax.Array | int = 0,
    ):
        """Logits and router statistics; with a ``cache`` also the cache with this call's keys/values.

        Decoding: the ``L`` new tokens occupy cache slots ``[start_slot, start_slot + L)``; prefill is
        one call with the left-padded prompts at slot 0, each decode step a call with ``L = 1``.
        ``positions`` are the tokens' positions inside their document (RoPE), which differ from slots
        when a row is left-padded; ``segment_ids`` is 1 for real tokens and 0 for padding.
        """
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        embed_VxD = self.embed_VxD[...]
        # Gather the (vocab/fsdp-sharded) table before the lookup, as FSDP does for any weight:
        # a gather from a table sharded on both axes into batch-sharded rows is not partitionable.
        table_VxD = constrain(embed_VxD, (None, None))
        x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(dtype)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))

        slots = None if cache is None else self._cache_slots(cache, segment_ids_BxL, start_slot)
        layer_stats: list[LayerStats] = []
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            layer_cache = None if slots is None else LayerCache(cache.k_BxSxKxG[i], cache.v_BxSxKxG[i], *slots[1:])
            args = (x_BxLxD, segment_ids_BxL, positions_BxL) + (() if layer_cache is None else (layer_cache,))
            x_BxLxD, routing, layer_cache = rematerialized(block, *args) if cfg.remat == "full" else block(*args)
            if routing is not None:
                layer_stats.append(LayerStats.of(routing))
            if layer_cache is not None:
                new_k.append(layer_cache.k_BxSxKxG)
                new_v.append(layer_cache.v_BxSxKxG)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_stats) if layer_stats else None
        if self.scanned_blocks is not None:
            kv = None if slots is None else (cache.k_BxSxKxG[-1], cache.v_BxSxKxG[-1])
            x_BxLxD, stacked, kv = scan_blocks(
                self.scanned_blocks, x_BxLxD, segment_ids_BxL, positions_BxL, kv,
                None if slots is None else slots[1:], remat=cfg.remat == "full",
            )
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])

        x_BxLxD = self.final_norm(x_BxLxD)
        out_DxV = embed_VxD.T if cfg.tie_embeddings else self.unembed_DxV[...]
        logits_BxLxV = jnp.einsum(
            "bld,dv->blv", x_BxLxD, out_DxV.astype(dtype), preferred_element_type=jnp.float32
        )
        logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "act_vocab"))
        stats = collect_stats(stacked, cfg)
        if cache is None:
            return logits_BxLxV, stats
        return logits_BxLxV, stats, KVCache(tuple(new_k), tuple(new_v), slots[0])

    def _cache_slots(self, cache: KVCache, segment_BxL: jax.Array, start_slot) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(segment ids of every slot after this call, start slot, [B, 1, L, S] slot mask)``."""
        impl = resolve_impl(self.cfg.attention_impl)
        if impl in SELF_ATTENTION_ONLY:
            raise ValueError(f"{impl} attention cannot read a KV cache; build the model from "
                             "indicfm.inference.decode.inference_config(cfg)")
        B, L = segment_BxL.shape
        S = cache.segment_BxS.shape[1]
        start = jnp.asarray(start_slot, jnp.int32)
        segment_cache_BxS = jax.lax.dynamic_update_slice(cache.segment_BxS, segment_BxL.astype(jnp.int32), (0, start))
        q_slot_BxL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
        kv_slot_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        return segment_cache_BxS, start, segment_mask(segment_BxL, segment_cache_BxS, q_slot_BxL, kv_slot_BxS)


def scan_blocks(
    blocks: Block,
    x_BxLxD: jax.Array,
    segment_ids_BxL: jax.Array,
    positions_BxL: jax.Array,
    kv: tuple[jax.Array, jax.Array] | None,
    slots: tuple[jax.Array, jax.Array] | None,
    *,
    remat: bool,
) -> tuple[jax.Array, LayerStats, tuple[jax.Array, jax.Array] | None]:
    """Run stacked blocks (:func:`stacked_moe_blocks`) with one ``jax.lax.scan`` over their layers.

    Like :func:`rematerialized`, the module is split into plain state and rebuilt per layer inside
    a pure function (``nnx.scan`` would write the router bias back from the inner trace).  Returns
    the output, each layer's :class:`LayerStats` stacked ``[N, ...]`` and, when decoding, the
    stacked key/value buffers ``[N, B, S, K, G]`` (``kv``) with this call's tokens written;
    ``slots`` is ``(start slot, slot mask)`` shared by every layer.
    """
    graphdef, state = nnx.split(blocks)

    def one_layer(x_BxLxD: jax.Array, layer: tuple[Any, Any]):
        layer_state, layer_kv = layer
        cache = None if layer_kv is None else LayerCache(*layer_kv, *slots)
        x_BxLxD, routing, cache = nnx.merge(graphdef, layer_state)(x_BxLxD, segment_ids_BxL, positions_BxL, cache)
        return x_BxLxD, (LayerStats.of(routing), None if cache is None else (cache.k_BxSxKxG, cache.v_BxSxKxG))

    if remat:
        # inside a scan, CSE across iterations cannot undo the recomputation, so it needs no guard
        one_layer = jax.checkpoint(one_layer, prevent_cse=False)
    x_BxLxD, (stats, kv) = jax.lax.scan(one_layer, x_BxLxD, (state, kv))
    return x_BxLxD, stats, kv


def collect_stats(stacked: LayerStats | None, cfg: ModelConfig) -> MoEStats:
    """Reduce per-layer routing statistics ``[num_moe_layers, ...]`` to :class:`MoEStats` (zeros
    for a dense-only model)."""
    if stacked is None:
        zero = jnp.zeros((), jnp.float32)
        return MoEStats(zero, zero, zero, jnp.zeros((0, cfg.num_experts), jnp.float32), zero)
    lb, z = stacked.load_balance_loss, stacked.z_loss
    aux = jnp.sum(cfg.aux_loss_weight * lb + cfg.z_loss_weight * z)
    return MoEStats(
        aux_loss=aux,
        load_balance_loss=jnp.mean(lb),
        z_loss=jnp.mean(z),
        expert_counts=stacked.counts_E,
        dropped_fraction=jnp.mean(stacked.dropped_fraction),
    )
