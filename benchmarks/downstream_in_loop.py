"""The share of a run's wall clock that in-loop downstream evaluation takes (issue 29; goal <= 5%).

``python -m benchmarks.downstream_in_loop [--workdir DIR] [--baseline] [--set KEY=VALUE ...]``
runs ``indicfm quickstart`` as a user would (a child process: tokenizer and cache, 200 steps
stopped halfway and resumed, ``configs/quickstart.yaml``'s shipped ``eval.downstream`` settings:
the offline minimal pairs in two languages), then prints from its ``metrics.jsonl``:

* every downstream evaluation's own wall time (``downstream/seconds``: the evaluation call
  itself, timed by the loop; not inferred from step times), their sum, and the sum's share of the
  run's accounted wall clock (both ``train()`` sessions, start-up and compilation included);
* the accuracies at the first and last evaluation;
* the time to build the evaluator (task index, tokenizer), from the run's own log line;
* with ``--baseline``: the same quickstart without downstream evaluation, and the difference of
  the two stopwatch times (noisy on a shared machine: the evaluation blocks are the figure).

``--existing DIR`` reads a workdir that already has a run instead.  Load average before and after
is printed, since every time on a shared machine depends on it.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from benchmarks.common import cpu_load, run_indicfm


def quickstart(workdir: Path, settings: list[str]) -> tuple[float, str]:
    """Run ``indicfm quickstart``; (stopwatch seconds, its console output)."""
    return run_indicfm(["quickstart", "--workdir", str(workdir)], settings)


def figures(workdir: Path) -> dict:
    """Downstream evaluation times and accuracies, and the run's wall clock, from ``metrics.jsonl``."""
    from indicfm.report.runs import load_run
    from indicfm.train.downstream_hook import SECONDS_KEY

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluations = [r for r in records if SECONDS_KEY in r]
    run = load_run(workdir)
    wall = run.goodput_wall()
    seconds = [float(r[SECONDS_KEY]) for r in evaluations]
    accuracy = {r["step"]: {k.split("/")[1]: v for k, v in r.items() if k.endswith("/acc")} for r in evaluations}
    return {
        "evaluations": [(r["step"], float(r[SECONDS_KEY])) for r in evaluations],
        "evaluation_seconds": sum(seconds),
        "wall_seconds": wall,
        "share": sum(seconds) / wall if wall > 0 else float("nan"),
        "goodput_evaluation_seconds": run.goodput_totals()["evaluation"],  # held-out bpb included
        "accuracy": accuracy,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the quickstart runs (default: a temporary folder)")
    parser.add_argument("--existing", type=Path, default=None, help="read this workdir's run instead of running one")
    parser.add_argument("--baseline", action="store_true", help="also run the quickstart without downstream evaluation")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="config overrides, as for indicfm")
    args = parser.parse_args(argv)

    print(f"load average before: {cpu_load()}")
    log = ""
    stopwatch = None
    if args.existing is not None:
        workdir = args.existing
    else:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="indicfm-downstream-")) / "qs"
        stopwatch, log = quickstart(workdir, args.settings)
    result = figures(workdir)
    built = re.findall(r"evaluator\s+ready\s+in\s+([0-9.]+)\s*s", log)  # the console may wrap the line
    print(f"workdir: {workdir}")
    for step, seconds in result["evaluations"]:
        accuracy = ", ".join(f"{task} {acc:.3f}" for task, acc in sorted(result["accuracy"][step].items()))
        print(f"  step {step:>4}: downstream evaluation {seconds:6.2f} s · {accuracy}")
    print(
        f"downstream evaluation blocks: {len(result['evaluations'])}, {result['evaluation_seconds']:.2f} s of "
        f"{result['wall_seconds']:.1f} s accounted wall clock (all sessions) = {100 * result['share']:.2f}% "
        f"(goal <= 5%); goodput 'evaluation' (held-out bpb too): {result['goodput_evaluation_seconds']:.2f} s"
    )
    later = [seconds for _, seconds in result["evaluations"][1:]]
    if later:
        # the first evaluation also compiles the scoring program; the later ones are what each further one costs
        steady = len(result["evaluations"]) * (sum(later) / len(later)) / result["wall_seconds"]
        print(f"first evaluation {result['evaluations'][0][1]:.2f} s (compiles the scoring program), later ones "
              f"{sum(later) / len(later):.2f} s on average: {100 * steady:.2f}% of the wall clock if every evaluation cost that")
    if built:
        print(f"building the evaluator (task index, tokenizer), per train() call: {', '.join(built)} s (counted as start-up)")
    if stopwatch is not None:
        print(f"quickstart stopwatch: {stopwatch:.1f} s")
    if args.baseline and args.existing is None:
        base_dir = workdir.parent / "baseline"
        base_wall, _ = quickstart(base_dir, args.settings + ["eval.downstream.tasks=[]"])
        print(f"quickstart without downstream evaluation: {base_wall:.1f} s; difference {stopwatch - base_wall:+.1f} s "
              f"({100 * (stopwatch - base_wall) / base_wall:+.1f}%; noisy on a shared machine)")
    print(f"load average after: {cpu_load()}")


if __name__ == "__main__":
    main()
