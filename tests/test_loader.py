"""TokenLoader: step-pure batches, disjoint host slices, resume, mixing weights.

The cache here is synthetic: row r of language number l holds tokens ``l * 100_000 + r`` in column 0,
so every batch row names the cache row it came from and checks need no loader internals.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from indicfm.data.cache import FORMAT_VERSION, METADATA, CacheError, LanguageWriter, write_json_atomic
from indicfm.data.loader import TokenLoader, temperature_weights
from indicfm.data.pack import PackedRows

SEQ = 16
ROWS = {"hin_Deva": 50, "tam_Taml": 20, "snd_Arab": 7}
LANG_ID = {lang: i for i, lang in enumerate(sorted(ROWS))}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loader") / "cache"
    languages = {}
    for lang, n in ROWS.items():
        tokens = np.arange(n * SEQ, dtype=np.int32).reshape(n, SEQ) % 97 + 10
        tokens[:, 0] = LANG_ID[lang] * 100_000 + np.arange(n)
        seg = np.ones((n, SEQ), np.int32)
        pos = np.tile(np.arange(SEQ, dtype=np.int32), (n, 1))
        writer = LanguageWriter(out / "rows" / lang, SEQ)
        writer.append(PackedRows(tokens[:30], seg[:30], pos[:30]))
        writer.append(PackedRows(tokens[30:], seg[30:], pos[30:]))  # two appends, like prepare
        writer.close()
        languages[lang] = {"rows": n, "tokens": n * SEQ, "documents": n, "split_documents": 0}
    write_json_atomic(out / METADATA, {
        "format_version": FORMAT_VERSION, "seq_len": SEQ, "tokenizer_sha256": "ab" * 32, "languages": languages,
    })
    return out


def _ids(batch) -> list[tuple[int, int]]:
    """(language number, row) of every batch row, read from the planted column 0."""
    return [divmod(int(t), 100_000) for t in batch["tokens"][:, 0]]


def test_batch_shapes_dtypes_and_content(cache):
    loader = TokenLoader(cache, 8, seed=0, process_index=0, process_count=1)
    batch = loader.batch(3)
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    for arr in batch.values():
        assert arr.shape == (8, SEQ) and arr.dtype == np.int32
    for r, (lang_no, row) in enumerate(_ids(batch)):
        expected = (np.arange(row * SEQ, (row + 1) * SEQ) % 97 + 10)[1:]
        np.testing.assert_array_equal(batch["tokens"][r, 1:], expected)
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(SEQ), (8, 1)))
    assert loader.seq_len == SEQ and loader.tokenizer_sha256 == "ab" * 32


def test_same_seed_and_step_give_the_same_batch(cache):
    a = TokenLoader(cache, 8, seed=5, process_index=0, process_count=1)
    b = TokenLoader(cache, 8, seed=5, process_index=0, process_count=1)
    for step in (0, 1, 17, 1000):
        for name in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(a.batch(step)[name], b.batch(step)[name])
    assert _ids(a.batch(0)) != _ids(a.batch(1))
    c = TokenLoader(cache, 8, seed=6, process_index=0, process_count=1)
    assert [_ids(a.batch(s)) for s in range(4)] != [_ids(c.batch(s)) for s in range(4)]


def test_two_hosts_read_disjoint_rows_whose_union_is_the_global_batch(cache):
    whole = TokenLoader(cache, 8, seed=1, process_index=0, process_count=1)
    hosts = [TokenLoader(cache, 8, seed=1, process_index=i, process_count=2) for i in range(2)]
    distinct_steps = 0
    for step in range(12):
        parts = [h.batch(step) for h in hosts]
        assert parts[0]["tokens"].shape == (4, SEQ)
        ids0, ids1 = _ids(parts[0]), _ids(parts[1])
        assert ids0 + ids1 == _ids(whole.batch(step))
        if len(set(ids0 + ids1)) == 8:  # (a row may repeat in a step where its language's epoch ends)
            distinct_steps += 1
            assert not set(ids0) & set(ids1)
        np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), whole.batch(step)["tokens"])
    assert distinct_steps >= 9


def test_rows_within_one_step_are_distinct_when_no_epoch_wraps(cache):
    loader = TokenLoader(cache, 6, seed=2, process_index=0, process_count=1)
    ids = _ids(loader.batch(0))
    assert len(set(ids)) == len(ids)


def test_resumed_stream_equals_uninterrupted_stream(cache):
    straight = TokenLoader(cache, 4, seed=3, process_index=0, process_count=1, prefetch=3)
    stream = iter(straight)
    expected = [next(stream) for _ in range(9)]
    first = TokenLoader(cache, 4, seed=3, process_index=0, process_count=1)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # small and JSON-able, stored in checkpoints
    assert state["step"] == 4 and state["seed"] == 3
    resumed = TokenLoader(cache, 4, seed=3, process_index=0, process_count=1)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for want in expected[4:]:
        got = next(it2)
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    # Iteration equals explicit batch(step) calls.
    for step, want in enumerate(expected):
        np.testing.assert_array_equal(straight.batch(step)["tokens"], want["tokens"])
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(cache, 4, seed=4, process_index=0, process_count=1).load_state_dict(state)


def test_mixing_weights_are_met_within_one_row(cache):
    weights = {"hin_Deva": 0.5, "tam_Taml": 0.3, "snd_Arab": 0.2}
    loader = TokenLoader(cache, 10, seed=0, language_weights=weights, process_index=0, process_count=1)
    counts = Counter()
    steps = 60
    for step in range(steps):
        counts.update(lang for lang, _ in _ids(loader.batch(step)))
    for lang, w in weights.items():
        assert abs(counts[LANG_ID[lang]] - steps * 10 * w) <= 1, (lang, counts)


def test_each_language_epoch_visits_every_row_once(cache):
    loader = TokenLoader(cache, 7, seed=9, process_index=0, process_count=1)
    seen = {lang_no: [] for lang_no in LANG_ID.values()}
    for step in range(30):  # 210 rows: > 2 epochs of every language
        for lang_no, row in _ids(loader.batch(step)):
            seen[lang_no].append(row)
    for lang, n in ROWS.items():
        rows = seen[LANG_ID[lang]]
        assert sorted(rows[:n]) == list(range(n)), lang
        assert sorted(rows[n : 2 * n]) == list(range(n)), lang
        assert rows[:n] != rows[n : 2 * n]  # a fresh permutation each epoch


def test_small_weight_language_still_served(cache):
    loader = TokenLoader(cache, 4, seed=0, language_weights={"hin_Deva": 0.95, "snd_Arab": 0.05},
                         process_index=0, process_count=1)
    langs = Counter(lang for s in range(100) for lang, _ in _ids(loader.batch(s)))
    assert langs[LANG_ID["snd_Arab"]] == 20 and LANG_ID["tam_Taml"] not in langs


def test_bad_arguments_name_the_problem(cache, tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        TokenLoader(cache, 7, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="kan_Knda"):
        TokenLoader(cache, 8, seed=0, language_weights={"kan_Knda": 1.0}, process_index=0, process_count=1)
    (tmp_path / ".prepare_state").mkdir()
    with pytest.raises(CacheError, match="incomplete"):
        TokenLoader(tmp_path, 8, seed=0, process_index=0, process_count=1)


def test_temperature_weights():
    w = temperature_weights({"a": 100, "b": 1}, temperature=2.0)
    assert w["a"] == pytest.approx(10 / 11) and w["b"] == pytest.approx(1 / 11)


def test_default_process_index_from_jax(cache):
    import jax

    loader = TokenLoader(cache, 8, seed=0)
    assert loader.process_count == jax.process_count() == 1 and loader.batch(0)["tokens"].shape == (8, SEQ)
