"""`indicfm eval`: lm-evaluation-harness tasks on a training run's checkpoint (issue 29)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from indicfm.cli.common import console, fail, quiet_orbax


def eval_command(
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Run directory written by `indicfm train`.")],
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", "-t", help="Comma-separated lm-eval task, group or tag names (globs allowed).")] = None,
    suite: Annotated[Optional[str], typer.Option(
        "--suite", help="A shipped suite instead of --tasks: indic-core (hub data) or a tag of --include-path.")] = None,
    include_path: Annotated[Optional[Path], typer.Option(
        "--include-path", help="A directory (or file) of your own lm-eval task YAML.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(
        "--num-fewshot", min=0, help="Few-shot examples per prompt (default: each task's own, else 0).")] = None,
    step: Annotated[Optional[int], typer.Option("--step", help="Checkpoint step (default: the newest).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many documents per task.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Directory for results.json (default: WORKDIR/eval/step_<N>).")] = None,
    rows: Annotated[int, typer.Option("--rows", min=1, help="Packed rows per scored batch.")] = 8,
    log_samples: Annotated[bool, typer.Option(
        "--log-samples", help="Also write every document's prompt, choices and scores (samples.json).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of few-shot sampling and of generation.")] = 0,
) -> None:
    """Score a checkpoint on lm-evaluation-harness tasks; a table per task and language.

    Examples:

        indicfm eval -w runs/quickstart --suite indic-core --limit 200

        indicfm eval -w runs/qs --tasks indic_belebele_hin_Deva,indic_xnli_hin_Deva --num-fewshot 5

        indicfm eval -w runs/qs --tasks my_task --include-path my_tasks/

    Requests are packed into fixed-shape rows and scored by the model's own forward pass on every
    device of this machine (several machines: start one `indicfm eval` per host as for `train`);
    text is NFC-normalised and tokenised with the checkpoint's tokenizer.  Needs the eval extra
    (pip install 'indicfm[eval]').  The indic-core suite reads its data from the Hugging Face hub.
    """
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        fail("indicfm eval needs lm-evaluation-harness: pip install 'indicfm[eval]'")
    if bool(tasks) == bool(suite):
        fail("give exactly one of --tasks or --suite")
    from indicfm.launch.distributed import DistributedError, initialize

    try:
        info = initialize()
    except DistributedError as err:
        fail(str(err))
    from indicfm.evaluation.harness import TaskFileError, UnknownTaskError, resolve_tasks

    try:
        names = resolve_tasks(tasks.split(",") if tasks else None, suite, include_path)
    except (UnknownTaskError, TaskFileError) as err:
        fail(str(err))

    quiet_orbax()
    from indicfm.config import MeshConfig
    from indicfm.inference.load import load_for_inference, read_checkpoint_meta
    from indicfm.sharding import make_mesh, resolve_mesh_sizes
    from indicfm.train.saved_model import CheckpointNotFound

    import jax

    try:
        _, meta = read_checkpoint_meta(workdir, step)
        mesh_cfg = MeshConfig(**((meta.config or {}).get("mesh") or {}))
        try:  # the run's own mesh where it fits these devices, else data parallelism over them all
            resolve_mesh_sizes(mesh_cfg, jax.device_count())
        except ValueError:
            mesh_cfg = MeshConfig(data=-1)
        mesh = make_mesh(mesh_cfg)
        loaded = load_for_inference(workdir, step, mesh=mesh)
    except (CheckpointNotFound, ValueError) as err:
        fail(str(err))
    if info.is_main:
        console.print(f"step {loaded.step} from {loaded.checkpoint_dir}; {len(names)} task(s) on "
                      f"{jax.device_count()} device(s)")

    from indicfm.evaluation.harness import evaluate_model
    from indicfm.evaluation.in_loop import quiet_lm_eval

    try:
        # lm-eval logs each task's set-up at WARNING (defaults it fills in, custom-dataset notices);
        # indicfm's own warnings (requests cut to a row) still show
        with quiet_lm_eval():
            scores = evaluate_model(loaded.model, loaded.model.cfg, loaded.tokenizer(), mesh, tasks=names,
                                    include_path=include_path, num_fewshot=num_fewshot, limit=limit, rows=rows,
                                    seed=seed, log_samples=log_samples)
    except (UnknownTaskError, TaskFileError) as err:
        fail(str(err))
    if not info.is_main:
        return
    out_dir = output or Path(workdir) / "eval" / f"step_{loaded.step}"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "results": scores.results,
        "per_language": per_language(scores),
        "n_samples": scores.samples_per_task,
        "seconds": scores.seconds,
        "config": {"workdir": str(workdir), "step": loaded.step, "tasks": names, "num_fewshot": num_fewshot,
                   "limit": limit, "include_path": None if include_path is None else str(include_path),
                   "seed": seed, "rows": rows, "task_configs": scores.configs},
    }
    path = out_dir / "results.json"
    path.write_text(json.dumps(record, ensure_ascii=False, indent=1, default=str) + "\n", encoding="utf-8")
    if log_samples and scores.samples is not None:
        (out_dir / "samples.json").write_text(json.dumps(scores.samples, ensure_ascii=False, default=str),
                                              encoding="utf-8")
    print_scores(scores)
    console.print(f"{scores.requests} requests in {scores.seconds:.1f} s → {path}")


def per_language(scores) -> dict[str, dict[str, dict[str, float]]]:
    """``{language: {task: {metric: value}}}`` (language ``""`` for a task whose name has none)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for task, lang, metric, value, _ in scores.rows():
        table.setdefault(lang, {}).setdefault(task, {})[metric] = value
    return table


def print_scores(scores) -> None:
    """One table, grouped by language: task, metric, value, standard error."""
    from indicfm.tables import print_table

    rows: list = []
    last = None
    for task, lang, metric, value, stderr in sorted(scores.rows(), key=lambda r: (r[1], r[0])):
        if last is not None and lang != last:
            rows.append(None)
        last = lang
        rows.append((lang or "-", task, metric, f"{value:.4f}", "-" if stderr is None else f"±{stderr:.4f}"))
    print_table(console, "downstream evaluation", ["language", "task", "metric"], ["value", "stderr"], rows)


def register(app: typer.Typer) -> None:
    """Add `indicfm eval` to the top-level app."""
    app.command("eval")(eval_command)
