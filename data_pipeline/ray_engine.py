"""``indicfm data prepare --engine ray``: the local engine's token cache, built by Ray tasks on one
machine or a cluster.

Why Ray Core tasks and not Ray Data: every stage here is a function of whole shards whose outputs
are routed by key (a partition of band keys, a shard, a language block of rows), and the result
must follow one global document order.  Core tasks with several return values give exactly that
all-to-all routing with no conversion of NumPy arrays to Arrow blocks and back, retry each task on
its own when a worker or node dies (lineage reconstruction re-runs the tasks whose outputs were
lost), and start no streaming executor, which on a 2-core machine costs more than the work.

The stages (the driver holds object references and per-shard counts only: no document, signature
or token passes through it)::

  scan      a task per text / JSON-lines file: cut it into line ranges (a newline scan)
  process   a task per shard (consecutive line ranges of one file; a parquet file; a hub dataset):
            the stages the local engine runs too (indicfm.data.stages: read, NFC, read-time reasons,
            filters, LID, exact key, MinHash, LSH band keys, BOS + ids + EOS).  Each document gets
            its global position (input number << 40 | line), the order the local engine reads in.
            Its exact keys, and its band keys with its fingerprint, are split into P partitions
            by key (the shuffle)
  buckets   a task per partition: exact-key groups (the first occurrence is the group's
            representative, each later copy a *link* to it) and, in every band bucket, the pairs of
            representatives whose fingerprints agree enough (an *edge*: the later one is a near
            duplicate of the earlier one if the earlier one is kept)
  decide    one task: first occurrence wins over the edges and links (see :func:`first_wins`);
            each shard gets back its dropped documents and their reasons
  finalize  a task per shard: report counts, its part of dropped.tsv, its kept documents' tokens
            per language
  write     a task per language and block of ROWS_PER_SHARD rows (one tensorstore shard file, so
            writers never share a file): the rows the local packer makes there, from the kept
            tokens of the shards that cover the block (offsets from a prefix sum of per-shard
            token counts)
  driver    report.json, examples.json, dropped.tsv (parts concatenated in order), metadata.json
            last

Why the cache is the local engine's, bit for bit: the local engine decides, in input order, that a
document is an exact duplicate when a *kept* document had its exact key, else a near duplicate when
a kept document shares a band key with it and their fingerprints agree on ``matches_needed``
positions (``DuplicateIndex``).  Copies with one exact key have one text after whitespace
collapsing, hence one signature, band keys and fingerprint: only the first (the representative) can
be kept, and a later copy is an exact duplicate when the representative is kept, a near duplicate
otherwise (whatever dropped the representative drops it too).  Among representatives, a document
is kept iff no earlier kept one is joined to it by an edge: the greedy order on the edge graph,
which :func:`first_wins` evaluates in rounds.  Packing follows global positions per language, so
rows are the same, and reports, examples and the drop log are merged in that order.

The one step that gathers anything is ``decide``: it holds the duplicate *pairs* (two int64 per
edge or link, never texts or signatures).  Faults: every task is a pure function of its inputs and
is retried (``max_retries``); writers fill fixed row blocks, so a re-run block writes the same
bytes.  A killed driver leaves ``.prepare_state`` without a ``state.json``; re-running the command
starts again cleanly (no partial cache is ever taken as complete: metadata.json comes last).

Inputs, tokenizer and output must be on a filesystem every node sees at the same path.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indicfm.data import stages  # BATCH_DOCS, RANGE_BYTES: read at call time (tests change them)
from indicfm.data.cache import ROWS_PER_SHARD, STATE_DIR, create_language_arrays, write_rows_block
from indicfm.data.config import DataConfig, HubSource
from indicfm.data.dedup import matches_needed
from indicfm.data.pack import PackedRows
from indicfm.data.report import DROP_LOG, EXAMPLE_CHARS, LanguageCounts, Report, drop_log_line
from indicfm.data.sources import LINE_FORMATS, InputFile, LineRange, iter_documents, iter_hub_dataset, line_ranges
from indicfm.data.stages import (
    DocumentProcessor, DocumentsTask, RangeTask, document_batches, make_processor, read_task, reader_max_chars,
)
from indicfm.storage import as_path, make_dirs, open_for_reading

#: Line ranges (of at most stages.BATCH_DOCS lines each) per process task: large enough that a
#: task's fixed costs (scheduling, fetching the processor, the shuffle's per-partition objects)
#: are small against its ≈0.1 s of work per range.
SHARD_RANGES = 16
#: Dedup partitions (bucket tasks) at most: one per CPU up to this.  Every process task returns
#: one object per partition, so the shuffle makes shards x partitions objects; past a few hundred
#: partitions their count (Ray keeps metadata per object in the driver) costs more than the extra
#: bucket tasks gain (the buckets stage is a small share of the work).
MAX_PARTITIONS = 256
#: Position of a document: its input's number in the high bits, its line / record number below.
_LINE_BITS = 40
#: Test hook: when this environment variable (of the driver) names a path that does not exist yet,
#: the first process task to see it creates it and kills its own worker process (SIGKILL), as a
#: crash would; Ray must then retry the task.
KILL_ONCE_ENV = "INDICFM_RAY_KILL_ONCE"
#: Codes of the deduplication reasons in the arrays ``decide`` returns.
_DEDUP_REASONS = ("exact_duplicate", "near_duplicate")
INSTALL_HINT = "pip install 'indicfm[ray]'"
#: Times a task is re-run after its worker or node died (or its lost outputs are rebuilt).
MAX_RETRIES = 3


class RayNotInstalled(ImportError):
    """``--engine ray`` without the ``ray`` package."""


class RayRunError(RuntimeError):
    """A Ray task failed for good: an error inside it, or its worker or node lost too often."""


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise RayNotInstalled(
            f"--engine ray needs the Ray package, which is not installed; install it with: {INSTALL_HINT}"
        ) from err
    return ray


# -- shards ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One process task's documents: consecutive line ranges of a file, or a whole record source."""

    index: int
    input_index: int  # position of the file (or hub source) among the inputs
    file: InputFile | None
    ranges: tuple[LineRange, ...] = ()
    hub: HubSource | None = None

    def span(self) -> tuple[str, int, int]:
        """(source, first line, last line; -1: to its end): which documents the shard holds."""
        source = str(self.file.path) if self.file is not None else self.hub.name
        if not self.ranges:
            return source, 1, -1
        last = self.ranges[-1]
        return source, self.ranges[0].first_line, last.first_line + last.lines - 1

    @property
    def first_position(self) -> int:
        first_line = self.ranges[0].first_line if self.ranges else 1
        return (self.input_index << _LINE_BITS) | first_line

    def tasks(self, config: DataConfig):
        """The shard as the stages' batches (RangeTask / DocumentsTask), those the local engine reads."""
        if self.ranges:
            yield from (RangeTask(self.file, r) for r in self.ranges)
            return
        max_chars = reader_max_chars(config)
        if self.hub is not None:
            hub = self.hub
            docs = iter_hub_dataset(hub.name, config_name=hub.config_name, split=hub.split,
                                    text_field=hub.text_field, lang_field=hub.lang_field, lang=hub.lang,
                                    max_chars=max_chars)
        else:
            docs = iter_documents(self.file, max_chars=max_chars, text_field=config.text_field,
                                  lang_field=config.lang_field)
        yield from (DocumentsTask(batch) for batch in document_batches(docs))


