"""`indicfm generate` and `indicfm export hf` (issue 9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from indicfm.cli.common import console, fail, quiet_orbax

export_app = typer.Typer(help="Export a trained model to other ecosystems.", no_args_is_help=True)

WorkdirOption = Annotated[Path, typer.Option("--workdir", "-w", help="Run directory written by `indicfm train`.")]
StepOption = Annotated[Optional[int], typer.Option("--step", help="Checkpoint step (default: the newest).")]


def generate_command(
    workdir: WorkdirOption,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text to continue.")] = None,
    prompts_file: Annotated[
        Optional[Path],
        typer.Option("--prompts-file", help="Batch mode: one prompt per line, optionally 'lang_Code<TAB>text'."),
    ] = None,
    lang: Annotated[Optional[str], typer.Option("--lang", help="FLORES-200 code of the prompt(s), e.g. hin_Deva.")] = None,
    step: StepOption = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens to add.")] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy; higher = more random.")
    ] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Sample from the smallest set of tokens with this much probability.")] = 0.95,
    seed: Annotated[int, typer.Option("--seed", help="Random seed for sampling (same seed, same text).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts generated together in batch mode.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt instead of text.")] = False,
    tensor: Annotated[int, typer.Option("--tensor", min=1, help="Split heads/MLPs over this many devices.")] = 1,
    expert: Annotated[int, typer.Option("--expert", min=1, help="Split the experts over this many devices.")] = 1,
) -> None:
    """Continue a prompt with a trained checkpoint (KV cache; stops at EOS).

    Examples:

        indicfm generate --workdir runs/quickstart --prompt "भारत की राजधानी" --lang hin_Deva

        indicfm generate -w runs/qs --prompts-file prompts.tsv --temperature 0 --json

    The checkpoint restores onto this machine's devices whatever mesh it was trained on: one device
    by default, --tensor/--expert to split a model too big for one.  Prompts are NFC-normalised and
    tokenized with the tokenizer stored in the checkpoint.
    """
    from indicfm.inference.prompts import Prompt, check_language, read_prompts_file, script_warning

    if (prompt is None) == (prompts_file is None):
        fail("give exactly one of --prompt or --prompts-file")
    if top_p <= 0:
        fail("--top-p must be greater than 0")
    try:
        check_language(lang)
        if prompts_file is not None:
            prompts, blank = read_prompts_file(prompts_file, lang)
            if blank:
                console.print(f"{prompts_file}: skipped {blank} blank line(s)")
        else:
            from indicfm.text import normalize

            prompts = [Prompt(normalize(prompt), lang, "--prompt")]
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    if not prompts:
        fail(f"{prompts_file}: no prompts")
    for p in prompts:
        warning = script_warning(p)
        if warning:
            console.print(f"[yellow]warning:[/] {warning}")

    quiet_orbax()
    from indicfm.inference.generate import generate_text
    from indicfm.inference.load import inference_mesh, load_for_inference
    from indicfm.train.saved_model import CheckpointNotFound

    try:
        loaded = load_for_inference(workdir, step, mesh=inference_mesh(tensor, expert))
    except (CheckpointNotFound, ValueError) as err:
        fail(str(err))
    console.print(f"step {loaded.step} from {loaded.checkpoint_dir}")
    tokenizer = loaded.tokenizer()
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        try:
            results = generate_text(loaded.model, tokenizer, [p.text for p in chunk], **options)
        except ValueError as err:
            fail(f"{chunk[0].source}: {err}")
        for p, r in zip(chunk, results):
            if as_json:
                record = {"lang": p.lang, "prompt": p.text, "text": r.text, "tokens": len(r.token_ids),
                          "finish_reason": r.finish_reason, "step": loaded.step}
                typer.echo(json.dumps(record, ensure_ascii=False))
            else:
                label = f"[{p.lang}] " if p.lang else ""
                typer.echo(f"{label}{p.text}{r.text}")
                console.print(f"  ({len(r.token_ids)} tokens, {r.finish_reason})", style="dim")


@export_app.command("hf")
def export_hf_command(
    workdir: WorkdirOption,
    output: Annotated[Path, typer.Option("--output", "-o", help="New directory for the Hugging Face model.")],
    step: StepOption = None,
    dtype: Annotated[
        Optional[str], typer.Option("--dtype", help="float32 or bfloat16 (default: the parameters' dtype).")
    ] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors file, e.g. 2GB.")] = "5GB",
) -> None:
    """Write a Hugging Face model directory (Qwen2-MoE architecture) from a checkpoint.

    Example:

        indicfm export hf --workdir runs/quickstart --output exports/quickstart-hf

    OUTPUT gets config.json, model*.safetensors (sharded, with an index), the tokenizer (from a
    SentencePiece run: tokenizer.json, fast, NFC built in, with tokenizer_config.json and the raw
    tokenizer.model; from a tokenizer.json run: that file as it is, with tokenizer_config.json
    naming its special tokens), and a README model card
    with per-language bits per byte from the run's evaluation.  Models using a sigmoid router or
    the loss-free balancing bias are refused: Qwen2-MoE cannot express them.  Load with
    AutoModelForCausalLM.from_pretrained(OUTPUT) and AutoTokenizer.from_pretrained(OUTPUT).
    """
    if dtype not in (None, "float32", "bfloat16"):
        fail(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    quiet_orbax()
    from indicfm.export.hf import ExportError, export_hf
    from indicfm.train.saved_model import CheckpointNotFound

    try:
        result = export_hf(workdir, output, step=step, dtype=dtype, max_shard_size=max_shard_size)
    except (ExportError, CheckpointNotFound, ValueError) as err:
        fail(str(err))
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(
        f"exported step {result.step}: {result.num_tensors} tensors, {result.total_bytes / 1e6:,.1f} MB in "
        f"{sum(1 for f in result.files if f.suffix == '.safetensors')} safetensors file(s) → {result.output}"
    )


def register(app: typer.Typer) -> None:
    """Add `indicfm generate` to the top-level app."""
    app.command("generate")(generate_command)
