"""``indicfm data prepare``: raw text → cleaned, deduplicated, tokenized, packed token cache.

One document's path::

    sources.iter_documents      read, NFC-normalise; malformed_record / invalid_utf8 /
                                control_chars / empty / too_long
      → worker process          filters (quality, wrong_script), lid (wrong_language),
                                exact key + MinHash signature, SentencePiece ids + EOS
      → main process, in order  dedup (exact_duplicate, near_duplicate; first occurrence wins)
                                → report → pack (per language) → cache (tensorstore)

Workers get batches of documents and return results in input order, so the cache is identical
whatever the number of workers.  Every ``checkpoint_every_docs`` documents the written rows, the
dedup index, the packers' unfinished rows and the report are committed to ``.prepare_state``;
re-running the same command after an interruption continues from there without duplicating rows.
``metadata.json`` is written last: a cache without it is never taken as complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.cache import FORMAT_VERSION, METADATA, STATE_DIR, LanguageWriter, write_json_atomic
from data_pipeline.config import DataConfig
from data_pipeline.dedup import DuplicateIndex, band_hashes, exact_key, lsh_bands, minhasher
from data_pipeline.filters import batch_reasons, filters_for
from data_pipeline.lid import get_identifier, lid_reason
from data_pipeline.pack import Packer
from data_pipeline.report import Report, render_table
from data_pipeline.sources import Document, InputError, find_input_files, iter_documents, iter_hub_dataset

BATCH_DOCS = 512
#: Every dropped document, one line each: source, line, language, reason (tab-separated).
DROP_LOG = "dropped.tsv"
#: Rows of one language gathered in memory before they are appended to its arrays.
WRITE_ROWS = 1024


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

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# -- the per-document work, run in worker processes ---------------------------------------------


@dataclass
class BatchResult:
    reasons: list[str | None]  # per input document: filter/LID reason, or None when it passed
    keys: list[bytes]  # for passing documents, in order
    signatures: np.ndarray | None  # [passing, num_perm] uint32
    bands: np.ndarray | None  # [passing, bands] uint64 LSH band hashes
    token_ids: np.ndarray  # passing documents' ids (EOS appended), concatenated, int32
    lengths: np.ndarray  # [passing] tokens of each


class DocumentProcessor:
    """Filters, language ID, dedup keys and tokenization of a batch of accepted documents."""

    def __init__(self, config: DataConfig, tokenizer_file: str):
        import sentencepiece as spm

        self.config = config
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
        self.identifier = get_identifier(config.lid.backend) if config.lid.enabled else None
        self.minhasher = minhasher(config.dedup)
        self.lsh_bands, self.lsh_rows = lsh_bands(config.dedup.threshold, config.dedup.num_perm)
        self._filters: dict = {}

    def _filters_for(self, lang: str):
        f = self._filters.get(lang)
        if f is None:
            f = self._filters[lang] = filters_for(self.config, lang)
        return f

    def reasons(self, items: list[tuple[str, str]]) -> list[str | None]:
        """Quality, script and language-ID reason (or None) of each (lang, text)."""
        configs = [self._filters_for(lang) for lang, _ in items]
        reasons = batch_reasons([t for _, t in items], [lang for lang, _ in items], configs)
        lid = self.config.lid
        for i, ((lang, text), f) in enumerate(zip(items, configs)):
            if len(text) > f.max_chars:  # a per-language limit below the reader's (it comes first)
                reasons[i] = "too_long"
            if reasons[i] is None and self.identifier is not None and lang not in lid.skip_languages:
                reasons[i] = lid_reason(text, lang, self.identifier, lid.min_confidence, lid.min_chars)
        return reasons

    def __call__(self, items: list[tuple[str, str]]) -> BatchResult:
        reasons = self.reasons(items)
        texts = [text for (_, text), r in zip(items, reasons) if r is None]
        keys = [exact_key(t) for t in texts]
        signatures = bands = None
        if self.config.dedup.near:
            signatures = self.minhasher.signatures(texts)
            bands = band_hashes(signatures, self.lsh_bands, self.lsh_rows)
        ids = self.sp.encode(texts, add_eos=True, num_threads=1) if texts else []
        lengths = np.fromiter((len(x) for x in ids), np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(lengths.sum()))
        return BatchResult(reasons, keys, signatures, bands, flat, lengths)


_WORKER: DocumentProcessor | None = None


def _init_worker(config_json: str, tokenizer_file: str) -> None:
    global _WORKER
    _WORKER = DocumentProcessor(DataConfig.model_validate_json(config_json), tokenizer_file)


def _work(items: list[tuple[str, str]]) -> BatchResult:
    assert _WORKER is not None
    return _WORKER(items)


# -- helpers ------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(config: DataConfig, files, seq_len: int, tokenizer_sha: str) -> dict:
    """What must be identical for a resume to be valid (inputs by path, size and mtime)."""
    relevant = config.model_dump(mode="json", exclude={"inputs", "cache_dir", "workers", "language_weights",
                                                       "mixture_temperature", "checkpoint_every_docs"})
    return {
        "seq_len": seq_len,
        "tokenizer_sha256": tokenizer_sha,
        "config": relevant,
        "inputs": [[str(f.path.resolve()), f.path.stat().st_size, f.path.stat().st_mtime_ns] for f in files],
    }


def _documents(files, config: DataConfig) -> Iterator[Document]:
    # The reader knows a document's language only once it has read it, so it applies the largest
    # limit of any language; workers apply each language's own limit.
    max_chars = max([config.filters.max_chars] + [
        f.max_chars for f in config.language_filters.values() if "max_chars" in f.model_fields_set
    ])
    for f in files:
        yield from iter_documents(f, max_chars=max_chars, text_field=config.text_field, lang_field=config.lang_field)
    for hub in config.hub:
        yield from iter_hub_dataset(
            hub.name, config_name=hub.config_name, split=hub.split, text_field=hub.text_field,
            lang_field=hub.lang_field, lang=hub.lang, max_chars=max_chars,
        )


def _batches(docs: Iterator[Document], size: int, clock: list[float]) -> Iterator[list[Document]]:
    """Batches of documents; adds the reading time to ``clock[0]``."""
    while True:
        start = time.perf_counter()
        batch = list(itertools.islice(docs, size))
        clock[0] += time.perf_counter() - start
        if not batch:
            return
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

    def _lang(self, lang: str, rows: int = 0) -> tuple[Packer, LanguageWriter]:
        if lang not in self.packers:
            self.packers[lang] = Packer(self.seq_len, self.pad_id)
            self.writers[lang] = LanguageWriter(self.out / "rows" / lang, self.seq_len, rows)
        return self.packers[lang], self.writers[lang]

    def consume(self, batch: list[Document], result: BatchResult) -> int:
        """Apply dedup, count, pack, in input order; returns the number of tokens packed."""
        keep = [False] * len(result.lengths)
        langs: list[str] = []  # of the documents that reached dedup, in order
        reasons = iter(result.reasons)  # one per read-accepted document, in order
        lengths = result.lengths.tolist()
        bands = result.bands.tolist() if result.bands is not None else None
        dedup, report, log = self.dedup, self.report, self.drop_log
        for doc in batch:
            reason = doc.drop_reason
            if reason is None:
                reason = next(reasons)
                if reason is None:
                    k = len(langs)
                    sig = result.signatures[k] if bands is not None else None
                    reason = dedup.check_and_add(result.keys[k], sig, bands[k] if bands is not None else None)
                    langs.append(doc.lang)
                    if reason is None:
                        keep[k] = True
                        report.kept(doc.lang, lengths[k])
                        continue
            report.dropped(doc.lang, reason, doc.source, doc.line, doc.text or doc.preview)
            log.write(f"{doc.source}\t{doc.line}\t{doc.lang}\t{reason}\n")
        keep_mask = np.array(keep, bool)
        langs_arr = np.array(langs)
        for lang in dict.fromkeys(langs):
            sel = keep_mask & (langs_arr == lang)
            if not sel.any():
                continue
            packer, writer = self._lang(lang)
            packer.add_many(result.token_ids[np.repeat(sel, result.lengths)], result.lengths[sel])
            if packer.pending_tokens >= WRITE_ROWS * self.seq_len:
                writer.append(packer.pop_full_rows())
        self.docs_done += len(batch)
        return int(result.lengths[keep_mask].sum())

    def checkpoint(self, fingerprint: dict) -> None:
        """Make everything so far durable, then commit state.json (atomically, last)."""
        for lang, packer in self.packers.items():
            self.writers[lang].append(packer.pop_full_rows())
            self.writers[lang].flush()
        self.dedup.save_increment(self.state_dir, self.parts)
        self.parts += 1
        self.drop_log.flush()
        os.fsync(self.drop_log.fileno())
        state = {
            "drop_log_bytes": self.drop_log.tell(),
            "fingerprint": fingerprint,
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
        self.report = Report.from_state(state["report"], self.config.examples_per_reason)
        for lang, rows in state["rows"].items():
            packer, _ = self._lang(lang, rows)
            packer.load_state(state["packers"][lang])

    def finish(self) -> dict[str, dict]:
        self.drop_log.close()
        languages = {}
        report = self.report.to_dict()["languages"]
        for lang, packer in sorted(self.packers.items()):
            writer = self.writers[lang]
            writer.append(packer.finish())
            writer.close()
            languages[lang] = {
                "rows": writer.rows,
                "tokens": report[lang]["tokens"],
                "documents": report[lang]["docs_kept"],
                "split_documents": packer.split_documents,
            }
        return languages


def _prepare_output(out: Path, fingerprint: dict, overwrite: bool) -> dict | None:
    """Check the output directory; returns the resume state when a matching run was interrupted."""
    if overwrite and out.exists():
        if any(out.iterdir()) and not ((out / METADATA).exists() or (out / STATE_DIR).exists()):
            raise PrepareError(f"{out} is not a token cache; refusing to delete it for --overwrite")
        shutil.rmtree(out)
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
            return state
        raise PrepareError(
            f"{out} holds an interrupted prepare of other inputs/config/tokenizer; "
            "re-run that command to finish it, or pass --overwrite"
        )
    if (out / STATE_DIR).is_dir():  # interrupted before its first checkpoint: nothing to keep
        shutil.rmtree(out)
        return None
    if out.exists() and any(out.iterdir()):
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
) -> PrepareResult:
    """Build (or finish, or find complete) the token cache in ``output``; see the module docstring.

    ``inputs`` (files/dirs) default to ``config.inputs``; ``seq_len`` to ``config.seq_len``;
    ``workers`` to ``config.workers`` (0 = CPU count; 1 = no worker processes).
    """
    import sentencepiece as spm
    from rich.console import Console

    console = console or Console(stderr=True)
    config = config or DataConfig()
    seq_len = seq_len or config.seq_len
    out = Path(output)
    tokenizer = Path(tokenizer)
    if not tokenizer.is_file():
        raise InputError(f"{tokenizer}: tokenizer model not found (train one with `indicfm tokenizer train`)")
    files = find_input_files(list(inputs) or config.inputs, allow_unknown=config.allow_unknown_languages)
    if not files and not config.hub:
        raise InputError("no input files found (give --input PATH or data.inputs in the config)")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    eos_id, pad_id = sp.eos_id(), max(sp.pad_id(), 0)
    if eos_id < 0:
        raise PrepareError(f"{tokenizer}: the tokenizer has no EOS token (train it with eos_id=3)")
    tokenizer_sha = file_sha256(tokenizer)
    fingerprint = _fingerprint(config, files, seq_len, tokenizer_sha)

    start = time.perf_counter()
    state = _prepare_output(out, fingerprint, overwrite)
    if state and state.get("complete"):
        meta = json.loads((out / METADATA).read_text(encoding="utf-8"))
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        console.print(f"{out}: token cache already complete; nothing to do")
        return PrepareResult(out, report, meta["languages"], 0, 0, time.perf_counter() - start, resumed=True)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(out, config, seq_len, pad_id)
    if state:
        run.resume(state)
        console.print(f"{out}: resuming an interrupted prepare after {run.docs_done:,} documents")
    else:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)

    n_workers = workers if workers is not None else config.workers
    n_workers = n_workers or os.cpu_count() or 1
    docs = itertools.islice(_documents(files, config), run.docs_done, None)
    documents = tokens = 0
    checkpoints = 0
    since_checkpoint = 0

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with contextlib.closing(run.drop_log), Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
        console=console, disable=not show_progress, transient=False,
    ) as progress:
        task = progress.add_task("preparing")
        clock = [0.0]  # main-process seconds: reading + consuming
        for batch, result in _guard_workers(_process(_batches(docs, BATCH_DOCS, clock), config, tokenizer, n_workers)):
            consume_start = time.perf_counter()
            tokens += run.consume(batch, result)
            clock[0] += time.perf_counter() - consume_start
            documents += len(batch)
            since_checkpoint += len(batch)
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
    metadata = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "tokenizer": str(tokenizer),
        "tokenizer_sha256": tokenizer_sha,
        "vocab_size": sp.get_piece_size(),
        "eos_id": eos_id,
        "pad_id": pad_id,
        "config": config.model_dump(mode="json"),
        "languages": languages,
        "fingerprint": fingerprint,
    }
    write_json_atomic(out / METADATA, metadata)  # last: from here on the cache is complete
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    seconds = time.perf_counter() - start
    if show_progress:
        render_table(report, console)
    return PrepareResult(out, report, languages, documents, tokens, seconds, resumed=bool(state), main_seconds=clock[0])


def _guard_workers(results):
    """Turn a dead worker process into a clear error (the last checkpoint stays resumable)."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        yield from results
    except BrokenProcessPool as err:
        raise PrepareError(
            "a worker process died (its error is printed above); re-run to resume from the last "
            "checkpoint, or use --workers 1 to work without worker processes"
        ) from err


def _process(batches: Iterator[list[Document]], config: DataConfig, tokenizer: Path, n_workers: int):
    """Yield (batch, BatchResult of its read-accepted documents) in input order.

    With several workers at most ``2 × workers`` batches are in flight (``Pool.imap`` would read the
    whole input ahead into memory).
    """

    def items(batch: list[Document]) -> list[tuple[str, str]]:
        return [(d.lang, d.text) for d in batch if d.drop_reason is None]

    if n_workers <= 1:
        processor = DocumentProcessor(config, str(tokenizer))
        for batch in batches:
            yield batch, processor(items(batch))
        return

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent runs tensorstore threads.  ProcessPoolExecutor (not
    # multiprocessing.Pool, which waits forever when a worker dies) raises BrokenProcessPool instead.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        n_workers, mp_context=ctx, initializer=_init_worker, initargs=(config.model_dump_json(), str(tokenizer))
    ) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_work, items(batch))))
            if len(pending) >= 2 * n_workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
