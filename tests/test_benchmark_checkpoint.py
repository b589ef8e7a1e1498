"""benchmarks.checkpoint's restore part on tiny-moe: a real checkpoint written and restored in fresh
processes -- the figures the issue asks for exist.  (Not with ``cold_restore``: dropping the page
cache would slow every other test running beside this one.)"""

import pytest

from benchmarks import checkpoint


def test_quick_restore_figures():
    figures = checkpoint.run(quick=True, restore_only=True)
    assert figures["restore_model"] == "tiny-moe"
    assert figures["restore_s"] > 0 and figures["state_gb"] > 0
    # the checkpoint on disk holds the whole state, uncompressed (plus small JSON items)
    assert figures["checkpoint_on_disk_gb"] >= figures["state_gb"]
    assert figures["restore_page_cache"] == "warm (just written)"


@pytest.mark.slow
def test_stall_figures_from_real_saves(tmp_path):
    """measure_stall really saves (every save ends up on disk, the last ``keep_last`` kept) and its
    figures are consistent with each other."""
    model = checkpoint._model_config("tiny-moe").model_copy(update={"num_layers": 2})
    figures = checkpoint.measure_stall(model, seq_len=32, batch_size=8, saves=2, workdir=tmp_path,
                                       quiet_steps_between=1)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 2 and steps[-1] > steps[0] > 0  # keep_last=2: the two timed saves
    assert 0 < figures["save_call_s"] < figures["save_stall_s"] + 10 * figures["step_s"]
    assert figures["save_call_over_step_time"] > 0
    assert len(figures["stall_per_save_over_step_time_each"]) == 2
    assert figures["goal_stall_per_save_le_2pct"] == (figures["stall_per_save_over_step_time"] <= 0.02)


@pytest.mark.slow
def test_stall_model_and_shapes_are_chosen_by_the_caller():
    """The accelerator path: the stall measured with the model and shapes asked for (one save)."""
    figures = checkpoint.run(quick=True, stall_model="tiny-moe", stall_seq_len=32, stall_batch_size=8, saves=1)
    assert figures["stall_model"] == "tiny-moe, 8x32 tokens"
    assert len(figures["stall_per_save_over_step_time_each"]) == 1
    assert len(figures["orbax_only_stall_per_save_over_step_time_each"]) == 1
    assert figures["restore_s"] > 0
