"""Step times and the goodput breakdown under a fake clock and a fake device: steps with known
durations, a compile, a dispatch that blocks, data waits, checkpoints and evaluations in between, a
restart. The measured step times must equal the known durations, the categories must equal the
hand-derived figures (each derivation is written out) and add up to the wall clock, and work lost to
a restart must be counted once. No real time is measured."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from indicfm.config import load_config
from indicfm.train.device_time import ReadyTimes, compile_count
from indicfm.train.goodput import CATEGORIES, Timeline, describe, last_logged_step
from indicfm.train.hosts import HostStepTimes, StragglerWatch
from indicfm.train.loop import PreemptionWatcher, Run, StepLoop, TrainResult
from indicfm.train.metrics import MetricsWriter, Peak


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait_until(self, moment: float) -> None:
        self.now = max(self.now, moment)


class FakeLeaf:
    """A metrics leaf on the fake device (the loop starts its copy to the host)."""

    def __init__(self, step: int):
        self.step = step

    def copy_to_host_async(self) -> None:
        pass


class FakeDevice:
    """Runs one step at a time: a step starts when it is queued and its predecessor has finished,
    and takes ``durations[step]``.  The first dispatch compiles for ``compile_s`` (and says so through
    jax.monitoring, as jit does); a dispatch of a step in ``blocking`` waits until the device is free,
    as a dispatch does when JAX's queue is full.  Reading a step's metrics waits for the step."""

    def __init__(self, clock: FakeClock, durations: dict[int, float], compile_s: float, blocking=(), first_step: int = 1):
        self.clock, self.durations, self.compile_s, self.blocking = clock, durations, compile_s, set(blocking)
        self.next_step = first_step
        self.free_at = 0.0
        self.done: dict[int, float] = {}
        self.compiled = False

    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        step = self.next_step
        self.next_step += 1
        assert int(batch["tokens"][0, 0]) == step
        if not self.compiled:
            self.clock.advance(self.compile_s)
            jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", self.compile_s)
            self.compiled = True
        if step in self.blocking:
            self.clock.wait_until(self.free_at)
        start = max(self.clock(), self.free_at)
        self.done[step] = self.free_at = start + self.durations[step]
        return state, {"step": FakeLeaf(step)}

    def read(self, metrics: dict) -> dict:
        """The loop's ``fetch_metrics``: wait until the step is done."""
        step = metrics["step"].step
        self.clock.wait_until(self.done[step])
        return {
            "loss": np.float32(1.0 / step), "ce_loss": np.float32(1.0 / step), "aux_loss": np.float32(0.0),
            "lr": np.float32(1e-3), "grad_norm": np.float32(1.0), "expert_counts": np.ones((1, 4)),
            "dropped_fraction": np.float32(0.0), "step_ok": np.bool_(True),
            "nonfinite_in_a_row": np.int32(0), "nonfinite_total": np.int32(0),
        }  # fmt: skip

    # the completion source (device_time.ReadyTimes in a real run)
    def watch(self, step: int, marker) -> None:
        pass

    def completed_at(self, step: int) -> tuple[float | None, float]:
        return None, self.done[step]  # seen exactly

    def close(self) -> None:
        pass


class FakeCheckpointer:
    def __init__(self, clock: FakeClock, every: int, save_s: float, close_s: float):
        self.clock, self.every, self.save_s, self.close_s = clock, every, save_s, close_s
        self.saved: list[int] = []

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def reached_preemption(self, step: int) -> bool:
        return False

    def save(self, step, state, meta, tokenizer) -> bool:
        self.clock.advance(self.save_s)
        self.saved.append(step)
        return True

    def close(self) -> None:
        self.clock.advance(self.close_s)  # waits for the background write of the last save


class ListWriter:
    def __init__(self) -> None:
        self.records: list[tuple[int, dict]] = []

    def write(self, step: int, values: dict) -> None:
        self.records.append((step, dict(values)))

    def close(self) -> None:
        pass


