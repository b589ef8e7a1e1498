"""``indicfm data prepare``: raw text → cleaned, deduplicated, tokenized, packed token cache.

One document's path::

    main process                cut text/JSON-lines files into line ranges (a newline scan);
                                parquet / hub datasets: read documents (sources.iter_documents)
      → worker process          read the range: decode, NFC-normalise; malformed_record /
                                invalid_utf8 / control_chars / empty / too_long; filters (quality,
                                wrong_script), lid (wrong_language), exact key + MinHash signature
                                and LSH band hashes, BOS + SentencePiece ids + EOS (memoised per word:
                                indicfm.data.tokenize)
      → main process, in order  dedup (exact_duplicate, near_duplicate; first occurrence wins)
                                → report → pack (per language) → cache (tensorstore)

The main process, which must decide duplicates in input order, does as little per document as
possible (measured by ``benchmarks/prepare.py``): everything that does not depend on earlier
documents runs in the workers.  Workers get batches (line ranges) and results are consumed in
input order, so the cache is identical whatever the number of workers; the main process is one of
them, doing batches whenever the next result is not ready yet (see :func:`_process`).  Every
``checkpoint_every_docs`` documents the written rows, the dedup index, the packers' unfinished rows
and the report are committed to ``.prepare_state``; re-running the same command after an
interruption continues from there without duplicating rows.  ``metadata.json`` is written last: a
cache without it is never taken as complete.  Once the last line of a text file is consumed and
no later input can hold its language, that language's last row is packed and its writes start:
they overlap the rest of the run instead of all waiting at its end.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from indicfm.data.cache import (
    FORMAT_VERSION, METADATA, STATE_DIR, LanguageWriter, close_writers, flush_writers, write_json_atomic,
)
from indicfm.data.config import DataConfig
from indicfm.data.dedup import STATE_FORMAT as DEDUP_STATE_FORMAT
from indicfm.data.dedup import DuplicateIndex, band_hashes, exact_key, fingerprints, lsh_bands, minhasher
from indicfm.data.features import BatchFeatures, FeatureCollector, batch_features
from indicfm.data.filters import batch_check, filters_for
from indicfm.data.lid import get_identifier, lid_verdict, shares_script
from indicfm.data.pack import Packer
from indicfm.data.report import Report, render_table
from indicfm.data.sources import (
    LINE_FORMATS,
    Document,
    DocumentColumns,
    InputError,
    InputFile,
    LineRange,
    find_input_files,
    iter_documents,
    iter_hub_dataset,
    line_ranges,
    read_line_range,
)
from indicfm.data.tokenize import BatchEncoder
from indicfm.data.workers import OrderedMap, WorkerDied
from indicfm.storage import (
    as_path,
    file_identity,
    file_sha256,
    fresh,
    is_bucket_root,
    is_empty_or_missing,
    is_url,
    make_dirs,
    remove_tree,
)
from indicfm.tokenizer.load import load_sentencepiece

#: Documents per batch (a worker's task).  Larger batches spread each batch's fixed NumPy and
#: SentencePiece call overheads over more documents: measured with 2 processes on the 163k-line
#: corpus, 1024 took 12-20% less time than 512 (256: slower still; 2048: the last batches leave a
#: process idle for longer).
BATCH_DOCS = 1024
#: A worker's line range holds at most BATCH_DOCS lines and about this many bytes.
RANGE_BYTES = 2 << 20
#: Every dropped document, one line each: source, line, language, reason (tab-separated).
DROP_LOG = "dropped.tsv"
#: Rows of one language gathered in memory before they are written to its arrays.
WRITE_ROWS = 1024
#: Documents are packed into rows as soon as this many rows are complete (not all at the end,
#: when the other processes have nothing left to do).
PACK_ROWS = 32


class PrepareError(ValueError):
    """A prepare that can't start (mismatching existing output, bad tokenizer, ...)."""


