"""Checkpoint benchmark: how long an asynchronous save blocks the training loop, and restore time.

* **save stall ÷ step time** (goal ≤ 2 %): the train loop calls ``Checkpointer.save`` between two
  steps; on one process that only dispatches an on-device copy of the state and queues the Orbax
  call for an idle-priority worker thread, then training continues (see
  ``indicfm/train/checkpoint.py``).  ``stall_per_save_over_step_time`` is the mean over saves (with
  its standard error) of the time one save blocks the loop — the call plus the summed slow-down of
  every step the save overlapped, see ``measure_stall`` — ÷ the undisturbed step time around it
  (``save_call_over_step_time``: the call alone, the only time the loop itself waits; on a CPU-only
  host the slow-down of the overlapped steps is the save's work sharing the cores with training,
  and it varies by tens of percent of a step between saves on a shared machine);
  ``stall_share_of_training_time_every_100_steps`` spreads it over the default
  ``checkpoint.every_steps = 100`` steps.  The ``orbax_only_*`` figures are the same measurement
  with Orbax called on the training thread (its own async save, as with several processes).
* **restore time** of the full train state (parameters + AdamW moments + router bias + RNG) of a
  model config, read back into its target shardings in a fresh process, as a resuming run does.

``run(quick=True)`` uses ``tiny-moe`` for both (a few minutes on 2 CPU cores); ``quick=False`` times
the stall with ``tiny-moe`` over more saves and restores the ``small-moe`` state (~1.0 B parameters,
12.1 GB with Adam moments: needs ~14 GB free memory and 12 GB disk, else it says so and skips it).
``--restore-only`` runs just the restore part.
"""

from __future__ import annotations

import multiprocessing
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import jax
import numpy as np

from indicfm.config import CONFIG_DIR, MeshConfig, load_config


def _optimizer():
    from indicfm.train.config import OptimizerConfig
    from indicfm.train.optimizer import learning_rate_schedule, make_optimizer

    opt_cfg = OptimizerConfig()
    return opt_cfg, make_optimizer(opt_cfg, 1000, 5), learning_rate_schedule(opt_cfg, 1000)


def _state_for(model_cfg, mesh):
    from indicfm.train.state import create_model, init_train_state

    _, tx, schedule = _optimizer()
    graphdef, state, shardings = init_train_state(create_model(model_cfg, mesh, 0), tx, 0, mesh)
    return graphdef, tx, schedule, state, shardings


