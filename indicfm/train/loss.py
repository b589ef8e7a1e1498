"""Next-token cross-entropy over packed rows.

Rows hold several documents packed end to end (``data_pipeline/pack.py``).  ``segment_ids`` number the
documents of a row from 1; ``0`` is padding.  The target of position ``i`` is the token at ``i + 1`` of
the same row, and position ``i`` counts in the loss only if it is not padding and position ``i + 1``
belongs to the same document: no loss is taken across a document boundary or into padding.

Shapes: B batch, L length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_targets(tokens_BxL: jax.Array, segment_ids_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets (tokens shifted left by one) and the 0/1 float mask of positions that count."""
    targets_BxL = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros_like(tokens_BxL[:, :1])], axis=1)
    next_segment_BxL = jnp.concatenate([segment_ids_BxL[:, 1:], jnp.zeros_like(segment_ids_BxL[:, :1])], axis=1)
    mask_BxL = (segment_ids_BxL != 0) & (next_segment_BxL == segment_ids_BxL)
    return targets_BxL, mask_BxL.astype(jnp.float32)


def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """-log p(target) per position, computed in float32 with a stable log-sum-exp."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return log_z_BxL - target_logit_BxL


def masked_cross_entropy_sum(
    logits_BxLxV: jax.Array, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token cross-entropy (nats) over the positions that count, and how many there are.

    Returning the sum (not the mean) lets gradient accumulation divide once by the token count of the
    whole global batch, so the result does not depend on how the batch was split into micro-batches.
    """
    targets_BxL, mask_BxL = next_token_targets(tokens_BxL, segment_ids_BxL)
    nll_BxL = token_cross_entropy(logits_BxLxV, targets_BxL)
    return jnp.sum(nll_BxL * mask_BxL), jnp.sum(mask_BxL)


def count_loss_tokens(segment_ids_BxL: jax.Array) -> jax.Array:
    """How many positions of a batch count in the loss (the same rule as :func:`next_token_targets`)."""
    next_segment_BxL = jnp.concatenate([segment_ids_BxL[:, 1:], jnp.zeros_like(segment_ids_BxL[:, :1])], axis=1)
    return jnp.sum((segment_ids_BxL != 0) & (next_segment_BxL == segment_ids_BxL)).astype(jnp.float32)
