"""`indicfm eval` against lm-eval's own `hf` backend (transformers) on the same model (issue 29).

    python -m benchmarks.downstream_eval                      # train a quickstart-size run, then compare
    python -m benchmarks.downstream_eval --workdir runs/qs    # reuse a run (trained if it has no checkpoint)

1. a run is trained here (``indicfm train --config configs/quickstart.yaml``, in-loop downstream
   evaluation off) and written with ``indicfm export hf`` in float32;
2. the same lm-eval tasks (the shipped offline minimal pairs ``flores_pairs_<lang>``, whose context
   is empty, and a cloze task built here from held-out FLORES lines, whose context is not) are run
   by ``indicfm.evaluation.harness.evaluate_model`` on the run and by lm-eval's ``HFLM`` on the
   export (``add_bos_token=True``: the export's tokenizer adds BOS, as training documents begin),
   both through ``lm_eval.evaluator.evaluate`` on the same loaded tasks, so the requests are identical;
3. printed: per-request log-likelihoods' max |difference| (goal <= 1e-3), each task's accuracy by
   both, and requests/s of each (the evaluation call only; model loading apart; indicfm's warm
   figure is a second run with its program already compiled, its first run shown too) and the
   ratio indicfm / hf (goal >= 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
LANGS = ("hin_Deva", "tam_Taml")


def train_and_export(workdir: Path, steps: int) -> Path:
    """A quickstart-size run in ``workdir`` (unless it has a checkpoint) and its float32 HF export."""
    from benchmarks.common import run_indicfm as run_cli

    if not (workdir / "checkpoints").is_dir():
        wall, _ = run_cli(["train", "--config", "configs/quickstart.yaml", "--workdir", str(workdir)],
                          [f"trainer.steps={steps}", "eval.downstream.tasks=[]", "eval.at_start=false",
                           "logging.progress=false"], cwd=REPO)
        print(f"trained {steps} steps in {wall:.0f} s → {workdir}")
    export = workdir / "hf-export"
    if not (export / "config.json").is_file():
        run_cli(["export", "hf", "--workdir", str(workdir), "--output", str(export), "--dtype", "float32"], cwd=REPO)
    return export


def cloze_task(directory: Path, count: int) -> str:
    """A local cloze task with a context: the start of a Hindi line of the training sample, its own
    next words (gold) against the next line's.  Not from FLORES: a cloze request whose context +
    continuation is a whole FLORES sentence has the same tokens as a flores_pairs request, and
    lm-eval's hf backend then shares one forward pass between the two (its ``logits_cache``) and
    returns a wrong log-likelihood for one of them (seen with lm_eval 0.4.13)."""
    lines = [l for l in (REPO / "samples" / "train" / "hin_Deva.txt").read_text(encoding="utf-8").splitlines()
             if len(l.strip()) > 40][: count + 1]
    docs = []
    for i in range(count):
        a, b = lines[i], lines[i + 1]
        cut_a, cut_b = min(len(a) // 2, 60), min(len(b) // 2, 60)
        docs.append({"prompt": a[:cut_a].rstrip(), "choices": [a[cut_a:cut_a + 50].strip(), b[cut_b:cut_b + 50].strip()],
                     "gold": 0})
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "cloze.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    name = "bench_cloze_hin_Deva"
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{prompt}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    return name


def per_request(samples: dict) -> dict[tuple, float]:
    """(task, doc id, choice) -> log-likelihood, from lm-eval's logged samples."""
    out = {}
    for task, records in samples.items():
        for record in records:
            for k, resp in enumerate(record["resps"]):
                out[(task, record["doc_id"], k)] = float(resp[0][0])
    return out


def accuracies(results: dict) -> dict[str, float]:
    return {task: metrics["acc,none"] for task, metrics in results.items() if "acc,none" in metrics}


def run_indicfm(workdir: Path, tasks: list[str], include: Path, limit: int, rows: int, length: int):
    from indicfm.config import MeshConfig
    from indicfm.evaluation.harness import evaluate_model
    from indicfm.inference.load import load_for_inference
    from indicfm.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=-1))
    loaded = load_for_inference(workdir, mesh=mesh)
    tokenizer = loaded.tokenizer()
    runs = [evaluate_model(loaded.model, loaded.model.cfg, tokenizer, mesh, tasks=tasks, include_path=include,
                           limit=limit, rows=rows, row_len=length, log_samples=True) for _ in range(2)]  # cold, warm
    return runs


def run_hf(export: Path, tasks: list[str], include: Path, limit: int, batch_size: int, length: int):
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    from indicfm.evaluation.harness import BOOTSTRAP_ITERS, load_tasks

    lm = HFLM(pretrained=str(export), dtype="float32", device="cpu", batch_size=batch_size, add_bos_token=True,
                max_length=length)
    loaded = load_tasks(tasks, include, None, 0)
    start = time.perf_counter()
    out = lm_eval.evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS,
                                     log_samples=True, verbosity="WARNING")
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="run directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=200, help="training steps when a run is trained here")
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    parser.add_argument("--rows", type=int, default=8, help="indicfm: packed rows per batch")
    parser.add_argument("--length", type=int, default=256,
                        help="tokens per request before truncation, both backends (longer than the quickstart "
                             "model's 128: some FLORES sentences are longer, and lm-eval's hf backend refuses a "
                             "continuation longer than its max_length)")
    parser.add_argument("--hf-batch-size", type=int, default=16, help="lm-eval hf backend batch size")
    args = parser.parse_args()

    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="downstream-eval-"))
    export = train_and_export(workdir, args.steps)
    include = workdir / "bench-tasks"
    tasks = [f"flores_pairs_{lang}" for lang in LANGS] + [cloze_task(include, args.limit)]

    cold, warm = run_indicfm(workdir, tasks, include, args.limit, args.rows, args.length)
    hf_out, hf_seconds = run_hf(export, tasks, include, args.limit, args.hf_batch_size, args.length)

    ours, theirs = per_request(warm.samples), per_request(hf_out["samples"])
    assert ours.keys() == theirs.keys(), "the two backends saw different requests"
    diffs = [abs(ours[k] - theirs[k]) for k in ours]
    n = len(ours)
    import platform

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared); "
          f"run {workdir}; {n} loglikelihood requests over {len(tasks)} tasks ({args.limit} documents each)")
    print(f"per-request log-likelihood, indicfm vs lm-eval hf backend: max |diff| = {max(diffs):.2e} "
          f"(mean {sum(diffs) / n:.2e}; goal <= 1e-3)")
    acc_ours, acc_hf = accuracies(warm.results), accuracies(hf_out["results"])
    for task in tasks:
        print(f"  {task:24s} acc indicfm {acc_ours[task]:.4f}   hf {acc_hf[task]:.4f}   "
              f"{'same' if acc_ours[task] == acc_hf[task] else 'DIFFERENT'}")
    ours_rate, cold_rate, hf_rate = n / warm.seconds, n / cold.seconds, n / hf_seconds
    print(f"throughput: indicfm {ours_rate:.1f} requests/s warm ({warm.seconds:.2f} s; first run with compilation "
          f"{cold_rate:.1f}/s, {cold.seconds:.2f} s), hf backend {hf_rate:.1f} requests/s ({hf_seconds:.2f} s, "
          f"batch {args.hf_batch_size})")
    print(f"ratio indicfm / hf: {ours_rate / hf_rate:.2f}x warm, {cold_rate / hf_rate:.2f}x including compilation "
          "(goal >= 2x)")


if __name__ == "__main__":
    main()
