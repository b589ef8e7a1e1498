"""Downstream evaluation during training, as the loop sees it: an injected evaluator and when to run it.

The harness that scores lm-eval tasks (``indicfm.evaluation``) sits in a layer above the training
loop, so the loop does not import it: ``indicfm train``/``quickstart`` build the concrete evaluator
(``indicfm.evaluation.in_loop``) and pass a factory to ``train(..., downstream=...)``.  The loop calls
the evaluator with the live, sharded model at the steps :func:`due` names (``eval.downstream``) and
writes what it returns, plus the time the call took, to ``metrics.jsonl`` and TensorBoard under the
step it evaluated.

Resume: records written after the newest checkpoint are dropped on resume and their steps redone,
evaluations included, so none is counted twice.  The loop evaluates a step before saving it (see
``StepLoop.run_until``), so a saved step's evaluation is already logged; the exception, a preemption
(saved first, evaluated after), is caught up on resume by :func:`missed_at_resume`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from indicfm.train.metrics import iter_records

if TYPE_CHECKING:
    from indicfm.config import Config
    from indicfm.train.config import DownstreamEvalConfig

PREFIX = "downstream/"  # metrics.jsonl / TensorBoard keys: downstream/<task>/<metric>
SECONDS_KEY = "downstream/seconds"  # wall time of the evaluation call itself, in its record


class DownstreamEvaluator(Protocol):
    """Scores tasks on the model as it is after ``step`` updates.

    ``model`` is an ``nnx`` module over the train state's arrays: valid only during the call (the
    next step donates those buffers), so an evaluator must not keep it.  Every process calls it
    with the same arguments (with several hosts the harness decides which one drives); the result,
    ``{"downstream/<task>/<metric>": value}``, is written by process 0."""

    def __call__(self, step: int, model: Any, mesh: Any) -> dict[str, float]: ...


#: what ``train(downstream=...)`` takes: builds the evaluator from the run's resolved config (the
#: tokenizer file is known only once the loop has built or found it)
DownstreamFactory = Callable[["Config"], DownstreamEvaluator]


def due(cfg: "DownstreamEvalConfig", step: int, last_step: int) -> bool:
    """Whether step ``step`` (1-based, after its update) is evaluated: every ``every_steps`` and,
    with ``at_end``, the last step of the run."""
    if not cfg.enabled:
        return False
    return (cfg.at_end and step == last_step) or bool(cfg.every_steps and step % cfg.every_steps == 0)


def live_model(graphdef: Any, state: Any) -> Any:
    """The ``nnx`` model over a train state's current (sharded) parameters; no copy is made."""
    from flax import nnx

    return nnx.merge(graphdef, state["params"], state["model_state"])


def logged_steps(metrics_path: Path) -> set[int]:
    """Steps that have a downstream record in ``metrics.jsonl`` (damaged lines skipped)."""
    return {int(record.get("step", -1)) for record in iter_records(metrics_path) if SECONDS_KEY in record}


def missed_at_resume(cfg: "DownstreamEvalConfig", step: int, last_step: int, metrics_path: Path) -> bool:
    """Whether a run resumed at checkpoint ``step`` must first evaluate that step: it was due and
    no record of it survived (the run was killed after saving it, during its evaluation).

    With several processes only process 0's log counts (the others may not see the file), and
    every process gets its answer, so all of them take part in the evaluation or none does."""
    import jax

    missed = step > 0 and due(cfg, step, last_step) and step not in logged_steps(metrics_path)
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        missed = bool(multihost_utils.broadcast_one_to_all(np.int32(missed)))
    return missed


def summary(scores: dict[str, float], limit: int = 4) -> str:
    """A short console line of the scores: the first few accuracies."""
    shown = [(k[len(PREFIX):], v) for k, v in scores.items() if k.endswith("/acc")][:limit]
    more = sum(k.endswith("/acc") for k in scores) - len(shown)
    text = ", ".join(f"{name.rsplit('/', 1)[0]} {value:.3f}" for name, value in shown)
    return (text + (f" (+{more} more)" if more > 0 else "")) if text else f"{len(scores)} values"