@dataclass
class PrepareResult:
    output: Path
    report: dict  # the content of report.json
    languages: dict[str, dict]  # lang -> {"rows", "tokens", "documents", "split_documents"}
    documents: int  # documents read in this run (after a resume: only the new ones)
    tokens: int  # tokens packed in this run
    seconds: float
    resumed: bool
    #: Time the main process spent reading and deciding (dedup, report, pack, write): with enough
    #: workers the run can go no faster than documents / main_seconds.
    main_seconds: float = 0.0
    #: CPU seconds spent on the documents' per-batch work (reading, filters, dedup keys, tokenizing)
    #: wherever it ran: in worker processes, or in this one with a single worker.
    batch_cpu_seconds: float = 0.0
    #: ``--engine ray`` only: wall seconds per stage, CPU seconds its tasks spent, Ray node ids.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_cpu_seconds: dict[str, float] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    #: ``--engine ray`` only: per shard, (source, first line, last line or -1, node id it ran on).
    placement: list[tuple[str, int, int, str]] = field(default_factory=list)

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# -- the per-document work, run in worker processes ---------------------------------------------


@dataclass
class BatchResult:
    """Everything the main process needs about one batch of documents, as columns.

    ``reasons`` covers every document of the batch: its read-time, filter or language-ID reason,
    or None when it reached deduplication ("passing"); the other arrays cover passing documents.
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


#: Characters of a dropped document a report example keeps (see Report.dropped).
EXAMPLE_CHARS = 300


@dataclass(frozen=True)
class RangeTask:
    """Read lines ``range`` of ``file`` in the worker, skipping the first ``skip`` (a resume)."""

    file: InputFile
    range: LineRange
    skip: int = 0


@dataclass(frozen=True)
class DocumentsTask:
    """Documents the main process read itself (parquet, hub datasets)."""

    documents: list[Document]


def read_task(task: RangeTask | DocumentsTask, config: DataConfig,
              max_chars: int) -> tuple[str, Sequence[int], DocumentColumns]:
    """(source, line numbers, documents) of a task, as read and normalised (not yet filtered).

    Workers read their tasks; the main process reads one again only for the text of a report
    example of a duplicate (the few first ones), so results need not carry every document's text."""
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


class DocumentProcessor:
    """Reading (of a line range), filters, language ID, dedup keys and tokenization of a batch."""

    def __init__(self, config: DataConfig, tokenizer_file: str):
        self.config = config
        self.sp = load_sentencepiece(tokenizer_file)
        self.encoder = BatchEncoder(self.sp)
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


def _make_processor(config_json: str, tokenizer_file: str, environment: dict[str, str] | None = None
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


# -- helpers ------------------------------------------------------------------------------------



def _fingerprint(config: DataConfig, files, seq_len: int, tokenizer_sha: str) -> dict:
    """What must be identical for a resume to be valid (inputs by path, size and mtime)."""
    relevant = config.model_dump(mode="json", exclude={"inputs", "cache_dir", "workers", "language_weights",
                                                       "mixture_temperature", "checkpoint_every_docs"})
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "tokenizer_sha256": tokenizer_sha,
        "config": relevant,
        "inputs": [file_identity(f.path) for f in files],
    }


def reader_max_chars(config: DataConfig) -> int:
    """The reader knows a document's language only once it has read it, so it applies the largest
    limit of any language; :meth:`DocumentProcessor.reasons` applies each language's own."""
    return max([config.filters.max_chars] + [
        f.max_chars for f in config.language_filters.values() if "max_chars" in f.model_fields_set
    ])


