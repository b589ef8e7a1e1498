"""Run a function over a stream of tasks in worker processes *and* the calling one, in input order.

Why not ``concurrent.futures.ProcessPoolExecutor``: measured with ``benchmarks/prepare.py`` on a
2-core machine, its one worker process sat idle for 30-40% of the run.  The executor moves tasks to
its workers and reads their results in a helper thread of the calling process; that thread needs the
GIL, which the calling process holds while it does its own in-order work (importing tensorstore,
committing a checkpoint, a batch of its own), so workers starved for tasks and blocked on a full
result pipe.  Here each worker has a pipe of its own for tasks, kept stocked a few tasks ahead, and a
result pipe enlarged to hold several results; the caller collects finished results whenever it comes
back to the loop, with no helper thread.

:func:`ordered_map` also lets the calling process do tasks itself whenever the next result in input
order is not ready yet, so ``processes=2`` on a 2-core machine means one worker process plus the
caller, never three processes competing for two cores.  Worker processes are started from a
background thread (a fork server's first start takes ≈0.3 s), during which the caller already works.
"""

from __future__ import annotations

import pickle
import queue
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Generic, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")

#: Bytes a result pipe is enlarged to (Linux's default limit for unprivileged processes, and room
#: for a few of prepare's ≈0.3 MB batch results, so a worker rarely waits for the caller to read).
RESULT_PIPE_BYTES = 1 << 20


class _Stop:
    """Sent to a worker (and put in its inbox) to end it: unlike ``None``, never a task."""


_STOP = _Stop()
#: What ``next(tasks, _END)`` returns once the tasks are exhausted (a task may be anything, None too).
_END = object()


class WorkerDied(RuntimeError):
    """A worker process ended without sending the result of a task it had been given."""


@dataclass
class _Failure:
    """An exception raised by a task in a worker, sent back to be raised in the caller."""

    exception: BaseException | None  # None when it could not be pickled
    text: str  # the worker's formatted traceback

    def raise_(self) -> None:
        remote = RuntimeError(f"in a worker process:\n{self.text}")
        if self.exception is None:
            raise remote
        raise self.exception from remote


def _failure(err: BaseException) -> _Failure:
    text = traceback.format_exc()
    try:  # both ways: an exception whose __init__ takes other arguments pickles, but won't unpickle
        pickle.loads(pickle.dumps(err))
    except Exception:
        return _Failure(None, text)
    return _Failure(err, text)


def _read_tasks(tasks: Connection, inbox: queue.SimpleQueue) -> None:
    """Move tasks from the pipe to ``inbox`` as they come, whatever the worker is doing: a caller
    blocked sending a large task while this worker is blocked sending a result would otherwise
    wait for each other forever."""
    while True:
        try:
            task = tasks.recv()
        except EOFError:  # the caller is gone (killed): nobody wants our results
            task = _STOP
        inbox.put(task)
        if isinstance(task, _Stop):
            return


def _serve(make_function: Callable[[], Callable[[Any], Any]], tasks: Connection, results: Connection) -> None:
    """A worker process's loop: one task in, one result (or a _Failure) out, until ``_STOP``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle: it stops us
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_tasks, args=(tasks, inbox), name="read-tasks", daemon=True).start()
    function = make_function()
    while True:
        task = inbox.get()
        if isinstance(task, _Stop):
            return
        try:
            result = function(task)
        except Exception as err:  # sent to the caller, which raises it
            result = _failure(err)
        try:
            results.send(result)
        except OSError:  # BrokenPipeError: the caller is gone
            return
        except Exception as err:  # a result that does not pickle
            results.send(_failure(err))


def _enlarge_pipe(connection: Connection, size: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):  # not Linux, or above the system's limit: keep the default
        pass


@dataclass
class _Worker:
    process: Any  # multiprocessing.process.BaseProcess
    tasks: Connection  # caller → worker
    results: Connection  # worker → caller
    sent: int = 0  # tasks sent whose result has not been collected yet
    ready: deque = field(default_factory=deque)  # collected results, in this worker's task order

    def collect(self) -> None:
        """Read every result that has arrived (so the worker never waits on a full pipe)."""
        while self.sent and self.results.poll():
            try:
                self.ready.append(self.results.recv())
            except EOFError:  # the worker's end of the pipe closed: it died
                raise self._died() from None
            self.sent -= 1

    def wait_for_result(self) -> None:
        """Block until this worker's next result has arrived, or raise WorkerDied."""
        while not self.ready:
            wait([self.results, self.process.sentinel])
            self.collect()
            if not self.ready and not self.process.is_alive():
                raise self._died()

    def _died(self) -> WorkerDied:
        self.process.join(timeout=5)
        return WorkerDied(f"worker process {self.process.pid} died (exit code {self.process.exitcode})")


@dataclass
class _Done(Generic[Result]):
    result: Result


