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
from flax import nnx

from indicfm.model.config import ModelConfig

DEFAULT_CHECKPOINT_DIR = "checkpoints"


class CheckpointNotFound(FileNotFoundError):
    """No usable checkpoint where one was expected (the message says where and what exists)."""


@dataclass
class LoadedModel:
    """What inference needs from a training run."""

    model: Any  # indicfm.model.transformer.Transformer built from inference_config(train config)
    train_model_config: ModelConfig  # the config it was trained with
    meta: dict  # the checkpoint's JSON metadata (resolved config, step, tokenizer sha256, ...)
    step: int
    tokenizer_bytes: bytes  # the checkpoint's own SentencePiece .model file
    checkpoint_dir: Path

    def sentencepiece(self) -> Any:
        """The checkpoint's tokenizer as a ``sentencepiece.SentencePieceProcessor``."""
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_proto=self.tokenizer_bytes)

    @property
    def config(self) -> dict:
        """The resolved run config (as JSON-like dict) saved with the checkpoint."""
        return self.meta.get("config", {})


def checkpoint_directory(workdir: str | Path) -> Path:
    """``<workdir>/<checkpoint.dir_name>``; the directory name is read from ``<workdir>/config.yaml``
    when the run saved one (``indicfm train`` does), else the default ``checkpoints``."""
    workdir = Path(workdir)
    dir_name = DEFAULT_CHECKPOINT_DIR
    saved = workdir / "config.yaml"
    if saved.is_file():
        import yaml

        data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        dir_name = (data.get("checkpoint") or {}).get("dir_name") or dir_name
    return workdir / dir_name


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


def _open_manager(workdir: str | Path):
    import orbax.checkpoint as ocp

    directory = checkpoint_directory(workdir).resolve()
    if not directory.is_dir():
        raise CheckpointNotFound(f"no checkpoint directory {directory} (has `indicfm train --workdir {workdir}` run?)")
    return directory, ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))


def _choose_step(directory: Path, manager: Any, step: int | None) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointNotFound(f"{directory} holds no checkpoint")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointNotFound(f"{directory} has no checkpoint for step {step}; available: {steps}")
    return step


def read_checkpoint_meta(workdir: str | Path, step: int | None = None) -> tuple[int, dict]:
    """``(step, meta)`` of a checkpoint without reading any array (step None = the newest)."""
    import orbax.checkpoint as ocp

    directory, manager = _open_manager(workdir)
    with manager:
        step = _choose_step(directory, manager, step)
        meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    if "config" not in meta or "model" not in meta["config"]:
        raise ValueError(f"checkpoint {directory / str(step)}: its metadata has no resolved config")
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
    import orbax.checkpoint as ocp

    from indicfm.inference.decode import inference_config
    from indicfm.model.transformer import Transformer
    from indicfm.sharding import state_shardings
    from indicfm.train.checkpoint import tokenizer_bytes

    directory, manager = _open_manager(workdir)
    with manager:
        step = _choose_step(directory, manager, step)
        side = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore()))
        meta = dict(side["meta"])
        if "config" not in meta or "model" not in meta["config"]:
            raise ValueError(f"checkpoint {directory / str(step)}: its metadata has no resolved config")
        train_cfg = ModelConfig(**meta["config"]["model"])
        cfg = inference_config(train_cfg)

        abstract_model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
        mesh = mesh or inference_mesh()
        target = {"params": params, "model_state": model_state}
        shardings = state_shardings(target, mesh)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
            ),
        )["state"]
    model = nnx.merge(graphdef, restored["params"], restored["model_state"])

    tokenizer = side.get("tokenizer")
    if not tokenizer:
        raise ValueError(f"checkpoint {directory / str(step)} holds no tokenizer")
    try:
        tokenizer_file = tokenizer_bytes(tokenizer)
    except ValueError as err:
        raise ValueError(f"checkpoint {directory / str(step)}: {err}") from None
    return LoadedModel(model, train_cfg, meta, step, tokenizer_file, directory)
