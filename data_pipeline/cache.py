"""The token cache on disk: packed rows per language in tensorstore zarr v3 arrays.

Layout of a cache directory::

    metadata.json              written LAST: its presence means the cache is complete
    report.json                per-language document accounting (see indicfm.data.report)
    examples.json              a few dropped documents per reason (``indicfm data inspect``)
    rows/<lang>/tokens         zarr v3 int32 [rows, seq_len]
    rows/<lang>/segment_ids    zarr v3 int32 [rows, seq_len]  (0 = padding)
    rows/<lang>/positions      zarr v3 int32 [rows, seq_len]
    .prepare_state/            resume state of an unfinished prepare (removed when complete)

Arrays are sharded (``sharding_indexed``): a shard file holds ``ROWS_PER_SHARD`` rows, each row its
own zstd-compressed inner chunk, so the loader reads any single row with one small byte-range read
instead of decompressing a whole chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indicfm.data.pack import PackedRows
from indicfm.storage import as_path, fresh, kvstore, write_bytes_atomic

#: 2: every document is packed as [BOS] tokens [EOS] (1 had no BOS).
FORMAT_VERSION = 2
ARRAYS = ("tokens", "segment_ids", "positions")
ROWS_PER_SHARD = 4096
METADATA = "metadata.json"
STATE_DIR = ".prepare_state"


class CacheError(ValueError):
    """A cache directory that can't be used (incomplete, wrong format, missing)."""


