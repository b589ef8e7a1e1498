"""``indicfm compare``: dense against MoE (or any configs) at the same training-FLOP budget.

Fairness is the point, so every config:

* trains on the same token cache with the same tokenizer (built once, in ``<output>/shared``, from
  the first config's ``data`` and ``tokenizer`` sections), seed and batch size, hence the same
  batch at every step (the loader's batch is a pure function of seed and step);
* shares the data, tokenizer, evaluation and learning-rate schedule settings (checked: a config
  that differs elsewhere than ``model``, ``mesh``, ``checkpoint``, ``logging`` or
  ``optimizer.learning_rate`` is an error that names the key);
* runs ``floor(budget ÷ FLOPs per step)`` steps, FLOPs per step from :mod:`indicfm.model.flops`
  (so it stops within one step of the budget, never over it), with its cosine/WSD schedule ending
  at that step;
* is evaluated (held-out bits per byte per language) at the start and every ``1/evals`` of its
  steps, i.e. at regular FLOP checkpoints.

The speed-up of a config over the reference (the first dense config) on a language is
``reference final FLOPs ÷ FLOPs the config needed to reach the reference's final bits per byte``,
the FLOPs read off the config's bpb-vs-FLOPs curve by linear interpolation between evaluations.
A config that never reaches it within the budget gets no figure, only the bound "< budget ratio".
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from indicfm.config import Config, ConfigError, load_config

# Sections (and keys) a compared config may set differently from the others.
MAY_DIFFER = ("model.", "mesh.", "checkpoint.", "logging.", "optimizer.learning_rate", "trainer.steps", "trainer.micro_batches",
              "trainer.init_from")  # where a run starts (upcycling compares starting points)
ADAM_BYTES_PER_PARAM = 8  # two float32 moments


@dataclass
class PlannedRun:
    """One config of the comparison, with its budgeted step count and its size."""

    name: str
    config_file: str
    steps: int
    flops_per_step: float
    flops_per_token: float
    tokens_per_step: int
    params: int
    active_params: int
    param_bytes: int  # parameters alone, in their storage dtype
    train_state_bytes: int  # parameters + AdamW moments
    is_dense: bool
    eval_every_steps: int

    @property
    def train_flops(self) -> float:
        return self.steps * self.flops_per_step


@dataclass
class CompareResult:
    """Everything ``indicfm compare`` measured (also written to ``<output>/compare.json``)."""

    budget_flops: float
    reference: str
    runs: list[PlannedRun]
    final_bpb: dict[str, dict[str, float]]  # run → {lang: bpb at its last evaluation}
    speedup: dict[str, dict[str, float | None]]  # MoE run → {lang: speed-up, None = not reached}
    speedup_bound: dict[str, float]  # run → reference FLOPs ÷ its FLOPs (the bound when not reached)
    geomean_speedup: dict[str, float | None]
    train_seconds: dict[str, float]  # step time only
    run_seconds: dict[str, float]  # the whole train() call: compile, evaluation and saves included
    median_tokens_per_s: dict[str, float]
    languages: list[str] = field(default_factory=list)
    # median of the steps' times on the devices (indicfm.train.goodput): robust to the few steps other
    # work on a shared machine slows down, and, unlike the fastest steps, not picked from outliers
    median_step_seconds: dict[str, float] = field(default_factory=dict)
    productive_share: dict[str, float] = field(default_factory=dict)  # productive steps ÷ the run's wall clock
    final_downstream: dict[str, dict[str, float]] = field(default_factory=dict)  # run → {task: accuracy at its last evaluation}


def budget_steps(flops_per_step: float, budget_flops: float) -> int:
    """The most whole steps whose FLOPs fit in the budget: ``steps x f <= budget < (steps + 1) x f``."""
    if flops_per_step <= 0:
        raise ValueError(f"FLOPs per step must be positive, got {flops_per_step}")
    steps = int(budget_flops // flops_per_step)
    if steps < 1:
        raise ValueError(
            f"--budget-flops {budget_flops:.3e} is less than one step ({flops_per_step:.3e} FLOPs); raise the budget"
        )
    return steps


def flops_to_reach(flops: Sequence[float], bpb: Sequence[float], target: float) -> float | None:
    """FLOPs at which the curve ``bpb(flops)`` first gets down to ``target`` (linear interpolation
    between neighbouring evaluations), or None if it never does."""
    points = [(float(f), float(b)) for f, b in zip(flops, bpb) if math.isfinite(b)]
    for index, (f, b) in enumerate(points):
        if b <= target:
            if index == 0:
                return f
            f0, b0 = points[index - 1]
            return f0 + (b0 - target) / (b0 - b) * (f - f0)
    return None


def speedups(
    reference_flops: Sequence[float], reference_bpb: Sequence[float], flops: Sequence[float], bpb: Sequence[float]
) -> tuple[float | None, float]:
    """(speed-up, bound): reference final FLOPs ÷ the FLOPs this curve needs to reach the reference's
    final bpb; None (with the bound "speed-up < reference FLOPs ÷ this curve's last FLOPs") when not
    reached."""
    target = float(reference_bpb[-1])
    needed = flops_to_reach(flops, bpb, target)
    bound = float(reference_flops[-1]) / float(flops[-1])
    if needed is None:
        return None, bound
    return (float(reference_flops[-1]) / needed if needed > 0 else math.inf), bound


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def check_same_setup(configs: dict[str, Config]) -> list[str]:
    """Raise :class:`ConfigError` naming each key whose value differs between configs where the
    comparison needs it equal; return notes on allowed differences (learning rate)."""
    flat = {name: _flatten(cfg.model_dump(mode="json")) for name, cfg in configs.items()}
    names = list(flat)
    problems, notes = [], []
    for key in sorted(set().union(*flat.values())):
        values = {name: flat[name].get(key) for name in names}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) == 1:
            continue
        shown = ", ".join(f"{n}: {v!r}" for n, v in values.items())
        if key.startswith(MAY_DIFFER) or key in MAY_DIFFER:
            if key == "optimizer.learning_rate":
                notes.append(f"optimizer.learning_rate differs ({shown}): the comparison includes tuning")
            continue
        problems.append(f"config key '{key}' differs ({shown})")
    if problems:
        raise ConfigError(
            "compared configs must share data, tokenizer, seed, batch, schedule and evaluation settings so "
            "that only the model differs:\n  " + "\n  ".join(problems)
        )
    return notes


def _dtype_bytes(dtype: str) -> int:
    import jax.numpy as jnp

    return jnp.dtype(dtype).itemsize


def plan_run(name: str, config_file: str, cfg: Config, seq_len: int, budget_flops: float, evals: int) -> PlannedRun:
    from indicfm.model.flops import count_active_params, count_params, train_flops_per_token

    tokens_per_step = cfg.trainer.global_batch_size * seq_len
    per_token = train_flops_per_token(cfg.model, seq_len)
    flops_per_step = per_token * tokens_per_step
    steps = budget_steps(flops_per_step, budget_flops)
    params = count_params(cfg.model)
    return PlannedRun(
        name=name,
        config_file=config_file,
        steps=steps,
        flops_per_step=flops_per_step,
        flops_per_token=per_token,
        tokens_per_step=tokens_per_step,
        params=params,
        active_params=count_active_params(cfg.model),
        param_bytes=params * _dtype_bytes(cfg.model.param_dtype),
        train_state_bytes=params * (_dtype_bytes(cfg.model.param_dtype) + ADAM_BYTES_PER_PARAM),
        is_dense=cfg.model.num_moe_layers == 0,
        eval_every_steps=max(1, math.ceil(steps / max(1, evals))),
    )


def _names(config_files: Sequence[Path]) -> list[str]:
    names = [Path(p).stem for p in config_files]
    if len(set(names)) != len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    return names


def _check_workdir(workdir: Path, cfg: Config) -> None:
    """A workdir left by an earlier comparison is resumed only if it trained the same model for the
    same steps; anything else would mix two experiments in one curve."""
    saved = workdir / "config.yaml"
    if not saved.is_file():
        return
    old = load_config(saved)
    if old.model != cfg.model or old.trainer.steps != cfg.trainer.steps:
        raise ConfigError(
            f"{workdir} holds a run of another model or budget (trainer.steps={old.trainer.steps}, now "
            f"{cfg.trainer.steps}); choose another --output or delete it"
        )


@dataclass
class ComparePlan:
    """The configs of a comparison, loaded and checked, and each one's budgeted run."""

    config_files: list[Path]
    configs: dict[str, Config]
    runs: list[PlannedRun]
    notes: list[str]

    @property
    def reference(self) -> PlannedRun:
        """The first dense config (the first config when none is dense)."""
        return next((run for run in self.runs if run.is_dense), self.runs[0])


