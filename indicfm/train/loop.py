"""The training loop: ``train(cfg, workdir) -> TrainResult``.

What one call does, in order (:func:`_set_up`, then :class:`StepLoop`):

1. tokenizer and token cache: use the configured ones or build them in the workdir (``inputs.py``);
2. mesh, optimizer and the train state's layout (``indicfm.sharding``, ``optimizer.py``, ``state.py``);
3. the state, from one source decided once (``start.py``): the newest good checkpoint if the
   workdir has one ("resuming from step N", falling back past damaged ones, ``checkpoint.py``),
   else the parameters ``trainer.init_from`` names (imported, upcycled, another run), else random;
4. for each remaining step: the loader's batch for that step (a pure function of seed and step, so a
   resumed run sees exactly the batches it would have seen), one jitted step (``step.py``), then the
   periodic actions: metrics, checkpoint every ``checkpoint.every_steps`` and at the end, evaluation;
   the device is never left idle waiting for the host between steps (see :class:`StepLoop`);
5. stop early, cleanly, on SIGTERM/SIGINT (save, return ``stopped="preempted"``) or after
   ``trainer.max_consecutive_nonfinite`` non-finite steps in a row (no save: the last good
   checkpoint stays the latest; ``stopped="nonfinite"``);
6. account the call's wall clock (``goodput.py``): every step's time on the devices in its record,
   the breakdown (productive steps, compilation, data, checkpoints, evaluation, restore, start-up,
   recomputed steps, other) cumulatively in every record and once more at the end.

Step numbers count completed optimizer steps: the checkpoint "at step N" holds the state after N
updates, and the metrics record with ``"step": N`` describes the N-th update.  With several
processes (``jax.distributed`` initialised first) every process runs this function; only process 0
writes logs, metrics and TensorBoard files.
"""

from __future__ import annotations

import datetime
import math
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from indicfm.config import Config, save_config
from indicfm.train.checkpoint_meta import CheckpointMeta
from indicfm.train.device_time import ReadyTimes, compile_count
from indicfm.train.goodput import Clock, Timeline, describe, last_logged_step
from indicfm.train.hosts import HostStepTimes
from indicfm.train.metrics import Peak, checked_mfu, expert_load_shares, expert_load_stats
from indicfm.train.profiling import PROFILE_DIR, StepProfiler
from indicfm.train import downstream_hook
from indicfm.train.state import TrainState

StepCallback = Callable[[int, dict], None]


@dataclass
class TrainResult:
    """What a run did.  ``losses`` maps step → loss for the steps run by *this* call."""

    workdir: Path
    start_step: int  # 0 for a fresh run, else the step restored from
    final_step: int  # steps completed when the call returned
    stopped: str  # "completed" | "preempted" | "nonfinite"
    losses: dict[int, float] = field(default_factory=dict)
    last_checkpoint_step: int | None = None
    skipped_steps: int = 0  # non-finite steps skipped (whole run, restored count included)
    eval_bpb: dict[int, dict[str, float]] = field(default_factory=dict)  # step → {lang: bits per byte}
    downstream: dict[int, dict[str, float]] = field(default_factory=dict)  # step → {downstream/<task>/<metric>: value}
    damaged_checkpoints: list[int] = field(default_factory=list)
    message: str = ""
    step_seconds: dict[int, float] = field(default_factory=dict)  # step → its time on the devices (goodput.py)
    goodput: dict[str, float] = field(default_factory=dict)  # category → seconds of this call's wall clock
    wall_seconds: float = 0.0  # this call's wall clock (from the process's start when train() is its first work)
    max_mfu: float = math.nan
    peak: Peak | None = None


class PreemptionWatcher:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (finish the step, save, exit 0).

    With several processes SIGTERM is left to JAX's own preemption notifier, and all hosts agree on
    the step to save at through Orbax's ``reached_preemption`` (see ``Checkpointer``); a second SIGINT
    interrupts at once as usual.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is not threading.main_thread():
            return self
        signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        if jax.process_count() > 1:
            signals = []  # a signal on one host only would desynchronise the hosts' collectives
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _place_batch(batch: dict[str, np.ndarray], sharding: Any, global_batch_size: int) -> dict[str, jax.Array]:
    """This process's rows → one global array per field, sharded over the mesh's data-like axes."""
    return {
        key: jax.make_array_from_process_local_data(sharding, value, (global_batch_size, value.shape[1]))
        for key, value in batch.items()
    }