def measure_stall(
    model_cfg, seq_len: int, batch_size: int, saves: int, workdir: Path, *, save_thread: bool = True,
    quiet_steps_between: int = 4, max_steps_per_save: int = 60,
) -> dict:
    """Median step time, and how long one save blocks the loop (same process, same load).

    Blocked time of one save = the ``Checkpointer.save`` call + the slow-down of EVERY step during
    which the save was still running (its set-up or Orbax's writing competes with training for the
    CPU and the GIL), plus the one step after it finished: the sum of (step time − median undisturbed
    step time) over those steps; figures are means over saves.  Saves are spaced so that they
    never overlap, with ``quiet_steps_between`` undisturbed steps before each (the reference steps,
    interleaved in time with the disturbed ones so a change of the machine's load hits both).
    ``final_wait_s`` is what ``close()`` waits for the last save (the end of a run, not a stall).
    The items are the real ones: arrays, JSON metadata and a 512 KiB tokenizer file.
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

    def timed_step() -> float:
        nonlocal state
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    quiet: list[list[float]] = []  # undisturbed steps before each save, and after the last one
    save_calls: list[float] = []
    disturbed: list[list[float]] = []  # per save: the steps it overlapped, and the one after
    with jax.set_mesh(mesh):
        timed_step()  # compile
        checkpointer.save(0, state, meta, tokenizer)  # first save compiles the copy, starts Orbax's threads
        checkpointer.wait()
        step = 1
        for _ in range(saves):
            quiet.append([timed_step() for _ in range(quiet_steps_between)])
            step += quiet_steps_between
            start = time.perf_counter()
            checkpointer.save(step, state, meta, tokenizer)
            save_calls.append(time.perf_counter() - start)
            steps = [timed_step()]  # the step right after the save is always counted
            while checkpointer.save_in_progress() and len(steps) < max_steps_per_save:
                steps.append(timed_step())
            steps.append(timed_step())  # the one after the save finished (clean-up, garbage collection)
            disturbed.append(steps)
            step += len(steps)
        quiet.append([timed_step() for _ in range(quiet_steps_between)])
        start = time.perf_counter()
        checkpointer.close()
        final_wait_s = time.perf_counter() - start
    # Each save is compared with the undisturbed steps just before and just after it: the load of this
    # shared machine drifts, and a global median would count that drift as (or against) the save.
    # A save's summed slow-down is kept signed: step-time jitter adds noise of both signs over the
    # several steps a save overlaps, which the mean over saves averages out (clipping each at 0, or
    # a median of clipped values, would not); its standard error is reported with it.
    baselines = [statistics.median(before + after) for before, after in zip(quiet, quiet[1:])]
    slowdowns = [sum(t - base for t in steps) for steps, base in zip(disturbed, baselines)]
    over_step = [(call + slow) / base for call, slow, base in zip(save_calls, slowdowns, baselines)]
    step_s = statistics.median(t for block in quiet for t in block)
    mean_over_step = statistics.fmean(over_step)
    stderr_over_step = statistics.stdev(over_step) / len(over_step) ** 0.5 if len(over_step) > 1 else float("nan")
    return {
        "step_s": round(step_s, 4),
        "step_s_spread": round(statistics.pstdev(t for block in quiet for t in block), 4),
        "save_call_s": round(statistics.fmean(save_calls), 4),
        # the loop itself waits only inside the save call: the "time blocked" in its narrow sense
        "save_call_over_step_time": round(statistics.fmean(c / b for c, b in zip(save_calls, baselines)), 4),
        "steps_disturbed_per_save": statistics.median(len(steps) for steps in disturbed),
        "following_steps_slowdown_s": round(statistics.fmean(slowdowns), 4),
        "save_stall_s": round(statistics.fmean(save_calls) + statistics.fmean(slowdowns), 4),
        "stall_per_save_over_step_time": round(mean_over_step, 4),
        "stall_per_save_over_step_time_stderr": round(stderr_over_step, 4),
        "stall_per_save_over_step_time_each": [round(x, 3) for x in over_step],
        "goal_stall_per_save_le_2pct": bool(mean_over_step <= 0.02),  # call + slow-down of the overlapped steps
        "stall_share_of_training_time_every_100_steps": round(mean_over_step / 100, 5),
        "final_wait_s": round(final_wait_s, 4),
    }


def _model_config(name: str):
    return load_config(CONFIG_DIR / "model" / f"{name}.yaml").model


def _restore_target(model_cfg, mesh):
    """What a resuming run asks Orbax for: shapes, dtypes and target shardings; nothing allocated."""
    from indicfm.train.state import abstract_train_state

    _, tx, _ = _optimizer()
    _, target, _ = abstract_train_state(model_cfg, tx, 0, mesh)
    return target


def state_bytes(model_name: str) -> int:
    """Bytes of the full train state (parameters + AdamW moments + router bias + RNG), not allocated."""
    from indicfm.sharding import make_mesh

    target = _restore_target(_model_config(model_name), make_mesh(MeshConfig(data=-1)))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(target))


def write_state_checkpoint(model_name: str, directory: str, in_flight_gb: int) -> None:
    """Save a full train state of ``model_name`` once, through ``Checkpointer``, in the format a run
    writes.  The arrays are host zeros of the state's shapes and dtypes, not an initialised model: the
    state is stored uncompressed, so the values change neither the bytes on disk nor the restore
    time, and untouched zero pages cost no memory (a real 12 GB state would need 12 GB here, and
    Orbax's device→host copies of it up to as much again)."""
    from indicfm.sharding import make_mesh
    from indicfm.train.checkpoint import Checkpointer
    from indicfm.train.config import CheckpointConfig

    target = _restore_target(_model_config(model_name), make_mesh(MeshConfig(data=-1)))
    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
    cfg = CheckpointConfig(every_steps=1, async_save=False)
    checkpointer = Checkpointer(directory, cfg, save_thread=False, in_flight_gb=in_flight_gb)
    checkpointer.save(1, state, {"loader": {}})
    checkpointer.close()


def time_restore(model_name: str, directory: str, in_flight_gb: int) -> float:
    """Seconds to restore the newest checkpoint into the target shardings, as a resuming run does."""
    from indicfm.sharding import make_mesh
    from indicfm.train.checkpoint import Checkpointer
    from indicfm.train.config import CheckpointConfig

    target = _restore_target(_model_config(model_name), make_mesh(MeshConfig(data=-1)))
    start = time.perf_counter()
    restored = Checkpointer(directory, CheckpointConfig(), in_flight_gb=in_flight_gb).restore_latest_good(target)
    jax.block_until_ready(jax.tree.leaves(restored.state))
    return time.perf_counter() - start


def measure_restore(model_name: str, workdir: Path, *, in_flight_gb: int = 1, cold: bool = False) -> dict:
    """Write the model's full train state once, then time restoring it into freshly described shardings.

    Each part runs in its own fresh process, so the restore, like a real resume, starts with no Orbax
    or tensorstore cache, and its memory (peak ≈ the state + ``in_flight_gb``) is all there is.  The
    files were just written, so they are (as far as free memory allows) in the OS page cache: this
    measures Orbax and tensorstore (reads, copies into the arrays), not the disk.  ``cold``: the
    page cache is dropped first (Linux, as root), so the restore reads the disk, as a resume on a
    fresh machine after preemption does.
    """
    nbytes = state_bytes(model_name)
    needed = nbytes + in_flight_gb * 1e9 + 1e9  # + the interpreter, JAX and Orbax themselves
    available = _available_memory_bytes()
    if available is not None and available < needed:
        return {"restore_skipped": f"needs ~{needed / 1e9:.1f} GB free memory, {available / 1e9:.1f} GB available",
                "state_gb": round(nbytes / 1e9, 3)}
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as writer:
        start = time.perf_counter()
        writer.submit(write_state_checkpoint, model_name, str(workdir), in_flight_gb).result()
        save_s = time.perf_counter() - start
    cache = _drop_page_cache() if cold else "warm (just written)"
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as reader:
        restore_s = reader.submit(time_restore, model_name, str(workdir), in_flight_gb).result()
    disk = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())
    return {
        "restore_s": round(restore_s, 3),
        "restore_page_cache": cache,
        "state_gb": round(nbytes / 1e9, 3),
        "restore_gb_per_s": round(nbytes / 1e9 / restore_s, 3),
        "checkpoint_on_disk_gb": round(disk / 1e9, 3),
        "one_off_save_s": round(save_s, 1),  # host zeros through Checkpointer, incl. process start-up
    }


