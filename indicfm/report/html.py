"""``indicfm report``: every figure of :mod:`indicfm.report.plots` for some runs, and an HTML page
(``index.html``) that shows them with a summary table, so a run can be judged in a browser.

The page references the PNGs by relative path, so the output directory can be copied or served
as it is.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from indicfm.report import plots
from indicfm.report.runs import RunHistory, load_run


@dataclass
class Figure:
    """One written PNG and what it shows (the HTML caption)."""

    path: Path
    caption: str


def unique_names(workdirs: Sequence[Path]) -> list[str]:
    """Short run names for legends: the workdir's name, with its parent's name where two collide."""
    names = [Path(w).resolve().name for w in workdirs]
    return [
        f"{Path(w).resolve().parent.name}/{name}" if names.count(name) > 1 else name for w, name in zip(workdirs, names)
    ]


def write_figures(runs: Sequence[RunHistory], output: Path) -> list[Figure]:
    """All report figures of ``runs`` (overlaid) into ``output``; figures without data are skipped."""
    output.mkdir(parents=True, exist_ok=True)
    wanted = [
        (plots.plot_loss, "loss.png", "Training loss against steps, training FLOPs and training wall-clock on this machine (faint: every step; solid: moving average)."),
        (plots.plot_learning_rate, "lr.png", "Learning rate."),
        (plots.plot_grad_norm, "grad_norm.png", "Global gradient norm before clipping (log scale)."),
        (plots.plot_throughput, "throughput.png", "Training throughput (tokens/s) and model FLOPs utilisation, from each step's time on the devices (not the host's reads); MFU against the peak in the summary table."),
        (plots.plot_goodput, "goodput.png", "Goodput: where each run's wall clock went (productive steps, steps recomputed after a restart, compilation, waiting for data, the blocking part of checkpoint saves, evaluation, restore, start-up, profiling, other), one bar per run and accumulating over its wall clock."),
        (plots.plot_moe_balance, "moe_balance.png", "MoE runs: expert load imbalance (max ÷ mean tokens per expert, worst layer; 1 = balanced) and dropped token fraction."),
        (plots.plot_bpb, "bpb.png", "Held-out bits per byte per language against steps (several runs: one panel per language, y axes zoomed on the last three quarters of the evaluations)."),
        (plots.plot_downstream, "downstream.png", "Downstream accuracy per task (one task per language for the shipped minimal pairs, flores_pairs_<lang>: the real FLORES-200 sentence against the same sentence with two neighbouring words swapped; dotted: chance) at each in-loop evaluation (eval.downstream), with lm-eval's standard error as a band."),
    ]
    figures = []
    for plot, filename, caption in wanted:
        written = plot(runs, output / filename)
        if written is not None:
            figures.append(Figure(written, caption))
    for index, run in enumerate(runs):
        written = plots.plot_expert_load(run, output / f"expert_load_{index}_{_slug(run.name)}.png")
        if written is not None:
            figures.append(Figure(written, f"{run.name}: per-expert load from the logged router statistics (share of each MoE layer's routed tokens ÷ the uniform share)."))
    return figures


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _fmt(value: float, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def summary_rows(runs: Sequence[RunHistory]) -> list[dict[str, str]]:
    """One row per run: steps, training FLOPs, step time on the devices (median), largest MFU and
    its peak, training time, wall clock and its productive share, final loss and mean bpb."""
    rows = []
    for run in runs:
        last = lambda key: float(run.train[key][-1]) if key in run.train and len(run.train[key]) else math.nan  # noqa: E731
        seconds = run.cumulative_seconds()
        step_seconds = run.train.get("step_seconds")
        mfu = run.train.get("mfu")
        peak = run.train.get("peak_flops")
        wall = run.goodput_wall() if run.goodput else math.nan
        rows.append(
            {
                "run": run.name,
                "steps": str(int(run.steps[-1])) if len(run.steps) else "0",
                "training FLOPs": _fmt(float(run.train_flops[-1]) if len(run.steps) else math.nan, ".3e"),
                "median step (s)": _fmt(_nan_stat(np.nanmedian, step_seconds), ".4f"),
                "largest MFU": _fmt(_nan_stat(np.nanmax, mfu), ".3f"),
                "peak (TFLOP/s)": _fmt(_nan_stat(np.nanmax, peak) / 1e12, ".4f"),
                "training time (s)": _fmt(float(seconds[-1]) if len(seconds) else math.nan, ".0f"),
                "wall clock (s)": _fmt(wall, ".0f"),
                "productive": _fmt(run.productive_share(), ".1%"),
                "final loss": _fmt(last("loss"), ".4f"),
                "final mean bpb": _fmt(float(run.bpb["mean"][-1]) if "mean" in run.bpb and len(run.eval_steps) else math.nan, ".4f"),
                "final downstream acc (mean of tasks)": _fmt(_mean(run.final_downstream().values()), ".3f"),
                "downstream eval share of wall": _fmt(float(np.sum(run.downstream_seconds)) / wall if wall > 0 and len(run.downstream_seconds) else math.nan, ".1%"),
            }
        )
    return rows


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def downstream_rows(runs: Sequence[RunHistory]) -> list[dict[str, str]]:
    """One row per downstream task: its language and each run's accuracy (± standard error) at its
    last in-loop evaluation, next to the run's final held-out bits per byte in that language."""
    from indicfm.evaluation.harness import language_of_task

    tasks = sorted({task for run in runs for task in run.downstream_tasks})
    final = [(run.final_downstream(), run.final_downstream("acc_stderr")) for run in runs]
    rows = []
    for task in tasks:
        lang = language_of_task(task)
        row = {"task": task, "language": lang or "–"}
        for run, (accs, stderrs) in zip(runs, final):
            acc, stderr = accs.get(task), stderrs.get(task)
            row[f"acc {run.name}"] = "–" if acc is None else f"{acc:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
            bpb = run.bpb.get(lang) if lang else None
            row[f"bpb {run.name}"] = _fmt(float(bpb[-1]) if bpb is not None and len(bpb) else math.nan, ".4f")
        rows.append(row)
    return rows


def _nan_stat(stat, values) -> float:
    """``stat`` of the finite values, NaN when there are none (old logs lack some keys)."""
    if values is None:
        return math.nan
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(stat(finite)) if len(finite) else math.nan


def html_table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(output: Path, title: str, figures: Sequence[Figure], sections: Sequence[tuple[str, str]] = ()) -> Path:
    """``index.html`` with ``sections`` (heading, trusted HTML) first, then every figure."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}figure{margin:2em 0}img{max-width:100%}figcaption{color:#444}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{content}")
    for figure in figures:
        src = html.escape(figure.path.relative_to(output).as_posix(), quote=True)
        parts.append(f"<figure><img src='{src}' alt='{src}'><figcaption>{html.escape(figure.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    path = output / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_report(workdirs: Sequence[str | Path], output: str | Path) -> Path:
    """``indicfm report``: figures and ``index.html`` for one or more run workdirs; returns the page."""
    output = Path(output)
    workdirs = [Path(w) for w in workdirs]
    runs = [load_run(w, name) for w, name in zip(workdirs, unique_names(workdirs))]
    figures = write_figures(runs, output)
    title = f"indicfm report: {', '.join(run.name for run in runs)}"
    sections = [("Runs", html_table(summary_rows(runs)))]
    downstream = downstream_rows(runs)
    if downstream:
        sections.append(("Downstream tasks at the last evaluation, beside held-out bits per byte", html_table(downstream)))
    return write_html(output, title, figures, sections)
