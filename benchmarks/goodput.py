"""Step times, MFU and goodput of one ``indicfm train`` run, checked against a stopwatch outside it.

``python -m benchmarks.goodput [--workdir DIR] [--config quickstart] [--steps 20] [--checkpoint-every 10]
[--set KEY=VALUE ...]``: runs ``indicfm train`` as a user would (a child process, so the stopwatch
sees the interpreter's start-up and exit too), then prints from its ``metrics.jsonl``:

* every step's time on the devices, the median, min ÷ median and the steps under half the median
  (a step under half the median is what the host-read timing produced: a read that waited gave one
  step two steps' time and its neighbour almost none);
* the largest MFU and the peak it is measured against (FLOP/s, where from, dtype), with the
  model's compute dtype;
* the goodput categories, their sum, the run's accounted wall clock and the stopwatch's;
* the 1-minute load average per CPU before and after, because on a shared machine every time
  depends on it.

``--existing`` reads a workdir that already has a run (e.g. ``runs/compare/runs/dense`` of
``indicfm compare``) instead of training; ``--wall S`` then gives its stopwatch time, if known.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.common import cpu_load, run_indicfm


def train(workdir: Path, config: str, settings: list[str]) -> float:
    """Run ``indicfm train``; its wall clock from before the child starts to after it exits."""
    wall, stderr = run_indicfm(["train", "--config", config, "--workdir", str(workdir)], settings)
    print("\n".join(line for line in stderr.splitlines() if line.startswith(("goodput", "step time", "training", "bug"))))
    return wall


def figures(workdir: Path, stopwatch: float | None) -> dict:
    """Everything the module docstring lists, from ``workdir/metrics.jsonl`` (and its config.yaml)."""
    from indicfm.report.runs import load_run
    from indicfm.train.goodput import CATEGORIES

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = {r["step"]: r for r in records if "loss" in r}
    seconds = [steps[s]["step_seconds"] for s in sorted(steps)]
    median = statistics.median(seconds)
    mfu = [steps[s]["mfu"] for s in sorted(steps) if isinstance(steps[s].get("mfu"), (int, float))]
    last = steps[max(steps)]
    history = load_run(workdir)
    totals, wall = history.goodput_totals(), history.goodput_wall()
    compute_dtype = "unknown"
    if (workdir / "config.yaml").is_file():
        from indicfm.config import load_config

        compute_dtype = load_config(workdir / "config.yaml").model.compute_dtype
    result = {
        "step_seconds": {s: round(steps[s]["step_seconds"], 4) for s in sorted(steps)},
        "median_step_s": round(median, 4),
        "min_step_s": round(min(seconds), 4),
        "min_over_median": round(min(seconds) / median, 3),
        "steps_under_half_the_median": [s for s in sorted(steps) if steps[s]["step_seconds"] < median / 2],
        "largest_mfu": round(max(mfu), 4) if mfu else None,
        "mfu_over_1_flagged": sum(1 for s in steps.values() if s.get("mfu") == "nan"),
        "peak": {"flops": last.get("peak_flops"), "name": last.get("peak_name"), "dtype": last.get("peak_dtype")},
        "compute_dtype": compute_dtype,
        "goodput_s": {c: round(totals[c], 3) for c in CATEGORIES if totals[c] > 0},
        "goodput_sum_s": round(sum(totals.values()), 3),
        "accounted_wall_s": round(wall, 3),
        "sessions": len(history.goodput_sessions()),
    }
    if stopwatch is not None:
        result["stopwatch_wall_s"] = round(stopwatch, 3)
        result["goodput_sum_over_stopwatch"] = round(sum(totals.values()) / stopwatch, 4)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/goodput"), help="run directory (default runs/goodput)")
    parser.add_argument("--config", default="quickstart", help="config file or shipped name (default quickstart)")
    parser.add_argument("--steps", type=int, default=20, help="trainer.steps (default 20)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="checkpoint.every_steps (default 10)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more config overrides")
    parser.add_argument("--existing", action="store_true", help="read the workdir's run instead of training")
    parser.add_argument("--wall", type=float, default=None, help="with --existing: the run's stopwatch seconds")
    args = parser.parse_args(argv)

    print(f"load before: {cpu_load()}")
    stopwatch = args.wall
    if not args.existing:
        if (args.workdir / "metrics.jsonl").exists():
            parser.error(f"{args.workdir} already has a run; pick a new --workdir (or --existing to read it)")
        settings = [f"trainer.steps={args.steps}", f"checkpoint.every_steps={args.checkpoint_every}", "logging.progress=false", *args.sets]
        stopwatch = train(args.workdir, args.config, settings)
    print(f"load after:  {cpu_load()}")
    result = figures(args.workdir, stopwatch)
    print(json.dumps({"workdir": str(args.workdir), **result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
