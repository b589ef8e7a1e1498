"""Checkpoints with orbax-checkpoint's ``CheckpointManager``: asynchronous, atomic, restorable onto
another mesh, and robust to a damaged latest checkpoint.

One checkpoint (directory ``<workdir>/checkpoints/<step>/``) holds three items:

* ``state`` — the arrays: parameters, optimizer state, non-parameter model state (the MoE router
  bias) and the RNG key (``ocp.args.PyTreeSave``, uncompressed; each host writes its own shards).
* ``meta`` — small JSON, one typed record (:class:`~indicfm.train.checkpoint_meta.CheckpointMeta`):
  step, the data loader's state, the resolved config, the tokenizer's sha256 and ``param_layout``
  (``"unrolled"`` or ``"scanned"``, see ``indicfm.model.transformer.param_layout``): the arrays' tree
  differs between the two, so a restore first checks the layout it expects (:class:`LayoutMismatch`
  otherwise; a checkpoint without the key predates scanning: unrolled).
* ``tokenizer`` — the tokenizer file itself (base64 in JSON; a SentencePiece ``.model`` or a
  ``tokenizer.json``, named as it was) with the special tokens a ``tokenizer_config.json`` beside a
  ``tokenizer.json`` names, so a checkpoint is self-contained even if the workdir's tokenizer is
  replaced.

Why Orbax and not hand-written files: its saves are atomic (a step directory only appears, renamed
from a temporary one, once every host finished writing, so a save cut off halfway never becomes the
latest), it writes in a background thread while training continues, it restores each array straight
into the target sharding (so a checkpoint saved on 8 data-parallel devices restores onto a
2 data × 4 expert mesh) and it ties into JAX's multi-host preemption notice.

How little a save blocks the training loop: Orbax's own "asynchronous" save still runs its set-up
(device→host copy, per-item bookkeeping, ten or so thread starts) on the caller's thread, 50-200 ms
on a busy CPU.  With one process, ``Checkpointer.save`` therefore only dispatches an on-device copy
of the state's arrays (one jitted copy, asynchronous like any JAX computation, so the next train
step may donate the original buffers) and hands it to one background thread that calls Orbax.
That thread, and every thread Orbax starts from it, runs at idle CPU priority (``SCHED_IDLE`` on
Linux), so the CPU time a save costs (0.2-0.3 s for tiny-moe's 156 arrays; measured: two thirds
Orbax's Python per array, the rest TensorStore's file writes) mostly comes out of CPU time training
leaves unused.  TensorStore's own I/O threads keep their priority: the data loader reads through
them (at idle priority they starved the save for dozens of steps on a loaded machine).  Python's
garbage collector is paused until the save is on disk: a collection started in an idle-priority
thread holds the GIL while it waits for a CPU (measured: up to 0.5 s).  The state is written
uncompressed: zstd shrinks float32 weights and moments by only ~8 %, and costs CPU time at normal
priority plus extra host memory while a save runs.  The price of the snapshot is one extra copy of
the train state in device memory while a save starts.  With several processes Orbax's barriers are
device collectives that must run on the main thread in the same order on every host, so there the
save calls Orbax directly.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import hashlib
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_preservation
from orbax.checkpoint.checkpoint_managers import save_decision_policy as ocp_save_decision

from indicfm.tokenizer.load import TokenizerFile, read_tokenizer_file
from indicfm.train.checkpoint_meta import CheckpointMeta
from indicfm.train.config import CheckpointConfig

log = logging.getLogger(__name__)

_ORBAX_DEFAULT_IN_FLIGHT_GB = 96  # StandardCheckpointHandler's own default for save/restore_concurrent_gb
DAMAGED_DIR_NAME = "damaged_checkpoints"


class LayoutMismatch(ValueError):
    """The checkpoint's parameters are stacked differently from the model asking for them."""


@dataclass
class Restored:
    """What a restore returns: the step, the arrays (in the target shardings) and the metadata."""

    step: int
    state: Any
    meta: CheckpointMeta
    tokenizer: dict | None
    skipped_damaged: list[int]



def tokenizer_item(path: str | Path) -> dict:
    """The ``tokenizer`` checkpoint item: file name, sha256 and the file's bytes (base64), and for a
    ``tokenizer.json`` the special tokens its ``tokenizer_config.json`` names (``special_tokens``)."""
    file = read_tokenizer_file(path)
    item = {
        "file_name": file.name,
        "sha256": hashlib.sha256(file.data).hexdigest(),
        "base64": base64.b64encode(file.data).decode("ascii"),
    }
    if file.declared is not None:
        item["special_tokens"] = file.declared
    return item


