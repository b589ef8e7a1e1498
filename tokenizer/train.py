"""Train indicfm's SentencePiece tokenizer: read → balance languages → train → write model + manifest.

One path, four steps, each a function:

1. :func:`scan_inputs` reads every input with the project's one reader
   (:mod:`indicfm.data.sources`, which NFC-normalises and rejects undecodable, control-character,
   empty and too long lines), counting accepted documents per language and dropped ones per file
   and reason.
2. :func:`indicfm.tokenizer.sampling.allocate` decides how many documents each language contributes.
3. :func:`sampled_sentences` reads the inputs a second time and yields the chosen documents, so
   memory holds only SentencePiece's own copy of the sample, never the whole corpus.
4. Training: by default BPE whose merges keep aksharas whole (:mod:`indicfm.tokenizer.akshara_bpe`, saved
   as a SentencePiece model), otherwise SentencePiece's own trainer.  Either way the options of
   :func:`sentencepiece_options` hold: no normalisation of its own (the text is already NFC; its
   default NFKC would delete ZWJ/ZWNJ), byte fallback, split digits and every letter of the 22
   languages' scripts as required characters.

It writes ``P.model``, ``P.vocab`` and ``P.json`` (inputs with sha256, per-language counts, every
training parameter, the indicfm version).  The ``.model`` is a plain SentencePiece model: load it
with ``sentencepiece.SentencePieceProcessor(model_file="P.model")``; feed it text passed through
:func:`indicfm.text.normalize`.
"""

from __future__ import annotations

import json
import os
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from indicfm.data.sources import InputFile, find_input_files, iter_documents
from indicfm import __version__
from indicfm.storage import file_sha256
from indicfm.text import SCRIPT_RANGES, script_letters
from indicfm.tokenizer import akshara_bpe
from indicfm.tokenizer.config import TokenizerConfig
from indicfm.tokenizer.sampling import allocate, choose_indices

#: Fixed ids of the special pieces; the data pipeline and the model rely on them.
SPECIAL_IDS: dict[str, int] = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


@dataclass
class FileStats:
    """What one input file contributed, and what was skipped in it and why."""

    path: str
    format: str
    lang: str | None  # from the file name; None for JSON lines (language per record)
    sha256: str
    documents: int = 0
    accepted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # drop reason → count


@dataclass
class TrainResult:
    model_file: Path
    vocab_file: Path
    manifest_file: Path  # P.json
    available: dict[str, int]  # accepted documents per language
    sampled: dict[str, int]  # documents used for training per language
    files: list[FileStats]
    seconds: float



def required_characters() -> str:
    """Every letter and sign of the scripts of the 22 languages (and Latin), as one string.

    Made required so that no letter of a small language falls back to bytes just because the sample
    missed it.  Compatibility forms (Arabic presentation forms and the like, whose decomposition is
    tagged ``<...>``) are left out: normalised text spells them with the base letters.
    """
    chars: set[str] = set()
    for script in SCRIPT_RANGES:
        chars.update(ch for ch in script_letters(script) if not unicodedata.decomposition(ch).startswith("<"))
    return "".join(sorted(chars))


def minimum_vocab_size() -> int:
    """Smallest vocabulary that holds the special pieces, 256 byte pieces and the required letters
    (plus a little room for merges)."""
    return len(SPECIAL_IDS) + 256 + len(required_characters()) + 64


def sentencepiece_options(cfg: TokenizerConfig, max_document_chars: int | None = None) -> dict:
    """Keyword arguments for ``SentencePieceTrainer.train`` (without input and output)."""
    max_chars = max_document_chars or cfg.max_document_chars
    return {
        "vocab_size": cfg.vocab_size,
        "model_type": cfg.model_type,
        # indicfm normalises (NFC) before SentencePiece sees the text, and SentencePiece must not
        # normalise again: its default nmt_nfkc removes ZWJ/ZWNJ and folds compatibility forms.
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": True,
        "byte_fallback": True,
        "split_digits": True,
        "character_coverage": 1.0,
        "required_chars": required_characters(),
        "max_sentencepiece_length": cfg.max_piece_chars,
        # Every line we pass is used: our reader already dropped over-long documents, so
        # SentencePiece's own 4192-byte limit must not silently drop more.
        "max_sentence_length": 4 * max_chars + 16,
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        "allow_whitespace_only_pieces": True,
        "seed_sentencepiece_size": 1_000_000,
        "num_threads": cfg.num_threads or os.cpu_count() or 1,
        "pad_id": SPECIAL_IDS["pad"],
        "unk_id": SPECIAL_IDS["unk"],
        "bos_id": SPECIAL_IDS["bos"],
        "eos_id": SPECIAL_IDS["eos"],
    }