def _tasks(files, config: DataConfig, skip_docs: int, clock: list[float]) -> Iterator[RangeTask | DocumentsTask]:
    """Every input document, in input order, as batches of at most BATCH_DOCS; the first
    ``skip_docs`` documents (done before an interruption) are left out.  Adds the main process's
    reading time to ``clock[0]``."""
    max_chars = reader_max_chars(config)
    done = 0

    def timed(iterator):
        while True:
            start = time.perf_counter()
            item = next(iterator, None)
            clock[0] += time.perf_counter() - start
            if item is None:
                return
            yield item

    for f in files:
        if f.format in LINE_FORMATS:
            for r in timed(line_ranges(f.path, max_lines=BATCH_DOCS, max_bytes=RANGE_BYTES)):
                if done + r.lines > skip_docs:
                    yield RangeTask(f, r, max(skip_docs - done, 0))
                done += r.lines
            continue
        docs = iter_documents(f, max_chars=max_chars, text_field=config.text_field, lang_field=config.lang_field)
        for batch in timed(_document_batches(docs)):
            if done + len(batch) > skip_docs:
                yield DocumentsTask(batch[max(skip_docs - done, 0) :])
            done += len(batch)
    for hub in config.hub:
        docs = iter_hub_dataset(
            hub.name, config_name=hub.config_name, split=hub.split, text_field=hub.text_field,
            lang_field=hub.lang_field, lang=hub.lang, max_chars=max_chars,
        )
        for batch in timed(_document_batches(docs)):
            if done + len(batch) > skip_docs:
                yield DocumentsTask(batch[max(skip_docs - done, 0) :])
            done += len(batch)


def _document_batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    while batch := list(itertools.islice(docs, BATCH_DOCS)):
        yield batch


def _checkpoint_hook(checkpoints_done: int) -> None:
    """Called after every committed checkpoint (tests replace it to simulate an interruption)."""