@dataclass
class ShardDocs:
    """What a process task found, kept in the object store until ``finalize`` (columns per document
    unless noted; ``passing``: indices of the documents that reached deduplication)."""

    index: int
    positions: np.ndarray  # int64
    sources: list[str]
    lines: np.ndarray  # int64
    langs: list[str]
    reasons: list[str | None]  # before deduplication
    previews: list[str]
    passing: np.ndarray  # int64
    token_ids: np.ndarray  # of the passing documents, concatenated
    lengths: np.ndarray  # per passing document


@dataclass
class Partition:
    """One shard's share of one dedup partition: exact keys, and band entries with their documents."""

    key_positions: np.ndarray  # [n] int64
    keys: np.ndarray  # [n, 2] uint64 (the 16-byte exact key)
    band_keys: np.ndarray  # [e] uint64
    band_docs: np.ndarray  # [e] int64: rows of the three arrays below
    doc_positions: np.ndarray  # [m] int64
    doc_keys: np.ndarray  # [m, 2] uint64
    doc_fingerprints: np.ndarray  # [m, num_perm] uint8


@dataclass
class ShardSummary:
    """What a finalize task tells the driver (small)."""

    index: int
    counts: dict[str, list]  # lang -> [docs_in, docs_kept, tokens, Counter of reasons]
    kept_tokens: dict[str, int]  # lang -> kept tokens
    examples: list[tuple]  # (position, reason, lang, source, line, text or None) first ones per reason
    drop_lines: int


