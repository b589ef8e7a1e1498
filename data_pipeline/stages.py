"""The per-document stages of ``data prepare``, the same code whichever engine runs them.

A batch of documents (a task) goes through::

    read        a line range of a text / JSON-lines file (RangeTask), or documents the engine read
                itself (DocumentsTask: parquet, hub datasets): decode, NFC-normalise, read-time
                reasons (malformed_record, invalid_utf8, control_chars, empty, too_long)
    clean       quality filters and wrong_script (indicfm.data.filters), per language
    identify    language ID (wrong_language, indicfm.data.lid) where another language shares the script
    key         exact key, and MinHash fingerprint + LSH band keys (indicfm.data.dedup)
    tokenize    start (BOS) + the tokenizer's ids + EOS (indicfm.data.tokenize)

Why one module both engines import: everything here depends on one batch only, never on earlier
documents, so it can run anywhere (a local worker process, a Ray task) and the engines differ only
in what must follow input order (deduplication decisions, packing, writing).  Running the very same
code is what makes the local engine's cache and the Ray engine's equal bit for bit.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from indicfm.data.config import DataConfig
from indicfm.data.dedup import band_hashes, exact_key, fingerprints, lsh_bands, minhasher
from indicfm.data.features import BatchFeatures, batch_features
from indicfm.data.filters import batch_check, filters_for
from indicfm.data.lid import get_identifier, lid_verdict, shares_script
from indicfm.data.report import EXAMPLE_CHARS
from indicfm.data.sources import Document, DocumentColumns, InputFile, LineRange, read_line_range
from indicfm.data.tokenize import batch_encoder
from indicfm.tokenizer.load import HF, load_tokenizer

#: Documents per batch (a task).  Larger batches spread each batch's fixed NumPy and SentencePiece
#: call overheads over more documents; much larger ones leave processes idle while the last
#: batches finish (``benchmarks/prepare.py`` measures the trade).  Engines read it when they cut
#: their inputs (not at import), so tests and benchmarks can change it.
BATCH_DOCS = 1024
#: A line range holds at most BATCH_DOCS lines and about this many bytes: a batch's work and memory
#: grow with its text, so a file of long documents still gives batches of about even size.
RANGE_BYTES = 2 << 20


# -- read -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RangeTask:
    """Read lines ``range`` of ``file`` in the worker, skipping the first ``skip`` (a resume).

    Only the range travels to the worker, not the text: the engine's own process, which must keep
    input order, does no more than a newline scan of text and JSON-lines files."""

    file: InputFile
    range: LineRange
    skip: int = 0


@dataclass(frozen=True)
class DocumentsTask:
    """Documents the engine read itself (parquet, hub datasets: no line ranges to hand out)."""

    documents: list[Document]


def reader_max_chars(config: DataConfig) -> int:
    """The reader knows a document's language only once it has read it, so it applies the largest
    limit of any language; :meth:`DocumentProcessor.reasons` applies each language's own."""
    return max([config.filters.max_chars] + [
        f.max_chars for f in config.language_filters.values() if "max_chars" in f.model_fields_set
    ])


def read_task(task: RangeTask | DocumentsTask, config: DataConfig,
              max_chars: int) -> tuple[str, Sequence[int], DocumentColumns]:
    """(source, line numbers, documents) of a task, as read and normalised (not yet filtered).

    Workers read their tasks; an engine reads one again only for the text of a report example of a
    duplicate (the few first ones), so results need not carry every document's text."""
    if isinstance(task, DocumentsTask):
        docs = task.documents
        return (docs[0].source if docs else "", [d.line for d in docs], DocumentColumns.from_documents(docs))
    columns = read_line_range(task.file, task.range, max_chars=max_chars,
                              text_field=config.text_field, lang_field=config.lang_field)
    first = task.range.first_line + task.skip
    if task.skip:
        columns = DocumentColumns(*(x[task.skip :] for x in (columns.langs, columns.texts, columns.reasons,
                                                              columns.previews)))
    return str(task.file.path), range(first, first + len(columns.texts)), columns


