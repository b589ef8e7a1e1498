"""Small file utilities shared by the tokenizer, the data pipeline and checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks: the identity of a tokenizer or input file.

    A token cache and a checkpoint record their tokenizer's hash so a run can refuse to mix tokens
    of one tokenizer with a model trained on another.
    """
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