@dataclass
class StageTimes:
    """Wall seconds per stage (driver clock) and CPU seconds the tasks of each stage spent."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def _scan(path: str, max_lines: int, max_bytes: int) -> list[LineRange]:
    return list(line_ranges(path, max_lines=max_lines, max_bytes=max_bytes))


def _make_shards(files: Sequence[InputFile], ranges: dict[int, list[LineRange]], hub: Sequence[HubSource],
                 shard_ranges: int) -> list[Shard]:
    shards: list[Shard] = []
    for i, f in enumerate(files):
        if f.format in LINE_FORMATS:
            rs = ranges[i]
            for k in range(0, len(rs), shard_ranges):
                shards.append(Shard(len(shards), i, f, tuple(rs[k : k + shard_ranges])))
        else:
            shards.append(Shard(len(shards), i, f))
    for k, source in enumerate(hub):
        shards.append(Shard(len(shards), len(files) + k, None, hub=source))
    return shards


# -- task bodies (plain functions, wrapped as Ray tasks in _remote) ------------------------------

_PROCESSORS: dict[tuple[str, str], DocumentProcessor] = {}  # per worker process: (config, tokenizer) -> it


def _processor(config_json: str, tokenizer: str) -> DocumentProcessor:
    key = (config_json, tokenizer)
    if key not in _PROCESSORS:
        _PROCESSORS.clear()
        _PROCESSORS[key] = make_processor(config_json, tokenizer)
    return _PROCESSORS[key]


def _maybe_die_for_test(marker: str | None) -> None:
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _keys_as_u64(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), np.uint64).reshape(-1, 2) if keys else np.zeros((0, 2), np.uint64)


def process_shard(shard: Shard, config_json: str, tokenizer: str, partitions: int,
                  kill_marker: str | None = None) -> list:
    """[ShardDocs, stats, Partition 0 .. partitions-1] of one shard (see the module docstring)."""
    _maybe_die_for_test(kill_marker)
    cpu_start = time.process_time()
    config = DataConfig.model_validate_json(config_json)
    processor = _processor(config_json, tokenizer)
    lines, sources, langs, reasons, previews, keys, prints, bands, ids, lengths = ([] for _ in range(10))
    for task in shard.tasks(config):
        result = processor(task)
        lines.append(np.asarray(result.lines, np.int64))
        sources += [result.source] * len(result.reasons)
        langs += result.langs
        reasons += result.reasons
        previews += result.previews
        keys += result.keys
        if result.fingerprints is not None:
            prints.append(result.fingerprints)
            bands.append(result.bands)
        ids.append(result.token_ids)
        lengths.append(result.lengths)
    line_arr = np.concatenate(lines) if lines else np.zeros(0, np.int64)
    positions = (np.int64(shard.input_index) << np.int64(_LINE_BITS)) | line_arr
    passing = np.flatnonzero(np.array([r is None for r in reasons], bool)).astype(np.int64)
    docs = ShardDocs(shard.index, positions, sources, line_arr, langs, reasons, previews, passing,
                     np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32),
                     np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64))
    key_arr = _keys_as_u64(keys)
    pass_pos = positions[passing]
    parts = _split_partitions(pass_pos, key_arr,
                              np.concatenate(prints) if prints else None,
                              np.concatenate(bands) if bands else None, partitions)
    stats = {"docs": len(reasons), "tokens": int(docs.lengths.sum()), "cpu": time.process_time() - cpu_start,
             "node": _node_id()}
    return [docs, stats, *parts]


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _split_partitions(positions: np.ndarray, keys: np.ndarray, prints: np.ndarray | None,
                      bands: np.ndarray | None, partitions: int) -> list[Partition]:
    """Route exact keys by their first 8 bytes and band keys by value, modulo ``partitions``."""
    key_part = keys[:, 0] % np.uint64(partitions) if len(keys) else np.zeros(0, np.uint64)
    if bands is not None and bands.size:
        # The local engine's BandTable stores a band key 0 as 1: the same here, so the same
        # (2^-64-rare) collisions become candidates.
        bands = np.where(bands == 0, np.uint64(1), bands.astype(np.uint64))
        flat = bands.ravel()
        owner = np.repeat(np.arange(len(bands)), bands.shape[1])
        band_part = flat % np.uint64(partitions)
    out = []
    num_perm = prints.shape[1] if prints is not None else 0
    for p in range(partitions):
        mine = np.flatnonzero(key_part == p)
        if bands is not None and bands.size:
            sel = np.flatnonzero(band_part == p)
            docs, local = np.unique(owner[sel], return_inverse=True)
            out.append(Partition(positions[mine], keys[mine], flat[sel], local.astype(np.int64), positions[docs],
                                 keys[docs], prints[docs]))
        else:
            out.append(Partition(positions[mine], keys[mine], np.zeros(0, np.uint64), np.zeros(0, np.int64),
                                 np.zeros(0, np.int64), np.zeros((0, 2), np.uint64),
                                 np.zeros((0, num_perm), np.uint8)))
    return out


def dedup_partition(need: float, *parts: Partition) -> tuple[np.ndarray, np.ndarray, float]:
    """(links [n, 2]: later copy -> its representative, edges [m, 2]: earlier -> later
    representative, CPU seconds) of one partition, from every shard's share of it."""
    cpu_start = time.process_time()
    pos = np.concatenate([p.key_positions for p in parts])
    keys = np.concatenate([p.keys for p in parts]).reshape(-1, 2)
    links = np.zeros((0, 2), np.int64)
    if len(pos):
        order = np.lexsort((pos, keys[:, 1], keys[:, 0]))
        k, pos_sorted = keys[order], pos[order]
        starts = np.ones(len(k), bool)
        starts[1:] = (k[1:] != k[:-1]).any(axis=1)
        rep = pos_sorted[np.flatnonzero(starts)[np.cumsum(starts) - 1]]
        later = ~starts
        links = np.stack([pos_sorted[later], rep[later]], axis=1)
    edges = _near_edges(need, parts)
    return links, edges, time.process_time() - cpu_start


