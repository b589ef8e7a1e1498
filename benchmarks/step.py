"""Step benchmark: the full train step (forward, backward, AdamW) of a dense and a MoE model.

``python -m benchmarks.step [--quick] [--config PATH --seq-len N --batch B --set key=value]``.

Figures per case: model FLOP/s ÷ the measured matmul peak (``benchmarks.peak``, same process),
tokens/s, step time, compile time, and peak memory (XLA's memory plan of the compiled step; on
GPU/TPU also the allocator's high-water mark; on CPU the process's peak RSS).  Model FLOPs are
``indicfm.model.flops.train_flops_per_token`` × tokens: useful work only, so capacity padding,
dense-fallback expert FLOPs or recomputation show up as a lower ratio, never as a higher one.

The step is the trainer's own (``indicfm.train.step``), jitted with the trainer's shardings on a
one-device mesh: the figures are per device.

Cases (see :func:`cases`):

* CPU: ``configs/model/bench-dense.yaml`` and ``bench-moe.yaml`` (64 experts, top-8, one shared
  expert), float32, 8 x 256 tokens; the MoE also with capacity dispatch; then dense, ``rounds``
  (the CPU default), ``blocks``, the old ``ragged_dot`` kernel and capacity side by side with two
  blocks at 4 x 128 tokens.  ``--quick``: two blocks, 4 x 128 tokens, dense, the default
  dispatch and capacity dispatch.
* GPU/TPU (the issue's setting): ``small-moe`` at sequence length 4096 (batch 4) in bfloat16, its
  all-dense twin, its 64-expert top-8 + 1 shared variant, and a lighter remat policy; the dispatch
  each uses is printed (dropless resolves to tokamax on GPU when installed, else ``blocks``, never
  to ``ragged_dot``; capacity is always run too).  A case that fails (out of memory) is reported
  as ``{case}_status`` and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    backend,
    compiled_memory_mib,
    cpu_load,
    device_peak_memory_mib,
    matmul_dtype,
    round_figures,
    rss_peak_mib,
    time_fn,
)

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO / "configs" / "model"


@dataclasses.dataclass(frozen=True)
class Case:
    """One model to step: a config file plus ``--set``-style overrides, and the batch shape."""

    name: str
    config: Path
    overrides: tuple[str, ...]
    batch: int
    seq_len: int


def platform_overrides() -> tuple[str, ...]:
    """Compute dtype matching the peak's dtype: bfloat16 on accelerators, float32 on CPU."""
    return (f"model.compute_dtype={jnp.dtype(matmul_dtype()).name}",)


def cases(quick: bool, platform: str | None = None) -> list[Case]:
    """The benchmark's cases for a platform (``cpu``/``gpu``/``tpu``; default: the current one)."""
    platform = platform or backend()
    if platform == "cpu":
        dense, moe = MODEL_CONFIGS / "bench-dense.yaml", MODEL_CONFIGS / "bench-moe.yaml"
        if quick:  # two blocks (one dense + one MoE): compiling dominates here
            short = ("model.num_layers=2",)
            return [
                Case("dense", dense, short + ("model.first_dense_layers=2",), 4, 128),
                Case("moe", moe, short, 4, 128),
                Case("moe_capacity", moe, short + ("model.dispatch=capacity",), 4, 128),
            ]
        short = ("model.num_layers=2",)
        return [
            Case("dense", dense, (), 8, 256),
            Case("moe", moe, (), 8, 256),
            Case("moe_capacity", moe, ("model.dispatch=capacity",), 8, 256),
            # MoE kernels side by side at the quick shape (the README's before/after table), including
            # the old default: ragged_dot, a masked dense product over all 64 experts on CPU
            Case("small_dense", dense, short + ("model.first_dense_layers=2",), 4, 128),
            Case("small_moe_rounds", moe, short + ("model.grouped_matmul=rounds",), 4, 128),
            Case("small_moe_blocks", moe, short + ("model.grouped_matmul=blocks",), 4, 128),
            Case("small_moe_ragged_dot", moe, short + ("model.grouped_matmul=ragged_dot",), 4, 128),
            Case("small_moe_capacity", moe, short + ("model.dispatch=capacity",), 4, 128),
        ]
    small = MODEL_CONFIGS / "small-moe.yaml"
    seq, batch = (2048, 2) if quick else (4096, 4)
    long = (f"model.max_seq_len={seq}",)
    top8 = ("model.top_k=8", "model.num_shared_experts=1")
    return [
        Case("dense", small, long + ("model.first_dense_layers=18",), batch, seq),
        Case("small_moe", small, long, batch, seq),
        Case("small_moe_capacity", small, long + ("model.dispatch=capacity",), batch, seq),
        Case("moe_top8_shared1", small, long + top8, batch, seq),
        Case("moe_top8_shared1_capacity", small, long + top8 + ("model.dispatch=capacity",), batch, seq),
        # small-moe recomputes every block (remat: full) to fit 80 GB; recomputing only attention
        # saves most of that third forward pass where memory allows (H200, or smaller batches)
        Case("small_moe_remat_attention", small, long + ("model.remat=attention",), batch, seq),
    ]


