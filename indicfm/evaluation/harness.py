"""Downstream evaluation with lm-evaluation-harness: tasks in, scores out.

:func:`evaluate_model` runs lm-eval's tasks on an indicfm model through
:class:`~indicfm.evaluation.lm_adapter.IndicfmLM`; lm-eval builds the prompts, few-shot contexts
and metrics (with their standard errors), indicfm computes the log-likelihoods and generations.
It serves ``indicfm eval`` and the training loop alike (the loop passes its own model and mesh).

Tasks are found by lm-eval's ``TaskManager`` in the tasks shipped with indicfm
(``indicfm/evaluation/tasks/``: the ``indic-core`` suite and the offline tasks), in the user's
``include_path``, and, for a name neither has, in lm-eval's own task collection (indexing that
takes seconds, so it is only done when needed).  A task's language is the FLORES-200 code that
ends its name (``indic_belebele_hin_Deva``), so results group per language.

On several processes process 0 runs lm-eval and the others only compute
(:class:`~indicfm.evaluation.scorer.Scorer`); every process returns the same scores.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"
#: the stderr bootstrap of lm-eval's bootstrappable aggregations (not used by the shipped tasks'
#: means, whose stderr is closed-form); lm-eval's default of 100000 takes minutes on a CPU
BOOTSTRAP_ITERS = 1000
LANGUAGE = re.compile(r"(?:^|_)([a-z]{3}_[A-Z][a-z]{3})$")  # a FLORES-200 code ending a task name

log = logging.getLogger(__name__)


class UnknownTaskError(ValueError):
    """A task, group, tag or suite name that no task directory has."""


class TaskFileError(ValueError):
    """A task YAML that does not parse, or a task that cannot be built from its file."""


def language_of_task(task: str) -> str:
    """The FLORES-200 code a task name ends with (``indic_xnli_hin_Deva`` → ``hin_Deva``), else ``""``."""
    match = LANGUAGE.search(task)
    return match.group(1) if match else ""


@dataclass
class DownstreamScores:
    """What one evaluation produced."""

    results: dict  # lm_eval's `results` dict (task -> "metric,filter" -> value, with stderr entries)
    samples_per_task: dict[str, int]
    seconds: float  # wall time of the evaluation itself
    configs: dict = field(default_factory=dict)  # each task's resolved lm-eval config
    samples: dict | None = None  # lm-eval's per-document records (log_samples=True)
    requests: int = 0  # log-likelihood requests scored

    def flat(self) -> dict[str, float]:
        """``"downstream/<task>/<metric>" -> value``: no stderr, no aliases, filter ``none``
        dropped from the name (another filter becomes ``<metric>/<filter>``).  Stable keys for
        metrics.jsonl and TensorBoard."""
        from indicfm.train.downstream_hook import PREFIX

        return {f"{PREFIX}{task}/{metric}": value for task, _, metric, value, _ in self.rows()}

    def rows(self) -> list[tuple[str, str, str, float, float | None]]:
        """``(task, language, metric, value, stderr or None)`` per task and metric, sorted by task."""
        out = []
        for task in sorted(self.results):
            metrics = self.results[task]
            for key, value in metrics.items():
                metric, _, filter_name = key.partition(",")
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not filter_name or "_stderr" in metric or not numeric:  # aliases, "N/A"
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filter_name}")
                name = metric if filter_name == "none" else f"{metric}/{filter_name}"
                out.append((task, language_of_task(task), name, float(value),
                            float(stderr) if isinstance(stderr, (int, float)) else None))
        return out

    def table(self) -> str:
        """A plain-text table: task, language, metric, value, stderr."""
        header = ("task", "language", "metric", "value", "stderr")
        body = [(t, l or "-", m, f"{v:.4f}", "-" if s is None else f"{s:.4f}") for t, l, m, v, s in self.rows()]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(5)]
        lines = []
        for r in [header, *body]:
            lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        return "\n".join(lines)

    def to_json(self) -> dict:
        """A JSON-able dict (without samples): what the other processes receive."""
        return {"results": self.results, "samples_per_task": self.samples_per_task, "seconds": self.seconds,
                "configs": self.configs, "requests": self.requests}

    @classmethod
    def from_json(cls, data: dict) -> "DownstreamScores":
        return cls(data["results"], data["samples_per_task"], data["seconds"], data.get("configs", {}), None,
                   data.get("requests", 0))


# -- finding tasks ---------------------------------------------------------------------------------


def _include_paths(include_path: str | Path | None) -> list[Path]:
    paths = [SHIPPED_TASKS]
    if include_path is not None:
        path = Path(include_path)
        if not path.exists():
            raise TaskFileError(f"--include-path {path}: no such file or directory")
        paths.append(path)
    return paths


def check_task_files(include_path: str | Path | None) -> None:
    """Parse every task YAML under ``include_path`` (lm-eval's loader, ``!function`` unresolved)
    and raise :class:`TaskFileError` naming the first that does not parse.  lm-eval's own index
    skips such a file silently, which would turn a typo into "unknown task"."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if include_path is None:
        return
    root = Path(include_path)
    files = [root] if root.is_file() else sorted(root.rglob("*.yaml"))
    for path in files:
        try:
            config = load_yaml(path, resolve_func=False, recursive=True)
        except Exception as err:  # yaml.YAMLError, a missing include, ...
            raise TaskFileError(f"{path}: not a valid task file: {' '.join(str(err).split())}") from None
        if not isinstance(config, dict):
            raise TaskFileError(f"{path}: not a valid task file: expected a mapping, got {type(config).__name__}")


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None, with_defaults: bool) -> Any:
    """lm-eval's ``TaskManager`` over the shipped tasks and ``include_path`` (and lm-eval's own
    tasks when ``with_defaults``), cached: building one indexes every YAML it can see."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in _include_paths(include_path)]
    return TaskManager(include_path=paths, include_defaults=with_defaults)


def _expand(names: Sequence[str], manager: Any) -> tuple[list[str], list[str]]:
    """``(resolved task/group names, names not found)``; tags expand to their tasks, globs match."""
    from lm_eval.tasks._index import Kind

    found: list[str] = []
    missing: list[str] = []
    for name in names:
        entry = manager.task_index.get(name)
        if entry is not None:
            found.extend(sorted(entry.tags) if entry.kind == Kind.TAG else [name])
            continue
        if any(c in name for c in "*?["):
            matched = manager.match_tasks([name])
            if matched:
                found.extend(_expand(matched, manager)[0])
                continue
        missing.append(name)
    return found, missing


def resolve_tasks(tasks: Sequence[str] | None, suite: str | None, include_path: str | Path | None) -> list[str]:
    """The task (or group) names to run: ``tasks`` (names, globs, tags or groups) or the tasks of
    ``suite`` (a tag of the shipped or included task files, e.g. ``indic-core``).

    Raises :class:`UnknownTaskError` naming a name that no task directory has and where it looked,
    :class:`TaskFileError` for a task file under ``include_path`` that does not parse.
    """
    if bool(tasks) == bool(suite):
        raise ValueError("give tasks or a suite (exactly one)")
    check_task_files(include_path)
    key = None if include_path is None else str(include_path)
    names = [suite] if suite else [t.strip() for t in tasks if t.strip()]  # type: ignore[union-attr]
    found, missing = _expand(names, task_manager(key, False))
    if missing and not suite:
        more, missing = _expand(missing, task_manager(key, True))
        found += more
    if missing:
        where = ", ".join(str(p) for p in _include_paths(include_path))
        kind = "suite" if suite else "task"
        raise UnknownTaskError(
            f"unknown {kind} {missing[0]!r}: not a task, group or tag in {where}"
            + ("" if suite else " nor in lm-eval's own tasks")
        )
    return list(dict.fromkeys(found))


def load_tasks(names: Sequence[str], include_path: str | Path | None, num_fewshot: int | None, seed: int,
               overrides: dict[str, dict] | None = None) -> dict:
    """lm-eval's loaded task dict for ``names`` with ``num_fewshot`` applied as ``simple_evaluate``
    does (a task whose config says 0 keeps 0).  ``overrides``: task name -> config keys to replace
    (e.g. ``dataset_path: json`` and ``dataset_kwargs`` for local data)."""
    key = None if include_path is None else str(include_path)
    manager = task_manager(key, False)
    if any(name not in manager.task_index for name in names):
        manager = task_manager(key, True)
    from lm_eval.tasks._yaml_loader import load_yaml

    loaded: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in names:
        entry = manager.task_index[name]
        spec: Any = name
        if overrides and name in overrides:
            # the task file's own config with some keys replaced (lm-eval's inline configs replace all)
            spec = {**load_yaml(entry.yaml_path, resolve_func=True), **overrides[name], "task": name}
        try:  # one at a time, so an error names its task
            one = manager.load([spec])
        except Exception as err:
            raise TaskFileError(f"task {name} ({entry.yaml_path}): {type(err).__name__}: "
                                f"{' '.join(str(err).split())}") from None
        for part in loaded:
            loaded[part].update(one.get(part, {}))
    for task in loaded["tasks"].values():
        if num_fewshot is not None:
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    return loaded


# -- running ---------------------------------------------------------------------------------------


def serving_model(model: Any, model_cfg: Any) -> Any:
    """``model`` with the serving config (:func:`indicfm.inference.decode.inference_config`):
    dropless MoE dispatch, so a request's score never depends on what shares its batch.  Same
    parameters, no copy."""
    from flax import nnx

    from indicfm.inference.decode import inference_config
    from indicfm.model.transformer import Transformer

    serving_cfg = inference_config(model_cfg)
    if getattr(model, "cfg", None) == serving_cfg:
        return model
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(serving_cfg, rngs=nnx.Rngs(0))))
    _, state = nnx.split(model)
    return nnx.merge(graphdef, state)


def evaluate_model(
    model: Any,
    model_cfg: Any,
    tokenizer: Any,
    mesh: Any,
    *,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    rows: int = 8,
    row_len: int | None = None,
    seed: int = 0,
    log_samples: bool = False,
    overrides: dict[str, dict] | None = None,
) -> DownstreamScores:
    """Run lm-eval ``tasks`` (names from :func:`resolve_tasks`) on ``model`` (an indicfm
    ``Transformer`` with config ``model_cfg``, placed on ``mesh``) with the run's ``tokenizer``.

    ``rows`` x ``row_len`` (default: the model's ``max_seq_len``) is the shape of every scored
    batch; ``rows`` is rounded up to a multiple of the mesh's data-like axes.  ``limit``: at most
    this many documents per task.  On several processes every process must call this with the
    same arguments; process 0 runs lm-eval, all return the same :class:`DownstreamScores`.
    """
    from lm_eval.evaluator import evaluate

    from indicfm.evaluation.lm_adapter import IndicfmLM
    from indicfm.evaluation.scorer import Scorer
    from indicfm.inference.generate import generate_ids

    scorer = Scorer(serving_model(model, model_cfg), mesh, rows, row_len or model_cfg.max_seq_len,
                    generate=generate_ids)
    if not scorer.is_driver:
        handed = scorer.serve()
        if not handed or "error" in handed:
            raise RuntimeError(f"process 0's evaluation failed: {(handed or {}).get('error', 'no result')}")
        return DownstreamScores.from_json(handed)

    start = time.perf_counter()
    try:
        random.seed(seed)
        np.random.seed(seed)
        loaded = load_tasks(list(tasks), include_path, num_fewshot, seed, overrides)
        lm = IndicfmLM(scorer, tokenizer, seed=seed)
        out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS,
                       log_samples=log_samples, verbosity="WARNING")
    except BaseException as err:
        scorer.finish({"error": f"{type(err).__name__}: {err}"})
        raise
    seconds = time.perf_counter() - start
    samples_per_task = {task: int(n.get("effective", 0)) for task, n in out.get("n-samples", {}).items()}
    scores = DownstreamScores(out["results"], samples_per_task, seconds, out.get("configs", {}),
                              out.get("samples") if log_samples else None, lm.requests_scored)
    scorer.finish(scores.to_json())
    return scores
