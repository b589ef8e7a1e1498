"""Pack scoring requests (context tokens, continuation tokens) into fixed-shape rows.

Why packing: lm-eval's requests are short (a question and one answer choice: tens of tokens) and
many; one request per row would leave most of a row as padding.  Several requests share a row the
way training documents do (``data prepare``): each has its own segment id and positions from 0, so
attention (causal within a segment) keeps them apart and each sees exactly what it would see alone.
Every row has the same length and every batch the same number of rows, so the scoring program
compiles once (Levanter's ``eval_harness.py`` does the same).

A request is laid out as the model's inputs ``(context + continuation)[:-1]`` with the tokens to
predict ``(context + continuation)[1:]`` beside them (``targets``), so it occupies
``len(context) + len(continuation) - 1`` slots and the continuation is scored at its last
``len(continuation)`` slots.  A request longer than a row keeps its last ``row_len`` inputs (the
continuation and as much context as fits), exactly as lm-eval's ``hf`` backend truncates to the
model's length from the left.

Shape legend: R rows per batch, L row length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from indicfm.train.evaluate import fixed_shape_batches

#: how many of the most recently opened rows first-fit looks into (keeps packing linear in the
#: number of requests; sorted longest first, older rows are nearly full anyway)
OPEN_ROWS = 64


@dataclass(frozen=True)
class Span:
    """Where one request lies: row ``row`` (global row number), continuation scored at slots
    ``[first, first + count)`` of the per-slot scores (slot ``i`` scores ``targets[i]``)."""

    row: int
    first: int
    count: int


@dataclass
class PackedRequests:
    """All rows of a set of requests and where each request lies."""

    tokens: np.ndarray  # int32 [N, L]: the model's inputs
    targets: np.ndarray  # int32 [N, L]: the token each slot predicts
    segment_ids: np.ndarray  # int32 [N, L]; 0 = padding
    positions: np.ndarray  # int32 [N, L]
    spans: list[Span]  # one per request, in the order given
    truncated: int  # requests cut to fit a row

    def batches(self, rows: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(first row, batch)`` of ``rows`` rows each; the last batch is padded with empty rows
        (segment 0), so every batch has the same shape and the program never recompiles."""
        arrays = {"tokens": self.tokens, "targets": self.targets, "segment_ids": self.segment_ids,
                  "positions": self.positions}
        return fixed_shape_batches(arrays, rows)


def pack_requests(requests: Sequence[tuple[Sequence[int], Sequence[int]]], row_len: int) -> PackedRequests:
    """Lay ``(context, continuation)`` token lists out in rows of ``row_len`` slots.

    Longest first, each into the first of the recently opened rows with room (first-fit
    decreasing), else a new row.  A context must hold at least one token (the document start
    the caller puts first), since the first continuation token is predicted from the slot before.
    """
    if row_len < 2:
        raise ValueError(f"row_len must be at least 2, got {row_len}")
    sequences: list[list[int]] = []  # the whole request; its inputs are all but the last token
    continuation_lengths: list[int] = []
    truncated = 0
    for index, (context, continuation) in enumerate(requests):
        if len(context) == 0:
            raise ValueError(f"request {index}: empty context (put the start token before the text)")
        sequence = list(context) + list(continuation)
        count = len(continuation)
        if len(sequence) - 1 > row_len:
            truncated += 1
            sequence = sequence[-(row_len + 1):]
            count = min(count, row_len)
        sequences.append(sequence)
        continuation_lengths.append(count)

    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    used: list[int] = []  # slots used per row
    placed: list[tuple[int, int]] = [(0, 0)] * len(sequences)  # (row, offset) per request
    for i in order:
        n = len(sequences[i]) - 1
        for row in range(max(0, len(used) - OPEN_ROWS), len(used)):
            if used[row] + n <= row_len:
                break
        else:
            used.append(0)
            row = len(used) - 1
        placed[i] = (row, used[row])
        used[row] += n

    num_rows = len(used)
    tokens = np.zeros((num_rows, row_len), np.int32)
    targets = np.zeros((num_rows, row_len), np.int32)
    segments = np.zeros((num_rows, row_len), np.int32)
    positions = np.zeros((num_rows, row_len), np.int32)
    next_segment = [1] * num_rows
    spans = []
    for i, sequence in enumerate(sequences):
        row, offset = placed[i]
        n = len(sequence) - 1
        tokens[row, offset : offset + n] = sequence[:-1]
        targets[row, offset : offset + n] = sequence[1:]
        segments[row, offset : offset + n] = next_segment[row]
        positions[row, offset : offset + n] = np.arange(n)
        next_segment[row] += 1
        count = continuation_lengths[i]
        spans.append(Span(row, offset + n - count, count))
    return PackedRequests(tokens, targets, segments, positions, spans, truncated)
