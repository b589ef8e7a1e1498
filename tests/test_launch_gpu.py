"""GPU launcher: the direct single-node command, the SLURM batch script (run by bash with fake
``srun``/``scontrol`` to check coordinator set-up and requeue on signal), and the CLI dry run."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from indicfm.cli import app
from indicfm.launch import gpu
from indicfm.launch.gpu import GpuJob


def job(tmp_path: Path, **overrides) -> GpuJob:
    base = dict(name="moe", config_path=tmp_path / "c.yaml", workdir=tmp_path / "run", nodes=4, gpus_per_node=8)
    base.update(overrides)
    return GpuJob(**base)


def directives(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            out[key] = value
    return out


def test_single_node_runs_train_directly(tmp_path):
    argv = gpu.single_node_command(job(tmp_path, nodes=1))
    assert argv == ["indicfm", "train", "--config", str(tmp_path / "c.yaml"), "--workdir", str(tmp_path / "run")]


def test_sbatch_directives_follow_the_documented_options(tmp_path):
    script = gpu.sbatch_script(job(tmp_path, partition="gpu", time_limit="1-00:00:00"))
    assert script.startswith("#!/bin/bash\n")
    d = directives(script)
    assert d["--nodes"] == "4"
    assert d["--ntasks-per-node"] == "1"  # one process per node ...
    assert d["--gpus-per-node"] == "8"  # ... driving all 8 GPUs
    assert "--requeue" in d and "--exclusive" in d
    assert d["--signal"] == "B:USR1@300"  # sbatch --signal=[{R|B}:]<sig_num>[@sig_time]
    assert d["--open-mode"] == "append"  # a requeued job appends to the same log
    assert d["--partition"] == "gpu" and d["--time"] == "1-00:00:00"
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash


FAKE_SRUN = textwrap.dedent(
    """\
    #!/bin/bash
    # Fake srun: records its arguments and the distributed environment, then runs until killed
    # (or exits at once with FAKE_SRUN_EXIT).
    echo "ARGS $*" >> "$FAKE_DIR/srun.log"
    echo "ENV $INDICFM_DISTRIBUTED $JAX_COORDINATOR_ADDRESS $JAX_LOCAL_DEVICE_IDS" >> "$FAKE_DIR/srun.log"
    if [ -n "${FAKE_SRUN_EXIT:-}" ]; then exit "$FAKE_SRUN_EXIT"; fi
    touch "$FAKE_DIR/srun.started"
    trap 'echo TERM >> "$FAKE_DIR/srun.log"; exit 143' TERM
    while true; do sleep 0.1; done
    """
)
FAKE_SCONTROL = textwrap.dedent(
    """\
    #!/bin/bash
    echo "$*" >> "$FAKE_DIR/scontrol.log"
    if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-node-007\\ngpu-node-008\\n'; fi
    if [ "$1" = "requeue" ]; then kill -TERM $(cat "$FAKE_DIR/srun.pid") 2>/dev/null; fi
    exit 0
    """
)


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        FAKE_DIR=str(tmp_path),
        SLURM_JOB_ID="12345",
        SLURM_JOB_NODELIST="gpu-node-[007-008]",
        SLURM_JOB_NUM_NODES="2",
    )
    return tmp_path, env


def test_batch_script_sets_the_coordinator_and_returns_the_training_exit_code(fake_slurm, tmp_path):
    root, env = fake_slurm
    script = tmp_path / "job.sbatch"
    script.write_text(gpu.sbatch_script(job(tmp_path, nodes=2, gpus_per_node=4)))
    env["FAKE_SRUN_EXIT"] = "7"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 7, proc.stderr
    log = (root / "srun.log").read_text().splitlines()
    args = shlex.split(log[0][len("ARGS ") :])
    assert args[:2] == ["--kill-on-bad-exit=1", "indicfm"] and args[2] == "train"
    # coordinator: first host of the allocation, port from the job id (12345 % 4096 + 61440)
    assert log[1] == f"ENV auto gpu-node-007:{12345 % 4096 + 61440} 0,1,2,3"


def test_batch_script_requeues_itself_on_the_warning_signal(fake_slurm, tmp_path):
    root, env = fake_slurm
    script = tmp_path / "job.sbatch"
    text = gpu.sbatch_script(job(tmp_path, nodes=2, gpus_per_node=4))
    # let the fake scontrol find the fake srun to stop it, as SLURM would when requeueing
    text = text.replace('SRUN_PID=$!', 'SRUN_PID=$!; echo $SRUN_PID > "$FAKE_DIR/srun.pid"')
    script.write_text(text)
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while not (root / "srun.started").exists():
            assert time.time() < deadline, "fake srun never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@300` delivers before the time limit
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    scontrol = (root / "scontrol.log").read_text().splitlines()
    assert "requeue 12345" in scontrol, (out, err)
    assert "requeueing" in out
    assert "TERM" in (root / "srun.log").read_text()  # training was told to stop (and checkpoint)
    assert proc.returncode == 143  # the script waited for srun to end and passed on its status


def test_cli_dry_run_prints_script_and_sbatch_without_writing(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  steps: 5\n")
    workdir = tmp_path / "shared" / "run"
    result = CliRunner().invoke(
        app,
        ["launch", "gpu", "--config", str(config), "--nodes", "2", "--gpus-per-node", "4", "--workdir", str(workdir),
         "--name", "moe", "--dry-run"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "#SBATCH --nodes=2" in result.stdout
    assert f"sbatch {workdir}/moe.sbatch" in result.stdout
    assert not workdir.exists()


def test_cli_single_node_dry_run_prints_the_train_command(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  steps: 5\n")
    result = CliRunner().invoke(
        app, ["launch", "gpu", "--config", str(config), "--workdir", str(tmp_path / "r"), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    line = result.stdout.strip().splitlines()[-1]
    assert shlex.split(line)[:2] == ["indicfm", "train"]
    assert "sbatch" not in result.stdout
