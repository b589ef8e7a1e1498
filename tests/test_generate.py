"""KV-cache generation: the cached path must reproduce the model's own full forward pass.

Reference = ``Transformer.__call__`` on the whole sequence so far, recomputed for every new token
(right-padded to one fixed length so it compiles once; causal attention makes the padding
invisible to earlier positions).  Tiny random float32 models, so ties between logits are unlikely.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from indicfm.inference.decode import inference_config
from indicfm.inference.generate import generate_ids, left_pad
from indicfm.inference.sampling import sample_next, top_p_filter
from indicfm.model.config import ModelConfig
from indicfm.model.layout import with_layout
from indicfm.model.transformer import Transformer

from helpers import random_model

TINY = dict(
    vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48,
    num_experts=4, top_k=2, d_expert=16, num_shared_experts=1, first_dense_layers=1,
    compute_dtype="float32", param_dtype="float32", tie_embeddings=False, max_seq_len=64,
    attention_impl="reference",
)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]]
NEW_TOKENS = 10
REF_LEN = 24  # >= longest prompt + NEW_TOKENS


@pytest.fixture(scope="module")
def model() -> Transformer:
    return random_model(inference_config(ModelConfig(**TINY)), seed=3)


@pytest.fixture(scope="module")
def full_forward(model):
    return full_forward_of(model)


def full_forward_of(model: Transformer):
    """Logits of the model's own forward pass on one right-padded row of REF_LEN tokens."""

    @nnx.jit
    def run(m, tokens_1xL, segment_1xL):
        positions = jnp.arange(REF_LEN)[None]
        return m(tokens_1xL, segment_1xL, positions)[0]

    def logits(sequence: list[int]) -> np.ndarray:
        tokens = np.zeros((1, REF_LEN), np.int32)
        tokens[0, : len(sequence)] = sequence
        segment = (np.arange(REF_LEN) < len(sequence)).astype(np.int32)[None]
        return np.asarray(run(model, jnp.asarray(tokens), jnp.asarray(segment)))[0, : len(sequence)]

    return logits


def greedy_by_recomputation(full_forward, prompt: list[int], steps: int, eos_id: int, pad_id: int = 0) -> list[int]:
    sequence = list(prompt)
    for _ in range(steps):
        last = full_forward(sequence)[-1].copy()
        last[pad_id] = -np.inf  # generation never picks padding
        token = int(np.argmax(last))
        sequence.append(token)
        if token == eos_id:
            break
    return sequence[len(prompt):]


def test_greedy_with_kv_cache_equals_full_recomputation(model, full_forward):
    results = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=-1)
    for prompt, result in zip(PROMPTS, results):
        expected = greedy_by_recomputation(full_forward, prompt, NEW_TOKENS, eos_id=-1)
        assert result.token_ids == expected
        assert result.finish_reason == "length"
    assert len({tuple(r.token_ids) for r in results}) > 1  # a degenerate model would prove little


def test_generation_stops_at_eos(model, full_forward):
    """Declare the 4th greedy token of row 0 to be EOS: each row must stop right at its first
    occurrence of that token (or run to the limit without it)."""
    free_runs = [greedy_by_recomputation(full_forward, p, NEW_TOKENS, eos_id=-1) for p in PROMPTS]
    eos = free_runs[0][3]
    results = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=eos)
    for free_run, result in zip(free_runs, results):
        if eos in free_run:
            assert result.token_ids == free_run[: free_run.index(eos)]
            assert result.finish_reason == "eos"
        else:
            assert result.token_ids == free_run and result.finish_reason == "length"
    assert results[0].finish_reason == "eos" and len(results[0].token_ids) <= 3


@pytest.fixture(scope="module")
def scanned_model() -> Transformer:
    """Three blocks, the two MoE ones stacked and scanned (model.scan_layers)."""
    cfg = inference_config(ModelConfig(**{**TINY, "num_layers": 3}))
    return with_layout(random_model(cfg, seed=4), scan_layers=True)


def test_greedy_with_a_scanned_model_equals_full_recomputation(scanned_model):
    assert scanned_model.scanned_blocks is not None
    results = generate_ids(scanned_model, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=-1)
    full_forward = full_forward_of(scanned_model)
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == greedy_by_recomputation(full_forward, prompt, NEW_TOKENS, eos_id=-1)
    assert len({tuple(r.token_ids) for r in results}) > 1


