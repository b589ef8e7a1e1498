"""Pod-compile benchmark: the shipped pod configs compiled by XLA:TPU for the slices they are meant for.

``python -m benchmarks.pod_compile [--pair CONFIG HARDWARE ...] [--set KEY=VALUE ...] [--json]``

For each (config, slice) pair it plans the config (``indicfm.launch.plan.make_plan``), compiles the real
train step for the slice's topology with libtpu (``indicfm.launch.compile.compile_train_step``; no TPU is
needed, only the ``libtpu`` package) and prints one row: the planner's memory per chip, XLA:TPU's
(arguments + outputs - donated + temporaries), their ratio, whether it fits, compile time, the
bytes one chip receives per step in each kind of collective (FSDP gradient reduction counted as the
reduce-scatter XLA:TPU runs), the planner's step time at its assumed MFU, and beside it the bound
the compiled program implies (``indicfm.launch.compile_bound``: per-step FLOPs and HBM bytes at the
chip's peak, plus the all-to-all on the critical path) with the MFU that bound allows.  Compiling a 24-layer MoE for 64+ chips takes minutes of CPU; rows are printed as each
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
    from indicfm.launch.compile import OutOfMemory, bound_for, compile_train_step
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
        "planner_mfu": plan.mfu,
    }
    started = time.perf_counter()
    try:
        report = compile_train_step(cfg, parse_slice(hardware))
    except OutOfMemory as err:
        row.update(error=str(err), wall_s=time.perf_counter() - started)
        return row
    collectives = report.collectives
    bound = bound_for(report, plan, plan.time.total)
    row.update(
        xla_gib=report.total_bytes / GIB,
        ratio=plan.memory.total / report.total_bytes,
        fits=report.fits,
        compile_s=report.compile_seconds,
        lower_s=report.lower_seconds,
        all_to_all_gib=report.all_to_all_bytes / GIB,
        # the exchange's overflow rounds (conditional branches): run only under skewed routing
        all_to_all_if_skewed_gib=sum(v["bytes_if_taken"] for k, v in collectives.items() if "all-to-all" in k) / GIB,
        other_collectives_gib=sum(v["bytes"] for k, v in collectives.items() if "all-to-all" not in k) / GIB,
        **{f"{kind.replace('-', '_')}_gib": collectives[kind]["bytes"] / GIB
           for kind in ("all-gather", "reduce-scatter", "all-reduce")},
        xla_flops=report.flops_per_chip,
        step_flops=report.step_flops_per_chip,
        flops_loop_scale=report.flops_loop_scale,
        splash_flops=report.uncounted_kernel_flops_per_chip,
        model_flops=bound.model_flops,
        xla_bytes_accessed_gib=report.bytes_accessed_per_chip / GIB,
        hbm_gib=report.step_hbm_bytes_per_chip / GIB,
        bound=bound.to_dict(),
        bound_step_s=bound.step_seconds,
        bound_mfu=bound.mfu,
        collectives=collectives,
        mosaic_kernels=report.kernels.get("mosaic", 0),
        hlo_chars=report.hlo_chars,
        hlo_instructions=report.hlo_instructions,
        xla=report.to_dict()["memory_gib"],
    )
    return row


def print_row(row: dict) -> None:
    b = row.get("bound", {})
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
        f"other collectives {row['other_collectives_gib']:.3f} GiB/step (all-gather {row['all_gather_gib']:.2f}, "
        f"reduce-scatter {row['reduce_scatter_gib']:.2f}, all-reduce {row['all_reduce_gib']:.3f})\n"
        f"  FLOPs/chip/step: XLA {row['xla_flops']:.3e} (a loop body once, splash attention as none), per step "
        f"{row['step_flops']:.3e} (x{row['flops_loop_scale']:.2f} loops + {row['splash_flops']:.3e} splash), "
        f"model {row['model_flops']:.3e} | HBM/chip/step {row['hbm_gib']:.1f} GiB (XLA bytes accessed "
        f"{row['xla_bytes_accessed_gib']:.1f} GiB)\n"
        f"  compiled-program bound: max(FLOPs {b['flops_seconds']:.3f} s, HBM {b['memory_seconds']:.3f} s) + "
        f"all-to-all {b['all_to_all_seconds']:.3f} s = {b['step_seconds']:.3f} s/step, MFU <= {b['mfu']:.0%} | "
        f"planner at assumed {row['planner_mfu']:.0%} MFU: {row['planner_step_s']:.3f} s/step",
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
