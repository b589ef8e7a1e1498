"""Packing: rows of seq_len, per-row segment numbering, positions continue across rows."""

import numpy as np

from indicfm.data.pack import Packer


def test_pack_by_hand():
    p = Packer(seq_len=4, pad_id=0)
    p.add(np.array([11, 12, 13, 3]))  # doc A (EOS = 3)
    p.add(np.array([21, 3]))  # doc B
    p.add(np.array([31, 32, 33, 34, 35, 3]))  # doc C, crosses two row boundaries
    rows = p.finish()
    np.testing.assert_array_equal(rows.tokens, [[11, 12, 13, 3], [21, 3, 31, 32], [33, 34, 35, 3]])
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 1, 1]])
    np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 3], [0, 1, 0, 1], [2, 3, 4, 5]])
    assert p.split_documents == 1


def test_last_row_padded_and_add_many_equals_add():
    docs = [np.arange(n) + 100 * n for n in (3, 5, 1, 7, 2)]
    a = Packer(seq_len=5)
    for d in docs:
        a.add(d)
    b = Packer(seq_len=5)
    b.add_many(np.concatenate(docs[:2]), [3, 5])
    b.add_many(np.concatenate(docs[2:]), [1, 7, 2])
    ra, rb = a.finish(), b.finish()
    for name in ("tokens", "segment_ids", "positions"):
        np.testing.assert_array_equal(getattr(ra, name), getattr(rb, name))
    assert ra.tokens.shape == (4, 5)  # 18 tokens -> 3 full rows + 3 tokens padded
    # Last row: the end of the 7-token doc (cut), then the 2-token doc, then padding.
    np.testing.assert_array_equal(ra.segment_ids[-1], [1, 2, 2, 0, 0])
    np.testing.assert_array_equal(ra.positions[-1], [6, 0, 1, 0, 0])
    assert (ra.segment_ids[-1, 3:] == 0).all() and (ra.tokens[-1, 3:] == 0).all()


def test_state_round_trip_continues_identically():
    docs = [np.arange(n) + 7 for n in (6, 9, 4, 11, 3)]
    straight = Packer(seq_len=8)
    for d in docs:
        straight.add(d)
    expected = straight.finish()
    first = Packer(seq_len=8)
    for d in docs[:3]:
        first.add(d)
    early = first.pop_full_rows()
    resumed = Packer(seq_len=8)
    resumed.load_state(first.state())
    for d in docs[3:]:
        resumed.add(d)
    late = resumed.finish()
    np.testing.assert_array_equal(np.concatenate([early.tokens, late.tokens]), expected.tokens)
    np.testing.assert_array_equal(np.concatenate([early.positions, late.positions]), expected.positions)
    np.testing.assert_array_equal(np.concatenate([early.segment_ids, late.segment_ids]), expected.segment_ids)
