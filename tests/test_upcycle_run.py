"""From a dense run to an upcycled MoE run with the CLI: `indicfm upcycle` writes a run that
`indicfm train` starts from (trainer.init_from), whose loss falls, and whose crash and resume give
the losses of the uninterrupted run bit for bit; `indicfm import hf` writes a run that generate reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from indicfm.cli import app
from indicfm.config import load_config
from indicfm.train.loop import train

from helpers import tokenizer_and_cache

GOLDEN = Path(__file__).resolve().parent / "golden" / "hf"
LANGS = ["hin_Deva", "tam_Taml"]
DENSE = [
    "model.vocab_size=2048", "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.head_dim=16", "model.d_ff=64", "model.first_dense_layers=2", "model.num_experts=1", "model.top_k=1",
    "model.compute_dtype=float32", "model.max_seq_len=64", "tokenizer.vocab_size=2048", "data.seq_len=64",
    "data.workers=1", "trainer.global_batch_size=8", "checkpoint.every_steps=2", "optimizer.learning_rate=0.01",
    "optimizer.warmup_steps=1", "logging.progress=false", "mesh.data=-1", "trainer.compilation_cache_dir=null",
]


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, sample_train_dir) -> Path:
    root = tmp_path_factory.mktemp("dense")
    settings = DENSE + tokenizer_and_cache(root, sample_train_dir, LANGS, DENSE)
    workdir = root / "run"
    train(load_config(None, settings + ["trainer.steps=4"]), workdir)
    return workdir


def _losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_an_upcycled_run_trains_and_resumes_bit_for_bit(dense_run, tmp_path):
    moe = tmp_path / "moe"
    result = CliRunner().invoke(app, ["upcycle", "--from", str(dense_run), "--output", str(moe), "-g", "2",
                                      "--set", "model.num_experts=8", "--set", "model.top_k=4"])
    assert result.exit_code == 0, result.output
    cfg = load_config(moe / "config.yaml", ["trainer.steps=6", "mesh.expert=2", "mesh.data=-1"])
    assert cfg.trainer.init_from == "initial" and cfg.model.num_moe_layers == 2

    whole = train(cfg, moe)
    assert whole.start_step == 0 and whole.final_step == 6
    losses = _losses(moe)
    assert losses[6] < losses[1]
    # it started from the trained parent, not from random weights: its first loss is the parent's level
    dense = _losses(dense_run)
    assert losses[1] < dense[1] - 0.5 * (dense[1] - dense[4])

    # the same run again, crashing after step 5 (checkpoint at 4), then resumed
    again = tmp_path / "again"
    assert CliRunner().invoke(app, ["upcycle", "--from", str(dense_run), "--output", str(again), "-g", "2",
                                    "--set", "model.num_experts=8", "--set", "model.top_k=4"]).exit_code == 0

    def crash_after_5(step, record):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, again, on_step=crash_after_5)
    resumed = train(cfg, again)
    assert resumed.start_step == 4
    assert _losses(again) == losses  # bit for bit


def test_upcycle_refuses_an_existing_run_and_names_bad_settings(dense_run, tmp_path):
    out = tmp_path / "moe"
    first = CliRunner().invoke(app, ["upcycle", "--from", str(dense_run), "--output", str(out),
                                     "--set", "model.num_experts=4", "--set", "model.top_k=2"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, ["upcycle", "--from", str(dense_run), "--output", str(out),
                                     "--set", "model.num_experts=4", "--set", "model.top_k=2"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = CliRunner().invoke(app, ["upcycle", "--from", str(dense_run), "--output", str(tmp_path / "bad"), "-g", "3",
                                   "--set", "model.num_experts=6", "--set", "model.top_k=3"])
    assert bad.exit_code == 2 and "granularity" in bad.output
    assert not (tmp_path / "bad" / "config.yaml").exists()


def test_import_hf_writes_a_run_whose_parameters_restore(tmp_path):
    from indicfm.train.saved_model import restore_model
    from indicfm.sharding import make_mesh
    from indicfm.config import MeshConfig

    out = tmp_path / "imported"
    result = CliRunner().invoke(app, ["import", "hf", str(GOLDEN / "qwen3"), "--output", str(out),
                                      "--set", "model.compute_dtype=float32", "--set", "model.attention_impl=reference"])
    assert result.exit_code == 0, result.output
    import jax
    import jax.numpy as jnp

    saved = restore_model(out, make_mesh(MeshConfig(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1]))
    golden = np.load(GOLDEN / "qwen3" / "golden.npz")
    tokens = golden["tokens"]
    B, L = tokens.shape
    logits, _ = saved.model(jnp.asarray(tokens, jnp.int32), jnp.ones((B, L), jnp.int32),
                            jnp.broadcast_to(jnp.arange(L), (B, L)))
    expected = golden["logits"]
    assert np.max(np.abs(np.asarray(logits) - expected)) / np.max(np.abs(expected)) <= 1e-4


@pytest.mark.parametrize(("breakage", "named"), [("drop_weights", "model.safetensors"), ("bad_arch", "GPT2")])
def test_import_hf_bad_input_exits_2_and_leaves_no_run(tmp_path, breakage, named):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(GOLDEN / "llama3", src)
    if breakage == "drop_weights":
        (src / "model.safetensors").unlink()
    else:
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["import", "hf", str(src), "--output", str(out)])
    assert result.exit_code == 2 and named in result.output, result.output
    assert not (out / "config.yaml").exists() and not (out / "initial").exists()


@pytest.mark.parametrize("sets, dispatch", [([], "dropless"), (["--set", "model.dispatch=capacity"], "capacity")])
def test_cli_import_of_an_moe_source_is_dropless_unless_asked(sets, dispatch, tmp_path):
    """An MoE source's dispatch is the source's (dropless) whatever the default config says; an
    explicit --set model.dispatch is honoured, not silently dropped."""
    import yaml

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["import", "hf", str(GOLDEN / "mixtral"), "--output", str(out), *sets])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["dispatch"] == dispatch
