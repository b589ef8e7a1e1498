"""What a run shows: ``metrics.jsonl``, TensorBoard event files, a live progress line, and MFU.

Only process 0 writes or prints (``MetricsWriter(enabled=jax.process_index() == 0)``), so a run on
many hosts produces one log, not one per host.

MFU (model FLOPs utilisation) = model FLOPs per step ÷ step time ÷ peak FLOP/s of all devices, with
the step time of :mod:`indicfm.train.goodput` (the devices' time, not the host's read pattern).  The
peak (:class:`Peak`, from :func:`run_peak`) is ``trainer.peak_flops`` if set, else
``configs/hardware.yaml`` (the one hardware table, read by :mod:`indicfm.hardware`, shared with the
planner: dense bfloat16 figures); on CPU it is measured at start-up with a matmul in the run's
compute dtype, because CPUs differ too much for a table.  Every record and the run's summary state the peak (FLOP/s, where it comes from, dtype).
An MFU above 1 cannot come from a correct measurement: :func:`checked_mfu` reports it as a bug
instead of a figure.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from indicfm.hardware import Chip, chip_for_device_kind

# [batch, n] of the CPU peak's matmul: of the products tried on a 2-core host (1x512, 4x256, 2x1024,
# 1x2048), 512x512 ran fastest per FLOP (it stays in cache); the fastest shape is the right peak,
# since a lower one would inflate every MFU
CPU_PEAK_MATMUL = (1, 512)


@dataclass(frozen=True)
class Peak:
    """The peak FLOP/s MFU is measured against: all of the run's devices together."""

    flops: float
    name: str  # where the figure comes from, e.g. "cpu: float32 matmul 1x[512x512] (best of 9), measured at start-up"
    dtype: str  # the dtype the figure is for

    def describe(self) -> str:
        return f"{self.flops / 1e12:,.3f} TFLOP/s ({self.name}; {self.dtype})"


def measure_cpu_peak(dtype: str = "float32", batch: int = CPU_PEAK_MATMUL[0], n: int = CPU_PEAK_MATMUL[1], repeats: int = 9) -> Peak:
    """The host's FLOP/s on a batched ``[batch, n, n] @ [batch, n, n]`` matmul in ``dtype``: the
    fastest of ``repeats`` calls, on random inputs rotated over three sets so no cache holds them.
    The fastest, not the median: on a shared machine other processes slow some calls, and a lower
    peak would inflate every MFU above it."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.key(0), 6)
    inputs = [(jax.random.normal(keys[2 * i], (batch, n, n), dt), jax.random.normal(keys[2 * i + 1], (batch, n, n), dt)) for i in range(3)]
    matmul = jax.jit(lambda a, b: jnp.einsum("bik,bkj->bij", a, b, preferred_element_type=dt))
    matmul(*inputs[0]).block_until_ready()
    best = math.inf
    for i in range(repeats):
        start = time.perf_counter()
        matmul(*inputs[i % 3]).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return Peak(2 * batch * n**3 / best, f"cpu: {dt.name} matmul {batch}x[{n}x{n}] (best of {repeats}), measured at start-up", dt.name)


def mfu(model_flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation, a fraction in [0, 1] on honest hardware."""
    if step_seconds <= 0 or peak_flops <= 0:
        return 0.0
    return model_flops_per_step / step_seconds / peak_flops


def checked_mfu(model_flops_per_step: float, step_seconds: float, peak: Peak) -> tuple[float, str | None]:
    """(MFU, None), or (NaN, what is wrong) when the figure is impossible: above 1 means the step
    time or the peak is wrong, and a wrong number must not be plotted as a fast step."""
    value = mfu(model_flops_per_step, step_seconds, peak.flops)
    if value <= 1.0:
        return value, None
    return math.nan, (
        f"MFU {value:.2f} > 1 is impossible: {model_flops_per_step:.3e} FLOP in {step_seconds:.4f} s against a "
        f"peak of {peak.describe()}; the step time or the peak is wrong (not logged as MFU)"
    )


