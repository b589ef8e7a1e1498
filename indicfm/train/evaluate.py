"""Held-out evaluation in bits per byte (bpb), per language.

Why bits per byte and not loss per token: a tokenizer with a bigger vocabulary makes fewer, harder
tokens, so per-token loss does not compare across tokenizers (or across languages with different
fertility).  The cost of the text in bits divided by its size in UTF-8 bytes does.

bpb(lang) = Σ −log₂ p(token) over every token of the held-out lines ÷ Σ UTF-8 bytes of those lines

Each line is normalised exactly like training text (``indicfm.text.normalize``, NFC, nothing else)
and its bytes are counted after normalisation.  A line becomes ``[bos] + tokens``, as every training
document begins (``data prepare`` packs ``[BOS] tokens [EOS]``, with the run's tokenizer's own start
id: its bos, or its eos where it has none); the model predicts every text token from its prefix (not
the ``bos``, no ``eos``); a line longer than a row is split into pieces of ``seq_len − 1`` tokens,
each with its own ``bos`` (slightly pessimistic, never drops text).  The tokenizer is whatever the
run trains with (SentencePiece or a ``tokenizer.json``, :mod:`indicfm.tokenizer.load`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from indicfm.text import language_of_path, normalize

HELDOUT_SUFFIXES = (".dev", ".devtest", ".txt")


@dataclass
class HeldoutSet:
    """One language's held-out text, tokenized into fixed-size rows."""

    lang: str
    tokens: np.ndarray  # int32 [N, L]
    segment_ids: np.ndarray  # int32 [N, L], 1 for the piece, 0 for padding
    positions: np.ndarray  # int32 [N, L]
    num_bytes: int
    num_lines: int
    num_tokens: int


def read_heldout_lines(directory: str | Path, max_lines: int, languages: Iterable[str] = ()) -> dict[str, list[str]]:
    """``{lang: [line, ...]}`` from ``{lang}.dev``-style files (raw, not yet normalised); empty lines skipped."""
    wanted = set(languages)
    found: dict[str, list[str]] = {}
    for path in sorted(Path(directory).iterdir()):
        if path.suffix not in HELDOUT_SUFFIXES or not path.is_file():
            continue
        lang = language_of_path(path)
        if not lang or (wanted and lang not in wanted) or lang in found:
            continue
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        found[lang] = lines[:max_lines]
    if not found:
        raise FileNotFoundError(f"no held-out files ({', '.join(HELDOUT_SUFFIXES)}) named by language code in {directory}")
    return found


def build_heldout_set(lang: str, lines: list[str], encode: Callable[[str], list[int]], seq_len: int, *,
                      bos_id: int) -> HeldoutSet:
    """Normalise, count bytes, tokenize and lay out the lines of one language as ``[bos] + piece`` rows
    (``bos_id``: what training documents begin with)."""
    rows: list[list[int]] = []
    num_bytes = num_tokens = 0
    for raw in lines:
        text = normalize(raw)
        ids = encode(text)
        num_bytes += len(text.encode("utf-8"))
        num_tokens += len(ids)
        for start in range(0, len(ids), seq_len - 1):
            rows.append([bos_id] + ids[start : start + seq_len - 1])
    tokens = np.zeros((len(rows), seq_len), np.int32)
    segments = np.zeros((len(rows), seq_len), np.int32)
    positions = np.zeros((len(rows), seq_len), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        segments[i, : len(row)] = 1
        positions[i, : len(row)] = np.arange(len(row))
    return HeldoutSet(lang, tokens, segments, positions, num_bytes, len(lines), num_tokens)


def load_heldout(
    directory: str | Path, tokenizer_file: str | Path, seq_len: int, max_lines: int, languages: Iterable[str] = ()
) -> list[HeldoutSet]:
    """Every language's held-out set, tokenized with the run's tokenizer (SentencePiece or tokenizer.json)."""
    from indicfm.tokenizer.load import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_file)
    lines = read_heldout_lines(directory, max_lines, languages)
    return [build_heldout_set(lang, lang_lines, tokenizer.encode, seq_len, bos_id=tokenizer.start_id)
            for lang, lang_lines in lines.items()]


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    return nll_nats / math.log(2) / max(num_bytes, 1)


def fixed_shape_batches(arrays: dict[str, np.ndarray], rows: int) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
    """``(first row, batch)`` of ``rows`` rows of each ``[N, L]`` array; the last batch is padded
    with zero rows (segment 0: no loss, no score), so every batch has one shape and the jitted
    program never recompiles."""
    total = len(next(iter(arrays.values())))
    for start in range(0, total, rows):
        batch = {k: v[start : start + rows] for k, v in arrays.items()}
        pad = rows - len(next(iter(batch.values())))
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad, v.shape[1]), v.dtype)]) for k, v in batch.items()}
        yield start, batch


def evaluate_bpb(
    sets: list[HeldoutSet], nll_fn: Callable[[dict[str, np.ndarray]], tuple[float, float]], batch_size: int
) -> dict[str, float]:
    """``{lang: bits per byte}`` (plus ``"mean"`` over languages).

    ``nll_fn(batch) -> (CE sum in nats, predicted token count)`` runs the model on a ``[batch_size, L]``
    numpy batch; the last batch of a language is padded with empty rows (segment 0, no loss).
    """
    result: dict[str, float] = {}
    for heldout in sets:
        total_nll = total_predicted = 0.0
        arrays = {"tokens": heldout.tokens, "segment_ids": heldout.segment_ids, "positions": heldout.positions}
        for _, batch in fixed_shape_batches(arrays, batch_size):
            nll, predicted = nll_fn(batch)
            total_nll += float(nll)
            total_predicted += float(predicted)
        if int(round(total_predicted)) != heldout.num_tokens:
            raise AssertionError(f"{heldout.lang}: predicted {total_predicted} tokens, expected {heldout.num_tokens}")
        result[heldout.lang] = bits_per_byte(total_nll, heldout.num_bytes)
    if result:
        result["mean"] = float(np.mean(list(result.values())))
    return result
