"""`indicfm data prepare|inspect` (issue 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from indicfm.cli.common import ConfigOption, InputsArgument, SetOption, console, fail, input_paths, load_config_or_exit

app = typer.Typer(help="Clean, deduplicate, tokenize and pack corpora into a token cache.", no_args_is_help=True)


@app.command("prepare")
def prepare_cmd(
    paths: InputsArgument = None,
    input: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--input", "-i",
            help="Text (.txt: one document per line, named like hin_Deva.txt), .jsonl (text, lang) or "
            ".parquet file, or a directory of them; several may follow one --input (--input a b). "
            "Default: data.inputs from the config.",
        ),
    ] = None,
    tokenizer: Annotated[
        Optional[Path], typer.Option("--tokenizer", "-t", help="SentencePiece .model (default: tokenizer.model_file)")
    ] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Cache directory (default: data.cache_dir)")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per packed row (default: data.seq_len)")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Processes that clean and tokenize, the main one included (default: data.workers; 0 = all CPUs; 1 = no worker processes)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing cache in --output first")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Clean, deduplicate, tokenize and pack text into a resumable token cache.

    Every document is accounted for in OUTPUT/report.json (kept, or dropped with a reason). If the
    run is interrupted, the same command finishes it without duplicating rows.

    Example:

        indicfm data prepare --input samples/train --tokenizer out/tok.model --output out/cache --seq-len 512

        indicfm data prepare --input corpus/hin_Deva.txt corpus/web.jsonl -t out/tok.model -o out/cache

        indicfm data prepare -c configs/data/sample.yaml -t out/tok.model --set data.filters.min_words=5
    """
    cfg = load_config_or_exit(config, set_)
    from indicfm.package_data import resolve_path

    inputs = [str(p) for p in input_paths(input, paths) or map(resolve_path, cfg.data.inputs)]
    tokenizer = tokenizer or (Path(cfg.tokenizer.model_file) if cfg.tokenizer.model_file else None)
    output = output or (Path(cfg.data.cache_dir) if cfg.data.cache_dir else None)
    if not inputs and not cfg.data.hub:
        fail("no input: give --input PATH (or data.inputs / data.hub in the config)")
    if tokenizer is None:
        fail("no tokenizer: give --tokenizer P.model (or tokenizer.model_file in the config)")
    if output is None:
        fail("no output: give --output DIR (or data.cache_dir in the config)")
    if seq_len is not None and seq_len <= 0:
        fail(f"--seq-len must be positive, got {seq_len}")

    from data_pipeline.cache import CacheError
    from data_pipeline.prepare import PrepareError, prepare
    from data_pipeline.sources import InputError

    try:
        result = prepare(
            inputs, tokenizer, output, seq_len=seq_len or cfg.data.seq_len, config=cfg.data,
            workers=workers, overwrite=overwrite, console=console,
        )
    except (InputError, PrepareError, CacheError) as err:
        fail(str(err))
    rows = sum(v["rows"] for v in result.languages.values())
    console.print(
        f"[green]token cache ready:[/] {result.output} — {rows:,} rows of {seq_len or cfg.data.seq_len} tokens; "
        f"{result.documents:,} documents in {result.seconds:.1f} s "
        f"({result.docs_per_s:,.0f} docs/s, {result.tokens_per_s:,.0f} tokens/s). "
        f"See {result.output}/report.json; dropped examples: indicfm data inspect {result.output}",
        highlight=False,
    )


@app.command("inspect")
def inspect_cmd(
    cache_dir: Annotated[Path, typer.Argument(help="Token cache directory written by `data prepare`")],
    reason: Annotated[
        Optional[str], typer.Option("--reason", "-r", help="Show dropped examples of this reason, e.g. wrong_script")
    ] = None,
    rows: Annotated[int, typer.Option("--rows", help="Also decode this many packed rows (needs the tokenizer file)")] = 0,
) -> None:
    """Show a cache's per-language report, and examples of dropped documents.

    Example:

        indicfm data inspect out/cache

        indicfm data inspect out/cache --reason wrong_script
    """
    import json

    from data_pipeline.report import DROP_REASONS, load_examples, render_table

    report_path = cache_dir / "report.json"
    if not report_path.is_file():
        fail(f"{report_path}: not found; is {cache_dir} a token cache made by `indicfm data prepare`?")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    examples = load_examples(cache_dir)
    if reason is None:
        render_table(report, console)
        present = [r for r in DROP_REASONS if examples.get(r)]
        if present:
            console.print("examples kept for: " + ", ".join(present) + "  (show them with --reason NAME)")
    else:
        if reason not in DROP_REASONS:
            fail(f"unknown reason {reason!r}; one of: {', '.join(DROP_REASONS)}")
        items = examples.get(reason, [])
        if not items:
            console.print(f"no documents were dropped as {reason}")
        for item in items:
            console.rule(f"{item['lang']}  {item['source']}:{item['line']}", style="dim")
            console.print(item["text"], markup=False, highlight=False)
    if rows:
        _print_rows(cache_dir, rows)


def _print_rows(cache_dir: Path, n: int) -> None:
    import sentencepiece as spm

    from data_pipeline.cache import CacheError, read_metadata, read_rows

    try:
        info = read_metadata(cache_dir)
    except CacheError as err:
        fail(str(err))
    tok = Path(info.metadata["tokenizer"])
    if not tok.is_file():
        fail(f"{tok}: tokenizer used for this cache not found; cannot decode rows")
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    for lang, v in info.languages.items():
        packed = read_rows(cache_dir, lang, slice(0, min(n, v["rows"])))
        for r in range(len(packed)):
            console.rule(f"{lang} row {r}", style="dim")
            seg = packed.segment_ids[r]
            for s in [s for s in dict.fromkeys(seg.tolist()) if s]:
                ids = packed.tokens[r][seg == s].tolist()
                console.print(f"[{s}] {sp.decode(ids)}", markup=False, highlight=False)
