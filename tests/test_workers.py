"""indicfm.data.workers.OrderedMap: input order, work shared with the caller, errors surfaced."""

from __future__ import annotations

import functools
import multiprocessing
import os
import time

import pytest

from indicfm.data.workers import OrderedMap, WorkerDied


def _slow_square(caller_pid: int, task: int) -> tuple[int, bool]:
    """Square ``task``; also say whether a worker process (not the caller) did it.  Uneven
    durations make results arrive out of order; the caller is slower than the workers, so that
    the workers, once started (a fork server takes a while), get work too."""
    in_worker = os.getpid() != caller_pid
    time.sleep(0.001 * (task % 3) if in_worker else 0.005)
    return task * task, in_worker


def _make_square(caller_pid: int):
    return functools.partial(_slow_square, caller_pid)


class NotPicklable(Exception):
    def __reduce__(self):
        raise TypeError("this exception does not pickle")


class TwoArguments(Exception):
    """Pickles, but unpickling calls ``__init__`` with the message only and fails."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def _failing(caller_pid: int, task: int) -> int:
    if os.getpid() == caller_pid:  # the caller only keeps busy until a worker has failed
        time.sleep(0.005)
        return task
    if task == 7:
        raise ValueError(f"bad task {task}")
    if task == 9:
        raise NotPicklable("odd")
    if task == 13:
        raise TwoArguments("x", "y")
    if task == 11:
        os._exit(3)  # a worker process dying without a word (out of memory, killed, ...)
    return task


def _make_failing(caller_pid: int):
    return functools.partial(_failing, caller_pid)


def _forkserver():
    return multiprocessing.get_context("forkserver")


@pytest.mark.parametrize("processes", [1, 3])
def test_results_come_in_input_order_and_both_sides_work(processes):
    with OrderedMap(range(400), functools.partial(_make_square, os.getpid()), processes, _forkserver()) as results:
        out = list(results)
    assert [task for task, _ in out] == list(range(400))
    assert [value for _, (value, _) in out] == [t * t for t in range(400)]  # reference: plain arithmetic
    by_worker = sum(in_worker for _, (_, in_worker) in out)
    if processes == 1:
        assert by_worker == 0
    else:  # the worker processes and the caller both did tasks
        assert 0 < by_worker < 400


def _first_failure(task: int):
    """Run copies of ``task`` until one done by the worker process fails."""
    with OrderedMap([task] * 2000, functools.partial(_make_failing, os.getpid()), 2, _forkserver()) as results:
        return list(results)


def test_an_exception_in_a_worker_is_raised_in_the_caller_with_its_type_and_traceback():
    with pytest.raises(ValueError, match="bad task 7") as info:
        _first_failure(7)
    assert "_failing" in str(info.value.__cause__)  # the worker's traceback travels with it


def test_an_exception_that_does_not_pickle_still_reaches_the_caller():
    with pytest.raises(RuntimeError, match="NotPicklable"):
        _first_failure(9)


def test_an_exception_that_pickles_but_does_not_unpickle_still_reaches_the_caller():
    with pytest.raises(RuntimeError, match="TwoArguments") as info:
        _first_failure(13)
    assert "_failing" in str(info.value)  # with the worker's traceback


def _identity(task):
    return task


def _make_identity():
    return _identity


def test_none_is_a_task_like_any_other():
    """``None`` among the tasks neither ends the input nor stops a worker."""
    tasks = [None if i % 7 == 0 else i for i in range(300)]
    with OrderedMap(tasks, _make_identity, 2, _forkserver()) as results:
        out = list(results)
    assert out == [(t, t) for t in tasks]


def test_a_dying_worker_raises_worker_died():
    with pytest.raises(WorkerDied, match="exit code 3"):
        _first_failure(11)


def test_leaving_early_stops_the_workers():
    with OrderedMap(range(10_000), functools.partial(_make_square, os.getpid()), 3, _forkserver()) as results:
        for task, _ in results:
            if task == 20:
                break
        workers = [w.process for w in results._starter.workers]
    assert workers and not any(p.is_alive() for p in workers)


def _make_nothing(caller_pid: int):
    if os.getpid() != caller_pid:
        os._exit(4)  # a worker that cannot even start (its set-up fails hard)
    return lambda task: task


def test_a_worker_that_dies_at_start_raises_worker_died():
    with pytest.raises(WorkerDied, match="exit code 4"):
        with OrderedMap(range(100_000), functools.partial(_make_nothing, os.getpid()), 2, _forkserver()) as results:
            list(results)


def _big_result(caller_pid: int, task: bytes) -> bytes:
    time.sleep(0.002 if os.getpid() != caller_pid else 0.05)  # the worker process does most
    return task * 2


def _make_big(caller_pid: int):
    return functools.partial(_big_result, caller_pid)


@pytest.mark.timeout(120)
def test_large_tasks_and_results_do_not_deadlock():
    """Tasks larger than a pipe's buffer while results fill the other pipe: the caller blocks
    sending a task only until the worker has read it, never until the worker sent a result."""
    tasks = [bytes([i % 256]) * (200 << 10) for i in range(100)]
    with OrderedMap(tasks, functools.partial(_make_big, os.getpid()), 2, _forkserver()) as results:
        out = [result for _, result in results]
    assert out == [t * 2 for t in tasks]
