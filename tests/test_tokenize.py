"""indicfm.data.tokenize.BatchEncoder: the word cache gives exactly SentencePiece's ids.

The reference is always ``SentencePieceProcessor.encode(text, add_bos=True, add_eos=True)`` called
per document; texts are the shipped sample in every language plus hand-made whitespace edge cases.
"""

from __future__ import annotations

import itertools
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm

from indicfm.data import tokenize
from indicfm.data.testing import train_tiny_tokenizer
from indicfm.data.tokenize import BatchEncoder, word_cacheable

EDGE_CASES = [
    "a", " a", "a ", "  a  b  ", "a\tb c", " ", "   ", "▁", "a ▁b", "a▁b ▁", "▁▁ ▁", "x" * 300,
    "12345 678", "emoji 😀 here", "ऋषि ज़रा  क़िला", "বাংলা\u200cলিপি ক্‍ষ", "ഞാൻ\u200d മലയാളം", "x\x00y z",
    "line one\nline two", "\u00a0nbsp\u00a0", "a  \x00  b",
]


def _reference(sp, texts):
    ids = [sp.encode(t, add_bos=True, add_eos=True) for t in texts]
    return np.fromiter(itertools.chain.from_iterable(ids), np.int32), np.array([len(x) for x in ids])


def _corpus(sample_train_dir) -> list[str]:
    lines = []
    for path in sorted(sample_train_dir.glob("*.txt")):
        lines += [unicodedata.normalize("NFC", x) for x in path.read_text(encoding="utf-8").splitlines()[:150]]
    return [x for x in lines if x]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, sample_train_dir):
    """An indicfm-style BPE model (cacheable); a unigram one with the same normaliser (not cacheable:
    SentencePiece sums a document's path scores in float32, see the module docstring); and
    SentencePiece's defaults (nmt_nfkc, squashed spaces: not cacheable)."""
    tmp = tmp_path_factory.mktemp("tok")
    bpe = train_tiny_tokenizer(sample_train_dir, tmp / "bpe", vocab_size=800)
    files = sorted(str(p) for p in sample_train_dir.glob("*.txt"))
    common = dict(input=files, vocab_size=800, byte_fallback=True, character_coverage=0.98, bos_id=2, eos_id=3,
                  pad_id=0, unk_id=1, num_threads=1, minloglevel=2)
    spm.SentencePieceTrainer.train(model_prefix=str(tmp / "uni"), model_type="unigram",
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, **common)
    spm.SentencePieceTrainer.train(model_prefix=str(tmp / "nfkc"), model_type="bpe", **common)
    return {name: spm.SentencePieceProcessor(model_file=str(tmp / f"{name}.model")) for name in ("uni", "nfkc")} | {
        "bpe": spm.SentencePieceProcessor(model_file=str(bpe))}


def test_which_models_use_the_cache(tokenizers):
    assert word_cacheable(tokenizers["bpe"].serialized_model_proto())
    assert not word_cacheable(tokenizers["uni"].serialized_model_proto())
    assert not word_cacheable(tokenizers["nfkc"].serialized_model_proto())


@pytest.mark.parametrize("name", ["bpe", "uni", "nfkc"])
def test_ids_equal_sentencepiece_batch_after_batch(tokenizers, sample_train_dir, name):
    sp = tokenizers[name]
    texts = _corpus(sample_train_dir)
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    encoder = BatchEncoder(sp)
    batches = [texts[i : i + 97] for i in range(0, len(texts), 97)] + [EDGE_CASES, texts[:50] + EDGE_CASES[:5]]
    batches += [[t] for t in EDGE_CASES]  # each alone too
    for batch in batches:
        flat, lengths = encoder.encode(batch)
        expected_flat, expected_lengths = _reference(sp, batch)
        np.testing.assert_array_equal(lengths, expected_lengths)
        np.testing.assert_array_equal(flat, expected_flat)
    assert encoder.encode([])[0].size == 0


@pytest.mark.parametrize("name", ["bpe", "uni"])
def test_long_documents(tokenizers, sample_train_dir, name):
    """Documents of thousands of pieces: far into a document SentencePiece's running float32 path
    score is large (what rules Unigram out); BPE's merges must still match word by word."""
    sp = tokenizers[name]
    lines = _corpus(sample_train_dir)
    docs = [" ".join(lines[i : i + 150]) for i in range(0, len(lines), 150)]
    flat, lengths = BatchEncoder(sp).encode(docs)
    expected = _reference(sp, docs)
    assert expected[1].min() > 2000
    np.testing.assert_array_equal(lengths, expected[1])
    np.testing.assert_array_equal(flat, expected[0])


