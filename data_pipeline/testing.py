"""Small fixtures for tests and benchmarks: a tiny tokenizer and a corpus with known bad documents.

Kept in the package (not under tests/) because the benchmarks use them too.  Nothing here is used
by ``data prepare`` itself.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path


def train_tiny_tokenizer(input_dir: str | Path, model_prefix: str | Path, vocab_size: int = 1000) -> Path:
    """A small BPE SentencePiece model (≈1 s) with indicfm's conventions: no normalisation of its
    own (``identity``: indicfm applies NFC once; spaces kept as they are), byte fallback,
    pad=0 unk=1 bos=2 eos=3."""
    import sentencepiece as spm

    files = sorted(str(p) for p in Path(input_dir).glob("*.txt"))
    spm.SentencePieceTrainer.train(
        input=files,
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        character_coverage=0.98,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return Path(f"{model_prefix}.model")


@dataclass(frozen=True)
class Injected:
    """One document planted in the corpus: where, and the reason it must be dropped for."""

    file: str  # file name inside the corpus directory
    line: int  # 1-based
    reason: str
    lang: str


def _long_line(lines: list[str], min_chars: int) -> int:
    """Index of the first line at least ``min_chars`` long."""
    return next(i for i, line in enumerate(lines) if len(line) >= min_chars)


def make_injected_corpus(sample_dir: str | Path, out_dir: str | Path, huge_line_bytes: int = 2 << 20) -> list[Injected]:
    """Copy the shipped sample to ``out_dir`` and append documents that must be dropped.

    Returns the planted documents with their expected reason.  Each one is built so that exactly
    that reason is the first that applies (see the drop order in ``indicfm.data.report``).
    """
    sample_dir, out_dir = Path(sample_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(sample_dir.glob("*.txt")):
        shutil.copy(path, out_dir / path.name)
    injected: list[Injected] = []

    def append(name: str, payload: bytes, reason: str) -> None:
        path = out_dir / name
        data = path.read_bytes() if path.exists() else b""
        if data and not data.endswith(b"\n"):
            data += b"\n"
        line = data.count(b"\n") + 1
        path.write_bytes(data + payload + b"\n")
        injected.append(Injected(name, line, reason, name.split(".")[0]))

    hin = (sample_dir / "hin_Deva.txt").read_text(encoding="utf-8").splitlines()
    tam = (sample_dir / "tam_Taml.txt").read_text(encoding="utf-8").splitlines()
    mar = (sample_dir / "mar_Deva.txt").read_text(encoding="utf-8").splitlines()
    eng = (sample_dir / "eng_Latn.txt").read_text(encoding="utf-8").splitlines()

    # Read-time reasons.
    append("hin_Deva.txt", "यह पंक्ति ठीक है पर इसमें ".encode() + b"\xff\xfe" + " बाइट है".encode(), "invalid_utf8")
    append("hin_Deva.txt", "यह पंक्ति ठीक है पर इसमें\x00 शून्य है".encode(), "control_chars")
    append("hin_Deva.txt", b"", "empty")
    append("tam_Taml.txt", b" \t  ", "empty")
    append("tam_Taml.txt", ("அ" * (huge_line_bytes // 3)).encode(), "too_long")  # 3 bytes per letter
    # Quality filters.
    append("tam_Taml.txt", "வணக்கம்".encode(), "too_short")
    append("hin_Deva.txt", "१२३४ ५६७८ ९०१२ — ३४५६ %% ७८९० ##".encode(), "too_many_symbols")
    append("hin_Deva.txt", " ".join(["यह", "बात", "बार", "बार", "दोहराई", "गई"] * 12).encode(), "repeated_ngrams")
    # Script purity and language identification.
    append("hin_Deva.txt", eng[_long_line(eng, 40)].encode(), "wrong_script")
    append("hin_Deva.txt", mar[_long_line(mar, 120)].encode(), "wrong_language")
    # Deduplication (the originals stay; the copies go). A copy in another language's file is a
    # duplicate too: deduplication runs across all sources and languages.
    i = _long_line(hin, 200)
    append("hin_Deva.txt", hin[i].encode(), "exact_duplicate")
    append("hin_Deva.txt", ("  " + hin[i].replace(" ", "   ") + " ").encode(), "exact_duplicate")
    j = _long_line(tam, 250)
    near = tam[j][:-1] + ("." if tam[j][-1] != "." else "!")  # one character changed
    append("tam_Taml.txt", near.encode(), "near_duplicate")
    # A malformed JSON record, counted under "unknown".
    extra = out_dir / "extra.jsonl"
    extra.write_text(json.dumps({"text": "Valid record in English with several words.", "lang": "eng_Latn"}) + "\n")
    append("extra.jsonl", b'{"text": "unterminated', "malformed_record")
    injected[-1] = Injected("extra.jsonl", injected[-1].line, "malformed_record", "unknown")
    return injected