class _Run:
    """State of one prepare run: packers and writers per language, dedup index, report."""

    def __init__(self, out: Path, config: DataConfig, seq_len: int, pad_id: int):
        self.out = out
        self.config = config
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.state_dir = out / STATE_DIR
        self.report = Report(config.examples_per_reason)
        self.dedup = DuplicateIndex(config.dedup)
        self.packers: dict[str, Packer] = {}
        self.writers: dict[str, LanguageWriter] = {}
        self.docs_done = 0
        self.parts = 0
        self.drop_log = open(out / DROP_LOG, "a", encoding="utf-8")
        self.features = FeatureCollector(out, self.state_dir) if config.features else None

    def _lang(self, lang: str, rows: int = 0) -> tuple[Packer, LanguageWriter]:
        if lang not in self.packers:
            self.packers[lang] = Packer(self.seq_len, self.pad_id)
            self.writers[lang] = LanguageWriter(self.out / "rows" / lang, self.seq_len, rows, write_rows=WRITE_ROWS)
        return self.packers[lang], self.writers[lang]

    def consume(self, batch: RangeTask | DocumentsTask, result: BatchResult) -> int:
        """Apply dedup, count, pack, in input order; returns the number of tokens packed."""
        reasons = list(result.reasons)
        everyone_passed = reasons.count(None) == len(reasons)
        passing = range(len(reasons)) if everyone_passed else [i for i, r in enumerate(reasons) if r is None]
        ids = None if self.features is None else self.docs_done + np.asarray(passing, np.int64)
        verdicts = self.dedup.check_batch(result.keys, result.fingerprints, result.bands, ids)
        no_duplicates = verdicts.count(None) == len(verdicts)
        keep = np.ones(len(verdicts), bool)
        if not no_duplicates:
            for k, (i, verdict) in enumerate(zip(passing, verdicts)):
                if verdict is not None:
                    reasons[i] = verdict
                    keep[k] = False
        if not (everyone_passed and no_duplicates):
            self._record_drops(batch, result, reasons, passing)
        if self.features is not None:
            self.features.add(result, reasons, passing, self.dedup.near_matches)
        langs = result.langs
        if len(set(langs)) <= 1:  # the usual batch: one file, one language
            by_lang = {langs[0]: keep} if langs else {}
        else:
            langs_arr = np.array([langs[i] for i in passing])
            by_lang = {lang: keep & (langs_arr == lang) for lang in dict.fromkeys(langs_arr.tolist())}
        for lang, sel in by_lang.items():
            self.report.kept_many(lang, int(sel.sum()), int(result.lengths[sel].sum()))
            if not sel.any():
                continue
            packer, writer = self._lang(lang)
            if sel.all():
                packer.add_many(result.token_ids, result.lengths)
            else:
                packer.add_many(result.token_ids[np.repeat(sel, result.lengths)], result.lengths[sel])
            if packer.pending_tokens >= PACK_ROWS * self.seq_len:
                writer.append(packer.pop_full_rows())
        self.docs_done += len(reasons)
        return int(result.lengths[keep].sum())

    def finish_language(self, lang: str) -> None:
        """``lang`` gets no more documents: pack its last row and start writing its rows now."""
        if lang in self.packers:
            packer, writer = self._lang(lang)
            writer.append(packer.finish())
            writer.write_now()

    def _record_drops(self, batch: RangeTask | DocumentsTask, result: BatchResult, reasons: list[str | None],
                      passing: Sequence[int]) -> None:
        """Report and log every dropped document of a batch (``reasons``: with dedup's verdicts)."""
        source, lines, langs = result.source, result.lines, result.langs
        passing_set = set(passing)
        batch_texts: list[str] | None = None
        for i, reason in enumerate(reasons):
            if reason is None:
                continue
            text = result.previews[i]
            if i in passing_set and self.report.wants_example(reason):  # a duplicate: read its text again
                if batch_texts is None:
                    batch_texts = read_task(batch, self.config, reader_max_chars(self.config))[2].texts
                text = batch_texts[i][:EXAMPLE_CHARS]
            self.report.dropped(langs[i], reason, source, lines[i], text)
            self.drop_log.write(f"{source}\t{lines[i]}\t{langs[i]}\t{reason}\n")

    def checkpoint(self, fingerprint: dict) -> None:
        """Make everything so far durable, then commit state.json (atomically, last)."""
        for lang, packer in self.packers.items():
            self.writers[lang].append(packer.pop_full_rows())
        flush_writers(list(self.writers.values()))
        self.dedup.save_increment(self.state_dir, self.parts)
        if self.features is not None:
            self.features.save_part(self.parts)
        self.parts += 1
        self.drop_log.flush()
        os.fsync(self.drop_log.fileno())
        state = {
            "drop_log_bytes": self.drop_log.tell(),
            "fingerprint": fingerprint,
            "dedup_state_format": DEDUP_STATE_FORMAT,
            "docs_done": self.docs_done,
            "dedup_parts": self.parts,
            "rows": {lang: w.rows for lang, w in self.writers.items()},
            "packers": {lang: p.state() for lang, p in self.packers.items()},
            "report": self.report.state(),
        }
        write_json_atomic(self.state_dir / "state.json", state)

    def resume(self, state: dict) -> None:
        self.drop_log.truncate(state["drop_log_bytes"])  # lines past the checkpoint are re-done
        self.docs_done = state["docs_done"]
        self.parts = state["dedup_parts"]
        self.dedup.load(self.state_dir, self.parts)
        if self.features is not None:
            self.features.resume(self.parts)
        self.report = Report.from_state(state["report"], self.config.examples_per_reason)
        for lang, rows in state["rows"].items():
            packer, _ = self._lang(lang, rows)
            packer.load_state(state["packers"][lang])

    def finish(self) -> dict[str, dict]:
        self.drop_log.close()
        languages = {}
        report = self.report.to_dict()["languages"]
        for lang, packer in self.packers.items():
            self.writers[lang].append(packer.finish())
        close_writers(list(self.writers.values()))
        if self.features is not None:
            self.features.finish()
        for lang, packer in sorted(self.packers.items()):
            writer = self.writers[lang]
            languages[lang] = {
                "rows": writer.rows,
                "tokens": report[lang]["tokens"],
                "documents": report[lang]["docs_kept"],
                "split_documents": packer.split_documents,
            }
        return languages


