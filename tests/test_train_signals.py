"""Real processes, real signals (slow): SIGTERM → checkpoint at the current step and exit 0;
SIGKILL at some step + the same command again → every step's loss equals an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indicfm.train.checkpoint import Checkpointer
from indicfm.train.config import CheckpointConfig

from helpers import read_losses, tokenizer_and_cache

from test_train_loop import LANGS, TINY_SETTINGS

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-c", "from indicfm.cli import main; main()"]


@pytest.fixture(scope="module")
def settings(tmp_path_factory, sample_train_dir) -> list[str]:
    root = tmp_path_factory.mktemp("signal-inputs")
    inputs = tokenizer_and_cache(root, sample_train_dir, LANGS, TINY_SETTINGS)
    shared_cache = root / "jax-cache"
    return [s for s in TINY_SETTINGS if not s.startswith("trainer.compilation_cache_dir")] + inputs + [
        f"trainer.compilation_cache_dir={shared_cache}",
    ]


def _command(workdir: Path, settings: list[str], *extra: str) -> list[str]:
    return CLI + ["train", "--workdir", str(workdir)] + [arg for s in settings + list(extra) for arg in ("--set", s)]


def _logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        if step in _logged_steps(workdir):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_sigterm_saves_the_current_step_and_exits_zero(settings, tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path, settings, "trainer.steps=10000", "checkpoint.every_steps=10000"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    last = max(_logged_steps(tmp_path))
    assert last >= 3
    assert Checkpointer(tmp_path / "checkpoints", CheckpointConfig()).steps() == [last]
    assert "SIGTERM" in err


@pytest.mark.parametrize("kill_after", [3])
def test_sigkill_then_rerun_matches_an_uninterrupted_run_bitwise(settings, tmp_path, kill_after):
    extra = ("trainer.steps=12", "checkpoint.every_steps=2")
    clean = subprocess.run(_command(tmp_path / "clean", settings, *extra), capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_command(workdir, settings, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, workdir, kill_after)
    deadline = time.time() + 300  # kill only once the step-2 checkpoint is finalised, so there is one to resume
    while not (workdir / "checkpoints" / "2" / "commit_success.txt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    again = subprocess.run(_command(workdir, settings, *extra), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step" in again.stderr
    assert read_losses(workdir) == read_losses(tmp_path / "clean")  # every step, exact floats
    assert sorted(read_losses(workdir)) == list(range(1, 13))
