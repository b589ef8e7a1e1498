"""Choosing the next token from logits: greedy, temperature, nucleus (top-p).

Written here rather than taken from a library because it is a dozen lines of ``jax.numpy`` and
the libraries that have it (transformers' logits processors, MaxText's sampler) come with a whole
framework attached.

Shape legend: B batch, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_filter(logits_BxV: jax.Array, top_p: float) -> jax.Array:
    """Keep the smallest set of most-likely tokens whose probabilities sum to at least ``top_p``
    (always at least the most likely one); the others get ``-inf``."""
    if top_p >= 1.0:
        return logits_BxV
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < top_p
    # the smallest logit still kept; ties with it are kept too
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def sample_next(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids ``[B]``: argmax when ``temperature == 0``, else a draw from
    ``softmax(logits / temperature)`` restricted to the top-p nucleus."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature <= 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    scaled_BxV = top_p_filter(logits_BxV / temperature, top_p)
    return jax.random.categorical(key, scaled_BxV, axis=-1).astype(jnp.int32)
