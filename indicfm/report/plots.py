"""Matplotlib figures of one or more runs (:class:`~indicfm.report.runs.RunHistory`), one PNG each.

Every function takes the runs to overlay and the file to write, and returns the path written, or
None when no run has the data (a dense run has no expert load to plot).  A run keeps its colour in
every figure.  The Agg backend renders without a display, so reports work on headless machines.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from indicfm.report.runs import RunHistory

XAxis = str  # "steps" | "flops" | "wall"
X_LABELS = {"steps": "step", "flops": "training FLOPs (model FLOPs, indicfm.model.flops)", "wall": "training wall-clock (s)"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported late: `indicfm --help` must not pay for it)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def run_colour(index: int) -> str:
    return f"C{index % 10}"


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average that ignores NaNs (the first points average what exists so far)."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) < 3:
        return values
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    sums[window:] = sums[window:] - sums[:-window]
    counts[window:] = counts[window:] - counts[:-window]
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _x_train(run: RunHistory, axis: XAxis) -> np.ndarray:
    if axis == "flops":
        return run.train_flops
    if axis == "wall":
        return run.cumulative_seconds()
    return run.steps


def _x_eval(run: RunHistory, axis: XAxis) -> np.ndarray:
    if axis == "flops":
        return run.eval_flops
    if axis == "wall":
        return run.wall_seconds_at(run.eval_steps)
    return run.eval_steps


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _metric_panels(
    runs: Sequence[RunHistory],
    path: Path,
    panels: list[tuple[str, str, XAxis, bool]],
    *,
    keep: Callable[[RunHistory], bool] = lambda run: True,
    title: str = "",
    smoothed: bool = True,
) -> Path | None:
    """One row of panels ``(metric, y label, x axis, log y)``; every kept run overlaid in each.
    ``smoothed``: draw noisy metrics faint as logged and solid as a moving average (not for exact
    ones like the learning rate, whose warm-up peak a moving average would blunt)."""
    shown = [(i, run) for i, run in enumerate(runs) if keep(run) and any(m in run.train for m, *_ in panels)]
    if not shown:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (metric, label, axis, log_y) in zip(axes[0], panels):
        for i, run in shown:
            if metric not in run.train:
                continue
            x, y = _x_train(run, axis), run.train[metric]
            window = max(1, len(y) // 50) if smoothed else 1
            if window > 1:
                ax.plot(x, y, color=run_colour(i), alpha=0.2, linewidth=0.8)
            ax.plot(x, smooth(y, window), color=run_colour(i), label=run.name, linewidth=1.5)
        ax.set_xlabel(X_LABELS[axis])
        ax.set_ylabel(label)
        if log_y:
            ax.set_yscale("log")
        if axis == "flops":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_loss(runs: Sequence[RunHistory], path: Path) -> Path | None:
    """Training loss against steps, training FLOPs and training wall-clock (faint: raw; solid: moving
    average).  Wall-clock is what a run costs on this machine: a MoE can win per FLOP and lose per hour."""
    label = "training loss (nats/token)"
    return _metric_panels(runs, path, [("loss", label, "steps", False), ("loss", label, "flops", False), ("loss", label, "wall", False)])


def plot_learning_rate(runs: Sequence[RunHistory], path: Path) -> Path | None:
    return _metric_panels(runs, path, [("lr", "learning rate", "steps", False)], smoothed=False)


def plot_grad_norm(runs: Sequence[RunHistory], path: Path) -> Path | None:
    return _metric_panels(runs, path, [("grad_norm", "gradient norm (before clipping)", "steps", True)])


def plot_throughput(runs: Sequence[RunHistory], path: Path) -> Path | None:
    """Tokens per second and MFU, from each step's time on the devices.  Logs written before step
    times were measured that way counted compilation in the first step: it is left out there."""
    trimmed = [run if run.goodput else _without_first_step(run) for run in runs]
    return _metric_panels(trimmed, path, [("tokens_per_s", "tokens / s", "steps", False), ("mfu", "MFU", "steps", False)])


GOODPUT_COLOURS = {
    "productive": "tab:green", "recomputed": "tab:red", "compile": "tab:purple", "data": "tab:blue",
    "checkpoint": "tab:brown", "evaluation": "tab:olive", "restore": "tab:pink", "startup": "tab:gray",
    "profiler": "tab:cyan", "other": "lightgray",
}  # fmt: skip


def plot_goodput(runs: Sequence[RunHistory], path: Path) -> Path | None:
    """Where each run's wall clock went (:mod:`indicfm.train.goodput`).

    Top: one stacked bar per run, the categories summed over its sessions (a resumed run's
    sessions one after another).  Below: per run, the same categories accumulating over its wall
    clock, so a slow start-up, a long evaluation or the steps redone after a restart show where
    they happened."""
    from indicfm.train.goodput import CATEGORIES

    shown = [run for run in runs if run.goodput]
    if not shown:
        return None
    plt = pyplot()
    columns = min(len(shown), 3)
    rows = 1 + math.ceil(len(shown) / columns)
    fig = plt.figure(figsize=(max(10.0, 4.6 * columns), 1.4 + 0.4 * len(shown) + 3.2 * (rows - 1)))
    grid = fig.add_gridspec(rows, columns, height_ratios=[0.5 + 0.3 * len(shown)] + [1.0] * (rows - 1))
    bars = fig.add_subplot(grid[0, :])
    totals_of = [run.goodput_totals() for run in shown]
    used = [c for c in CATEGORIES if any(totals[c] > 0 for totals in totals_of)]
    longest = max(run.goodput_wall() for run in shown)
    for y, run in enumerate(shown):
        totals, wall, left = totals_of[y], run.goodput_wall(), 0.0
        for category in used:
            bars.barh(y, totals[category], left=left, color=GOODPUT_COLOURS[category], label=category if y == 0 else None)
            left += totals[category]
        share = run.productive_share()
        bars.text(left + 0.01 * longest, y, f"{wall:,.0f} s, {100 * share:.0f}% productive", va="center", fontsize=8)
    bars.set_xlim(0, 1.3 * longest)
    bars.set_yticks(range(len(shown)), [run.name for run in shown], fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("wall-clock seconds (all sessions of the run)")
    bars.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    bars.grid(axis="x", alpha=0.3)
    for index, run in enumerate(shown):
        ax = fig.add_subplot(grid[1 + index // columns, index % columns])
        wall, series = run.goodput_over_time()
        wall = np.concatenate([[0.0], wall])  # every run starts with nothing spent
        ax.stackplot(wall, [np.concatenate([[0.0], series[c]]) for c in used], colors=[GOODPUT_COLOURS[c] for c in used])
        ax.set_title(run.name, fontsize=9)
        ax.set_xlabel("wall clock (s)", fontsize=8)
        ax.set_ylabel("cumulative seconds", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _without_first_step(run: RunHistory) -> RunHistory:
    if len(run.steps) < 2:
        return run
    from dataclasses import replace

    return replace(run, steps=run.steps[1:], train={k: v[1:] for k, v in run.train.items()})


def is_moe(run: RunHistory) -> bool:
    return run.expert_load is not None or bool(np.nanmax(run.train.get("expert_load_max_over_mean", [1.0]), initial=1.0) > 1.0)


def plot_moe_balance(runs: Sequence[RunHistory], path: Path) -> Path | None:
    """Expert load imbalance (max ÷ mean tokens per expert, worst layer) and the fraction of token
    assignments dropped (capacity dispatch; always 0 for dropless)."""
    return _metric_panels(
        runs,
        path,
        [
            ("expert_load_max_over_mean", "expert load max ÷ mean (worst layer)", "steps", False),
            ("dropped_fraction", "dropped token fraction", "steps", False),
        ],
        keep=is_moe,
    )


def _grid(count: int, columns: int = 4):
    plt = pyplot()
    rows = math.ceil(count / columns)
    cols = min(columns, count)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def plot_bpb(runs: Sequence[RunHistory], path: Path, axis: XAxis = "steps") -> Path | None:
    """Held-out bits per byte per language over time.

    One run: one axes, one line per language (mean dashed).  Several runs: one small panel per
    language (and the mean) with the runs overlaid, because fifteen languages times several runs
    on one axes is unreadable; each panel's y axis is zoomed on the last three quarters of the
    evaluations, where the runs differ.
    """
    shown = [(i, run) for i, run in enumerate(runs) if run.bpb and len(run.eval_steps)]
    if not shown:
        return None
    plt = pyplot()
    if len(shown) == 1:
        _, run = shown[0]
        fig, ax = plt.subplots(figsize=(8, 5))
        x = _x_eval(run, axis)
        cmap = plt.get_cmap("tab20")
        for j, lang in enumerate(run.languages):
            ax.plot(x, run.bpb[lang], marker=".", color=cmap(j % 20), label=lang)
        if "mean" in run.bpb:
            ax.plot(x, run.bpb["mean"], color="black", linestyle="--", linewidth=2, label="mean")
        ax.set_xlabel(X_LABELS[axis])
        ax.set_ylabel("held-out bits per byte")
        ax.set_title(f"{run.name}: held-out bits per byte per language")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper right")
        return _save(fig, path)

    langs = sorted({lang for _, run in shown for lang in run.languages})
    panels = ["mean"] + langs
    fig, axes = _grid(len(panels))
    for ax, lang in zip(axes, panels):
        for i, run in shown:
            if lang in run.bpb:
                ax.plot(_x_eval(run, axis), run.bpb[lang], marker=".", color=run_colour(i), label=run.name, linewidth=1.2)
        _zoom_on_the_end(ax, [run.bpb[lang] for _, run in shown if lang in run.bpb])
        ax.set_title(lang if lang != "mean" else "mean over languages", fontsize=9)
        ax.tick_params(labelsize=7)
        if axis == "flops":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.supxlabel(X_LABELS[axis], fontsize=9)
    fig.supylabel("held-out bits per byte", fontsize=9)
    return _save(fig, path)


def plot_downstream(runs: Sequence[RunHistory], path: Path, axis: XAxis = "steps") -> Path | None:
    """Downstream accuracy per task (and so per language: the shipped tasks are one per language)
    over the in-loop evaluations, with lm-eval's standard error as a band.

    One panel per task, the runs overlaid; a panel's title names the task's language when its name
    ends with one.  The dotted line is chance on two-choice tasks (the shipped minimal pairs)."""
    from indicfm.evaluation.harness import language_of_task

    shown = [(i, run) for i, run in enumerate(runs) if run.downstream_tasks and len(run.downstream_steps)]
    if not shown:
        return None
    tasks = sorted({task for _, run in shown for task in run.downstream_tasks})
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        for i, run in shown:
            if f"{task}/acc" not in run.downstream:
                continue
            x = run.downstream_steps if axis == "steps" else (
                run.downstream_steps * run.flops_per_step if axis == "flops" else run.wall_seconds_at(run.downstream_steps)
            )
            acc = run.downstream[f"{task}/acc"]
            ax.plot(x, acc, marker=".", color=run_colour(i), label=run.name, linewidth=1.2)
            stderr = run.downstream.get(f"{task}/acc_stderr")
            if stderr is not None:
                ax.fill_between(x, acc - stderr, acc + stderr, color=run_colour(i), alpha=0.15, linewidth=0)
        if task.startswith("flores_pairs"):
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        lang = language_of_task(task)
        ax.set_title(f"{task}" + (f" ({lang})" if lang and lang not in task else ""), fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.supxlabel(X_LABELS[axis], fontsize=9)
    fig.supylabel("accuracy (lm-evaluation-harness)", fontsize=9)
    return _save(fig, path)


def _zoom_on_the_end(ax, curves: Sequence[np.ndarray], skip_fraction: float = 0.25) -> None:
    """Set the y range to the curves' values after their first ``skip_fraction`` of evaluations.

    The first evaluations (an untrained model) sit far above the rest, and on a full y range runs
    that differ by a few hundredths of a bit look identical; the early points run off the top."""
    tails = [np.asarray(c, dtype=np.float64)[int(math.ceil(len(c) * skip_fraction)):] for c in curves if len(c) > 3]
    values = np.concatenate([c[np.isfinite(c)] for c in tails]) if tails else np.zeros(0)
    if len(values) < 2 or values.max() <= values.min():
        return
    low, high = float(values.min()), float(values.max())
    margin = 0.05 * (high - low)
    ax.set_ylim(low - margin, high + margin)


def plot_expert_load(run: RunHistory, path: Path, max_columns: int = 400) -> Path | None:
    """Heat map per MoE layer: expert (rows) by step (columns), coloured by the expert's share of the
    layer's routed tokens relative to a uniform share (1 = balanced, 0 = unused)."""
    if run.expert_load is None or not len(run.expert_load):
        return None
    load_TxMxE = run.expert_load
    steps = run.expert_load_steps
    if len(steps) > max_columns:  # average neighbouring steps into max_columns bins
        edges = np.linspace(0, len(steps), max_columns + 1).astype(int)
        load_TxMxE = np.stack([load_TxMxE[a:b].mean(axis=0) for a, b in zip(edges[:-1], edges[1:])])
        steps = np.array([steps[b - 1] for b in edges[1:]])
    _, layers, experts = load_TxMxE.shape
    relative = load_TxMxE * experts
    vmax = max(2.0, float(np.nanpercentile(relative, 99)))
    plt = pyplot()
    fig, axes = plt.subplots(layers, 1, figsize=(9, layers * (1.0 + 0.06 * experts) + 1.0), squeeze=False, sharex=True)
    image = None
    for m, ax in enumerate(axes[:, 0]):
        image = ax.imshow(
            relative[:, m, :].T,
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            cmap="viridis",
            vmin=0.0,
            vmax=vmax,
            extent=(float(steps[0]), float(steps[-1]), -0.5, experts - 0.5),
        )
        ax.set_ylabel(f"MoE layer {m}\nexpert", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="share of routed tokens ÷ uniform share")
    fig.suptitle(f"{run.name}: per-expert load")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)  # no tight_layout: it cannot place the shared colour bar
    plt.close(fig)
    return path