class NoBar:
    def update(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


def batches(clock: FakeClock, first: int, data_s: dict[int, float]):
    """The loader: the batch of step s costs ``data_s[s]`` of host time (0 when prefetched)."""
    for step in range(first, 10_000):
        clock.advance(data_s.get(step, 0.0))
        yield {"tokens": np.full((1, 1), step)}


def fake_run(
    clock: FakeClock, device: FakeDevice, settings: list[str], *, start_step=0, data_s=None, save_s=0.0, close_s=0.0,
    eval_s=None, timeline=None, writer=None, flops=1e9, peak=1e10, on_step=None, messages=None, session="s",
):  # fmt: skip
    """Run the real StepLoop over the fake device to ``trainer.steps`` and close it as train() does."""
    cfg = load_config(None, ["logging.progress=false", *settings])
    checkpointer = FakeCheckpointer(clock, cfg.checkpoint.every_steps, save_s, close_s)
    run = Run(
        cfg=cfg, mesh=None, state={}, step=start_step, train_step=device.train_step,
        batches=batches(clock, start_step + 1, data_s or {}), loader=None, checkpointer=checkpointer,
        writer=writer if writer is not None else ListWriter(), bar=NoBar(),
        evaluator=(lambda state: clock.advance(eval_s) or {"mean": 1.0}) if eval_s is not None else None,
        result=TrainResult(workdir=None, start_step=start_step, final_step=start_step, stopped="completed"),
        save_meta=lambda step: {}, tokenizer={}, tokens_per_step=1024, flops_per_step=flops,
        peak=Peak(peak, "fake", "float32"), say=(messages.append if messages is not None else lambda *a, **k: None),
        clock=clock, timeline=timeline if timeline is not None else Timeline(clock, start=0.0),
        ready=device, hosts=HostStepTimes(0, 1), session=session,
    )  # fmt: skip
    import indicfm.train.loop as loop_module

    saved_fetch, loop_module.fetch_metrics = loop_module.fetch_metrics, device.read
    loop = StepLoop(run, PreemptionWatcher(), on_step, None)
    finished = False
    try:
        loop.run_until(cfg.trainer.steps)
        loop.finish()
        finished = True
    finally:
        loop_module.fetch_metrics = saved_fetch
        loop.close(finished)
    return run, checkpointer


DURATIONS = {1: 0.30, 2: 0.25, 3: 0.25, 4: 0.40, 5: 0.25, 6: 0.25, 7: 0.25, 8: 0.25}


def test_step_times_are_the_devices_whatever_the_hosts_read_pattern():
    """Six steps: compile 2 s on the first dispatch, step 2's dispatch blocks until step 1 is done,
    a save (0.2 s) after steps 3 and 6, an evaluation (0.5 s) after steps 4 and 6, the batch of step
    1 takes 0.5 s and that of step 5 0.7 s, closing waits 0.1 s for the last background write."""
    clock = FakeClock()
    device = FakeDevice(clock, DURATIONS, compile_s=2.0, blocking={2})
    run, checkpointer = fake_run(
        clock, device, ["trainer.steps=6", "checkpoint.every_steps=3", "eval.every_steps=4"],
        data_s={1: 0.5, 5: 0.7}, save_s=0.2, close_s=0.1, eval_s=0.5,
    )  # fmt: skip
    assert checkpointer.saved == [3, 6]
    assert run.result.step_seconds == {s: pytest.approx(DURATIONS[s]) for s in range(1, 7)}
    records = [values for _, values in run.writer.records if "loss" in values]
    assert [r["step_seconds"] for r in records] == [pytest.approx(DURATIONS[s]) for s in range(1, 7)]
    assert [r["tokens_per_s"] for r in records] == [pytest.approx(1024 / DURATIONS[s]) for s in range(1, 7)]
    assert [r["mfu"] for r in records] == [pytest.approx(1e9 / DURATIONS[s] / 1e10) for s in range(1, 7)]
    assert records[0]["peak_flops"] == 1e10 and records[0]["peak_name"] == "fake" and records[0]["peak_dtype"] == "float32"

    # Hand timeline (host clock): batch 1 [0, 0.5]; compile [0.5, 2.5]; step 1 2.5-2.8; step 2 2.8-3.05;
    # step 3 3.05-3.3; save [3.3, 3.5]; step 4 3.5-3.9 while batch 5 loads [3.5, 4.2] (idle 3.9-4.2);
    # eval [4.2, 4.7]; step 5 4.7-4.95; step 6 4.95-5.2; save [5.2, 5.4]; eval [5.4, 5.9]; close [5.9, 6.0].
    expected = {
        "productive": sum(DURATIONS[s] for s in range(1, 7)),  # 1.70
        "compile": 2.0,
        "data": 0.5 + 0.3,  # batch 1 entirely; batch 5 only where step 4 no longer ran
        "checkpoint": 0.2 + 0.2 + 0.1,
        "evaluation": 0.5 + 0.5,
    }
    goodput = run.result.goodput
    assert {c: v for c, v in goodput.items() if v} == {c: pytest.approx(v) for c, v in expected.items()}
    assert run.result.wall_seconds == pytest.approx(6.0) and sum(goodput.values()) == pytest.approx(6.0)
    final_step, final = run.writer.records[-1]
    assert final_step == 6 and "loss" not in final
    assert final["goodput/wall_s"] == pytest.approx(6.0) and final["goodput/session"] == "s"
    assert {c: final[f"goodput/{c}_s"] for c in expected} == {c: pytest.approx(v) for c, v in expected.items()}
    # the record of step 3 holds the breakdown up to the end of step 3 (3.3 s)
    step3 = records[2]
    assert step3["goodput/wall_s"] == pytest.approx(3.3)
    assert sum(step3[f"goodput/{c}_s"] for c in CATEGORIES) == pytest.approx(3.3)


def test_a_step_queued_behind_a_slow_one_is_charged_only_its_own_time():
    """The host reads every step one late; steps 2 and 3 are queued long before they start."""
    clock = FakeClock()
    durations = {1: 1.0, 2: 0.1, 3: 0.1, 4: 1.0}
    device = FakeDevice(clock, durations, compile_s=0.0)
    run, _ = fake_run(clock, device, ["trainer.steps=4", "checkpoint.every_steps=100"])
    assert run.result.step_seconds == {s: pytest.approx(d) for s, d in durations.items()}
    assert run.result.goodput["productive"] == pytest.approx(2.2) and run.result.wall_seconds == pytest.approx(2.2)


def test_restart_counts_the_lost_steps_once_as_recomputed(tmp_path):
    """Session 1 logs steps 1-6 (checkpoint at 4) and crashes; session 2 restores step 4 (1 s),
    recomputes 5 and 6 and finishes 7 and 8.  The workdir's goodput, summed over both sessions as
    `indicfm report` reads it, has steps 5 and 6 once, as recomputed."""
    from indicfm.report.runs import load_run

    settings = ["trainer.steps=8", "checkpoint.every_steps=4"]

    class Crash(RuntimeError):
        pass

    def crash_after_6(step, record):
        if step == 6:
            raise Crash

    clock = FakeClock()
    writer = MetricsWriter(tmp_path, tensorboard=False)
    with pytest.raises(Crash):
        fake_run(clock, FakeDevice(clock, DURATIONS, compile_s=2.0), settings, writer=writer, on_step=crash_after_6, session="a")
    writer.close()
    # session 1 up to the end of step 4: compile 2 s, steps 1-4 (0.3 + 0.25 + 0.25 + 0.4)

    assert last_logged_step(tmp_path / "metrics.jsonl") == 6
    clock = FakeClock()
    timeline = Timeline(clock, start=0.0, recomputed_through=last_logged_step(tmp_path / "metrics.jsonl"))
    with timeline.host("restore"):
        clock.advance(1.0)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.drop_after(4)
    run, _ = fake_run(
        clock, FakeDevice(clock, DURATIONS, compile_s=2.0, first_step=5), settings, start_step=4, timeline=timeline,
        writer=writer, session="b",
    )  # fmt: skip
    assert run.result.goodput["recomputed"] == pytest.approx(0.25 + 0.25)
    assert run.result.goodput["productive"] == pytest.approx(0.25 + 0.25)
    assert run.result.goodput["restore"] == pytest.approx(1.0) and run.result.goodput["compile"] == pytest.approx(2.0)

    history = load_run(tmp_path, "run")
    total = history.goodput_totals()
    assert total["recomputed"] == pytest.approx(0.5)  # steps 5 and 6, once
    assert total["productive"] == pytest.approx(0.3 + 0.25 + 0.25 + 0.4 + 0.25 + 0.25)  # steps 1-4, 7, 8
    assert total["compile"] == pytest.approx(4.0) and total["restore"] == pytest.approx(1.0)
    assert history.goodput_wall() == pytest.approx(sum(total.values()))
    assert history.goodput_wall() == pytest.approx((2.0 + 1.2) + (1.0 + 2.0 + 1.0))
    assert sorted(history.steps.tolist()) == list(range(1, 9))


def test_impossible_mfu_is_reported_as_a_bug_not_logged():
    clock = FakeClock()
    messages: list[str] = []
    device = FakeDevice(clock, DURATIONS, compile_s=0.0)
    run, _ = fake_run(clock, device, ["trainer.steps=2", "checkpoint.every_steps=100"], flops=1e10, peak=1e10, messages=messages)
    records = [values for _, values in run.writer.records if "loss" in values]
    assert all(math.isnan(r["mfu"]) for r in records)  # 1e10 FLOP in 0.3 s against 1e10 FLOP/s: 3.3
    bugs = [m for m in messages if "bug" in m]
    assert len(bugs) == 1 and "MFU 3.33 > 1" in bugs[0] and "fake" in bugs[0]
    assert math.isnan(run.result.max_mfu)


def test_nested_host_labels_and_idle_time_without_a_label():
    clock = FakeClock()
    timeline = Timeline(clock, start=0.0)
    with timeline.host("startup"):
        clock.advance(1.0)
        with timeline.host("restore"):
            clock.advance(2.0)
        clock.advance(0.5)
    clock.advance(0.25)  # unlabelled: other
    timeline.dispatched(1, clock())
    clock.advance(0.1)
    with timeline.host("data"):  # overlaps the running step: costs nothing
        clock.advance(0.2)
    assert timeline.completed(1, 4.25) == pytest.approx(0.5)
    timeline.advance(4.5)
    assert timeline.totals() == {**dict.fromkeys(CATEGORIES, 0.0), "startup": 1.5, "restore": 2.0, "other": 0.5, "productive": 0.5}
    assert timeline.wall() == 4.5
    assert describe(timeline.totals(), timeline.wall()).startswith("wall 4.5 s = productive 0.5 s (11.1%)")
    timeline.dispatched(2, 5.0)
    with pytest.raises(RuntimeError, match="in flight"):
        timeline.advance(6.0)


def test_ready_times_bracket_the_end_of_each_step_between_two_polls():
    """The polling thread reports (start of the last poll that saw the step running, end of the
    first that saw it done), in step order.  Scripted: step 1 is polled three times, the third sees
    it done; step 2 is already done at its first poll (no lower bound)."""
    clock_values = iter([1.0, 1.001, 1.3, 1.31, 2.0, 2.01])  # clock before each poll, and after the last
    polls = {1: iter([False, False, True]), 2: iter([True])}
    ready = ReadyTimes(lambda: next(clock_values), is_ready=lambda step: next(polls[step]), sleep=lambda s: None)
    ready.watch(1, 1)
    ready.watch(2, 2)
    assert ready.completed_at(1, timeout=30) == (1.001, 1.31)
    assert ready.completed_at(2, timeout=30) == (None, 2.01)
    ready.close()
    with pytest.raises(TimeoutError):
        ReadyTimes().completed_at(1, timeout=0.01)


def test_a_step_end_seen_late_is_taken_at_the_middle_of_its_interval():
    """A stall delayed the sighting of step 1's end: it ended between 1.0 and 1.4.  The middle
    (1.2) is taken, the error bound is half the interval, and step 2, which started at step 1's
    end, carries that error too."""
    timeline = Timeline(FakeClock(), start=0.0)
    timeline.dispatched(1, 0.5)
    timeline.dispatched(2, 0.6)
    assert timeline.completed(1, 1.4, not_before=1.0) == pytest.approx(0.7)
    assert timeline.last_error == pytest.approx(0.2)
    assert timeline.completed(2, 1.6005, not_before=1.5995) == pytest.approx(0.4)
    assert timeline.last_error == pytest.approx(0.2 + 0.0005)
    assert timeline.totals()["productive"] == pytest.approx(1.1) and timeline.wall() == pytest.approx(1.6)


def test_ready_times_on_real_arrays_and_compile_detection():
    import jax.numpy as jnp

    ready = ReadyTimes()
    fn = jax.jit(lambda x: x * 2.0)
    before = compile_count()
    out = fn(jnp.ones(7))
    assert compile_count() > before  # a new shape compiled
    again = compile_count()
    fn(jnp.ones(7))
    assert compile_count() == again  # the cached program did not
    import time

    dispatched = time.perf_counter()
    ready.watch(1, {"out": out})
    jax.block_until_ready(out)
    not_before, ready_by = ready.completed_at(1, timeout=30)
    assert ready_by >= dispatched and (not_before is None or not_before <= ready_by)
    ready.close()


class DictStore:
    """The coordination service's key-value store, in memory (all processes share it)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        assert allow_overwrite or key not in self.values
        self.values[key] = value

    def blocking_key_value_get(self, key: str, timeout_in_ms: int) -> str:
        return self.values[key]

    def key_value_delete(self, key: str) -> None:
        self.values.pop(key, None)


def test_the_slowest_process_is_logged_and_a_persistent_straggler_named():
    store = DictStore()
    hosts = [HostStepTimes(p, 3, store, watch=StragglerWatch(window=5, slower_by=1.1, share=0.8)) for p in range(3)]
    found = []
    for step in range(1, 11):
        times = {0: 0.50, 1: 0.52, 2: 0.70 if step >= 3 else 0.51}  # process 2 slows down from step 3
        for p in (1, 2):
            assert hosts[p].slowest(step, times[p]) == (times[p], p, None)
        seconds, slowest, straggler = hosts[0].slowest(step, times[0])
        assert (seconds, slowest) == (max(times.values()), max(times, key=times.get))
        if straggler:
            found.append((step, straggler.process))
    assert found == [(6, 2)]  # named once: steps 3-6 are 4 of the last 5 at >= 1.1x the others' median
    assert hosts[0].host_name(2) and not [k for k in store.values if not k.startswith("indicfm/step_seconds/host/")]
    assert HostStepTimes(0, 1).slowest(1, 0.3) == (0.3, 0, None)
