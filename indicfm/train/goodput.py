"""Where a run's wall-clock time goes (goodput), and how long each step took on the devices.

**Step time.** The time between two host reads of metrics is not a step's time: with asynchronous
dispatch, metrics read one step late and actions that read a step at once (checkpoint,
evaluation), a read that waits gives one step two steps' time and its neighbour almost none. The
loop instead records, for every step ``n``, when the host dispatched it (``dispatch(n)``: the start
of the call, or its end when the call compiled) and when its outputs were observed ready on the
devices (``complete(n)``, see :mod:`indicfm.train.device_time`). The device runs one step at a
time, so step ``n`` ran from ``max(complete(n-1), dispatch(n))`` to ``complete(n)``. A step the
device queued behind its predecessor is charged only its own run, and a step that waited for the
host (for data, a checkpoint save, an evaluation) is not charged the wait: the wait goes to its
category below. The formula holds whatever the host's read pattern, prefetch depth or dispatch
blocking; it needs only that steps run in order.

**Goodput.** :class:`Timeline` partitions the wall clock of one ``train()`` call (a *session*)
into categories that add up to the wall clock by construction. Device busy with a step:
``productive``, or ``recomputed`` when a previous session had already logged that step before it
crashed or was killed (work lost to the restart, counted once: in the session that redoes it).
Device idle: whatever the host was doing then, from the labelled host intervals (``compile``,
``data``, ``checkpoint``, ``evaluation``, ``restore``, ``startup``, ``profiler``); unlabelled idle
time (logging, Python between steps) is ``other``, shown, not hidden. Host work that overlaps a
running step costs nothing and is not counted: e.g. the loader preparing the next batch.

Everything takes an injectable clock, so tests drive it with a fake clock and a fake device.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from indicfm.train.metrics import iter_records

Clock = Callable[[], float]

STEP_CATEGORIES = ("productive", "recomputed")
HOST_CATEGORIES = ("compile", "data", "checkpoint", "evaluation", "restore", "startup", "profiler")
CATEGORIES = STEP_CATEGORIES + HOST_CATEGORIES + ("other",)
PREFIX = "goodput/"  # metrics.jsonl / TensorBoard keys: goodput/<category>_s, goodput/wall_s, goodput/session


@dataclass
class _Interval:
    category: str
    begin: float
    end: float


class Timeline:
    """One session's wall clock, split into :data:`CATEGORIES` as steps complete.

    Use: ``with timeline.host("data"): ...`` around host work that may leave the devices idle;
    :meth:`dispatched` and :meth:`completed` for every step (in step order);
    :meth:`advance` when no step is in flight (at the end of the run). :meth:`totals` then adds
    up to :meth:`wall`.

    ``recomputed_through``: steps up to this one were logged by an earlier session that did not
    save them; redoing them is lost work, not progress.
    """

    def __init__(self, clock: Clock = time.perf_counter, start: float | None = None, recomputed_through: int = 0):
        self.clock = clock
        self.start = clock() if start is None else start
        self.recomputed_through = recomputed_through
        self._totals = dict.fromkeys(CATEGORIES, 0.0)
        self._cursor = self.start  # wall time before this is accounted
        self._closed: list[_Interval] = []  # host intervals not yet (fully) accounted, disjoint
        self._open: list[list] = []  # [category, begin] of the open host intervals, innermost last
        self._dispatched: dict[int, float] = {}  # step -> earliest time the device could start it
        self._last_complete: float | None = None
        self._last_halfwidth = 0.0  # uncertainty of the last completion time
        self.last_error = 0.0  # bound on the error of the last step time :meth:`completed` returned

    # ---- host intervals ---------------------------------------------------------------------
    @contextlib.contextmanager
    def host(self, category: str) -> Iterator[None]:
        """Label the host's time inside the block; a nested block's label wins while it runs."""
        if category not in HOST_CATEGORIES:
            raise ValueError(f"unknown host category {category!r}; one of {HOST_CATEGORIES}")
        now = self.clock()
        if self._open:
            self._close_segment(self._open[-1], now)
        self._open.append([category, now])
        try:
            yield
        finally:
            now = self.clock()
            self._close_segment(self._open.pop(), now)
            if self._open:
                self._open[-1][1] = now

    def add(self, category: str, begin: float, end: float) -> None:
        """A host interval measured by the caller (e.g. a dispatch call that compiled)."""
        if category not in HOST_CATEGORIES:
            raise ValueError(f"unknown host category {category!r}; one of {HOST_CATEGORIES}")
        self._closed.append(_Interval(category, begin, end))

    def _close_segment(self, segment: list, now: float) -> None:
        category, begin = segment
        if now > begin:
            self._closed.append(_Interval(category, begin, now))

    # ---- steps ------------------------------------------------------------------------------
    def dispatched(self, step: int, at: float) -> None:
        """Step ``step`` could start on the devices from ``at`` on."""
        self._dispatched[step] = at

    @property
    def in_flight(self) -> list[int]:
        """Dispatched steps whose completion is not accounted yet."""
        return sorted(self._dispatched)

    def completed(self, step: int, at: float, not_before: float | None = None) -> float:
        """Step ``step`` finished by ``at`` (and after ``not_before``, when known): account it and
        return its device time.  With an interval the middle is taken, and :attr:`last_error`
        bounds the error of the returned time (half the interval, plus the previous step's when
        this one started at that step's end)."""
        ready = self._dispatched.pop(step)
        begin = max(ready, self._cursor)
        started_at_previous = self._last_complete is not None and self._last_complete >= begin
        if started_at_previous:
            begin = self._last_complete
        end = max(at, begin)  # a clock read on another thread may land a hair early
        halfwidth = 0.0
        if not_before is not None and not_before < end:
            low = max(not_before, begin)
            end, halfwidth = (low + end) / 2, (end - low) / 2
        self._account_idle(begin)
        seconds = end - begin
        self._totals["recomputed" if step <= self.recomputed_through else "productive"] += seconds
        self.last_error = halfwidth + (self._last_halfwidth if started_at_previous else 0.0)
        self._cursor = self._last_complete = end
        self._last_halfwidth = halfwidth
        return seconds

    def advance(self, now: float | None = None) -> None:
        """Account the wall time up to ``now`` (default: the clock) as idle devices; only when no
        step is in flight, else its time would be taken for idle time."""
        if self._dispatched:
            raise RuntimeError(f"steps {self.in_flight} are still in flight; account them first")
        self._account_idle(self.clock() if now is None else now)

    def _account_idle(self, until: float) -> None:
        """[cursor, until) had no step running: each moment to the host's label then, else other."""
        if until <= self._cursor:
            return
        begin, labelled = self._cursor, 0.0
        pieces = self._closed + [_Interval(c, b, until) for c, b in self._open]
        for interval in pieces:
            overlap = min(interval.end, until) - max(interval.begin, begin)
            if overlap > 0:
                self._totals[interval.category] += overlap
                labelled += overlap
        self._totals["other"] += max(0.0, until - begin - labelled)
        self._closed = [_Interval(i.category, max(i.begin, until), i.end) for i in self._closed if i.end > until]
        for segment in self._open:
            segment[1] = max(segment[1], until)
        self._cursor = until

    # ---- results ----------------------------------------------------------------------------
    def totals(self) -> dict[str, float]:
        """Seconds per category, up to the wall time accounted so far; they add up to :meth:`wall`."""
        return dict(self._totals)

    def wall(self) -> float:
        return self._cursor - self.start

    def record(self, session: str) -> dict[str, float | str]:
        """The metrics.jsonl / TensorBoard keys of the breakdown so far (cumulative over the session)."""
        values: dict[str, float | str] = {f"{PREFIX}{c}_s": round(v, 6) for c, v in self._totals.items()}
        values[f"{PREFIX}wall_s"] = round(self.wall(), 6)
        values[f"{PREFIX}session"] = session
        return values


def breakdown_of(record: dict) -> dict[str, float]:
    """Category → seconds from one record written by :meth:`Timeline.record` (missing ones are 0)."""
    return {c: float(record.get(f"{PREFIX}{c}_s", 0.0)) for c in CATEGORIES}


def describe(totals: dict[str, float], wall: float) -> str:
    """One line for logs: the wall clock and each category of at least 0.05 s with its share;
    ``other`` always, so the unlabelled remainder is in sight."""
    shown = [c for c in CATEGORIES if totals.get(c, 0.0) >= 0.05 or c == "other"]
    parts = [f"{c} {totals.get(c, 0.0):.1f} s ({100 * totals.get(c, 0.0) / wall:.1f}%)" for c in shown] if wall > 0 else []
    return f"wall {wall:.1f} s = " + " + ".join(parts) if parts else f"wall {wall:.1f} s"


def last_logged_step(metrics_path: Path) -> int:
    """The highest training step in a ``metrics.jsonl`` (0 if none): on a resume from step R, steps
    R+1 .. this one were computed before and are lost work when computed again."""
    last = 0
    for record in iter_records(metrics_path):  # lines cut short by the crash are skipped
        if "loss" in record:
            last = max(last, int(record.get("step", 0)))
    return last


def process_started_at(clock: Clock = time.perf_counter) -> float | None:
    """When this process started, on ``clock``'s scale (Linux ``/proc``; None elsewhere), so that a
    session's wall clock includes the interpreter's start-up and imports, as a user's stopwatch does."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        stat = Path("/proc/self/stat").read_text()
        started_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, after "pid (comm) "
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    age = uptime - started_ticks / ticks
    return clock() - age if 0 <= age < 365 * 86400 else None
