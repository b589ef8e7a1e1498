"""Read a Hugging Face checkpoint's tensors one at a time: one ``model.safetensors`` or shards named
by ``model.safetensors.index.json``, in a local directory or in a bucket (``gs://bucket/model``).

Why this shape: a checkpoint may be larger than a host's memory, so nothing reads the whole file.
Each tensor is read with one positioned read of its byte range (the safetensors header gives dtype,
shape and offsets) when the parameter it fills is placed on the devices, and dropped right after.
The ``safetensors`` library's own reader memory-maps the file: the pages it touched stay resident
(and count as the process's memory) until the file is closed, so by the end of an import the whole
checkpoint would sit in memory beside the placed model, two copies.  In a bucket the same holds:
the index and each shard's header are read first (the 8-byte length, then the header itself), then
each tensor is one ranged GET of its bytes through :mod:`indicfm.storage` (gcsfs, with its
credentials and emulator conventions), never a download of the whole file.  Every problem is a
:class:`~indicfm.convert.hf_arch.ConversionError` that names the file: a missing or truncated
shard, a damaged header, an index that points at a file that is not there, a tensor the index
promises that the shard lacks.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from indicfm.convert.hf_arch import ConversionError
from indicfm.storage import as_path, is_url

#: called after every tensor read: ``(tensor name, bytes read)`` (tests count what each process read)
ReadHook = Callable[[str, int], None]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


#: safetensors dtype names -> NumPy dtypes (bfloat16 through ml_dtypes, which jax already needs);
#: built once, on first use
@functools.cache
def _dtypes() -> dict[str, Any]:
    import ml_dtypes

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def file_size(path: Path) -> int:
    """Bytes of a local file or of an object in a bucket."""
    return int(path.fs.size(path.path)) if is_url(path) else path.stat().st_size


def read_range(path: Path, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file: one positioned read locally, one ranged request in a bucket."""
    if is_url(path):
        return path.fs.cat_file(path.path, start=start, end=end)
    with open(path, "rb") as f:
        return os.pread(f.fileno(), end - start, start)


@dataclass(frozen=True)
class _Entry:
    file: Path  # a pathlib.Path, or a UPath for a file in a bucket
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file (name -> where its bytes are), checked against the file size."""
    try:
        size = file_size(path)
        header_len = struct.unpack("<Q", read_range(path, 0, 8))[0]
        if header_len > size - 8:
            raise ValueError(f"header of {header_len} bytes in a file of {size}")
        header = json.loads(read_range(path, 8, 8 + header_len))
    except (OSError, ValueError, struct.error) as err:
        raise ConversionError(f"{path}: not a readable safetensors file (truncated or damaged?): {err}") from None
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if base + end > size:
            raise ConversionError(f"{path}: tensor {name!r} ends at byte {base + end} but the file has {size} "
                                  "(truncated?)")
        entries[name] = _Entry(path, info["dtype"], tuple(info["shape"]), base + begin, base + end)
    return entries


class SafetensorsCheckpoint:
    """Lazy access to every tensor of a checkpoint directory, local or ``gs://`` (use as a context manager).

    ``on_read(name, nbytes)`` is called after each tensor read (how many bytes this process read).
    """

    def __init__(self, directory: str | Path, on_read: ReadHook | None = None):
        self.directory = as_path(directory)
        self._on_read = on_read
        self._where: dict[str, _Entry] = self._locate()

    def _locate(self) -> dict[str, _Entry]:
        """Tensor name -> its bytes (from the index's shards, or the one file's own header)."""
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ConversionError(f"{index}: not a safetensors index (no readable 'weight_map'): {err}") from None
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
            if missing:
                raise ConversionError(f"{index} names shard files that are not in {self.directory}: {missing}")
            entries: dict[str, _Entry] = {}
            for file in sorted(set(weight_map.values())):
                entries.update(read_header(self.directory / file))
            absent = sorted(n for n, f in weight_map.items() if n not in entries or entries[n].file.name != f)
            if absent:
                raise ConversionError(f"{index}: tensors not in the shard it names: {absent[:5]}")
            return entries
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise ConversionError(f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE} is there")
        return read_header(single)

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _entry(self, name: str) -> _Entry:
        if name not in self._where:
            raise ConversionError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        return self._where[name]

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 NumPy (bfloat16/float16 sources are widened exactly)."""
        entry = self._entry(name)
        dtype = _dtypes().get(entry.dtype)
        if dtype is None:
            raise ConversionError(f"{entry.file}: tensor {name!r} has dtype {entry.dtype}, which indicfm cannot read")
        try:
            data = read_range(entry.file, entry.start, entry.end)
        except OSError as err:
            raise ConversionError(f"{entry.file}: tensor {name!r} could not be read: {err}") from None
        if len(data) != entry.end - entry.start:
            raise ConversionError(f"{entry.file}: tensor {name!r} is cut short (truncated file?)")
        if self._on_read is not None:
            self._on_read(name, len(data))
        value = np.frombuffer(data, dtype=dtype).reshape(entry.shape)
        return value.astype(np.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass  # every read opens and closes its file: nothing stays mapped or open
