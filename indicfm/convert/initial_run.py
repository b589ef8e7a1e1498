"""Write a run directory that starts from given parameters (what `import hf` and `upcycle` produce).

Layout of ``WORKDIR``:

* ``initial/0/`` — an Orbax checkpoint (the format ``indicfm train`` writes) of the parameters and
  non-parameter model state only, with the resolved config, the parameter layout and where the
  parameters came from in its ``meta``, and the tokenizer file when there is one;
* ``tokenizer/`` — the source's tokenizer files, as found;
* ``config.yaml`` — the run's config with ``trainer.init_from: initial``, so
  ``indicfm train --workdir WORKDIR`` starts from these parameters with a fresh optimizer and the
  schedule from step 0 (warm-up included), and later resumes from its own checkpoints.

Nothing a later command would mistake for a finished run is left by a failure: the parameters go
to ``initial.partial/`` first and are renamed to ``initial/`` when the checkpoint is complete;
``config.yaml`` is written last.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from indicfm.convert.hf_arch import ConversionError
from indicfm.storage import read_bytes
from indicfm.train.saved_model import INITIAL_DIR, checkpoint_directory

PARTIAL_SUFFIX = ".partial"


def check_output(workdir: Path, overwrite: bool) -> None:
    """Refuse to write over a run that already holds parameters (``overwrite`` clears them)."""
    existing = [p for p in (workdir / INITIAL_DIR, checkpoint_directory(workdir)) if p.exists() and any(p.iterdir())]
    if existing and not overwrite:
        raise ConversionError(
            f"{workdir} already holds a run ({', '.join(map(str, existing))}); choose another --output or pass --overwrite"
        )
    for path in existing + [workdir / (INITIAL_DIR + PARTIAL_SUFFIX)]:
        shutil.rmtree(path, ignore_errors=True)
    (workdir / "config.yaml").unlink(missing_ok=True)


def write_initial_run(
    workdir: Path,
    cfg: Any,
    model: Any,
    *,
    source: dict,
    tokenizer_files: Sequence[Path] = (),
    tokenizer_model_file: Path | None = None,
) -> Path:
    """Save ``model``'s parameters as ``workdir``'s starting point and write its ``config.yaml``.

    ``cfg``: the run's :class:`~indicfm.config.Config` (its model section must be ``model.cfg``);
    ``tokenizer_files`` (local or in a bucket) are copied into ``workdir/tokenizer/``;
    ``tokenizer_model_file`` (one of them, or None) is stored in the checkpoint as the run's tokenizer.
    """
    from flax import nnx

    from indicfm.config import save_config
    from indicfm.model.transformer import param_layout
    from indicfm.train.checkpoint import Checkpointer, tokenizer_item
    from indicfm.train.checkpoint_meta import CheckpointMeta
    from indicfm.train.config import CheckpointConfig

    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = workdir / "tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    copied = {}
    for file in tokenizer_files:
        copied[str(file)] = tokenizer_dir / file.name
        copied[str(file)].write_bytes(read_bytes(file))
    stored_tokenizer = copied[str(tokenizer_model_file)] if tokenizer_model_file else None
    updates: dict[str, Any] = {"init_from": INITIAL_DIR}
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update=updates)})
    if stored_tokenizer is not None:
        cfg = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"model_file": str(stored_tokenizer)})})

    _, params, model_state = nnx.split(model, nnx.Param, ...)
    tokenizer = tokenizer_item(stored_tokenizer) if stored_tokenizer else None
    meta = CheckpointMeta(
        step=0,
        config=cfg.model_dump(mode="json"),
        # which tokenizer these parameters' rows belong to, as `indicfm train` records it
        tokenizer_sha256=tokenizer["sha256"] if tokenizer else None,
        param_layout=param_layout(cfg.model),
        seed=cfg.trainer.seed,
        source=source,
    )
    partial = workdir / (INITIAL_DIR + PARTIAL_SUFFIX)
    checkpointer = Checkpointer(partial, CheckpointConfig(async_save=False))
    try:
        checkpointer.save(0, {"params": params, "model_state": model_state}, meta, tokenizer)
    finally:
        checkpointer.close()
    partial.rename(workdir / INITIAL_DIR)
    save_config(cfg, workdir / "config.yaml")
    return workdir