def run_peak(devices: list[Any], override: float | None = None, compute_dtype: str = "bfloat16", hardware: dict[str, Chip] | None = None) -> Peak:
    """The :class:`Peak` of the run's devices: ``trainer.peak_flops`` (per device; per host on CPU),
    else a CPU measurement in ``compute_dtype``, else the hardware table's entry times the devices."""
    device = devices[0]
    count = 1 if device.platform == "cpu" else len(devices)
    if override:
        return Peak(override * count, f"trainer.peak_flops x {count}", compute_dtype)
    if device.platform == "cpu":
        return measure_cpu_peak(compute_dtype)
    kind = str(getattr(device, "device_kind", device))
    chip = chip_for_device_kind(kind, hardware)
    if chip is None:
        raise ValueError(
            f"no peak FLOP/s known for device kind {kind!r}: set trainer.peak_flops or add the device "
            "(with its device_kinds) to configs/hardware.yaml"
        )
    return Peak(chip.peak_flops * count, f"{chip.name} x {count} (configs/hardware.yaml, dense)", "bfloat16")


def expert_load_stats(expert_counts_MxE: np.ndarray) -> tuple[float, float]:
    """Load imbalance of the MoE layers: (max ÷ mean, worst layer) and (max ÷ mean, averaged over layers).

    1.0 means every expert received the same number of tokens.
    """
    counts = np.asarray(expert_counts_MxE, dtype=np.float64)
    if counts.size == 0:
        return 1.0, 1.0
    counts = counts.reshape(-1, counts.shape[-1])
    mean = counts.mean(axis=-1)
    ratio = np.where(mean > 0, counts.max(axis=-1) / np.maximum(mean, 1e-12), 1.0)
    return float(ratio.max()), float(ratio.mean())


def expert_load_shares(expert_counts_MxE: np.ndarray, decimals: int = 5) -> list[list[float]]:
    """Each MoE layer's share of routed token assignments per expert (rows sum to 1), for the
    per-expert load heat map of ``indicfm report``; an empty list for a dense model.

    Shares rather than counts, so runs with different batch sizes or ``top_k`` plot on one scale;
    rounded so a long run's ``metrics.jsonl`` stays small.
    """
    counts = np.asarray(expert_counts_MxE, dtype=np.float64)
    if counts.size == 0:
        return []
    counts = counts.reshape(-1, counts.shape[-1])
    totals = counts.sum(axis=-1, keepdims=True)
    shares = np.where(totals > 0, counts / np.maximum(totals, 1e-12), 0.0)
    return np.round(shares, decimals).tolist()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of failing the run
    return value


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: Path, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(Path(workdir) / "tensorboard"))

    def drop_after(self, step: int) -> None:
        """Forget logged steps after ``step`` (written by a run that died before checkpointing them),
        so that after a resume the file reads as one clean history."""
        if not self.enabled or not self.path.exists():
            return
        self._file.close()
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(key, float(value), int(step))  # NaN steps are in the JSONL, not plotted

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def read_metrics(path: Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` (``indicfm report`` and ``compare`` read runs with it)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def iter_records(path: Path) -> Iterator[dict]:
    """The records of a ``metrics.jsonl`` that may be damaged, for the run's own bookkeeping: a
    missing file yields nothing, and a line that is not a JSON object (cut short by a kill or a
    crash) is skipped.  :func:`read_metrics` is the strict reader, for reports."""
    path = Path(path)
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


class ProgressLine:
    """A rich progress bar with step, loss, tokens/s, MFU and ETA; plain log lines when not a terminal."""

    def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True, console=None):
        from rich.console import Console

        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.total = total_steps
        self._progress = None
        self._task = None
        self._log_every = max(1, total_steps // 20)
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def update(self, step: int, loss: float, tokens_per_s: float, mfu_value: float) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f} · {tokens_per_s:,.0f} tok/s · MFU {100 * mfu_value:.1f}%"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif step % self._log_every == 0 or step == self.total:
            self.console.print(f"step {step}/{self.total} · {info}", highlight=False)

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