def plan_compare(
    config_files: Sequence[str | Path],
    budget_flops: float,
    *,
    overrides: Sequence[str] = (),
    evals: int = 8,
    seq_len: int | None = None,
) -> ComparePlan:
    """Load and check the configs and budget each one (``seq_len`` defaults to ``data.seq_len``; the
    comparison itself uses the shared token cache's)."""
    if len(config_files) < 2:
        raise ConfigError("indicfm compare needs at least two --config files")
    config_files = [Path(p) for p in config_files]
    names = _names(config_files)
    loaded = {name: load_config(path, overrides) for name, path in zip(names, config_files)}
    notes = check_same_setup(loaded)
    if not any(cfg.eval.heldout_dir for cfg in loaded.values()):
        raise ConfigError("eval.heldout_dir is not set: the comparison needs held-out text (e.g. --set eval.heldout_dir=samples/heldout)")
    runs = [
        plan_run(name, str(path), loaded[name], seq_len or loaded[name].data.seq_len, budget_flops, evals)
        for name, path in zip(names, config_files)
    ]
    return ComparePlan(config_files, loaded, runs, notes)


def describe_plan(plan: ComparePlan, budget_flops: float) -> list[str]:
    """One line per config: its size and the compute the budget buys it."""
    return [
        f"{run.name}: {run.params / 1e6:.2f}M parameters, {run.active_params / 1e6:.2f}M active per token, "
        f"{run.flops_per_token / 1e6:.2f} MFLOP/token, {run.flops_per_step / 1e9:.2f} GFLOP/step → {run.steps} steps = "
        f"{run.train_flops:.3e} FLOPs, {run.steps * run.tokens_per_step:,} tokens (budget {budget_flops:.3e}); "
        f"evaluation every {run.eval_every_steps} steps"
        for run in plan.runs
    ]


