"""Hugging Face checkpoints imported into indicfm compute what transformers computes.

The references are golden files written by transformers itself (tests/golden/hf/make_goldens.py,
float32, eager attention, a plain loop over experts): logits for two rows of random tokens and a
16-token greedy continuation, for a tiny random model of every supported architecture.  The slow
test rebuilds them live when torch and transformers are installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from indicfm.convert.hf_arch import ConversionError
from indicfm.convert.hf_import import imported_model_config, load_hf_model
from indicfm.inference.generate import generate_ids
from flax import nnx

from indicfm.sharding import make_mesh, state_shardings

GOLDEN = Path(__file__).resolve().parent / "golden" / "hf"
ARCHITECTURES = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").is_file())
FLOAT32 = {"param_dtype": "float32", "compute_dtype": "float32", "attention_impl": "reference"}


def _mesh(**sizes):
    from indicfm.config import MeshConfig

    count = int(np.prod(list(sizes.values()))) if sizes else 1
    return make_mesh(MeshConfig(**{"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **sizes}), jax.devices()[:count])


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    B, L = tokens.shape
    segment = jnp.ones((B, L), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    logits, _ = model(jnp.asarray(tokens, jnp.int32), segment, positions)
    return np.asarray(logits, np.float64)


def _kl(golden: np.ndarray, ours: np.ndarray) -> float:
    """Mean KL(golden || ours) over positions, from log-softmax in float64."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p_log, q_log = log_softmax(golden), log_softmax(ours)
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)))


def test_every_supported_architecture_has_a_golden_checkpoint():
    from indicfm.convert.hf_arch import ARCHITECTURES as SUPPORTED

    covered = {json.loads((GOLDEN / a / "config.json").read_text())["architectures"][0] for a in ARCHITECTURES}
    assert covered == set(SUPPORTED)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_imported_logits_and_greedy_continuation_match_transformers(name):
    golden = np.load(GOLDEN / name / "golden.npz")
    cfg = imported_model_config(GOLDEN / name, **FLOAT32)
    model = load_hf_model(GOLDEN / name, _mesh(), cfg)
    expected = golden["logits"].astype(np.float64)
    got = _logits(model, golden["tokens"])
    error = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
    assert error <= 1e-4, f"{name}: max |delta logit| / max |logit| = {error:.2e}"
    assert _kl(expected, got) <= 1e-6

    greedy = golden["greedy"].tolist()
    unused = next(t for t in range(3, cfg.vocab_size) if t not in greedy)  # pad id the reference never chose
    (generation,) = generate_ids(model, [golden["tokens"][0, :6].tolist()], max_new_tokens=len(greedy),
                                 eos_id=-1, pad_id=unused)  # fmt: skip
    assert generation.token_ids == greedy, name


@pytest.mark.parametrize(("name", "sizes"), [("qwen3_moe", {"fsdp": 2, "expert": 4}), ("qwen2_moe", {"fsdp": 4, "expert": 2}),
                                             ("llama3", {"fsdp": 4, "tensor": 2})])
def test_import_onto_eight_devices_equals_the_single_device_import(name, sizes):
    cfg = imported_model_config(GOLDEN / name, **FLOAT32)
    mesh = _mesh(**sizes)
    single = load_hf_model(GOLDEN / name, _mesh(), cfg)
    sharded = load_hf_model(GOLDEN / name, mesh, cfg)
    state = nnx.state(sharded)
    # every array is laid out as the rules table says (not replicated, not left on one device)
    expected_shardings = dict(jax.tree_util.tree_leaves_with_path(state_shardings(state, mesh)))
    leaves_many = dict(jax.tree_util.tree_leaves_with_path(state))
    split = 0
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(single)):
        other = leaves_many[path]
        assert other.sharding.is_equivalent_to(expected_shardings[path], other.ndim), path
        split += not other.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(other), np.asarray(value), err_msg=str(path))
    assert split > 0
    tokens = np.load(GOLDEN / name / "golden.npz")["tokens"]
    np.testing.assert_allclose(_logits(sharded, tokens), _logits(single, tokens), rtol=1e-5, atol=1e-5)