def plot_speedup(
    languages: Sequence[str],
    speedup: dict[str, dict[str, float | None]],
    bounds: dict[str, float],
    memory_mib: dict[str, tuple[float, float]],
    reference: str,
    path: Path,
) -> Path | None:
    """``indicfm compare``'s verdict in one figure.

    Left: per language (and the mean), each config's speed-up over ``reference`` (reference FLOPs ÷
    FLOPs to reach the reference's final bits per byte); a hatched bar is a config that never got
    there, drawn at its upper bound.  Right: each config's parameter memory, alone and with the
    AdamW moments, so the price of the experts is next to what they buy.
    """
    others = list(speedup)
    if not others or not languages:
        return None
    plt = pyplot()
    names = list(memory_mib)
    colour = {name: run_colour(i) for i, name in enumerate(names)}
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, 0.32 * len(languages) * len(others) + 2.0), gridspec_kw={"width_ratios": [3, 1.4]}
    )
    height = 0.8 / len(others)
    positions = np.arange(len(languages))
    for k, name in enumerate(others):
        values = [speedup[name].get(lang) for lang in languages]
        shown = [v if v is not None else bounds.get(name, math.nan) for v in values]
        bars = left.barh(positions + k * height, shown, height=height, color=colour.get(name), label=name)
        for bar, value in zip(bars, values):
            if value is None:
                bar.set_hatch("//")
                bar.set_alpha(0.45)
    left.axvline(1.0, color="black", linewidth=1)
    left.set_yticks(positions + height * (len(others) - 1) / 2, [lang if lang != "mean" else "mean bpb" for lang in languages], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel(f"speed-up over {reference}: FLOPs to reach {reference}'s final bpb (hatched: not reached, bound)")
    left.grid(axis="x", alpha=0.3)
    left.legend(fontsize=8, loc="lower right")

    positions = np.arange(len(names))
    params = [memory_mib[n][0] for n in names]
    with_adam = [memory_mib[n][1] for n in names]
    right.bar(positions - 0.2, params, width=0.4, color=[colour[n] for n in names], label="parameters")
    right.bar(positions + 0.2, with_adam, width=0.4, color=[colour[n] for n in names], alpha=0.45, label="+ AdamW moments")
    right.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("MiB")
    right.set_title("parameter memory", fontsize=10)
    right.legend(fontsize=8)
    right.grid(axis="y", alpha=0.3)
    return _save(fig, path)
