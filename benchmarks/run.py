"""Run indicfm's benchmarks and print one table: ``python -m benchmarks.run [--quick] [--only NAME]``.

Every figure an issue asks for is printed here, measured in one run, so ratios (model FLOP/s ÷ the
device's measured peak, prepare throughput ÷ bare SentencePiece, ...) hold even on noisy shared
machines.  Each benchmark is a module of this package with ``run(quick: bool) -> dict`` returning
flat ``{name: number or text}`` figures; this runner only schedules, prints and saves them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

#: name → module; order is the order of the table.
BENCHMARKS: dict[str, str] = {
    "peak": "benchmarks.peak",
    "step": "benchmarks.step",
    "moe": "benchmarks.moe",
    "attention": "benchmarks.attention",
    "tokenizer": "benchmarks.tokenizer",
    "prepare": "benchmarks.prepare",
    "features": "benchmarks.features",
    "loader": "benchmarks.loader",
    "lid": "benchmarks.lid_accuracy",
    "checkpoint": "benchmarks.checkpoint",
}


def describe_machine() -> dict:
    """Where the figures come from: they mean nothing without the machine."""
    import os

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import jax

        info["jax"] = jax.__version__
        info["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()[:1]] + [f"x{jax.device_count()}"]
    except Exception as err:  # a broken accelerator runtime must not hide the CPU figures
        info["jax"] = f"unavailable ({err})"
    return info


def run_one(name: str, quick: bool) -> dict:
    try:
        module = importlib.import_module(BENCHMARKS[name])
    except ModuleNotFoundError as err:
        return {"status": f"not available ({err.name})"}
    start = time.perf_counter()
    try:
        figures = module.run(quick=quick)
    except Exception as err:  # report and go on: one failing benchmark must not hide the others
        traceback.print_exc()
        return {"status": f"failed: {type(err).__name__}: {err}"}
    figures = dict(figures)
    figures["wall_s"] = round(time.perf_counter() - start, 2)
    return figures


def print_table(results: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="indicfm benchmarks")
    table.add_column("benchmark")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, figures in results.items():
        for i, (key, value) in enumerate(figures.items()):
            shown = f"{value:,.4g}" if isinstance(value, float) else str(value)
            table.add_row(name if i == 0 else "", key, shown)
        table.add_section()
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: every figure in under 10 minutes on 2 CPU cores")
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only this benchmark (repeatable)")
    parser.add_argument("--output", type=Path, default=Path("benchmark_results.json"), help="where to write the JSON")
    args = parser.parse_args(argv)

    names = args.only or list(BENCHMARKS)
    results: dict[str, dict] = {}
    for name in names:
        print(f"[benchmarks] running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(name, args.quick)
    print_table(results)
    payload = {"machine": describe_machine(), "quick": args.quick, "results": results}
    args.output.write_text(json.dumps(payload, indent=2, default=str))
    print(f"[benchmarks] wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
