"""When a step finished on the devices, and whether a dispatch compiled: the two facts the step
times of :mod:`indicfm.train.goodput` rest on.

**Completion.** :class:`ReadyTimes` hands each dispatched step's metrics to one background thread
that polls them (``is_ready()``, every millisecond) in step order. The metrics come out of the same
program as the new state, replicated, so they are ready when every local device has finished the
step. A step finished after the last poll that saw it running and by the first that saw it done;
the loop takes the middle of that interval and logs half its width as the error bound. Why a
thread and not the host's own reads: the main thread reads a step late, or at once before a
checkpoint, or after a blocking dispatch, and that pattern is exactly what made step times wrong;
the loop never waits for this thread except for a step whose metrics it has already read. Why
polls and not a blocking wait: the thread needs the GIL to read the clock, and while another thread
holds the GIL without a CPU to run on (the idle-priority checkpoint writer on a loaded machine) it
can be late by a tenth of a second and more; a blocking wait would then put the whole delay into
one step and take it from the next, while the last poll before the stall still bounds the step's
end from below. Normally the interval is about one poll wide.

**Compilation.** A jitted function compiles inside the call that first sees new shapes, and JAX
reports every tracing, lowering and backend compile (persistent-cache loads included) through
``jax.monitoring``. :func:`compile_count` counts those events per thread, so the loop can tell a
dispatch that compiled (its time is compilation, and the step can only start when it returns)
from one that queued a step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from typing import Any, Callable

from indicfm.train.goodput import Clock

_COMPILE_EVENT_PREFIX = "/jax/core/compile/"  # jaxpr_trace_duration, jaxpr_to_mlir_module_duration, backend_compile_duration
_compile_events: defaultdict[int, int] = defaultdict(int)
_listening = False
_listening_lock = threading.Lock()


def _on_duration_event(event: str, duration: float, **kwargs: Any) -> None:
    if event.startswith(_COMPILE_EVENT_PREFIX):
        _compile_events[threading.get_ident()] += 1


def compile_count() -> int:
    """How many JAX compilation events this thread has seen (registers the listener on first use)."""
    global _listening
    if not _listening:
        with _listening_lock:
            if not _listening:
                import jax

                jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
                _listening = True
    return _compile_events[threading.get_ident()]


def _is_ready(marker: Any) -> bool:
    """Whether every array of ``marker`` (a step's metrics) is computed."""
    import jax

    return all(leaf.is_ready() for leaf in jax.tree.leaves(marker))


class ReadyTimes:
    """When each watched step's outputs became ready, as an interval (see the module docstring).

    ``is_ready`` tells whether a marker is ready (default: its arrays' ``is_ready()``), ``sleep``
    waits between polls; tests pass their own.
    """

    def __init__(
        self,
        clock: Clock = time.perf_counter,
        is_ready: Callable[[Any], bool] = _is_ready,
        poll_s: float = 0.001,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._clock, self._is_ready, self._poll_s, self._sleep = clock, is_ready, poll_s, sleep
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._times: dict[int, tuple[float | None, float]] = {}
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, step: int, marker: Any) -> None:
        """Note when ``marker`` (the step's metrics) is ready; steps must be watched in order."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="indicfm-step-ready", daemon=True)
            self._thread.start()
        self._queue.put((step, marker))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            step, marker = item
            running_at = None  # the start of the last poll that saw the step still running
            while True:
                before = self._clock()
                try:
                    done = self._is_ready(marker)
                except Exception:  # a failed step: the loop sees the error when it reads the metrics
                    done = True
                if done:
                    break
                running_at = before
                self._sleep(self._poll_s)
            ready_by = self._clock()
            with self._ready:
                self._times[step] = (running_at, ready_by)
                self._ready.notify_all()

    def completed_at(self, step: int, timeout: float | None = None) -> tuple[float | None, float]:
        """(not before, ready by) of step ``step``: it finished after the first (None: no poll saw
        it running) and by the second.  Waits for the step; call after reading its metrics."""
        with self._ready:
            if not self._ready.wait_for(lambda: step in self._times, timeout):
                raise TimeoutError(f"step {step} was never observed ready")
            return self._times.pop(step)

    def close(self) -> None:
        """Stop the thread once it has seen what is queued (not joined: after a crash a queued step
        may never finish, and the daemon thread must not hold up the exit)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None
