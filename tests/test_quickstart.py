"""`indicfm quickstart` from the command line, as a new user runs it (slow: a few minutes)."""

import json
import subprocess
import sys

import pytest

from helpers import read_losses


pytestmark = pytest.mark.slow


def test_quickstart_trains_resumes_and_improves_bits_per_byte(tmp_path):
    workdir = tmp_path / "qs"
    out = subprocess.run(
        [sys.executable, "-c", "from indicfm.cli import main; main()", "quickstart", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=1500,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resuming from step 100" in out.stderr
    losses = read_losses(workdir)
    assert sorted(losses) == list(range(1, 201))
    first, last = [losses[s] for s in range(1, 11)], [losses[s] for s in range(191, 201)]
    assert sum(last) / 10 < sum(first) / 10 - 1.0  # the loss falls on the shipped sample
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in records if r["step"] == 0 and "bpb/mean" in r)
    after = [r for r in records if r["step"] == 200 and "bpb/mean" in r][-1]
    assert after["bpb/mean"] < before["bpb/mean"]
    languages = [k for k in after if k.startswith("bpb/") and k != "bpb/mean"]
    assert len(languages) == 16
    assert sum(after[k] < before[k] for k in languages) >= 14
    assert (workdir / "checkpoints" / "200").is_dir()
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
