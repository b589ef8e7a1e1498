"""Dense vs MoE at equal training FLOPs (issue 19): the shipped comparison, printed as tables.

``python -m benchmarks.quality [--corpus DIR] [--heldout DIR] [--budget-flops F] [--output DIR] [--quick]``

Runs ``indicfm compare`` on the four shipped configs (``configs/compare/``: dense, 8 experts top-2,
32 experts top-2, 32 fine-grained experts top-8 plus a shared expert, all with the same active
parameters per token) and prints per-language held-out bits per byte at the budget, each MoE
config's FLOP speed-up over dense, and the compute, memory and time of each config, with the
machine and how loaded it was (timings on a shared machine are noisy; the bits per byte are not:
the same command gives the same curves).  Defaults: the shared corpus and FLORES-200 dev when they
exist (``../shared/data``), else the shipped sample; ``--quick`` is a small budget for a smoke run.
The plots are in ``OUTPUT/index.html``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from indicfm.config import CONFIG_DIR

CONFIGS = ["dense", "moe-8x-top2", "moe-32x-top2", "moe-32x-top8-shared"]
SHARED_DATA = CONFIG_DIR.parent.parent / "shared" / "data"
FULL_BUDGET = 6e12  # about 300 steps of every config; see configs/compare/base.yaml
QUICK_BUDGET = 4e11  # 20 steps: a smoke run, the bits per byte have hardly moved


def default_inputs() -> tuple[Path, Path]:
    """(training corpus, held-out dir): the shared data when it is there, else the shipped sample."""
    corpus, heldout = SHARED_DATA / "corpus", SHARED_DATA / "flores200" / "dev"
    if corpus.is_dir() and heldout.is_dir():
        return corpus, heldout
    samples = CONFIG_DIR.parent / "samples"
    return samples / "train", samples / "heldout"


def add_budget_arguments(parser: argparse.ArgumentParser, output: Path, parent_flops: float, extra_flops: float,
                         quick_flops: float) -> None:
    """The options of the parent-then-continue benchmarks (upcycle, vocab_extend): ``--corpus``,
    ``--heldout``, ``--parent-flops`` (B), ``--extra-flops`` (C), ``--output`` and ``--quick``."""
    corpus, heldout = default_inputs()
    parser.add_argument("--corpus", type=Path, default=corpus)
    parser.add_argument("--heldout", type=Path, default=heldout)
    parser.add_argument("--parent-flops", type=float, default=None, help=f"B (default {parent_flops:.0e})")
    parser.add_argument("--extra-flops", type=float, default=None, help=f"C (default {extra_flops:.0e})")
    parser.add_argument("--output", type=Path, default=output)
    parser.add_argument("--quick", action="store_true", help=f"B = C = {quick_flops:.0e}: checks the pipeline")


def budgets(args: argparse.Namespace, parent: float, extra: float, quick: float) -> tuple[float, float]:
    """(B, C) from :func:`add_budget_arguments`' options: given, else ``quick`` with ``--quick``, else the defaults."""
    B = args.parent_flops or (quick if args.quick else parent)
    C = args.extra_flops or (quick if args.quick else extra)
    return B, C


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus, heldout = default_inputs()
    parser.add_argument("--corpus", type=Path, default=corpus, help=f"training text directory (default {corpus})")
    parser.add_argument("--heldout", type=Path, default=heldout, help=f"held-out text directory (default {heldout})")
    parser.add_argument("--budget-flops", type=float, default=None, help=f"training FLOPs per config (default {FULL_BUDGET:.0e})")
    parser.add_argument("--output", type=Path, default=Path("runs/compare"), help="comparison directory (resumed if it exists)")
    parser.add_argument("--quick", action="store_true", help=f"budget {QUICK_BUDGET:.0e}: checks the pipeline, measures nothing")
    args = parser.parse_args(argv)

    from rich.console import Console

    from benchmarks.common import cpu_load, device_description
    from indicfm.report.compare import bpb_table, compute_table, markdown_table, run_compare

    budget = args.budget_flops or (QUICK_BUDGET if args.quick else FULL_BUDGET)
    load_before = cpu_load()
    result = run_compare(
        [CONFIG_DIR / "compare" / f"{name}.yaml" for name in CONFIGS],
        budget,
        args.output,
        overrides=[f"data.inputs=[{args.corpus.resolve()}]", f"eval.heldout_dir={args.heldout.resolve()}"],
        console=Console(stderr=True),
    )
    print(f"device {device_description()} · load before {load_before}, after {cpu_load()} · corpus {args.corpus} · "
          f"held-out {args.heldout} · budget {budget:.3e} training FLOPs per config")
    print(markdown_table(*bpb_table(result)))
    print()
    print(markdown_table(*compute_table(result)))
    print(f"plots: {Path(args.output) / 'index.html'}")


if __name__ == "__main__":
    main()
