"""Bits per byte: with a byte-level stand-in tokenizer and a model that spreads probability evenly
over 256 bytes, every byte costs exactly 8 bits, so bpb must be 8.0 whatever the text or row length."""

import math
import unicodedata

import numpy as np
import pytest

from indicfm.train.evaluate import build_heldout_set, evaluate_bpb, read_heldout_lines

BOS_ID = 2  # the stand-in tokenizer's start id


def byte_encode(text: str) -> list[int]:
    return [4 + b for b in text.encode("utf-8")]


def uniform_byte_model(batch):
    """CE of a uniform distribution over 256 byte tokens at every predicted position (loss mask rule)."""
    seg = batch["segment_ids"]
    predicted = np.sum((seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1]))
    return predicted * math.log(256), float(predicted)


@pytest.mark.parametrize("seq_len", [8, 64])
def test_uniform_byte_model_scores_eight_bits_per_byte(seq_len):
    lines = ["नमस्ते दुनिया", "hello", "ஒரு சிறிய வாக்கியம், கொஞ்சம் நீளமானது"]
    heldout = build_heldout_set("mix_Deva", lines, byte_encode, seq_len, bos_id=BOS_ID)
    assert heldout.num_bytes == sum(len(line.encode("utf-8")) for line in lines)
    assert np.all(heldout.tokens[:, 0] == BOS_ID)
    bpb = evaluate_bpb([heldout], uniform_byte_model, batch_size=4)
    assert bpb["mix_Deva"] == pytest.approx(8.0)
    assert bpb["mean"] == pytest.approx(8.0)


def test_bytes_are_counted_after_nfc_normalisation():
    nfd = unicodedata.normalize("NFD", "é" * 10)  # 20 code points, 30 bytes in NFD; 20 bytes in NFC
    heldout = build_heldout_set("fra_Latn", [nfd], byte_encode, 64, bos_id=BOS_ID)
    assert heldout.num_bytes == 20
    assert heldout.num_tokens == 20


def test_reads_heldout_files_per_language(sample_heldout_dir):
    lines = read_heldout_lines(sample_heldout_dir, max_lines=5, languages=["hin_Deva", "tam_Taml"])
    assert sorted(lines) == ["hin_Deva", "tam_Taml"]
    assert all(len(v) == 5 for v in lines.values())
