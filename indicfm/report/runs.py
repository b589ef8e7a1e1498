"""One run's history, read back from its workdir (``metrics.jsonl`` + ``config.yaml``) for plotting.

``metrics.jsonl`` holds three kinds of record, all keyed by ``step``: a training record per logged
step (loss, lr, grad norm, throughput, MoE statistics), an evaluation record per evaluation
(``bpb/<lang>`` keys) and a downstream record per in-loop downstream evaluation
(``downstream/<task>/<metric>`` keys and ``downstream/seconds``, the evaluation's own wall time).
:class:`RunHistory` splits them into arrays a plot can use directly.

Training FLOPs at step s are ``s x model_flops_per_step`` (the model FLOPs of
:mod:`indicfm.model.flops`, logged by the training loop); older logs without that key get it from
the run's saved ``config.yaml``.  Training wall-clock at step s is the sum of the logged step
times up to s: the time the devices spent on training steps, not evaluating, checkpointing or
compiling.  (Logs written before step times were measured on the devices counted compilation in
the first step; there it is counted at the median step time.)

Goodput (:mod:`indicfm.train.goodput`): every training record and each ``train()`` call's last
record carry that call's (session's) breakdown so far.  A run's breakdown is the sum over its
sessions of each one's last record; a session that crashed counts up to its last record kept
after the resume, and the steps it lost appear once, as ``recomputed``, in the session that redid
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indicfm.train.downstream_hook import PREFIX as DOWNSTREAM, SECONDS_KEY
from indicfm.train.goodput import CATEGORIES, PREFIX, breakdown_of
from indicfm.train.metrics import read_metrics


@dataclass
class GoodputPoint:
    """One session's breakdown as of one record (cumulative since the session started)."""

    session: str
    step: int
    wall: float
    seconds: dict[str, float]  # category → seconds