def run_compare(
    config_files: Sequence[str | Path],
    budget_flops: float,
    output: str | Path,
    *,
    overrides: Sequence[str] = (),
    evals: int = 8,
    console: Any = None,
    progress: bool = False,
) -> CompareResult:
    """Train every config to ``budget_flops`` in ``<output>/runs/<name>``, then write the tables,
    ``compare.json`` and the HTML report with the overlaid plots into ``output``."""
    from rich.console import Console

    from indicfm.data.cache import read_metadata
    from indicfm.evaluation.in_loop import evaluator_factory
    from indicfm.report.runs import load_run
    from indicfm.train.inputs import ensure_tokenizer_and_cache
    from indicfm.train.loop import train

    console = console or Console(stderr=True)
    output = Path(output).resolve()
    plan = plan_compare(config_files, budget_flops, overrides=overrides, evals=evals)  # checks before any work
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)

    first = next(iter(plan.configs.values()))
    shared = ensure_tokenizer_and_cache(first, output / "shared", progress=progress, console=console)
    seq_len = read_metadata(shared.data.cache_dir).seq_len
    inputs = [f"tokenizer.model_file={shared.tokenizer.model_file}", f"data.cache_dir={shared.data.cache_dir}"]
    plan = plan_compare(plan.config_files, budget_flops, overrides=overrides, evals=evals, seq_len=seq_len)
    for line in describe_plan(plan, budget_flops):
        console.print(line, highlight=False)

    run_seconds: dict[str, float] = {}
    for run, path in zip(plan.runs, plan.config_files):
        cfg = load_config(
            path,
            list(overrides) + inputs + [
                f"trainer.steps={run.steps}", f"eval.every_steps={run.eval_every_steps}", "eval.at_start=true",
            ],
        )
        workdir = output / "runs" / run.name
        _check_workdir(workdir, cfg)
        console.print(f"[bold]{run.name}[/]: training {run.steps} steps in {workdir}")
        start = time.perf_counter()
        result = train(cfg, workdir, console=console, progress=progress, downstream=evaluator_factory(cfg))
        run_seconds[run.name] = time.perf_counter() - start
        if result.stopped != "completed":
            raise RuntimeError(f"{run.name}: training stopped early ({result.stopped}): {result.message}")

    histories = [load_run(output / "runs" / run.name, run.name) for run in plan.runs]
    result = summarise(plan.runs, histories, plan.reference.name, budget_flops, run_seconds)
    write_outputs(result, histories, output)
    return result