def _prepare_output(out: Path, fingerprint: dict, overwrite: bool) -> dict | None:
    """Check the output directory (local or a bucket prefix); returns the resume state when a
    matching run was interrupted."""
    fresh(out)  # a bucket listing cached earlier in this process may predate other writers
    if overwrite and not is_empty_or_missing(out):
        if not ((out / METADATA).exists() or (out / STATE_DIR).exists()):
            raise PrepareError(f"{out} is not a token cache; refusing to delete it for --overwrite")
        remove_tree(out)
    state_file = out / STATE_DIR / "state.json"
    if (out / METADATA).is_file():
        meta = json.loads((out / METADATA).read_text(encoding="utf-8"))
        if meta.get("fingerprint") == fingerprint:
            return {"complete": True}
        raise PrepareError(
            f"{out} already holds a token cache made from other inputs/config/tokenizer; "
            "choose another --output or pass --overwrite"
        )
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state["fingerprint"] == fingerprint:
            if state.get("dedup_state_format", 1) != DEDUP_STATE_FORMAT:
                raise PrepareError(f"{out} holds a prepare interrupted by another indicfm version, whose "
                                   "deduplication state this one can't read; pass --overwrite to start again")
            return state
        raise PrepareError(
            f"{out} holds an interrupted prepare of other inputs/config/tokenizer; "
            "re-run that command to finish it, or pass --overwrite"
        )
    if (out / STATE_DIR).is_dir():  # interrupted before its first checkpoint: nothing to keep
        remove_tree(out)
        return None
    if not is_empty_or_missing(out):
        raise PrepareError(f"{out} exists and is not an unfinished token cache; choose an empty directory")
    return None


