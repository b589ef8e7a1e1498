"""Pod-compile benchmark: the shipped pod configs compiled by XLA:TPU for the slices they are meant for.

``python -m benchmarks.pod_compile [--pair CONFIG HARDWARE ...] [--set KEY=VALUE ...] [--json]``

For each (config, slice) pair it plans the config (``indicfm.launch.plan.make_plan``), compiles the real
train step for the slice's topology with libtpu (``indicfm.launch.compile.compile_train_step``; no TPU is
needed, only the ``libtpu`` package) and prints one row: the planner's memory per chip, XLA:TPU's
(arguments + outputs - donated + temporaries), their ratio, whether it fits, compile time, the
all-to-all bytes and the other collectives' bytes one chip receives per step, and the planner's
step time.  Compiling a 24-layer MoE for 64+ chips takes minutes of CPU; rows are printed as each
pair finishes, so a long run still reports what it got.
"""

from __future__ import annotations

import argparse
import json
import time

from indicfm.launch.compile import prepare_libtpu_env

#: the shipped pod configs and the slices they are sized for (moe-30b: 256 chips = v5p-512)
DEFAULT_PAIRS = (("configs/model/moe-8b.yaml", "v5p-128"), ("configs/model/moe-30b.yaml", "v5p-512"))


def measure_pair(config: str, hardware: str, sets: list[str]) -> dict:
    """Plan and compile one config for one slice; the figures of one table row."""
    from indicfm.config import load_config
    from indicfm.hardware import GIB, parse_slice
    from indicfm.launch.compile import OutOfMemory, compile_train_step
    from indicfm.launch.plan import make_plan

    cfg = load_config(config, sets)
    plan = make_plan(cfg, hardware)
    row = {
        "config": config,
        "hardware": hardware,
        "mesh": plan.mesh,
        "remat": plan.remat,
        "micro_batches": plan.micro_batches,
        "planner_gib": plan.memory.total / GIB,
        "planner_fits": plan.memory.fits,
        "planner_step_s": plan.time.total,
    }
    started = time.perf_counter()
    try:
        report = compile_train_step(cfg, parse_slice(hardware))
    except OutOfMemory as err:
        row.update(error=str(err), wall_s=time.perf_counter() - started)
        return row
    collectives = report.collectives
    row.update(
        xla_gib=report.total_bytes / GIB,
        ratio=plan.memory.total / report.total_bytes,
        fits=report.fits,
        compile_s=report.compile_seconds,
        lower_s=report.lower_seconds,
        all_to_all_gib=sum(v["bytes"] for k, v in collectives.items() if "all-to-all" in k) / GIB,
        # the exchange's overflow rounds (conditional branches): run only under skewed routing
        all_to_all_if_skewed_gib=sum(v["bytes_if_taken"] for k, v in collectives.items() if "all-to-all" in k) / GIB,
        other_collectives_gib=sum(v["bytes"] for k, v in collectives.items() if "all-to-all" not in k) / GIB,
        collectives=collectives,
        mosaic_kernels=report.kernels.get("mosaic", 0),
        hlo_chars=report.hlo_chars,
        hlo_instructions=report.hlo_instructions,
        xla=report.to_dict()["memory_gib"],
    )
    return row


def print_row(row: dict) -> None:
    head = f"{row['config']} on {row['hardware']} (mesh {row['mesh']}, remat={row['remat']}, {row['micro_batches']} micro-batch(es))"
    if "error" in row:
        print(f"{head}: planner {row['planner_gib']:.2f} GiB/chip; {row['error']}", flush=True)
        return
    print(
        f"{head}\n"
        f"  planner {row['planner_gib']:.2f} GiB/chip | XLA:TPU {row['xla_gib']:.2f} GiB/chip "
        f"({'fits' if row['fits'] else 'DOES NOT FIT'}) | planner/XLA {row['ratio']:.2f} | "
        f"compile {row['compile_s']:.0f} s (trace {row['lower_s']:.0f} s) | all-to-all {row['all_to_all_gib']:.3f} GiB/step "
        f"(+{row['all_to_all_if_skewed_gib']:.3f} in overflow rounds, only under skewed routing) | "
        f"other collectives {row['other_collectives_gib']:.3f} GiB/step | planner step {row['planner_step_s']:.3f} s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", nargs=2, action="append", metavar=("CONFIG", "HARDWARE"),
                        help="a config and the slice to compile it for (repeatable; default: the shipped pod configs)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every pair, e.g. model.num_layers=4")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    args = parser.parse_args(argv)
    prepare_libtpu_env()  # before JAX starts, so libtpu starts quietly
    rows = []
    for config, hardware in args.pair or DEFAULT_PAIRS:
        rows.append(measure_pair(config, hardware, args.sets))
        print_row(rows[-1])
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