def summarise(
    planned: Sequence[PlannedRun], histories: Sequence[Any], reference: str, budget_flops: float, run_seconds: dict[str, float]
) -> CompareResult:
    """Final bpb, speed-ups and timings from the runs' histories."""
    by_name = {h.name: h for h in histories}
    ref = by_name[reference]
    languages = ref.languages + ["mean"]
    final = {h.name: {lang: float(h.bpb[lang][-1]) for lang in h.bpb} for h in histories}
    speedup: dict[str, dict[str, float | None]] = {}
    bounds: dict[str, float] = {}
    geomean: dict[str, float | None] = {}
    for h in histories:
        if h.name == reference:
            continue
        per_lang = {}
        for lang in languages:
            if lang in h.bpb and lang in ref.bpb:
                per_lang[lang], bounds[h.name] = speedups(ref.eval_flops, ref.bpb[lang], h.eval_flops, h.bpb[lang])
        speedup[h.name] = per_lang
        values = [v for lang, v in per_lang.items() if lang != "mean"]
        geomean[h.name] = float(np.exp(np.mean(np.log(values)))) if values and all(v for v in values) else None
    return CompareResult(
        budget_flops=budget_flops,
        reference=reference,
        runs=list(planned),
        final_bpb=final,
        speedup=speedup,
        speedup_bound=bounds,
        geomean_speedup=geomean,
        train_seconds={h.name: float(h.cumulative_seconds()[-1]) for h in histories},
        run_seconds=run_seconds,
        median_tokens_per_s={h.name: float(np.nanmedian(h.train["tokens_per_s"][1:])) for h in histories},
        languages=languages,
        median_step_seconds={h.name: _median_step_seconds(h) for h in histories},
        productive_share={h.name: h.productive_share() for h in histories},
        final_downstream={h.name: h.final_downstream() for h in histories},
    )


def _median_step_seconds(history: Any) -> float:
    """Median step time; an old log's first step (which included compilation) left out."""
    seconds = history.train.get("step_seconds")
    if seconds is None or not len(seconds):
        return math.nan
    seconds = seconds if history.goodput else seconds[1:]
    return float(np.nanmedian(seconds)) if len(seconds) else math.nan


def _speedup_text(value: float | None, bound: float) -> str:
    return f"{value:.2f}x" if value is not None else f"< {bound:.2f}x (not reached)"


def _geomean_text(result: CompareResult, name: str) -> str:
    if result.geomean_speedup[name]:
        return f"{result.geomean_speedup[name]:.2f}x"
    per_lang = [v for lang, v in result.speedup[name].items() if lang != "mean"]
    missing = sum(v is None for v in per_lang)
    return f"– ({missing} of {len(per_lang)} not reached)" if missing else "–"


