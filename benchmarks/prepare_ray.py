"""``data prepare --engine ray`` on one node against the local engine, its time per stage, and a paper
estimate for a pretraining corpus on a cluster.

``python -m benchmarks.prepare_ray [--subset LINES] [--rounds N] [--tokenizer P.model]``

Input: ``../shared/data/corpus`` (≈163k real lines in 15 languages), or the shipped sample when it
is absent; ``--subset LINES`` takes the first LINES lines of each of its files instead (a quicker
run; the figures then say so).  Without ``--tokenizer`` the default tokenizer (akshara-preserving
BPE, 32k pieces) is trained on the shipped sample first (not timed), as benchmarks/prepare.py does.

Both engines run in this one process, on the same files, with every CPU: the local engine with
``workers`` = CPU count, the Ray engine on a local Ray instance of as many CPUs.  Each round runs
local, then starts a fresh Ray instance before the clock runs (as a running cluster is joined with
``--ray-address``; its start-up is printed separately) and runs Ray: fresh worker processes, which
start, import and load the tokenizer and LID model inside the timed run, as every new job on a
cluster does.  The ratio of a round is local seconds / Ray seconds (= Ray documents/s ÷ local
documents/s, and the same for tokens/s: both build the same cache, checked byte for byte every
round), and the median round's is printed (the goal: ≥ 0.8).

Then, from the median Ray round's per-stage CPU seconds, a paper estimate of the wall time of
``--tokens`` tokens on ``--nodes`` nodes of ``--cores`` cores each, with its assumptions printed:
stages whose tasks are independent divide their CPU seconds by the cluster's cores (buckets: by its
partition tasks); ``decide`` is one task, whose cost per duplicate pair is measured on synthetic
pairs (the corpus here has few duplicates) and multiplied by ``--duplicate-fraction`` of the
documents; reading the input, the shuffle's network transfer and the driver's drop-log
concatenation are sized from the measured bytes.  The
stage with the largest share is named as the limit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_CORPUS = REPO.parent / "shared" / "data" / "corpus"


def _input_dir(tmp: Path, subset: int | None) -> tuple[Path, str]:
    source = SHARED_CORPUS if SHARED_CORPUS.is_dir() else REPO / "samples" / "train"
    label = str(source)
    if subset is None:
        return source, label
    target = tmp / "subset"
    target.mkdir()
    for path in sorted(source.glob("*.txt")):
        with open(path, "rb") as f:
            head = [line for _, line in zip(range(subset), f)]
        (target / path.name).write_bytes(b"".join(head))
    return target, f"{label} (first {subset:,} lines of each file)"


def _one_round(input_dir: Path, model: Path, tmp: Path, round_: int, cpus: int) -> dict:
    import ray

    from indicfm.data.prepare import prepare

    out = {}
    for engine in ("local", "ray"):
        cache = tmp / f"{engine}-{round_}"
        if engine == "ray":
            # A fresh instance (so fresh worker processes, as every new job on a cluster gets),
            # started before the clock runs, as joining a running cluster would be.
            start = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
            out["ray_start_s"] = time.perf_counter() - start
        try:
            out[engine] = prepare([input_dir], model, cache, seq_len=2048, workers=cpus, engine=engine,
                                  show_progress=False)
        finally:
            if engine == "ray":
                ray.shutdown()
    out["drop_log_bytes"] = (tmp / f"ray-{round_}" / "dropped.tsv").stat().st_size
    out["same_cache"] = _same_cache(tmp / f"local-{round_}", tmp / f"ray-{round_}")
    for engine in ("local", "ray"):
        shutil.rmtree(tmp / f"{engine}-{round_}")
    return out


def _same_cache(a: Path, b: Path) -> bool:
    """Every file of the two caches (rows, reports, metadata) has the same bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / p).read_bytes() == (b / p).read_bytes() for p in files_a)