def test_why_unigram_is_not_cached():
    """SentencePiece's Unigram sums a document's path scores in float32: far into a document a
    near tie inside a word rounds the other way, so "ab" is split differently alone and after 30
    words.  (A model built by hand; found by review on a trained one.)  The encoder must then fall
    back to SentencePiece itself."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", True, False, True
    kind = pb.ModelProto.SentencePiece
    for piece, score, type_ in [("<unk>", 0, kind.UNKNOWN), ("<s>", 0, kind.CONTROL), ("</s>", 0, kind.CONTROL),
                                ("▁", -2000, kind.NORMAL), ("a", -5, kind.NORMAL), ("b", -1.5, kind.NORMAL),
                                ("c", -2000, kind.NORMAL), ("▁a", -1.5, kind.NORMAL), ("▁ab", -3.0001, kind.NORMAL),
                                ("▁c", -1000, kind.NORMAL)]:
        added = model.pieces.add()
        added.piece, added.score, added.type = piece, score, type_
    sp = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    alone, late = sp.encode("ab", out_type=str), sp.encode("c " * 30 + "ab", out_type=str)[-len(sp.encode("ab")):]
    assert alone == ["▁a", "b"] and late != alone  # the premise: per-word splitting would be wrong here
    encoder = BatchEncoder(sp)
    assert not encoder.uses_word_cache
    doc = "c " * 30 + "ab"
    np.testing.assert_array_equal(encoder.encode([doc, "ab"])[0], _reference(sp, [doc, "ab"])[0])


def test_empty_documents_and_a_restarted_cache(tokenizers, sample_train_dir, monkeypatch):
    """An empty document (no ids at all in SentencePiece, not a lone "▁") and a cache that fills up
    and starts again give the same ids."""
    sp = tokenizers["bpe"]
    monkeypatch.setattr(tokenize, "MAX_WORDS", 300)
    encoder = BatchEncoder(sp)
    texts = _corpus(sample_train_dir)[:400]
    for lo in range(0, len(texts), 40):
        batch = texts[lo : lo + 40] + ([""] if lo % 80 == 0 else [])
        flat, lengths = encoder.encode(batch)
        expected = _reference(sp, batch)
        np.testing.assert_array_equal(flat, expected[0])
        np.testing.assert_array_equal(lengths, expected[1])
        assert encoder._words <= 300


def test_a_cache_too_small_for_one_batch_falls_back(tokenizers, sample_train_dir, monkeypatch):
    sp = tokenizers["bpe"]
    monkeypatch.setattr(tokenize, "MAX_WORDS", 2)  # the two pseudo-words fill it
    texts = _corpus(sample_train_dir)[:50]
    flat, lengths = BatchEncoder(sp).encode(texts)
    np.testing.assert_array_equal(flat, _reference(sp, texts)[0])


def test_hash_collisions_never_give_wrong_ids(tokenizers, sample_train_dir, monkeypatch):
    """With the first hash cut to 6 bits (collisions everywhere), batches fall back or are vouched
    for by the second hash: the ids stay exact."""
    real = tokenize._word_hashes

    def weak(points, starts, ends):
        h1, h2 = real(points, starts, ends)
        return h1 & np.uint64(63), h2

    monkeypatch.setattr(tokenize, "_word_hashes", weak)
    sp = tokenizers["bpe"]
    encoder = BatchEncoder(sp)
    texts = _corpus(sample_train_dir)[:300]
    for lo in range(0, len(texts), 30):
        flat, lengths = encoder.encode(texts[lo : lo + 30])
        expected = _reference(sp, texts[lo : lo + 30])
        np.testing.assert_array_equal(flat, expected[0])
        np.testing.assert_array_equal(lengths, expected[1])


def test_the_cache_is_used(tokenizers, sample_train_dir, monkeypatch):
    """Words seen before are not encoded again (what makes it fast)."""
    sp = tokenizers["bpe"]
    encoder = BatchEncoder(sp)
    texts = _corpus(sample_train_dir)[:200]
    encoder.encode(texts)
    calls = []
    monkeypatch.setattr(encoder, "_encode_new_words", lambda words: calls.append(words))
    flat, _ = encoder.encode(texts[::-1])
    assert not calls
    np.testing.assert_array_equal(flat, _reference(sp, texts[::-1])[0])
