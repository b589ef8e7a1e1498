"""``indicfm data prepare``: raw text → cleaned, deduplicated, tokenized, packed token cache.

This module is the entry point: it checks the inputs, the tokenizer and the output (a complete
cache of the same inputs is left as it is; an interrupted one resumes; anything else is refused),
picks the engine that runs the stages (:mod:`indicfm.data.stages`), and writes ``metadata.json``
last, so a cache without it is never taken as complete.

* ``engine="local"`` (:mod:`indicfm.data.local_engine`): one machine, worker processes and one
  in-order main process; resumable from checkpoints.  A ``gs://`` output is built in a local
  staging directory and uploaded when complete (:func:`_prepare_staged`).
* ``engine="ray"`` (:mod:`indicfm.data.ray_engine`, imported only then: Ray is optional): Ray tasks
  on one machine or a cluster; writes a bucket output in place.

Both build the same cache, byte for byte, from the same inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from indicfm.data.cache import FORMAT_VERSION, METADATA, STATE_DIR, write_json_atomic
from indicfm.data.config import DataConfig
from indicfm.data.dedup import STATE_FORMAT as DEDUP_STATE_FORMAT
from indicfm.data.local_engine import prepare_locally
from indicfm.data.report import render_table
from indicfm.data.sources import InputError, InputFile, find_input_files
from indicfm.data.workers import WorkerDied
from indicfm.storage import (
    as_path,
    file_identity,
    fresh,
    is_bucket_root,
    is_empty_or_missing,
    is_url,
    make_dirs,
    remove_tree,
)
from indicfm.tokenizer.load import SENTENCEPIECE, Tokenizer, TokenizerError, load_tokenizer


class PrepareError(ValueError):
    """A prepare that can't start (mismatching existing output, bad tokenizer, ...) or go on (a
    worker process died): the user's to fix or re-run, so the CLI prints it without a traceback."""


@dataclass
class PrepareResult:
    """What a prepare did, whichever engine ran it (for the CLI's summary and the benchmarks)."""

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
        raise InputError(f"{tokenizer}: tokenizer not found (a SentencePiece .model, e.g. from `indicfm tokenizer "
                         "train`, or a Hugging Face tokenizer.json)")
    files = find_input_files(list(inputs) or config.inputs, allow_unknown=config.allow_unknown_languages)
    if not files and not config.hub:
        raise InputError("no input files found (give --input PATH or data.inputs in the config)")
    try:
        tok = load_tokenizer(tokenizer)
    except TokenizerError as err:
        raise PrepareError(str(err)) from None
    tokenizer_sha = hashlib.sha256(tok.file.data).hexdigest()  # the bytes load_tokenizer read: the file's, read once
    fingerprint = _fingerprint(config, files, seq_len, tokenizer_sha, tok)

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
        return _prepare_with_ray(files, tokenizer, out, seq_len, config, tok, tokenizer_sha, fingerprint,
                                 workers, ray_address, show_progress, console, start)
    if is_url(out):
        return _prepare_staged(inputs, tokenizer, out, seq_len=seq_len, config=config, workers=workers,
                               overwrite=overwrite, show_progress=show_progress, console=console,
                               staging_dir=staging_dir, start=start)
    n_workers = workers if workers is not None else config.workers
    return _prepare_locally(files, tokenizer, out, seq_len, config, tok, tokenizer_sha, fingerprint, state, n_workers,
                            show_progress, console, start)


# -- the engines ----------------------------------------------------------------------------------


def _prepare_locally(files: Sequence[InputFile], tokenizer: Path, out: Path, seq_len: int, config: DataConfig,
                     tok: Tokenizer, tokenizer_sha: str, fingerprint: dict, state: dict | None, workers: int,
                     show_progress: bool, console, start: float) -> PrepareResult:
    """``engine="local"`` into a local ``out`` (indicfm.data.local_engine), then metadata.json."""
    _say_tokenizer(tokenizer, tok, console, show_progress)
    try:
        done = prepare_locally(files, tokenizer, out, seq_len=seq_len, config=config, pad_id=tok.padding_id,
                               fingerprint=fingerprint, state=state, workers=workers, show_progress=show_progress,
                               console=console, start=start)
    except WorkerDied as err:  # the engine's checkpoints make a re-run cheap: say so
        raise PrepareError(
            f"{err}; re-run to resume from the last checkpoint, or use --workers 1 to work without "
            "worker processes"
        ) from err
    _write_metadata(out, seq_len, tokenizer, tokenizer_sha, tok, config, done.languages, fingerprint)
    seconds = time.perf_counter() - start
    if show_progress:
        render_table(done.report, console)
    return PrepareResult(out, done.report, done.languages, done.documents, done.tokens, seconds, resumed=bool(state),
                         main_seconds=done.main_seconds, batch_cpu_seconds=done.batch_cpu_seconds)