@dataclass
class RunHistory:
    """The logged history of one run; arrays are aligned with ``steps`` (training records) or
    ``eval_steps`` (evaluation records)."""

    name: str
    workdir: Path
    steps: np.ndarray
    train: dict[str, np.ndarray]  # metric name → values at ``steps`` (NaN where a record lacks it)
    flops_per_step: float
    eval_steps: np.ndarray
    bpb: dict[str, np.ndarray]  # language (and "mean") → bits per byte at ``eval_steps``
    expert_load: np.ndarray | None = None  # [logged steps, MoE layers, experts] shares, None if not logged
    expert_load_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    goodput: list[GoodputPoint] = field(default_factory=list)  # in file order
    downstream_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    downstream: dict[str, np.ndarray] = field(default_factory=dict)  # "<task>/<metric>" → values at downstream_steps
    downstream_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # each evaluation's wall time

    @property
    def downstream_tasks(self) -> list[str]:
        """Tasks with an accuracy logged, in name order."""
        return sorted({key.rsplit("/", 1)[0] for key in self.downstream if key.endswith("/acc")})

    def final_downstream(self, metric: str = "acc") -> dict[str, float]:
        """Task → ``metric`` at the last downstream evaluation that has it."""
        final = {}
        for task in self.downstream_tasks:
            values = self.downstream.get(f"{task}/{metric}", np.zeros(0))
            finite = np.flatnonzero(np.isfinite(values))
            if len(finite):
                final[task] = float(values[finite[-1]])
        return final

    @property
    def train_flops(self) -> np.ndarray:
        return self.steps * self.flops_per_step

    @property
    def eval_flops(self) -> np.ndarray:
        return self.eval_steps * self.flops_per_step

    @property
    def languages(self) -> list[str]:
        """Evaluated languages, without the "mean" column."""
        return [lang for lang in self.bpb if lang != "mean"]

    def wall_seconds_at(self, steps: np.ndarray) -> np.ndarray:
        """Training wall-clock (see the module docstring) at each of ``steps``."""
        return np.interp(steps, np.concatenate([[0], self.steps]), np.concatenate([[0.0], self.cumulative_seconds()]))

    def cumulative_seconds(self) -> np.ndarray:
        """Training wall-clock at each of ``steps``; a step that was not logged counts at the time of
        the next logged step (``logging.every_steps`` > 1)."""
        seconds = self.train.get("step_seconds")
        if seconds is None or not len(seconds):
            return np.full(len(self.steps), np.nan)
        seconds = np.array(seconds, dtype=np.float64)
        if len(seconds) > 1 and not self.goodput:
            seconds[0] = np.nanmedian(seconds[1:])  # an old log: its first step also compiled the program
        gaps = np.diff(np.concatenate([[0], self.steps]))
        return np.cumsum(seconds * gaps)

    def goodput_sessions(self) -> dict[str, list[GoodputPoint]]:
        """Session → its points, sessions in the order they ran."""
        sessions: dict[str, list[GoodputPoint]] = {}
        for point in self.goodput:
            sessions.setdefault(point.session, []).append(point)
        return sessions

    def goodput_totals(self) -> dict[str, float]:
        """Category → seconds over the whole run (each session's latest point, summed)."""
        totals = dict.fromkeys(CATEGORIES, 0.0)
        for points in self.goodput_sessions().values():
            last = max(points, key=lambda p: p.wall)
            for category, value in last.seconds.items():
                totals[category] += value
        return totals

    def goodput_wall(self) -> float:
        """The run's accounted wall clock: its sessions' walls, summed."""
        return sum(max(p.wall for p in points) for points in self.goodput_sessions().values())

    def productive_share(self) -> float:
        """The share of the accounted wall clock spent on productive steps; NaN without a goodput log."""
        wall = self.goodput_wall()
        return self.goodput_totals()["productive"] / wall if wall > 0 else math.nan

    def goodput_over_time(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(wall clock, category → cumulative seconds) at every point, sessions one after another."""
        walls: list[float] = []
        series: dict[str, list[float]] = {c: [] for c in CATEGORIES}
        offset, base = 0.0, dict.fromkeys(CATEGORIES, 0.0)
        for points in self.goodput_sessions().values():
            points = sorted(points, key=lambda p: p.wall)
            for point in points:
                walls.append(offset + point.wall)
                for category in CATEGORIES:
                    series[category].append(base[category] + point.seconds.get(category, 0.0))
            offset += points[-1].wall
            base = {c: base[c] + points[-1].seconds.get(c, 0.0) for c in CATEGORIES}
        return np.array(walls), {c: np.array(v) for c, v in series.items()}


def _float(value) -> float:
    try:
        return float(value)  # "nan"/"inf" strings (JSON has no NaN) become floats again
    except (TypeError, ValueError):
        return math.nan


def _flops_from_config(workdir: Path) -> float:
    """Model FLOPs per step from the run's saved config (for logs written before the loop logged it)."""
    from indicfm.config import load_config
    from indicfm.model.flops import train_flops_per_token

    config_file = workdir / "config.yaml"
    if not config_file.is_file():
        return math.nan
    cfg = load_config(config_file)
    return train_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.trainer.global_batch_size * cfg.data.seq_len


def load_run(workdir: str | Path, name: str | None = None) -> RunHistory:
    """Read ``<workdir>/metrics.jsonl``; a missing file is a ``FileNotFoundError`` that names it.

    When a step was logged twice (a resumed run that the loop did not trim), the last record wins.
    """
    workdir = Path(workdir)
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl here; is {workdir} the workdir of an `indicfm train` run?")
    train_records: dict[int, dict] = {}
    eval_records: dict[int, dict] = {}
    downstream_records: dict[int, dict] = {}
    goodput: list[GoodputPoint] = []
    for record in read_metrics(path):
        step = int(record["step"])
        if f"{PREFIX}wall_s" in record:
            session = str(record.get(f"{PREFIX}session", ""))
            goodput.append(GoodputPoint(session, step, _float(record[f"{PREFIX}wall_s"]), breakdown_of(record)))
        if any(key.startswith("bpb/") for key in record):
            eval_records.setdefault(step, {}).update(record)
        if "loss" in record:
            train_records[step] = record
        if SECONDS_KEY in record:
            downstream_records[step] = record  # a step evaluated twice (an untrimmed resume): the last wins

    steps = np.array(sorted(train_records), dtype=np.int64)
    keys = sorted({k for r in train_records.values() for k, v in r.items() if k != "step" and not isinstance(v, (list, dict))})
    train = {k: np.array([_float(train_records[s].get(k)) for s in steps]) for k in keys}

    eval_steps = np.array(sorted(eval_records), dtype=np.int64)
    langs = sorted({k[4:] for r in eval_records.values() for k in r if k.startswith("bpb/")}, key=lambda l: (l == "mean", l))
    bpb = {lang: np.array([_float(eval_records[s].get(f"bpb/{lang}")) for s in eval_steps]) for lang in langs}

    logged_flops = train.get("model_flops_per_step")
    flops = float(np.nanmax(logged_flops)) if logged_flops is not None and np.isfinite(logged_flops).any() else _flops_from_config(workdir)

    load_steps = [s for s in steps if train_records[s].get("expert_load")]
    expert_load = None
    if load_steps:
        shapes = {np.shape(train_records[s]["expert_load"]) for s in load_steps}
        shape = max(shapes)  # a resumed run with another model would differ; keep the common shape
        load_steps = [s for s in load_steps if np.shape(train_records[s]["expert_load"]) == shape]
        expert_load = np.array([train_records[s]["expert_load"] for s in load_steps], dtype=np.float64)

    downstream_steps = np.array(sorted(downstream_records), dtype=np.int64)
    downstream_keys = sorted(
        {k[len(DOWNSTREAM):] for r in downstream_records.values() for k in r if k.startswith(DOWNSTREAM) and k != SECONDS_KEY}
    )
    downstream = {
        key: np.array([_float(downstream_records[s].get(DOWNSTREAM + key)) for s in downstream_steps]) for key in downstream_keys
    }

    return RunHistory(
        name=name or workdir.resolve().name,
        workdir=workdir,
        steps=steps,
        train=train,
        flops_per_step=flops,
        eval_steps=eval_steps,
        bpb=bpb,
        expert_load=expert_load,
        expert_load_steps=np.array(load_steps, dtype=np.int64),
        goodput=goodput,
        downstream_steps=downstream_steps,
        downstream=downstream,
        downstream_seconds=np.array([_float(downstream_records[s][SECONDS_KEY]) for s in downstream_steps]),
    )
