"""Akshara-preserving BPE: merges worked out by hand on tiny text, and piece properties on real text
checked with unicodedata (independent of the module's own rules)."""

import unicodedata

import pytest

from indicfm.tokenizer.akshara_bpe import learn_pieces, may_merge


def test_merges_by_hand():
    # Words: ▁कि ×3, ▁किता ×1.  Clusters कि (4×) and ता (1×) come first (most frequent first), then
    # BPE: (▁, कि) occurs 4× → ▁कि; then (▁कि, ता) 1× → ▁किता; nothing is left to merge.
    pieces, chars = learn_pieces(["कि कि कि", "किता"], budget=10, min_cluster_count=1)
    assert pieces == ["कि", "ता", "▁कि", "▁किता"]
    assert chars == set("▁किता")


def test_cluster_prefixes_come_before_the_cluster():
    # क्ष is one cluster (conjunct); SentencePiece needs क् to build it.
    pieces, _ = learn_pieces(["क्ष क्ष"], budget=10, min_cluster_count=1)
    assert pieces[:2] == ["क्", "क्ष"]
    assert pieces[2] == "▁क्ष"


def test_rare_cluster_stays_loose_and_never_merges():
    pieces, _ = learn_pieces(["क्ष क्ष"], budget=10, min_cluster_count=3)
    assert pieces == []


def test_stage_one_takes_at_most_half_the_budget():
    pieces, _ = learn_pieces(["कि कु के को"], budget=4, min_cluster_count=1)
    assert pieces[:2] == ["कि", "कु"] and len(pieces) <= 4


@pytest.mark.parametrize(
    "left,right,ok",
    [("▁", "क", True), ("क", "a", False), ("क", "।", False), ("▁", "1", False), ("1", "2", False), ("ab", ",", False), ("▁", ",", True)],
)
def test_no_mixing_scripts_digits_or_punctuation(left, right, ok):
    assert may_merge(left, right, 16) is ok


def test_real_text_pieces_never_start_inside_an_akshara(sample_train_dir):
    text = []
    for lang in ("mal_Mlym", "ben_Beng", "hin_Deva", "kan_Knda"):
        text += [unicodedata.normalize("NFC", line) for line in (sample_train_dir / f"{lang}.txt").read_text(encoding="utf-8").splitlines()]
    pieces, _ = learn_pieces(text, budget=3000, min_cluster_count=2)
    assert len(pieces) == 3000
    for piece in pieces:
        body = piece.lstrip("\u2581")
        first = body[0]
        assert unicodedata.category(first)[0] != "M" and first not in "\u200c\u200d", piece
        assert not (len(piece) > 1 and any(unicodedata.category(c) == "Nd" for c in piece)), piece