def _drop_page_cache() -> str:
    """Flush and drop the OS page cache so the next read comes from disk; says what happened."""
    import os

    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:  # not Linux, or not root: the restore is then (partly) warm
        return f"warm (could not drop the page cache: {err.strerror or err})"
    return "cold (dropped)"


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run(quick: bool, *, restore_only: bool = False, cold_restore: bool = False, stall_model: str = "tiny-moe",
        stall_seq_len: int = 128, stall_batch_size: int = 16, saves: int | None = None) -> dict:
    """``stall_model`` etc.: on a GPU or TPU a tiny-moe step takes milliseconds, so measure the
    stall there with the model and shapes a real run uses (e.g. small-moe, 4096 tokens)."""
    restore_model = "tiny-moe" if quick else "small-moe"
    root = Path(tempfile.mkdtemp(prefix="indicfm-bench-ckpt-"))
    try:
        figures = {"devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}"}
        if not restore_only:
            model = _model_config(stall_model)
            figures["stall_model"] = f"{stall_model}, {stall_batch_size}x{stall_seq_len} tokens"
            stall_args = dict(seq_len=stall_seq_len, batch_size=stall_batch_size,
                              saves=saves if saves is not None else (8 if quick else 30))
            figures.update(measure_stall(model, **stall_args, workdir=root / "stall"))
            # the same with Orbax called on the training thread (its own async save only), for comparison
            orbax_only = measure_stall(model, **stall_args, workdir=root / "stall-orbax-only", save_thread=False)
            figures.update({f"orbax_only_{k}": v for k, v in orbax_only.items() if k != "goal_stall_per_save_le_2pct"})
        figures["restore_model"] = restore_model
        figures.update(measure_restore(restore_model, root / "restore", cold=cold_restore))
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _positive_int(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny-moe only (a few minutes on 2 CPU cores)")
    parser.add_argument(
        "--restore-only", action="store_true",
        help="only the restore figures (e.g. the ~12 GB small-moe restore on its own, when memory is free)",
    )
    parser.add_argument(
        "--cold-restore", action="store_true",
        help="drop the OS page cache before the restore (Linux, as root): time a resume reading the disk",
    )
    parser.add_argument("--stall-model", default="tiny-moe", help="model config the stall is measured with")
    parser.add_argument("--stall-seq-len", type=int, default=128, help="tokens per sequence of the stall's steps")
    parser.add_argument("--stall-batch-size", type=int, default=16, help="sequences per step of the stall's steps")
    parser.add_argument("--saves", type=_positive_int, help="saves timed (default 8 with --quick, else 30)")
    args = parser.parse_args()
    figures = run(args.quick, restore_only=args.restore_only, cold_restore=args.cold_restore,
                  stall_model=args.stall_model, stall_seq_len=args.stall_seq_len,
                  stall_batch_size=args.stall_batch_size, saves=args.saves)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