def document_batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    """``docs`` as DocumentsTask batches of at most BATCH_DOCS documents."""
    while batch := list(itertools.islice(docs, BATCH_DOCS)):
        yield batch


# -- clean, identify, key, tokenize ---------------------------------------------------------------


@dataclass
class BatchResult:
    """Everything an engine needs about one batch of documents, as columns.

    ``reasons`` covers every document of the batch: its read-time, filter or language-ID reason,
    or None when it reached deduplication ("passing"); the other arrays cover passing documents.
    Columns, not per-document objects: a result crosses a process boundary (pickled), and the
    engine's in-order work on it is a few whole-array operations.
    """

    source: str
    lines: Sequence[int]  # per document: 1-based line / record number (a range for a line range)
    langs: list[str]  # per document
    reasons: list[str | None]  # per document
    previews: list[str]  # per document: what report examples show of a dropped one ("" if passing)
    keys: list[bytes]  # for passing documents, in order
    fingerprints: np.ndarray | None  # [passing, num_perm] uint8: b-bit MinHash (dedup.fingerprints)
    bands: np.ndarray | None  # [passing, bands] uint64 LSH band hashes
    token_ids: np.ndarray  # passing documents' ids (EOS appended), concatenated, int32
    lengths: np.ndarray  # [passing] tokens of each
    cpu_seconds: float = 0.0  # CPU time the worker spent on this batch
    features: BatchFeatures | None = None  # per document: indicfm.data.features columns


