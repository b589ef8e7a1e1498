"""A NumPy hash table from 64-bit LSH band keys to the documents that have them.

Why not a ``dict``: ``data prepare`` decides near-duplicates in one process, in input order, so
the cost of this table bounds the whole run.  Inserting ~9 band keys per kept document into a
``dict`` one by one cost ≈ 3 µs per document (0.5 s of a 163k-document run, a third of that
process's work); here a whole batch of keys is looked up or inserted with a few vectorised
probing rounds.

Open addressing with linear probing over two parallel arrays (``keys``, first ``doc``), kept at
most half full.  Band keys are already well-mixed hashes, so a key's home slot is its low bits.
The key 0 marks an empty slot; a real key 0 is stored as 1 (a 2⁻⁶⁴ chance of a false candidate,
which the caller's Jaccard check then rejects).  A key shared by several kept documents stores
the first in the arrays and the others in a small ``dict`` (rare: it takes a band collision
between documents that were both kept).
"""

from __future__ import annotations

import numpy as np

_EMPTY = np.uint64(0)
#: Below this many keys still probing, a loop over them costs less than another vectorised round.
_FEW = 64


class BandTable:
    def __init__(self, capacity: int = 1 << 16):
        capacity = 1 << max(int(capacity) - 1, 1).bit_length()  # a power of two
        self._keys = np.zeros(capacity, np.uint64)
        self._docs = np.zeros(capacity, np.int64)
        self._more: dict[int, list[int]] = {}  # key -> its documents after the first
        self._count = 0

    def __len__(self) -> int:
        """Distinct keys stored."""
        return self._count

    @staticmethod
    def _stored(keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, np.uint64).ravel()
        return np.where(keys == _EMPTY, np.uint64(1), keys)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return (keys & np.uint64(len(self._keys) - 1)).astype(np.int64)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The first document stored under each key, or -1 (same shape as ``keys``)."""
        shape = np.shape(keys)
        keys = self._stored(keys)
        found = np.full(len(keys), -1, np.int64)
        slots = self._home(keys)
        pending = np.arange(len(keys))
        mask = len(self._keys) - 1
        while len(pending) > _FEW:
            at = slots[pending]
            current = self._keys[at]
            hit = current == keys[pending]
            found[pending[hit]] = self._docs[at[hit]]
            pending = pending[~hit & (current != _EMPTY)]  # occupied by another key: probe on
            slots[pending] = (slots[pending] + 1) & mask
        table = self._keys
        for i in pending.tolist():  # the few keys with long probe sequences: one at a time
            key, slot = keys[i], int(slots[i])
            while table[slot] != _EMPTY:
                if table[slot] == key:
                    found[i] = self._docs[slot]
                    break
                slot = (slot + 1) & mask
        return found.reshape(shape)

    def docs_of(self, key: int, first: int) -> list[int]:
        """Every document stored under ``key``, given its first (from :meth:`lookup`)."""
        return [first, *self._more.get(int(self._stored(np.array([key]))[0]), ())]

    def add(self, keys: np.ndarray, docs: np.ndarray) -> None:
        """Store ``docs[i]`` under ``keys[i]``, after the documents a key already has."""
        keys = self._stored(keys)
        docs = np.asarray(docs, np.int64).ravel()
        present = self.lookup(keys) >= 0
        _, first = np.unique(keys, return_index=True)
        new = np.zeros(len(keys), bool)
        new[first] = True
        new &= ~present
        for i in np.flatnonzero(~new).tolist():  # a key that has a document already (rare)
            self._more.setdefault(int(keys[i]), []).append(int(docs[i]))
        self.insert_new(keys[new], docs[new])

    def insert_new(self, keys: np.ndarray, docs: np.ndarray) -> None:
        """Store ``docs[i]`` under ``keys[i]``; the keys must be distinct and not stored yet (the
        fast path, for documents already known to share no key with anything)."""
        keys = self._stored(keys)
        docs = np.asarray(docs, np.int64).ravel()
        if self._count + len(keys) > len(self._keys) // 2:
            self._grow(self._count + len(keys))
        self._count += len(keys)
        mask = len(self._keys) - 1
        slots = self._home(keys)
        pending = np.arange(len(keys))
        while len(pending) > _FEW:
            at = slots[pending]
            empty = self._keys[at] == _EMPTY
            # Keys that want the same empty slot all write it; one of them stays (which one does
            # not matter: the keys are distinct), the others probe on like any other key.
            self._keys[at[empty]] = keys[pending[empty]]
            won = empty & (self._keys[at] == keys[pending])
            self._docs[at[won]] = docs[pending[won]]
            pending = pending[~won]
            slots[pending] = (slots[pending] + 1) & mask
        table = self._keys
        for i in pending.tolist():  # the few keys with long probe sequences: one at a time
            slot = int(slots[i])
            while table[slot] != _EMPTY:
                slot = (slot + 1) & mask
            table[slot], self._docs[slot] = keys[i], docs[i]

    def _grow(self, needed: int) -> None:
        occupied = self._keys != _EMPTY
        keys, docs = self._keys[occupied], self._docs[occupied]
        capacity = len(self._keys)
        while needed > capacity // 2:
            capacity *= 4  # fewer rebuilds; the table stays between 1/8 and 1/2 full
        more, self._more = self._more, {}
        self.__init__(capacity)
        self.insert_new(keys, docs)
        self._more = more