def bpb_table(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per language, each config's final bpb, then each MoE config's speed-up."""
    names = [run.name for run in result.runs]
    others = [n for n in names if n != result.reference]
    header = ["language"] + [f"bpb {n}" for n in names] + [f"speed-up {n}" for n in others]
    rows = []
    for lang in result.languages:
        row = [lang] + [f"{result.final_bpb[n].get(lang, math.nan):.4f}" for n in names]
        row += [_speedup_text(result.speedup[n].get(lang), result.speedup_bound[n]) for n in others]
        rows.append(row)
    geo = ["geomean of languages"] + [""] * len(names) + [_geomean_text(result, n) for n in others]
    rows.append(geo)
    return header, rows


def downstream_table(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per downstream task (eval.downstream), each config's final accuracy beside
    its final bits per byte in the task's language; no rows when no run evaluated downstream tasks."""
    from indicfm.evaluation.harness import language_of_task

    names = [run.name for run in result.runs]
    tasks = sorted({task for per_run in result.final_downstream.values() for task in per_run})
    header = ["task", "language"] + [f"acc {n}" for n in names] + [f"bpb {n}" for n in names]
    rows = []
    for task in tasks:
        lang = language_of_task(task)
        row = [task, lang or "–"]
        row += [f"{result.final_downstream[n][task]:.3f}" if task in result.final_downstream.get(n, {}) else "–" for n in names]
        row += [f"{result.final_bpb[n][lang]:.4f}" if lang and lang in result.final_bpb.get(n, {}) else "–" for n in names]
        rows.append(row)
    return header, rows


def compute_table(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows: size, FLOPs, memory and time of each config."""
    header = [
        "config", "params", "active/token", "GFLOP/step", "steps", "training FLOPs", "tokens",
        "param MiB", "params+Adam MiB", "tokens/s", "median step s", "train s", "run s", "productive",
    ]
    rows = []
    for run in result.runs:
        rows.append([
            run.name + (" (reference)" if run.name == result.reference else ""),
            f"{run.params / 1e6:.2f}M",
            f"{run.active_params / 1e6:.2f}M",
            f"{run.flops_per_step / 1e9:.2f}",
            str(run.steps),
            f"{run.train_flops:.3e}",
            f"{run.steps * run.tokens_per_step:,}",
            f"{run.param_bytes / 2**20:.1f}",
            f"{run.train_state_bytes / 2**20:.1f}",
            f"{result.median_tokens_per_s[run.name]:,.0f}",
            f"{result.median_step_seconds.get(run.name, math.nan):.3f}",
            f"{result.train_seconds[run.name]:.0f}",
            f"{result.run_seconds.get(run.name, math.nan):.0f}",
            f"{result.productive_share.get(run.name, math.nan):.0%}",
        ])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(result: CompareResult, histories: Sequence[Any], output: Path) -> None:
    """``compare.json``, ``compare.md`` (the tables) and ``index.html`` with every plot."""
    from indicfm.report import plots
    from indicfm.report.html import Figure, html_table, write_figures, write_html

    output.mkdir(parents=True, exist_ok=True)
    payload = asdict(result)
    for run in payload["runs"]:
        run["train_flops"] = run["steps"] * run["flops_per_step"]
    (output / "compare.json").write_text(json.dumps(payload, indent=2, default=float), encoding="utf-8")
    bpb_header, bpb_rows = bpb_table(result)
    compute_header, compute_rows = compute_table(result)
    downstream_header, downstream_rows = downstream_table(result)
    downstream_md = f"\n{markdown_table(downstream_header, downstream_rows)}\n" if downstream_rows else ""
    intro = (
        f"Training-FLOP budget {result.budget_flops:.3e} per config; bits per byte on held-out text at each "
        f"config's last step (within one step of the budget). Speed-up = {result.reference}'s FLOPs ÷ the FLOPs "
        f"a config needs to reach {result.reference}'s final bits per byte (linear interpolation between evaluations). "
        "Times are this machine's, each step's time on the devices (not the host's reads): tokens/s and median step s "
        "are the median step's, train s the sum of step times, run s the whole run with compilation and evaluation, "
        "productive the share of the run's wall clock spent on training steps (the rest: compilation, evaluation, "
        "saves, data, start-up; see goodput.png)."
    )
    (output / "compare.md").write_text(
        f"{intro}\n\n{markdown_table(bpb_header, bpb_rows)}\n{downstream_md}\n{markdown_table(compute_header, compute_rows)}\n",
        encoding="utf-8",
    )
    figures = [
        Figure(p, c)
        for p, c in [
            (plots.plot_bpb(histories, output / "bpb_vs_flops.png", "flops"), "Held-out bits per byte against training FLOPs, per language (equal-compute view; y axes zoomed on the last three quarters of the evaluations)."),
            (plots.plot_bpb(histories, output / "bpb_vs_wall.png", "wall"), "Held-out bits per byte against training wall-clock on this machine (a MoE can win per FLOP and lose per hour; on a shared machine other work slows some runs, compare median step s in the table)."),
        ]
        if p is not None
    ]
    memory = {run.name: (run.param_bytes / 2**20, run.train_state_bytes / 2**20) for run in result.runs}
    speedup_png = plots.plot_speedup(
        result.languages, result.speedup, result.speedup_bound, memory, result.reference, output / "speedup.png"
    )
    if speedup_png is not None:
        figures.append(Figure(
            speedup_png,
            f"Left: speed-up over {result.reference} per language and on the mean bits per byte (hatched: the config "
            f"never reached {result.reference}'s final bpb within the budget; bar at the upper bound). "
            "Right: parameter memory of each config, alone and with the AdamW moments.",
        ))
    figures += write_figures(histories, output)

    def to_html(header, rows):
        return html_table([dict(zip(header, row)) for row in rows])

    write_html(
        output,
        "indicfm compare: " + " vs ".join(run.name for run in result.runs),
        figures,
        [("Bits per byte at equal training FLOPs", f"<p>{intro}</p>" + to_html(bpb_header, bpb_rows))]
        + ([("Downstream accuracy beside bits per byte", to_html(downstream_header, downstream_rows))] if downstream_rows else [])
        + [("Compute per config", to_html(compute_header, compute_rows))],
    )
