"""What the per-document features file costs ``data prepare``, and what ``data review`` does with it.

``python -m benchmarks.features [--quick] [--tokenizer P.model]``.  Input as ``benchmarks.prepare``
(``../shared/data/corpus`` when present, else the shipped sample; ``--quick``: the sample), with
the same default tokenizer (32k akshara BPE trained on the sample first, not timed).

In each of three rounds (``--quick``: one) the same prepare runs with ``data.features`` off, then
on, in one process (``--workers 1``: its CPU seconds are all of prepare's work and hardly move with
other load on a shared machine) and with every CPU.  Printed:

* ``added_cpu_fraction_one_process``: CPU seconds on / off - 1, the median round (goal ≤ 0.10);
* ``added_wall_fraction_all_workers``: the same for wall-clock seconds with all workers;
* ``features_mb_per_million_docs``: the file's size per document × 10⁶;
* ``review_load_s_per_million_docs`` / ``review_verdicts_s_per_million_docs``: ``data review``
  loading the file and re-applying changed thresholds to every document, per million documents.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.prepare import REPO, SHARED_CORPUS, _train_default_tokenizer

ROUNDS = 3


def _prepare(input_dir: Path, model: Path, out: Path, features: bool, workers: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, documents) of one prepare."""
    from data_pipeline.config import DataConfig
    from data_pipeline.prepare import prepare

    gc.collect()
    cpu = time.process_time()
    result = prepare([input_dir], model, out, seq_len=2048, workers=workers, show_progress=False,
                     config=DataConfig(features=features))
    return result.seconds, time.process_time() - cpu, result.documents


def run(quick: bool = False, tokenizer: str | None = None) -> dict:
    from data_pipeline.features import FEATURES_FILE
    from data_pipeline.review.rules import FeatureTable, apply_overrides

    input_dir = REPO / "samples" / "train" if quick or not SHARED_CORPUS.is_dir() else SHARED_CORPUS
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(tokenizer) if tokenizer else _train_default_tokenizer(tmp / "tok", 32000)
        rounds = []
        for r in range(1 if quick else ROUNDS):
            measured = {}
            for features in (False, True):
                for label, workers in (("one", 1), ("all", cpus)):
                    out = tmp / f"c-{r}-{features}-{label}"
                    measured[(features, label)] = _prepare(input_dir, model, out, features, workers)
                    if not (features and label == "one" and r == 0):  # that one is measured below
                        shutil.rmtree(out)
            rounds.append(measured)
        documents = rounds[0][(True, "one")][2]
        cpu_added = sorted(m[(True, "one")][1] / m[(False, "one")][1] - 1 for m in rounds)
        wall_added = sorted(m[(True, "all")][0] / m[(False, "all")][0] - 1 for m in rounds)
        cache = tmp / "c-0-True-one"
        size = (cache / FEATURES_FILE).stat().st_size
        start = time.perf_counter()
        table = FeatureTable.load(cache)
        load_s = time.perf_counter() - start
        lang = table.langs[0]
        changed = apply_overrides(table.config, {"language_filters": {lang: {"min_words": 5}}, "lid": {"min_confidence": 0.8}})
        start = time.perf_counter()
        table.verdicts(changed)
        verdicts_s = time.perf_counter() - start
        per_million = 1e6 / max(documents, 1)
        return {
            "input": str(input_dir.relative_to(REPO.parent)) if input_dir.is_relative_to(REPO.parent) else str(input_dir),
            "documents": documents,
            "cpus": cpus,
            "added_cpu_fraction_one_process": cpu_added[(len(cpu_added) - 1) // 2],
            "added_cpu_fraction_each_round": " ".join(f"{x:.3f}" for x in
                                                      (m[(True, "one")][1] / m[(False, "one")][1] - 1 for m in rounds)),
            "added_wall_fraction_all_workers": wall_added[(len(wall_added) - 1) // 2],
            "added_wall_fraction_each_round": " ".join(f"{x:.3f}" for x in
                                                       (m[(True, "all")][0] / m[(False, "all")][0] - 1 for m in rounds)),
            "goal_added_fraction": 0.10,
            "features_bytes_per_doc": size / max(documents, 1),
            "features_mb_per_million_docs": size * per_million / 1e6,
            "review_load_s_per_million_docs": load_s * per_million,
            "review_verdicts_s_per_million_docs": verdicts_s * per_million,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokenizer", help="SentencePiece .model to use (default: train the default tokenizer)")
    args = parser.parse_args()
    for key, value in run(quick=args.quick, tokenizer=args.tokenizer).items():
        print(f"{key:>36}: {value:,.4f}" if isinstance(value, float) else f"{key:>36}: {value}")


if __name__ == "__main__":
    main()
