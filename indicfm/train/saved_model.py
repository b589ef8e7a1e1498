"""A model's parameters from a run directory: where its checkpoints are, and restoring only the
parameters, onto any mesh, in either parameter layout.

Three users share this: inference and export (``indicfm generate``, ``export hf``), a run that
starts from another run's parameters (``trainer.init_from``), and upcycling.  A run directory holds
training checkpoints under ``<workdir>/<checkpoint.dir_name>/<step>/`` (the whole train state) and,
when it was made by ``indicfm import hf`` or ``indicfm upcycle``, initial parameters under
``<workdir>/initial/0/`` (parameters and non-parameter model state only, no optimizer).  The newest
training checkpoint wins; the initial parameters are used until training saved one.

Only ``params`` and ``model_state`` are read (Orbax's partial restore), each array straight into
the sharding the rules table gives it on the target mesh; the optimizer moments, twice the size of
the parameters, are never read.  A checkpoint saved in the other parameter layout (scanned vs
unrolled) is restored in its own layout and converted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
from flax import nnx

from indicfm.model.config import RUN_SETTINGS, ModelConfig
from indicfm.train.checkpoint_meta import CheckpointMeta

DEFAULT_CHECKPOINT_DIR = "checkpoints"
#: where `indicfm import hf` and `indicfm upcycle` write a run's starting parameters (step 0)
INITIAL_DIR = "initial"


class CheckpointNotFound(FileNotFoundError):
    """No usable checkpoint where one was expected (the message says where and what exists)."""


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


def _has_steps(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def parameter_directory(path: str | Path) -> tuple[Path, int | None]:
    """``(checkpoint directory, step or None for the newest)`` that ``path`` names: a run directory
    (its newest training checkpoint, else its initial parameters), a checkpoint directory, or one
    step's directory inside one."""
    path = Path(path).resolve()
    if path.name.isdigit() and (path / "meta").exists():  # one step of a checkpoint directory
        return path.parent, int(path.name)
    if _has_steps(path) and not (path / "config.yaml").is_file():
        return path, None
    trained = checkpoint_directory(path).resolve()
    if _has_steps(trained):
        return trained, None
    if _has_steps(path / INITIAL_DIR):
        return (path / INITIAL_DIR).resolve(), None
    raise CheckpointNotFound(
        f"{path}: no checkpoint there (looked for training checkpoints in {trained} and initial parameters in "
        f"{path / INITIAL_DIR}; has `indicfm train`, `import hf` or `upcycle` written this run?)"
    )


def _open(directory: Path) -> Any:
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))


def _choose_step(directory: Path, manager: Any, step: int | None) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointNotFound(f"{directory} holds no checkpoint")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointNotFound(f"{directory} has no checkpoint for step {step}; available: {steps}")
    return step


def read_meta(path: str | Path, step: int | None = None) -> tuple[Path, int, CheckpointMeta]:
    """``(checkpoint directory, step, meta)`` without reading any array (step None = the newest); the
    metadata must hold the resolved config (a :class:`CheckpointMetaError` naming the checkpoint if not)."""
    from indicfm.train.checkpoint import restore_meta

    directory, named_step = parameter_directory(path)
    with _open(directory) as manager:
        step = _choose_step(directory, manager, step if step is not None else named_step)
        meta = restore_meta(manager, directory, step)
    meta.saved_model_config()  # every reader of a run's parameters needs it: refuse here, before any array
    return directory, step, meta


@dataclass
class SavedModel:
    """A model restored from a checkpoint, with what was saved beside it."""

    model: Any  # indicfm.model.transformer.Transformer
    saved_model_config: ModelConfig  # the config the parameters were saved with
    meta: CheckpointMeta
    step: int
    tokenizer: dict | None  # the checkpoint's tokenizer item (indicfm.train.checkpoint.tokenizer_item)
    directory: Path


def _same_parameters(saved: ModelConfig, wanted: ModelConfig) -> list[str]:
    """Fields that change the parameters' shapes or meaning (not dtypes, kernels or layout)."""
    free = {*RUN_SETTINGS, "max_seq_len"}
    a, b = saved.model_dump(), wanted.model_dump()
    return [k for k in a if k not in free and a[k] != b[k]]


def restore_model(
    path: str | Path,
    mesh: jax.sharding.Mesh,
    model_cfg: ModelConfig | None = None,
    *,
    step: int | None = None,
    rules: Any = None,
    adapt: Callable[[ModelConfig], ModelConfig] | None = None,
) -> SavedModel:
    """The model saved at ``path`` (see :func:`parameter_directory`), placed on ``mesh``.

    ``model_cfg``: the config to build (default: the saved one, or ``adapt`` of it, e.g. serving
    settings); it must describe the same parameters (a different kernel, dtype, remat or layout is fine, a different shape is an error
    naming the keys).
    """
    import orbax.checkpoint as ocp

    from indicfm.model.layout import placed_with_layout
    from indicfm.model.transformer import Transformer
    from indicfm.sharding import state_shardings

    directory, step, meta = read_meta(path, step)
    saved_cfg = meta.saved_model_config()
    wanted = model_cfg or (adapt(saved_cfg) if adapt else saved_cfg)
    differ = _same_parameters(saved_cfg, wanted)
    if differ:
        raise ValueError(
            f"checkpoint {directory / str(step)} was saved with different model settings: "
            + ", ".join(f"model.{k}={getattr(saved_cfg, k)!r} (asked: {getattr(wanted, k)!r})" for k in differ)
        )
    # restore in the layout the checkpoint has, then convert
    as_saved = wanted.model_copy(update={"scan_layers": meta.param_layout == "scanned"})
    abstract_model = nnx.eval_shape(lambda: Transformer(as_saved, rngs=nnx.Rngs(0)))
    graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
    target = {"params": params, "model_state": model_state}
    shardings = state_shardings(target, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    with _open(directory) as manager:
        items = {"state": ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract), partial_restore=True)}
        if (directory / str(step) / "tokenizer").exists():
            items["tokenizer"] = ocp.args.JsonRestore()
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    model = nnx.merge(graphdef, restored["state"]["params"], restored["state"]["model_state"])
    model = placed_with_layout(model, wanted.scan_layers, mesh, rules)
    model.cfg = wanted  # a dense model is the same in either layout: its config says what was asked
    return SavedModel(model, saved_cfg, meta, step, dict(restored["tokenizer"]) if "tokenizer" in restored else None,
                      directory)