def tokenizer_bytes(item: dict) -> bytes:
    """The tokenizer file stored by :func:`tokenizer_item`, checked against its sha256 (a corrupted
    copy would tokenize differently without any error)."""
    data = base64.b64decode(item["base64"])
    if hashlib.sha256(data).hexdigest() != item.get("sha256"):
        raise ValueError(f"the stored tokenizer does not match its sha256 {item.get('sha256')}")
    return data


def stored_tokenizer(item: dict) -> TokenizerFile:
    """The tokenizer of a :func:`tokenizer_item` (checked like :func:`tokenizer_bytes`); ``.load()`` it."""
    return TokenizerFile(tokenizer_bytes(item), item.get("file_name", "tokenizer.model"), item.get("special_tokens"))


def restore_meta(manager: ocp.CheckpointManager, directory: str | Path, step: int) -> CheckpointMeta:
    """The metadata of checkpoint ``step`` that ``manager`` (over ``directory``) holds, without
    reading any array."""
    data = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return CheckpointMeta.from_json(data, Path(directory) / str(step))


def _use_replica_parallel(enabled: bool) -> None:
    """Orbax's replica-parallel saving splits each replicated array over its replicas so that every
    replica writes a slice; each slice is one eager op, which on CPU (or with many small arrays)
    costs more than it saves.  Process-wide setting of Orbax's ``jax.Array`` handler."""
    global _REPLICA_PARALLEL
    if _REPLICA_PARALLEL == enabled:
        return
    with _quiet_library_logs():  # Orbax warns that it overrides its default handler: that is the point
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=enabled), override=True
        )
    _REPLICA_PARALLEL = enabled


_REPLICA_PARALLEL: bool | None = None  # what the registered handler does (None: Orbax's default)


