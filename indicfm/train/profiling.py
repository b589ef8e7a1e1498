"""``logging.profile_steps: [A, B]`` (``indicfm train --profile-steps A:B``): a ``jax.profiler`` trace
of steps A to B in ``WORKDIR/profile``, for TensorBoard's profile tab (``tensorboard --logdir
WORKDIR``) and for Perfetto (the ``*.trace.json.gz`` beside it, https://ui.perfetto.dev).

The trace starts before step A is dispatched and stops once step B's metrics were read, i.e. once
B finished on the devices (the step after B, already dispatched, shows at the trace's end). Each
step's dispatch is annotated with its number, so TensorBoard's step view separates the steps.
Starting and writing a trace take host time while the devices idle: the run's goodput counts it as
``profiler``, not as step time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager

from indicfm.train.goodput import Timeline

PROFILE_DIR = "profile"


class StepProfiler:
    """Starts and stops the trace around steps ``steps[0]..steps[1]`` (1-based, inclusive)."""

    def __init__(self, steps: tuple[int, int] | None, directory: Path, timeline: Timeline, say: Callable[..., None]):
        self.first, self.last = steps if steps else (0, -1)
        self.directory = Path(directory)
        self.timeline = timeline
        self.say = say
        self.active = False

    def before_dispatch(self, step: int) -> None:
        """Start the trace before the window's first step (or the first step run, when resumed inside it)."""
        if self.active or not self.first <= step <= self.last:
            return
        import jax

        with self.timeline.host("profiler"):
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
        self.active = True

    def annotate(self, step: int) -> ContextManager:
        """The step's dispatch, named in the trace."""
        if not self.active:
            return contextlib.nullcontext()
        import jax

        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after_read(self, step: int) -> None:
        """Stop once the window's last step has finished."""
        if self.active and step >= self.last:
            self.stop(f"profile of steps {self.first}-{self.last}")

    def stop(self, what: str = "profile (run ended inside the window)") -> None:
        if not self.active:
            return
        import jax

        with self.timeline.host("profiler"):
            jax.profiler.stop_trace()
        self.active = False
        self.say(f"{what}: {self.directory} (tensorboard --logdir {self.directory.parent}, or the .trace.json.gz in Perfetto)")
