"""Training start-up from one typed source (indicfm/train/start.py): which source a run starts from,
and the state each gives, compared with the state it must reproduce (the model that was saved or
imported, the train state that was checkpointed, a model built directly from the seed)."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from indicfm.config import load_config
from indicfm.convert.initial_run import write_initial_run
from indicfm.sharding import make_mesh
from indicfm.train.checkpoint import Checkpointer
from indicfm.train.checkpoint_meta import CheckpointMeta
from indicfm.train.config import CheckpointConfig
from indicfm.train.optimizer import run_optimizer
from indicfm.train.start import Fresh, FromCheckpoint, Resume, TokenizerChanged, choose_start, start_state
from indicfm.train.state import abstract_train_state, create_model

from helpers import random_model

# one dense layer on one device: start-up does not depend on the model's size, compilation time does
TINY = ["model.vocab_size=64", "model.d_model=16", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=8", "model.d_ff=32", "model.num_experts=1", "model.top_k=1", "model.first_dense_layers=1",
        "model.compute_dtype=float32", "trainer.steps=10", "trainer.seed=3",
        "mesh.data=1", "mesh.fsdp=1", "mesh.expert=1", "mesh.tensor=1"]
SHA = "ab" * 32


@pytest.fixture(scope="module")
def setting():
    cfg = load_config(None, TINY)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    tx, _ = run_optimizer(cfg)
    return cfg, mesh, tx


@pytest.fixture(scope="module")
def seeded(setting) -> list[np.ndarray]:
    """The reference for a fresh start: the model built directly from the run's seed."""
    cfg, mesh, _ = setting
    return _leaves(nnx.state(create_model(cfg.model, mesh, cfg.trainer.seed), nnx.Param))


def _start(source, cfg, mesh, tx, workdir, checkpointer, sha=SHA, warn=None):
    abstract = abstract_train_state(cfg.model, tx, cfg.trainer.seed, mesh)[:2]
    return start_state(source, cfg, workdir=workdir, mesh=mesh, rules=None, tx=tx, abstract=abstract,
                       checkpointer=checkpointer, tokenizer_sha256=sha, warn=warn or (lambda m: None))


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_the_source_is_the_runs_checkpoints_else_init_from_else_random(setting, tmp_path):
    cfg, mesh, _ = setting
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(async_save=False))
    assert choose_start(cfg, tmp_path, ckpt) == Fresh()
    imported = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"init_from": "initial"})})
    assert choose_start(imported, tmp_path, ckpt) == FromCheckpoint(tmp_path / "initial")
    ckpt.save(2, {"w": jax.numpy.ones(2)}, {})
    assert choose_start(imported, tmp_path, ckpt) == Resume(ckpt.directory, otherwise=FromCheckpoint(tmp_path / "initial"))
    ckpt.close()


def test_a_fresh_start_is_the_seeded_model_with_a_fresh_optimizer(setting, seeded, tmp_path):
    cfg, mesh, tx = setting
    started = _start(Fresh(), cfg, mesh, tx, tmp_path, None)
    assert (started.step, started.resumed, started.loader_state) == (0, False, None)
    assert started.description == f"starting a fresh run in {tmp_path} from random initialisation"
    for got, want in zip(_leaves(started.state["params"]), seeded, strict=True):
        np.testing.assert_array_equal(got, want)
    assert all(not np.any(m) for m in _leaves(started.state["opt_state"]) if m.ndim)  # moments start at zero


