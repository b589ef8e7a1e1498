"""Make sure a run has its tokenizer and token cache, building them in the workdir if the config
names none (that is what lets ``configs/quickstart.yaml`` work from a fresh checkout).

* ``tokenizer.model_file`` unset → train one from ``data.inputs`` into ``<workdir>/tokenizer/``
  (reused when it is already there).
* ``data.cache_dir`` unset → ``<workdir>/data``.  A complete cache (its ``metadata.json`` exists) is
  used as it is; otherwise ``indicfm.data.prepare`` builds it (or resumes an interrupted build).

Relative input paths are tried from the current directory first, then as the files indicfm ships
(:mod:`indicfm.package_data`), so ``samples/train`` works wherever the command is started, from a
source checkout or a wheel.  With several processes only process 0
builds (the workdir must be on a shared file system); the others wait for it.
"""

from __future__ import annotations

from pathlib import Path

import jax

from indicfm.config import Config
from indicfm.package_data import resolve_path
from indicfm.storage import as_path, fresh


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def ensure_tokenizer_and_cache(cfg: Config, workdir: Path, *, progress: bool = True, console=None) -> Config:
    """Return ``cfg`` with ``tokenizer.model_file`` and ``data.cache_dir`` pointing at files that exist."""
    workdir = Path(workdir)
    inputs = [str(resolve_path(p)) for p in cfg.data.inputs]
    tokenizer_file = cfg.tokenizer.model_file
    if tokenizer_file:
        tokenizer_file = str(resolve_path(tokenizer_file))
        if not as_path(tokenizer_file).is_file():
            raise FileNotFoundError(f"tokenizer.model_file: {tokenizer_file} does not exist")
    else:
        if not inputs:
            raise ValueError("tokenizer.model_file is not set and data.inputs is empty: nothing to train a tokenizer on")
        prefix = workdir / "tokenizer" / "tokenizer"
        tokenizer_file = str(prefix.with_name("tokenizer.model"))
        if jax.process_index() == 0 and not Path(tokenizer_file).is_file():
            from indicfm.tokenizer.train import train_tokenizer

            if console is not None:
                console.print(f"training a {cfg.tokenizer.vocab_size:,}-piece tokenizer on {', '.join(inputs)}")
            train_tokenizer(inputs, prefix, cfg.tokenizer, progress=progress)
        _sync("indicfm_tokenizer_ready")

    cache_dir = str(resolve_path(cfg.data.cache_dir)) if cfg.data.cache_dir else str(workdir / "data")
    complete = (fresh(as_path(cache_dir)) / "metadata.json").is_file()  # written last by prepare: the cache is whole
    if jax.process_index() == 0 and not complete:
        if not (inputs or cfg.data.hub):
            raise FileNotFoundError(f"data.cache_dir: {cache_dir} holds no complete token cache and data.inputs is empty")
        from indicfm.data.prepare import prepare

        prepare(inputs, tokenizer_file, cache_dir, config=cfg.data, show_progress=progress, console=console)
    _sync("indicfm_cache_ready")

    data = cfg.data.model_copy(update={"cache_dir": cache_dir, "inputs": inputs})
    tokenizer = cfg.tokenizer.model_copy(update={"model_file": tokenizer_file})
    return cfg.model_copy(update={"data": data, "tokenizer": tokenizer})