def _prepare_with_ray(files, tokenizer: Path, out: Path, seq_len: int, config: DataConfig, tok: Tokenizer,
                      tokenizer_sha: str, fingerprint: dict, workers: int | None, ray_address: str | None,
                      show_progress: bool, console, start: float) -> PrepareResult:
    """``engine="ray"``: the stages run as Ray tasks (indicfm.data.ray_engine); an interrupted run
    left only ``.prepare_state`` (no state.json), which _prepare_output has removed: it starts again."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from indicfm.data.ray_engine import prepare_with_ray

    _say_tokenizer(tokenizer, tok, console, show_progress)
    make_dirs(out / STATE_DIR)
    write_json_atomic(out / STATE_DIR / "ray.json", {"engine": "ray", "fingerprint": fingerprint})
    n_workers = workers if workers is not None else config.workers
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  disable=not show_progress, transient=False) as progress:
        done = prepare_with_ray(files, _absolute(tokenizer), _absolute(out), seq_len=seq_len, config=config,
                                pad_id=tok.padding_id, progress=progress, address=ray_address,
                                workers=n_workers)
    _write_metadata(out, seq_len, tokenizer, tokenizer_sha, tok, config, done["languages"], fingerprint)
    if show_progress:
        render_table(done["report"], console)
    times = done["times"]
    return PrepareResult(out, done["report"], done["languages"], done["documents"], done["tokens"],
                         time.perf_counter() - start, resumed=False, batch_cpu_seconds=times.cpu.get("process", 0.0),
                         stage_seconds=dict(times.wall), stage_cpu_seconds=dict(times.cpu), nodes=done["nodes"],
                         placement=done["placement"])


def _say_tokenizer(location: Path, tok: Tokenizer, console, show_progress: bool) -> None:
    """State the tokenizer's special tokens (found or chosen) and warn where its own normaliser
    changes text beyond indicfm's NFC (it is used as it is: a model was trained with it)."""
    if show_progress:
        console.print(f"tokenizer {tok.describe()}", highlight=False, markup=False)
    for warning in tok.normalizer_warnings():
        console.print(f"[yellow]warning:[/] tokenizer {location}: {warning.detail}", highlight=False)


def _absolute(path: Path) -> Path:
    """An absolute local path (Ray tasks may run in another working directory); URLs as they are."""
    return path if is_url(path) else path.resolve()


# -- a bucket output from the local engine: built in local staging, then uploaded -----------------


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


# -- the output: checks, metadata.json ------------------------------------------------------------


def _fingerprint(config: DataConfig, files, seq_len: int, tokenizer_sha: str, tok: Tokenizer) -> dict:
    """What must be identical for a resume to be valid (inputs by path, size and mtime).

    A tokenizer.json's framing ids also depend on the tokenizer_config.json beside it, which its
    sha256 does not cover; a SentencePiece model's are in the file (and its caches keep the
    fingerprint they always had)."""
    relevant = config.model_dump(mode="json", exclude={"inputs", "cache_dir", "workers", "language_weights",
                                                       "mixture_temperature", "checkpoint_every_docs"})
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "tokenizer_sha256": tokenizer_sha,
        "config": relevant,
        "inputs": [file_identity(f.path) for f in files],
    }
    if tok.kind != SENTENCEPIECE:
        fingerprint["special_ids"] = [tok.start_id, tok.eos_id, tok.padding_id]
    return fingerprint


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


def _write_metadata(out: Path, seq_len: int, tokenizer: Path, tokenizer_sha: str, tok: Tokenizer, config: DataConfig,
                    languages: dict, fingerprint: dict) -> None:
    """metadata.json, last (from then on the cache is complete), and the resume state goes.

    ``bos_id``/``pad_id`` are the ids documents begin and rows are padded with (the tokenizer's
    own, or eos where it has none); ``special_tokens`` says which were found and which chosen."""
    metadata = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "tokenizer": str(tokenizer),
        "tokenizer_sha256": tokenizer_sha,
        "tokenizer_kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.start_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.padding_id,
        "special_tokens": tok.special.to_json(),
        "config": config.model_dump(mode="json"),
        "languages": languages,
        "fingerprint": fingerprint,
    }
    write_json_atomic(out / METADATA, metadata)
    with contextlib.suppress(OSError):  # the cache is complete; leftover state (NFS busy files) is harmless
        remove_tree(out / STATE_DIR)
