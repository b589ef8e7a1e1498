"""`indicfm eval` on a run directory laid out like `indicfm train`'s (a checkpoint with its
tokenizer, config.yaml): results JSON and a table per task and language; bad input exits 2 with
one clear line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

from indicfm.cli import app
from indicfm.config import Config, save_config
from indicfm.model.config import ModelConfig
from indicfm.model.transformer import Transformer

from downstream_helpers import TINY_MODEL, hindi_lines, tiny_tokenizer_json, write_choice_task

STEP = 3


def _flat(output: str) -> str:
    return " ".join(output.split())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_train_dir):
    from indicfm.sharding import make_mesh, state_shardings
    from indicfm.train.checkpoint import Checkpointer, tokenizer_item
    from indicfm.train.optimizer import make_optimizer
    from indicfm.train.state import init_train_state

    workdir = tmp_path_factory.mktemp("run")
    cfg = Config(model=TINY_MODEL, mesh={"data": -1})
    mesh = make_mesh(cfg.mesh)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(ModelConfig(**TINY_MODEL), rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda leaf: 0.2 * rng.standard_normal(leaf.shape).astype(np.float32), abstract)
    model = nnx.merge(graphdef, jax.device_put(values, state_shardings(abstract, mesh)))
    tx = make_optimizer(cfg.optimizer, cfg.trainer.steps, cfg.trainer.max_consecutive_nonfinite)
    _, train_state, _ = init_train_state(model, tx, 0, mesh)
    tokenizer_file = workdir / "tokenizer.json"
    tokenizer_file.write_bytes(tiny_tokenizer_json(sample_train_dir))
    (workdir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    checkpointer = Checkpointer(workdir / cfg.checkpoint.dir_name, cfg.checkpoint)
    checkpointer.save(STEP, train_state, {"config": cfg.model_dump(mode="json")}, tokenizer_item(tokenizer_file))
    checkpointer.close()
    save_config(cfg, workdir / "config.yaml")
    return workdir


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, sample_train_dir):
    lines = hindi_lines(sample_train_dir, 4, skip=300)
    docs = [{"prompt": l[:20], "choices": [l[20:28], l[28:40]], "gold": i % 2} for i, l in enumerate(lines)]
    return write_choice_task(tmp_path_factory.mktemp("tasks"), "toy_cli_hin_Deva", docs)


def test_eval_writes_results_json_and_a_table_per_task_and_language(run_dir, task_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "-w", str(run_dir), "--tasks", "toy_cli_hin_Deva",
                                      "--include-path", str(task_dir), "--output", str(out), "--limit", "3"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert record["config"]["step"] == STEP and record["config"]["tasks"] == ["toy_cli_hin_Deva"]
    assert record["n_samples"] == {"toy_cli_hin_Deva": 3}
    task = record["results"]["toy_cli_hin_Deva"]
    assert {"acc,none", "acc_stderr,none", "acc_bytes,none", "acc_norm,none"} <= set(task)
    assert record["per_language"]["hin_Deva"]["toy_cli_hin_Deva"]["acc"] == task["acc,none"]
    text = _flat(result.output)
    assert "hin_Deva" in text and "toy_cli_hin_Deva" in text and "acc_bytes" in text and "±" in text


def _fails_with(args: list[str], *needles: str) -> None:
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    for needle in needles:
        assert needle in text, text
    assert "Traceback" not in result.output


def test_an_unknown_suite_exits_2_naming_it(run_dir):
    _fails_with(["-w", str(run_dir), "--suite", "no-such-suite"], "unknown suite 'no-such-suite'")


@pytest.mark.slow  # looks through lm-eval's own ~15k task files before giving up
def test_an_unknown_task_exits_2_naming_it(run_dir):
    _fails_with(["-w", str(run_dir), "--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'")


def test_a_task_file_that_does_not_parse_exits_2_naming_it(run_dir, tmp_path):
    (tmp_path / "broken.yaml").write_text("task: broken\ndoc_to_text: {oops\n", encoding="utf-8")
    _fails_with(["-w", str(run_dir), "--tasks", "broken", "--include-path", str(tmp_path)],
                "broken.yaml: not a valid task file", "line")


def test_a_run_without_a_checkpoint_exits_2(tmp_path, task_dir):
    _fails_with(["-w", str(tmp_path), "--tasks", "toy_cli_hin_Deva", "--include-path", str(task_dir)],
                "no checkpoint there")


def test_tasks_or_suite_exactly_one(run_dir):
    _fails_with(["-w", str(run_dir)], "exactly one of --tasks or --suite")
