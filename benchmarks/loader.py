"""Loader throughput from the token cache on one CPU core (tokens/s).

``python -m benchmarks.loader [--quick]``.  Writes a cache of random tokens (seq_len 2048, 16
languages, realistic segment/position arrays) and iterates ``TokenLoader`` batches with its
prefetch thread, in a child process pinned to one core (``sched_setaffinity``: tensorstore's
threads inherit it).  Goal (issue 4): ≥ 1.5M tokens/s, 50× what a 1B-active MoE consumes per H100.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

SEQ_LEN = 2048
LANGS = ["asm_Beng", "ben_Beng", "eng_Latn", "guj_Gujr", "hin_Deva", "kan_Knda", "mal_Mlym", "mar_Deva",
         "npi_Deva", "ory_Orya", "pan_Guru", "san_Deva", "snd_Arab", "tam_Taml", "tel_Telu", "urd_Arab"]


def _write_cache(out: Path, rows_per_lang: int) -> None:
    import numpy as np

    from indicfm.data.cache import FORMAT_VERSION, METADATA, LanguageWriter, write_json_atomic
    from indicfm.data.pack import Packer

    rng = np.random.default_rng(0)
    languages = {}
    for lang in LANGS:
        packer = Packer(SEQ_LEN)
        lengths = rng.integers(20, 400, size=rows_per_lang * SEQ_LEN // 150)
        packer.add_many(rng.integers(4, 64000, size=int(lengths.sum()), dtype=np.int32), lengths)
        rows = packer.finish()
        writer = LanguageWriter(out / "rows" / lang, SEQ_LEN)
        writer.append(rows)
        writer.close()
        languages[lang] = {"rows": len(rows), "tokens": int(lengths.sum()), "documents": len(lengths), "split_documents": 0}
    write_json_atomic(out / METADATA, {"format_version": FORMAT_VERSION, "seq_len": SEQ_LEN,
                                       "tokenizer_sha256": "0" * 64, "languages": languages})


def _measure(cache: str, batch_size: int, batches: int, queue) -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from indicfm.data.loader import TokenLoader

    loader = TokenLoader(cache, batch_size, seed=0, process_index=0, process_count=1, prefetch=2)
    it = iter(loader)
    next(it)  # open files, first permutations
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(it)["tokens"].size
    queue.put(tokens / (time.perf_counter() - start))


def run(quick: bool = False) -> dict:
    rows_per_lang = 64 if quick else 512
    batch_size, batches = 32, (40 if quick else 200)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        _write_cache(cache, rows_per_lang)
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_measure, args=(str(cache), batch_size, batches, queue))
        child.start()
        tokens_per_s = queue.get(timeout=600)
        child.join()
    return {
        "seq_len": SEQ_LEN,
        "global_batch_size": batch_size,
        "cache_rows": rows_per_lang * len(LANGS),
        "tokens_per_s_one_core": tokens_per_s,
        "goal_tokens_per_s": 1.5e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for key, value in run(quick=args.quick).items():
        print(f"{key:>24}: {value:,.0f}" if isinstance(value, float) else f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
