"""Multi-host training for real: two local JAX processes (4 fake CPU devices each) train tiny-moe and
must log the same losses as one process with 8 devices, with one metrics log (process 0); the
checkpoint both processes wrote resumes bit for bit on the same two processes, and restores in a
single process, which continues as the uninterrupted single-process run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest


from helpers import cpu_process_env, free_port, tokenizer_and_cache, wait_for_results

REPO = Path(__file__).resolve().parent.parent
LANGS = ["hin_Deva", "tam_Taml", "eng_Latn"]
TOTAL_STEPS = 6
STOP_AT = 4

SETTINGS = [
    # tiny-moe's architecture (configs/model/tiny-moe.yaml) with a small vocabulary and short rows
    "model.vocab_size=2048", "tokenizer.vocab_size=2048", "model.max_seq_len=64", "data.seq_len=64",
    "data.workers=1", "trainer.global_batch_size=8", f"trainer.steps={TOTAL_STEPS}", "checkpoint.every_steps=2",
    "optimizer.warmup_steps=1", "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0",
    "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=1",  # weights sharded across the two hosts
]  # fmt: skip

WORKER = textwrap.dedent(
    """
    import json, sys
    from indicfm.launch import distributed
    distributed.initialize()                      # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    from indicfm.config import load_config
    from indicfm.train.loop import train
    settings, workdir, stop_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cfg = load_config("configs/model/tiny-moe.yaml", settings)
    result = train(cfg, workdir, stop_at_step=stop_at or None, progress=False)
    print("RESULT " + json.dumps({"process": distributed.process_info().process_index,
                                  "losses": result.losses, "final_step": result.final_step,
                                  "checkpoint": result.last_checkpoint_step}), flush=True)
    distributed.shutdown()
    """
)


def _run(script: Path, settings: list[str], workdir: Path, stop_at: int, envs: list[dict]) -> list[dict]:
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), json.dumps(settings), str(workdir), str(stop_at)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for env in envs
    ]
    results = wait_for_results(procs, timeout=600)
    for result in results:
        result["losses"] = {int(k): v for k, v in result["losses"].items()}
    return results


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sample_train_dir) -> list[str]:
    """Tokenizer and token cache, built once, shared by every run."""
    root = tmp_path_factory.mktemp("inputs")
    return SETTINGS + tokenizer_and_cache(root, sample_train_dir, LANGS, SETTINGS, "configs/model/tiny-moe.yaml") + [
        # Off: one run of this test with a persistent compilation cache shared by the 2-process and
        # 1-process runs saw the 1-process resume diverge at step 5 (not reproduced in two later
        # runs, nor in a minimal case: JAX keys the two topologies apart). Fewer moving parts here.
        "trainer.compilation_cache_dir=null",
    ]


@pytest.mark.slow
def test_two_hosts_train_like_one_and_their_checkpoint_resumes_in_one(prepared, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    # reference: one process, 8 devices, uninterrupted
    (reference,) = _run(script, prepared, tmp_path / "one", 0, [cpu_process_env(8)])
    assert sorted(reference["losses"]) == list(range(1, TOTAL_STEPS + 1))

    # two processes x 4 devices, same global mesh
    port = free_port()
    two = tmp_path / "two"
    hosts = _run(script, prepared, two, 0, [cpu_process_env(4, i, port) for i in range(2)])
    assert [h["process"] for h in hosts] == [0, 1]
    steps = list(range(1, TOTAL_STEPS + 1))
    for host in hosts:
        assert host["final_step"] == TOTAL_STEPS
        # collectives across processes may sum in another order: close, not bitwise
        np.testing.assert_allclose([host["losses"][s] for s in steps], [reference["losses"][s] for s in steps], rtol=2e-5)
    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == steps  # one log, written by process 0 only
    # the run's goodput, once (process 0's): a record before the first step and one at the end
    assert [m["step"] for m in metrics if "loss" not in m and "goodput/wall_s" in m] == [0, TOTAL_STEPS]
    # each step's time is the slowest process's, and says which process that was
    assert all(m["step_seconds"] > 0 and m["slowest_process"] in (0, 1) for m in metrics if "loss" in m)

    # as if both hosts were killed before the last save: the newest checkpoint is step STOP_AT
    shutil.rmtree(two / "checkpoints" / str(TOTAL_STEPS))
    shutil.copytree(two, tmp_path / "two_to_one")
    after = range(STOP_AT + 1, TOTAL_STEPS + 1)

    # resumed on the same two hosts: every later loss equal bit for bit
    port = free_port()
    resumed_two = _run(script, prepared, two, 0, [cpu_process_env(4, i, port) for i in range(2)])
    for host in resumed_two:
        assert sorted(host["losses"]) == list(after)
        assert [host["losses"][s] for s in after] == [hosts[0]["losses"][s] for s in after]

    # the checkpoint written by both hosts restores in one process, which finishes the run
    (resumed_one,) = _run(script, prepared, tmp_path / "two_to_one", 0, [cpu_process_env(8)])
    assert sorted(resumed_one["losses"]) == list(after)
    np.testing.assert_allclose([resumed_one["losses"][s] for s in after], [reference["losses"][s] for s in after], rtol=2e-5)
