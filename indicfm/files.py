"""Small file utilities shared by the tokenizer, the data pipeline and checkpoints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks: the identity of a tokenizer or input file.

    A token cache and a checkpoint record their tokenizer's hash so a run can refuse to mix tokens
    of one tokenizer with a model trained on another.
    """
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def save_array_durably(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` and fsync: a checkpoint's state file written (and fsynced) after it may refer to
    it, so after a power loss the state must not point at a file the OS never wrote."""
    with open(path, "wb") as out:
        np.save(out, array)
        out.flush()
        os.fsync(out.fileno())


def fsync_directory(path: str | Path) -> None:
    """Make the names created or renamed in ``path`` durable (POSIX: a rename is only durable once
    its directory is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
