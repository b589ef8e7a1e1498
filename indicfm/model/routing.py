"""Routing of one MoE layer: the router's choice of experts and gates, capacity slots, balancing losses.

Plain jit code over the *global* batch (sharded by the compiler like any activation), so the
losses, per-expert counts and capacity slots do not depend on the mesh.  What happens to the
chosen assignments afterwards is :mod:`indicfm.model.dispatch`'s job.

Shape legend: B batch, L length, E experts, k chosen experts per token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from indicfm.model.config import ModelConfig


@struct.dataclass
class Routing:
    """Routing decision of one layer for a ``[B, L]`` batch."""

    expert_BxLxk: jax.Array  # int32 chosen experts
    gate_BxLxk: jax.Array  # float32 combine weights (0 for padding tokens)
    slot_BxLxk: jax.Array  # int32 slot in the expert's per-sequence buffer; == capacity when dropped
    counts_E: jax.Array  # float32 assignments per expert (padding excluded)
    load_balance_loss: jax.Array
    z_loss: jax.Array
    dropped_fraction: jax.Array


def capacity_per_sequence(cfg: ModelConfig, seq_len: int) -> int:
    """Slots per expert for one sequence: ``ceil(capacity_factor * L * top_k / E)`` (at least 1)."""
    return max(1, math.ceil(cfg.capacity_factor * seq_len * cfg.top_k / cfg.num_experts))


def route(
    logits_BxLxE: jax.Array,
    valid_BxL: jax.Array,
    cfg: ModelConfig,
    bias_E: jax.Array | None = None,
    capacity: int | None = None,
) -> Routing:
    """Choose experts, gates, capacity slots and the balancing losses from float32 router logits.

    Load balance (Switch/GShard, generalised to top-k): ``E * sum_e f_e * P_e`` where ``f_e`` is the
    share of assignments sent to expert e and ``P_e`` the mean routing probability of e (softmax
    probabilities, or sigmoid scores normalised over all experts); 1.0 when perfectly balanced.
    z-loss: mean over tokens of ``logsumexp(logits)**2``.  Both average over non-padding tokens.
    """
    E, k = cfg.num_experts, cfg.top_k
    logits_BxLxE = logits_BxLxE.astype(jnp.float32)
    if cfg.router == "softmax":
        scores_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
        probs_BxLxE = scores_BxLxE
    else:
        scores_BxLxE = jax.nn.sigmoid(logits_BxLxE)
        probs_BxLxE = scores_BxLxE / jnp.sum(scores_BxLxE, axis=-1, keepdims=True)
    select_BxLxE = scores_BxLxE if bias_E is None else scores_BxLxE + jax.lax.stop_gradient(bias_E)
    _, expert_BxLxk = jax.lax.top_k(select_BxLxE, k)
    chosen_BxLxk = jnp.take_along_axis(scores_BxLxE, expert_BxLxk, axis=-1)
    if cfg.router == "sigmoid" or cfg.norm_topk_prob:
        chosen_BxLxk = chosen_BxLxk / jnp.sum(chosen_BxLxk, axis=-1, keepdims=True)
    valid = valid_BxL.astype(jnp.float32)
    gate_BxLxk = chosen_BxLxk * valid[..., None]

    onehot_BxLxkxE = jax.nn.one_hot(expert_BxLxk, E, dtype=jnp.float32) * valid[..., None, None]
    counts_E = jnp.sum(onehot_BxLxkxE, axis=(0, 1, 2))
    n_valid = jnp.maximum(jnp.sum(valid), 1.0)
    f_E = counts_E / (n_valid * k)
    p_E = jnp.sum(probs_BxLxE * valid[..., None], axis=(0, 1)) / n_valid
    load_balance = E * jnp.sum(f_E * p_E)
    z_BxL = jax.nn.logsumexp(logits_BxLxE, axis=-1) ** 2
    z_loss = jnp.sum(z_BxL * valid) / n_valid

    if capacity is None:  # dropless: every assignment is kept
        slot_BxLxk = jnp.zeros_like(expert_BxLxk)
        dropped = jnp.zeros((), jnp.float32)
    else:
        # Priority order inside a sequence: choice rank first, then position ([B, k*L] flattened).
        B, L = valid_BxL.shape
        onehot_BxKLxE = jnp.swapaxes(onehot_BxLxkxE, 1, 2).reshape(B, k * L, E).astype(jnp.int32)
        position_BxKLxE = jnp.cumsum(onehot_BxKLxE, axis=1) - 1
        slot_BxKL = jnp.sum(position_BxKLxE * onehot_BxKLxE, axis=-1)
        slot_BxLxk = jnp.swapaxes(slot_BxKL.reshape(B, k, L), 1, 2)
        kept_BxLxk = (slot_BxLxk < capacity) & valid_BxL[..., None].astype(bool)
        slot_BxLxk = jnp.where(kept_BxLxk, slot_BxLxk, capacity)
        dropped = jnp.sum(valid[..., None] * (1.0 - kept_BxLxk)) / (n_valid * k)
    return Routing(expert_BxLxk.astype(jnp.int32), gate_BxLxk, slot_BxLxk.astype(jnp.int32), counts_E,
                   load_balance, z_loss, dropped)

