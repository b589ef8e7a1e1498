"""What the per-document features file costs ``data prepare``, and what ``data review`` does with it.

``python -m benchmarks.features [--quick] [--rounds N] [--tokenizer P.model]``.  Input as
``benchmarks.prepare`` (``../shared/data/corpus`` when present, else the shipped sample;
``--quick``: the sample, one round), with the same default tokenizer (32k akshara BPE trained on the
sample first, not timed).

In each round the same prepare of the same corpus runs four times in this one process: with
``data.features`` off and on, each in one process (``--workers 1``: its CPU seconds are all of
prepare's work, and hardly move with other load on a shared machine) and with every CPU (what a
user waits for).  Rounds alternate which of off/on goes first, so drift in the machine's speed
over a round does not always favour one side.  Printed:

* ``added_cpu_fraction_one_process``: CPU seconds on / off - 1, the median over rounds (goal ≤ 0.10);
* ``added_wall_fraction_all_workers``: the same for wall-clock seconds with all workers;
* ``..._each_round``: every round's figure (the first also pays for imports: pyarrow, with features);
* ``accounted_cpu_fraction_one_process``: in one more features-on prepare (one process), the CPU
  seconds spent inside the features code itself (:func:`batch_features` and the
  :class:`FeatureCollector`, timed around each call, plus the language-ID calls made only for the
  file: documents an earlier rule dropped) / the rest of that prepare's CPU seconds.  Unlike the
  paired ratios above, no second run's speed enters it, so it hardly moves with the machine's load;
* ``features_mb_per_million_docs``: the file's size per document × 10⁶;
* ``review_load_s_per_million_docs`` / ``review_verdicts_s_per_million_docs``: ``data review``
  loading the file and re-applying changed thresholds to every document, per million documents.

Features can be turned off with ``data.features: false`` (``--set data.features=false``).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.prepare import REPO, SHARED_CORPUS, _train_default_tokenizer

ROUNDS = 5


def _prepare(input_dir: Path, model: Path, out: Path, features: bool, workers: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, documents) of one prepare."""
    from indicfm.data.config import DataConfig
    from indicfm.data.prepare import prepare

    gc.collect()
    cpu = time.process_time()
    result = prepare([input_dir], model, out, seq_len=2048, workers=workers, show_progress=False,
                     config=DataConfig(features=features))
    return result.seconds, time.process_time() - cpu, result.documents


class _CpuClock:
    """CPU seconds spent inside some functions (the outermost call counts, nested ones don't)."""

    def __init__(self):
        self.seconds, self.calls, self._depth = 0.0, 0, 0

    def wrap(self, function):
        def timed(*args, **kwargs):
            self._depth += 1
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.process_time() - start
                    self.calls += 1
        return timed


def _accounted(input_dir: Path, model: Path, out: Path) -> dict[str, float]:
    """CPU seconds of the features code (per part) / CPU seconds of the rest of one single-process
    prepare."""
    from unittest import mock

    import pyarrow.compute as pc

    import indicfm.data.stages as stages
    from indicfm.data.features import FeatureCollector, read_features
    from indicfm.data.lid import LanguageIdentifier

    batch, collector, lid = _CpuClock(), _CpuClock(), _CpuClock()
    patches = [mock.patch.object(stages, "batch_features", batch.wrap(stages.batch_features)),
               mock.patch.object(LanguageIdentifier, "predict", lid.wrap(LanguageIdentifier.predict))]
    patches += [mock.patch.object(FeatureCollector, name, collector.wrap(getattr(FeatureCollector, name)))
                for name in ("add", "save_part", "finish")]
    for patch in patches:
        patch.start()
    try:
        _, cpu, _ = _prepare(input_dir, model, out, True, 1)
    finally:
        for patch in patches:
            patch.stop()
    # language ID the file alone asked for: documents an earlier rule had dropped already
    table = read_features(out, ["reason", "lid_score"])
    after_lid = pc.is_in(table.column("reason"), value_set=pc.cast(
        ["wrong_language", "exact_duplicate", "near_duplicate"], table.schema.field("reason").type.value_type))
    extra = pc.sum(pc.and_(pc.is_valid(table.column("lid_score")),
                           pc.and_(pc.is_valid(table.column("reason")), pc.invert(after_lid)))).as_py() or 0
    extra_lid = lid.seconds * extra / max(lid.calls, 1)
    shutil.rmtree(out)
    rest = cpu - batch.seconds - collector.seconds - extra_lid
    return {"accounted_cpu_fraction_one_process": (batch.seconds + collector.seconds + extra_lid) / rest,
            "accounted_worker_columns": batch.seconds / rest,
            "accounted_main_process_and_file": collector.seconds / rest,
            "accounted_extra_language_id": extra_lid / rest}


