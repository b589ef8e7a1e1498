"""The training loop end to end on the shipped sample, with a tiny model (fast variants):
crash → resume gives bit-identical losses, the loss falls, non-finite steps stop the run with the
last good checkpoint intact, metrics.jsonl and TensorBoard files are written."""

import tempfile

import jax
import numpy as np
import pytest

from indicfm.config import load_config
from indicfm.train.loop import train

from helpers import read_losses, tokenizer_and_cache

LANGS = ["hin_Deva", "tam_Taml", "eng_Latn"]

# Share compiled programs between the train() calls of this module (each call builds new jit
# functions).  Only effective if nothing in this worker process compiled before this import.
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="indicfm-test-jax-cache-"))

TINY_SETTINGS = [
    "model.vocab_size=2048", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
    "model.num_kv_heads=1", "model.head_dim=16", "model.d_ff=64", "model.num_experts=4", "model.top_k=2",
    "model.d_expert=32", "model.first_dense_layers=1", "model.compute_dtype=float32", "model.max_seq_len=64",
    "model.loss_free_bias=true",
    "tokenizer.vocab_size=2048", "data.seq_len=64", "data.workers=1",
    "trainer.global_batch_size=8", "trainer.steps=6", "checkpoint.every_steps=2",
    "optimizer.learning_rate=0.01", "optimizer.warmup_steps=1",
    "logging.progress=false", "mesh.data=-1", "trainer.compilation_cache_dir=null",
]


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sample_train_dir) -> list[str]:
    """Tokenizer and token cache built once from three languages of the shipped sample."""
    root = tmp_path_factory.mktemp("inputs")
    return TINY_SETTINGS + tokenizer_and_cache(root, sample_train_dir, LANGS, TINY_SETTINGS)


def test_crash_and_resume_reproduces_losses_bit_for_bit(prepared, tmp_path):
    """Crash after step 5 (checkpoint at 4), re-run: step 5 is recomputed from the checkpoint and
    must give the loss the crashed run logged, bit for bit.  (The SIGKILL test in
    test_train_signals.py compares every step against an uninterrupted run.)"""
    cfg = load_config(None, prepared)

    def crash_after_5(step, record):
        if step == 5:
            raise Crash

    crashed_losses = {}
    with pytest.raises(Crash):
        train(cfg, tmp_path, on_step=lambda s, r: (crashed_losses.__setitem__(s, r["loss"]), crash_after_5(s, r)))
    resumed = train(cfg, tmp_path)
    assert resumed.start_step == 4 and resumed.final_step == 6 and resumed.stopped == "completed"
    assert resumed.losses[5] == crashed_losses[5]  # exact float equality, not approx
    # metrics.jsonl reads as one clean history: the crashed run's record of step 5 was replaced
    logged = read_losses(tmp_path)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert {s: logged[s] for s in (1, 2, 3, 4)} == {s: crashed_losses[s] for s in (1, 2, 3, 4)}
    records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(records) == 6
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "config.yaml").is_file()
    # the loss falls on real text
    assert np.mean([logged[5], logged[6]]) < logged[1]
    # the resumed call's wall clock, accounted: step 5 was logged before the crash, so redoing it is
    # lost work; step 6 is new; each step's time on the devices is positive and in its record
    assert set(resumed.step_seconds) == {5, 6} and all(s > 0 for s in resumed.step_seconds.values())
    assert resumed.goodput["recomputed"] == pytest.approx(resumed.step_seconds[5])
    assert resumed.goodput["productive"] == pytest.approx(resumed.step_seconds[6])
    assert resumed.goodput["restore"] > 0 and resumed.goodput["startup"] > 0
    assert sum(resumed.goodput.values()) == pytest.approx(resumed.wall_seconds)
    import json

    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 6 and "loss" not in final and final["goodput/wall_s"] == pytest.approx(resumed.wall_seconds, abs=1e-5)
    assert resumed.peak is not None and resumed.peak.dtype == "float32" and resumed.peak.name.startswith("cpu: float32 matmul")


