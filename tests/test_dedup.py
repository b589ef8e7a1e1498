"""MinHash estimates against exact Jaccard of the shingle sets; first occurrence wins."""

import numpy as np
import pytest

from indicfm.data.config import DedupConfig
from indicfm.data.dedup import (
    FINGERPRINT_BITS, DuplicateIndex, exact_key, fingerprints, lsh_bands, matches_needed, minhasher,
)


def _shingles(text: str, n: int = 5) -> set[str]:
    t = " ".join(text.split())
    return {t[i : i + n] for i in range(max(1, len(t) - n + 1))}


def _jaccard(a: str, b: str) -> float:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_exact_key_ignores_whitespace_only():
    assert exact_key("a  b\tc ") == exact_key("a b c")
    assert exact_key("a b c") != exact_key("a b d")


def test_minhash_estimates_match_exact_jaccard(sample_train_dir):
    lines = [l for l in (sample_train_dir / "hin_Deva.txt").read_text().splitlines() if len(l) > 80][:120]
    rng = np.random.default_rng(0)
    pairs = []
    for line in lines:
        words = line.split()
        for _ in range(int(rng.integers(0, 5))):
            words[int(rng.integers(len(words)))] = words[int(rng.integers(len(words)))]
        pairs.append((line, " ".join(words)))
    mh = minhasher(DedupConfig())
    sigs = mh.signatures([x for pair in pairs for x in pair])
    est = (sigs[0::2] == sigs[1::2]).mean(axis=1)
    exact = np.array([_jaccard(a, b) for a, b in pairs])
    err = est - exact
    # 128 permutations: standard error sqrt(J(1-J)/128) <= 0.044.
    assert abs(err.mean()) < 0.01 and np.abs(err).max() < 0.2
    # Batch computation equals one-at-a-time computation.
    np.testing.assert_array_equal(sigs[:6], np.stack([mh.signatures([t])[0] for a, b in pairs[:3] for t in (a, b)]))
    # What the index keeps, 8-bit fingerprints, estimates as well once chance agreements
    # (probability 2^-8 per position) are corrected for -- including for unrelated documents.
    prints = fingerprints(sigs)
    chance = 2.0**-FINGERPRINT_BITS
    est_b = ((prints[0::2] == prints[1::2]).mean(axis=1) - chance) / (1 - chance)
    err_b = est_b - exact
    assert abs(err_b.mean()) < 0.01 and np.abs(err_b).max() < 0.2
    unrelated = (prints[0::2] == np.roll(prints[1::2], 1, axis=0)).mean(axis=1)
    exact_unrelated = np.array([_jaccard(a, b) for (a, _), (_, b) in zip(pairs, pairs[-1:] + pairs[:-1])])
    assert exact_unrelated.mean() < 0.05  # mostly unrelated sentences
    assert abs((unrelated.mean() - chance) / (1 - chance) - exact_unrelated.mean()) < 0.01
    # the index's threshold in matches is the same correction, solved for J = threshold
    assert matches_needed(0.8, 128) == pytest.approx(128 * (0.8 + 0.2 * chance))


def test_short_texts_and_word_shingles():
    mh = minhasher(DedupConfig())
    s = mh.signatures(["ab", "ab", "abc"])
    assert (s[0] == s[1]).all() and not (s[0] == s[2]).all()
    words = minhasher(DedupConfig(shingle_unit="word"))
    w = words.signatures(["one two three four five six seven", "one two three four five six seven"])
    assert (w[0] == w[1]).all()


def test_lsh_bands_like_datasketch():
    # datasketch.MinHashLSH(threshold=0.8, num_perm=128) picks b=9, r=13 with the same criterion.
    assert lsh_bands(0.8, 128) == (9, 13)


def test_index_first_occurrence_wins_and_survives_save_load(tmp_path, sample_train_dir):
    lines = [l for l in (sample_train_dir / "tam_Taml.txt").read_text().splitlines() if len(l) > 200][:50]
    near = lines[3][:-1] + "!"
    assert _jaccard(lines[3], near) > 0.95
    cfg = DedupConfig()
    mh = minhasher(cfg)
    index = DuplicateIndex(cfg)
    docs = lines + [lines[5], near]
    sigs = mh.signatures(docs)
    half = len(lines) // 2
    reasons = [index.check_and_add(exact_key(d), s) for d, s in zip(docs[:half], sigs[:half])]
    index.save_increment(tmp_path, 0)
    restored = DuplicateIndex(cfg)
    restored.load(tmp_path, 1)
    reasons += [restored.check_and_add(exact_key(d), s) for d, s in zip(docs[half:], sigs[half:])]
    assert reasons == [None] * len(lines) + ["exact_duplicate", "near_duplicate"]


def test_dissimilar_band_collision_is_not_a_duplicate():
    cfg = DedupConfig()
    index = DuplicateIndex(cfg)
    a = np.arange(128, dtype=np.uint32)
    b = a.copy()
    b[13:] += 1000  # shares band 0 only: estimated Jaccard 13/128
    assert index.check_and_add(b"a" * 16, a) is None
    assert index.check_and_add(b"b" * 16, b) is None


