"""The downstream evaluator ``indicfm train`` hands to the training loop (``eval.downstream``).

The loop (layer ``train``) cannot import the harness (this layer, above it), so it takes a factory
(:data:`indicfm.train.downstream_hook.DownstreamFactory`); :class:`InLoopEvaluator` is that factory:
built once from the run's config, it resolves the tasks and loads the tokenizer up front (an unknown
task fails before the first step, not at the first evaluation), and each call scores them on the
live model with :func:`indicfm.evaluation.harness.evaluate_model`, sharded on the run's mesh.

The call returns ``DownstreamScores.flat()`` (``downstream/<task>/<metric>``) and each metric's
standard error (``downstream/<task>/<metric>_stderr``); the loop adds the call's wall time and
writes the record.  lm-eval's per-task informational log lines (e.g. the
notice every task with a ``custom_dataset`` prints when it loads) are held back to warnings-and-up
during the call, so the training console shows one line per evaluation.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from indicfm.train.downstream_hook import PREFIX

if TYPE_CHECKING:
    from indicfm.config import Config

QUIET_LOGGERS = ("lm_eval", "lm-eval")


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.ERROR) -> Iterator[None]:
    """lm-eval logs at INFO/WARNING for every task it builds; in the loop that is noise."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, previous):
            logger.setLevel(old)


def evaluator_factory(cfg: "Config") -> "type[InLoopEvaluator] | None":
    """What ``train(..., downstream=)`` takes: :class:`InLoopEvaluator` when the config asks for
    in-loop downstream evaluation (``eval.downstream``), else None."""
    return InLoopEvaluator if cfg.eval.downstream.enabled else None


class InLoopEvaluator:
    """``evaluator(step, model, mesh) -> {"downstream/<task>/<metric>": value}`` for ``cfg``."""

    def __init__(self, cfg: "Config"):
        from indicfm.evaluation.harness import resolve_tasks
        from indicfm.package_data import resolve_path
        from indicfm.tokenizer.load import load_tokenizer

        self.settings = cfg.eval.downstream
        self.model_cfg = cfg.model
        self.seed = cfg.trainer.seed
        include = self.settings.include_path
        self.include_path = str(Path(resolve_path(include)).resolve()) if include else None
        with quiet_lm_eval():
            self.tasks = resolve_tasks(self.settings.tasks, self.settings.suite, self.include_path)
        self.tokenizer = load_tokenizer(cfg.tokenizer.model_file)

    def __call__(self, step: int, model: Any, mesh: Any) -> dict[str, float]:
        from indicfm.evaluation.harness import evaluate_model

        with quiet_lm_eval():
            scores = evaluate_model(
                model,
                self.model_cfg,
                self.tokenizer,
                mesh,
                tasks=self.tasks,
                include_path=self.include_path,
                num_fewshot=self.settings.num_fewshot,
                limit=self.settings.limit,
                rows=self.settings.rows,
                seed=self.seed,
            )
        values = {}
        for task, _, metric, value, stderr in scores.rows():  # the keys of scores.flat(), with the stderr
            values[f"{PREFIX}{task}/{metric}"] = value
            if stderr is not None:  # lm-eval's standard error, for the report's bands
                values[f"{PREFIX}{task}/{metric}_stderr"] = stderr
        return values
