"""Exact and near-duplicate detection across all sources and languages; the first occurrence wins.

* Exact: a 128-bit BLAKE2b digest of the normalised text with whitespace runs collapsed.
* Near: MinHash signatures of character 5-gram shingles (configurable) and LSH banding, with a
  check of the estimated Jaccard similarity against the threshold (so a band collision between two
  merely similar documents is not a drop).

Why not ``datasketch`` here: measured on the shipped sample (2-core sandbox) ``MinHash.update_batch``
took ≈120 µs and ``MinHashLSH.query``+``insert`` ≈80 µs per sentence, ten times the cost of
SentencePiece-encoding it, while the issue asks prepare to run at ≥ 0.6× bare encoding speed.  The
same MinHash (a min over ``num_perm`` universal hashes of the shingle hashes) computed for a whole
batch of documents at once in NumPy costs a few µs per document.  The LSH band/row split is chosen
the way datasketch does (minimising the false-positive + false-negative areas at the threshold), and
tests compare the signatures' Jaccard estimates with exact Jaccard of the shingle sets.

Signatures are computed in worker processes (:func:`minhash_signatures`); the first-occurrence
bookkeeping (:class:`DuplicateIndex`) lives in the single process that decides, in input order, so
the result does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_pipeline.config import DedupConfig

_SHINGLE_BASE = np.uint64(0x100000001B3)  # FNV-64 prime: mixes code points into one 64-bit value
_SEPARATOR = 0x110000  # not a Unicode code point: shingles never span two documents


def _whitespace_collapsed(text: str) -> str:
    return " ".join(text.split())


def exact_key(text: str) -> bytes:
    """16-byte digest identifying a document's text up to whitespace differences."""
    return hashlib.blake2b(_whitespace_collapsed(text).encode("utf-8"), digest_size=16).digest()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Finaliser that spreads the bits of 64-bit integers (wrap-around arithmetic intended)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class MinHasher:
    """``num_perm`` multiply-shift hash functions h_i(x) = (a_i·x + b_i) >> 32 with a_i odd."""

    num_perm: int
    shingle_size: int
    shingle_unit: str
    seed: int

    @property
    def _params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = (rng.integers(0, 2**31, size=self.num_perm, dtype=np.uint32) * 2 + 1).astype(np.uint32)
        b = rng.integers(0, 2**32, size=self.num_perm, dtype=np.uint64).astype(np.uint32)
        return a, b

    def _units(self, text: str) -> np.ndarray:
        """The sequence shingles are made of, as uint64: code points, or hashes of words."""
        text = _whitespace_collapsed(text)
        if self.shingle_unit == "char":
            return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        words = [hashlib.blake2b(w.encode(), digest_size=8).digest() for w in text.split(" ")]
        return np.frombuffer(b"".join(words), dtype=np.uint64).copy() if words else np.zeros(0, np.uint64)

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """64-bit hashes of every n-gram shingle of every text, and each text's offset into them.

        Texts shorter than one shingle contribute one shingle of the whole text.
        """
        n = self.shingle_size
        pieces, owners = [], []
        for index, text in enumerate(texts):
            units = self._units(text)
            if len(units) < n:  # pad a short text to one shingle
                units = np.concatenate([units, np.full(n - len(units), _SEPARATOR, np.uint64)])
            pieces.append(units)
            pieces.append(np.full(n - 1, _SEPARATOR, np.uint64))
            owners.append(np.full(len(units) - n + 1, index, np.int64))
        if not pieces:
            return np.zeros(0, np.uint64), np.zeros(1, np.int64)
        seq = np.concatenate(pieces)
        windows = len(seq) - n + 1
        h = np.zeros(windows, np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                h = h * _SHINGLE_BASE + seq[k : k + windows]
        # Keep windows that lie inside one text: those starting at each text's own positions.
        starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])[:-1:2]
        counts = np.array([len(o) for o in owners])
        idx = np.concatenate([s + np.arange(c) for s, c in zip(starts, counts)])
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return _splitmix64(h[idx]), offsets

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """uint32 MinHash signatures, shape [len(texts), num_perm].

        Permutation i maps a shingle's 32-bit hash x to a_i·x + b_i mod 2^32 (a_i odd: a bijection,
        so on already-random hashes each permutation's minimum is equally likely to fall on any
        shingle, which is what MinHash needs).  Computed as a [num_perm, shingles] array per block
        of documents, minimum per document with ``reduceat``.
        """
        if not texts:
            return np.zeros((0, self.num_perm), np.uint32)
        hashes64, offsets = self.shingle_hashes(texts)
        hashes = (hashes64 >> np.uint64(32)).astype(np.uint32)
        a, b = self._params
        out = np.empty((len(texts), self.num_perm), np.uint32)
        block = max(1, (1 << 21) // self.num_perm)  # shingles per block: bounds the temporary array
        lo = 0
        while lo < len(texts):
            hi = int(np.searchsorted(offsets, offsets[lo] + block, side="right")) - 1
            hi = min(max(hi, lo + 1), len(texts))
            seg = hashes[offsets[lo] : offsets[hi]]
            values = a[:, None] * seg[None, :]  # uint32 arithmetic wraps mod 2^32 by design
            values += b[:, None]
            out[lo:hi] = np.minimum.reduceat(values, offsets[lo:hi] - offsets[lo], axis=1).T
            lo = hi
        return out


def minhasher(config: DedupConfig) -> MinHasher:
    return MinHasher(config.num_perm, config.shingle_size, config.shingle_unit, config.seed)


@lru_cache(maxsize=None)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands·rows ≤ num_perm minimising false-positive + false-negative area.

    A pair with Jaccard s shares at least one band with probability 1 - (1 - s^r)^b; false positives
    are pairs below the threshold that collide, false negatives pairs above it that don't.
    """
    s_lo = np.linspace(0.0, threshold, 200)
    s_hi = np.linspace(threshold, 1.0, 200)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - s_lo**r) ** b, s_lo)
            fn = np.trapezoid((1 - s_hi**r) ** b, s_hi)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


class DuplicateIndex:
    """Remembers what was kept; answers "is this an exact / near duplicate of something kept?".

    State grows by 16 bytes (exact) + 4·num_perm bytes (signature) per kept document and is saved
    with the prepare checkpoint so an interrupted run resumes with the same decisions.
    """

    def __init__(self, config: DedupConfig):
        self.config = config
        self.bands, self.rows = lsh_bands(config.threshold, config.num_perm)
        self._exact: set[bytes] = set()
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._signatures: list[np.ndarray] = []
        self._new_keys: list[bytes] = []  # kept since the last save_increment
        self._saved_signatures = 0

    def __len__(self) -> int:
        return len(self._signatures) if self.config.near else len(self._exact)

    def check_and_add(self, key: bytes, signature: np.ndarray | None) -> str | None:
        """Reason the document is a duplicate, or None (then it is recorded as kept)."""
        if self.config.exact and key in self._exact:
            return "exact_duplicate"
        if self.config.near and signature is not None and self._near_match(signature):
            return "near_duplicate"
        self._add(key, signature)
        return None

    def _band_keys(self, signature: np.ndarray) -> list[bytes]:
        r = self.rows
        return [signature[i * r : (i + 1) * r].tobytes() for i in range(self.bands)]

    def _near_match(self, signature: np.ndarray) -> bool:
        seen: set[int] = set()
        for band, key in zip(self._buckets, self._band_keys(signature)):
            for doc in band.get(key, ()):
                if doc in seen:
                    continue
                seen.add(doc)
                if np.mean(self._signatures[doc] == signature) >= self.config.threshold:
                    return True
        return False

    def _add(self, key: bytes, signature: np.ndarray | None) -> None:
        if self.config.exact:
            self._exact.add(key)
            self._new_keys.append(key)
        if self.config.near and signature is not None:
            doc = len(self._signatures)
            self._signatures.append(signature.copy())
            for band, bkey in zip(self._buckets, self._band_keys(signature)):
                band.setdefault(bkey, []).append(doc)

    # -- checkpointing -------------------------------------------------------------------------
    def save_increment(self, directory: Path, part: int) -> None:
        """Write what was kept since the last save as part ``part`` (append-only, so a checkpoint
        costs time proportional to the new documents, not to the whole index)."""
        directory.mkdir(parents=True, exist_ok=True)
        keys = self._new_keys
        sigs = self._signatures[self._saved_signatures :]
        np.save(directory / f"exact_keys.{part:06d}.npy", np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16))
        np.save(
            directory / f"signatures.{part:06d}.npy",
            np.stack(sigs) if sigs else np.zeros((0, self.config.num_perm), np.uint32),
        )
        self._new_keys = []
        self._saved_signatures = len(self._signatures)

    def load(self, directory: Path, parts: int) -> None:
        """Rebuild the index from parts 0 .. parts-1 written by :meth:`save_increment`."""
        self.__init__(self.config)
        for part in range(parts):
            for row in np.load(directory / f"exact_keys.{part:06d}.npy"):
                self._exact.add(row.tobytes())
            for sig in np.load(directory / f"signatures.{part:06d}.npy"):
                doc = len(self._signatures)
                self._signatures.append(sig)
                for band, bkey in zip(self._buckets, self._band_keys(sig)):
                    band.setdefault(bkey, []).append(doc)
        self._saved_signatures = len(self._signatures)