def _near_edges(need: float, parts: Sequence[Partition]) -> np.ndarray:
    """Pairs (earlier, later) of representatives that share a band key of this partition and whose
    fingerprints agree on at least ``need`` positions."""
    offsets = np.cumsum([0] + [len(p.doc_positions) for p in parts])
    band_keys = np.concatenate([p.band_keys for p in parts])
    if not len(band_keys):
        return np.zeros((0, 2), np.int64)
    band_docs = np.concatenate([p.band_docs + off for p, off in zip(parts, offsets)])
    doc_pos = np.concatenate([p.doc_positions for p in parts])
    doc_keys = np.concatenate([p.doc_keys for p in parts])
    prints = np.concatenate([p.doc_fingerprints for p in parts])
    order = np.argsort(band_keys, kind="stable")
    sorted_keys = band_keys[order]
    boundaries = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(sorted_keys)]])
    edges = []
    for lo, hi in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist()):
        members = band_docs[order[lo:hi]]
        # One representative per exact key: the member at the earliest position.
        members = members[np.lexsort((doc_pos[members], doc_keys[members, 1], doc_keys[members, 0]))]
        first = np.ones(len(members), bool)
        first[1:] = (doc_keys[members[1:]] != doc_keys[members[:-1]]).any(axis=1)
        reps = members[first]
        if len(reps) < 2:
            continue
        reps = reps[np.argsort(doc_pos[reps])]
        fp = prints[reps]
        for i in range(len(reps) - 1):
            agree = np.count_nonzero(fp[i + 1 :] == fp[i], axis=1)
            for j in np.flatnonzero(agree >= need).tolist():
                edges.append((doc_pos[reps[i]], doc_pos[reps[i + 1 + j]]))
    if not edges:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.array(edges, np.int64), axis=0)


def first_wins(edges: np.ndarray) -> np.ndarray:
    """The documents (positions) the greedy rule drops: going through documents in order, one is
    dropped iff an edge joins it to an earlier *kept* one.  ``edges``: [n, 2], earlier first.

    Evaluated in rounds, each a few whole-array operations: a document whose earlier neighbours are
    all dropped is kept; one with an earlier kept neighbour is dropped.  The earliest undecided
    document is decided every round, so it ends; rounds = the longest chain of documents each
    waiting for the one before (a few, for real near-duplicate clusters)."""
    if not len(edges):
        return np.zeros(0, np.int64)
    nodes, index = np.unique(edges, return_inverse=True)
    a, b = index.reshape(-1, 2).T
    state = np.zeros(len(nodes), np.int8)  # 0 undecided, 1 kept, 2 dropped
    while True:
        undecided_b = state[b] == 0
        a, b = a[undecided_b], b[undecided_b]  # edges into decided documents change nothing
        if not (state == 0).any():
            break
        waiting = np.zeros(len(nodes), bool)
        waiting[b[state[a] != 2]] = True  # an earlier neighbour kept or still undecided
        state[(state == 0) & ~waiting] = 1
        killed = b[state[a] == 1]
        state[killed] = 2
    return nodes[state == 2]


