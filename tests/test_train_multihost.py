"""`indicfm.train.loop.train` on two real JAX processes (4 CPU devices each, one 8-device mesh):
same losses as one process with 8 devices, one metrics log, and a two-process resume (slow)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from indicfm.config import load_config
from indicfm.train.inputs import ensure_tokenizer_and_cache
from indicfm.train.loop import read_losses, train

from test_train_loop import LANGS, TINY_SETTINGS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import json, sys
    from launch import distributed
    distributed.initialize()                      # from the JAX_* environment variables
    import jax
    from indicfm.config import load_config
    from indicfm.train.loop import train
    result = train(load_config(None, json.loads(sys.argv[2])), sys.argv[1])
    print("RESULT " + json.dumps({"process": jax.process_index(), "start": result.start_step,
                                  "losses": result.losses}), flush=True)
    distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_processes(workdir: Path, settings: list[str], script: Path) -> list[dict]:
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
        env.update(
            XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
            PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        procs.append(subprocess.Popen([sys.executable, str(script), str(workdir), json.dumps(settings)],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))
    return results


def test_two_processes_train_like_one_and_resume(tmp_path, sample_train_dir):
    src = tmp_path / "text"
    src.mkdir()
    for lang in LANGS:
        (src / f"{lang}.txt").write_bytes((sample_train_dir / f"{lang}.txt").read_bytes())
    cfg = ensure_tokenizer_and_cache(load_config(None, TINY_SETTINGS + [f"data.inputs=[{src}]"]), tmp_path, progress=False)
    settings = TINY_SETTINGS + [
        f"tokenizer.model_file={cfg.tokenizer.model_file}", f"data.cache_dir={cfg.data.cache_dir}",
        "trainer.steps=4", "mesh.data=4", "mesh.expert=2",
    ]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    two = _two_processes(tmp_path / "two", settings, script)
    one = train(load_config(None, settings), tmp_path / "one")  # this process: 8 devices, same mesh
    for result in two:
        assert result["start"] == 0
        for step, loss in one.losses.items():
            assert result["losses"][str(step)] == pytest.approx(loss, rel=1e-5)  # collectives may reorder sums
    assert sorted(read_losses(tmp_path / "two")) == [1, 2, 3, 4]  # one log, written by process 0 only
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 4

    shutil.rmtree(tmp_path / "two" / "checkpoints" / "4")  # as if killed before the last save
    again = _two_processes(tmp_path / "two", settings, script)
    for result in again:
        assert result["start"] == 2
        for step in (3, 4):
            assert result["losses"][str(step)] == two[0]["losses"][str(step)]  # bit for bit