def _place_replicated_batch(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, jax.Array]:
    """A batch every process holds in full (evaluation) → global arrays."""
    return {key: jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx]) for key, value in batch.items()}


def fetch_metrics(metrics: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """One step's metrics on the host: the only place the loop waits for a training step."""
    return jax.device_get(metrics)


@dataclass
class Run:
    """Everything a run's steps and periodic actions share once it is set up (see :func:`train`)."""

    cfg: Config
    mesh: Any
    state: TrainState  # the state after ``step`` updates (or being computed on the devices)
    step: int  # updates dispatched so far
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    batches: Iterator[dict[str, jax.Array]]  # the next steps' batches, already placed on the devices
    loader: Any
    checkpointer: Any
    writer: Any
    bar: Any
    evaluator: Callable[[TrainState], dict[str, float]] | None
    result: TrainResult
    save_meta: Callable[[int], CheckpointMeta]
    tokenizer: dict
    tokens_per_step: int
    flops_per_step: float
    peak: Peak | float  # a bare float: FLOP/s of unknown origin (tests)
    say: Callable[..., None]
    clock: Clock = time.perf_counter
    timeline: Timeline | None = None  # None: a new one from ``clock``
    ready: Any = None  # when each step finished (``device_time.ReadyTimes``; None: a new one)
    hosts: HostStepTimes | None = None  # None: from jax.process_index()/process_count()
    session: str = ""  # this train() call, in every goodput record
    profile_dir: Path | None = None
    downstream: downstream_hook.DownstreamEvaluator | None = None  # eval.downstream (downstream_hook.py)
    graphdef: Any = None  # the model's nnx graph, to see the state as a model (downstream evaluation)


@dataclass
class Finished:
    """A step whose metrics reached the host."""

    step: int
    host: dict[str, np.ndarray]
    record: dict[str, Any]

    @property
    def nonfinite_in_a_row(self) -> int:
        return int(self.host["nonfinite_in_a_row"])


class StepLoop:
    """The steps of a run, with the device kept busy: step n+1 is dispatched before step n's
    metrics are read, and the batch of step n+1 is put on the devices while step n computes.

    Periodic actions, in this order for each step (as if every step were read at once):

    * **metrics** (:meth:`log_metrics`): the record in ``metrics.jsonl`` / TensorBoard, the progress line;
    * **non-finite stop** (:meth:`nonfinite_stop`): ``trainer.max_consecutive_nonfinite`` in a row;
    * **evaluation** (:meth:`eval_due` / :meth:`evaluate`), then **downstream evaluation**
      (:meth:`downstream_due` / :meth:`evaluate_downstream`, ``eval.downstream``);
    * **checkpoint** (:meth:`checkpoint_due` / :meth:`save`): every ``checkpoint.every_steps`` (not
      during a run of non-finite steps), at the end, and on preemption (then before the evaluations);
    * ``on_step(step, record)``;
    * **preemption** (:meth:`preemption`): SIGTERM/SIGINT, a multi-host notice or ``stop_at_step``:
      the step just finished is saved, then the run stops.

    A checkpoint or evaluation needs the state after step n, which the next (donating) step would
    overwrite, so on those steps (decided from host-side facts only) step n is read before step n+1
    is dispatched.  Every other step is read one step late, which changes when a record is written,
    never what it says: a step's time is its time on the devices (:mod:`indicfm.train.goodput`),
    whenever the host reads it.  Host work that may leave the devices idle is labelled for the
    goodput breakdown: waiting for a batch (``data``), saves, evaluation, profiling, a dispatch
    that compiled.
    """

    def __init__(self, run: Run, watcher: PreemptionWatcher, on_step: StepCallback | None, stop_at_step: int | None):
        self.run = run
        self.watcher = watcher
        self.on_step = on_step
        self.stop_at_step = stop_at_step
        self.timeline = run.timeline if run.timeline is not None else Timeline(run.clock)
        self.ready = run.ready if run.ready is not None else ReadyTimes(run.clock)
        self.hosts = run.hosts if run.hosts is not None else HostStepTimes(jax.process_index(), jax.process_count())
        self.peak = run.peak if isinstance(run.peak, Peak) else Peak(float(run.peak), "given", "unknown")
        steps = run.cfg.logging.profile_steps
        self.profiler = StepProfiler(steps, run.profile_dir or Path(PROFILE_DIR), self.timeline, run.say)
        self._mfu_problem_said = False

    # ---- the loop -------------------------------------------------------------------------
    def run_until(self, last_step: int) -> None:
        """Run steps ``run.step + 1 .. last_step``; sets ``run.result.stopped`` when stopping early."""
        run = self.run
        batch = self._next_batch()
        unread: tuple[int, dict] | None = None  # a dispatched step whose metrics are still on the devices
        while run.step < last_step:
            step = run.step + 1
            metrics = self._dispatch(step, batch)
            run.step = step
            for leaf in jax.tree.leaves(metrics):
                leaf.copy_to_host_async()
            if step < last_step:
                batch = self._next_batch()  # its transfer overlaps the step just dispatched
            if unread is not None:
                finished = self.log_metrics(*unread)
                if self.nonfinite_stop(finished):
                    return
                self._after_actions(finished)
            unread = (step, metrics)

            preempted = self.preemption(step)
            save, evaluate = self.checkpoint_due(step, last_step, preempted), self.eval_due(step, last_step)
            downstream = self.downstream_due(step, last_step)
            if not (save or evaluate or downstream):
                continue
            finished = self.log_metrics(*unread)
            unread = None
            if self.nonfinite_stop(finished):
                return
            # Periodic saves wait out a run of non-finite steps, so the newest checkpoint is one a
            # finite step produced; a preemption or the end of the run saves regardless.
            save = save and (preempted or step == last_step or finished.nonfinite_in_a_row == 0)
            # Evaluations come before the save, so a saved step's are logged (a resume redoes, and
            # re-evaluates, only unsaved steps); on preemption the save comes first, and a kill during
            # the evaluation is caught up on resume (downstream_hook.missed_at_resume).
            if save and preempted:
                self.save(step)
            if evaluate:
                self.evaluate(step)
            if downstream:
                self.evaluate_downstream(step)
            if save and not preempted:
                self.save(step)
            self._after_actions(finished)
            if preempted:
                run.result.stopped = "preempted"
                run.result.message = f"{preempted}: saved a checkpoint at step {step}, stopping"
                run.say(run.result.message)
                return

    def _next_batch(self) -> dict:
        """The next step's batch; a wait here idles the devices only once they run out of steps."""
        with self.timeline.host("data"):
            return next(self.run.batches)

    def _dispatch(self, step: int, batch: dict) -> dict:
        """Queue step ``step`` on the devices; note when it could start and when it will be done.

        A call that compiled is compilation until it returns (the step cannot start earlier); any
        other call queued the step when it began, even if it then blocked behind earlier steps."""
        run, timeline = self.run, self.timeline
        self.profiler.before_dispatch(step)
        compiles = compile_count()
        began = run.clock()
        with self.profiler.annotate(step):
            run.state, metrics = run.train_step(run.state, batch)
        if compile_count() != compiles:
            ended = run.clock()
            timeline.add("compile", began, ended)
            began = ended
        timeline.dispatched(step, began)
        self.ready.watch(step, metrics)
        return metrics

    def finish(self) -> None:
        """After the last step: account steps dispatched but never read (a non-finite stop) and
        stop the profiler if the run ended inside its window."""
        for step in self.timeline.in_flight:
            not_before, ready_by = self.ready.completed_at(step)
            self.timeline.completed(step, ready_by, not_before)
        self.profiler.stop()

    def close(self, finished: bool) -> None:
        """End of the call, whatever happened: wait for background saves (labelled ``checkpoint``:
        a returned run is on disk), and when the loop ended normally (completed, preempted,
        non-finite) write the goodput summary; then close the log."""
        run = self.run
        self.ready.close()
        run.bar.close()
        with self.timeline.host("checkpoint"):
            run.checkpointer.close()
        if finished:
            _summarise(run, self.timeline, run.say)
        run.writer.close()

    def _after_actions(self, finished: Finished) -> None:
        self.run.result.final_step = finished.step
        if self.on_step is not None:
            self.on_step(finished.step, finished.record)

    # ---- metrics ----------------------------------------------------------------------------
    def log_metrics(self, step: int, metrics: dict) -> Finished:
        """Read step ``step``'s metrics (waiting for it if needed) and log them."""
        run = self.run
        host = fetch_metrics(metrics)
        not_before, ready_by = self.ready.completed_at(step)
        step_seconds = self.timeline.completed(step, ready_by, not_before)
        step_error = self.timeline.last_error
        logged = step % run.cfg.logging.every_steps == 0 or step == run.cfg.trainer.steps
        slowest = None
        if logged and self.hosts.count > 1:  # every process takes part, in the same steps
            step_seconds, slowest, straggler = self.hosts.slowest(step, step_seconds)
            if straggler is not None:
                run.say(
                    f"[yellow]straggler:[/] process {straggler.process} ({self.hosts.host_name(straggler.process)}) "
                    f"took {straggler.median_ratio:.2f}x the other hosts' median step time, and at least "
                    f"{self.hosts.watch.slower_by:.2f}x in {straggler.slower_steps} of the last {straggler.window} logged steps"
                )
        mfu_value, problem = checked_mfu(run.flops_per_step, step_seconds, self.peak)
        if problem and not self._mfu_problem_said:
            run.say(f"[bold red]bug:[/] step {step}: {problem}")
            self._mfu_problem_said = True
        record = _record(host, step_seconds, run.tokens_per_step, run.flops_per_step, mfu_value, self.peak)
        record["step_seconds_error"] = step_error  # bound from when the step's end was seen (device_time.py)
        if slowest is not None:
            record["slowest_process"] = slowest
        record.update(self.timeline.record(run.session))
        run.result.losses[step] = record["loss"]
        run.result.skipped_steps = record["skipped_steps"]
        run.result.step_seconds[step] = step_seconds
        if not math.isnan(mfu_value):
            run.result.max_mfu = mfu_value if math.isnan(run.result.max_mfu) else max(run.result.max_mfu, mfu_value)
        if logged:
            run.writer.write(step, record)
        run.bar.update(step, record["loss"], record["tokens_per_s"], record["mfu"])
        self.profiler.after_read(step)
        return Finished(step, host, record)

    def nonfinite_stop(self, finished: Finished) -> bool:
        """Stop after ``trainer.max_consecutive_nonfinite`` skipped steps in a row (nothing saved)."""
        run, limit = self.run, self.run.cfg.trainer.max_consecutive_nonfinite
        if finished.nonfinite_in_a_row < limit:
            return False
        run.result.final_step = finished.step
        run.result.stopped = "nonfinite"
        run.result.message = (
            f"stopping at step {finished.step}: {finished.nonfinite_in_a_row} non-finite steps in a row "
            f"(trainer.max_consecutive_nonfinite={limit}); their updates were skipped and nothing was saved, "
            f"the last good checkpoint is step {run.result.last_checkpoint_step}. Lower "
            "optimizer.learning_rate or check the data."
        )
        run.say(f"[bold red]{run.result.message}[/]")
        return True

    # ---- preemption -------------------------------------------------------------------------
    def preemption(self, step: int) -> str | None:
        """Why the run must stop after ``step`` (a signal's name, ...), or None to go on."""
        if self.watcher.requested:
            return self.watcher.requested
        if self.run.checkpointer.reached_preemption(step):
            return "preemption notice"
        return "stop_at_step" if step == self.stop_at_step else None

    # ---- checkpoint -------------------------------------------------------------------------
    def checkpoint_due(self, step: int, last_step: int, preempted: str | None) -> bool:
        """Whether step ``step`` may be saved (``save`` still skips a periodic one in a non-finite run)."""
        return bool(preempted) or step == last_step or self.run.checkpointer.should_save(step)

    def save(self, step: int) -> None:
        run = self.run
        with self.timeline.host("checkpoint"):  # the blocking part; the background write overlaps steps
            saved = run.checkpointer.save(step, run.state, run.save_meta(step), run.tokenizer)
        if saved:
            run.result.last_checkpoint_step = step

    # ---- evaluation -------------------------------------------------------------------------
    def eval_due(self, step: int, last_step: int) -> bool:
        every = self.run.cfg.eval.every_steps
        return self.run.evaluator is not None and (step == last_step or bool(every and step % every == 0))

    def evaluate(self, step: int) -> None:
        run = self.run
        with self.timeline.host("evaluation"):
            bpb = run.evaluator(run.state)
        run.result.eval_bpb[step] = bpb
        run.writer.write(step, {f"bpb/{lang}": value for lang, value in bpb.items()})
        run.say(f"step {step} · held-out bits per byte: mean {bpb['mean']:.3f}")

    def downstream_due(self, step: int, last_step: int) -> bool:
        return self.run.downstream is not None and downstream_hook.due(self.run.cfg.eval.downstream, step, last_step)

    def evaluate_downstream(self, step: int) -> None:
        """Downstream tasks on the model after ``step``; the record holds the call's own wall time."""
        run = self.run
        with self.timeline.host("evaluation"):
            began = run.clock()
            scores = run.downstream(step, downstream_hook.live_model(run.graphdef, run.state), run.mesh)
            seconds = run.clock() - began
        run.result.downstream[step] = scores
        run.writer.write(step, {**scores, downstream_hook.SECONDS_KEY: seconds})
        run.say(f"step {step} · downstream ({seconds:.1f} s): {downstream_hook.summary(scores)}")


def train(
    cfg: Config,
    workdir: str | Path,
    *,
    on_step: StepCallback | None = None,
    stop_at_step: int | None = None,
    console: Any = None,
    progress: bool | None = None,
    started_at: float | None = None,
    downstream: downstream_hook.DownstreamFactory | None = None,
) -> TrainResult:
    """Train (or resume training) ``cfg`` in ``workdir``; see the module docstring.

    ``on_step(step, record)`` is called after every step with the metrics record (tests use it to
    simulate a crash).  ``stop_at_step`` stops early as a preemption would (save, return
    ``stopped="preempted"``); the schedule still follows ``trainer.steps``.  ``progress`` overrides
    ``logging.progress``.  ``started_at`` (``time.perf_counter()`` scale): where this call's wall
    clock starts for the goodput breakdown, e.g. the process's start (``indicfm train`` passes it,
    so imports count as start-up); default: now.  ``downstream``: builds the evaluator of
    ``eval.downstream`` from the run's config (``indicfm.evaluation.in_loop``); None: no downstream
    evaluation, whatever the config says.
    """
    from rich.console import Console

    entered = time.perf_counter()
    timeline = Timeline(time.perf_counter, start=min(started_at, entered) if started_at is not None else entered)
    timeline.add("startup", timeline.start, entered)
    workdir = Path(workdir).resolve()
    is_main = jax.process_index() == 0
    console = console or Console(stderr=True)
    say = console.print if is_main else (lambda *a, **k: None)
    show_progress = cfg.logging.progress if progress is None else progress
    with timeline.host("startup"):
        workdir.mkdir(parents=True, exist_ok=True)
        _enable_compilation_cache(cfg.trainer.compilation_cache_dir, workdir)
        run = _set_up(cfg, workdir, say, show_progress and is_main, console, is_main, timeline)
    if isinstance(run, TrainResult):
        return run  # nothing left to do
    finished = False
    loop: StepLoop | None = None
    try:
        with PreemptionWatcher() as watcher, jax.set_mesh(run.mesh):
            loop = StepLoop(run, watcher, on_step, stop_at_step)
            if run.evaluator and cfg.eval.at_start and run.step == 0:
                loop.evaluate(0)
            _start_downstream(run, loop, downstream, timeline)
            timeline.advance()  # no step in flight yet: start-up, restore and evaluation so far, on record
            run.writer.write(run.step, timeline.record(run.session))
            say(
                f"training {cfg.trainer.steps - run.step} steps · {run.tokens_per_step:,} tokens/step · "
                f"{run.flops_per_step / 1e9:,.2f} GFLOP/step · peak {loop.peak.describe()} over "
                f"{jax.device_count()} device(s); the model computes in {cfg.model.compute_dtype}"
            )
            loop.run_until(cfg.trainer.steps)
            loop.finish()
            finished = True
    finally:
        if loop is not None:
            loop.close(finished)
        else:
            run.bar.close()
            run.checkpointer.close()  # waits for background saves: a returned run is on disk
            run.writer.close()
    return run.result


def _start_downstream(
    run: Run, loop: StepLoop, factory: downstream_hook.DownstreamFactory | None, timeline: Timeline
) -> None:
    """Build the downstream evaluator (start-up time), then evaluate what is owed before the first
    step: the initial model (``at_start``) or, on resume, a saved step whose evaluation was lost."""
    settings = run.cfg.eval.downstream
    if factory is None or not settings.enabled:
        return
    began = time.perf_counter()
    with timeline.host("startup"):
        run.downstream = factory(run.cfg)
    tasks = settings.suite or ", ".join(settings.tasks)
    run.say(f"downstream evaluation: {tasks}, evaluator ready in {time.perf_counter() - began:.1f} s")
    if run.step == 0 and settings.at_start:
        loop.evaluate_downstream(0)
    elif downstream_hook.missed_at_resume(settings, run.step, run.cfg.trainer.steps, run.writer.path):
        run.say(f"step {run.step} was saved but its downstream evaluation was not logged: evaluating it now")
        loop.evaluate_downstream(run.step)


def _summarise(run: Run, timeline: Timeline, say: Callable[..., None]) -> None:
    """The end of a call: its goodput in the result, as the last record of metrics.jsonl (under the
    final step, so a resume from that step keeps it) and as a few lines on the console."""
    timeline.advance()
    result = run.result
    result.goodput, result.wall_seconds = timeline.totals(), timeline.wall()
    result.peak = run.peak if isinstance(run.peak, Peak) else None
    run.writer.write(result.final_step, timeline.record(run.session))
    say(f"goodput: {describe(result.goodput, result.wall_seconds)}")
    seconds = list(result.step_seconds.values())
    if seconds:
        median = statistics.median(seconds)
        say(
            f"step time on the devices: median {median:.4f} s, min {min(seconds):.4f} s, max {max(seconds):.4f} s "
            f"over {len(seconds)} steps · largest MFU {result.max_mfu:.4f} of peak "
            f"{result.peak.describe() if result.peak else run.peak} · the model computes in {run.cfg.model.compute_dtype}"
        )


def _set_up(
    cfg: Config, workdir: Path, say: Callable, show_progress: bool, console: Any, is_main: bool, timeline: Timeline
) -> Run | TrainResult:
    """Inputs, mesh, state (restored or fresh), the step, metrics, evaluation: a :class:`Run` at the
    step it starts from, or just the result when the workdir's run already completed ``trainer.steps``.
    A restore is labelled ``restore`` on ``timeline``; steps an earlier call logged beyond the
    restored checkpoint are marked as recomputed work."""
    from indicfm.data.loader import TokenLoader
    from indicfm.storage import file_sha256
    from indicfm.model.flops import train_flops_per_token
    from indicfm.sharding import batch_sharding, logical_axis_rules, make_mesh
    from indicfm.model.transformer import param_layout
    from indicfm.train.checkpoint import Checkpointer, tokenizer_item
    from indicfm.train.inputs import ensure_tokenizer_and_cache
    from indicfm.train.metrics import MetricsWriter, ProgressLine, run_peak
    from indicfm.train.optimizer import run_optimizer
    from indicfm.train.start import choose_start, start_state
    from indicfm.train.state import abstract_train_state
    from indicfm.train.step import build_train_step

    # 1. tokenizer and token cache
    cfg = ensure_tokenizer_and_cache(cfg, workdir, progress=show_progress, console=console if is_main else None)
    tokenizer_sha = file_sha256(cfg.tokenizer.model_file)
    loader = TokenLoader(
        cfg.data.cache_dir,
        cfg.trainer.global_batch_size,
        cfg.trainer.seed,
        language_weights=_language_weights(cfg),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    _check_inputs(cfg, loader, tokenizer_sha)
    if is_main:
        save_config(cfg, workdir / "config.yaml")

    # 2. mesh and the state's layout
    mesh = make_mesh(cfg.mesh)
    rules = logical_axis_rules(cfg.mesh.shard_weights_over_data)
    tx, _ = run_optimizer(cfg)
    seed = cfg.trainer.seed
    graphdef, abstract_state, shardings = abstract_train_state(cfg.model, tx, seed, mesh, rules)

    # 3. the state: resumed, another checkpoint's parameters (trainer.init_from) or fresh (start.py)
    checkpointer = Checkpointer(workdir / cfg.checkpoint.dir_name, cfg.checkpoint)
    result = TrainResult(workdir=workdir, start_step=0, final_step=0, stopped="completed")
    layout = param_layout(cfg.model)
    try:
        started = start_state(
            choose_start(cfg, workdir, checkpointer), cfg, workdir=workdir, mesh=mesh, rules=rules, tx=tx,
            abstract=(graphdef, abstract_state), checkpointer=checkpointer, tokenizer_sha256=tokenizer_sha,
            warn=lambda m: say(f"[yellow]warning:[/] {m}"), restoring=lambda: timeline.host("restore"),
        )
    except BaseException:
        checkpointer.close()
        raise
    graphdef, state = started.graphdef, started.state
    result.damaged_checkpoints = started.damaged_checkpoints
    say(started.description)
    if started.resumed:
        result.start_step = result.final_step = result.last_checkpoint_step = started.step
        loader.load_state_dict({**(started.loader_state or {}), "step": started.step})
        lost = last_logged_step(workdir / "metrics.jsonl")  # before the writer drops those records
        if lost > started.step:
            timeline.recomputed_through = lost
            say(f"steps {started.step + 1}-{lost} ran before and were lost: their time counts as recomputed")

    if result.start_step >= cfg.trainer.steps:
        say(f"nothing to do: the run already completed {result.start_step} of trainer.steps={cfg.trainer.steps} steps")
        checkpointer.close()
        return result

    # 4. the step, metrics, evaluation
    seq_len = loader.seq_len
    tokens_per_step = cfg.trainer.global_batch_size * seq_len
    writer = MetricsWriter(workdir, tensorboard=cfg.logging.tensorboard, enabled=is_main)
    writer.drop_after(result.start_step)
    data_sharding = batch_sharding(mesh)
    host_batches = iter(loader)  # loader.step == start step: batch s is a pure function of (seed, s)

    def save_meta(step: int) -> CheckpointMeta:
        return CheckpointMeta(
            step=step,
            loader={**loader.state_dict(), "step": step},  # the loader reads ahead of the last step
            config=cfg.model_dump(mode="json"),
            tokenizer_sha256=tokenizer_sha,
            seed=seed,
            param_layout=layout,
        )

    return Run(
        cfg=cfg,
        mesh=mesh,
        state=state,
        step=result.start_step,
        train_step=build_train_step(cfg, mesh, graphdef, shardings),
        batches=(_place_batch(b, data_sharding, cfg.trainer.global_batch_size) for b in host_batches),
        loader=loader,
        checkpointer=checkpointer,
        writer=writer,
        bar=ProgressLine(cfg.trainer.steps, result.start_step, enabled=show_progress, console=console),
        evaluator=_make_evaluator(cfg, graphdef, shardings, mesh, seq_len, say),
        graphdef=graphdef,
        result=result,
        save_meta=save_meta,
        tokenizer=tokenizer_item(cfg.tokenizer.model_file),
        tokens_per_step=tokens_per_step,
        flops_per_step=train_flops_per_token(cfg.model, seq_len) * tokens_per_step,
        peak=run_peak(jax.devices(), cfg.trainer.peak_flops, cfg.model.compute_dtype),
        say=say,
        timeline=timeline,
        session=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        profile_dir=workdir / PROFILE_DIR,
    )


def _enable_compilation_cache(setting: str | None, workdir: Path) -> None:
    """Point JAX's persistent compilation cache at ``setting`` (``""`` = ``<workdir>/compile_cache``)
    unless the user already configured one (e.g. ``JAX_COMPILATION_CACHE_DIR``)."""
    if setting is None or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(setting).expanduser() if setting else workdir / "compile_cache"))