def prepare(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    output: str | Path,
    *,
    seq_len: int | None = None,
    config: DataConfig | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    console=None,
    engine: str = "local",
    ray_address: str | None = None,
    staging_dir: str | Path | None = None,
) -> PrepareResult:
    """Build (or finish, or find complete) the token cache in ``output``; see the module docstring.

    ``inputs``, ``tokenizer`` and ``output`` may be local paths or ``gs://`` URLs.  The Ray engine
    writes a bucket cache in place from its tasks; the local engine (one machine) builds it in
    ``staging_dir`` on local disk, where an interrupted run resumes, and uploads it when complete
    (:func:`_prepare_staged`).

    ``inputs`` (files/dirs) default to ``config.inputs``; ``seq_len`` to ``config.seq_len``;
    ``workers`` to ``config.workers`` (0 = CPU count; 1 = no worker processes).  ``engine="ray"``
    builds the same cache with Ray tasks (indicfm.data.ray_engine), on a local Ray instance or the
    cluster at ``ray_address`` (``auto`` or HOST:PORT); ``workers`` then sizes a local instance.
    """
    from rich.console import Console

    if engine not in ("local", "ray"):
        raise PrepareError(f"unknown engine {engine!r}; one of: local, ray")
    if engine == "ray":
        from indicfm.data.ray_engine import import_ray

        import_ray()  # before any work: without Ray, say how to install it

    console = console or Console(stderr=True)
    config = config or DataConfig()
    seq_len = seq_len or config.seq_len
    out = as_path(output)
    tokenizer = as_path(tokenizer)
    if is_url(out) and is_bucket_root(out):
        raise PrepareError(f"{out}: give a prefix inside the bucket (e.g. {str(out).rstrip('/')}/cache): a cache "
                           "is never written to, or deleted from, a bucket's root")
    if not tokenizer.is_file():
        raise InputError(f"{tokenizer}: tokenizer model not found (train one with `indicfm tokenizer train`)")
    files = find_input_files(list(inputs) or config.inputs, allow_unknown=config.allow_unknown_languages)
    if not files and not config.hub:
        raise InputError("no input files found (give --input PATH or data.inputs in the config)")
    sp = load_sentencepiece(tokenizer)
    bos_id, eos_id, pad_id = sp.bos_id(), sp.eos_id(), max(sp.pad_id(), 0)
    if eos_id < 0 or bos_id < 0:
        raise PrepareError(f"{tokenizer}: the tokenizer needs BOS and EOS tokens (train it with "
                           "`indicfm tokenizer train`: bos_id=2, eos_id=3)")
    tokenizer_sha = file_sha256(tokenizer)
    fingerprint = _fingerprint(config, files, seq_len, tokenizer_sha)

    start = time.perf_counter()
    state = _prepare_output(out, fingerprint, overwrite)
    if state and state.get("complete"):
        meta = json.loads((out / METADATA).read_text(encoding="utf-8"))
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        console.print(f"{out}: token cache already complete; nothing to do")
        return PrepareResult(out, report, meta["languages"], 0, 0, time.perf_counter() - start, resumed=True)
    if engine == "ray":
        if state:
            raise PrepareError(f"{out} holds a prepare interrupted with --engine local; finish it with that "
                               "engine (it resumes), or pass --overwrite")
        return _prepare_with_ray(files, tokenizer, out, seq_len, config, sp, tokenizer_sha, fingerprint,
                                 workers, ray_address, show_progress, console, start)
    if is_url(out):
        return _prepare_staged(inputs, tokenizer, out, seq_len=seq_len, config=config, workers=workers,
                               overwrite=overwrite, show_progress=show_progress, console=console,
                               staging_dir=staging_dir, start=start)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(out, config, seq_len, pad_id)
    if state:
        run.resume(state)
        console.print(f"{out}: resuming an interrupted prepare after {run.docs_done:,} documents")
    else:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)

    n_workers = workers if workers is not None else config.workers
    n_workers = n_workers or os.cpu_count() or 1
    documents = tokens = 0
    checkpoints = 0
    since_checkpoint = 0

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with contextlib.ExitStack() as stack, contextlib.closing(run.drop_log), Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
        console=console, disable=not show_progress, transient=False,
    ) as progress:
        task = progress.add_task("preparing")
        clock = [0.0]  # main-process seconds: reading + consuming
        batch_cpu = 0.0
        tasks = _tasks(files, config, run.docs_done, clock)
        results = stack.enter_context(_process(tasks, config, tokenizer, n_workers))
        complete_after = _languages_complete_after(files, has_hub=bool(config.hub))
        for batch, result in _guard_workers(results):
            consume_start = time.perf_counter()
            tokens += run.consume(batch, result)
            done = complete_after.get(batch.file.path) if isinstance(batch, RangeTask) else None
            if done is not None and batch.range.end == done[1]:  # the file's last line range
                run.finish_language(done[0])
            batch_cpu += result.cpu_seconds
            clock[0] += time.perf_counter() - consume_start
            documents += len(result.reasons)
            since_checkpoint += len(result.reasons)
            if since_checkpoint >= config.checkpoint_every_docs:
                run.checkpoint(fingerprint)
                checkpoints += 1
                since_checkpoint = 0
                _checkpoint_hook(checkpoints)
            elapsed = max(time.perf_counter() - start, 1e-9)
            progress.update(
                task,
                description=f"{run.docs_done:,} docs · {documents / elapsed:,.0f} docs/s · "
                f"{tokens / elapsed:,.0f} tokens/s",
            )
        languages = run.finish()

    report = run.report.to_dict()
    run.report.save(out)
    _write_metadata(out, seq_len, tokenizer, tokenizer_sha, sp, config, languages, fingerprint)
    seconds = time.perf_counter() - start
    if show_progress:
        render_table(report, console)
    return PrepareResult(out, report, languages, documents, tokens, seconds, resumed=bool(state), main_seconds=clock[0],
                         batch_cpu_seconds=batch_cpu)


