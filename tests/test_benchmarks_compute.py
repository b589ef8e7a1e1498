"""Smoke tests of the compute benchmarks (peak, step, moe, attention): they run on tiny sizes and
produce every figure; the GPU configuration logic picks small-moe at 4096, cuDNN attention and no
ragged_dot.  Nothing here is timed: figures are only checked for being present and sane."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import attention, moe, peak, step
from benchmarks.common import Timing, compiled_memory_mib, time_fn

REPO = Path(__file__).resolve().parent.parent


def test_time_fn_waits_warms_up_and_takes_the_median():
    calls = []

    def run():
        calls.append(1)
        return np.zeros(1)

    timing = time_fn(run, warmup=2, repeats=5)
    assert len(calls) == 7
    assert isinstance(timing, Timing) and timing.repeats == 5
    assert 0 < timing.min_s <= timing.median_s <= timing.max_s and timing.spread >= 1.0


def test_compiled_memory_plan_counts_arguments():
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256, 256), jnp.float32)
    compiled = jax.jit(lambda a: a @ a).lower(x).compile()
    memory = compiled_memory_mib(compiled)
    if memory:  # the CPU backend implements memory_analysis in jax 0.10
        assert memory["arguments"] == pytest.approx(256 * 256 * 4 / 2**20)
        assert memory["peak"] >= memory["arguments"]


def test_packed_batch_is_shaped_like_the_packer_output():
    batch = step.packed_batch(3, 64, vocab_size=100, seed=1)
    seg, pos = batch["segment_ids"], batch["positions"]
    assert seg.shape == pos.shape == batch["tokens"].shape == (3, 64)
    assert seg.min() >= 1 and batch["tokens"].max() < 100
    for row in range(3):
        starts = np.flatnonzero(np.diff(seg[row]) != 0) + 1
        assert seg[row, 0] == 1 and np.all(np.diff(seg[row]) >= 0)
        assert np.all(pos[row, starts] == 0) and pos[row, 0] == 0  # positions restart per document


def test_run_quick_only_peak_prints_a_figure(tmp_path):
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users run it
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "peak", "--output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())["results"]["peak"]
    assert figures["dtype"] == "float32" and figures["peak_tflops"] > 0


@pytest.mark.slow
def test_step_figures_for_a_tiny_moe_and_dense_model(monkeypatch):
    tiny = ("model.vocab_size=256", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
            "model.num_kv_heads=1", "model.head_dim=16", "model.num_experts=8", "model.top_k=2",
            "model.d_expert=16", "model.d_ff=48")
    cases = [
        step.Case("moe", step.MODEL_CONFIGS / "bench-moe.yaml", tiny, 8, 32),
        step.Case("dense", step.MODEL_CONFIGS / "bench-moe.yaml", tiny + ("model.first_dense_layers=2",), 8, 32),
    ]
    monkeypatch.setitem(peak._CACHE, True, {"peak_flops_per_s": 1e10})  # no timed peak for a smoke test
    figures = step.run(quick=True, selected=cases)
    for name in ("moe", "dense"):
        assert figures[f"{name}_loss_finite"] is True
        assert figures[f"{name}_tokens_per_s"] > 0 and figures[f"{name}_flops_over_peak"] > 0
        assert f"{name}_memory_plan_MiB" in figures
    assert figures["moe_dispatch"] == "dropless/rounds" and figures["dense_dispatch"] == "-"


@pytest.mark.slow
def test_moe_and_attention_quick_figures(monkeypatch):
    monkeypatch.setitem(peak._CACHE, True, {"peak_flops_per_s": 1e10})
    monkeypatch.setattr(moe, "shapes", lambda quick: [("tiny", ["model.d_model=64", "model.num_experts=8",
                                                                "model.top_k=2", "model.d_expert=32"], 2, 64)])
    figures = moe.run(quick=True)
    for name in ("capacity", "dropless_rounds", "dropless_blocks"):
        assert figures[f"tiny_{name}_over_dense"] > 0
    assert 0 <= figures["tiny_capacity_dropped_fraction"] < 1

    monkeypatch.setattr(attention, "sizes", lambda quick: (1, 64, 2, 1, 16))
    figures = attention.run(quick=True)
    assert figures["chosen"] == "xla"
    assert figures["xla_rel_err_vs_float32_reference"] < 1e-5
    assert figures["chosen_speedup_over_xla"] == 1.0


def test_gpu_configuration_small_moe_at_4096_cudnn_and_no_ragged_dot():
    from indicfm.model.moe import resolve_grouped_matmul

    cases = step.cases(quick=False, platform="gpu")
    assert {c.config.stem for c in cases} == {"small-moe"}
    assert all(c.seq_len == 4096 and "model.max_seq_len=4096" in c.overrides for c in cases)
    assert any("model.dispatch=capacity" in c.overrides for c in cases)
    for case in cases:  # every GPU case is a valid config
        cfg = step.load_case_config(case)
        assert cfg.model.max_seq_len == 4096
    assert attention.backends("gpu")[:2] == ["cudnn", "xla"]
    assert attention.backends("tpu")[:2] == ["splash", "xla"]
    assert resolve_grouped_matmul("auto", "gpu") != "ragged_dot"
    assert "dropless/blocks" in moe.implementations("gpu")
    assert moe.shapes(quick=False, platform="gpu")[0][2:] == (4, 4096)
