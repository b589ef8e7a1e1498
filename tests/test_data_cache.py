"""indicfm.data.cache.LanguageWriter: rows gathered into large writes, none lost, resumable."""

from __future__ import annotations

import numpy as np

from indicfm.data.cache import ARRAYS, LanguageWriter, close_writers, open_language_arrays, read_rows
from indicfm.data.pack import PackedRows

SEQ = 8


def _rows(first: int, count: int) -> PackedRows:
    tokens = np.arange(first * SEQ, (first + count) * SEQ, dtype=np.int32).reshape(count, SEQ)
    return PackedRows(tokens, tokens % 3 + 1, tokens % 5)


def _expected(first: int, count: int) -> dict[str, np.ndarray]:
    """The same rows, built independently of PackedRows: what reading the cache must give."""
    tokens = np.arange(first * SEQ, (first + count) * SEQ).reshape(count, SEQ)
    return {"tokens": tokens, "segment_ids": tokens % 3 + 1, "positions": tokens % 5}


def _assert_rows(out, lang, first, count):
    got = read_rows(out, lang, slice(first, first + count))
    for name, want in _expected(first, count).items():
        np.testing.assert_array_equal(getattr(got, name), want)


def test_small_appends_are_written_in_large_pieces_and_all_arrive(tmp_path):
    writer = LanguageWriter(tmp_path / "rows" / "hin_Deva", SEQ, write_rows=16)
    for first in range(0, 50, 5):
        writer.append(_rows(first, 5))
        assert writer.rows == first + 5
    assert writer._written == 40  # written 20 at a time (once ≥ 16 had gathered); the last 10 wait
    writer.flush()
    _assert_rows(tmp_path, "hin_Deva", 0, 50)


def test_a_resumed_writer_overwrites_rows_past_the_checkpoint_and_trims(tmp_path):
    directory = tmp_path / "rows" / "tam_Taml"
    writer = LanguageWriter(directory, SEQ, write_rows=4)
    writer.append(_rows(0, 45))
    writer.flush()  # as an interrupted run: 45 rows on disk, but its checkpoint said 30
    resumed = LanguageWriter(directory, SEQ, rows=30, write_rows=4)
    resumed.append(_rows(30, 7))
    close_writers([resumed])
    arrays = open_language_arrays(tmp_path, "tam_Taml")
    assert all(arrays[name].shape == (37, SEQ) for name in ARRAYS)
    _assert_rows(tmp_path, "tam_Taml", 0, 37)


def test_closing_several_writers_writes_each_ones_last_rows(tmp_path):
    writers = {lang: LanguageWriter(tmp_path / "rows" / lang, SEQ, write_rows=1024) for lang in ("a", "b")}
    writers["a"].append(_rows(0, 3))
    writers["b"].append(_rows(0, 10))
    writers["b"].append(_rows(10, 2))
    close_writers(list(writers.values()))
    assert open_language_arrays(tmp_path, "a")["tokens"].shape == (3, SEQ)
    _assert_rows(tmp_path, "a", 0, 3)
    _assert_rows(tmp_path, "b", 0, 12)
