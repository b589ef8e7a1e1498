"""Fairness report of one or more tokenizers on parallel text (FLORES-200 layout).

For every language file in a directory (``hin_Deva.dev``, ``tam_Taml.devtest``, ...; the language is
the name up to the first dot) and every tokenizer, we measure:

* **fertility**: tokens per whitespace-separated word (special tokens never counted);
* **characters per token**;
* **parity**: tokens ÷ the same tokenizer's tokens on the English file (same sentences);
* **akshara split rate**: share of grapheme clusters (``regex`` ``\\X``, which for Indic scripts
  follows aksharas, conjuncts included) that have a token boundary inside;
* **byte-fallback rate**: share of tokens that are ``<0xNN>`` byte pieces (``None`` for byte-level
  BPE tokenizers such as GPT-4o's, where every token is bytes and the notion does not apply);
* **round trip**: share of lines with ``decode(encode(x)) == x``;
* **ZWJ/ZWNJ kept**: how many of the zero-width (non-)joiners of the input survive decoding;
* **normaliser** (per tokenizer): what the tokenizer's own normaliser does beyond NFC — NFKC,
  dropping ZWJ/ZWNJ, stripping vowel signs (:mod:`indicfm.tokenizer.normalizer_check`); a
  tokenizer that would change Indic text this way on every input is flagged even where the sample
  holds no such character.

Each tokenizer sees the text as its own pipeline would: SentencePiece ``.model`` files get
:func:`indicfm.text.normalize` (NFC), as indicfm's data pipeline feeds them; Hugging Face
``tokenizer.json`` files get the raw line, since their normaliser is part of the file (this is also
how the reference counts in ``anchor_fertility_dev.json`` were made).  ``x`` above is that input.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from indicfm.text import ZWJ, ZWNJ, graphemes, is_known_language, language_of_path, normalize
from indicfm.tokenizer.normalizer_check import (
    NormalizerWarning,
    hf_normalizer_warnings,
    sentencepiece_normalizer_warnings,
)

#: The ten languages whose mean fertility and worst parity/split the issue's bar is stated on.
FOCUS_LANGUAGES = (
    "hin_Deva", "ben_Beng", "mar_Deva", "guj_Gujr", "pan_Guru",
    "ory_Orya", "tam_Taml", "tel_Telu", "kan_Knda", "mal_Mlym",
)  # fmt: skip
ENGLISH = "eng_Latn"
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class Tokenized:
    """One line through one tokenizer: enough to compute every metric."""

    text: str  # what the tokenizer was given
    tokens: int
    byte_tokens: int
    boundaries: list[int]  # character offsets in ``text`` where one token ends and the next begins
    decoded: str


class MeasuredSentencePiece:
    """A SentencePiece ``.model`` as measured here; input is NFC-normalised like everything indicfm
    tokenizes.  (Training and data preparation use :mod:`indicfm.tokenizer.load`; this view adds what
    measuring needs: token boundaries as character offsets, byte pieces, the decoded text.)"""

    has_byte_fallback = True

    def __init__(self, path: str | Path, name: str | None = None):
        import sentencepiece as spm

        self.path = Path(path)
        self.name = name or self.path.stem
        self.kind = "sentencepiece"
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.vocab_size()
        self.normalizer_warnings = sentencepiece_normalizer_warnings(self._sp, self.path.read_bytes())

    def prepare(self, raw: str) -> str:
        return normalize(raw)

    def tokenize(self, lines: Sequence[str]) -> list[Tokenized]:
        out = []
        for text in lines:
            pieces = self._sp.encode(text, out_type="proto").pieces
            ids = [p.id for p in pieces]
            char_at_byte = _char_offsets_by_byte(text)
            boundaries = sorted({char_at_byte[p.end] for p in pieces[:-1] if p.end in char_at_byte})
            out.append(
                Tokenized(
                    text=text,
                    tokens=len(ids),
                    byte_tokens=sum(1 for i in ids if self._sp.is_byte(i)),
                    boundaries=boundaries,
                    decoded=self._sp.decode(ids),
                )
            )
        return out


class MeasuredTokenizerJson:
    """A Hugging Face ``tokenizer.json`` (Gemma, Llama, GPT-4o's o200k, ...) as measured here; input is
    the raw line, as the tokenizer's own pipeline (and its published counts) sees it."""

    def __init__(self, path: str | Path, name: str | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.name = name or (self.path.parent.name if self.path.stem == "tokenizer" else self.path.stem)
        self.kind = "huggingface"
        self._tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.has_byte_fallback = self._tok.token_to_id("<0x00>") is not None
        self.normalizer_warnings = hf_normalizer_warnings(self._tok)

    def prepare(self, raw: str) -> str:
        return raw

    def tokenize(self, lines: Sequence[str]) -> list[Tokenized]:
        encodings = self._tok.encode_batch(list(lines), add_special_tokens=False)
        decoded = self._tok.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
        out = []
        for text, enc, dec in zip(lines, encodings, decoded):
            ends = [end for _, end in enc.offsets[:-1]]
            out.append(
                Tokenized(
                    text=text,
                    tokens=len(enc.ids),
                    byte_tokens=sum(1 for t in enc.tokens if _BYTE_PIECE.match(t)),
                    boundaries=sorted(set(ends)),
                    decoded=dec,
                )
            )
        return out


def load_measured(spec: str | Path):
    """``PATH`` or ``NAME=PATH``: a ``.model`` file is SentencePiece, a ``.json`` file Hugging Face."""
    spec = str(spec)
    name = None
    if "=" in spec and not Path(spec).exists():
        name, spec = spec.split("=", 1)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file (expected a SentencePiece .model or a tokenizer.json)")
    if path.suffix == ".json":
        return MeasuredTokenizerJson(path, name)
    return MeasuredSentencePiece(path, name)


def _char_offsets_by_byte(text: str) -> dict[int, int]:
    """UTF-8 byte offset → character offset, for every character start and the end of ``text``."""
    table, offset = {}, 0
    for index, ch in enumerate(text):
        table[offset] = index
        offset += len(ch.encode("utf-8"))
    table[offset] = len(text)
    return table


def split_clusters(text: str, boundaries: Sequence[int]) -> tuple[int, int]:
    """(grapheme clusters in ``text``, clusters with at least one token boundary strictly inside)."""
    clusters = graphemes(text)
    starts, position = [], 0
    for cluster in clusters:
        starts.append(position)
        position += len(cluster)
    split: set[int] = set()
    for b in boundaries:
        i = bisect.bisect_right(starts, b) - 1  # cluster containing character b
        if 0 <= i < len(clusters) and starts[i] < b:
            split.add(i)
    return len(clusters), len(split)


def zero_width_kept(text: str, decoded: str) -> tuple[int, int]:
    """(ZWJ + ZWNJ in the input, how many the decoded line still has, at most as many)."""
    total = 0
    kept = 0
    for ch in (ZWJ, ZWNJ):
        n = text.count(ch)
        total += n
        kept += min(n, decoded.count(ch))
    return total, kept


@dataclass
class LanguageMetrics:
    lines: int = 0
    words: int = 0
    characters: int = 0
    tokens: int = 0
    byte_tokens: int = 0
    clusters: int = 0
    split_clusters: int = 0
    round_trips: int = 0
    zero_width: int = 0
    zero_width_kept: int = 0
    fertility: float = math.nan
    chars_per_token: float = math.nan
    parity: float | None = None
    akshara_split_rate: float = math.nan
    byte_fallback_rate: float | None = None
    round_trip_rate: float = math.nan

    def add(self, t: Tokenized) -> None:
        self.lines += 1
        self.words += len(t.text.split())
        self.characters += len(t.text)
        self.tokens += t.tokens
        self.byte_tokens += t.byte_tokens
        clusters, split = split_clusters(t.text, t.boundaries)
        self.clusters += clusters
        self.split_clusters += split
        self.round_trips += t.decoded == t.text
        total, kept = zero_width_kept(t.text, t.decoded)
        self.zero_width += total
        self.zero_width_kept += kept

    def finish(self, has_byte_fallback: bool) -> None:
        self.fertility = self.tokens / self.words if self.words else math.nan
        self.chars_per_token = self.characters / self.tokens if self.tokens else math.nan
        self.akshara_split_rate = self.split_clusters / self.clusters if self.clusters else math.nan
        self.byte_fallback_rate = (self.byte_tokens / self.tokens if self.tokens else math.nan) if has_byte_fallback else None
        self.round_trip_rate = self.round_trips / self.lines if self.lines else math.nan


def measure_lines(tokenizer, raw_lines: Sequence[str]) -> LanguageMetrics:
    """Every per-language metric but parity, for one tokenizer on one language's lines."""
    metrics = LanguageMetrics()
    for t in tokenizer.tokenize([tokenizer.prepare(line) for line in raw_lines]):
        metrics.add(t)
    metrics.finish(tokenizer.has_byte_fallback)
    return metrics


@dataclass
class TokenizerReport:
    name: str
    path: str
    kind: str
    vocab_size: int
    languages: dict[str, LanguageMetrics] = field(default_factory=dict)
    normalizer_warnings: list[NormalizerWarning] = field(default_factory=list)

    @property
    def normalizer(self) -> str:
        """The normaliser column: what it changes beyond NFC, or "NFC-safe"."""
        return ", ".join(w.short for w in self.normalizer_warnings) or "NFC-safe"

    def summary(self) -> dict:
        """The bar's figures over the focus languages present (and round trip/ZWJ over all)."""
        focus = [self.languages[lang] for lang in FOCUS_LANGUAGES if lang in self.languages]
        parities = [m.parity for m in focus if m.parity is not None]
        return {
            "focus_languages": len(focus),
            "mean_fertility": sum(m.fertility for m in focus) / len(focus) if focus else None,
            "max_parity": max(parities) if parities else None,
            "max_akshara_split_rate": max(m.akshara_split_rate for m in focus) if focus else None,
            "mean_akshara_split_rate": sum(m.akshara_split_rate for m in focus) / len(focus) if focus else None,
            "min_round_trip_rate": min(m.round_trip_rate for m in self.languages.values()),
            "zero_width_kept": sum(m.zero_width_kept for m in self.languages.values()),
            "zero_width_total": sum(m.zero_width for m in self.languages.values()),
        }


@dataclass
class Report:
    parallel_dir: str
    tokenizers: list[TokenizerReport]

    def to_dict(self) -> dict:
        return {
            "parallel_dir": self.parallel_dir,
            "tokenizers": [
                {
                    "name": t.name,
                    "path": t.path,
                    "kind": t.kind,
                    "vocab_size": t.vocab_size,
                    "normalizer": t.normalizer,
                    "normalizer_warnings": [w.detail for w in t.normalizer_warnings],
                    "summary": t.summary(),
                    "languages": {lang: asdict(m) for lang, m in t.languages.items()},
                }
                for t in self.tokenizers
            ],
        }

    def to_markdown(self) -> str:
        lines = [f"# Tokenizer fairness report\n\nParallel text: `{self.parallel_dir}`\n"]
        for t in self.tokenizers:
            s = t.summary()
            lines.append(f"## {t.name} ({t.kind}, vocab {t.vocab_size:,})\n")
            lines.append(
                f"Mean fertility over {s['focus_languages']} focus languages: {_fmt(s['mean_fertility'])}; "
                f"worst parity {_fmt(s['max_parity'])}; worst akshara split {_pct(s['max_akshara_split_rate'])}; "
                f"lowest round trip {_pct(s['min_round_trip_rate'])}; "
                f"ZWJ/ZWNJ kept {s['zero_width_kept']}/{s['zero_width_total']}; normaliser: {t.normalizer}.\n"
            )
            lines += [f"- Warning: {w.detail}." for w in t.normalizer_warnings]
            lines += [""] if t.normalizer_warnings else []
            lines.append("| language | fertility | chars/token | parity | akshara split | byte fallback | round trip | "
                         "ZWJ/ZWNJ kept | normaliser |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
            for lang, m in t.languages.items():
                lines.append(
                    f"| {lang} | {_fmt(m.fertility)} | {_fmt(m.chars_per_token)} | {_fmt(m.parity)} | "
                    f"{_pct(m.akshara_split_rate)} | {_pct(m.byte_fallback_rate)} | {_pct(m.round_trip_rate)} | "
                    f"{m.zero_width_kept}/{m.zero_width} | {t.normalizer} |"
                )
            lines.append("")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def read_parallel_dir(parallel_dir: str | Path) -> dict[str, list[str]]:
    """Language code → raw lines of every language file in ``parallel_dir`` (sorted by code).

    Files whose name does not start with a known FLORES-200 code (README, LICENSE, ...) are ignored;
    a file that is not UTF-8 is an error naming it and the line.
    """
    directory = Path(parallel_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (expected one file per language, e.g. hin_Deva.dev)")
    texts: dict[str, list[str]] = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        lang = language_of_path(path)
        if not is_known_language(lang):
            continue
        if lang in texts:
            raise ValueError(f"{path}: a second file for {lang} in {directory}")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not valid UTF-8 ({err.reason})") from None
        texts[lang] = text.removeprefix("\ufeff").splitlines()
    if not texts:
        raise ValueError(f"{directory}: no language files (names like hin_Deva.dev) found")
    return texts


def evaluate_tokenizers(models: Sequence[str | Path], parallel_dir: str | Path) -> Report:
    """Measure every tokenizer (``.model``, ``tokenizer.json`` or ``NAME=PATH``) on ``parallel_dir``.

    Parity needs ``eng_Latn.*`` in the directory and the same number of lines as each language;
    otherwise it is ``None``.
    """
    texts = read_parallel_dir(parallel_dir)
    reports = []
    for spec in models:
        tok = load_measured(spec)
        report = TokenizerReport(name=tok.name, path=str(tok.path), kind=tok.kind, vocab_size=tok.vocab_size,
                                 normalizer_warnings=tok.normalizer_warnings)
        for lang, lines in texts.items():
            report.languages[lang] = measure_lines(tok, lines)
        english = report.languages.get(ENGLISH)
        for lang, m in report.languages.items():
            if english is not None and english.tokens and len(texts[lang]) == len(texts[ENGLISH]):
                m.parity = m.tokens / english.tokens
        reports.append(report)
    return Report(parallel_dir=str(parallel_dir), tokenizers=reports)


def write_report(report: Report, output: str | Path) -> tuple[Path, Path]:
    """Write ``output`` as JSON and Markdown (``X.json`` and ``X.md``; a suffix given is replaced)."""
    base = Path(output)
    if base.suffix in (".json", ".md"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".md")
    json_path.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(report.to_markdown(), encoding="utf-8")
    return json_path, md_path