def _spec(path: Path, seq_len: int, rows: int) -> dict:
    # zstd level 1: packed token rows come out 1.4% larger than with level 3 (measured on the shared
    # corpus) for half the CPU, which prepare's deciding process pays (tensorstore's threads).
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 1}}]
    return {
        "driver": "zarr3",
        "kvstore": kvstore(path),
        "metadata": {
            "shape": [rows, seq_len],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [ROWS_PER_SHARD, seq_len]}},
            "data_type": "int32",
            "fill_value": 0,
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [1, seq_len],
                        "codecs": inner,
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"},
                        ],
                    },
                }
            ],
        },
    }


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that readers see the old file or the new, never half, also after a power loss
    (:func:`indicfm.storage.write_bytes_atomic`; local files or a bucket)."""
    write_bytes_atomic(path, json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"))


class LanguageWriter:
    """Appends packed rows of one language; ``rows`` counts the rows appended so far (durably
    written once :meth:`flush` returns).

    Appended rows are gathered in memory and written ``write_rows`` at a time: a write that covers
    only part of a shard makes tensorstore read and rewrite that shard, so small writes would cost
    far more than their size.
    """

    def __init__(self, directory: Path, seq_len: int, rows: int = 0, write_rows: int = 1024):
        import tensorstore as ts

        self.directory = directory
        self.seq_len = seq_len
        self.rows = rows
        self.write_rows = write_rows
        self._written = rows  # rows handed to tensorstore
        self._buffer: list[PackedRows] = []
        self._inflight: list = []
        # The three arrays are opened (and resized) concurrently: each is a metadata write.
        if rows == 0:  # created with room for one shard of rows: no resize before the first append
            self._capacity = ROWS_PER_SHARD
            opening = {name: ts.open(_spec(directory / name, seq_len, ROWS_PER_SHARD), create=True,
                                     delete_existing=True) for name in ARRAYS}
            self._arrays = {name: future.result() for name, future in opening.items()}
            return
        opening = {}
        for name in ARRAYS:
            if (directory / name).exists():
                opening[name] = ts.open({"driver": "zarr3", "kvstore": kvstore(directory / name)})
            else:
                opening[name] = ts.open(_spec(directory / name, seq_len, 0), create=True, delete_existing=True)
        self._arrays = {name: future.result() for name, future in opening.items()}
        # Rows past ``rows`` may hold data from an interrupted run: they are overwritten.
        self._capacity = rows
        self._wait(self._start_resize(rows))

    def append(self, packed: PackedRows) -> None:
        """Add ``packed`` after the current rows; once ``write_rows`` have gathered they are
        written (tensorstore compresses and writes in its own threads; :meth:`flush` waits)."""
        if len(packed) == 0:
            return
        self._buffer.append(packed)
        self.rows += len(packed)
        if self.rows - self._written >= self.write_rows:
            self.write_now()

    def write_now(self) -> None:
        """Start writing every appended row without waiting (e.g. a language that is complete: its
        writes then overlap the rest of the run instead of the end of it)."""
        if not self._buffer:
            return
        packed = self._buffer[0] if len(self._buffer) == 1 else PackedRows(
            *(np.concatenate([getattr(p, name) for p in self._buffer]) for name in ARRAYS))
        self._buffer = []
        start, end = self._written, self._written + len(packed)
        if end > self._capacity:  # grow geometrically: a resize is a metadata write per array
            self._capacity = max(end, 2 * self._capacity, ROWS_PER_SHARD)
            self._wait(self._start_resize(self._capacity))
        for name in ARRAYS:
            self._inflight.append(self._arrays[name][start:end].write(getattr(packed, name)))
        self._written = end

    def _start_resize(self, rows: int) -> dict:
        return {name: arr.resize(exclusive_max=[rows, self.seq_len], resize_tied_bounds=False)
                for name, arr in self._arrays.items()}

    def _wait(self, resizing: dict) -> None:
        self._arrays = {name: future.result() for name, future in resizing.items()}

    def close(self) -> None:
        """Write and wait for every row, and trim the arrays to exactly the rows written."""
        close_writers([self])

    def flush(self) -> None:
        """Write every appended row and wait until it is on disk (before a checkpoint says so)."""
        self.write_now()
        for future in self._inflight:
            future.result()
        self._inflight = []


def create_language_arrays(directory: Path, seq_len: int, rows: int) -> None:
    """Create one language's three arrays with exactly ``rows`` rows (any old ones are replaced),
    for writers that each fill whole shards of ROWS_PER_SHARD rows at once and concurrently (the
    Ray engine's write tasks): no two of them then ever touch the same shard file."""
    import tensorstore as ts

    opening = [ts.open(_spec(directory / name, seq_len, rows), create=True, delete_existing=True) for name in ARRAYS]
    for future in opening:
        future.result()


def write_rows_block(directory: Path, first_row: int, packed: PackedRows) -> None:
    """Write ``packed`` at rows ``first_row ..`` of arrays made by :func:`create_language_arrays`
    and wait until it is written."""
    import tensorstore as ts

    arrays = [ts.open({"driver": "zarr3", "kvstore": kvstore(directory / name)}) for name in ARRAYS]
    arrays = [future.result() for future in arrays]
    end = first_row + len(packed)
    writes = [arr[first_row:end].write(getattr(packed, name)) for arr, name in zip(arrays, ARRAYS)]
    for future in writes:
        future.result()


def flush_writers(writers: list[LanguageWriter]) -> None:
    """:meth:`LanguageWriter.flush` for several writers, their writes all started before any is
    waited for (tensorstore writes the languages concurrently)."""
    for writer in writers:
        writer.write_now()
    for writer in writers:
        writer.flush()


def close_writers(writers: list[LanguageWriter]) -> None:
    """Close several writers at once: every language's last writes, then every trim, run
    concurrently (one after another they cost ≈5 ms each, at the very end of a prepare)."""
    flush_writers(writers)
    trims = [(writer, writer._start_resize(writer.rows)) for writer in writers]
    for writer, resizing in trims:
        writer._wait(resizing)
        writer._capacity = writer.rows


@dataclass(frozen=True)
class CacheInfo:
    """What ``metadata.json`` of a complete cache says."""

    directory: Path
    seq_len: int
    tokenizer_sha256: str
    languages: dict[str, dict]  # lang -> {"rows": int, "tokens": int, "documents": int, ...}
    metadata: dict


def read_metadata(directory: str | Path) -> CacheInfo:
    """Metadata of a complete cache (a local directory or a ``gs://`` prefix), or
    :class:`CacheError` saying what is wrong."""
    directory = fresh(as_path(directory))
    meta_path = directory / METADATA
    if not meta_path.is_file():
        if (directory / STATE_DIR).exists():
            raise CacheError(
                f"{directory}: token cache is incomplete (an interrupted `indicfm data prepare`?); "
                "run the same prepare command again to finish it"
            )
        raise CacheError(f"{directory}: not a token cache (no {METADATA}); create one with `indicfm data prepare`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{meta_path}: format_version {meta.get('format_version')} (expected {FORMAT_VERSION})")
    return CacheInfo(directory, meta["seq_len"], meta["tokenizer_sha256"], meta["languages"], meta)


def open_language_arrays(directory: Path, lang: str) -> dict:
    """Read-only tensorstore handles of one language's arrays."""
    import tensorstore as ts

    out = {}
    for name in ARRAYS:
        spec = {
            "driver": "zarr3",
            "kvstore": kvstore(directory / "rows" / lang / name),
            "context": {"cache_pool": {"total_bytes_limit": 64 << 20}},
            "recheck_cached_data": False,
        }
        out[name] = ts.open(spec, read=True).result()
    return out


def read_rows(directory: str | Path, lang: str, rows: np.ndarray | slice) -> PackedRows:
    """Rows of one language (for inspection and tests; the loader keeps its handles open)."""
    arrays = open_language_arrays(as_path(directory), lang)
    return PackedRows(*(np.asarray(arrays[name][rows].read().result()) for name in ARRAYS))
