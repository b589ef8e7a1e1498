"""Tokenizer benchmark: training time and peak memory of the default 64k tokenizer, encode throughput.

``python -m benchmarks.tokenizer [--quick]``.  Trains with the default recipe (``TokenizerConfig``)
on ``../shared/data/corpus`` + ``../shared/data/flores200/dev`` when present (the issue's setting),
otherwise on the shipped sample; ``--quick`` always uses the sample and an 8k vocabulary.  Training
runs in a child process so its peak resident memory is measured alone (``ru_maxrss`` of the child).
Throughput is SentencePiece encoding of the evaluation lines (NFC-normalised beforehand, as the data
pipeline does), with 1 and 2 threads, best of three passes.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def _inputs(quick: bool) -> tuple[list[Path], Path, int, str]:
    """(training inputs, parallel text for encoding, vocab size, description)."""
    if not quick and (SHARED / "corpus").is_dir() and (SHARED / "flores200" / "dev").is_dir():
        return [SHARED / "corpus", SHARED / "flores200" / "dev"], SHARED / "flores200" / "dev", 64000, "shared corpus + FLORES dev"
    if quick:
        return [REPO / "samples" / "train"], REPO / "samples" / "heldout", 8000, "shipped sample (quick)"
    return [REPO / "samples" / "train"], REPO / "samples" / "heldout", 64000, "shipped sample"


def _train_child(inputs: list[str], prefix: str, vocab_size: int, queue) -> None:
    from indicfm.tokenizer.config import TokenizerConfig
    from indicfm.tokenizer.train import train_tokenizer

    result = train_tokenizer(inputs, prefix, TokenizerConfig(vocab_size=vocab_size, num_threads=2))
    queue.put((result.seconds, sum(result.sampled.values())))


def _encode_throughput(model_file: Path, parallel_dir: Path) -> dict:
    import sentencepiece as spm

    from indicfm.text import normalize

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    lines = [normalize(line) for path in sorted(parallel_dir.glob("*.dev")) for line in path.read_text(encoding="utf-8").splitlines()]
    figures = {"encode_lines": len(lines), "encode_bytes": sum(len(x.encode("utf-8")) for x in lines)}
    for threads in (1, 2):
        best = float("inf")
        tokens = 0
        for _ in range(3):
            start = time.perf_counter()
            ids = sp.encode(lines, num_threads=threads)
            best = min(best, time.perf_counter() - start)
            tokens = sum(len(x) for x in ids)
        figures[f"encode_tokens_per_s_{threads}_threads"] = round(tokens / best)
        figures[f"encode_MB_per_s_{threads}_threads"] = round(figures["encode_bytes"] / best / 1e6, 2)
    return figures


def run(quick: bool) -> dict:
    inputs, parallel_dir, vocab_size, source = _inputs(quick)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "bench"
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_train_child, args=([str(p) for p in inputs], str(prefix), vocab_size, queue))
        wall = time.perf_counter()
        child.start()
        seconds, sentences = queue.get()
        child.join()
        wall = time.perf_counter() - wall
        if child.exitcode != 0:
            raise RuntimeError(f"training child exited with {child.exitcode}")
        # Linux reports ru_maxrss in KiB: the largest child waited for so far (only this one here).
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_mib = usage.ru_maxrss / 1024
        figures = {
            "data": source,
            "vocab_size": vocab_size,
            "train_sentences": sentences,
            "train_threads": 2,
            "train_s": round(seconds, 2),
            "train_process_wall_s": round(wall, 2),
            # CPU seconds of the training process: steadier than wall time on a shared machine.
            "train_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "train_peak_rss_MiB": round(peak_mib, 1),
        }
        figures.update(_encode_throughput(prefix.with_suffix(".model"), parallel_dir))
    return figures


def main() -> None:
    import json

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))


if __name__ == "__main__":
    main()
