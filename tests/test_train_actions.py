"""The step loop's periodic actions against a fake step (no model, fast): which steps are saved and
evaluated, with which state, the non-finite stop, preemption, and that the host reads step n only
after dispatching step n+1 unless an action needs step n's state.

The fake step updates its state *in place*, as a donating jitted step overwrites the old state's
buffers: a checkpoint or evaluation that ran after the next step was dispatched would see the wrong
step's state."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from indicfm.config import load_config
from indicfm.train.loop import PreemptionWatcher, Run, StepLoop, TrainResult


class FakeStep:
    """``state["done"][0]`` counts updates; steps listed in ``nonfinite`` are skipped like optax's
    ``apply_if_finite`` does (no update, counters advance)."""

    def __init__(self, nonfinite: set[int], events: list[str]):
        self.nonfinite, self.events = nonfinite, events
        self.dispatched = self.in_a_row = self.total = 0

    def __call__(self, state: dict, batch: dict) -> tuple[dict, dict]:
        self.dispatched += 1
        step = self.dispatched
        assert int(batch["tokens"][0, 0]) == step  # the batch of this step, in order
        ok = step not in self.nonfinite
        self.in_a_row = 0 if ok else self.in_a_row + 1
        self.total += not ok
        state["done"][0] = step  # in place: the previous state is gone, as with donated buffers
        self.events.append(f"dispatch {step}")
        loss = 1.0 / step if ok else float("nan")
        metrics = {
            "loss": loss, "ce_loss": loss, "aux_loss": 0.0, "lr": 1e-3, "grad_norm": 1.0,
            "expert_counts": np.ones((1, 4)), "dropped_fraction": 0.0, "step_ok": ok,
            "nonfinite_in_a_row": self.in_a_row, "nonfinite_total": self.total,
        }  # fmt: skip
        return state, {k: jnp.asarray(v) for k, v in metrics.items()}


class FakeCheckpointer:
    def __init__(self, every: int):
        self.every, self.saved = every, []

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def reached_preemption(self, step: int) -> bool:
        return False

    def save(self, step: int, state: dict, meta: dict, tokenizer: dict) -> bool:
        self.saved.append((step, state["done"][0], meta["loader_step"]))
        return True


class FakeWriter:
    def __init__(self):
        self.records: list[tuple[int, dict]] = []

    def write(self, step: int, values: dict) -> None:
        self.records.append((step, dict(values)))


class FakeBar:
    def update(self, *args) -> None:
        pass


def run_loop(settings: list[str], *, nonfinite=(), stop_at_step=None, on_step=None, evaluate=False):
    """Run a StepLoop over the fake step; returns (result, checkpointer, writer, events, evaluated)."""
    cfg = load_config(None, ["logging.progress=false", *settings])
    events: list[str] = []
    evaluated: list[int] = []
    checkpointer = FakeCheckpointer(cfg.checkpoint.every_steps)
    writer = FakeWriter()

    import indicfm.train.loop as loop_module

    real_fetch = loop_module.fetch_metrics

    def recording_fetch(metrics):
        host = real_fetch(metrics)
        events.append(f"read {sum(e.startswith('read') for e in events) + 1}")
        return host

    run = Run(
        cfg=cfg,
        mesh=None,
        state={"done": [0]},
        step=0,
        train_step=FakeStep(set(nonfinite), events),
        batches=({"tokens": np.full((1, 1), s)} for s in range(1, 10_000)),
        loader=None,
        checkpointer=checkpointer,
        writer=writer,
        bar=FakeBar(),
        evaluator=(lambda state: evaluated.append(state["done"][0]) or {"mean": 1.0}) if evaluate else None,
        result=TrainResult(workdir=None, start_step=0, final_step=0, stopped="completed"),
        save_meta=lambda step: {"loader_step": step},
        tokenizer={},
        tokens_per_step=8,
        flops_per_step=1.0,
        peak=1.0,
        say=lambda *a, **k: None,
    )
    loop_module.fetch_metrics, saved_fetch = recording_fetch, loop_module.fetch_metrics
    try:
        StepLoop(run, PreemptionWatcher(), on_step, stop_at_step).run_until(cfg.trainer.steps)
    finally:
        loop_module.fetch_metrics = saved_fetch
    return run.result, checkpointer, writer, events, evaluated


def test_steps_are_read_one_late_except_where_an_action_needs_the_state():
    result, checkpointer, writer, events, _ = run_loop(["trainer.steps=7", "checkpoint.every_steps=3"])
    assert events == [
        "dispatch 1", "dispatch 2", "read 1", "dispatch 3", "read 2", "read 3",
        "dispatch 4", "dispatch 5", "read 4", "dispatch 6", "read 5", "read 6", "dispatch 7", "read 7",
    ]  # fmt: skip
    # each save holds the state after its own step, and the loader position of that step
    assert checkpointer.saved == [(3, 3, 3), (6, 6, 6), (7, 7, 7)]
    assert [step for step, _ in writer.records] == [1, 2, 3, 4, 5, 6, 7]
    assert result.losses == {s: pytest.approx(1.0 / s) for s in range(1, 8)}
    assert result.final_step == 7 and result.stopped == "completed" and result.last_checkpoint_step == 7


def test_records_are_the_same_whenever_they_are_read():
    """A record describes its own step (loss 1/step here) whether it was read late or at once."""
    _, _, writer, _, _ = run_loop(["trainer.steps=5", "checkpoint.every_steps=2", "logging.every_steps=2"])
    assert [(step, record["loss"]) for step, record in writer.records] == [
        (2, pytest.approx(0.5)), (4, pytest.approx(0.25)), (5, pytest.approx(0.2))
    ]


def test_nonfinite_run_stops_unsaved_and_periodic_saves_wait_for_a_finite_step():
    result, checkpointer, writer, _, _ = run_loop(
        ["trainer.steps=20", "checkpoint.every_steps=2", "trainer.max_consecutive_nonfinite=3"], nonfinite={5, 6, 9, 10, 11}
    )
    # step 6 ends inside a run of non-finite steps: not saved; 8 is finite again; 11 is the 3rd in a row
    assert [step for step, _, _ in checkpointer.saved] == [2, 4, 8]
    assert result.stopped == "nonfinite" and result.final_step == 11 and "3 non-finite steps in a row" in result.message
    assert result.skipped_steps == 5 and result.last_checkpoint_step == 8
    assert sorted(result.losses) == list(range(1, 12)) and [s for s, _ in writer.records] == list(range(1, 12))


def test_preemption_saves_the_step_it_finished_then_stops():
    seen: list[int] = []
    result, checkpointer, _, events, _ = run_loop(
        ["trainer.steps=10", "checkpoint.every_steps=100"], stop_at_step=4, on_step=lambda s, r: seen.append(s)
    )
    assert checkpointer.saved == [(4, 4, 4)]
    assert result.stopped == "preempted" and result.final_step == 4 and "stop_at_step" in result.message
    assert seen == [1, 2, 3, 4] and events[-1] == "read 4" and "dispatch 5" not in events


def test_evaluation_sees_the_state_of_its_step():
    result, _, writer, _, evaluated = run_loop(
        ["trainer.steps=5", "checkpoint.every_steps=100", "eval.every_steps=2"], evaluate=True
    )
    assert evaluated == [2, 4, 5]
    assert sorted(result.eval_bpb) == [2, 4, 5]
    assert [step for step, values in writer.records if "bpb/mean" in values] == [2, 4, 5]