class Checkpointer:
    """A thin, explicit wrapper over ``ocp.CheckpointManager`` for indicfm's three items."""

    def __init__(
        self, directory: str | Path, cfg: CheckpointConfig, *, save_thread: bool = True, in_flight_gb: int | None = None
    ):
        """``save_thread=False`` calls Orbax on the caller's thread even with one process (Orbax's own
        async saving only; the benchmark compares both, tests cover both).  ``in_flight_gb`` caps the
        array bytes Orbax writes or reads at once (its ``save/restore_concurrent_gb``; default 96):
        host memory during a save or restore is about the state plus this, for memory-tight hosts."""
        self.directory = Path(directory).resolve()
        self.cfg = cfg
        _use_replica_parallel(cfg.replica_parallel)
        keep: list[Any] = [ocp_preservation.LatestN(n=cfg.keep_last)]
        if cfg.keep_every:
            keep.append(ocp_preservation.EveryNSteps(interval_steps=cfg.keep_every))
        # Every `every_steps` steps, or when JAX's multi-host preemption notice arrived; not Orbax's
        # default extra "save as soon as there is no checkpoint" (that would save step 1).
        saving = ocp_save_decision.AnySavePolicy(
            [ocp_save_decision.FixedIntervalPolicy(cfg.every_steps), ocp_save_decision.PreemptionCheckpointingPolicy()]
        )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=saving,
            preservation_policy=ocp_preservation.AnyPreservationPolicy(keep),
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        gb = in_flight_gb or _ORBAX_DEFAULT_IN_FLIGHT_GB
        handlers = {
            # No zstd (Orbax's default): float32 weights and moments of a trained model shrink by ~8 %,
            # for which compression costs CPU time beside training and holds about half the state in
            # extra host memory while saving (measured on a 2.4 GB state: +1.4 GB with, +0.5 GB without).
            "state": ocp.PyTreeCheckpointHandler(
                use_compression=False, save_concurrent_gb=gb, restore_concurrent_gb=gb
            ),
            "meta": ocp.JsonCheckpointHandler(),
            "tokenizer": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        # One process + async saves: the whole Orbax call runs in one long-lived worker thread (see the
        # module docstring); a save then only queues work, it does not even wait for a thread to start.
        self._in_background = save_thread and cfg.async_save and jax.process_count() == 1
        self._worker = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="indicfm-save", initializer=_lower_thread_priority)
            if self._in_background
            else None
        )
        self._pending: Future | None = None
        self._last_saved_step = self.manager.latest_step() or 0

    # ---- saving -----------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """True every ``checkpoint.every_steps`` steps (Orbax's own decision, identical on all hosts)."""
        if self._in_background:
            # Orbax's decision reads the manager, which the save thread may be changing; on one process
            # it amounts to this (its preemption notice only exists with several processes).
            return step % self.cfg.every_steps == 0 and step > self._last_saved_step
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True on every host once any host got a preemption notice (multi-host only; JAX's sync point)."""
        if jax.process_count() == 1:
            return False
        return self.manager.reached_preemption(step)

    def save(
        self, step: int, state: Any, meta: CheckpointMeta | Mapping[str, Any], tokenizer: dict | None = None, *,
        force: bool = True,
    ) -> bool:
        """Start saving the state after ``step``; returns False if that step is already saved.

        ``meta`` is stamped with ``step``; a plain mapping (low-level callers, tests) is read as a
        :class:`CheckpointMeta` first, so a checkpoint never holds a record that would not read back.

        With ``checkpoint.async_save`` on one process this returns once an on-device copy of the state
        is dispatched (it waits only if the previous save is not on disk yet); the copy is handed to
        Orbax in a background thread, and Python's garbage collector is paused until it is on disk.
        Otherwise it returns once Orbax copied the arrays off the devices (async) or wrote them
        (sync).  Errors of a background save surface on the next ``save``/``wait``/``close``.
        """
        self._join_save_thread()
        if step in self.manager.all_steps():
            return False
        record = meta.with_step(step) if isinstance(meta, CheckpointMeta) else CheckpointMeta.from_json({**meta, "step": step})
        items: dict[str, Any] = {"meta": ocp.args.JsonSave(record.to_json())}
        if tokenizer is not None:
            items["tokenizer"] = ocp.args.JsonSave(tokenizer)
        if not self._in_background:
            items["state"] = ocp.args.PyTreeSave(state)
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        # Only the flat arrays are copied here; rebuilding the tree (one flax Variable per array, ~5 ms
        # for a small model) is left to the worker.
        arrays, treedef = jax.tree.flatten(state)
        copies = _copy_arrays(arrays)
        # Python's garbage collector runs in whichever thread allocates, holding the GIL; in an
        # idle-priority Orbax thread a collection can be descheduled halfway and block the training
        # thread for up to hundreds of ms (measured).  So it is paused until the save is on disk.
        pause_gc = gc.isenabled()
        if pause_gc:
            gc.disable()

        def save_snapshot() -> bool:
            try:
                items["state"] = ocp.args.PyTreeSave(jax.tree.unflatten(treedef, copies))
                saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
                self.manager.wait_until_finished()
                return saved
            finally:
                if pause_gc:
                    gc.enable()

        self._last_saved_step = max(self._last_saved_step, step)
        self._pending = self._worker.submit(save_snapshot)
        return True

    def save_in_progress(self) -> bool:
        """True while a save has not reached the disk yet (its set-up or Orbax's writing still runs)."""
        pending = self._pending  # the worker's task ends once its save is on disk
        return (pending is not None and not pending.done()) or self.manager.is_saving_in_progress()

    def _join_save_thread(self) -> None:
        """Wait until the worker's save is on disk and re-raise its error on the training thread."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception as err:
                raise RuntimeError(f"background checkpoint save failed in {self.directory}: {err}") from err

    def wait(self) -> None:
        """Block until background saves are on disk (call before exiting); a failed save raises, but
        only once whatever Orbax still writes for it has stopped."""
        try:
            self._join_save_thread()
        finally:
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._worker is not None:
                self._worker.shutdown()
            self.manager.close()

    # ---- restoring --------------------------------------------------------------------------
    def steps(self) -> list[int]:
        self._join_save_thread()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        self._join_save_thread()
        return self.manager.latest_step()

    def restore(
        self, step: int, abstract_state: Any, *, with_tokenizer: bool = False, param_layout: str | None = None
    ) -> Restored:
        """Restore one step; arrays land directly in the shardings named by ``abstract_state``.

        ``param_layout``: the layout ``abstract_state`` has; a checkpoint saved in another one raises
        :class:`LayoutMismatch` before any array is read.
        """
        self._join_save_thread()
        if param_layout is not None:
            self._check_layout(step, param_layout)
        state_args = ocp.args.PyTreeRestore(
            item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
        )
        items: dict[str, Any] = {"state": state_args, "meta": ocp.args.JsonRestore()}
        if with_tokenizer:
            items["tokenizer"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = self._checked_step(step, CheckpointMeta.from_json(out["meta"], self.directory / str(step)))
        return Restored(step, out["state"], meta, out.get("tokenizer") if with_tokenizer else None, [])

    def read_meta(self, step: int) -> CheckpointMeta:
        """The metadata of one step, without reading any array."""
        self._join_save_thread()
        return self._checked_step(step, restore_meta(self.manager, self.directory, step))

    def _checked_step(self, step: int, meta: CheckpointMeta) -> CheckpointMeta:
        if meta.step != step:
            raise ValueError(f"checkpoint {self.directory / str(step)}: metadata says step {meta.step}")
        return meta

    def _check_layout(self, step: int, expected: str) -> None:
        saved = self.read_meta(step).param_layout
        if saved != expected:
            raise LayoutMismatch(
                f"checkpoint {self.directory / str(step)} holds parameters in the {saved!r} layout, but this run's "
                f"model has the {expected!r} layout; set model.scan_layers={str(saved == 'scanned').lower()} to "
                "resume it (indicfm.model.layout.convert_state converts a state between the layouts)"
            )

    def restore_latest_good(
        self, abstract_state: Any, *, warn=log.warning, param_layout: str | None = None
    ) -> Restored | None:
        """Restore the newest checkpoint that reads back whole; older ones are tried if it is damaged.

        A damaged checkpoint (missing or truncated file, unreadable metadata) is moved to
        ``<workdir>/damaged_checkpoints/`` with a warning, so that the run can save that step again.
        A checkpoint in another ``param_layout`` is not damaged: :class:`LayoutMismatch` is raised.
        Returns None when there is no checkpoint at all.
        """
        damaged: list[int] = []
        for step in reversed(self.steps()):
            try:
                with _quiet_library_logs():  # the reason is reported once below, not as pages of tracebacks
                    restored = self.restore(step, abstract_state, param_layout=param_layout)
            except LayoutMismatch:
                raise
            except Exception as err:  # any read failure means "damaged": fall back, never crash
                warn(f"checkpoint at step {step} is damaged ({type(err).__name__}: {_first_line(err)}); "
                     "falling back to the previous one")
                damaged.append(step)
                self._set_aside(step)
                continue
            restored.skipped_damaged = damaged
            return restored
        if damaged:
            warn(f"no readable checkpoint left (damaged: {damaged}); starting from scratch")
        return None

    def _set_aside(self, step: int) -> None:
        """Move a damaged step out of the checkpoint directory (process 0 only; others wait)."""
        if jax.process_index() == 0:
            target = self.directory.parent / DAMAGED_DIR_NAME / f"{step}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            source = self.directory / str(step)
            if source.exists():
                shutil.move(str(source), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"indicfm_set_aside_{step}")
        self.manager.reload()
        self._last_saved_step = self.manager.latest_step() or 0  # so that step is saved again when reached


def _lower_thread_priority() -> None:
    """Run the calling thread (the save worker) only on otherwise idle CPU time.

    Linux keeps a scheduling policy per thread and new threads inherit it, so Orbax's threads that the
    worker starts (device→host copies, per-array bookkeeping, metadata; most of a save's CPU time)
    are idle-priority too: they no longer take CPU time from the train step's threads, only what it
    leaves.  TensorStore's shared I/O threads are left alone: the data loader reads through them.
    No-op where the OS has no ``SCHED_IDLE`` (macOS, Windows); never raises.
    """
    if not hasattr(os, "SCHED_IDLE"):
        return
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except OSError as err:  # e.g. a seccomp profile that forbids it: saving still works, just sooner
        log.debug("could not lower the checkpoint thread's priority: %s", err)


@jax.jit
def _copy_arrays(arrays: list[jax.Array]) -> list[jax.Array]:
    """Copies in new device buffers, same shardings: the next train step donates (overwrites) the
    original buffers while the background thread is still reading these.  Dispatched like any jitted
    call, so the caller does not wait for the copy on an accelerator."""
    return [x.copy() for x in arrays]


@contextlib.contextmanager
def _quiet_library_logs():
    """Silence Orbax/tensorstore/asyncio error logs while trying a checkpoint that may be damaged."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
