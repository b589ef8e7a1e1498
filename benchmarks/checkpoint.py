"""Checkpoint benchmark: how long an asynchronous save blocks the training loop, and restore time.

* **save stall ÷ step time** (goal ≤ 2 %): the train loop calls ``Checkpointer.save`` between two
  steps; on one process that only dispatches an on-device copy of the state and queues the Orbax
  call for a worker thread, then training continues (see ``indicfm/train/checkpoint.py``).
  ``stall_per_save_over_step_time`` is the median time one save blocks the loop (the call plus the
  slow-down of the next step, see ``measure_stall``) ÷ the median undisturbed step time;
  ``stall_share_of_training_time_every_100_steps`` spreads it over the default
  ``checkpoint.every_steps = 100`` steps.  The ``orbax_only_*`` figures are the same measurement
  with Orbax called on the training thread (its own async save, as with several processes).
* **restore time** of the full train state (parameters + AdamW moments + router bias + RNG) of a
  model config, read back into its target shardings.

``run(quick=True)`` uses ``tiny-moe`` for both (a few minutes on 2 CPU cores); ``quick=False`` times
the step and stall with ``tiny-moe`` and restores the ``small-moe`` state (~1.0 B parameters, ~12 GB
with Adam moments: needs that much free memory and disk).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from indicfm.config import CONFIG_DIR, MeshConfig, load_config


def _state_for(model_cfg, mesh):
    from indicfm.sharding import create_model
    from indicfm.train.config import OptimizerConfig
    from indicfm.train.optimizer import learning_rate_schedule, make_optimizer
    from indicfm.train.step import init_train_state

    opt_cfg = OptimizerConfig()
    tx = make_optimizer(opt_cfg, 1000, 5)
    graphdef, state, shardings = init_train_state(create_model(model_cfg, mesh, 0), tx, 0, mesh)
    return graphdef, tx, learning_rate_schedule(opt_cfg, 1000), state, shardings


def measure_stall(
    model_cfg, seq_len: int, batch_size: int, steps: int, saves: int, workdir: Path, *, save_thread: bool = True
) -> dict:
    """Median step time, and how long one save blocks the loop (same process, same load).

    Blocked time of one save = the ``Checkpointer.save`` call (which includes waiting for the previous
    save's set-up) + how much longer the step right after it takes than an undisturbed step (the
    background work competes with training for the CPU and the GIL; counted as 0 when not slower).
    ``final_wait_s`` is what ``close()`` then waits for the last save to reach the disk (the end of
    a run, not a stall between steps).  The items are the real ones: arrays, JSON metadata and a
    512 KiB tokenizer file.
    """
    from indicfm.sharding import batch_sharding, make_mesh
    from indicfm.train.checkpoint import Checkpointer, tokenizer_item
    from indicfm.train.config import CheckpointConfig
    from indicfm.train.step import jit_train_step, make_train_step

    mesh = make_mesh(MeshConfig(data=-1))
    graphdef, tx, schedule, state, shardings = _state_for(model_cfg, mesh)
    data = batch_sharding(mesh)
    step_fn = jit_train_step(make_train_step(graphdef, tx, schedule), shardings, data)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, model_cfg.vocab_size, (batch_size, seq_len)).astype(np.int32)
    batch = {
        "tokens": jax.device_put(tokens, data),
        "segment_ids": jax.device_put(np.ones_like(tokens), data),
        "positions": jax.device_put(np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)), data),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tokenizer.model").write_bytes(rng.bytes(512 * 1024))
    tokenizer = tokenizer_item(workdir / "tokenizer.model")
    meta = {"loader": {"step": 0, "seed": 0}, "config": {"model": model_cfg.model_dump(mode="json")}}
    checkpointer = Checkpointer(workdir / "checkpoints", CheckpointConfig(every_steps=1, keep_last=2), save_thread=save_thread)
    every = max(1, steps // saves)
    with jax.set_mesh(mesh):
        state, metrics = step_fn(state, batch)  # compile
        jax.block_until_ready(metrics)
        checkpointer.save(0, state, meta, tokenizer)  # first save compiles the copy, starts Orbax's threads
        checkpointer.wait()
        quiet_steps, steps_after_save, save_calls = [], [], []
        just_saved = False
        for i in range(steps):
            start = time.perf_counter()
            state, metrics = step_fn(state, batch)
            jax.block_until_ready(metrics)
            (steps_after_save if just_saved else quiet_steps).append(time.perf_counter() - start)
            just_saved = i % every == 0 and len(save_calls) < saves
            if just_saved:
                start = time.perf_counter()
                checkpointer.save(i + 1, state, meta, tokenizer)
                save_calls.append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpointer.close()
        final_wait_s = time.perf_counter() - start
    step_s = statistics.median(quiet_steps)
    call_s = statistics.median(save_calls)
    slowdown_s = max(0.0, statistics.median(steps_after_save) - step_s) if steps_after_save else 0.0
    stall_s = call_s + slowdown_s
    return {
        "step_s": round(step_s, 4),
        "save_call_s": round(call_s, 4),
        "next_step_slowdown_s": round(slowdown_s, 4),
        "save_stall_s": round(stall_s, 4),
        "stall_per_save_over_step_time": round(stall_s / step_s, 4),
        "goal_stall_per_save_le_2pct": bool(stall_s / step_s <= 0.02),
        "stall_share_of_training_time_every_100_steps": round(stall_s / (100 * step_s), 5),
        "final_wait_s": round(final_wait_s, 4),
    }


def measure_restore(model_cfg, workdir: Path, repeats: int = 2) -> dict:
    """Save the full train state once, then time restoring it into freshly described shardings."""
    from indicfm.sharding import make_mesh
    from indicfm.train.checkpoint import Checkpointer
    from indicfm.train.config import CheckpointConfig
    from indicfm.train.step import abstract_train_state

    mesh = make_mesh(MeshConfig(data=-1))
    _, tx, _, state, _ = _state_for(model_cfg, mesh)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    # Orbax directly (no on-device snapshot for the worker thread): the state is not trained on
    # afterwards, and a snapshot would double the memory of a multi-GB state.
    checkpointer = Checkpointer(workdir, CheckpointConfig(every_steps=1), save_thread=False)
    checkpointer.save(1, state, {"loader": {}})
    checkpointer.close()
    del state
    times = []
    for _ in range(repeats):
        _, target, _ = abstract_train_state(model_cfg, tx, 0, mesh)
        start = time.perf_counter()
        restored = Checkpointer(workdir, CheckpointConfig()).restore_latest_good(target)
        jax.block_until_ready(jax.tree.leaves(restored.state))
        times.append(time.perf_counter() - start)
        del restored
    seconds = min(times)
    return {
        "restore_s": round(seconds, 3),
        "state_gb": round(state_bytes / 1e9, 3),
        "restore_gb_per_s": round(state_bytes / 1e9 / seconds, 3),
    }


def run(quick: bool) -> dict:
    tiny = load_config(CONFIG_DIR / "model" / "tiny-moe.yaml").model
    big = tiny if quick else load_config(CONFIG_DIR / "model" / "small-moe.yaml").model
    root = Path(tempfile.mkdtemp(prefix="indicfm-bench-ckpt-"))
    try:
        figures = {"stall_model": "tiny-moe", "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}"}
        stall_args = dict(seq_len=128, batch_size=16, steps=10 if quick else 30, saves=3)
        figures.update(measure_stall(tiny, **stall_args, workdir=root / "stall"))
        # the same with Orbax called on the training thread (its own async save only), for comparison
        orbax_only = measure_stall(tiny, **stall_args, workdir=root / "stall-orbax-only", save_thread=False)
        figures.update({f"orbax_only_{k}": v for k, v in orbax_only.items() if k != "goal_stall_per_save_le_2pct"})
        figures["restore_model"] = "tiny-moe" if quick else "small-moe"
        figures.update(measure_restore(big, root / "restore"))
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    main()
