"""The quickstart's step time on this machine: this tree against a baseline commit, in one run.

``python -m benchmarks.train_loop [--baseline main] [--steps 60] [--repeats 2]``.

Both versions run ``indicfm train --config configs/quickstart.yaml`` (tiny-moe, batch 8 x 128
tokens) as a user would, in child processes, alternating baseline / this tree ``--repeats`` times so
a change of the machine's load hits both alike.  The tokenizer and token cache are built once (by
this tree) and shared, and so is JAX's compilation cache; evaluation is off (it is not step time).

A step's time is ``step_seconds`` in ``metrics.jsonl``: its time on the devices (from when it could
start to when its outputs were ready, ``indicfm.train.goodput``), without checkpoint, evaluation or
compilation time, i.e. what the run's throughput is made of.  A baseline older than that logged
the time between two host reads of metrics instead, whose median is still comparable but whose
single steps are not.  The first ``--warmup`` steps are left out.  Printed: the median step time of each
side over all its runs, and this tree's ÷ the baseline's (below 1 = faster), with each run's
median so the noise between runs of one side is visible.

The baseline's tree is ``git archive`` of ``--baseline`` (a commit, branch or tag of this repository).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def export_tree(ref: str, dest: Path) -> str:
    """Write commit ``ref`` of this repository to ``dest``; returns its full hash."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def shared_inputs(root: Path) -> list[str]:
    """Tokenizer and token cache of the quickstart config, built once: the ``--set`` values naming them."""
    from indicfm.config import CONFIG_DIR, load_config
    from indicfm.train.inputs import ensure_tokenizer_and_cache

    cfg = ensure_tokenizer_and_cache(load_config(CONFIG_DIR / "quickstart.yaml"), root, progress=False)
    return [f"tokenizer.model_file={cfg.tokenizer.model_file}", f"data.cache_dir={cfg.data.cache_dir}"]


def step_seconds(tree: Path, workdir: Path, settings: list[str]) -> list[float]:
    """Run ``indicfm train`` of ``tree`` on the quickstart config; every step's ``step_seconds``."""
    command = [sys.executable, "-c", "from indicfm.cli import main; main()", "train",
               "--config", str(tree / "configs" / "quickstart.yaml"), "--workdir", str(workdir)]  # fmt: skip
    for setting in settings:
        command += ["--set", setting]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"indicfm train in {tree} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_seconds"] for r in sorted(records, key=lambda r: r["step"]) if "step_seconds" in r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="main", help="commit, branch or tag to compare against (default: main)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default: 60)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out (compilation; default: 3)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each version, alternating (default: 2)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="indicfm-bench-loop-") as tmp:
        root = Path(tmp)
        commit = export_tree(args.baseline, root / "baseline")
        settings = shared_inputs(root / "inputs") + [
            f"trainer.steps={args.steps}",
            "eval.heldout_dir=null",
            "logging.progress=false",
            f"trainer.compilation_cache_dir={root / 'jax-cache'}",
        ]
        sides = {"baseline": root / "baseline", "this_tree": REPO}
        times: dict[str, list[list[float]]] = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for name, tree in sides.items():
                seconds = step_seconds(tree, root / f"{name}-{repeat}", settings)[args.warmup :]
                times[name].append(seconds)
                print(f"{name} run {repeat + 1}: median step {1e3 * statistics.median(seconds):.2f} ms", file=sys.stderr)

    median = {name: statistics.median(s for run in runs for s in run) for name, runs in times.items()}
    result = {
        "baseline_commit": commit,
        "steps_per_run": args.steps,
        "steps_measured_per_run": len(times["this_tree"][0]),
        "baseline_median_step_ms": round(1e3 * median["baseline"], 3),
        "this_tree_median_step_ms": round(1e3 * median["this_tree"], 3),
        "this_tree_over_baseline": round(median["this_tree"] / median["baseline"], 3),
        "run_medians_ms": {name: [round(1e3 * statistics.median(run), 3) for run in runs] for name, runs in times.items()},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
