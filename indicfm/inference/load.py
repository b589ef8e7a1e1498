"""Restore a training checkpoint for inference: parameters only, onto any devices.

A checkpoint written by ``indicfm train`` (``indicfm/train/checkpoint.py``) holds the whole train
state (parameters, optimizer moments, router bias, RNG), a JSON ``meta`` item with the resolved
config, and the tokenizer file.  Inference needs the parameters, the non-parameter model state (the
MoE router bias), the model config and the tokenizer — not the optimizer moments, which are twice
the size of the parameters.  Orbax's ``PyTreeRestore(partial_restore=True)`` reads just those
subtrees, and each array lands directly in the sharding asked for: the mesh used here is built from
the devices of *this* process (default: one device; ``tensor`` x ``expert`` devices when a model
must be split), whatever mesh and device count the checkpoint was saved from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from indicfm.model.config import ModelConfig
from indicfm.tokenizer.load import Tokenizer, TokenizerFile
from indicfm.train.checkpoint_meta import CheckpointMeta
from indicfm.train.saved_model import read_meta, restore_model


@dataclass
class LoadedModel:
    """What inference needs from a training run."""

    model: Any  # indicfm.model.transformer.Transformer built from inference_config(train config)
    train_model_config: ModelConfig  # the config it was trained with
    meta: CheckpointMeta  # the checkpoint's metadata (resolved config, step, tokenizer sha256, ...)
    step: int
    tokenizer_file: TokenizerFile  # the checkpoint's own tokenizer (SentencePiece .model or tokenizer.json)
    checkpoint_dir: Path

    def tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer, with its special tokens (:mod:`indicfm.tokenizer.load`)."""
        return self.tokenizer_file.load()

    @property
    def config(self) -> dict:
        """The resolved run config (as JSON-like dict) saved with the checkpoint."""
        return self.meta.config or {}


def inference_mesh(tensor: int = 1, expert: int = 1, devices: list | None = None) -> jax.sharding.Mesh:
    """A mesh of ``tensor`` x ``expert`` devices (default: the first local device alone).

    Generation runs one batch at a time, so extra data-parallel replicas would only repeat the same
    work; more devices are worth using only to split a model too big for one (heads and MLP widths
    over ``tensor``, experts over ``expert``).
    """
    from indicfm.config import MeshConfig
    from indicfm.sharding import make_mesh

    wanted = tensor * expert
    devices = list(jax.local_devices() if devices is None else devices)
    if wanted > len(devices):
        raise ValueError(f"tensor={tensor} x expert={expert} needs {wanted} devices; this process has {len(devices)}")
    return make_mesh(MeshConfig(data=1, fsdp=1, expert=expert, tensor=tensor), devices[:wanted])


def read_checkpoint_meta(workdir: str | Path, step: int | None = None) -> tuple[int, CheckpointMeta]:
    """``(step, meta)`` of a run's checkpoint without reading any array (step None = the newest)."""
    _, step, meta = read_meta(workdir, step)
    return step, meta


def load_for_inference(
    workdir: str | Path,
    step: int | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> LoadedModel:
    """Restore step ``step`` (default: the newest) of the run in ``workdir`` for inference.

    The model is built from :func:`~indicfm.inference.decode.inference_config` of the saved config
    and its parameters are placed on ``mesh`` (default: :func:`inference_mesh`).  The tokenizer is
    the copy stored *in the checkpoint* (checked against its sha256).
    """
    from indicfm.inference.decode import inference_config
    from indicfm.train.checkpoint import stored_tokenizer

    saved = restore_model(workdir, mesh or inference_mesh(), step=step, adapt=inference_config)
    step = saved.step
    if not saved.tokenizer:
        raise ValueError(f"checkpoint {saved.directory / str(step)} holds no tokenizer")
    try:
        tokenizer_file = stored_tokenizer(saved.tokenizer)
    except ValueError as err:
        raise ValueError(f"checkpoint {saved.directory / str(step)}: {err}") from None
    return LoadedModel(saved.model, saved.saved_model_config, saved.meta, step, tokenizer_file, saved.directory)
