"""The checkpoint's ``meta`` item as one typed record: it round-trips through a real checkpoint, a
malformed one is an error naming the checkpoint and the key, and metadata written before the record
existed (a plain dict without ``param_layout``) still loads with the old fallbacks."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from indicfm.config import load_config
from indicfm.train.checkpoint import Checkpointer
from indicfm.train.checkpoint_meta import CheckpointMeta, CheckpointMetaError
from indicfm.train.config import CheckpointConfig
from indicfm.train.saved_model import read_meta

TINY = ["model.vocab_size=64", "model.d_model=16", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=8", "model.d_ff=32", "model.num_experts=2", "model.top_k=1", "model.d_expert=16"]


@pytest.fixture(scope="module")
def config_json() -> dict:
    return load_config(None, TINY).model_dump(mode="json")


def _save(directory, step: int, meta) -> None:
    ckpt = Checkpointer(directory, CheckpointConfig(every_steps=1, async_save=False))
    ckpt.save(step, {"w": jnp.arange(4.0)}, meta)
    ckpt.close()


def _overwrite_meta(directory, step: int, data) -> None:
    """Replace the JSON Orbax wrote for the meta item, as an older indicfm (or damage) would have left it."""
    (directory / str(step) / "meta" / "metadata").write_text(json.dumps(data))


def test_metadata_round_trips_through_a_checkpoint(tmp_path, config_json):
    meta = CheckpointMeta(step=0, config=config_json, tokenizer_sha256="ab" * 32, param_layout="scanned",
                          loader={"step": 5, "seed": 3}, seed=3, source={"hf": "org/model", "architecture": "X"})
    assert CheckpointMeta.from_json(json.loads(json.dumps(meta.to_json()))) == meta.with_step(0)
    _save(tmp_path / "ckpt", 5, meta)
    directory, step, back = read_meta(tmp_path / "ckpt")
    assert (directory, step) == ((tmp_path / "ckpt").resolve(), 5)
    assert back == meta.with_step(5)  # the checkpointer stamps the step it saved
    assert back.saved_model_config().d_model == 16 and back.loader == {"step": 5, "seed": 3}
    # the JSON on disk is exactly the record's fields (what an external tool would read)
    on_disk = json.loads((tmp_path / "ckpt" / "5" / "meta" / "metadata").read_text())
    assert on_disk == {"step": 5, "config": config_json, "tokenizer_sha256": "ab" * 32, "param_layout": "scanned",
                       "loader": {"step": 5, "seed": 3}, "seed": 3, "source": {"hf": "org/model", "architecture": "X"}}


@pytest.mark.parametrize(("data", "key"), [
    ({"step": 2, "param_layout": "diagonal"}, "param_layout"),
    ({"step": 2, "loader": [1, 2]}, "loader"),
    ({"step": "two"}, "step"),
    ({"loader": {}}, "step"),
])
def test_malformed_metadata_names_the_checkpoint_and_the_key(tmp_path, data, key):
    _save(tmp_path / "ckpt", 2, {})
    _overwrite_meta(tmp_path / "ckpt", 2, data)
    reader = Checkpointer(tmp_path / "ckpt", CheckpointConfig())
    with pytest.raises(CheckpointMetaError, match=rf"checkpoint .*ckpt/2: malformed meta item: key {key}\b"):
        reader.read_meta(2)
    # a restore treats it as a damaged checkpoint: set aside with a warning naming the key, never a crash
    warnings: list[str] = []
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    assert reader.restore_latest_good(target, warn=warnings.append) is None
    assert key in warnings[0] and (tmp_path / "damaged_checkpoints").is_dir()
    reader.close()


def test_metadata_without_a_config_is_refused_where_a_model_is_needed(tmp_path):
    _save(tmp_path / "ckpt", 1, {"loader": {}})
    with pytest.raises(CheckpointMetaError, match=r"ckpt/1: its metadata has no resolved config \(key config.model\)"):
        read_meta(tmp_path / "ckpt")
    with pytest.raises(CheckpointMetaError, match="not a JSON object"):
        CheckpointMeta.from_json(["not", "a", "dict"], "somewhere/3")


def test_metadata_written_before_the_record_still_loads(tmp_path, config_json):
    """What indicfm wrote before layouts were recorded: a plain dict, no ``param_layout``, no ``source``,
    and a key this version no longer knows."""
    old = {"loader": {"step": 4, "seed": 0, "language_weights": None}, "config": config_json,
           "tokenizer_sha256": "cd" * 32, "seed": 0, "step": 4, "written_by": "indicfm 0.1"}
    _save(tmp_path / "ckpt", 4, {})
    _overwrite_meta(tmp_path / "ckpt", 4, old)
    _, _, meta = read_meta(tmp_path / "ckpt")
    assert meta.param_layout == "unrolled" and meta.source is None
    assert meta.loader == old["loader"] and meta.tokenizer_sha256 == "cd" * 32 and meta.step == 4
    reader = Checkpointer(tmp_path / "ckpt", CheckpointConfig())
    restored = reader.restore(4, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, param_layout="unrolled")
    assert restored.meta == meta and restored.state["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    reader.close()