def _language_weights(cfg: Config) -> dict[str, float] | None:
    """``data.language_weights``, or weights from ``data.mixture_temperature`` and the cache's row counts."""
    if cfg.data.language_weights is not None or cfg.data.mixture_temperature is None:
        return cfg.data.language_weights
    from indicfm.data.cache import read_metadata
    from indicfm.data.loader import temperature_weights

    rows = {lang: int(v["rows"]) for lang, v in read_metadata(cfg.data.cache_dir).languages.items()}
    return temperature_weights(rows, cfg.data.mixture_temperature)


def _check_inputs(cfg: Config, loader: Any, tokenizer_sha: str) -> None:
    """Catch mismatches between tokenizer, cache and model before spending time on compilation."""
    cache_sha = getattr(loader, "tokenizer_sha256", None)
    if cache_sha and cache_sha != tokenizer_sha:
        raise ValueError(
            f"the token cache {cfg.data.cache_dir} was built with tokenizer sha256 {cache_sha}, "
            f"but tokenizer.model_file {cfg.tokenizer.model_file} has sha256 {tokenizer_sha}"
        )
    from indicfm.tokenizer.load import load_tokenizer

    vocab = load_tokenizer(cfg.tokenizer.model_file).vocab_size
    if vocab > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} pieces "
            f"({cfg.tokenizer.model_file}); set model.vocab_size >= {vocab}"
        )
    if loader.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"the token cache has rows of {loader.seq_len} tokens but model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.trainer.global_batch_size % jax.process_count():
        raise ValueError(
            f"trainer.global_batch_size={cfg.trainer.global_batch_size} must be divisible by the "
            f"{jax.process_count()} processes"
        )


