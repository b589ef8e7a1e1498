"""``indicfm import hf gs://bucket/model`` against a local GCS emulator (tests/gcs_emulator.py): the
config, index, shards and tokenizer are read from the bucket, each tensor as one ranged request of
its bytes, never a whole file; the imported run equals the import of the same files on local disk
and computes transformers' golden logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

import gcs_emulator  # noqa: F401  (first: it sets what gcsfs reads when imported)

pytest.importorskip("gcsfs")
pytest.importorskip("upath")
pytest.importorskip("gcp_storage_emulator")

from gcs_emulator import BUCKET, running_emulator, upload_tree  # noqa: E402

from indicfm.cli import app  # noqa: E402
from indicfm.config import MeshConfig  # noqa: E402
from indicfm.convert.hf_arch import ConversionError  # noqa: E402
from indicfm.convert.hf_import import imported_model_config, load_hf_model  # noqa: E402
from indicfm.sharding import make_mesh  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "hf"
NAME = "qwen2_moe"  # experts, a shared expert, q/k/v biases: every kind of tensor the table reads
FLOAT32 = ["--set", "model.compute_dtype=float32", "--set", "model.attention_impl=reference"]
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _source(tmp: Path) -> Path:
    """The golden checkpoint as two shards with an index, and a tokenizer.json (+ its config)."""
    from safetensors.numpy import load_file, save_file
    from tokenizers import Tokenizer, models

    src = tmp / NAME
    shutil.copytree(GOLDEN / NAME, src, ignore=shutil.ignore_patterns("golden.npz"))
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    halves = {SHARDS[0]: names[::2], SHARDS[1]: names[1::2]}
    for file, chosen in halves.items():
        save_file({n: tensors[n] for n in chosen}, src / file, metadata={"format": "pt"})
    (src / "model.safetensors").unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, chosen in halves.items() for n in chosen}}))
    vocab = {"<unk>": 0, "<|start|>": 1, "<|stop|>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|start|>", "eos_token": "<|stop|>"}))
    return src


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    src = _source(tmp_path_factory.mktemp("hf_gcs"))
    with running_emulator():
        upload_tree(src, f"gs://{BUCKET}/{NAME}")
        yield {"url": f"gs://{BUCKET}/{NAME}", "local": src}


@pytest.fixture()
def gcs_reads(monkeypatch):
    """Every download gcsfs makes, as (object, start, end): a fresh filesystem instance mirrors the spy."""
    import gcsfs

    reads: list[tuple[str, int | None, int | None]] = []
    original = gcsfs.GCSFileSystem._cat_file

    async def spy(self, path, start=None, end=None, **kwargs):
        reads.append((path, start, end))
        return await original(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_cat_file", spy)
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield reads
    gcsfs.GCSFileSystem.clear_instance_cache()


def _one_device():
    return make_mesh(MeshConfig(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    B, L = tokens.shape
    logits, _ = model(jnp.asarray(tokens, jnp.int32), jnp.ones((B, L), jnp.int32), jnp.broadcast_to(jnp.arange(L), (B, L)))
    return np.asarray(logits, np.float64)


def test_import_from_a_bucket_reads_byte_ranges_and_equals_the_local_import(bucket, gcs_reads, tmp_path):
    from indicfm.config import load_config
    from indicfm.train.saved_model import restore_model

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["import", "hf", bucket["url"], "--output", str(out), *FLOAT32])
    assert result.exit_code == 0, result.output

    # the tokenizer came from the bucket and is the run's
    cfg = load_config(out / "config.yaml")
    assert Path(cfg.tokenizer.model_file) == out / "tokenizer" / "tokenizer.json"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / "tokenizer" / name).read_bytes() == (bucket["local"] / name).read_bytes()

    # every read of a shard was a byte range; together they are the shards' headers and tensors, once
    shard_reads = [(p, s, e) for p, s, e in gcs_reads if p.endswith(SHARDS)]
    assert shard_reads and all(s is not None and e is not None for _, s, e in shard_reads), shard_reads
    sizes = {f: (bucket["local"] / f).stat().st_size for f in SHARDS}
    for file in SHARDS:
        read = sum(e - s for p, s, e in shard_reads if p.endswith(file))
        assert max(e - s for p, s, e in shard_reads if p.endswith(file)) < sizes[file] / 2  # no whole-file read
        assert read == sizes[file], (file, read, sizes[file])  # 8-byte length + header + each tensor once

    # the same parameters as the import of the local files, and transformers' logits
    saved = restore_model(out, _one_device())
    local = load_hf_model(bucket["local"], _one_device(), saved.saved_model_config)
    for (path, got), (_, want) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(saved.model)),
                                      jax.tree_util.tree_leaves_with_path(nnx.state(local)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
    golden = np.load(GOLDEN / NAME / "golden.npz")
    got, expected = _logits(saved.model, golden["tokens"]), golden["logits"].astype(np.float64)
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-4
    assert saved.meta.source == {"hf": bucket["url"], "architecture": "Qwen2MoeForCausalLM"}


def test_a_bucket_index_naming_a_missing_shard_is_named(bucket):
    """The bad-input checks hold in a bucket too: the index's missing shard is named by its gs:// path."""
    import fsspec

    url = f"gs://{BUCKET}/broken"
    upload_tree(bucket["local"], url)
    fsspec.filesystem("gs").rm(f"{url.removeprefix('gs://')}/{SHARDS[1]}")
    cfg = imported_model_config(url, param_dtype="float32")
    with pytest.raises(ConversionError, match=rf"{url}/model.safetensors.index.json names shard files .*{SHARDS[1]}"):
        load_hf_model(url, _one_device(), cfg)