class _Starter(threading.Thread):
    """Starts the worker processes in the background; the caller works meanwhile."""

    def __init__(self, context, count: int, make_function: Callable[[], Callable]):
        super().__init__(name="start-workers", daemon=True)
        self.context, self.count, self.make_function = context, count, make_function
        self.workers: list[_Worker] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(self.count):
                self.workers.append(self._start_one())
        except BaseException as err:  # raised in the caller when it next looks
            self.error = err

    def _start_one(self) -> _Worker:
        task_reader, task_writer = self.context.Pipe(duplex=False)
        result_reader, result_writer = self.context.Pipe(duplex=False)
        try:
            _enlarge_pipe(result_writer, RESULT_PIPE_BYTES)
            process = self.context.Process(target=_serve, args=(self.make_function, task_reader, result_writer),
                                           daemon=True, name="indicfm-worker")
            process.start()
        except BaseException:
            task_writer.close()
            result_reader.close()
            raise
        finally:  # the worker's ends: the worker holds its own copies
            task_reader.close()
            result_writer.close()
        return _Worker(process, task_writer, result_reader)

    def started(self) -> list[_Worker]:
        """The workers once all have started (empty before), raising a start-up error."""
        if self.is_alive():
            return []
        if self.error is not None:
            raise self.error
        return self.workers


class OrderedMap(Generic[Task, Result]):
    """``(task, function(task))`` for every task, in input order, using ``processes`` in all.

    ``make_function`` (picklable, e.g. a ``functools.partial`` of a module-level function) builds
    the function once per process, the calling one included.  Use as a context manager: entering
    starts the worker processes in the background (so the caller can do something slow of its own
    meanwhile), iterating yields the results, leaving stops the workers::

        with OrderedMap(tasks, make_function, processes=4, context=ctx) as results:
            for task, result in results:
                ...

    ``tasks_ahead``: tasks queued at each worker beyond the one it is doing, so it keeps working
    while the caller is busy elsewhere.  ``max_waiting``: results (and tasks) held in memory while
    the next one in order is not ready.  An exception raised by a task is raised by the iteration;
    a worker that dies raises :class:`WorkerDied`.
    """

    def __init__(self, tasks: Iterable[Task], make_function: Callable[[], Callable[[Task], Result]],
                 processes: int, context=None, *, tasks_ahead: int = 4, max_waiting: int = 64):
        self.tasks = iter(tasks)
        self.make_function = make_function
        self.processes = processes
        self.context = context
        self.tasks_ahead = tasks_ahead
        self.max_waiting = max_waiting
        self._starter: _Starter | None = None
        self._completed = False

    def __enter__(self) -> OrderedMap[Task, Result]:
        if self.processes > 1:
            import multiprocessing

            # Never plain fork by default: the caller may run threads (tensorstore, this module's
            # own starter thread), which a forked child would inherit in whatever state they were.
            context = self.context or multiprocessing.get_context(
                "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
            if context.get_start_method() == "forkserver":
                # Launch the fork server now (a fork-exec, ≈10 ms): it then imports its preloaded
                # modules on another core even while this process holds the GIL for a while.
                from multiprocessing import forkserver

                forkserver.ensure_running()
            self._starter = _Starter(context, self.processes - 1, self.make_function)
            self._starter.start()
        return self

    def __iter__(self) -> Iterator[tuple[Task, Result]]:
        function = self.make_function()
        if self._starter is None:
            yield from ((task, function(task)) for task in self.tasks)
        else:
            yield from _run(self.tasks, function, self._starter, self.tasks_ahead, self.max_waiting)
        self._completed = True

    def __exit__(self, *exc_info) -> None:
        if self._starter is not None:
            self._starter.join()
            _stop(self._starter.workers, graceful=self._completed)


def _run(tasks: Iterator, function: Callable, starter: _Starter, tasks_ahead: int, max_waiting: int) -> Iterator:
    pending: deque[tuple[Any, _Worker | _Done]] = deque()  # every task not yet yielded, in input order
    workers: list[_Worker] = []
    more = True
    while True:
        workers = workers or starter.started()
        for worker in workers:
            worker.collect()
        while more and workers and len(pending) < max_waiting:  # keep every worker stocked
            worker = min(workers, key=lambda w: w.sent)
            if worker.sent > tasks_ahead:
                break
            task = next(tasks, _END)
            if task is _END:
                more = False
                break
            try:
                worker.tasks.send(task)
            except OSError:  # BrokenPipeError: the worker is gone (it may have failed to start)
                raise worker._died() from None
            worker.sent += 1
            pending.append((task, worker))
        if not pending and not more:
            return
        head = pending[0][1] if pending else None  # None: only when there are more tasks
        if head is None or (isinstance(head, _Worker) and not head.ready):
            if more and len(pending) < max_waiting:  # the next result isn't ready: do a task meanwhile
                task = next(tasks, _END)
                if task is _END:
                    more = False
                else:
                    pending.append((task, _Done(function(task))))
                continue
            head.wait_for_result()
        task, source = pending.popleft()
        result = source.result if isinstance(source, _Done) else source.ready.popleft()
        if isinstance(result, _Failure):
            result.raise_()
        yield task, result


def _stop(workers: list[_Worker], graceful: bool) -> None:
    """Ask every worker to finish (``graceful``: all results were read), or end them at once (the
    caller stopped early: a worker may be busy, or blocked sending a result nobody will read)."""
    for worker in workers:
        try:
            if graceful:
                worker.tasks.send(_STOP)
            else:
                worker.process.terminate()
        except OSError:  # it is already gone
            pass
    for worker in workers:
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join()
        worker.tasks.close()
        worker.results.close()
