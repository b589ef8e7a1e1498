"""The training loop: ``train(cfg, workdir) -> TrainResult``.

What one call does, in order:

1. tokenizer and token cache: use the configured ones or build them in the workdir (``inputs.py``);
2. mesh, sharded model, optimizer, fresh train state (``indicfm.sharding``, ``optimizer.py``, ``step.py``);
3. restore the newest good checkpoint if the workdir has one ("resuming from step N"), falling back
   past damaged ones (``checkpoint.py``);
4. for each remaining step: the loader's batch for that step (a pure function of seed and step, so a
   resumed run sees exactly the batches it would have seen), one jitted step, metrics, and a
   checkpoint every ``checkpoint.every_steps`` and at the end;
5. stop early, cleanly, on SIGTERM/SIGINT (save, return ``stopped="preempted"``) or after
   ``trainer.max_consecutive_nonfinite`` non-finite steps in a row (no save: the last good
   checkpoint stays the latest; ``stopped="nonfinite"``).

Step numbers count completed optimizer steps: the checkpoint "at step N" holds the state after N
updates, and the metrics record with ``"step": N`` describes the N-th update.  With several
processes (``jax.distributed`` initialised first) every process runs this function; only process 0
writes logs, metrics and TensorBoard files.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from indicfm.config import Config, save_config
from indicfm.train.metrics import expert_load_stats, mfu

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
    damaged_checkpoints: list[int] = field(default_factory=list)
    message: str = ""


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


def train(
    cfg: Config,
    workdir: str | Path,
    *,
    on_step: StepCallback | None = None,
    stop_at_step: int | None = None,
    console: Any = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train (or resume training) ``cfg`` in ``workdir``; see the module docstring.

    ``on_step(step, record)`` is called after every step with the metrics record (tests use it to
    simulate a crash).  ``stop_at_step`` stops early as a preemption would (save, return
    ``stopped="preempted"``); the schedule still follows ``trainer.steps``.  ``progress`` overrides
    ``logging.progress``.
    """
    from rich.console import Console

    from data_pipeline.loader import TokenLoader
    from indicfm.model.flops import train_flops_per_token
    from indicfm.sharding import batch_sharding, create_model, make_mesh
    from indicfm.files import file_sha256
    from indicfm.train.checkpoint import Checkpointer, tokenizer_item
    from indicfm.train.inputs import ensure_tokenizer_and_cache
    from indicfm.train.metrics import MetricsWriter, ProgressLine, total_peak_flops
    from indicfm.train.optimizer import learning_rate_schedule, make_optimizer
    from indicfm.train.step import abstract_train_state, init_train_state, jit_train_step, make_train_step

    workdir = Path(workdir).resolve()
    is_main = jax.process_index() == 0
    console = console or Console(stderr=True)
    say = console.print if is_main else (lambda *a, **k: None)
    show_progress = cfg.logging.progress if progress is None else progress
    workdir.mkdir(parents=True, exist_ok=True)

    _enable_compilation_cache(cfg.trainer.compilation_cache_dir, workdir)

    # 1. tokenizer and token cache
    cfg = ensure_tokenizer_and_cache(cfg, workdir, progress=show_progress and is_main, console=console if is_main else None)
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
    seq_len = loader.seq_len
    if is_main:
        save_config(cfg, workdir / "config.yaml")

    # 2. mesh, model, optimizer, fresh state
    mesh = make_mesh(cfg.mesh)
    total_steps = cfg.trainer.steps
    tx = make_optimizer(cfg.optimizer, total_steps, cfg.trainer.max_consecutive_nonfinite)
    schedule = learning_rate_schedule(cfg.optimizer, total_steps)
    graphdef, abstract_state, shardings = abstract_train_state(cfg.model, tx, cfg.trainer.seed, mesh)
    data_sharding = batch_sharding(mesh)

    # 3. resume, or start fresh
    checkpointer = Checkpointer(workdir / cfg.checkpoint.dir_name, cfg.checkpoint)
    result = TrainResult(workdir=workdir, start_step=0, final_step=0, stopped="completed")
    restored = checkpointer.restore_latest_good(abstract_state, warn=lambda m: say(f"[yellow]warning:[/] {m}"))
    if restored is not None:
        saved_sha = restored.meta.get("tokenizer_sha256")
        if saved_sha and saved_sha != tokenizer_sha:
            raise ValueError(
                f"the checkpoint at step {restored.step} in {checkpointer.directory} was trained with tokenizer "
                f"sha256 {saved_sha}, but {cfg.tokenizer.model_file} has sha256 {tokenizer_sha}"
            )
        state = restored.state
        result.start_step = restored.step
        result.last_checkpoint_step = restored.step
        result.damaged_checkpoints = restored.skipped_damaged
        loader.load_state_dict({**restored.meta.get("loader", {}), "step": restored.step})
        say(f"resuming from step {restored.step} ({checkpointer.directory / str(restored.step)})")
    else:
        model = create_model(cfg.model, mesh, cfg.trainer.seed)
        graphdef, state, _ = init_train_state(model, tx, cfg.trainer.seed, mesh)
        del model
        say(f"starting a fresh run in {workdir}")
    start_step = result.start_step
    if start_step >= total_steps:
        say(f"nothing to do: the run already completed {start_step} of trainer.steps={total_steps} steps")
        checkpointer.close()
        result.final_step = start_step
        return result

    # 4. compile, metrics, evaluation
    train_step = jit_train_step(
        make_train_step(
            graphdef, tx, schedule,
            micro_batches=cfg.trainer.micro_batches,
            router_bias_rate=cfg.model.bias_update_rate if cfg.model.loss_free_bias else 0.0,
        ),
        shardings, data_sharding,
    )
    tokens_per_step = cfg.trainer.global_batch_size * seq_len
    flops_per_step = train_flops_per_token(cfg.model, seq_len) * tokens_per_step
    peak = total_peak_flops(jax.devices(), cfg.trainer.peak_flops)
    writer = MetricsWriter(workdir, tensorboard=cfg.logging.tensorboard, enabled=is_main)
    writer.drop_after(start_step)
    evaluator = _make_evaluator(cfg, graphdef, shardings, mesh, seq_len, say)
    tokenizer = tokenizer_item(cfg.tokenizer.model_file)

    def meta_for_save() -> dict:
        return {
            "loader": loader.state_dict(),
            "config": cfg.model_dump(mode="json"),
            "tokenizer_sha256": tokenizer_sha,
            "seed": cfg.trainer.seed,
        }

    def save(step: int) -> None:
        if checkpointer.save(step, state, meta_for_save(), tokenizer):
            result.last_checkpoint_step = step

    if evaluator and cfg.eval.at_start and start_step == 0:
        with jax.set_mesh(mesh):
            result.eval_bpb[0] = evaluator(state)
        writer.write(0, {f"bpb/{lang}": value for lang, value in result.eval_bpb[0].items()})
        say(f"step 0 · held-out bits per byte: mean {result.eval_bpb[0]['mean']:.3f}")

    bar = ProgressLine(total_steps, start_step, enabled=show_progress and is_main, console=console)
    say(
        f"training {total_steps - start_step} steps · {tokens_per_step:,} tokens/step · "
        f"{flops_per_step / 1e9:,.2f} GFLOP/step · peak {peak / 1e12:,.3f} TFLOP/s over {jax.device_count()} device(s)"
    )

    # 5. the loop
    step = start_step
    try:
        with PreemptionWatcher() as watcher, jax.set_mesh(mesh):
            batches = iter(loader)  # loader.step == start_step: batch s is a pure function of (seed, s)
            last_time = time.perf_counter()
            for step_index in range(start_step, total_steps):
                batch = _place_batch(next(batches), data_sharding, cfg.trainer.global_batch_size)
                state, step_metrics = train_step(state, batch)
                host = jax.device_get(step_metrics)
                now = time.perf_counter()
                step_seconds, last_time = now - last_time, now
                step = step_index + 1
                record = _record(host, step_seconds, tokens_per_step, flops_per_step, peak)
                result.losses[step] = record["loss"]
                result.skipped_steps = record["skipped_steps"]
                if step % cfg.logging.every_steps == 0 or step == total_steps:
                    writer.write(step, record)
                bar.update(step, record["loss"], record["tokens_per_s"], record["mfu"])

                if int(host["nonfinite_in_a_row"]) >= cfg.trainer.max_consecutive_nonfinite:
                    result.stopped = "nonfinite"
                    result.message = (
                        f"stopping at step {step}: {int(host['nonfinite_in_a_row'])} non-finite steps in a row "
                        f"(trainer.max_consecutive_nonfinite={cfg.trainer.max_consecutive_nonfinite}); their "
                        f"updates were skipped and nothing was saved, the last good checkpoint is step "
                        f"{result.last_checkpoint_step}. Lower optimizer.learning_rate or check the data."
                    )
                    say(f"[bold red]{result.message}[/]")
                    break
                preempted = watcher.requested or checkpointer.reached_preemption(step) or step == stop_at_step
                # Periodic saves wait out a run of non-finite steps, so the newest checkpoint is one a
                # finite step produced; a preemption or the end of the run saves regardless.
                in_streak = int(host["nonfinite_in_a_row"]) > 0
                if preempted or step == total_steps or (checkpointer.should_save(step) and not in_streak):
                    save(step)
                if evaluator and (step == total_steps or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0)):
                    bpb = evaluator(state)
                    result.eval_bpb[step] = bpb
                    writer.write(step, {f"bpb/{lang}": value for lang, value in bpb.items()})
                    say(f"step {step} · held-out bits per byte: mean {bpb['mean']:.3f}")
                if on_step is not None:
                    on_step(step, record)
                if preempted:
                    result.stopped = "preempted"
                    why = watcher.requested or ("stop_at_step" if step == stop_at_step else "preemption notice")
                    result.message = f"{why}: saved a checkpoint at step {step}, stopping"
                    say(result.message)
                    break
                last_time = time.perf_counter()  # checkpoint and eval time is not step time
    finally:
        bar.close()
        checkpointer.close()  # waits for background saves: a returned run is on disk
        writer.close()
    result.final_step = step
    return result


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
    from data_pipeline.cache import read_metadata
    from data_pipeline.loader import temperature_weights

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
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(cfg.tokenizer.model_file)).get_piece_size()
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


def _record(host: dict, step_seconds: float, tokens_per_step: int, flops_per_step: float, peak: float) -> dict:
    imbalance_max, imbalance_mean = expert_load_stats(host["expert_counts"])
    return {
        "loss": float(host["loss"]),
        "ce_loss": float(host["ce_loss"]),
        "aux_loss": float(host["aux_loss"]),
        "lr": float(host["lr"]),
        "grad_norm": float(host["grad_norm"]),
        "tokens_per_s": tokens_per_step / step_seconds if step_seconds > 0 else 0.0,
        "mfu": mfu(flops_per_step, step_seconds, peak),
        "step_seconds": step_seconds,
        "expert_load_max_over_mean": imbalance_max,
        "expert_load_max_over_mean_avg": imbalance_mean,
        "dropped_fraction": float(host["dropped_fraction"]),
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


def read_losses(workdir: str | Path) -> dict[int, float]:
    """step → loss from ``<workdir>/metrics.jsonl`` (the last record of a step wins)."""
    losses: dict[int, float] = {}
    path = Path(workdir) / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[int(record["step"])] = float(record["loss"])
    return losses
