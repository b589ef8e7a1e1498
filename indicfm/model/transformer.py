"""Decoder-only Mixture-of-Experts transformer (Flax NNX).

``Transformer(cfg, rngs=...)(tokens_BxL, segment_ids_BxL, positions_BxL) -> (logits_BxLxV, MoEStats)``

Input convention (produced by the data pipeline): int32 ``[B, L]`` arrays; ``segment_ids == 0``
marks padding, each packed document has its own id > 0 and positions restart at 0 per document;
attention is causal within a segment.  Logits are float32.

Block: ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))`` where MLP is a dense SwiGLU in the
first ``first_dense_layers`` blocks and a :class:`~indicfm.model.moe.MoE` afterwards.

Shape legend: B batch, L length, D model, V vocab, E experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from indicfm.model.attention import Attention
from indicfm.model.config import ModelConfig
from indicfm.model.layers import RMSNorm, SwiGLU, compute_dtype, make_param, param_dtype
from indicfm.model.moe import MoE, MoEStats, Routing
from indicfm.sharding import constrain


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

    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL) -> tuple[jax.Array, Routing | None]:
        h_BxLxD = self.attn_norm(x_BxLxD)
        if self.remat_attention:
            attn_out = rematerialized(self.attn, h_BxLxD, segment_ids_BxL, positions_BxL)
        else:
            attn_out = self.attn(h_BxLxD, segment_ids_BxL, positions_BxL)
        x_BxLxD = constrain(x_BxLxD + attn_out, ("batch", "length", "act_embed"))
        h_BxLxD = self.mlp_norm(x_BxLxD)
        if self.is_moe:
            mlp_out, routing = self.mlp(h_BxLxD, segment_ids_BxL > 0)
        else:
            mlp_out, routing = self.mlp(h_BxLxD), None
        return constrain(x_BxLxD + mlp_out, ("batch", "length", "act_embed")), routing


class Transformer(nnx.Module):
    """Token embedding, ``num_layers`` blocks, final RMSNorm, (tied or separate) output projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = param_dtype(cfg)
        self.cfg = cfg
        self.embed_VxD = make_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt, fan_in=cfg.d_model)
        self.blocks = nnx.List(
            [Block(cfg, is_moe=i >= cfg.first_dense_layers, rngs=rngs) for i in range(cfg.num_layers)]
        )
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt, rngs=rngs)
        self.unembed_DxV = (
            None if cfg.tie_embeddings
            else make_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)
        )

    def moe_layers(self) -> list[MoE]:
        """The MoE modules in depth order (rows of ``MoEStats.expert_counts``)."""
        return [block.mlp for block in self.blocks if block.is_moe]

    def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, positions_BxL: jax.Array):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        embed_VxD = self.embed_VxD[...]
        # Gather the (vocab/fsdp-sharded) table before the lookup, as FSDP does for any weight:
        # a gather from a table sharded on both axes into batch-sharded rows is not partitionable.
        table_VxD = constrain(embed_VxD, (None, None))
        x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(dtype)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
        routings: list[Routing] = []
        for block in self.blocks:
            if cfg.remat == "full":
                x_BxLxD, routing = rematerialized(block, x_BxLxD, segment_ids_BxL, positions_BxL)
            else:
                x_BxLxD, routing = block(x_BxLxD, segment_ids_BxL, positions_BxL)
            if routing is not None:
                routings.append(routing)
        x_BxLxD = self.final_norm(x_BxLxD)
        out_DxV = embed_VxD.T if cfg.tie_embeddings else self.unembed_DxV[...]
        logits_BxLxV = jnp.einsum(
            "bld,dv->blv", x_BxLxD, out_DxV.astype(dtype), preferred_element_type=jnp.float32
        )
        logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "act_vocab"))
        return logits_BxLxV, collect_stats(routings, cfg)


def collect_stats(routings: list[Routing], cfg: ModelConfig) -> MoEStats:
    """Stack per-layer routing statistics into :class:`MoEStats` (zeros for a dense-only model)."""
    if not routings:
        zero = jnp.zeros((), jnp.float32)
        return MoEStats(zero, zero, zero, jnp.zeros((0, cfg.num_experts), jnp.float32), zero)
    lb = jnp.stack([r.load_balance_loss for r in routings])
    z = jnp.stack([r.z_loss for r in routings])
    aux = jnp.sum(cfg.aux_loss_weight * lb + cfg.z_loss_weight * z)
    return MoEStats(
        aux_loss=aux,
        load_balance_loss=jnp.mean(lb),
        z_loss=jnp.mean(z),
        expert_counts=jnp.stack([r.counts_E for r in routings]),
        dropped_fraction=jnp.mean(jnp.stack([r.dropped_fraction for r in routings])),
    )