def decide(exact: bool, shard_starts: np.ndarray, *partials) -> list:
    """Per shard, (positions, reason codes) of its duplicates, then CPU seconds (see
    :func:`first_wins`); ``partials``: what :func:`dedup_partition` returned per partition."""
    cpu_start = time.process_time()
    links = np.concatenate([p[0] for p in partials]).reshape(-1, 2) if partials else np.zeros((0, 2), np.int64)
    edges = np.concatenate([p[1] for p in partials]).reshape(-1, 2) if partials else np.zeros((0, 2), np.int64)
    dropped_reps = first_wins(np.unique(edges, axis=0) if len(edges) else edges)
    rep_kept = ~np.isin(links[:, 1], dropped_reps)
    copy_reason = np.where(rep_kept & exact, 0, 1).astype(np.int8)
    positions = np.concatenate([links[:, 0], dropped_reps])
    reasons = np.concatenate([copy_reason, np.ones(len(dropped_reps), np.int8)])
    order = np.argsort(positions, kind="stable")
    positions, reasons = positions[order], reasons[order]
    owner = np.searchsorted(shard_starts, positions, side="right") - 1
    cuts = np.searchsorted(owner, np.arange(len(shard_starts) + 1))
    out = [(positions[lo:hi], reasons[lo:hi]) for lo, hi in zip(cuts[:-1], cuts[1:])]
    return [*out, time.process_time() - cpu_start]


def finalize_shard(docs: ShardDocs, duplicates: tuple[np.ndarray, np.ndarray], drop_dir: str,
                   examples_per_reason: int) -> tuple[ShardSummary, dict, float]:
    """Apply the duplicates' verdicts: (summary, {lang: (kept token ids, lengths)}, CPU seconds);
    writes the shard's part of dropped.tsv."""
    cpu_start = time.process_time()
    reasons = list(docs.reasons)
    dup_pos, dup_codes = duplicates
    where = np.searchsorted(docs.positions, dup_pos)
    for i, code in zip(where.tolist(), dup_codes.tolist()):
        reasons[i] = _DEDUP_REASONS[code]
    counts: dict[str, list] = {}
    examples: list[tuple] = []
    per_reason: Counter = Counter()
    drop_lines = []
    kept_mask = np.array([reasons[i] is None for i in docs.passing.tolist()], bool)
    doc_tokens = np.zeros(len(reasons), np.int64)
    doc_tokens[docs.passing] = docs.lengths
    for i, (lang, reason) in enumerate(zip(docs.langs, reasons)):
        c = counts.setdefault(lang, [0, 0, 0, Counter()])
        c[0] += 1
        if reason is None:
            c[1] += 1
            c[2] += int(doc_tokens[i])
            continue
        c[3][reason] += 1
        source, line = docs.sources[i], int(docs.lines[i])
        drop_lines.append(drop_log_line(source, line, lang, reason))
        if per_reason[reason] < examples_per_reason:
            per_reason[reason] += 1
            text = None if reason in _DEDUP_REASONS else docs.previews[i]
            examples.append((int(docs.positions[i]), reason, lang, source, line, text))
    (as_path(drop_dir) / f"{docs.index:08d}.tsv").write_text("".join(drop_lines), encoding="utf-8")
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pass_langs = np.array([docs.langs[i] for i in docs.passing.tolist()])
    token_keep = np.repeat(kept_mask, docs.lengths)
    for lang in dict.fromkeys(pass_langs.tolist()):
        sel = kept_mask & (pass_langs == lang)
        if sel.any():
            kept[lang] = (docs.token_ids[token_keep & np.repeat(pass_langs == lang, docs.lengths)],
                          docs.lengths[sel])
    summary = ShardSummary(docs.index, counts, {lang: int(v[1].sum()) for lang, v in kept.items()}, examples,
                           len(drop_lines))
    return summary, kept, time.process_time() - cpu_start


def example_texts(shard: Shard, config_json: str, positions: list[int]) -> dict[int, str]:
    """The text a report example shows of these (duplicate) documents of a shard: read again."""
    config = DataConfig.model_validate_json(config_json)
    wanted, out = set(positions), {}
    for task in shard.tasks(config):
        _, lines, columns = read_task(task, config, reader_max_chars(config))
        for line, text in zip(lines, columns.texts):
            pos = (shard.input_index << _LINE_BITS) | int(line)
            if pos in wanted:
                out[pos] = text[:EXAMPLE_CHARS]
        if len(out) == len(wanted):
            break
    return out


