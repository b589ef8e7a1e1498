"""Deterministic, resumable, multi-host batches from the token cache.

The global batch of step ``s`` is a pure function of ``(seed, s)`` (and the cache and weights), so
resuming needs only the step number and every host can compute its own slice without talking to
the others:

1. **How many rows of each language** step ``s`` takes.  With mixing probabilities ``p_l`` the
   number of rows of language ``l`` taken before step ``s`` is ``C_l(s) = floor(s·G·p_l + u_l)``
   (``G`` global batch size, ``u_l`` a seeded phase in [0, 1)); the language with the largest
   weight takes the rest.  So over any run the mixture matches the weights to within one row per
   language, and a weight below 1/G still gets its share (one row every few steps).
2. **Which rows.**  Language ``l``'s k-th row overall is ``perm(l, k // n_l)[k % n_l]``: a seeded
   permutation of its ``n_l`` rows, re-drawn every epoch.
3. **Where in the batch.**  The step's rows are shuffled with a step-seeded permutation, then host
   ``i`` of ``n`` takes positions ``[i·G/n, (i+1)·G/n)``: hosts read disjoint rows whose union is
   the global batch.

Why not Grain: ``grain.MapDataset`` gives exactly this kind of index arithmetic (``shuffle``,
``repeat``, ``mix``), but in grain 0.2.18 measured here ``MapDataset.mix`` costs ≈14 ms and
``shuffle().repeat()`` ≈110 µs per element, i.e. seconds per batch; the closed form above costs
microseconds per batch in NumPy.  Rows are then read with one tensorstore read per language.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from indicfm.data.cache import ARRAYS, open_language_arrays, read_metadata
from indicfm.storage import as_path

_PERMUTATIONS_CACHED = 64


def temperature_weights(rows: dict[str, int], temperature: float) -> dict[str, float]:
    """Mixing weights ``p_l ∝ rows_l^(1/T)``: T = 1 is proportional, larger T flattens the mixture."""
    raw = {lang: float(n) ** (1.0 / temperature) for lang, n in rows.items() if n > 0}
    total = sum(raw.values())
    return {lang: w / total for lang, w in raw.items()}


class TokenLoader:
    """Batches ``{"tokens", "segment_ids", "positions"}`` (int32 ``[G / process_count, seq_len]``).

    ``language_weights`` (any non-negative numbers, normalised here) default to the cache's row
    counts, i.e. every row about equally often.  A language the cache lacks is an error; a language
    of the cache not named gets weight 0.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        global_batch_size: int,
        seed: int,
        *,
        language_weights: dict[str, float] | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = 2,
    ):
        info = read_metadata(cache_dir)
        self.cache_dir = as_path(cache_dir)
        self.seq_len: int = info.seq_len
        self.tokenizer_sha256: str = info.tokenizer_sha256
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of the "
                f"process count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.process_index = process_index
        self.process_count = process_count
        self.per_host = global_batch_size // process_count
        self.prefetch = prefetch
        self.step = 0

        rows = {lang: int(v["rows"]) for lang, v in sorted(info.languages.items()) if v["rows"] > 0}
        weights = dict(rows) if language_weights is None else dict(language_weights)
        unknown = sorted(set(weights) - set(rows))
        if unknown:
            raise ValueError(
                f"language_weights name languages not in the cache {cache_dir}: {', '.join(unknown)} "
                f"(it has: {', '.join(rows)})"
            )
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"language_weights must be non-negative with a positive sum, got {weights}")
        self.languages = [lang for lang in rows if weights.get(lang, 0) > 0]
        total = sum(weights[lang] for lang in self.languages)
        self.probabilities = np.array([weights[lang] / total for lang in self.languages])
        self.language_weights = {lang: float(p) for lang, p in zip(self.languages, self.probabilities)}
        self._rows = np.array([rows[lang] for lang in self.languages], np.int64)
        self._largest = int(np.argmax(self.probabilities))
        self._systematic = bool(global_batch_size * self.probabilities.max() < len(self.languages))
        self._phases = np.random.default_rng([self.seed, 0x9E37]).random(len(self.languages))
        self._arrays = {lang: open_language_arrays(self.cache_dir, lang) for lang in self.languages}
        self._permutations: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    # -- index arithmetic (pure functions of seed and step) -------------------------------------
    def _taken_before(self, step: int) -> np.ndarray:
        """Rows of each language taken by all steps before ``step`` (closed form, see module doc)."""
        taken = np.floor(step * self.global_batch_size * self.probabilities + self._phases).astype(np.int64)
        taken[self._largest] = 0
        taken[self._largest] = step * self.global_batch_size - taken.sum()
        return taken

    def _systematic_counts(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows per language for a global batch too small for the closed form (G·p_largest < number
        of languages, e.g. the CPU quickstart): systematic sampling, G evenly spaced points with a
        step-seeded offset through the cumulative weights.  Unbiased, never negative, a pure function
        of (seed, step); rows taken before ``step`` are estimated as ``floor(step·G·p)``, so a few
        rows of an epoch may repeat or be skipped."""
        offset = np.random.default_rng([self.seed, step, 0x5A5A]).random()
        points = (np.arange(self.global_batch_size) + offset) / self.global_batch_size
        picks = np.searchsorted(np.cumsum(self.probabilities), points, side="right")
        counts = np.bincount(np.minimum(picks, len(self.languages) - 1), minlength=len(self.languages))
        before = np.floor(step * self.global_batch_size * self.probabilities).astype(np.int64)
        return before, counts

    def _permutation(self, lang_index: int, epoch: int) -> np.ndarray:
        key = (lang_index, epoch)
        with self._lock:
            perm = self._permutations.get(key)
            if perm is None:
                rng = np.random.default_rng([self.seed, lang_index, epoch, 0xC0FFEE])
                perm = rng.permutation(self._rows[lang_index])
                self._permutations[key] = perm
                if len(self._permutations) > _PERMUTATIONS_CACHED:
                    self._permutations.popitem(last=False)
            else:
                self._permutations.move_to_end(key)
            return perm

    def global_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(language index, row) of every element of the global batch of ``step``, in batch order."""
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        if self._systematic:
            before, counts = self._systematic_counts(step)
        else:
            before, after = self._taken_before(step), self._taken_before(step + 1)
            counts = after - before
            if (counts < 0).any():  # only if G·p_largest < number of languages (handled above)
                raise ValueError("global batch too small for this many languages; raise global_batch_size")
        lang_idx = np.repeat(np.arange(len(self.languages)), counts)
        # k-th row of its language overall: before[l] + rank within this step.
        starts = np.cumsum(counts) - counts
        k = before[lang_idx] + (np.arange(len(lang_idx)) - starts[lang_idx])
        rows = np.empty(len(k), np.int64)
        for li in np.unique(lang_idx):
            sel = lang_idx == li
            n = self._rows[li]
            epochs, offsets = np.divmod(k[sel], n)
            out = np.empty(len(offsets), np.int64)
            for epoch in np.unique(epochs):
                e_sel = epochs == epoch
                out[e_sel] = self._permutation(int(li), int(epoch))[offsets[e_sel]]
            rows[sel] = out
        order = np.random.default_rng([self.seed, step, 0xBA7C]).permutation(len(k))
        return lang_idx[order], rows[order]

    def host_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This host's slice of :meth:`global_rows`."""
        lang_idx, rows = self.global_rows(step)
        lo = self.process_index * self.per_host
        return lang_idx[lo : lo + self.per_host], rows[lo : lo + self.per_host]

    # -- reading -------------------------------------------------------------------------------
    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's batch of ``step``: int32 arrays ``[global_batch_size // process_count, seq_len]``."""
        lang_idx, rows = self.host_rows(step)
        out = {name: np.empty((self.per_host, self.seq_len), np.int32) for name in ARRAYS}
        pending = []
        for li in np.unique(lang_idx):
            where = np.nonzero(lang_idx == li)[0]
            unique_rows, inverse = np.unique(rows[where], return_inverse=True)
            arrays = self._arrays[self.languages[li]]
            futures = {name: arrays[name][unique_rows].read() for name in ARRAYS}
            pending.append((where, inverse, futures))
        for where, inverse, futures in pending:
            for name, future in futures.items():
                out[name][where] = np.asarray(future.result())[inverse]
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches from the current :attr:`step` on; a thread reads ``prefetch`` batches ahead.

        ``step`` advances as batches are handed out, so :meth:`state_dict` taken after consuming
        batch ``s`` resumes at ``s + 1``.
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-loader") as pool:
            ahead: OrderedDict[int, Future] = OrderedDict()
            while True:
                for s in range(self.step, self.step + max(1, self.prefetch) + 1):
                    if s not in ahead:
                        ahead[s] = pool.submit(self.batch, s)
                for s in [s for s in ahead if s < self.step]:  # after load_state_dict moved back
                    ahead.pop(s).cancel()
                batch = ahead.pop(self.step).result()
                self.step += 1
                yield batch

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "step": self.step,
            "global_batch_size": self.global_batch_size,
            "tokenizer_sha256": self.tokenizer_sha256,
            "language_weights": self.language_weights,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; a different seed, batch size, tokenizer or mixture is an error
        (it would silently change which data a resumed run sees)."""
        for key in ("seed", "global_batch_size", "tokenizer_sha256"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state {key}={state[key]!r} does not match this loader ({getattr(self, key)!r})")
        saved = state.get("language_weights")
        if saved is not None and (
            set(saved) != set(self.language_weights)
            or any(abs(saved[k] - self.language_weights[k]) > 1e-9 for k in saved)
        ):
            raise ValueError(f"loader state language_weights {saved} do not match this loader's {self.language_weights}")
        self.step = int(state["step"])
