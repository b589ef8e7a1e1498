"""Metrics: MFU arithmetic, expert load statistics, the hardware-table lookup, metrics.jsonl and
TensorBoard files."""

import json

import numpy as np
import pytest

from indicfm.train.metrics import (
    MetricsWriter,
    expert_load_stats,
    mfu,
    run_peak,
)


def test_mfu_is_flops_over_time_over_peak():
    assert mfu(6e12, 2.0, 1e13) == pytest.approx(0.3)
    assert mfu(1.0, 0.0, 1.0) == 0.0


def test_expert_load_stats_hand_values():
    counts = np.array([[1, 1, 1, 1], [4, 0, 0, 0]], np.float32)  # balanced layer, one-expert layer
    worst, average = expert_load_stats(counts)
    assert worst == pytest.approx(4.0)
    assert average == pytest.approx(2.5)
    assert expert_load_stats(np.zeros((0, 4))) == (1.0, 1.0)


class _FakeDevice:
    def __init__(self, kind, platform="gpu"):
        self.device_kind, self.platform = kind, platform


def test_peaks_come_from_the_hardware_table_and_totals():
    # vendor figures (dense bf16), independent of the table file's layout
    assert run_peak([_FakeDevice("NVIDIA A100-SXM4-80GB")]).flops == pytest.approx(312e12)
    assert run_peak([_FakeDevice("TPU v5 lite", "tpu")]).flops == pytest.approx(197e12)  # v5e, not v5p
    assert run_peak([_FakeDevice("TPU v4", "tpu")] * 4).flops == pytest.approx(4 * 275e12)
    assert run_peak([_FakeDevice("TPU v4", "tpu")] * 4, override=1e12).flops == pytest.approx(4e12)
    with pytest.raises(ValueError, match="hardware.yaml"):
        run_peak([_FakeDevice("some new accelerator")])
    cpu = run_peak([_FakeDevice("cpu", "cpu")], None, "float32").flops  # measured, not looked up
    assert 1e8 < cpu < 1e14


def test_writer_jsonl_tensorboard_and_drop_after(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "lr": np.float32(0.1), "nan": float("nan")})
    writer.drop_after(2)  # a resume from step 2 forgets step 3
    writer.write(3, {"loss": 0.25})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] == 0.25 and records[0]["nan"] == "nan"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    silent = MetricsWriter(tmp_path / "other", enabled=False)
    silent.write(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()
