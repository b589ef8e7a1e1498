"""Downstream evaluation during training (``eval.downstream``, issue 29): the config, when the loop
evaluates (before a save, after it on preemption), the record it writes, what a resume owes, the
report's figure and table and ``indicfm compare``'s table.

Fast cases drive the loop with a fake step (test_train_actions.py's) and read synthetic logs; the
slow ones train a tiny model, kill it between checkpoints and resume, with the real harness on the
shipped minimal pairs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from indicfm.config import ConfigError, load_config
from indicfm.train import downstream_hook
from indicfm.train.downstream_hook import SECONDS_KEY, due, logged_steps, missed_at_resume
from indicfm.train.loop import PreemptionWatcher, Run, StepLoop, TrainResult

from test_train_actions import FakeBar, FakeCheckpointer, FakeStep, FakeWriter

# -- config -----------------------------------------------------------------------------------------


def test_config_takes_tasks_or_a_suite_and_names_the_key():
    cfg = load_config(None, ["eval.downstream.tasks=[flores_pairs_hin_Deva]", "eval.downstream.every_steps=50"])
    assert cfg.eval.downstream.enabled and cfg.eval.downstream.at_end and cfg.eval.downstream.limit is None
    assert not load_config(None, []).eval.downstream.enabled
    with pytest.raises(ConfigError, match=r"eval\.downstream.*set one of them"):
        load_config(None, ["eval.downstream.tasks=[a]", "eval.downstream.suite=indic-core"])
    with pytest.raises(ConfigError, match=r"eval\.downstream\.every_steps"):
        load_config(None, ["eval.downstream.every_steps=-1"])
    with pytest.raises(ConfigError, match=r"eval\.downstream\.limit"):
        load_config(None, ["eval.downstream.limit=0"])


def test_due_every_n_steps_and_at_the_end():
    cfg = load_config(None, ["eval.downstream.tasks=[t]", "eval.downstream.every_steps=3"]).eval.downstream
    assert [s for s in range(1, 8) if due(cfg, s, 7)] == [3, 6, 7]
    cfg.at_end = False
    assert [s for s in range(1, 8) if due(cfg, s, 7)] == [3, 6]
    cfg.tasks = []
    assert not any(due(cfg, s, 7) for s in range(1, 8))


# -- the loop, with a fake step -------------------------------------------------------------------


class OrderedCheckpointer(FakeCheckpointer):
    def __init__(self, every: int, events: list[str]):
        super().__init__(every)
        self.events = events

    def save(self, step, state, meta, tokenizer):
        self.events.append(f"save {step}")
        return super().save(step, state, meta, tokenizer)


def _fake_run(settings: list[str], events: list[str], evaluated: list[tuple[int, int]]) -> tuple[Run, FakeWriter]:
    cfg = load_config(None, ["logging.progress=false", *settings])
    writer = FakeWriter()

    def evaluator(step, model, mesh):
        evaluated.append((step, model["done"][0]))  # the state the evaluation saw
        events.append(f"downstream {step}")
        return {"downstream/fake_hin_Deva/acc": step / 10}

    run = Run(
        cfg=cfg, mesh=None, state={"done": [0]}, step=0, train_step=FakeStep(set(), []),
        batches=({"tokens": np.full((1, 1), s)} for s in range(1, 10_000)), loader=None,
        checkpointer=OrderedCheckpointer(cfg.checkpoint.every_steps, events), writer=writer, bar=FakeBar(),
        evaluator=None, result=TrainResult(workdir=None, start_step=0, final_step=0, stopped="completed"),
        save_meta=lambda step: {"loader_step": step}, tokenizer={}, tokens_per_step=8, flops_per_step=1.0, peak=1.0,
        say=lambda *a, **k: None, downstream=evaluator,
    )  # fmt: skip
    return run, writer


def test_loop_evaluates_the_state_of_its_step_before_saving_it_and_logs_the_evaluations_own_time(monkeypatch):
    monkeypatch.setattr(downstream_hook, "live_model", lambda graphdef, state: state)  # the fake state is the model
    events: list[str] = []
    evaluated: list[tuple[int, int]] = []
    run, writer = _fake_run(
        ["trainer.steps=7", "checkpoint.every_steps=2", "eval.downstream.tasks=[fake_hin_Deva]", "eval.downstream.every_steps=2"],
        events, evaluated,
    )
    ticks = iter(range(1000))
    run.clock = lambda: float(next(ticks))  # each clock read one second later
    StepLoop(run, PreemptionWatcher(), None, None).run_until(7)
    assert evaluated == [(2, 2), (4, 4), (6, 6), (7, 7)]
    assert [e for e in events if e.startswith(("save", "downstream"))] == [
        "downstream 2", "save 2", "downstream 4", "save 4", "downstream 6", "save 6", "downstream 7", "save 7",
    ]  # fmt: skip
    records = [(step, values) for step, values in writer.records if SECONDS_KEY in values]
    assert [step for step, _ in records] == [2, 4, 6, 7]
    assert records[0][1]["downstream/fake_hin_Deva/acc"] == 0.2
    assert all(values[SECONDS_KEY] == 1.0 for _, values in records)  # two clock reads around the call
    assert sorted(run.result.downstream) == [2, 4, 6, 7]


def test_on_preemption_the_save_comes_first(monkeypatch):
    monkeypatch.setattr(downstream_hook, "live_model", lambda graphdef, state: state)
    events: list[str] = []
    evaluated: list[tuple[int, int]] = []
    run, _ = _fake_run(
        ["trainer.steps=10", "checkpoint.every_steps=100", "eval.downstream.tasks=[t]", "eval.downstream.every_steps=4"],
        events, evaluated,
    )
    StepLoop(run, PreemptionWatcher(), None, stop_at_step=4).run_until(10)
    assert [e for e in events if e.startswith(("save", "downstream"))] == ["save 4", "downstream 4"]
    assert evaluated == [(4, 4)] and run.result.stopped == "preempted"


# -- resume ---------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "down', encoding="utf-8")  # cut short


def test_a_resume_owes_the_evaluation_of_a_saved_step_only_when_it_was_not_logged(tmp_path):
    cfg = load_config(None, ["eval.downstream.tasks=[t]", "eval.downstream.every_steps=4"]).eval.downstream
    path = tmp_path / "metrics.jsonl"
    _write_jsonl(path, [{"step": 3, "loss": 1.0}, {"step": 4, "loss": 1.0}, {"step": 4, "downstream/t/acc": 0.5, SECONDS_KEY: 2.0}])
    assert logged_steps(path) == {4}
    assert not missed_at_resume(cfg, 4, 10, path)  # logged
    assert missed_at_resume(cfg, 8, 10, path)  # due, not logged: a kill during its evaluation
    assert not missed_at_resume(cfg, 6, 10, path)  # not due
    assert not missed_at_resume(cfg, 0, 10, path)  # a fresh run (step 0 is at_start's business)
    assert missed_at_resume(cfg, 10, 10, path)  # the end
    assert logged_steps(tmp_path / "missing.jsonl") == set()


def test_records_after_the_restored_checkpoint_are_dropped_so_a_redone_evaluation_is_not_counted_twice(tmp_path):
    from indicfm.train.metrics import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "downstream/t/acc": 0.1, SECONDS_KEY: 1.0}) + "\n" for s in (2, 4, 6)))
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.drop_after(4)
    writer.close()
    assert logged_steps(path) == {2, 4}


# -- report and compare -----------------------------------------------------------------------------


def _synthetic_run(workdir: Path, accuracy: dict[str, list[float]], bpb: dict[str, float]) -> None:
    """metrics.jsonl of a 4-step run: training records, held-out bpb at the end, two downstream
    evaluations (steps 2 and 4) with standard errors, and a goodput record of 100 s."""
    workdir.mkdir(parents=True)
    records = [{"step": s, "loss": 3.0 - 0.1 * s, "step_seconds": 0.5, "tokens_per_s": 1e3, "model_flops_per_step": 1e9} for s in (1, 2, 3, 4)]
    for index, step in enumerate((2, 4)):
        values = {f"downstream/{task}/acc": acc[index] for task, acc in accuracy.items()}
        values |= {f"downstream/{task}/acc_stderr": 0.05 for task in accuracy}
        records.append({"step": step, **values, SECONDS_KEY: 2.5})
    records.append({"step": 4, **{f"bpb/{lang}": v for lang, v in bpb.items()}})
    records.append({"step": 4, "goodput/wall_s": 100.0, "goodput/productive_s": 80.0, "goodput/evaluation_s": 5.0, "goodput/session": "a"})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_plots_and_tables_downstream_accuracy_per_task_and_language(tmp_path):
    from indicfm.report.html import downstream_rows, summary_rows, write_report
    from indicfm.report.runs import load_run

    _synthetic_run(tmp_path / "a", {"flores_pairs_hin_Deva": [0.55, 0.75], "flores_pairs_tam_Taml": [0.5, 0.65]},
                   {"hin_Deva": 2.5, "tam_Taml": 3.0, "mean": 2.75})  # fmt: skip
    run = load_run(tmp_path / "a")
    assert list(run.downstream_steps) == [2, 4] and run.downstream_tasks == ["flores_pairs_hin_Deva", "flores_pairs_tam_Taml"]
    assert run.final_downstream() == {"flores_pairs_hin_Deva": 0.75, "flores_pairs_tam_Taml": 0.65}
    rows = downstream_rows([run])
    assert rows[0] == {"task": "flores_pairs_hin_Deva", "language": "hin_Deva", "acc a": "0.750 ± 0.050", "bpb a": "2.5000"}
    summary = summary_rows([run])[0]
    assert summary["final downstream acc (mean of tasks)"] == "0.700"
    assert summary["downstream eval share of wall"] == "5.0%"  # 2 x 2.5 s of 100 s
    page = write_report([tmp_path / "a"], tmp_path / "report").read_text(encoding="utf-8")
    assert "downstream.png" in page and "flores_pairs_tam_Taml" in page
    from PIL import Image

    with Image.open(tmp_path / "report" / "downstream.png") as image:
        assert image.width > 100 and np.asarray(image.convert("L")).std() > 0


def test_compare_tables_downstream_accuracy_beside_bits_per_byte(tmp_path):
    from indicfm.report.compare import downstream_table, summarise
    from indicfm.report.runs import load_run

    _synthetic_run(tmp_path / "dense", {"flores_pairs_hin_Deva": [0.5, 0.6]}, {"hin_Deva": 2.5, "mean": 2.5})
    _synthetic_run(tmp_path / "moe", {"flores_pairs_hin_Deva": [0.55, 0.7]}, {"hin_Deva": 2.25, "mean": 2.25})
    histories = [load_run(tmp_path / name) for name in ("dense", "moe")]
    planned = [SimpleNamespace(name=h.name) for h in histories]
    result = summarise(planned, histories, "dense", 1e10, {})
    assert result.final_downstream == {"dense": {"flores_pairs_hin_Deva": 0.6}, "moe": {"flores_pairs_hin_Deva": 0.7}}
    header, rows = downstream_table(result)
    assert dict(zip(header, rows[0])) == {
        "task": "flores_pairs_hin_Deva", "language": "hin_Deva", "acc dense": "0.600", "acc moe": "0.700",
        "bpb dense": "2.5000", "bpb moe": "2.2500",
    }  # fmt: skip


# -- a real run, killed between checkpoints and resumed (slow: two train() calls) -------------------


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_a_run_killed_between_checkpoints_and_resumed_logs_each_evaluation_once(tmp_path, sample_train_dir):
    """Evaluate every 2 steps (and at step 0 and the end) with the real harness on the shipped
    minimal pairs, save every 3, kill after step 5: the evaluation of step 4 (after checkpoint 3)
    is dropped with the steps it followed and done again, on the same parameters; each evaluated
    step has one record, in metrics.jsonl and in the report."""
    import jax
    from flax import nnx

    from indicfm.evaluation.in_loop import InLoopEvaluator
    from indicfm.report.html import write_report
    from indicfm.train.loop import train
    from indicfm.train.metrics import read_metrics

    from helpers import tokenizer_and_cache
    from test_train_loop import TINY_SETTINGS

    (tmp_path / "in").mkdir()
    settings = TINY_SETTINGS + tokenizer_and_cache(tmp_path / "in", sample_train_dir, ["hin_Deva", "tam_Taml"], TINY_SETTINGS)
    cfg = load_config(None, settings + [
        "trainer.steps=6", "checkpoint.every_steps=3", "eval.downstream.tasks=[flores_pairs_hin_Deva]",
        "eval.downstream.every_steps=2", "eval.downstream.at_start=true", "eval.downstream.limit=4",
    ])  # fmt: skip

    class WithChecksum(InLoopEvaluator):
        """The harness's scores plus a checksum of the parameters it was shown."""

        def __call__(self, step, model, mesh):
            leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
            checksum = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))
            return {**super().__call__(step, model, mesh), "downstream/checksum/value": checksum}

    def crash_after_5(step, record):
        if step == 5:
            raise Crash

    workdir = tmp_path / "run"
    with pytest.raises(Crash):
        train(cfg, workdir, on_step=crash_after_5, downstream=WithChecksum)
    before = {r["step"]: r for r in read_metrics(workdir / "metrics.jsonl") if SECONDS_KEY in r}
    assert sorted(before) == [0, 2, 4]
    resumed = train(cfg, workdir, downstream=WithChecksum)
    assert resumed.start_step == 3 and sorted(resumed.downstream) == [4, 6]
    after = [r for r in read_metrics(workdir / "metrics.jsonl") if SECONDS_KEY in r]
    assert [r["step"] for r in after] == [0, 2, 4, 6]  # none repeated, none lost
    redone = next(r for r in after if r["step"] == 4)
    assert redone["downstream/checksum/value"] == before[4]["downstream/checksum/value"]  # the same step-4 parameters
    assert 0.0 <= redone["downstream/flores_pairs_hin_Deva/acc"] <= 1.0
    # the evaluations' own time is evaluation in the goodput breakdown, not step time
    assert resumed.goodput["evaluation"] >= sum(r[SECONDS_KEY] for r in after if r["step"] in (4, 6)) - 1e-6
    page = write_report([workdir], tmp_path / "report").read_text(encoding="utf-8")
    assert "downstream.png" in page and "flores_pairs_hin_Deva" in page
