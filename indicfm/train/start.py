"""Where a training run's state comes from, decided once, and the one function that builds it.

A call of ``indicfm train`` starts from one of three sources (:data:`StartSource`):

* :class:`Resume` — the run's own newest checkpoint that reads back whole (damaged ones are set
  aside, see :meth:`~indicfm.train.checkpoint.Checkpointer.restore_latest_good`): parameters,
  optimizer moments, RNG, the step and the data loader's position, so the run continues exactly;
* :class:`FromCheckpoint` — ``trainer.init_from``: the parameters of another checkpoint (a run
  made by ``indicfm import hf`` or ``indicfm upcycle``, another training run, or one step of one),
  restored straight into this run's sharding and parameter layout, with a fresh optimizer, step 0
  and the schedule from its start;
* :class:`Fresh` — random initialisation, every parameter born in its sharding.

:func:`choose_start` decides which from the config and the checkpoints on disk;
:func:`start_state` builds the state from it and says in one line where the run started.  A
:class:`Resume` whose checkpoints all turn out damaged falls back to what the run would have
started from without them (``Resume.otherwise``), as a crash before the first save would.  The
training loop knows nothing of these cases: it gets a :class:`Started`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import jax
import optax

from indicfm.sharding import Rules
from indicfm.train.checkpoint_meta import CheckpointMeta
from indicfm.train.state import TrainState, create_model, init_train_state


@dataclass(frozen=True)
class Fresh:
    """Random parameters (``trainer.seed``), a fresh optimizer, step 0."""


@dataclass(frozen=True)
class FromCheckpoint:
    """The parameters ``trainer.init_from`` names (resolved against the workdir), a fresh optimizer, step 0."""

    path: Path


@dataclass(frozen=True)
class Resume:
    """This run's own checkpoints in ``directory``; ``otherwise``: the start if none reads back."""

    directory: Path
    otherwise: Union[Fresh, FromCheckpoint]


StartSource = Union[Fresh, FromCheckpoint, Resume]


class TokenizerChanged(ValueError):
    """The checkpoint being resumed, or the one `trainer.init_from` names, was made with another tokenizer than the run's."""


@dataclass
class Started:
    """The state a run starts from, and what the loop needs to know about where it came from."""

    graphdef: Any  # nnx.GraphDef of the model
    state: TrainState
    step: int  # optimizer updates already done (0 unless resumed)
    loader_state: dict[str, Any] | None  # the data loader's position to restore (resumed runs only)
    description: str  # one readable line: where the state came from
    resumed: bool = False
    damaged_checkpoints: list[int] = field(default_factory=list)
    meta: CheckpointMeta | None = None  # the metadata of the checkpoint read, if one was


def init_from_path(cfg: Any, workdir: str | Path) -> Path | None:
    """``trainer.init_from`` as a path (relative ones are relative to the workdir), or None."""
    if not cfg.trainer.init_from:
        return None
    path = Path(cfg.trainer.init_from)
    return path if path.is_absolute() else Path(workdir) / path


def choose_start(cfg: Any, workdir: str | Path, checkpointer: Any) -> StartSource:
    """Where this call of a run starts: its own checkpoints if it has any, else ``trainer.init_from``,
    else random initialisation.  Reads only the list of saved steps."""
    init_from = init_from_path(cfg, workdir)
    initial: Fresh | FromCheckpoint = FromCheckpoint(init_from) if init_from is not None else Fresh()
    if checkpointer.steps():
        return Resume(Path(checkpointer.directory), otherwise=initial)
    return initial


def _origin(meta: CheckpointMeta) -> str:
    """What a checkpoint's ``source`` says about where its parameters came from (import, upcycle)."""
    source = meta.source or {}
    if "hf" in source:
        return f", imported from {source['hf']} ({source.get('architecture', '?')})"
    if "upcycled_from" in source:
        return f", upcycled from {source['upcycled_from']} step {source.get('step', '?')} (granularity {source.get('granularity', 1)})"
    return ""


def _check_tokenizer(meta: CheckpointMeta, tokenizer_sha256: str, cfg: Any, checkpoint: str, *, init_from: bool = False) -> None:
    """Raise :class:`TokenizerChanged` when ``meta`` records another tokenizer than the run's: the ids
    of one tokenizer mean other text under another, so the embedding rows would be read wrongly.
    ``checkpoint`` names the checkpoint in the message (``init_from``: the one ``trainer.init_from`` names)."""
    saved_sha = meta.tokenizer_sha256
    if not saved_sha or saved_sha == tokenizer_sha256:
        return
    if init_from:
        lead, advice = f"trainer.init_from: {checkpoint} was made", (
            " (give a run a new vocabulary with `indicfm import tokenizer`, which initialises the new rows)")
    else:
        lead, advice = f"the checkpoint {checkpoint} was trained", ""
    raise TokenizerChanged(
        f"{lead} with tokenizer sha256 {saved_sha}, but {cfg.tokenizer.model_file} has sha256 {tokenizer_sha256}{advice}"
    )


def start_state(
    source: StartSource,
    cfg: Any,
    *,
    workdir: Path,
    mesh: jax.sharding.Mesh,
    rules: Rules | None,
    tx: optax.GradientTransformation,
    abstract: tuple[Any, TrainState],
    checkpointer: Any,
    tokenizer_sha256: str,
    warn: Callable[[str], None],
    restoring: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Started:
    """The train state ``source`` describes, on ``mesh``.

    ``abstract``: ``(graphdef, abstract train state)`` from :func:`~indicfm.train.state.abstract_train_state`
    (the restore target of a resume); ``restoring()``: a context wrapped around each checkpoint read
    (the loop labels it ``restore`` in its goodput breakdown).  A resume whose checkpoint was trained
    with another tokenizer raises :class:`TokenizerChanged`; a checkpoint in the other parameter
    layout raises :class:`~indicfm.train.checkpoint.LayoutMismatch`.
    """
    from indicfm.model.transformer import param_layout

    seed = cfg.trainer.seed
    if isinstance(source, Resume):
        graphdef, abstract_state = abstract
        with restoring():
            restored = checkpointer.restore_latest_good(abstract_state, warn=warn, param_layout=param_layout(cfg.model))
        if restored is not None:
            _check_tokenizer(restored.meta, tokenizer_sha256, cfg, f"at step {restored.step} in {checkpointer.directory}")
            return Started(
                graphdef, restored.state, restored.step, dict(restored.meta.loader),
                f"resuming from step {restored.step} ({checkpointer.directory / str(restored.step)})",
                resumed=True, damaged_checkpoints=restored.skipped_damaged, meta=restored.meta,
            )
        source = source.otherwise  # every checkpoint was damaged (restore_latest_good warned and set them aside)

    meta = None
    if isinstance(source, FromCheckpoint):
        from indicfm.train.saved_model import read_meta, restore_model

        with restoring():  # reading another run's or an imported model's parameters is restore time
            directory, step, meta = read_meta(source.path)  # no array yet: refuse a wrong tokenizer first
            _check_tokenizer(meta, tokenizer_sha256, cfg, str(directory / str(step)), init_from=True)
            saved = restore_model(source.path, mesh, cfg.model, step=step, rules=rules)
        model, meta = saved.model, saved.meta
        origin = f"the parameters of {saved.directory / str(saved.step)} (trainer.init_from{_origin(meta)})"
    else:
        model, origin = create_model(cfg.model, mesh, seed, rules), "random initialisation"
    graphdef, state, _ = init_train_state(model, tx, seed, mesh, rules)
    return Started(graphdef, state, 0, None, f"starting a fresh run in {workdir} from {origin}", meta=meta)
