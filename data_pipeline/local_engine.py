"""The local engine of ``data prepare``: one machine, a pool of worker processes, one in-order main.

One document's path::

    main process                cut text/JSON-lines files into line ranges (a newline scan);
                                parquet / hub datasets: read documents (sources.iter_documents)
      → worker process          the stages (indicfm.data.stages): read the range, filters, language
                                ID, exact key + MinHash band keys, BOS + SentencePiece ids + EOS
      → main process, in order  dedup (exact_duplicate, near_duplicate; first occurrence wins)
                                → report, drop log → pack (per language) → cache (tensorstore)

The main process, which must decide duplicates in input order, does as little per document as
possible (measured by ``benchmarks/prepare.py``): everything that does not depend on earlier
documents runs in the workers.  Workers get batches (line ranges) and results are consumed in
input order, so the cache is identical whatever the number of workers; the main process is one of
them, doing batches whenever the next result is not ready yet (see :func:`_process`).  Every
``checkpoint_every_docs`` documents the written rows, the dedup index, the packers' unfinished rows
and the report are committed to ``.prepare_state``; re-running the same command after an
interruption continues from there without duplicating rows.  Once the last line of a text file is
consumed and no later input can hold its language, that language's last row is packed and its
writes start: they overlap the rest of the run instead of all waiting at its end.

The checkpoints and the append-only drop log need a local filesystem: a bucket output is built in
a local staging directory by the caller (:mod:`indicfm.data.prepare`), which also checks the output
and writes ``metadata.json`` last.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indicfm.data import stages  # BATCH_DOCS, RANGE_BYTES: read at call time (tests change them)
from indicfm.data.cache import STATE_DIR, LanguageWriter, close_writers, flush_writers, write_json_atomic
from indicfm.data.config import DataConfig
from indicfm.data.dedup import STATE_FORMAT as DEDUP_STATE_FORMAT
from indicfm.data.dedup import DuplicateIndex
from indicfm.data.features import FeatureCollector
from indicfm.data.pack import Packer
from indicfm.data.report import DROP_LOG, EXAMPLE_CHARS, Report, drop_log_line
from indicfm.data.sources import LINE_FORMATS, InputFile, iter_documents, iter_hub_dataset, line_ranges
from indicfm.data.stages import (
    BatchResult, DocumentsTask, RangeTask, document_batches, make_processor, read_task, reader_max_chars,
)
from indicfm.data.workers import OrderedMap

#: Rows of one language gathered in memory before they are written to its arrays.
WRITE_ROWS = 1024
#: Documents are packed into rows as soon as this many rows are complete (not all at the end,
#: when the other processes have nothing left to do).
PACK_ROWS = 32


@dataclass
class LocalResult:
    """What a local run gives its caller, which writes ``metadata.json`` from it."""

    report: dict  # the content of report.json (already saved)
    languages: dict[str, dict]  # lang -> {"rows", "tokens", "documents", "split_documents"}
    documents: int  # documents read in this run (after a resume: only the new ones)
    tokens: int  # tokens packed in this run
    #: Time the main process spent reading and deciding (dedup, report, pack, write): with enough
    #: workers the run can go no faster than documents / main_seconds.
    main_seconds: float
    #: CPU seconds of the stages' per-batch work, in worker processes or in this one.
    batch_cpu_seconds: float


def prepare_locally(files: Sequence[InputFile], tokenizer: Path, out: Path, *, seq_len: int, config: DataConfig,
                    pad_id: int, fingerprint: dict, state: dict | None, workers: int, show_progress: bool,
                    console, start: float) -> LocalResult:
    """Build the cache in ``out`` (a local directory the caller checked: empty, or holding the
    resume ``state`` of an interrupted run with this ``fingerprint``), up to ``report.json``.

    ``workers``: processes in all (0: one per CPU; 1: no worker processes).  A worker that dies
    raises :class:`indicfm.data.workers.WorkerDied`; the last checkpoint stays resumable.  ``start``:
    the caller's clock at the start of the command (for the rates the progress line shows)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    out.mkdir(parents=True, exist_ok=True)
    run = _Run(out, config, seq_len, pad_id)
    if state:
        run.resume(state)
        console.print(f"{out}: resuming an interrupted prepare after {run.docs_done:,} documents")
    else:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)

    n_workers = workers or os.cpu_count() or 1
    documents = tokens = 0
    checkpoints = 0
    since_checkpoint = 0

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
        for batch, result in results:
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
    return LocalResult(report, languages, documents, tokens, main_seconds=clock[0], batch_cpu_seconds=batch_cpu)


