"""``indicfm quickstart``: the whole path on the shipped sample, in a few minutes on a laptop CPU.

tokenizer → token cache → train tiny-moe → stop halfway as a preemption would (checkpoint) →
resume from that checkpoint in a fresh ``train`` call → per-language bits per byte before and after,
and (with the eval extra) the accuracy of the shipped minimal-pairs task per language
(``eval.downstream``: the CLI passes the evaluator, which lives in a layer above this one).
Everything comes from ``configs/quickstart.yaml``; the workdir can be reused (a second quickstart in
the same workdir starts over: it removes the previous run's checkpoints and metrics, keeping the
tokenizer and token cache).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from indicfm.config import load_config
from indicfm.package_data import CONFIG_DIR
from indicfm.train.downstream_hook import DownstreamFactory
from indicfm.train.loop import TrainResult, train

QUICKSTART_CONFIG = CONFIG_DIR / "quickstart.yaml"


@dataclass
class QuickstartResult:
    first: TrainResult  # the run stopped halfway
    resumed: TrainResult  # the run that resumed and finished
    bpb_before: dict[str, float]
    bpb_after: dict[str, float]
    downstream: dict[int, dict[str, float]] = field(default_factory=dict)  # step → downstream/<task>/<metric>


def run_quickstart(
    workdir: str | Path, overrides: list[str] | None = None, console=None, downstream: DownstreamFactory | None = None
) -> QuickstartResult:
    """Run the quickstart in ``workdir``; ``downstream`` builds the in-loop downstream evaluator of
    ``eval.downstream`` (the CLI passes ``indicfm.evaluation.in_loop.InLoopEvaluator``; None: off)."""
    from rich.console import Console

    from indicfm.tables import print_table

    console = console or Console(stderr=True)
    workdir = Path(workdir)
    cfg = load_config(QUICKSTART_CONFIG, overrides or [])
    for stale in ("checkpoints", "damaged_checkpoints", "metrics.jsonl", "tensorboard"):
        path = workdir / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    halfway = max(1, cfg.trainer.steps // 2)
    console.rule(f"[bold]1/2 · train to step {halfway}, then stop as if preempted")
    first = train(cfg, workdir, stop_at_step=halfway, console=console, downstream=downstream)
    console.rule(f"[bold]2/2 · resume from the checkpoint and finish {cfg.trainer.steps} steps")
    resumed = train(cfg, workdir, console=console, downstream=downstream)

    before = first.eval_bpb.get(0, {})
    after = resumed.eval_bpb.get(resumed.final_step, {})
    rows = [[lang, f"{before.get(lang, float('nan')):.3f}", f"{after[lang]:.3f}"]
            for lang in sorted(after, key=lambda k: (k == "mean", k))]  # fmt: skip
    print_table(console, "held-out bits per byte (lower is better)", ["language"], ["before", "after"], rows)
    downstream_scores = {**first.downstream, **resumed.downstream}
    if resumed.downstream:
        _print_downstream(console, downstream_scores, resumed.final_step)
    first_loss = first.losses.get(min(first.losses)) if first.losses else float("nan")
    last_loss = resumed.losses.get(resumed.final_step, float("nan"))
    console.print(
        f"loss {first_loss:.3f} → {last_loss:.3f}; stopped at step {first.final_step} and resumed from step "
        f"{resumed.start_step}; checkpoints, metrics.jsonl and TensorBoard logs are in {workdir}"
    )
    return QuickstartResult(first, resumed, before, after, downstream_scores)


def _print_downstream(console, scores: dict[int, dict[str, float]], final_step: int) -> None:
    """Accuracy per downstream task (e.g. the shipped minimal pairs, one task per language) at the
    first evaluation and at the end: chance is 0.5 on two-choice tasks."""
    from indicfm.tables import print_table
    from indicfm.train.downstream_hook import PREFIX

    first, last = scores[min(scores)], scores[final_step] if final_step in scores else scores[max(scores)]
    metrics = sorted(k for k in last if k.startswith(PREFIX) and k.endswith("/acc"))
    def shown(scores: dict[str, float], key: str) -> str:
        stderr = scores.get(f"{key}_stderr")
        return f"{scores.get(key, float('nan')):.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")

    rows = [[k[len(PREFIX):-len("/acc")], shown(first, k), shown(last, k)] for k in metrics]
    print_table(console, f"downstream accuracy, step {min(scores)} → {final_step} (higher is better)", ["task"],
                ["before", "after"], rows)
