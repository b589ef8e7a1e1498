"""Downstream evaluation on two hosts: two local JAX processes (4 fake CPU devices each, weights
sharded across both) run lm-eval on process 0 while both compute, and must give the one-process
(8 devices) per-request log-likelihoods, metrics and generations; both processes return the
scores."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from downstream_helpers import hindi_lines, write_choice_task
from helpers import cpu_process_env, free_port, wait_for_results

REPO = Path(__file__).resolve().parent.parent
TASK = "toy_hosts_hin_Deva"

WORKER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "tests")
    from indicfm.launch import distributed
    distributed.initialize()
    import jax, numpy as np
    from flax import nnx
    from pathlib import Path
    from downstream_helpers import TINY_MODEL, tiny_tokenizer
    from indicfm.config import MeshConfig
    from indicfm.evaluation.harness import evaluate_model, serving_model
    from indicfm.evaluation.lm_adapter import IndicfmLM
    from indicfm.evaluation.scorer import Scorer
    from indicfm.inference.decode import inference_config
    from indicfm.inference.generate import generate_ids
    from indicfm.model.config import ModelConfig
    from indicfm.model.transformer import Transformer
    from indicfm.sharding import make_mesh, state_shardings

    task_dir, task = sys.argv[1], sys.argv[2]
    cfg = inference_config(ModelConfig(**TINY_MODEL))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda leaf: 0.2 * rng.standard_normal(leaf.shape).astype(np.float32), abstract)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2))
    model = nnx.merge(graphdef, jax.device_put(values, state_shardings(abstract, mesh)))
    tokenizer = tiny_tokenizer(Path("samples/train"))
    scores = evaluate_model(model, cfg, tokenizer, mesh, tasks=[task], include_path=task_dir, rows=4,
                            log_samples=True)
    lls = [float(r[0][0]) for s in scores.samples[task] for r in s["resps"]] if scores.samples else None

    class Request:
        def __init__(self, text):
            self.args = (text, {"until": [], "max_gen_toks": 4})

    scorer = Scorer(serving_model(model, cfg), mesh, 4, 64, generate=generate_ids)
    if scorer.is_driver:
        texts = scorer.finish(IndicfmLM(scorer, tokenizer).generate_until([Request("कल"), Request("भारत")]))
    else:
        texts = scorer.serve()
    print("RESULT " + json.dumps({"process": jax.process_index(), "flat": scores.flat(), "lls": lls,
                                  "texts": texts}), flush=True)
    distributed.shutdown()
    """
)


def _run(script: Path, task_dir: Path, envs: list[dict]) -> list[dict]:
    procs = [
        subprocess.Popen([sys.executable, str(script), str(task_dir), TASK], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for env in envs
    ]
    return wait_for_results(procs, timeout=600)


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path, sample_train_dir):
    lines = hindi_lines(sample_train_dir, 10, skip=150)
    docs = [{"prompt": l[:15], "choices": [l[15:22], l[22:26], l[26:35]], "gold": i % 3} for i, l in enumerate(lines)]
    task_dir = write_choice_task(tmp_path / "tasks", TASK, docs)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    (one,) = _run(script, task_dir, [cpu_process_env(8)])
    port = free_port()
    hosts = _run(script, task_dir, [cpu_process_env(4, i, port) for i in range(2)])
    assert [h["process"] for h in hosts] == [0, 1]
    assert len(one["lls"]) == 30 and hosts[1]["lls"] is None  # samples stay with the driver
    # collectives across processes may sum in another order: close, not bitwise
    np.testing.assert_allclose(hosts[0]["lls"], one["lls"], rtol=0, atol=1e-5)
    for host in hosts:  # every process returns the driver's scores
        assert host["flat"] == pytest.approx(one["flat"])
        assert host["texts"] == one["texts"]
    assert one["flat"][f"downstream/{TASK}/acc"] >= 0
