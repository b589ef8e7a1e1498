"""Checkpoints: restore onto another mesh, damaged latest → fallback, retention, tokenizer item."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from indicfm.config import MeshConfig
from indicfm.model.config import ModelConfig
from indicfm.sharding import make_mesh
from indicfm.model.transformer import param_layout
from indicfm.train.checkpoint import (
    Checkpointer,
    LayoutMismatch,
    tokenizer_bytes,
    tokenizer_item,
)
from indicfm.train.checkpoint_meta import PARAM_LAYOUT_KEY
from indicfm.train.config import CheckpointConfig, OptimizerConfig
from indicfm.train.optimizer import make_optimizer
from indicfm.train.state import abstract_train_state, create_model, init_train_state

TINY = ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, d_ff=64,
    num_experts=4, top_k=2, d_expert=32, first_dense_layers=1, loss_free_bias=True,
    compute_dtype="float32", max_seq_len=32,
)


def _numpy(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_restore_onto_another_mesh_gives_the_same_parameters(tmp_path):
    tx = make_optimizer(OptimizerConfig(), 10, 3)
    mesh8 = make_mesh(MeshConfig(data=8))
    _, state, _ = init_train_state(create_model(TINY, mesh8, 0), tx, 0, mesh8)
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1))
    ckpt.save(3, state, {"loader": {"seed": 0}})
    ckpt.close()
    original = _numpy(state)

    mesh_2x4 = make_mesh(MeshConfig(data=2, expert=4))
    _, target, _ = abstract_train_state(TINY, tx, 0, mesh_2x4)
    restored = Checkpointer(tmp_path / "ckpt", CheckpointConfig()).restore_latest_good(target)
    assert restored.step == 3 and restored.meta.loader == {"seed": 0}
    for got, want in zip(_numpy(restored.state), original, strict=True):
        np.testing.assert_array_equal(got, want)
    expert_weight = restored.state["params"]["blocks"][1]["mlp"]["w_up_ExDxF"]
    assert dict(expert_weight.sharding.mesh.shape)["expert"] == 4
    assert expert_weight.sharding.spec[0] == "expert"  # experts really split over the new axis


def test_a_checkpoint_restores_only_into_its_own_parameter_layout(tmp_path):
    """Scanned and unrolled trees differ: the wrong one is a clear error, not a 'damaged' checkpoint."""
    scanned = TINY.model_copy(update={"num_layers": 3, "scan_layers": True})
    unrolled = scanned.model_copy(update={"scan_layers": False})
    assert (param_layout(scanned), param_layout(unrolled)) == ("scanned", "unrolled")
    tx = make_optimizer(OptimizerConfig(), 10, 3)
    mesh = make_mesh(MeshConfig(data=8))
    _, state, _ = init_train_state(create_model(scanned, mesh, 0), tx, 0, mesh)
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1))
    ckpt.save(2, state, {PARAM_LAYOUT_KEY: "scanned"})
    ckpt.close()

    reader = Checkpointer(tmp_path / "ckpt", CheckpointConfig())
    _, unrolled_target, _ = abstract_train_state(unrolled, tx, 0, mesh)
    with pytest.raises(LayoutMismatch, match=r"'scanned' layout.*'unrolled' layout.*model.scan_layers=true"):
        reader.restore_latest_good(unrolled_target, param_layout="unrolled")
    assert reader.steps() == [2] and not (tmp_path / "damaged_checkpoints").exists()  # nothing set aside

    _, scanned_target, _ = abstract_train_state(scanned, tx, 0, mesh)
    restored = reader.restore_latest_good(scanned_target, param_layout="scanned")
    assert restored.meta.param_layout == "scanned"
    for got, want in zip(_numpy(restored.state), _numpy(state), strict=True):
        np.testing.assert_array_equal(got, want)
    assert restored.state["params"]["scanned_blocks"]["mlp"]["w_up_ExDxF"].shape[0] == 2


def test_a_checkpoint_without_a_layout_is_unrolled(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, async_save=False))
    ckpt.save(1, {"w": jnp.ones((4,))}, {})
    ckpt.close()
    reader = Checkpointer(tmp_path / "ckpt", CheckpointConfig())
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    assert reader.restore(1, target, param_layout="unrolled").step == 1
    with pytest.raises(LayoutMismatch, match="model.scan_layers=false"):
        reader.restore(1, target, param_layout="scanned")


def _arrays(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {f"w{i}": rng.normal(size=(64, 48 * (i + 1))).astype(np.float32) for i in range(4)}


_RESTORE_IN_FRESH_PROCESS = """
import json, sys
import numpy as np, jax
from indicfm.train.checkpoint import Checkpointer
from indicfm.train.config import CheckpointConfig
target = {f"w{i}": jax.ShapeDtypeStruct((64, 48 * (i + 1)), np.float32) for i in range(4)}
warnings = []
r = Checkpointer(sys.argv[1], CheckpointConfig()).restore_latest_good(target, warn=warnings.append)
np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in r.state.items()})
print(json.dumps({"step": r.step, "skipped": r.skipped_damaged, "warnings": warnings}))
"""


def test_damaged_checkpoints_fall_back_to_the_newest_good_one(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=2, keep_last=5))
    for step in (2, 4, 6):
        ckpt.save(step, {k: jnp.asarray(v) for k, v in _arrays(step).items()}, {"loader": {}})
    ckpt.close()

    def largest_file(step: int) -> Path:
        files = [p for p in (tmp_path / "ckpt" / str(step)).rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_size)

    truncated = largest_file(6)
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)  # a write cut off halfway
    largest_file(4).unlink()  # a lost file

    # A fresh process, as after a crash (an in-process restore could be served from tensorstore's cache).
    out = subprocess.run(
        [sys.executable, "-c", _RESTORE_IN_FRESH_PROCESS, str(tmp_path / "ckpt"), str(tmp_path / "got.npz")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["step"] == 2 and report["skipped"] == [6, 4]
    assert len(report["warnings"]) == 2 and "step 6" in report["warnings"][0]
    got = np.load(tmp_path / "got.npz")
    for key, value in _arrays(2).items():
        np.testing.assert_array_equal(got[key], value)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()) == ["4", "6"]
    assert Checkpointer(tmp_path / "ckpt", CheckpointConfig()).steps() == [2]  # 4 and 6 can be saved again


def test_retention_keeps_last_n_and_every_mth(tmp_path):
    state = {"w": jnp.ones((4,))}
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, keep_last=2, keep_every=4, async_save=False))
    for step in range(1, 10):
        ckpt.save(step, state, {})
    ckpt.close()
    assert Checkpointer(tmp_path / "ckpt", CheckpointConfig()).steps() == [4, 8, 9]


def test_tokenizer_item_round_trip_checks_sha(tmp_path):
    source = tmp_path / "tok.model"
    source.write_bytes(os.urandom(1000))
    item = tokenizer_item(source)
    assert tokenizer_bytes(item) == source.read_bytes()
    item["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="sha256"):
        tokenizer_bytes(item)


def test_uncompressed_save_with_little_in_flight_restores_bitwise(tmp_path):
    # zeros: zstd would shrink them to almost nothing, so the files' size shows whether it ran
    state = {"zeros": jnp.zeros((256, 1024), jnp.float32), "w": jnp.asarray(_arrays(7)["w3"])}
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1), in_flight_gb=1)
    ckpt.save(1, state, {})
    ckpt.close()
    on_disk = sum(p.stat().st_size for p in (tmp_path / "ckpt" / "1" / "state").rglob("*") if p.is_file())
    assert on_disk >= 256 * 1024 * 4 + 64 * 192 * 4  # every byte of both arrays is stored as is

    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()}
    restored = Checkpointer(tmp_path / "ckpt", CheckpointConfig(), in_flight_gb=1).restore(1, target)
    np.testing.assert_array_equal(np.asarray(restored.state["zeros"]), np.zeros((256, 1024), np.float32))
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), _arrays(7)["w3"])