def _record(host: dict, step_seconds: float, tokens_per_step: int, flops_per_step: float, mfu: float, peak: Peak) -> dict:
    imbalance_max, imbalance_mean = expert_load_stats(host["expert_counts"])
    return {
        "loss": float(host["loss"]),
        "ce_loss": float(host["ce_loss"]),
        "aux_loss": float(host["aux_loss"]),
        "lr": float(host["lr"]),
        "grad_norm": float(host["grad_norm"]),
        "tokens_per_s": tokens_per_step / step_seconds if step_seconds > 0 else 0.0,
        "mfu": mfu,  # NaN when impossible (> 1): see metrics.checked_mfu
        "step_seconds": step_seconds,  # on the devices (goodput.py); the slowest process's with several
        "peak_flops": peak.flops,
        "peak_name": peak.name,
        "peak_dtype": peak.dtype,
        "expert_load_max_over_mean": imbalance_max,
        "expert_load_max_over_mean_avg": imbalance_mean,
        "dropped_fraction": float(host["dropped_fraction"]),
        "expert_load": expert_load_shares(host["expert_counts"]),  # [MoE layer][expert] shares, for reports
        "model_flops_per_step": flops_per_step,  # training FLOPs = step x this (indicfm.model.flops)
        "skipped_steps": int(host["nonfinite_total"]),
        "step_skipped": not bool(host["step_ok"]),
    }


