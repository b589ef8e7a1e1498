"""Scanned vs unrolled layers: compile time and program size of the train step (``model.scan_layers``).

``python -m benchmarks.scan_layers [--layers 32] [--tpu-layers N] [--no-cpu] [--no-tpu] [--tpu-hardware v5p-8]``

For each case the trainer's own step (``indicfm.train.step.build_train_step``: forward, backward,
AdamW, router-bias update), jitted with the trainer's shardings, is traced, lowered and compiled
ahead of time from abstract arrays (nothing is allocated or run), once with the Python loop over
blocks (``scan_layers=false``) and once with the MoE blocks stacked and scanned.  Figures:

* ``trace_lower_s`` — tracing the step to a jaxpr and lowering it to StableHLO;
* ``compile_s`` — XLA's compile of that module;
* ``hlo_chars`` / ``hlo_instructions`` — the length of the optimized HLO text
  (``compiled.as_text()``) and its number of instructions (lines that define a value), the size of
  the program XLA emits: an unrolled step holds one copy of a block's program per layer.

Cases:

* ``cpu`` — ``configs/model/tiny-moe.yaml`` made 32 layers deep (narrow, so it compiles in
  seconds on a laptop), remat ``full`` as in the pod configs, one CPU device, batch 8 x 128;
* ``tpu`` — an MoE (32 layers unless ``--tpu-layers``) with moe-30b's block structure (2 dense first layers, shared
  expert, sigmoid router with loss-free bias, remat ``full``, bfloat16) but narrower so that its
  train state fits four chips, compiled by XLA:TPU (``libtpu``, no TPU needed) for a v5p 2x2x1
  slice with experts and FSDP over 2 chips each.  Skipped with a note when ``libtpu`` is missing.

Both variants of a case are measured in the same process, one after the other; compile times on
a shared machine are noisy, so compare the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indicfm.hardware import parse_slice
from indicfm.launch.compile import CompileError, prepare_libtpu_env, topology_devices, topology_name
from indicfm.launch.hlo_stats import hlo_size

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO / "configs" / "model"

@dataclass(frozen=True)
class Case:
    """One model to compile: a config file and ``--set``-style overrides, a mesh and a batch shape."""

    name: str
    config: Path
    overrides: tuple[str, ...]
    mesh: dict[str, int]
    batch: int
    seq_len: int


def cases(layers: int, tpu_layers: int) -> dict[str, Case]:
    cpu = Case(
        "cpu", MODEL_CONFIGS / "tiny-moe.yaml",
        (f"model.num_layers={layers}", "model.d_model=64", "model.head_dim=16", "model.d_ff=128",
         "model.d_expert=64", "model.vocab_size=2048", "model.remat=full", "model.attention_impl=xla"),
        {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, batch=8, seq_len=128,
    )
    tpu = Case(
        "tpu", MODEL_CONFIGS / "moe-30b.yaml",
        (f"model.num_layers={tpu_layers}", "model.d_model=1024", "model.num_heads=8", "model.num_kv_heads=4",
         "model.d_ff=4096", "model.num_experts=32", "model.top_k=4", "model.d_expert=512",
         "model.vocab_size=32000", "model.attention_impl=xla", "model.grouped_matmul=ragged_dot"),
        {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}, batch=8, seq_len=1024,
    )
    return {"cpu": cpu, "tpu": tpu}


def compile_step(case: Case, scan_layers: bool, devices: list[Any]) -> dict[str, Any]:
    """Trace, lower and compile the train step of ``case`` in one layout; its figures."""
    import jax
    import numpy as np

    from indicfm.config import MeshConfig, load_config
    from indicfm.model.flops import count_params
    from indicfm.sharding import make_mesh
    from indicfm.train.optimizer import run_optimizer
    from indicfm.train.state import abstract_train_state
    from indicfm.train.step import abstract_batch, build_train_step

    cfg = load_config(case.config, [*case.overrides, f"model.scan_layers={str(scan_layers).lower()}"])
    model_cfg = cfg.model
    mesh = make_mesh(MeshConfig(**case.mesh), devices[: int(np.prod(list(case.mesh.values())))])
    # the trainer's own step (optimizer, schedule, router-bias update, shardings, donation)
    tx, _ = run_optimizer(cfg)
    graphdef, state, shardings = abstract_train_state(model_cfg, tx, 0, mesh)
    batch = abstract_batch(case.batch, case.seq_len, mesh)
    with jax.set_mesh(mesh):
        jitted = build_train_step(cfg, mesh, graphdef, shardings)
        start = time.perf_counter()
        lowered = jitted.lower(state, batch)
        trace_lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
    chars, instructions = hlo_size(compiled.as_text())
    print(f"{case.name} {'scanned' if scan_layers else 'unrolled'}: lowered in {trace_lower_s:.1f} s, "
          f"compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
    return {
        "layout": "scanned" if scan_layers else "unrolled",
        "trace_lower_s": trace_lower_s,
        "compile_s": compile_s,
        "hlo_chars": chars,
        "hlo_instructions": instructions,
        "params_M": count_params(model_cfg) / 1e6,
    }


def compare(case: Case, devices: list[Any]) -> dict[str, Any]:
    """Both layouts of ``case`` (unrolled first) and the unrolled/scanned ratios."""
    unrolled = compile_step(case, False, devices)
    scanned = compile_step(case, True, devices)
    ratios = {f"{k}_ratio": unrolled[k] / scanned[k]
              for k in ("trace_lower_s", "compile_s", "hlo_chars", "hlo_instructions")}
    return {"unrolled": unrolled, "scanned": scanned, **ratios}


def print_table(results: dict[str, dict[str, Any]], devices_of: dict[str, str]) -> None:
    header = ["case", "devices", "layout", "params M", "trace+lower s", "compile s", "HLO chars", "HLO instr."]
    rows = []
    for name, result in results.items():
        for layout in ("unrolled", "scanned"):
            r = result[layout]
            rows.append([name, devices_of[name], layout, f"{r['params_M']:.1f}", f"{r['trace_lower_s']:.1f}",
                         f"{r['compile_s']:.1f}", f"{r['hlo_chars']:,}", f"{r['hlo_instructions']:,}"])
        rows.append([name, "", "unrolled / scanned", "", f"{result['trace_lower_s_ratio']:.1f}x",
                     f"{result['compile_s_ratio']:.1f}x", f"{result['hlo_chars_ratio']:.1f}x",
                     f"{result['hlo_instructions_ratio']:.1f}x"])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="model depth of the CPU case (default 32)")
    parser.add_argument("--tpu-layers", type=int, help="model depth of the TPU case (default: --layers)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU case")
    parser.add_argument("--no-tpu", action="store_true", help="skip the XLA:TPU case")
    parser.add_argument("--tpu-hardware", default="v5p-8",
                        help="TPU slice of configs/hardware.yaml to compile for (default v5p-8: topology v5p:2x2x1)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    prepare_libtpu_env()

    import jax

    all_cases = cases(args.layers, args.tpu_layers or args.layers)
    results, devices_of = {}, {}
    if not args.no_cpu:
        results["cpu"] = compare(all_cases["cpu"], jax.devices("cpu"))
        devices_of["cpu"] = "1 CPU"
    if not args.no_tpu:
        slice_ = parse_slice(args.tpu_hardware)
        try:
            devices = topology_devices(slice_)
        except CompileError as err:
            print(f"tpu case skipped: {err}", file=sys.stderr)
        else:
            results["tpu"] = compare(all_cases["tpu"], devices)
            devices_of["tpu"] = f"{len(devices)} x {devices[0].device_kind} ({topology_name(slice_)})"
    print_table(results, devices_of)
    figures = {"layers": {"cpu": args.layers, "tpu": args.tpu_layers or args.layers}, "devices": devices_of, **results}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
