"""Step times over several processes: each measures its own, the log shows the slowest, and a host
that is persistently slower than the rest (a straggler) is named.

A synchronous step runs at the pace of its slowest host, so the slowest host's time is the step's
time; one host's figure would hide a straggler. Every process measures its own step time
(:mod:`indicfm.train.goodput`) and, for each logged step, puts it in the key-value store of the
coordination service that ``jax.distributed.initialize`` started; process 0, the only one that
logs, reads them. Why not a device collective: it would be queued behind the step already
dispatched, so reading it would make the host wait for that step, and the devices would sit idle
until the next dispatch. Process 0's read waits only for the other processes to reach the same log
line, which they do about when process 0 does, since the step's collectives keep them together.
"""

from __future__ import annotations

import socket
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

KEY = "indicfm/step_seconds"


class KeyValueStore(Protocol):
    """The part of jax's ``DistributedRuntimeClient`` used here (tests pass a dict-backed fake)."""

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None: ...

    def blocking_key_value_get(self, key: str, timeout_in_ms: int) -> str: ...

    def key_value_delete(self, key: str) -> None: ...


@dataclass
class Straggler:
    process: int
    slower_steps: int  # logged steps in the window where it was at least ``slower_by`` x the others' median
    window: int
    median_ratio: float  # its time ÷ the others' median, the median over the window


class StragglerWatch:
    """Names a process whose step time was ``slower_by`` x the median of the other processes' (or
    more) in at least ``share`` of the last ``window`` logged steps; one slow step is noise, a
    pattern is a host."""

    def __init__(self, window: int = 20, slower_by: float = 1.1, share: float = 0.8):
        self.window, self.slower_by, self.share = window, slower_by, share
        self._ratios: deque[dict[int, float]] = deque(maxlen=window)
        self.current: int | None = None

    def update(self, seconds: dict[int, float]) -> Straggler | None:
        """Add one step's times (process → seconds); a :class:`Straggler` when one is newly found."""
        if len(seconds) < 2:
            return None
        ratios = {}
        for process, value in seconds.items():
            others = statistics.median(v for p, v in seconds.items() if p != process)
            ratios[process] = value / others if others > 0 else 1.0
        self._ratios.append(ratios)
        if len(self._ratios) < self.window:
            return None
        found = None
        for process in seconds:
            ratios = [r[process] for r in self._ratios if process in r]
            slow = sum(r >= self.slower_by for r in ratios)
            if slow >= self.share * self.window:
                found = Straggler(process, slow, self.window, statistics.median(ratios))
                break
        new = found if found and found.process != self.current else None
        self.current = found.process if found else None
        return new


class HostStepTimes:
    """The slowest process's time of each logged step (one process: its own time)."""

    def __init__(
        self,
        process_index: int,
        process_count: int,
        store: KeyValueStore | None = None,
        *,
        timeout_s: float = 300.0,
        watch: StragglerWatch | None = None,
    ):
        self.index, self.count = process_index, process_count
        self.store = store if store is not None or process_count == 1 else _jax_store()
        self.timeout_ms = int(timeout_s * 1000)
        self.watch = watch or StragglerWatch()
        if self.count > 1:
            # overwrite: a second train() call in the same processes sets it again
            self.store.key_value_set(f"{KEY}/host/{self.index}", socket.gethostname(), allow_overwrite=True)

    def slowest(self, step: int, seconds: float) -> tuple[float, int, Straggler | None]:
        """(the slowest process's seconds, that process, a newly found straggler or None).

        Every process calls this for every logged step, in the same order; process 0 waits for the
        others' figures."""
        if self.count == 1:
            return seconds, self.index, None
        if self.index != 0:
            # overwrite: a step redone after a restart in the same processes
            self.store.key_value_set(f"{KEY}/{step}/{self.index}", repr(seconds), allow_overwrite=True)
            return seconds, self.index, None
        times = {0: seconds}
        for process in range(1, self.count):
            key = f"{KEY}/{step}/{process}"
            times[process] = float(self.store.blocking_key_value_get(key, self.timeout_ms))
            self.store.key_value_delete(key)
        slowest = max(times, key=times.__getitem__)
        return times[slowest], slowest, self.watch.update(times)

    def host_name(self, process: int) -> str:
        """The host name process ``process`` reported (its index if it cannot be had)."""
        try:
            return self.store.blocking_key_value_get(f"{KEY}/host/{process}", 1000)
        except Exception:  # naming is a courtesy: never stop training over it
            return f"process {process}"


def _jax_store() -> Any:
    """The coordination service client ``jax.distributed.initialize`` started (JAX keeps it in a
    private module; its key-value calls are what ``multihost_utils`` itself builds on)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("several processes but no jax.distributed client: call jax.distributed.initialize() first")
    return client
