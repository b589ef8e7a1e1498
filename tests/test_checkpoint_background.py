"""Background saves (one process, ``checkpoint.async_save``): the saved state is the one passed to
``save`` even if the caller donates its buffers right away, background errors are not lost, and the
writer stays out of the training thread's way (idle CPU priority, garbage collection paused)."""

import gc
import os
import shutil
import threading
import time

import jax
import numpy as np
import pytest

from indicfm.config import MeshConfig
from indicfm.sharding import make_mesh
from indicfm.train.checkpoint import Checkpointer
from indicfm.train.config import CheckpointConfig


def _state(mesh) -> dict:
    """Sharded and replicated arrays, as in a train state (values known independently of the code)."""
    rng = np.random.default_rng(0)
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {
        "w": jax.device_put(rng.normal(size=(16, 24)).astype(np.float32), sharded),
        "b": jax.device_put(rng.normal(size=(24,)).astype(np.float32), replicated),
        "count": jax.device_put(np.int32(7), replicated),
    }


@pytest.mark.parametrize("save_thread", [True, False])
def test_saved_state_survives_the_next_donating_step(tmp_path, save_thread):
    mesh = make_mesh(MeshConfig(data=8))
    state = _state(mesh)
    want = {k: np.asarray(v).copy() for k, v in state.items()}
    # the train step donates the state: its buffers are reused for the next state at once
    update = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=(0,))

    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1), save_thread=save_thread)
    orbax_save = ckpt.manager.save

    def slow_orbax_save(*args, **kwargs):  # the donation surely happens before Orbax reads the arrays
        time.sleep(0.3)
        return orbax_save(*args, **kwargs)

    ckpt.manager.save = slow_orbax_save
    assert ckpt.save(1, state, {"loader": {"step": 1}})
    state = update(state)
    assert not ckpt.save(1, state, {"loader": {"step": 1}})  # the step exists (or is being saved)
    ckpt.close()

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = Checkpointer(tmp_path / "ckpt", CheckpointConfig()).restore(1, target)
    assert restored.meta.loader == {"step": 1}
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(restored.state[key]), value)
    np.testing.assert_array_equal(np.asarray(state["w"]), want["w"] + 1)  # the update really happened


def test_should_save_every_n_steps_while_a_save_runs(tmp_path):
    mesh = make_mesh(MeshConfig(data=8))
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=3))
    decisions = {step: ckpt.should_save(step) for step in range(1, 7)}
    ckpt.save(3, _state(mesh), {})
    after = {step: ckpt.should_save(step) for step in (3, 4, 6)}  # asked while step 3 may still be saving
    ckpt.close()
    assert decisions == {1: False, 2: False, 3: True, 4: False, 5: False, 6: True}
    assert after == {3: False, 4: False, 6: True}


def test_a_damaged_step_set_aside_is_saved_again(tmp_path):
    mesh = make_mesh(MeshConfig(data=8))
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=3))
    for step in (3, 6):
        ckpt.save(step, _state(mesh), {})
    ckpt.close()
    shutil.rmtree(tmp_path / "ckpt" / "6" / "meta")  # damage the latest

    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=3))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(mesh))
    restored = ckpt.restore_latest_good(target, warn=lambda message: None)
    assert restored.step == 3 and restored.skipped_damaged == [6]
    assert ckpt.should_save(6)  # the run resumes from 3 and must save step 6 again
    ckpt.close()


def test_a_failing_background_save_raises_on_the_training_thread(tmp_path):
    mesh = make_mesh(MeshConfig(data=8))
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1))
    ckpt.save(1, _state(mesh), {}, {"not json": object()})  # the tokenizer item cannot be written as JSON
    with pytest.raises(Exception, match="not JSON serializable"):  # not swallowed by a background thread
        ckpt.wait()
    assert Checkpointer(tmp_path / "ckpt", CheckpointConfig()).steps() == []  # never became a checkpoint


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux per-thread scheduling policies")
def test_orbax_runs_at_idle_priority_and_training_thread_does_not(tmp_path):
    mesh = make_mesh(MeshConfig(data=8))
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1))
    orbax_save, seen = ckpt.manager.save, {}

    def recording_orbax_save(*args, **kwargs):
        seen["orbax_thread"] = os.sched_getscheduler(0)  # 0: the calling thread (Linux)
        started = threading.Thread(target=lambda: seen.setdefault("thread_it_starts", os.sched_getscheduler(0)))
        started.start()
        started.join()
        return orbax_save(*args, **kwargs)

    ckpt.manager.save = recording_orbax_save
    state = _state(mesh)
    ckpt.save(1, state, {})
    ckpt.close()
    assert seen == {"orbax_thread": os.SCHED_IDLE, "thread_it_starts": os.SCHED_IDLE}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller (the train loop) is untouched
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = Checkpointer(tmp_path / "ckpt", CheckpointConfig()).restore(1, target)
    for key, value in _state(mesh).items():
        np.testing.assert_array_equal(np.asarray(restored.state[key]), np.asarray(value))


def test_save_in_progress_until_the_checkpoint_is_on_disk(tmp_path):
    mesh = make_mesh(MeshConfig(data=8))
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1))
    orbax_save = ckpt.manager.save

    def slow_orbax_save(*args, **kwargs):
        time.sleep(0.5)
        return orbax_save(*args, **kwargs)

    ckpt.manager.save = slow_orbax_save
    assert not ckpt.save_in_progress()
    ckpt.save(1, _state(mesh), {})
    assert ckpt.save_in_progress() and not (tmp_path / "ckpt" / "1").exists()
    ckpt.wait()
    assert not ckpt.save_in_progress() and (tmp_path / "ckpt" / "1").is_dir()
    ckpt.close()


def test_garbage_collection_is_paused_until_a_background_save_is_on_disk(tmp_path):
    mesh = make_mesh(MeshConfig(data=8))
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1))
    orbax_save, seen = ckpt.manager.save, []

    def recording_orbax_save(*args, **kwargs):
        seen.append(gc.isenabled())
        return orbax_save(*args, **kwargs)

    ckpt.manager.save = recording_orbax_save
    assert gc.isenabled()
    try:
        ckpt.save(1, _state(mesh), {})
        paused_on_the_caller = not gc.isenabled()
        ckpt.wait()
        assert paused_on_the_caller and seen == [False]
        assert gc.isenabled() and (tmp_path / "ckpt" / "1").is_dir()

        gc.disable()  # the caller's own choice is kept
        ckpt.save(2, _state(mesh), {})
        ckpt.wait()
        assert not gc.isenabled()
    finally:
        gc.enable()
        ckpt.close()