def rows_of_block(pieces: Sequence[tuple[np.ndarray, np.ndarray]], first_token: int, start: int, stop: int,
                  seq_len: int, pad_id: int) -> tuple[PackedRows, int]:
    """Rows of tokens [start, stop) of one language's stream, packed as :class:`~indicfm.data.pack.Packer`
    packs them, and how many of them start inside a document (``split_documents``).

    ``pieces``: (token ids, lengths) of whole documents covering the range, in order, the first
    starting at token ``first_token`` of the stream.  ``stop`` past a multiple of ``seq_len`` is the
    end of the language: the last row is padded (pad id, segment 0, position 0)."""
    ids = np.concatenate([p[0] for p in pieces]).astype(np.int32)
    lengths = np.concatenate([p[1] for p in pieces]).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    doc = np.repeat(np.arange(len(lengths)), lengths)
    position = (np.arange(len(ids)) - np.repeat(starts, lengths)).astype(np.int32)
    lo, hi = start - first_token, stop - first_token
    tokens, doc, position = ids[lo:hi], doc[lo:hi], position[lo:hi]
    pad = -len(tokens) % seq_len
    real = np.ones(len(tokens) + pad, bool)
    if pad:
        real[len(tokens) :] = False
        tokens = np.concatenate([tokens, np.full(pad, pad_id, np.int32)])
        doc = np.concatenate([doc, np.full(pad, doc[0])])
        position = np.concatenate([position, np.zeros(pad, np.int32)])
    n = len(tokens) // seq_len
    doc = doc.reshape(n, seq_len)
    segments = np.where(real.reshape(n, seq_len), doc - doc[:, :1] + 1, 0).astype(np.int32)
    position = position.reshape(n, seq_len)
    return PackedRows(tokens.reshape(n, seq_len), segments, position), int(np.count_nonzero(position[:, 0] > 0))


def write_block(directory: str, lang: str, first_row: int, first_token: int, start: int, stop: int,
                seq_len: int, pad_id: int, *kept: dict) -> tuple[int, float, int]:
    """Pack and write one block of rows of ``lang`` (see :func:`rows_of_block`): (split_documents,
    CPU seconds, tokens).  Writing a fixed block again writes the same bytes, so a retry is harmless."""
    cpu_start = time.process_time()
    rows, split = rows_of_block([k[lang] for k in kept], first_token, start, stop, seq_len, pad_id)
    write_rows_block(as_path(directory) / "rows" / lang, first_row, rows)
    return split, time.process_time() - cpu_start, stop - start


# -- the driver -----------------------------------------------------------------------------------


def _remote(ray, function, **options):
    return ray.remote(max_retries=options.pop("max_retries", MAX_RETRIES), **options)(function)


def _connect(ray, address: str | None, workers: int) -> bool:
    """Join ``address`` or start a local Ray instance (``workers`` CPUs; 0: all); True when this call
    started or joined it (and must shut it down)."""
    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    # Workers must import this copy of indicfm: the driver's import path goes with them.
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(_import_path())}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, **options)
    else:
        ray.init(num_cpus=workers or None, runtime_env=runtime_env, **options)
    return True


def _import_path() -> list[str]:
    """The directory holding this package, then the caller's PYTHONPATH."""
    root = str(Path(__file__).resolve().parent.parent)
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return [root, *extra]


def _rates(label: str, total: int, unit: str, docs=None, tokens=None):
    """A progress description of a stage, as the local engine shows it: tasks done, documents,
    documents/s and tokens/s since the stage began (``docs`` / ``tokens``: counts of a task's
    result)."""
    started = time.perf_counter()

    def describe(done: list) -> str:
        elapsed = max(time.perf_counter() - started, 1e-9)
        parts = [f"{label}: {len(done)}/{total} {unit}"]
        if docs is not None:
            n = sum(map(docs, done))
            parts += [f"{n:,} docs", f"{n / elapsed:,.0f} docs/s"]
        if tokens is not None:
            parts.append(f"{sum(map(tokens, done)) / elapsed:,.0f} tokens/s")
        return " · ".join(parts)

    return describe


def _wait_all(ray, refs: list, progress, task, describe) -> list:
    """ray.get of ``refs`` as they finish, updating the progress line with ``describe(done)``."""
    index = {ref: i for i, ref in enumerate(refs)}
    out: list = [None] * len(refs)
    pending = list(refs)
    done_values: list = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
        for ref in ready:
            out[index[ref]] = ray.get(ref)
            done_values.append(out[index[ref]])
        if progress is not None:
            progress.update(task, description=describe(done_values))
    return out