def _reference_verdicts(keys, sigs, cfg) -> list:
    """First-occurrence dedup written plainly, independently of DuplicateIndex: exact keys in a set;
    a near duplicate shares an LSH band with a kept document whose b-bit fingerprint agrees in at
    least ``matches_needed`` positions."""
    from indicfm.data.dedup import band_hashes, fingerprints, matches_needed

    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    need = matches_needed(cfg.threshold, cfg.num_perm)
    all_bands, all_prints = band_hashes(sigs, bands, rows), fingerprints(sigs)
    seen_keys, by_band, kept_prints, out = set(), {}, [], []
    for key, doc_bands, doc_print in zip(keys, all_bands.tolist(), all_prints):
        if key in seen_keys:
            out.append("exact_duplicate")
            continue
        candidates = {d for b in doc_bands for d in by_band.get(b, ())}
        if any(int((kept_prints[d] == doc_print).sum()) >= need for d in candidates):
            out.append("near_duplicate")
            continue
        seen_keys.add(key)
        for b in doc_bands:
            by_band.setdefault(b, []).append(len(kept_prints))
        kept_prints.append(doc_print)
        out.append(None)
    return out


def test_batch_check_equals_a_plain_reference_and_one_by_one(sample_train_dir):
    """The batched index (fast path for documents with no candidate) decides like a plain
    one-document-at-a-time reference and like check_and_add, duplicates inside one batch included."""
    from indicfm.data.dedup import band_hashes

    lines = [l for l in (sample_train_dir / "ben_Beng.txt").read_text().splitlines() if len(l) > 80][:300]

    def edited(line: str, edits: int) -> str:  # `edits` characters replaced, spread over the line
        chars = list(line)
        for k in range(edits):
            chars[(k * 2 + 1) * len(chars) // (2 * edits)] = "৳"
        return "".join(chars)

    # copies edited in 1..6 places: estimated similarities on both sides of the threshold
    docs = lines + [edited(l, 1 + i % 6) for i, l in enumerate(lines[::3])] + lines[::11]
    docs = [docs[i] for i in np.random.default_rng(3).permutation(len(docs))]
    cfg = DedupConfig()
    mh = minhasher(cfg)
    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    sigs = mh.signatures(docs)
    keys = [exact_key(d) for d in docs]
    expected = _reference_verdicts(keys, sigs, cfg)
    one = DuplicateIndex(cfg)
    assert [one.check_and_add(k, s) for k, s in zip(keys, sigs)] == expected
    batched = DuplicateIndex(cfg)
    got = []
    for lo in range(0, len(docs), 64):
        got += batched.check_batch(keys[lo : lo + 64], sigs[lo : lo + 64], band_hashes(sigs[lo : lo + 64], bands, rows))
    assert got == expected
    # and it remembers the same kept documents in the same buckets (later verdicts depend on it):
    # the band keys of every kept document (from the test's own signatures) lead to the same
    # fingerprints in both indexes
    kept = np.array([v is None for v in expected])
    kept_keys = band_hashes(sigs[kept], bands, rows).ravel()

    def remembered(index):
        first = index._table.lookup(kept_keys).tolist()
        return index._exact, {k: sorted(index.fingerprint(d).tobytes() for d in index._table.docs_of(k, f))
                              for k, f in zip(kept_keys.tolist(), first)}

    assert len(one) == len(batched) == kept.sum()
    assert remembered(one) == remembered(batched)
    assert expected.count("near_duplicate") > 10 and expected.count("exact_duplicate") > 10
    # some edited copies are kept: the threshold itself decides here, not only the banding
    assert sum(v is None for d, v in zip(docs, expected) if "৳" in d) > 5


def test_band_table_matches_a_dict():
    """The NumPy band table answers like a dict of lists, through growth, repeated keys (within
    one insert and across inserts) and the key 0 that marks an empty slot."""
    from indicfm.data.band_table import BandTable

    rng = np.random.default_rng(0)
    table = BandTable(capacity=8)  # small: forces several rebuilds
    expected: dict[int, list[int]] = {}
    pool = rng.integers(0, 2**64, size=3000, dtype=np.uint64)
    pool[:2] = [0, 5]
    doc = 0
    for _ in range(40):
        keys = rng.choice(pool, size=int(rng.integers(1, 300)))
        docs = np.arange(doc, doc + len(keys))
        doc += len(keys)
        table.add(keys, docs)
        for k, d in zip(keys.tolist(), docs.tolist()):
            expected.setdefault(k, []).append(d)
    probe = np.concatenate([pool, rng.integers(0, 2**64, size=500, dtype=np.uint64)])
    first = table.lookup(probe)
    for k, f in zip(probe.tolist(), first.tolist()):
        if k in expected:
            assert table.docs_of(k, f) == expected[k]
        else:
            assert f == -1
    assert len(table) == len(expected)
    assert table.lookup(probe.reshape(-1, 7)[:10]).shape == (10, 7)
