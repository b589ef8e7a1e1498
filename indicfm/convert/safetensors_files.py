"""Read a Hugging Face checkpoint's tensors one at a time: one ``model.safetensors`` or shards named
by ``model.safetensors.index.json``.

Why this shape: a checkpoint may be larger than a host's memory, so nothing reads the whole file.
``safetensors.safe_open`` memory-maps a file and returns one tensor on request (NumPy, no torch);
a tensor is read when the parameter it fills is placed on the devices and dropped right after.
Every problem is a :class:`~indicfm.convert.hf_arch.ConversionError` that names the file: a
missing or truncated shard, an index that points at a file that is not there, a tensor the
index promises that the shard lacks.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from indicfm.convert.hf_arch import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """Lazy access to every tensor of a checkpoint directory (use as a context manager)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}
        self._where: dict[str, Path] = self._locate()

    def _locate(self) -> dict[str, Path]:
        """Tensor name -> the file that holds it (from the index, or the one file's own header)."""
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ConversionError(f"{index}: not a safetensors index (no readable 'weight_map'): {err}") from None
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
            if missing:
                raise ConversionError(f"{index} names shard files that are not in {self.directory}: {missing}")
            return {name: self.directory / file for name, file in weight_map.items()}
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise ConversionError(f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE} is there")
        return {name: single for name in self._handle(single).keys()}

    def _handle(self, path: Path) -> Any:
        from safetensors import safe_open

        if path not in self._open:
            try:
                self._open[path] = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            except Exception as err:  # safetensors raises its own SafetensorError for a damaged header/size
                raise ConversionError(f"{path}: cannot read it as safetensors (truncated or damaged?): {err}") from None
        return self._open[path]

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 NumPy (bfloat16/float16 sources are widened exactly)."""
        if name not in self._where:
            raise ConversionError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        path = self._where[name]
        handle = self._handle(path)
        try:
            value = handle.get_tensor(name)
        except Exception as err:
            raise ConversionError(f"{path}: cannot read tensor {name!r} (truncated file or wrong index?): {err}") from None
        return np.asarray(value, dtype=np.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._where:
            raise ConversionError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        return tuple(self._handle(self._where[name]).get_slice(name).get_shape())

    def nbytes(self) -> int:
        """Bytes of the checkpoint's files (what import is measured against)."""
        return sum(p.stat().st_size for p in set(self._where.values()))

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