def _make_evaluator(cfg: Config, graphdef: Any, shardings: Any, mesh: Any, seq_len: int, say: Callable):
    """``evaluate(state) -> {lang: bits per byte, "mean": ...}`` or None when evaluation is off."""
    if not cfg.eval.heldout_dir:
        return None
    from indicfm.sharding import batch_sharding
    from indicfm.train.evaluate import evaluate_bpb, load_heldout
    from indicfm.package_data import resolve_path
    from indicfm.train.step import make_eval_step

    heldout_dir = resolve_path(cfg.eval.heldout_dir)
    sets = load_heldout(heldout_dir, cfg.tokenizer.model_file, seq_len, cfg.eval.max_lines_per_language, cfg.eval.languages)
    devices = jax.device_count()
    batch_size = math.ceil(cfg.eval.batch_size / devices) * devices
    data_sharding = batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    eval_step = jax.jit(
        make_eval_step(graphdef),
        in_shardings=(shardings["params"], shardings["model_state"], data_sharding),
        out_shardings=replicated,
    )
    say(f"evaluation: {len(sets)} languages from {heldout_dir} ({sum(s.num_lines for s in sets):,} lines)")

    def evaluate(state: dict) -> dict[str, float]:
        def nll_fn(batch: dict[str, np.ndarray]) -> tuple[float, float]:
            nll, count = eval_step(state["params"], state["model_state"], _place_replicated_batch(batch, data_sharding))
            return float(nll), float(count)

        return evaluate_bpb(sets, nll_fn, batch_size)

    return evaluate