def scan_inputs(
    files: Sequence[InputFile], max_document_chars: int, on_file=None
) -> tuple[list[FileStats], dict[str, int]]:
    """First pass: per-file statistics and accepted documents per language."""
    stats: list[FileStats] = []
    available: Counter[str] = Counter()
    for f in files:
        if on_file:
            on_file(f)
        st = FileStats(path=str(f.path), format=f.format, lang=f.lang, sha256=file_sha256(f.path))
        dropped: Counter[str] = Counter()
        for doc in iter_documents(f, max_chars=max_document_chars):
            st.documents += 1
            if doc.drop_reason is None:
                st.accepted += 1
                available[doc.lang] += 1
            else:
                dropped[doc.drop_reason] += 1
        st.dropped = dict(sorted(dropped.items()))
        stats.append(st)
    return stats, dict(sorted(available.items()))


def sampled_sentences(
    files: Sequence[InputFile], chosen: dict[str, set[int]], max_document_chars: int, on_file=None
) -> Iterator[str]:
    """Second pass: the chosen documents' lines, in reading order (a JSON record may hold several)."""
    seen: Counter[str] = Counter()
    for f in files:
        if on_file:
            on_file(f)
        for doc in iter_documents(f, max_chars=max_document_chars):
            if doc.drop_reason is not None:
                continue
            index = seen[doc.lang]
            seen[doc.lang] += 1
            if index in chosen.get(doc.lang, ()):
                for line in doc.text.split("\n"):
                    if line.strip():
                        yield line


def train_akshara_bpe(
    sentences: list[str], output_prefix: Path, cfg: TokenizerConfig, options: dict, on_progress=None
) -> None:
    """Write ``P.model``/``P.vocab`` whose BPE merges keep aksharas whole (:mod:`indicfm.tokenizer.akshara_bpe`).

    SentencePiece still provides everything but the merges: a tiny model trained with the same options
    gives the normaliser spec, special and byte pieces and the required characters.
    """
    import io

    import sentencepiece as spm

    characters = set("".join(sentences)) | set(options["required_chars"]) | {akshara_bpe.WHITESPACE}
    skeleton = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=skeleton,
        minloglevel=2,
        **{**options, "vocab_size": len(SPECIAL_IDS) + 256 + len(characters) + 8},
    )
    fixed = len(SPECIAL_IDS) + 256 + len(characters)
    pieces, seen = akshara_bpe.learn_pieces(
        sentences,
        cfg.vocab_size - fixed,
        min_cluster_count=cfg.min_cluster_count,
        max_piece_chars=cfg.max_piece_chars,
        on_progress=on_progress,
    )
    model = akshara_bpe.build_model(skeleton.getvalue(), pieces, characters | seen, cfg.vocab_size)
    size = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    if size < cfg.vocab_size:  # the model's embedding table is sized from vocab_size: never silently smaller
        raise ValueError(
            f"the sampled text ({len(sentences):,} lines) yields only {size:,} pieces; "
            f"lower tokenizer.vocab_size (asked for {cfg.vocab_size:,}) or give more text"
        )
    output_prefix.with_name(output_prefix.name + ".model").write_bytes(model)
    processor = spm.SentencePieceProcessor(model_proto=model)
    with open(output_prefix.with_name(output_prefix.name + ".vocab"), "w", encoding="utf-8") as vocab:
        for i in range(processor.vocab_size()):
            vocab.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")