def run(subset: int | None = None, rounds: int = 3, tokenizer: str | None = None, vocab_size: int = 32000,
        tokens_target: float = 250e9, nodes: int = 32, cores: int = 64, tokens_per_doc: float = 1000.0,
        network_gbit: float = 25.0, duplicate_fraction: float = 0.3) -> dict:
    from benchmarks.prepare import _train_default_tokenizer

    cpus = os.cpu_count() or 1
    figures: dict = {"cpus": cpus}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        input_dir, figures["input"] = _input_dir(tmp, subset)
        model = Path(tokenizer) if tokenizer else _train_default_tokenizer(tmp / "tok", vocab_size)
        measured = [_one_round(input_dir, model, tmp, r, cpus) for r in range(rounds)]
        input_bytes = sum(p.stat().st_size for p in input_dir.glob("*.txt"))
    for m in measured:
        m["input_bytes"] = input_bytes
    ratios = [m["local"].seconds / m["ray"].seconds for m in measured]
    median = sorted(measured, key=lambda m: m["local"].seconds / m["ray"].seconds)[(len(measured) - 1) // 2]
    local, ray_result = median["local"], median["ray"]
    figures.update({
        "documents": local.documents,
        "tokens": local.tokens,
        "same_cache_every_round": all(m["same_cache"] for m in measured),
        "local_docs_per_s": local.docs_per_s,
        "local_tokens_per_s": local.tokens_per_s,
        "ray_docs_per_s": ray_result.docs_per_s,
        "ray_tokens_per_s": ray_result.tokens_per_s,
        "ratio_ray_vs_local": local.seconds / ray_result.seconds,
        "ratio_each_round": " ".join(f"{r:.3f}" for r in ratios),
        "ray_instance_start_s_not_timed": median["ray_start_s"],
        "goal_ratio": 0.8,
    })
    for stage, seconds in ray_result.stage_seconds.items():
        figures[f"ray_stage_wall_s.{stage}"] = seconds
    for stage, seconds in ray_result.stage_cpu_seconds.items():
        figures[f"ray_stage_task_cpu_s.{stage}"] = seconds
    # Share of the CPUs the process tasks kept busy during their stage: the rest is worker start-up
    # (imports, loading the tokenizer and LID model) and whatever else runs on the machine.
    figures["ray_process_stage_cpu_busy"] = ray_result.stage_cpu_seconds.get("process", 0.0) / max(
        ray_result.stage_seconds.get("process", 0.0) * cpus, 1e-9)
    figures["load_average_1min_after"] = f"{os.getloadavg()[0]:.1f} on {cpus} CPUs"
    figures.update(_estimate(ray_result, median, tokens_target, nodes, cores, tokens_per_doc, network_gbit,
                             duplicate_fraction))
    return figures


def _decide_seconds_per_pair(pairs: int = 2_000_000, seed: int = 0) -> float:
    """CPU seconds per duplicate pair of the ``decide`` task, measured on ``pairs`` synthetic pairs
    (two thirds exact-copy links, one third near-duplicate edges in small clusters and chains):
    the corpus here has too few duplicates for its own decide time to mean anything."""
    import numpy as np

    from indicfm.data.ray_engine import decide

    rng = np.random.default_rng(seed)
    docs = pairs * 3
    n_links, n_edges = 2 * pairs // 3, pairs - 2 * pairs // 3
    later = rng.choice(docs, size=n_links + n_edges, replace=False)
    earlier = (later * rng.uniform(0, 1, size=len(later))).astype(np.int64)
    links = np.stack([later[:n_links], earlier[:n_links]], axis=1)
    edges = np.stack([earlier[n_links:], later[n_links:]], axis=1)
    shard_starts = np.arange(0, docs, 16384, dtype=np.int64)
    start = time.process_time()
    decide(True, shard_starts, (links, edges, 0.0))
    return (time.process_time() - start) / pairs


def _estimate(result, measured: dict, tokens_target: float, nodes: int, cores: int, tokens_per_doc: float,
              network_gbit: float, duplicate_fraction: float) -> dict:
    """Wall seconds per stage for ``tokens_target`` tokens on ``nodes`` × ``cores`` (module docstring).

    Per-token work (reading, cleaning, tokenizing, packing, writing) scales with tokens; per-document
    work (keys, MinHash, the dedup stages) with documents, of which the target corpus has
    ``tokens_target / tokens_per_doc``: the measured corpus has short lines (a few tens of tokens),
    so its per-document share of ``process`` is counted here as per-token work, which overstates
    it for long documents (an upper bound)."""
    from indicfm.data.config import DataConfig
    from indicfm.data.dedup import lsh_bands
    from indicfm.data.ray_engine import MAX_PARTITIONS, SHARD_RANGES
    from indicfm.data.stages import BATCH_DOCS, RANGE_BYTES

    cpu = result.stage_cpu_seconds
    docs_target = tokens_target / tokens_per_doc
    token_scale = tokens_target / max(result.tokens, 1)
    doc_scale = docs_target / max(result.documents, 1)
    total_cores = nodes * cores
    partitions = min(total_cores, MAX_PARTITIONS)
    per_pair = _decide_seconds_per_pair()
    est = {
        "read_input": measured["input_bytes"] / max(result.tokens, 1) * tokens_target
        / (nodes * network_gbit * 1e9 / 8),
        "process": cpu.get("process", 0.0) * token_scale / total_cores,
        "buckets": cpu.get("buckets", 0.0) * doc_scale / partitions,
        # one task, over every duplicate pair (links and edges)
        "decide": per_pair * docs_target * duplicate_fraction,
        "finalize": cpu.get("finalize", 0.0) * doc_scale / total_cores,
        "write": cpu.get("write", 0.0) * token_scale / total_cores,
    }
    # The shuffle: each passing document's exact key (24 bytes), and per band its key and row (16)
    # plus, once per partition it lands in (at most one per band), its position, exact key and
    # fingerprint; then the kept tokens (int32) from process tasks to writers.  All but 1/nodes of
    # it crosses the network, spread over the nodes' links.
    dedup = DataConfig().dedup
    bands, _ = lsh_bands(dedup.threshold, dedup.num_perm)
    shuffle_bytes = docs_target * (24 + bands * (16 + 24 + dedup.num_perm)) + tokens_target * 4
    est["network_shuffle"] = shuffle_bytes * (1 - 1 / nodes) / (nodes * network_gbit * 1e9 / 8)
    # the driver concatenates dropped.tsv: measured bytes per document, at a local disk's ≈1 GB/s
    est["driver_drop_log"] = measured["drop_log_bytes"] / max(result.documents, 1) * docs_target / 1e9
    limit = max(est, key=est.get)
    bytes_per_doc = measured["input_bytes"] / max(result.tokens, 1) * tokens_per_doc
    docs_per_shard = SHARD_RANGES * min(BATCH_DOCS, max(int(RANGE_BYTES // bytes_per_doc), 1))
    shards = docs_target / docs_per_shard
    out = {
        "estimate.assumptions": (f"{tokens_target:.3g} tokens; {tokens_per_doc:,.0f} tokens/document "
                                 f"({docs_target:.3g} documents); {nodes} nodes x {cores} cores; per-stage CPU "
                                 f"seconds of the median Ray round scaled by tokens (process, write) or "
                                 f"documents (buckets, finalize), the parallel stages divided by "
                                 f"{total_cores} cores (buckets: {partitions} partition tasks); decide on one "
                                 f"core at {per_pair * 1e9:.0f} ns per "
                                 f"duplicate pair (measured on 2M synthetic pairs), {duplicate_fraction:.0%} of "
                                 f"documents duplicates (assumed); input bytes/token as measured here, read and "
                                 f"shuffled at {network_gbit:g} Gbit/s per node; 1 GB/s for the drop log; "
                                 "ideal scheduling (no stragglers, no task overheads, no retries)"),
        "measured_duplicate_fraction_here": _duplicate_fraction(result.report),
    }
    for stage, seconds in est.items():
        out[f"estimate_s.{stage}"] = seconds
    out["estimate_hours_total"] = sum(est.values()) / 3600
    out["estimate.limiting_stage"] = limit
    # Not a time, a scaling risk: every process task returns one object per partition.
    out["estimate.shuffle_objects"] = (f"{shards:.3g} shards x {partitions + 2} returns = "
                                       f"{shards * (partitions + 2):.3g}")
    out["estimate.bucket_task_input_gb"] = docs_target * (24 + bands * (16 + 24 + dedup.num_perm)) / partitions / 1e9
    return out


def _duplicate_fraction(report: dict) -> float:
    docs = dups = 0
    for counts in report["languages"].values():
        docs += counts["docs_in"]
        dropped = counts.get("dropped", {})
        dups += dropped.get("exact_duplicate", 0) + dropped.get("near_duplicate", 0)
    return dups / max(docs, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", type=int, help="only the first LINES lines of each corpus file")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (local, ray); the median round is printed")
    parser.add_argument("--tokenizer", help="SentencePiece .model to use (default: train the default tokenizer)")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="pieces of the tokenizer trained when no --tokenizer")
    parser.add_argument("--tokens", type=float, default=250e9, help="tokens of the estimated corpus")
    parser.add_argument("--nodes", type=int, default=32, help="nodes of the estimated cluster")
    parser.add_argument("--cores", type=int, default=64, help="cores per node of the estimated cluster")
    parser.add_argument("--tokens-per-doc", type=float, default=1000.0,
                        help="average document length of the estimated corpus")
    parser.add_argument("--network-gbit", type=float, default=25.0, help="network bandwidth per node, Gbit/s")
    parser.add_argument("--duplicate-fraction", type=float, default=0.3,
                        help="share of the estimated corpus's documents that are duplicates")
    args = parser.parse_args()
    figures = run(args.subset, args.rounds, args.tokenizer, args.vocab_size, args.tokens, args.nodes, args.cores,
                  args.tokens_per_doc, args.network_gbit, args.duplicate_fraction)
    for key, value in figures.items():
        print(f"{key:>38}: {value:,.3f}" if isinstance(value, float) else f"{key:>38}: {value}")


if __name__ == "__main__":
    main()
