"""Helpers shared by several test modules (import as ``from helpers import ...``; pytest puts
``tests/`` on ``sys.path``)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from indicfm.model.config import ModelConfig
from indicfm.model.transformer import Transformer


def random_model(cfg: ModelConfig, seed: int) -> Transformer:
    """A model with NumPy-drawn random weights (no XLA compilation, unlike the real initialiser):
    matrices ~ N(0, 0.15²), norm scales ~ 1 + N(0, 0.3²) so a misplaced norm weight shows."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        value = 1.0 + 0.3 * noise if len(leaf.shape) == 1 else 0.15 * noise
        return jnp.asarray(value, leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def cpu_process_env(devices: int, process_id: int | None = None, port: int | None = None) -> dict[str, str]:
    """The environment of a child JAX process on ``devices`` fake CPU devices: one process alone, or
    (``process_id``, ``port``) one of two that ``jax.distributed`` joins through 127.0.0.1:``port``.
    The parent's JAX_*/SLURM_*/INDICFM_* settings are dropped so nothing of this process leaks in."""
    import os

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "INDICFM_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    if process_id is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a local jax.distributed coordinator, a test server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_results(procs: list[subprocess.Popen], timeout: float) -> list[dict]:
    """Wait for every process (killing stragglers), check each exited 0, and parse the JSON each
    printed on its ``RESULT `` line."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = []
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
        line = next(l for l in out.splitlines() if l.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
    return results


def tokenizer_and_cache(
    root: Path, sample_train_dir: Path, langs: list[str], settings: list[str], config_file: str | None = None
) -> list[str]:
    """Build a tokenizer and token cache under ``root`` from ``langs`` of the shipped sample (the
    training loop's own ``ensure_tokenizer_and_cache``); return the ``--set`` lines naming them."""
    from indicfm.config import load_config
    from indicfm.train.inputs import ensure_tokenizer_and_cache

    src = root / "text"
    src.mkdir()
    for lang in langs:
        (src / f"{lang}.txt").write_bytes((sample_train_dir / f"{lang}.txt").read_bytes())
    cfg = ensure_tokenizer_and_cache(load_config(config_file, settings + [f"data.inputs=[{src}]"]), root, progress=False)
    return [f"tokenizer.model_file={cfg.tokenizer.model_file}", f"data.cache_dir={cfg.data.cache_dir}"]


def akshara_splits(text: str, surfaces: list[str]) -> tuple[int, int]:
    """(grapheme clusters of ``text``, how many of them a token boundary cuts), given the tokens'
    surface strings in order (they must join to ``text``).  Independent of tokenizer/evaluate.py:
    token ends from the surfaces' lengths, clusters from regex ``\\X``."""
    import regex

    ends, pos = set(), 0
    for surface in surfaces[:-1]:
        pos += len(surface)
        ends.add(pos)
    clusters = split = start = 0
    for g in regex.findall(r"\X", text):
        clusters += 1
        split += any(start < e < start + len(g) for e in ends)
        start += len(g)
    return clusters, split


def read_losses(workdir: str | Path) -> dict[int, float]:
    """step → loss from ``<workdir>/metrics.jsonl`` (the last record of a step wins)."""
    losses: dict[int, float] = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[int(record["step"])] = float(record["loss"])
    return losses