def _review_figures(cache: Path) -> tuple[float, float]:
    """Seconds ``data review`` takes to load the features file, and to re-apply changed thresholds."""
    from indicfm.data.review.rules import FeatureTable, apply_overrides

    start = time.perf_counter()
    table = FeatureTable.load(cache)
    load_s = time.perf_counter() - start
    changed = apply_overrides(table.config, {"language_filters": {table.langs[0]: {"min_words": 5}},
                                             "lid": {"min_confidence": 0.8}})
    start = time.perf_counter()
    table.verdicts(changed)
    return load_s, time.perf_counter() - start


def run(quick: bool = False, tokenizer: str | None = None, rounds: int = ROUNDS) -> dict:
    from indicfm.data.features import FEATURES_FILE

    input_dir = REPO / "samples" / "train" if quick or not SHARED_CORPUS.is_dir() else SHARED_CORPUS
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(tokenizer) if tokenizer else _train_default_tokenizer(tmp / "tok", 32000)
        measured = []  # per round: {(features, "one" | "all"): (wall s, cpu s, documents)}
        kept = tmp / "with-features"  # one cache with features, for the size and review figures
        for r in range(1 if quick else rounds):
            this_round = {}
            for features in ((False, True) if r % 2 == 0 else (True, False)):
                for label, workers in (("one", 1), ("all", cpus)):
                    out = tmp / f"c-{r}-{features}-{label}"
                    this_round[(features, label)] = _prepare(input_dir, model, out, features, workers)
                    if features and not kept.exists():
                        out.rename(kept)
                    else:
                        shutil.rmtree(out)
            measured.append(this_round)
        accounted = _accounted(input_dir, model, tmp / "accounted")
        cpu_added = [m[(True, "one")][1] / m[(False, "one")][1] - 1 for m in measured]
        wall_added = [m[(True, "all")][0] / m[(False, "all")][0] - 1 for m in measured]
        documents = measured[0][(True, "one")][2]
        size = (kept / FEATURES_FILE).stat().st_size
        load_s, verdicts_s = _review_figures(kept)
        per_million = 1e6 / max(documents, 1)
        return {
            "input": str(input_dir.relative_to(REPO.parent)) if input_dir.is_relative_to(REPO.parent) else str(input_dir),
            "documents": documents,
            "cpus": cpus,
            "rounds": len(measured),
            "added_cpu_fraction_one_process": statistics.median(cpu_added),
            "added_cpu_fraction_each_round": " ".join(f"{x:.3f}" for x in cpu_added),
            "added_wall_fraction_all_workers": statistics.median(wall_added),
            "added_wall_fraction_each_round": " ".join(f"{x:.3f}" for x in wall_added),
            "cpu_seconds_off_on_median": " ".join(f"{statistics.median(m[(f, 'one')][1] for m in measured):.2f}"
                                                  for f in (False, True)),
            "wall_seconds_off_on_median": " ".join(f"{statistics.median(m[(f, 'all')][0] for m in measured):.2f}"
                                                   for f in (False, True)),
            **accounted,
            "goal_added_fraction": 0.10,
            "features_bytes_per_doc": size / max(documents, 1),
            "features_mb_per_million_docs": size * per_million / 1e6,
            "review_load_s_per_million_docs": load_s * per_million,
            "review_verdicts_s_per_million_docs": verdicts_s * per_million,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the shipped sample, one round")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds whose median is reported")
    parser.add_argument("--tokenizer", help="SentencePiece .model to use (default: train the default tokenizer)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    for key, value in run(quick=args.quick, tokenizer=args.tokenizer, rounds=args.rounds).items():
        print(f"{key:>36}: {value:,.4f}" if isinstance(value, float) else f"{key:>36}: {value}")


if __name__ == "__main__":
    main()
