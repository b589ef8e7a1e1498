"""A Hugging Face model directory as an indicfm model, each tensor placed straight into its sharding.

``load_hf_model(src, mesh)`` reads ``config.json`` (:func:`~indicfm.convert.hf_arch.model_fields`),
builds the model abstractly (nothing allocated) and creates every parameter with
``jax.make_array_from_callback``: JAX asks, per device, for the slice that device holds, and the
callback reads the tensor from the memory-mapped safetensors file, changes its layout and cuts the
slice.  So:

* there is never a second copy of the model in host memory: one tensor (the one being placed) is
  read at a time and dropped when its shards are on the devices;
* with several processes each process is asked only for its own devices' slices; expert weights
  are read per expert, so a process reads only the experts its devices hold (dense tensors are read
  whole, once per process, and sliced); no tensor is read twice by one process
  (:class:`SliceReader`);
* the layout follows the one sharding rules table (:mod:`indicfm.sharding`), whatever the mesh.

``src`` may be a local directory or a bucket (``gs://bucket/model``): the small files are read
through :mod:`indicfm.storage` and each tensor is a ranged read of its bytes
(:mod:`~indicfm.convert.safetensors_files`), so a checkpoint in a bucket is never downloaded whole.

Embedding rows may exceed the tokenizer's size (Qwen pads its vocabulary to a round number); fewer
rows than tokenizer entries is an error, checked by the caller that knows the tokenizer.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from indicfm.convert.hf_arch import (
    ConversionError,
    TensorSource,
    architecture_of,
    model_fields,
    plain_path,
    tensor_table,
)
from indicfm.convert.safetensors_files import ReadHook, SafetensorsCheckpoint
from indicfm.model.config import ModelConfig
from indicfm.sharding import Rules, state_shardings
from indicfm.storage import as_path

#: tensors some checkpoints carry that are not weights of the function (buffers, caches)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(src: str | Path) -> dict:
    """``SRC/config.json`` as a dict (local or ``gs://``); a missing or unreadable file is a :class:`ConversionError`."""
    path = as_path(src) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{as_path(src)}: no config.json (is this a Hugging Face model directory?)")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise ConversionError(f"{path}: not valid JSON: {err}") from None


def imported_model_config(src: str | Path, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of the checkpoint in ``src`` (``overrides``: fields the source does not
    decide, e.g. ``param_dtype``, ``scan_layers``, ``remat``, ``attention_impl``)."""
    hf = read_hf_config(src)
    fields = model_fields(hf, str(as_path(src) / "config.json"))
    clash = sorted(set(overrides) & set(fields) - {"max_seq_len"})
    if clash:
        raise ConversionError(f"model.{clash[0]} is set by the source checkpoint's config.json and cannot be overridden")
    return ModelConfig(**{**fields, **overrides})


class SliceReader:
    """The slices of one parameter that this process's devices hold, read from the checkpoint.

    ``indices``: the index of every slice that will be asked for (one per addressable device, from
    the sharding).  A stacked expert parameter is read per expert, only the experts those slices
    cover; any other parameter is read whole (its transform mixes the file's rows and columns, so a
    device's slice is not one byte range).  Each checkpoint tensor is read at most once per process
    and kept only until the last slice that needs it has been cut, so several devices holding the
    same experts (an ``fsdp`` split of them) do not read them again.
    """

    def __init__(self, source: TensorSource, checkpoint: SafetensorsCheckpoint, shape: tuple, path: tuple,
                 indices: list[tuple]):
        self.source, self.checkpoint, self.shape, self.path = source, checkpoint, shape, path
        self._left: Counter = Counter(k for index in indices for k in self._keys(index))
        self._kept: dict[Any, np.ndarray] = {}

    def _keys(self, index: tuple) -> list:
        """What a slice needs: its experts (stacked), else the whole tensor."""
        return list(range(*index[0].indices(self.shape[0]))) if self.source.stacked else ["whole"]

    def _value(self, key: Any) -> np.ndarray:
        value = self._kept.pop(key, None)
        if value is None:
            if key == "whole":
                value = self._check(self.source.read(self.checkpoint.get), self.shape)
            else:
                value = self._check(self.source.read(self.checkpoint.get, range(key, key + 1)), (1, *self.shape[1:]))[0]
        self._left[key] -= 1
        if self._left[key] > 0:
            self._kept[key] = value
        return value

    def _check(self, value: np.ndarray, expected: tuple) -> np.ndarray:
        if value.shape != expected:
            raise ConversionError(
                f"{self.checkpoint.directory}: {self.source.names[0]} has shape {value.shape} after conversion, but "
                f"{'.'.join(map(str, self.path))} needs {expected} (config.json and the weights disagree)"
            )
        return value

    def __call__(self, index: tuple) -> np.ndarray:
        """The slice ``index`` of the parameter (float32)."""
        if not self.source.stacked:
            return self._value("whole")[index]
        experts = np.stack([self._value(e) for e in self._keys(index)])
        return experts[(slice(None), *index[1:])]


def _placed(source: TensorSource, checkpoint: SafetensorsCheckpoint, shape: tuple, dtype: Any, sharding: Any,
            path: tuple) -> jax.Array:
    """One parameter created on its devices from the checkpoint, each device reading its own slice."""
    # what make_array_from_callback will ask for: one slice per addressable device, or one in all
    # when the parameter is replicated
    indices = ([(slice(None),) * len(shape)] if sharding.is_fully_replicated
               else list(sharding.addressable_devices_indices_map(shape).values()))
    reader = SliceReader(source, checkpoint, shape, path, indices)
    return jax.make_array_from_callback(shape, sharding, lambda index: reader(index).astype(dtype))


def load_hf_model(
    src: str | Path,
    mesh: jax.sharding.Mesh,
    model_cfg: ModelConfig | None = None,
    rules: Rules | None = None,
    *,
    on_read: ReadHook | None = None,
) -> Any:
    """The checkpoint in ``src`` (a local directory or ``gs://``) as an indicfm ``Transformer`` whose
    parameters live on ``mesh``.

    ``model_cfg`` defaults to :func:`imported_model_config`; it must describe the source (the
    parameter layout may be scanned: the model is imported unrolled and then stacked).
    ``on_read(name, nbytes)`` is told of every tensor read (see :class:`SafetensorsCheckpoint`).
    """
    from indicfm.model.layout import placed_with_layout
    from indicfm.model.transformer import Transformer

    src = as_path(src)
    hf = read_hf_config(src)
    arch = architecture_of(hf, str(src / "config.json"))
    cfg = model_cfg or imported_model_config(src)
    unrolled_cfg = cfg.model_copy(update={"scan_layers": False})
    table = tensor_table(arch, unrolled_cfg)

    abstract = nnx.eval_shape(lambda: Transformer(unrolled_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules)
    with SafetensorsCheckpoint(src, on_read=on_read) as checkpoint:
        _check_names(checkpoint, table, cfg)
        _check_vocab(checkpoint, cfg)

        def place(key_path: tuple, leaf: Any, sharding: Any) -> Any:
            path = plain_path(key_path)
            if path not in table:  # non-parameter state (the loss-free router bias): its initial zeros
                return jax.device_put(np.zeros(leaf.shape, leaf.dtype), sharding)
            return _placed(table[path], checkpoint, tuple(leaf.shape), leaf.dtype, sharding, path)

        placed = jax.tree_util.tree_map_with_path(place, state, shardings)
    return placed_with_layout(nnx.merge(graphdef, placed), cfg.scan_layers, mesh, rules)


def _check_names(checkpoint: SafetensorsCheckpoint, table: dict[tuple, TensorSource], cfg: ModelConfig) -> None:
    """Every tensor the model needs is there, and every weight the checkpoint has is used."""
    needed = {name for source in table.values() for name in source.names}
    missing = sorted(needed - checkpoint.names())
    if missing:
        raise ConversionError(f"{checkpoint.directory}: tensors missing from the checkpoint: {missing[:5]}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    unused = sorted(
        name for name in checkpoint.names() - needed
        if not name.endswith(IGNORED_SUFFIXES) and not (cfg.tie_embeddings and name == "lm_head.weight")
    )
    if unused:
        raise ConversionError(
            f"{checkpoint.directory}: tensors indicfm would not use, so the imported model would compute something "
            f"else: {unused[:5]}" + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        )


def _check_vocab(checkpoint: SafetensorsCheckpoint, cfg: ModelConfig) -> None:
    rows = checkpoint.shape("model.embed_tokens.weight")[0]
    if rows != cfg.vocab_size:
        raise ConversionError(
            f"{checkpoint.directory}: model.embed_tokens.weight has {rows} rows but config.json says vocab_size "
            f"{cfg.vocab_size}"
        )


def check_tokenizer_fits(cfg: ModelConfig, tokenizer_size: int, tokenizer_file: str) -> None:
    """More embedding rows than tokenizer entries is fine (padding); fewer is an error."""
    if cfg.vocab_size < tokenizer_size:
        raise ConversionError(
            f"the model has {cfg.vocab_size} embedding rows but {tokenizer_file} has {tokenizer_size} entries: "
            "tokens past the table would have no embedding"
        )