def prepare_with_ray(
    files: Sequence[InputFile],
    tokenizer: Path,
    out: Path,
    *,
    seq_len: int,
    config: DataConfig,
    pad_id: int,
    progress,
    address: str | None = None,
    workers: int = 0,
    partitions: int | None = None,
    shard_ranges: int | None = None,
) -> dict:
    """Run the stages (module docstring) into ``out``, which is ready and empty but for
    ``.prepare_state``; returns {"report", "languages", "documents", "tokens", "times", "nodes", "placement"}
    (placement: per shard, (source, first line, last line, node id)).
    The caller writes metadata.json."""
    ray = import_ray()
    times = StageTimes()
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times.wall[stage] = now - clock
        clock = now

    owns = _connect(ray, address, workers)
    try:
        lap("ray_start")
        config_json = config.model_dump_json()
        cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
        partitions = partitions or min(cpus, MAX_PARTITIONS)
        scan = _remote(ray, _scan)
        line_files = [i for i, f in enumerate(files) if f.format in LINE_FORMATS]
        scanned = ray.get([scan.remote(str(files[i].path), stages.BATCH_DOCS, stages.RANGE_BYTES) for i in line_files])
        shards = _make_shards(files, dict(zip(line_files, scanned)), config.hub, shard_ranges or SHARD_RANGES)
        shard_starts = np.array([s.first_position for s in shards], np.int64)
        lap("scan")

        # process: per shard, documents + their share of every dedup partition
        process = _remote(ray, process_shard, num_returns=2 + partitions, scheduling_strategy="SPREAD")
        tok = str(tokenizer)
        kill_marker = os.environ.get(KILL_ONCE_ENV)
        outputs = [process.remote(s, config_json, tok, partitions, kill_marker) for s in shards]
        docs_refs = [o[0] for o in outputs]
        task = progress.add_task("read · clean · tokenize") if progress is not None else None
        describe = _rates("read · clean · tokenize", len(shards), "shards", docs=lambda s: s["docs"],
                          tokens=lambda s: s["tokens"])
        stats = _wait_all(ray, [o[1] for o in outputs], progress, task, describe)
        times.cpu["process"] = sum(s["cpu"] for s in stats)
        documents = sum(s["docs"] for s in stats)
        lap("process")

        # buckets + decide
        dedup = config.dedup
        if (dedup.exact or dedup.near) and shards:
            need = matches_needed(dedup.threshold, dedup.num_perm) if dedup.near else float("inf")
            bucket = _remote(ray, dedup_partition)
            partials = [bucket.remote(need, *[o[2 + p] for o in outputs]) for p in range(partitions)]
            task = progress.add_task("dedup buckets") if progress is not None else None
            partial_values = _wait_all(ray, partials, progress, task,
                                       lambda done: f"dedup buckets: {len(done)}/{partitions} partitions")
            times.cpu["buckets"] = sum(v[2] for v in partial_values)
            del partial_values
            lap("buckets")
            decided = _remote(ray, decide, num_returns=len(shards) + 1).remote(dedup.exact, shard_starts, *partials)
            decided = decided if isinstance(decided, list) else [decided]
            times.cpu["decide"] = ray.get(decided[-1])
            duplicates = decided[:-1]
            del partials
        else:
            empty = ray.put((np.zeros(0, np.int64), np.zeros(0, np.int8)))
            duplicates = [empty] * len(shards)
        del outputs
        lap("decide")

        # finalize
        drop_dir = out / STATE_DIR / "dropped"
        make_dirs(drop_dir)
        fin = _remote(ray, finalize_shard, num_returns=3)
        finals = [fin.remote(d, dup, str(drop_dir), config.examples_per_reason) for d, dup in zip(docs_refs, duplicates)]
        del docs_refs, duplicates
        task = progress.add_task("finalize") if progress is not None else None
        summaries = _wait_all(ray, [f[0] for f in finals], progress, task,
                              _rates("report · drop log", len(shards), "shards",
                                     docs=lambda s: sum(c[0] for c in s.counts.values())))
        times.cpu["finalize"] = sum(ray.get([f[2] for f in finals]))
        lap("finalize")

        # write
        report, languages, examples = _merge_summaries(summaries, config)
        writes, write_meta = [], []
        writer = _remote(ray, write_block)
        for lang in sorted(languages):
            per_shard = [(s.index, s.kept_tokens[lang]) for s in summaries if s.kept_tokens.get(lang)]
            total = sum(t for _, t in per_shard)
            n_rows = -(-total // seq_len)
            create_language_arrays(out / "rows" / lang, seq_len, n_rows)
            ends = np.cumsum([t for _, t in per_shard])
            begins = ends - np.array([t for _, t in per_shard])
            for first_row in range(0, n_rows, ROWS_PER_SHARD):
                start = first_row * seq_len
                stop = min((first_row + ROWS_PER_SHARD) * seq_len, total)
                cover = np.flatnonzero((begins < stop) & (ends > start))
                refs = [finals[per_shard[k][0]][1] for k in cover.tolist()]
                writes.append(writer.remote(str(out), lang, first_row, int(begins[cover[0]]), start, stop,
                                            seq_len, pad_id, *refs))
                write_meta.append(lang)
            languages[lang]["rows"] = n_rows
        task = progress.add_task("write") if progress is not None else None
        written = _wait_all(ray, writes, progress, task,
                            _rates("write rows", len(writes), "blocks", tokens=lambda w: w[2]))
        times.cpu["write"] = sum(w[1] for w in written)
        for lang, (split, _, _) in zip(write_meta, written):
            languages[lang]["split_documents"] += split
        _fill_example_texts(ray, examples, shards, shard_starts, config_json, report)
        del finals
        lap("write")
        nodes = sorted({s["node"] for s in stats})
        placement = [(*shard.span(), s["node"]) for shard, s in zip(shards, stats)]
    except ray.exceptions.RayError as err:
        # An error raised inside a task (not retried), or a worker / node lost more than
        # MAX_RETRIES times: nothing is marked complete, so the same command starts again cleanly.
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise RayRunError(f"a Ray task failed ({type(err).__name__}: {detail}; lost workers and nodes are "
                          f"retried {MAX_RETRIES} times, errors in a task are not); {out} is not complete: "
                          "run the same command again to start over") from err
    finally:
        if owns:
            ray.shutdown()
    with (out / DROP_LOG).open("wb") as log:
        for k in range(len(shards)):
            with open_for_reading(drop_dir / f"{k:08d}.tsv") as part:
                shutil.copyfileobj(part, log)
    report.save(out)
    lap("finish")
    tokens = sum(v["tokens"] for v in languages.values())
    return {"report": report.to_dict(), "languages": languages, "documents": documents, "tokens": tokens,
            "times": times, "nodes": nodes, "placement": placement}


def _merge_summaries(summaries: Sequence[ShardSummary], config: DataConfig) -> tuple[Report, dict, list]:
    """The run's Report (counts; examples, those of duplicates without text yet) and languages."""
    report = Report(config.examples_per_reason)
    for s in summaries:
        for lang, (docs_in, kept, tokens, dropped) in s.counts.items():
            c = report.languages.setdefault(lang, LanguageCounts())
            c.docs_in += docs_in
            c.docs_kept += kept
            c.tokens += tokens
            c.dropped.update(dropped)
    candidates = sorted(e for s in summaries for e in s.examples)
    taken: Counter = Counter()
    examples = []
    for e in candidates:  # in global order: the first examples_per_reason of each reason
        if taken[e[1]] < config.examples_per_reason:
            taken[e[1]] += 1
            examples.append(e)
    languages = {}
    for lang, c in sorted(report.languages.items()):
        if c.docs_kept:
            languages[lang] = {"rows": 0, "tokens": c.tokens, "documents": c.docs_kept, "split_documents": 0}
    return report, languages, examples


def _fill_example_texts(ray, examples: list, shards: Sequence[Shard], shard_starts: np.ndarray,
                        config_json: str, report: Report) -> None:
    """Read again the text of the duplicates among the examples, then put them in the report."""
    wanted: dict[int, list[int]] = defaultdict(list)
    for e in examples:
        if e[5] is None:
            wanted[int(np.searchsorted(shard_starts, e[0], side="right") - 1)].append(e[0])
    reader = _remote(ray, example_texts)
    texts: dict[int, str] = {}
    for found in ray.get([reader.remote(shards[k], config_json, pos) for k, pos in wanted.items()]):
        texts.update(found)
    for position, reason, lang, source, line, text in examples:
        text = texts[position] if text is None else text
        report.examples[reason].append({"lang": lang, "source": source, "line": line, "text": text[:EXAMPLE_CHARS]})