def train_tokenizer(
    inputs: Iterable[str | Path],
    output_prefix: str | Path,
    cfg: TokenizerConfig,
    *,
    allow_unknown: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Train a tokenizer on ``inputs`` (files and directories) and write ``output_prefix``.{model,vocab,json}.

    Raises :class:`indicfm.data.sources.InputError` for a missing path or (unless
    ``allow_unknown``) a file whose name is not a FLORES-200 language code; bad lines are skipped
    and counted per file, never fatal.  ``ValueError`` if no document survives.
    """
    import sentencepiece as spm

    minimum = minimum_vocab_size()
    if cfg.vocab_size < minimum:
        raise ValueError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small: the {len(required_characters())} required letters "
            f"of the 22 languages' scripts, {len(SPECIAL_IDS)} special and 256 byte pieces need at least {minimum}"
        )
    start = time.perf_counter()
    files = find_input_files(list(inputs), allow_unknown=allow_unknown)
    if not files:
        raise ValueError(f"no input files (.txt, .dev, .jsonl, .parquet) found in {list(map(str, inputs))}")
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)

    with _Progress(progress, len(files)) as bar:
        bar.stage("reading")
        stats, available = scan_inputs(files, cfg.max_document_chars, on_file=bar.file)
        if sum(available.values()) == 0:
            raise ValueError("every input document was rejected; see the skip counts per file")
        sampled = allocate(available, cfg.max_sentences, cfg.sampling_alpha)
        chosen = {lang: choose_indices(available[lang], k, cfg.seed, lang) for lang, k in sampled.items()}
        options = sentencepiece_options(cfg)
        sentences = sampled_sentences(files, chosen, cfg.max_document_chars, on_file=bar.file)
        if cfg.model_type == "bpe" and cfg.whole_aksharas:
            bar.stage(f"sampling {sum(sampled.values()):,} documents")
            sentence_list = list(sentences)
            train_akshara_bpe(sentence_list, output_prefix, cfg, options, on_progress=bar.merges)
        else:
            bar.stage(f"sampling {sum(sampled.values()):,} documents and training SentencePiece {cfg.model_type} {cfg.vocab_size:,}")
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences, model_prefix=str(output_prefix), minloglevel=2, **options
            )

    seconds = time.perf_counter() - start
    result = TrainResult(
        model_file=output_prefix.with_name(output_prefix.name + ".model"),
        vocab_file=output_prefix.with_name(output_prefix.name + ".vocab"),
        manifest_file=output_prefix.with_name(output_prefix.name + ".json"),
        available=available,
        sampled={lang: sampled[lang] for lang in available},
        files=stats,
        seconds=seconds,
    )
    manifest = {
        "indicfm_version": __version__,
        "model_file": result.model_file.name,
        "special_ids": SPECIAL_IDS,
        "normalization": "NFC by indicfm.text.normalize; SentencePiece identity",
        "trainer": "akshara_bpe" if cfg.model_type == "bpe" and cfg.whole_aksharas else "sentencepiece",
        "inputs": [asdict(st) for st in stats],
        "languages": {lang: {"available": available[lang], "sampled": sampled[lang]} for lang in available},
        "sampling": {
            "alpha": cfg.sampling_alpha,
            "max_sentences": cfg.max_sentences,
            "seed": cfg.seed,
            "sampled_total": sum(sampled.values()),
        },
        "config": cfg.model_dump(mode="json"),
        "sentencepiece": options,
        "training_seconds": round(seconds, 2),
    }
    result.manifest_file.write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return result


class _Progress:
    """A rich progress bar over input files per pass, or nothing (library calls and tests)."""

    def __init__(self, enabled: bool, files: int):
        self.enabled, self.files = enabled, files
        self._progress = None
        self._task = None
        self._merge_task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
            )
            self._progress.__enter__()
        return self

    def stage(self, description: str) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.update(self._task, completed=self.files)
            self._task = self._progress.add_task(description, total=self.files)

    def merges(self, done: int, total: int) -> None:
        if self._progress is not None:
            if self._merge_task is None:
                self._merge_task = self._progress.add_task("learning akshara BPE merges", total=total)
            self._progress.update(self._merge_task, completed=done)

    def file(self, f: InputFile) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
