"""Does upcycling pay at CPU scale?  A dense parent trained for budget B, then the same extra budget C
spent four ways, compared on held-out bits per byte per language at equal training FLOPs.

    python -m benchmarks.upcycle [--parent-flops B] [--extra-flops C] [--output DIR] [--quick]

(a) ``dense-continued``: the parent, trained on for C (``trainer.init_from``, fresh optimizer);
(b) ``upcycled-8x-top2``: the parent upcycled into 8 experts, top-2 (whole copies), trained for C;
(c) ``upcycled-32x-top8-g4``: fine-grained, 32 experts of a quarter width, top-8 (granularity 4), C;
(d) ``moe-8x-top2-scratch``: (b)'s shape from random weights, trained for B + C.

Every run is ``indicfm compare``'s machinery (the shipped compare configs: same data, tokenizer,
seed, batch, schedule and evaluation; the MoE arms keep block 0 dense like the compare MoE configs),
so the runs' curves are in ``OUTPUT/*/index.html``.  Printed: per language and mean, bits per byte
of (a)-(d) after B + C training FLOPs in all; the FLOPs after B that (b) and (c) need to reach (a)'s
final mean (as a fraction of C; the goal is <= 0.7 C); and whether each upcycled arm beats (a)
and (d) on the mean and on how many languages.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from indicfm.config import CONFIG_DIR

PARENT_FLOPS = 3e12  # ~150 dense steps of the compare configs
EXTRA_FLOPS = 3e12
QUICK_FLOPS = 2e11


def _write_config(path: Path, model: dict | None, init_from: Path | None) -> Path:
    data: dict = {"include": [str(CONFIG_DIR / "compare" / "dense.yaml")]}
    if model is not None:
        data["model"] = model
    if init_from is not None:
        data["trainer"] = {"init_from": str(init_from)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _upcycle(parent_run: Path, out: Path, experts: int, top_k: int, granularity: int) -> dict:
    """Upcycle the parent into ``out`` (a run directory with initial parameters); its model section."""
    from indicfm.config import load_config
    from indicfm.convert.initial_run import check_output, write_initial_run
    from indicfm.convert.upcycle import upcycle, upcycled_config
    from indicfm.sharding import make_mesh
    from indicfm.train.saved_model import restore_model

    cfg = load_config(parent_run / "config.yaml")
    mesh = make_mesh(cfg.mesh)
    parent = restore_model(parent_run, mesh)
    moe_cfg = upcycled_config(parent.saved_model_config, num_experts=experts, top_k=top_k, granularity=granularity,
                              first_dense_layers=1, aux_loss_weight=0.01, z_loss_weight=0.001)
    check_output(out, overwrite=True)
    model = upcycle(parent.model, moe_cfg, mesh, granularity=granularity, seed=cfg.trainer.seed)
    write_initial_run(out, cfg.model_copy(update={"model": moe_cfg}), model, source={"upcycled_from": str(parent_run)})
    return moe_cfg.model_dump(mode="json")


def _train_alone(config: Path, budget: float, workdir: Path, overrides: list[str], console: Any) -> Any:
    """One config trained for ``budget`` FLOPs the way ``indicfm compare`` trains each of its runs
    (its planner for steps and evaluations; compare itself needs two configs or more); its
    :class:`~indicfm.report.runs.RunHistory`."""
    from indicfm.config import load_config
    from indicfm.data.cache import read_metadata
    from indicfm.report.compare import plan_run
    from indicfm.report.runs import load_run
    from indicfm.train.inputs import ensure_tokenizer_and_cache
    from indicfm.train.loop import train

    cfg = ensure_tokenizer_and_cache(load_config(config, overrides), workdir.parent / "shared", progress=False,
                                     console=console)
    inputs = [f"tokenizer.model_file={cfg.tokenizer.model_file}", f"data.cache_dir={cfg.data.cache_dir}"]
    run = plan_run(config.stem, str(config), cfg, read_metadata(cfg.data.cache_dir).seq_len, budget, evals=8)
    cfg = load_config(config, overrides + inputs + [f"trainer.steps={run.steps}", f"eval.every_steps={run.eval_every_steps}",
                                                    "eval.at_start=true"])
    console.print(f"[bold]{config.stem}[/]: training {run.steps} steps in {workdir}")
    train(cfg, workdir, console=console)
    return load_run(workdir, config.stem)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from benchmarks.quality import add_budget_arguments, budgets

    add_budget_arguments(parser, Path("runs/upcycle"), PARENT_FLOPS, EXTRA_FLOPS, QUICK_FLOPS)
    args = parser.parse_args(argv)

    from rich.console import Console

    from benchmarks.common import cpu_load, device_description
    from indicfm.report.compare import flops_to_reach, run_compare
    from indicfm.report.runs import load_run

    B, C = budgets(args, PARENT_FLOPS, EXTRA_FLOPS, QUICK_FLOPS)
    out = args.output.resolve()
    console = Console(stderr=True)
    data = [f"data.inputs=[{args.corpus.resolve()}]", f"eval.heldout_dir={args.heldout.resolve()}"]
    load_before = cpu_load()

    dense = CONFIG_DIR / "compare" / "dense.yaml"
    parent_run = out / "parent" / "dense"
    _train_alone(dense, B, parent_run, data, console)
    parent_cfg = yaml.safe_load((parent_run / "config.yaml").read_text())
    shared = data + [f"tokenizer.model_file={parent_cfg['tokenizer']['model_file']}",
                     f"data.cache_dir={parent_cfg['data']['cache_dir']}"]

    up8 = _upcycle(parent_run, out / "initial" / "up8", 8, 2, 1)
    up32 = _upcycle(parent_run, out / "initial" / "up32", 32, 8, 4)
    configs = out / "configs"
    arms = [
        _write_config(configs / "dense-continued.yaml", None, parent_run),
        _write_config(configs / "upcycled-8x-top2.yaml", up8, out / "initial" / "up8"),
        _write_config(configs / "upcycled-32x-top8-g4.yaml", up32, out / "initial" / "up32"),
    ]
    continued = run_compare(arms, C, out / "continued", overrides=shared, console=console)
    scratch = _train_alone(_write_config(configs / "moe-8x-top2-scratch.yaml", up8, None), B + C,
                           out / "scratch" / "moe-8x-top2-scratch", shared, console)

    histories = {run.name: load_run(out / "continued" / "runs" / run.name, run.name) for run in continued.runs}
    final = {**continued.final_bpb, "moe-8x-top2-scratch": {l: float(v[-1]) for l, v in scratch.bpb.items()}}
    names = ["dense-continued", "upcycled-8x-top2", "upcycled-32x-top8-g4", "moe-8x-top2-scratch"]
    languages = [l for l in continued.languages if l != "mean"]
    print(f"\nmachine: {device_description()}; load before {load_before}, after {cpu_load()}")
    print(f"parent: dense, {B:.1e} FLOPs; then C = {C:.1e} FLOPs per arm; (d) from scratch for B + C")
    print("| language | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for lang in languages + ["mean"]:
        print(f"| {lang} | " + " | ".join(f"{final[n].get(lang, float('nan')):.4f}" for n in names) + " |")
    target = final["dense-continued"]["mean"]
    summary = {"B": B, "C": C, "final_bpb": final}
    for name in names[1:3]:
        h = histories[name]
        needed = flops_to_reach(h.eval_flops, h.bpb["mean"], target)
        wins = sum(final[name][l] < final["dense-continued"][l] for l in languages)
        beats_scratch = final[name]["mean"] < final["moe-8x-top2-scratch"]["mean"]
        share = None if needed is None else needed / C
        summary[name] = {"flops_to_reach_dense_final_over_C": share, "languages_better_than_dense": wins,
                         "beats_scratch_on_mean": beats_scratch}
        reach = "not reached" if share is None else f"{share:.2f} C"
        print(f"{name}: reaches dense-continued's final mean bpb ({target:.4f}) after {reach}; better than dense on "
              f"{wins} of {len(languages)} languages; {'beats' if beats_scratch else 'does not beat'} "
              "the MoE from scratch on the mean")
    (out / "upcycle.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
