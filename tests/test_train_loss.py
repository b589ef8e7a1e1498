"""Masked next-token cross-entropy: the mask rule on a hand-made packed row, and the values against
a float64 NumPy log-softmax."""

import jax.numpy as jnp
import numpy as np

from indicfm.train.loss import count_loss_tokens, masked_cross_entropy_sum, next_token_targets


def test_targets_and_mask_respect_documents_and_padding():
    tokens = np.array([[10, 11, 12, 20, 21, 0, 0]], np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 0, 0]], np.int32)
    targets, mask = next_token_targets(jnp.asarray(tokens), jnp.asarray(segments))
    assert np.asarray(targets).tolist() == [[11, 12, 20, 21, 0, 0, 0]]
    # 10→11, 11→12 count; 12→20 crosses documents; 20→21 counts; 21→pad and padding do not
    assert np.asarray(mask).tolist() == [[1, 1, 0, 1, 0, 0, 0]]
    assert float(count_loss_tokens(jnp.asarray(segments))) == 3.0


def test_cross_entropy_sum_matches_numpy_reference():
    rng = np.random.default_rng(0)
    B, L, V = 2, 6, 11
    logits = rng.normal(size=(B, L, V)).astype(np.float32) * 3
    tokens = rng.integers(0, V, size=(B, L)).astype(np.int32)
    segments = np.array([[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]], np.int32)
    total, count = masked_cross_entropy_sum(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(segments))

    expected, n = 0.0, 0
    for b in range(B):
        for i in range(L - 1):
            if segments[b, i] != 0 and segments[b, i + 1] == segments[b, i]:
                row = logits[b, i].astype(np.float64)
                log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                expected += log_z - row[tokens[b, i + 1]]
                n += 1
    assert int(count) == n == 6
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