def test_init_from_takes_the_parameters_of_an_imported_run(setting, tmp_path):
    cfg, mesh, tx = setting
    other = random_model(cfg.model, seed=11)  # not this run's seed: the parameters must come from disk
    write_initial_run(tmp_path / "src", cfg, other, source={"hf": "org/tiny", "architecture": "LlamaForCausalLM"})
    started = _start(FromCheckpoint(tmp_path / "src" / "initial"), cfg, mesh, tx, tmp_path, None)
    assert (started.step, started.resumed) == (0, False)
    assert "initial/0 (trainer.init_from, imported from org/tiny (LlamaForCausalLM))" in started.description
    assert started.meta.source == {"hf": "org/tiny", "architecture": "LlamaForCausalLM"}
    for got, want in zip(_leaves(started.state["params"]), _leaves(nnx.state(other, nnx.Param)), strict=True):
        np.testing.assert_array_equal(got, want)


def test_init_from_a_checkpoint_made_with_another_tokenizer_is_refused(setting, tmp_path):
    cfg, mesh, tx = setting
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"not": "the run\'s tokenizer"}')
    write_initial_run(tmp_path / "src", cfg, random_model(cfg.model, seed=11), source={},
                      tokenizer_files=[tokenizer], tokenizer_model_file=tokenizer)
    with pytest.raises(TokenizerChanged, match="trainer.init_from"):
        _start(FromCheckpoint(tmp_path / "src" / "initial"), cfg, mesh, tx, tmp_path, None, sha=SHA)


def _saved_run(cfg, mesh, tx, directory, step: int) -> list[np.ndarray]:
    """A checkpoint of a train state whose every array (moments and RNG too) holds random values."""
    _, abstract, _ = abstract_train_state(cfg.model, tx, cfg.trainer.seed, mesh)
    rng = np.random.default_rng(step)
    state = jax.tree.map(lambda a: jax.device_put(rng.integers(1, 1000, a.shape).astype(a.dtype), a.sharding), abstract)
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    ckpt.save(step, state, CheckpointMeta(step=step, loader={"step": step, "seed": 5}, tokenizer_sha256=SHA))
    ckpt.close()
    return _leaves(state)


def test_a_resume_restores_the_whole_state_and_the_loader(setting, tmp_path):
    cfg, mesh, tx = setting
    saved = _saved_run(cfg, mesh, tx, tmp_path / "checkpoints", 4)
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig())
    source = choose_start(cfg, tmp_path, ckpt)
    started = _start(source, cfg, mesh, tx, tmp_path, ckpt)
    assert (started.step, started.resumed, started.loader_state) == (4, True, {"step": 4, "seed": 5})
    assert started.description == f"resuming from step 4 ({ckpt.directory / '4'})"
    for got, want in zip(_leaves(started.state), saved, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(TokenizerChanged, match=f"trained with tokenizer sha256 {SHA}"):
        _start(source, cfg, mesh, tx, tmp_path, ckpt, sha="cd" * 32)
    ckpt.close()


def test_a_resume_whose_checkpoints_are_all_damaged_starts_as_the_run_would_have(setting, tmp_path):
    """Here the run would have started from trainer.init_from: it does, after setting the damaged step aside."""
    cfg, mesh, tx = setting
    initial = random_model(cfg.model, seed=12)
    write_initial_run(tmp_path / "src", cfg, initial, source={"upcycled_from": "/runs/dense", "step": 7, "granularity": 2})
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"init_from": str(tmp_path / "src")})})
    _saved_run(cfg, mesh, tx, tmp_path / "checkpoints", 2)
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "state")
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig())
    warnings: list[str] = []
    source = choose_start(cfg, tmp_path, ckpt)
    assert isinstance(source, Resume)
    started = _start(source, cfg, mesh, tx, tmp_path, ckpt, warn=warnings.append)
    assert ckpt.steps() == [] and (tmp_path / "damaged_checkpoints").is_dir()
    ckpt.close()
    assert (started.step, started.resumed) == (0, False)
    assert "upcycled from /runs/dense step 7 (granularity 2)" in started.description
    assert "checkpoint at step 2 is damaged" in warnings[0]
    for got, want in zip(_leaves(started.state["params"]), _leaves(nnx.state(initial, nnx.Param)), strict=True):
        np.testing.assert_array_equal(got, want)
