"""Load a SentencePiece model from a local path or a ``gs://`` URL.

SentencePiece opens files itself and knows nothing of buckets, so the model's bytes are read
through :mod:`indicfm.storage` and handed over as a serialized proto: the same model wherever it
lives, on every node of a Ray cluster.
"""

from __future__ import annotations

from pathlib import Path

from indicfm.storage import read_bytes


def load_sentencepiece(location: str | Path):
    """A ``sentencepiece.SentencePieceProcessor`` for the model at ``location``."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=read_bytes(location))