def test_scanned_import_computes_the_same_logits():
    golden = np.load(GOLDEN / "qwen3_moe" / "golden.npz")
    cfg = imported_model_config(GOLDEN / "qwen3_moe", **FLOAT32, scan_layers=True)
    model = load_hf_model(GOLDEN / "qwen3_moe", _mesh(), cfg)
    assert model.scanned_blocks is not None
    got, expected = _logits(model, golden["tokens"]), golden["logits"]
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-4


# ------------------------------------------------------------------------------------------ bad input


def _copy(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(GOLDEN / name, target)
    return target


def _edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(("changes", "named"), [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_architectures_and_options_are_named(tmp_path, changes, named):
    src = _copy("mistral", tmp_path)
    _edit_config(src, **changes)
    with pytest.raises(ConversionError, match=named):
        load_hf_model(src, _mesh(), imported_model_config(src, **FLOAT32))


def test_a_truncated_safetensors_file_is_named(tmp_path):
    src = _copy("qwen2", tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="model.safetensors"):
        load_hf_model(src, _mesh(), imported_model_config(src, **FLOAT32))


def test_a_missing_weights_file_and_a_wrong_index_are_named(tmp_path):
    src = _copy("qwen2", tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="neither model.safetensors"):
        load_hf_model(src, _mesh(), imported_model_config(src, **FLOAT32))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "shard-1.safetensors"}}))
    with pytest.raises(ConversionError, match="shard-1.safetensors"):
        load_hf_model(src, _mesh(), imported_model_config(src, **FLOAT32))


def test_sharded_checkpoint_with_an_index_imports_like_one_file(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = _copy("llama3", tmp_path)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, chosen in halves.items():
        save_file({n: tensors[n] for n in chosen}, src / file, metadata={"format": "pt"})
    (src / "model.safetensors").unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, chosen in halves.items() for n in chosen}}))
    golden = np.load(GOLDEN / "llama3" / "golden.npz")
    model = load_hf_model(src, _mesh(), imported_model_config(src, **FLOAT32))
    got = _logits(model, golden["tokens"])
    assert np.max(np.abs(got - golden["logits"])) / np.max(np.abs(golden["logits"])) <= 1e-4


def test_a_tensor_whose_shape_disagrees_with_the_config_is_named(tmp_path):
    src = _copy("qwen3", tmp_path)
    _edit_config(src, intermediate_size=30)
    with pytest.raises(ConversionError, match="mlp"):
        load_hf_model(src, _mesh(), imported_model_config(src, **FLOAT32))


@pytest.mark.slow
def test_goldens_regenerate_identically_with_transformers():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(GOLDEN / "make_goldens.py"), "--check"], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


EXPORTED_AS = {"llama3": "LlamaForCausalLM", "llama_tied": "LlamaForCausalLM", "mistral": "LlamaForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "Qwen2MoeForCausalLM",
               "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_export_of_an_imported_model_imports_back_to_the_same_logits(name, tmp_path):
    """Export writes the source family's architecture; importing the export reproduces transformers'
    golden logits (so the export is what transformers computes too)."""
    from indicfm.export.hf import hf_config, hf_tensors, write_safetensors

    cfg = imported_model_config(GOLDEN / name, **FLOAT32)
    model = load_hf_model(GOLDEN / name, _mesh(), cfg)
    config = hf_config(cfg, bos_id=1, eos_id=2, pad_id=0, dtype="float32")
    assert config["architectures"] == [EXPORTED_AS[name]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_safetensors(hf_tensors(model), tmp_path)
    again = load_hf_model(tmp_path, _mesh(), imported_model_config(tmp_path, **FLOAT32))
    golden = np.load(GOLDEN / name / "golden.npz")
    got = _logits(again, golden["tokens"])
    assert np.max(np.abs(got - golden["logits"])) / np.max(np.abs(golden["logits"])) <= 1e-4