def _write_metadata(out: Path, seq_len: int, tokenizer: Path, tokenizer_sha: str, sp, config: DataConfig,
                    languages: dict, fingerprint: dict) -> None:
    """metadata.json, last (from then on the cache is complete), and the resume state goes."""
    metadata = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "tokenizer": str(tokenizer),
        "tokenizer_sha256": tokenizer_sha,
        "vocab_size": sp.get_piece_size(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "pad_id": max(sp.pad_id(), 0),
        "config": config.model_dump(mode="json"),
        "languages": languages,
        "fingerprint": fingerprint,
    }
    write_json_atomic(out / METADATA, metadata)
    with contextlib.suppress(OSError):  # the cache is complete; leftover state (NFS busy files) is harmless
        remove_tree(out / STATE_DIR)


def _prepare_with_ray(files, tokenizer: Path, out: Path, seq_len: int, config: DataConfig, sp, tokenizer_sha: str,
                      fingerprint: dict, workers: int | None, ray_address: str | None, show_progress: bool,
                      console, start: float) -> PrepareResult:
    """``engine="ray"``: the stages run as Ray tasks (indicfm.data.ray_engine); an interrupted run
    left only ``.prepare_state`` (no state.json), which _prepare_output has removed: it starts again."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from indicfm.data.ray_engine import prepare_with_ray

    make_dirs(out / STATE_DIR)
    write_json_atomic(out / STATE_DIR / "ray.json", {"engine": "ray", "fingerprint": fingerprint})
    n_workers = workers if workers is not None else config.workers
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  disable=not show_progress, transient=False) as progress:
        done = prepare_with_ray(files, _absolute(tokenizer), _absolute(out), seq_len=seq_len, config=config,
                                pad_id=max(sp.pad_id(), 0), progress=progress, address=ray_address,
                                workers=n_workers)
    _write_metadata(out, seq_len, tokenizer, tokenizer_sha, sp, config, done["languages"], fingerprint)
    if show_progress:
        render_table(done["report"], console)
    times = done["times"]
    return PrepareResult(out, done["report"], done["languages"], done["documents"], done["tokens"],
                         time.perf_counter() - start, resumed=False, batch_cpu_seconds=times.cpu.get("process", 0.0),
                         stage_seconds=dict(times.wall), stage_cpu_seconds=dict(times.cpu), nodes=done["nodes"],
                         placement=done["placement"])


def _absolute(path: Path) -> Path:
    """An absolute local path (Ray tasks may run in another working directory); URLs as they are."""
    return path if is_url(path) else path.resolve()


def default_staging_dir(output: Path) -> Path:
    """Where the local engine builds a bucket cache before uploading it: one directory per output
    URL under the user's cache directory (not /tmp: often small, shared between users and emptied
    on reboot), so re-running the same command finds and resumes it."""
    digest = hashlib.sha256(str(output).encode()).hexdigest()[:16]
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "indicfm" / "staging" / digest


def _prepare_staged(inputs, tokenizer: Path, out: Path, *, seq_len: int, config: DataConfig, workers: int | None,
                    overwrite: bool, show_progress: bool, console, staging_dir: str | Path | None,
                    start: float) -> PrepareResult:
    """The local engine with a bucket ``out``: its append-only drop log and resume checkpoints
    need a local filesystem, so the cache is built (or resumed) in a local staging directory, then
    uploaded (:func:`upload_cache`), and the staging directory is removed, unless it was a
    complete cache of the user's before this run (``--staging-dir`` naming an existing cache just
    uploads it).

    The bucket side was checked by the caller (complete → nothing to do; other contents → error;
    an interrupted upload → removed); the inner ``prepare`` checks the stage the same way (an
    interrupted build there resumes)."""
    stage = Path(staging_dir) if staging_dir is not None else default_staging_dir(out)
    users_cache = staging_dir is not None and (stage / METADATA).is_file()
    console.print(f"{out}: building in {stage} (local engine), then uploading")
    built = prepare(inputs, tokenizer, stage, seq_len=seq_len, config=config, workers=workers, overwrite=overwrite,
                    show_progress=show_progress, console=console)
    upload_cache(stage, out, console)
    if users_cache:
        console.print(f"{stage}: the local cache stays where it was")
    else:
        remove_tree(stage)
    return replace(built, output=out, seconds=time.perf_counter() - start)


def upload_cache(local: Path, out: Path, console) -> None:
    """Copy a complete local cache to ``out`` (a URL), ``metadata.json`` last.

    A marker in ``out``'s state directory is written first and removed last, so an upload cut
    short is recognised as an unfinished prepare (re-running removes it and uploads again; so does
    ``--overwrite``), never as a foreign directory or a complete cache."""
    files = sorted(p for p in local.rglob("*") if p.is_file() and STATE_DIR not in p.relative_to(local).parts)
    files = [p for p in files if p.name != METADATA] + [local / METADATA]
    size = sum(p.stat().st_size for p in files)
    console.print(f"uploading {len(files)} files ({size / 1e6:,.1f} MB) to {out}")
    write_json_atomic(out / STATE_DIR / "upload.json", {"from": str(local)})
    for path in files:
        _upload_file(path, out / path.relative_to(local).as_posix())
    remove_tree(out / STATE_DIR)
    fresh(out)


def _upload_file(path: Path, target: Path) -> None:
    target.fs.put_file(str(path), target.path)  # streamed: a shard file is never held whole


def _languages_complete_after(files: Sequence[InputFile], has_hub: bool) -> dict[Path, tuple[str, int]]:
    """{path: (language, size)} of the text files after whose last line their language gets no
    more documents: no later file has it, nor any file whose languages are per record (JSON lines,
    parquet, hub datasets)."""
    out = {}
    later_langs: set[str] = set()
    per_record_later = has_hub
    for f in reversed(files):
        if f.format == "text" and f.lang is not None and f.lang not in later_langs and not per_record_later:
            out[f.path] = (f.lang, f.path.stat().st_size)
        if f.lang is None:
            per_record_later = True
        else:
            later_langs.add(f.lang)
    return out


def _guard_workers(results):
    """Turn a dead worker process into a clear error (the last checkpoint stays resumable)."""
    try:
        yield from results
    except WorkerDied as err:
        raise PrepareError(
            f"{err}; re-run to resume from the last checkpoint, or use --workers 1 to work without "
            "worker processes"
        ) from err


def _worker_context():
    """The fork-server context with the worker's modules preloaded (spawn where there is none).

    Not fork: the parent runs tensorstore threads.  A fork server (a fresh process that imports the
    worker's modules once, then forks each worker from itself) starts workers for ≈0.05 s of CPU
    each instead of ≈0.5 s for spawn's fresh interpreter + imports.  The preload list is
    process-wide and read when the fork server first starts; a fork server already running keeps
    its own (workers then just import what they need themselves)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_WORKER_MODULES))
    return ctx


#: Imported once by the fork server, so each worker starts without importing them again.
_WORKER_MODULES = ("indicfm.data.prepare", "sentencepiece", "pycld2")


def _process(tasks: Iterator[RangeTask | DocumentsTask], config: DataConfig, tokenizer: Path,
             n_workers: int) -> OrderedMap:
    """(task, its BatchResult) in input order, using ``n_workers`` processes in all, the main one
    included (see :class:`indicfm.data.workers.OrderedMap`): whatever the number, the results and
    so the cache are the same."""
    make = functools.partial(_make_processor, config.model_dump_json(), str(tokenizer), dict(os.environ))
    return OrderedMap(tasks, make, n_workers, _worker_context() if n_workers > 1 else None)