class DocumentProcessor:
    """Reading (of a line range), filters, language ID, dedup keys and tokenization of a batch.

    One per process, built once (:func:`make_processor`): the tokenizer, language identifier and
    MinHash permutations are costly to load and are reused for every batch."""

    def __init__(self, config: DataConfig, tokenizer_file: str):
        self.config = config
        self.tokenizer = load_tokenizer(tokenizer_file)
        if self.tokenizer.kind == HF:
            # One tokenizer per process already uses every CPU (worker processes, Ray tasks); the
            # ``tokenizers`` library's own threads would only compete with them.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.encoder = batch_encoder(self.tokenizer)
        self.identifier = get_identifier(config.lid.backend) if config.lid.enabled else None
        self.minhasher = minhasher(config.dedup)
        self.lsh_bands, self.lsh_rows = lsh_bands(config.dedup.threshold, config.dedup.num_perm)
        self.max_chars = reader_max_chars(config)
        self._filters: dict = {}
        self._lid_languages: dict[str, bool] = {}

    def _filters_for(self, lang: str):
        f = self._filters.get(lang)
        if f is None:
            f = self._filters[lang] = filters_for(self.config, lang)
        return f

    def reasons(self, items: list[tuple[str, str]]) -> tuple[list[str | None], np.ndarray]:
        """Quality, script and language-ID reason (or None) of each (lang, text), and whether each
        text's whitespace differs from ``" ".join(text.split())`` (see filters.CharStats)."""
        return self.column_reasons([lang for lang, _ in items], [text for _, text in items])

    def column_reasons(self, langs: list[str], texts: list[str]) -> tuple[list[str | None], np.ndarray]:
        """:meth:`reasons` of documents given as two columns."""
        reasons, stats, _ = self.column_checks(langs, texts)
        return reasons, stats.uncollapsed

    def column_checks(self, langs: list[str], texts: list[str], lid_all: bool = False):
        """(reasons, CharStats, LID predictions {index: (language, confidence)}) of documents given
        as two columns.  ``lid_all``: run LID on every document it can judge, also those an
        earlier rule drops (the features file records them, so review can re-apply thresholds)."""
        config_of = {lang: self._filters_for(lang) for lang in dict.fromkeys(langs)}
        reasons, stats = batch_check(texts, langs, [config_of[lang] for lang in langs])
        lid = self.config.lid
        predictions: dict[int, tuple[str | None, float]] = {}
        for lang, f in config_of.items():
            own_limit = f.max_chars < self.max_chars  # a per-language limit below the reader's
            needs_lid = self._needs_lid(lang)
            if not (own_limit or needs_lid):
                continue
            for i in (i for i, x in enumerate(langs) if x == lang):
                if own_limit and len(texts[i]) > f.max_chars:  # it comes first: cheap checks first
                    reasons[i] = "too_long"
                if needs_lid and (reasons[i] is None or lid_all) and len(texts[i]) >= lid.min_chars:
                    predictions[i] = self.identifier.predict(texts[i])
                    if reasons[i] is None:
                        reasons[i] = lid_verdict(lang, *predictions[i], lid.min_confidence)
        return reasons, stats, predictions

    def _needs_lid(self, lang: str) -> bool:
        """Can language ID drop a document of ``lang`` (another covered language shares its script)?"""
        needs = self._lid_languages.get(lang)
        if needs is None:
            needs = self._lid_languages[lang] = (
                self.identifier is not None and lang not in self.config.lid.skip_languages
                and shares_script(lang) and self.identifier.covers(lang)
            )
        return needs

    def read(self, task: RangeTask | DocumentsTask) -> tuple[str, Sequence[int], DocumentColumns]:
        return read_task(task, self.config, self.max_chars)

    def __call__(self, task: RangeTask | DocumentsTask) -> BatchResult:
        cpu_start = time.process_time()
        source, lines, docs = self.read(task)
        reasons = list(docs.reasons)
        previews = list(docs.previews)
        if docs.reasons.count(None) < len(docs.reasons):  # some were dropped while reading
            accepted = [i for i, r in enumerate(docs.reasons) if r is None]
            read_langs, read_texts = [docs.langs[i] for i in accepted], [docs.texts[i] for i in accepted]
        else:
            accepted, read_langs, read_texts = range(len(docs.texts)), docs.langs, docs.texts
        verdicts, stats, predictions = self.column_checks(read_langs, read_texts, lid_all=self.config.features)
        uncollapsed = stats.uncollapsed
        if verdicts.count(None) < len(verdicts):
            for i, text, reason in zip(accepted, read_texts, verdicts):
                if reason is not None:
                    reasons[i] = reason
                    previews[i] = text[:EXAMPLE_CHARS]
            texts = [text for text, reason in zip(read_texts, verdicts) if reason is None]
            uncollapsed = uncollapsed[np.array([v is None for v in verdicts], bool)]
        else:
            texts = read_texts
        # collapsed: whitespace runs → one space (what dedup compares)
        collapsed = list(texts)
        for k in np.flatnonzero(uncollapsed).tolist():
            collapsed[k] = " ".join(texts[k].split())
        keys = [exact_key(t, collapsed=True) for t in collapsed]
        prints = bands = None
        if self.config.dedup.near:
            signatures = self.minhasher.signatures(collapsed, collapsed=True)
            bands = band_hashes(signatures, self.lsh_bands, self.lsh_rows)
            prints = fingerprints(signatures)
        # [BOS] tokens [EOS]: BOS gives the model a context to predict a document's first token
        # from, exactly as evaluation (bits per byte) and generation present text to it.
        flat, lengths = self.encoder.encode(texts)
        features = None
        if self.config.features:
            passing = np.fromiter((v is None for v in verdicts), bool, count=len(verdicts))
            features = batch_features(len(reasons), accepted, read_langs, read_texts, stats, predictions,
                                      self._filters_for, self.config, passing, keys)
        return BatchResult(source, lines, docs.langs, reasons, previews, keys, prints, bands, flat, lengths,
                           time.process_time() - cpu_start, features)


def make_processor(config_json: str, tokenizer_file: str, environment: dict[str, str] | None = None
                   ) -> DocumentProcessor:
    """Builds a worker process's DocumentProcessor (the config travels as JSON).

    ``environment``: the parent's environment when it started the workers.  The fork server they
    come from is started once per process and keeps the environment of then, so without this a
    worker would not see credentials or storage endpoints set since (``GOOGLE_APPLICATION_CREDENTIALS``,
    an emulator's address) and would read a ``gs://`` input with other rights than the parent."""
    if environment is not None and environment != dict(os.environ):
        os.environ.clear()
        os.environ.update(environment)
    return DocumentProcessor(DataConfig.model_validate_json(config_json), tokenizer_file)