def test_greedy_with_a_scanned_model_equals_the_unrolled_models_recomputation():
    """Reference = the unrolled model the scanned one was converted from, recomputed in full."""
    cfg = inference_config(ModelConfig(**{**TINY, "num_layers": 3}))
    unrolled = random_model(cfg, seed=4)
    scanned = with_layout(unrolled, scan_layers=True)
    assert scanned.scanned_blocks is not None and unrolled.scanned_blocks is None
    results = generate_ids(scanned, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=-1)
    full_forward = full_forward_of(unrolled)
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == greedy_by_recomputation(full_forward, prompt, NEW_TOKENS, eos_id=-1)


@pytest.mark.parametrize("layout", ["unrolled", pytest.param("scanned", marks=pytest.mark.slow)])
def test_cached_logits_match_full_forward(layout, request):
    """Prefill 5 tokens, then feed the rest one at a time: every logit row equals the full pass."""
    model = request.getfixturevalue("model" if layout == "unrolled" else "scanned_model")
    sequence = [7, 3, 19, 33, 2, 50, 8, 8, 21, 14, 60, 1]
    expected = full_forward_of(model)(sequence)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state_, tokens, segment, positions, cache, start):
        logits, _, cache = nnx.merge(graphdef, state_)(tokens, segment, positions, cache=cache, start_slot=start)
        return logits, cache

    cache = model.init_cache(1, len(sequence))
    prefill = 5
    ones = jnp.ones((1, prefill), jnp.int32)
    logits, cache = step(state, jnp.asarray([sequence[:prefill]]), ones, jnp.arange(prefill)[None], cache, 0)
    got = [np.asarray(logits[0])]
    for i in range(prefill, len(sequence)):
        logits, cache = step(state, jnp.asarray([[sequence[i]]]), jnp.ones((1, 1), jnp.int32), jnp.asarray([[i]]), cache, i)
        got.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.concatenate(got), expected, atol=2e-5, rtol=1e-5)


def test_left_padding_layout():
    tokens, segment, positions = left_pad([[4, 5, 6], [7]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[4, 5, 6], [0, 0, 7]])
    np.testing.assert_array_equal(segment, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])
    tokens, segment, _ = left_pad([[4, 5, 6]], pad_id=0, multiple_of=4)
    np.testing.assert_array_equal(tokens, [[0, 4, 5, 6]])
    np.testing.assert_array_equal(segment, [[0, 1, 1, 1]])


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([[0.5, 0.05, 0.3, 0.15]], np.float32)
    logits = jnp.log(jnp.asarray(probs))
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 2}
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept, [[True, False, True, False]])
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.1)))  # at least the most likely token
    np.testing.assert_array_equal(kept, [[True, False, False, False]])
    assert np.isfinite(np.asarray(top_p_filter(logits, 1.0))).all()


def test_sampling_draws_from_the_nucleus_with_the_right_frequencies():
    probs = np.array([0.5, 0.05, 0.3, 0.15], np.float32)
    logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1))))
    draws = np.asarray(sample_next(logits, jax.random.key(0), temperature=1.0, top_p=0.7))
    assert set(np.unique(draws)) <= {0, 2}
    share_of_0 = np.mean(draws == 0)
    assert abs(share_of_0 - 0.5 / 0.8) < 0.03  # renormalised over the nucleus {0, 2}
    greedy = np.asarray(sample_next(logits[:2], jax.random.key(0), temperature=0.0, top_p=0.7))
    np.testing.assert_array_equal(greedy, [0, 0])


def test_sampled_generation_is_reproducible_per_seed(model):
    kwargs = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, eos_id=-1)
    first = generate_ids(model, PROMPTS[:2], seed=11, **kwargs)
    again = generate_ids(model, PROMPTS[:2], seed=11, **kwargs)
    other = generate_ids(model, PROMPTS[:2], seed=12, **kwargs)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    assert all(0 < t < TINY["vocab_size"] for r in first for t in r.token_ids)  # never padding


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match="empty"):
        generate_ids(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_ids(model, [[4] * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match="top_p"):
        generate_ids(model, [[4]], max_new_tokens=2, top_p=0.0)