# -- the main process: tasks in, results consumed in input order ----------------------------------


def _tasks(files, config: DataConfig, skip_docs: int, clock: list[float]) -> Iterator[RangeTask | DocumentsTask]:
    """Every input document, in input order, as batches of at most stages.BATCH_DOCS; the first
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
            for r in timed(line_ranges(f.path, max_lines=stages.BATCH_DOCS, max_bytes=stages.RANGE_BYTES)):
                if done + r.lines > skip_docs:
                    yield RangeTask(f, r, max(skip_docs - done, 0))
                done += r.lines
            continue
        docs = iter_documents(f, max_chars=max_chars, text_field=config.text_field, lang_field=config.lang_field)
        for batch in timed(document_batches(docs)):
            if done + len(batch) > skip_docs:
                yield DocumentsTask(batch[max(skip_docs - done, 0) :])
            done += len(batch)
    for hub in config.hub:
        docs = iter_hub_dataset(
            hub.name, config_name=hub.config_name, split=hub.split, text_field=hub.text_field,
            lang_field=hub.lang_field, lang=hub.lang, max_chars=max_chars,
        )
        for batch in timed(document_batches(docs)):
            if done + len(batch) > skip_docs:
                yield DocumentsTask(batch[max(skip_docs - done, 0) :])
            done += len(batch)


def _checkpoint_hook(checkpoints_done: int) -> None:
    """Called after every committed checkpoint (tests replace it to simulate an interruption)."""


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


class _Run:
    """State of one prepare run: packers and writers per language, dedup index, report, drop log."""

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
            self.drop_log.write(drop_log_line(source, lines[i], langs[i], reason))

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
        """Continue from the last checkpoint's ``state`` (what :meth:`checkpoint` committed)."""
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
        """Pack every language's last row and close its arrays: {lang: rows, tokens, documents,
        split_documents} for metadata.json."""
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


# -- the worker pool ------------------------------------------------------------------------------


def _worker_context():
    """The fork-server context with the worker's modules preloaded (spawn where there is none).

    Not fork: the parent runs tensorstore threads.  A fork server (a fresh process that imports the
    worker's modules once, then forks each worker from itself) starts each worker at a fraction of
    the CPU cost of spawn's fresh interpreter + imports.  The preload list is process-wide and read
    when the fork server first starts; a fork server already running keeps its own (workers then
    just import what they need themselves)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_WORKER_MODULES))
    return ctx


#: Imported once by the fork server, so each worker starts without importing them again: the stages
#: a worker runs, the worker loop, and the native libraries the stages load.
_WORKER_MODULES = ("indicfm.data.stages", "indicfm.data.workers", "sentencepiece", "pycld2")


def _process(tasks: Iterator[RangeTask | DocumentsTask], config: DataConfig, tokenizer: Path,
             n_workers: int) -> OrderedMap:
    """(task, its BatchResult) in input order, using ``n_workers`` processes in all, the main one
    included (see :class:`indicfm.data.workers.OrderedMap`): whatever the number, the results and
    so the cache are the same."""
    make = functools.partial(make_processor, config.model_dump_json(), str(tokenizer), dict(os.environ))
    return OrderedMap(tasks, make, n_workers, _worker_context() if n_workers > 1 else None)