def packed_batch(batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch shaped like the data pipeline's packed rows: several documents per row (segment ids
    from 1, positions restarting at 0), random token ids, no padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch, seq_len), dtype=np.int32)
    segment_ids = np.zeros((batch, seq_len), np.int32)
    positions = np.zeros((batch, seq_len), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq_len), size=min(3, seq_len - 1), replace=False))
        bounds = [0, *cuts.tolist(), seq_len]
        for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            segment_ids[row, start:end] = doc
            positions[row, start:end] = np.arange(end - start)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def load_case_config(case: Case):
    from indicfm.config import load_config

    return load_config(case.config, [*platform_overrides(), *case.overrides])


def measure_case(case: Case, peak_flops: float, repeats: int = 3) -> dict:
    """Compile and time the trainer's jitted step for one case; return its figures."""
    from indicfm.config import MeshConfig
    from indicfm.model.attention import resolve_impl
    from indicfm.model.flops import count_active_params, count_params, train_flops_per_token
    from indicfm.model.moe import resolve_grouped_matmul
    from indicfm.sharding import batch_sharding, make_mesh
    from indicfm.train.optimizer import make_optimizer
    from indicfm.train.state import create_model, init_train_state
    from indicfm.train.step import jit_train_step, make_train_step

    cfg = load_case_config(case)
    model_cfg = cfg.model
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])  # per-device figures
    # As the trainer does (indicfm/train/loop.py): build outside the mesh context, step inside it.
    model = create_model(model_cfg, mesh, seed=0)
    tx = make_optimizer(cfg.optimizer, total_steps=1000, max_consecutive_nonfinite=10)
    schedule = lambda step: cfg.optimizer.learning_rate  # noqa: E731 (only logged by the step)
    graphdef, state, shardings = init_train_state(model, tx, seed=0, mesh=mesh)
    del model
    with jax.set_mesh(mesh):
        rate = model_cfg.bias_update_rate if model_cfg.loss_free_bias else 0.0
        step_fn = make_train_step(graphdef, tx, schedule, micro_batches=1, router_bias_rate=rate)
        data_sharding = batch_sharding(mesh)
        batch = {k: jax.device_put(v, data_sharding)
                 for k, v in packed_batch(case.batch, case.seq_len, model_cfg.vocab_size).items()}
        jitted = jit_train_step(step_fn, shardings, data_sharding)
        start = time.perf_counter()
        compiled = jitted.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        memory = compiled_memory_mib(compiled)

        holder = {"state": state}

        def one_step():
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics["loss"]

        timing = time_fn(one_step, warmup=1, repeats=repeats)
        loss = float(one_step())

    tokens = case.batch * case.seq_len
    flops = train_flops_per_token(model_cfg, case.seq_len) * tokens
    is_moe = model_cfg.num_moe_layers > 0
    figures = {
        "config": f"{case.config.stem} {' '.join(case.overrides)}".strip(),
        "batch": f"{case.batch}x{case.seq_len}",
        "params_M": count_params(model_cfg) / 1e6,
        "active_params_M": count_active_params(model_cfg) / 1e6,
        "attention": resolve_impl(model_cfg.attention_impl),
        "dispatch": (model_cfg.dispatch if model_cfg.dispatch == "capacity"
                     else f"dropless/{resolve_grouped_matmul(model_cfg.grouped_matmul)}") if is_moe else "-",
        "step_s": timing.median_s,
        "spread": timing.spread,
        "compile_s": compile_s,
        "tokens_per_s": tokens / timing.median_s,
        "model_tflops": flops / timing.median_s / 1e12,
        "flops_over_peak": flops / timing.median_s / peak_flops,
        "memory_plan_MiB": memory.get("peak", float("nan")),
        "loss_finite": bool(np.isfinite(loss)),
    }
    device_peak = device_peak_memory_mib()
    if device_peak is not None:  # the allocator's high-water mark of the process so far (all cases up to here)
        figures["device_peak_MiB"] = device_peak
    else:
        figures["rss_peak_MiB"] = rss_peak_mib()
    return figures


def run(quick: bool, selected: list[Case] | None = None) -> dict:
    """Flat figures ``{case}_{figure}`` for every case, after measuring the peak (once per process)."""
    from benchmarks.peak import measured_peak_flops

    peak = measured_peak_flops(quick)
    figures: dict = {"peak_tflops": peak / 1e12, "load_before": cpu_load()}
    for case in selected or cases(quick):
        try:
            measured = measure_case(case, peak, repeats=3 if quick else 5)
        except Exception as err:  # e.g. out of memory for one variant: report it, measure the others
            measured = {"status": f"failed: {type(err).__name__}: {str(err)[:160]}"}
        for key, value in measured.items():
            figures[f"{case.name}_{key}"] = value
        # each case as it is measured: a run cut off by a time limit still shows the cases it did
        print(f"[step] {case.name}: {json.dumps(round_figures(measured))}", file=sys.stderr, flush=True)
    figures["load_after"] = cpu_load()
    return round_figures(figures)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    parser.add_argument("--config", type=Path, help="step only this model config (instead of the default cases)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override, e.g. model.dispatch=capacity")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    selected = None
    if args.config:
        overrides = (f"model.max_seq_len={args.seq_len}", *args.sets)
        selected = [Case(args.config.stem, args.config, overrides, args.batch, args.seq_len)]
    print(json.dumps(run(args.quick, selected), indent=2))


if __name__ == "__main__":
    main()