def test_profile_steps_write_a_trace_of_those_steps(prepared, tmp_path):
    cfg = load_config(None, prepared + ["trainer.steps=3", "logging.profile_steps=[2,3]", "logging.tensorboard=false"])
    result = train(cfg, tmp_path)
    assert result.stopped == "completed"
    traces = sorted(p.name for p in (tmp_path / "profile").rglob("*") if p.is_file())
    assert any(name.endswith(".xplane.pb") for name in traces), traces
    assert any(name.endswith(".trace.json.gz") for name in traces), traces  # for Perfetto
    assert result.goodput["profiler"] > 0  # starting and writing the trace, not step time


def test_next_step_is_dispatched_before_the_last_ones_metrics_are_read_and_sigterm_saves_the_finished_step(
    prepared, tmp_path, monkeypatch
):
    """The host never waits for step n before dispatching step n+1, except where a checkpoint needs
    step n's state (here steps 3 and 5); a SIGTERM raised while step 4 is logged (step 5 already
    dispatched) saves step 5, the step the loop had finished when it looked, as before pipelining."""
    import signal

    import indicfm.train.loop as loop_module
    import indicfm.train.step as step_module

    events: list[str] = []
    real_build, real_fetch = step_module.build_train_step, loop_module.fetch_metrics

    def recording_build(*args):
        jitted = real_build(*args)

        def step(state, batch):
            out = jitted(state, batch)
            events.append(f"dispatch {sum(e.startswith('dispatch') for e in events) + 1}")
            return out

        return step

    def recording_fetch(metrics):
        host = real_fetch(metrics)
        events.append(f"read {sum(e.startswith('read') for e in events) + 1}")
        return host

    monkeypatch.setattr(step_module, "build_train_step", recording_build)
    monkeypatch.setattr(loop_module, "fetch_metrics", recording_fetch)

    def sigterm_at_4(step, record):
        if step == 4:
            signal.raise_signal(signal.SIGTERM)

    cfg = load_config(None, prepared + ["checkpoint.every_steps=3"])
    result = train(cfg, tmp_path, on_step=sigterm_at_4)
    assert events == [
        "dispatch 1", "dispatch 2", "read 1", "dispatch 3", "read 2", "read 3",  # read 3 before dispatch 4: saved
        "dispatch 4", "dispatch 5", "read 4", "read 5",  # SIGTERM in step 4's on_step: step 5 read and saved
    ]  # fmt: skip
    for n in (1, 2, 4):
        assert events.index(f"dispatch {n + 1}") < events.index(f"read {n}")
    assert result.stopped == "preempted" and "SIGTERM" in result.message
    assert result.final_step == 5 and result.last_checkpoint_step == 5
    from indicfm.train.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "checkpoints", cfg.checkpoint).steps() == [3, 5]
    assert sorted(read_losses(tmp_path)) == [1, 2, 3, 4, 5]  # every step logged, none twice


@pytest.mark.slow
def test_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    cfg = load_config(None, prepared + ["trainer.steps=4"])
    first = train(cfg, tmp_path)
    assert first.last_checkpoint_step == 4

    import indicfm.train.step as step_module

    real = step_module.masked_cross_entropy_sum

    def poisoned(*args):
        total, count = real(*args)
        return total * np.nan, count

    monkeypatch.setattr(step_module, "masked_cross_entropy_sum", poisoned)
    cfg = load_config(None, prepared + ["trainer.steps=10", "trainer.max_consecutive_nonfinite=3"])
    result = train(cfg, tmp_path)
    assert result.stopped == "nonfinite" and result.final_step == 7
    assert result.skipped_steps == 3 and "3 non-finite steps in a row" in result.message
    assert result.last_checkpoint_step == 4
    from indicfm.train.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "checkpoints", cfg.checkpoint).steps() == [2, 4]
