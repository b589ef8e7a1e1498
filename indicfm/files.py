"""Small file utilities shared by the tokenizer, the data pipeline and checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def save_array_durably(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` and fsync: a checkpoint's state file written (and fsynced) after it may refer to
    it, so after a power loss the state must not point at a file the OS never wrote."""
    with open(path, "wb") as out:
        np.save(out, array)
        out.flush()
        os.fsync(out.fileno())
