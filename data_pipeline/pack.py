"""Pack tokenized documents into fixed-length rows, one language per packer.

Documents (each already ending with EOS) are laid end to end and cut every ``seq_len`` tokens, so
no token is lost or padded away except at the very end of a language.  Per token we store:

* ``segment_ids``: which document of the row it belongs to, numbered 1, 2, ... within each row
  (0 = padding), so attention never crosses documents;
* ``positions``: the token's index inside its document.  A document cut at a row boundary continues
  at the start of the next row (segment 1 there) with positions continuing where they stopped, so
  its rotary positions stay true; ``split_documents`` counts those cuts.

Rows are single-language so the loader can apply language mixing weights row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PackedRows:
    tokens: np.ndarray  # [rows, seq_len] int32
    segment_ids: np.ndarray  # [rows, seq_len] int32, 0 = padding
    positions: np.ndarray  # [rows, seq_len] int32

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def empty(seq_len: int) -> "PackedRows":
        z = np.zeros((0, seq_len), np.int32)
        return PackedRows(z, z.copy(), z.copy())


@dataclass
class Packer:
    seq_len: int
    pad_id: int = 0
    #: Tokens waiting for a full row, with the document number and in-document position of each.
    _tokens: list[np.ndarray] = field(default_factory=list)
    _docs: list[np.ndarray] = field(default_factory=list)
    _positions: list[np.ndarray] = field(default_factory=list)
    _pending: int = 0
    _next_doc: int = 0
    split_documents: int = 0

    def add(self, ids: np.ndarray) -> None:
        """Queue one document's token ids (EOS included)."""
        ids = np.asarray(ids, np.int32)
        if len(ids) == 0:
            return
        self._tokens.append(ids)
        self._docs.append(np.full(len(ids), self._next_doc, np.int64))
        self._positions.append(np.arange(len(ids), dtype=np.int32))
        self._next_doc += 1
        self._pending += len(ids)

    def add_many(self, flat_ids: np.ndarray, lengths: np.ndarray) -> None:
        """Queue several documents at once: their ids concatenated, and each one's length."""
        lengths = np.asarray(lengths, np.int64)
        lengths = lengths[lengths > 0]
        if len(lengths) == 0:
            return
        flat_ids = np.asarray(flat_ids, np.int32)
        starts = np.cumsum(lengths) - lengths
        self._tokens.append(flat_ids)
        self._docs.append(np.repeat(np.arange(self._next_doc, self._next_doc + len(lengths)), lengths))
        self._positions.append((np.arange(len(flat_ids)) - np.repeat(starts, lengths)).astype(np.int32))
        self._next_doc += len(lengths)
        self._pending += len(flat_ids)

    @property
    def pending_tokens(self) -> int:
        return self._pending

    def _take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._tokens:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32)
        tokens, docs, positions = (np.concatenate(x) for x in (self._tokens, self._docs, self._positions))
        self._tokens, self._docs, self._positions, self._pending = [], [], [], 0
        return tokens, docs, positions

    def _rows(self, tokens: np.ndarray, docs: np.ndarray, positions: np.ndarray) -> PackedRows:
        L = self.seq_len
        n = len(tokens) // L
        tok = tokens.reshape(n, L)
        doc = docs.reshape(n, L)
        seg = (doc - doc[:, :1] + 1).astype(np.int32)  # renumber documents 1.. within each row
        pos = positions.reshape(n, L)
        self.split_documents += int(np.count_nonzero(pos[:, 0] > 0))
        return PackedRows(tok, seg, pos)

    def pop_full_rows(self) -> PackedRows:
        """Every complete row packed so far; the remainder waits for more documents."""
        if self._pending < self.seq_len:
            return PackedRows.empty(self.seq_len)
        tokens, docs, positions = self._take()
        n = len(tokens) // self.seq_len * self.seq_len
        rows = self._rows(tokens[:n], docs[:n], positions[:n])
        if n < len(tokens):
            self._tokens, self._docs, self._positions = [tokens[n:]], [docs[n:]], [positions[n:]]
            self._pending = len(tokens) - n
        return rows

    def finish(self) -> PackedRows:
        """All remaining rows; the last one padded (pad token, segment 0, position 0)."""
        full = self.pop_full_rows()
        tokens, docs, positions = self._take()
        if len(tokens) == 0:
            return full
        pad = self.seq_len - len(tokens)
        last = self._rows(
            np.concatenate([tokens, np.full(pad, self.pad_id, np.int32)]),
            np.concatenate([docs, np.full(pad, docs[0], np.int64)]),
            np.concatenate([positions, np.zeros(pad, np.int32)]),
        )
        last.segment_ids[0, len(tokens) :] = 0
        return PackedRows(*(np.concatenate([a, b]) for a, b in zip(
            (full.tokens, full.segment_ids, full.positions), (last.tokens, last.segment_ids, last.positions)
        )))

    # -- resume state: the unfinished row, at most seq_len - 1 tokens ---------------------------
    def state(self) -> dict:
        tokens, docs, positions = self._take()
        self._tokens, self._docs, self._positions, self._pending = [tokens], [docs], [positions], len(tokens)
        return {
            "tokens": tokens.tolist(),
            "docs": docs.tolist(),
            "positions": positions.tolist(),
            "next_doc": self._next_doc,
            "split_documents": self.split_documents,
        }

    def load_state(self, state: dict) -> None:
        self._tokens = [np.asarray(state["tokens"], np.int32)]
        self._docs = [np.asarray(state["docs"], np.int64)]
        self._positions = [np.asarray(state["positions"], np.int32)]
        self._pending = len(state["tokens"])
        self._next_doc = state["next_doc"]
        self.split_documents = state["split_documents"]
