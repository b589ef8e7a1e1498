"""`indicfm data prepare|inspect|review` (issues 4 and 20)."""

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
        Optional[list[str]],
        typer.Option(
            "--input", "-i",
            help="Text (.txt: one document per line, named like hin_Deva.txt), .jsonl (text, lang) or "
            ".parquet file, or a directory of them, local or gs://bucket/...; several may follow one --input (--input a b). "
            "Default: data.inputs from the config.",
        ),
    ] = None,
    tokenizer: Annotated[
        Optional[str],
        typer.Option("--tokenizer", "-t", help="SentencePiece .model or Hugging Face tokenizer.json (with the "
                     "tokenizer_config.json beside it, if any), a path or gs:// URL (default: tokenizer.model_file)"),
    ] = None,
    output: Annotated[
        Optional[str],
        typer.Option("--output", "-o", help="Cache directory, a path or gs://bucket/prefix (default: data.cache_dir)"),
    ] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per packed row (default: data.seq_len)")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Processes that clean and tokenize, the main one included (default: data.workers; 0 = all CPUs; 1 = no worker processes)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing cache in --output first")] = False,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="local: this machine's worker processes. ray: Ray tasks on a local Ray instance or, with "
            "--ray-address, a running cluster (needs `pip install 'indicfm[ray]'`); same cache either way.",
        ),
    ] = "local",
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            "--ray-address",
            help="With --engine ray: join this cluster (auto, or HOST:PORT of `ray start --head`) instead "
            "of starting a local Ray instance. Inputs, tokenizer and output must be at the same paths on every node "
            "(a shared filesystem, or gs:// URLs).",
        ),
    ] = None,
    staging_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--staging-dir",
            help="With a gs:// --output and --engine local: build the cache here on local disk (an "
            "interrupted run resumes from it), then upload it; it needs room for the whole cache. Default: a "
            "directory per output under ~/.cache/indicfm/staging ($XDG_CACHE_HOME). A complete cache named "
            "here is uploaded and kept; otherwise the directory is removed once uploaded. --engine ray "
            "writes to the bucket directly.",
        ),
    ] = None,
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

        indicfm data prepare -i corpus/ -t out/tok.model -o out/cache --engine ray --ray-address auto

        indicfm data prepare -i gs://bucket/corpus -t gs://bucket/tok.model -o gs://bucket/cache --engine ray
    """
    cfg = load_config_or_exit(config, set_)
    from indicfm.package_data import resolve_path

    inputs = [str(p) for p in input_paths(input, paths) or map(resolve_path, cfg.data.inputs)]
    tokenizer = tokenizer or (str(cfg.tokenizer.model_file) if cfg.tokenizer.model_file else None)
    output = output or (str(cfg.data.cache_dir) if cfg.data.cache_dir else None)
    if not inputs and not cfg.data.hub:
        fail("no input: give --input PATH (or data.inputs / data.hub in the config)")
    if tokenizer is None:
        fail("no tokenizer: give --tokenizer P.model or tokenizer.json (or tokenizer.model_file in the config)")
    if output is None:
        fail("no output: give --output DIR (or data.cache_dir in the config)")
    if seq_len is not None and seq_len <= 0:
        fail(f"--seq-len must be positive, got {seq_len}")
    if engine not in ("local", "ray"):
        fail(f"--engine must be local or ray, got {engine!r}")
    if ray_address and engine != "ray":
        fail("--ray-address needs --engine ray")

    from indicfm.data.cache import CacheError
    from indicfm.data.prepare import PrepareError, prepare
    from indicfm.data.ray_engine import RayNotInstalled, RayRunError
    from indicfm.data.sources import InputError
    from indicfm.storage import StorageError

    try:
        result = prepare(
            inputs, tokenizer, output, seq_len=seq_len or cfg.data.seq_len, config=cfg.data,
            workers=workers, overwrite=overwrite, console=console, engine=engine, ray_address=ray_address,
            staging_dir=staging_dir,
        )
    except (InputError, PrepareError, CacheError, RayNotInstalled, RayRunError, StorageError) as err:
        from rich.markup import escape

        fail(escape(str(err)))  # not markup: "indicfm[ray]", or a path with brackets, print as they are
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
    cache_dir: Annotated[str, typer.Argument(help="Token cache directory (or gs:// prefix) written by `data prepare`")],
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

    from indicfm.data.report import DROP_REASONS, load_examples, render_table
    from indicfm.storage import as_path

    cache_dir = as_path(cache_dir)
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
    from indicfm.data.cache import CacheError, read_metadata, read_rows
    from indicfm.storage import as_path
    from indicfm.tokenizer.load import TokenizerError, load_tokenizer

    try:
        info = read_metadata(cache_dir)
    except CacheError as err:
        fail(str(err))
    tok = as_path(info.metadata["tokenizer"])
    if not tok.is_file():
        fail(f"{tok}: tokenizer used for this cache not found; cannot decode rows")
    try:
        tokenizer = load_tokenizer(tok)
    except TokenizerError as err:
        fail(str(err))
    for lang, v in info.languages.items():
        packed = read_rows(cache_dir, lang, slice(0, min(n, v["rows"])))
        for r in range(len(packed)):
            console.rule(f"{lang} row {r}", style="dim")
            seg = packed.segment_ids[r]
            for s in [s for s in dict.fromkeys(seg.tolist()) if s]:
                ids = packed.tokens[r][seg == s].tolist()
                console.print(f"[{s}] {tokenizer.decode(ids)}", markup=False, highlight=False)


@app.command("review")
def review_cmd(
    cache_dir: Annotated[Path, typer.Argument(help="Token cache directory written by `data prepare`")],
    port: Annotated[int, typer.Option("--port", "-p", help="Port to serve the page on (0: any free port)")] = 8765,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 127.0.0.1 keeps the page on this machine")
    ] = "127.0.0.1",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default web browser")] = False,
) -> None:
    """Serve a local web page to judge what `data prepare` kept and dropped, and tune its thresholds.

    Per language: documents in/kept/dropped by reason; dropped examples beside kept documents nearest
    the threshold; a histogram per filter whose threshold you can move, showing at once how many
    documents would be kept or dropped and which; duplicate clusters. Mark documents "wrongly
    dropped/kept" (saved to CACHE_DIR/judgements.jsonl) and export your thresholds as a YAML for the
    next `data prepare -c` (CACHE_DIR/review_overrides.yaml). Stop with Ctrl-C.

    Example:

        indicfm data review out/cache --open
    """
    from indicfm.data.review.server import ReviewError, make_server

    try:
        server = make_server(cache_dir, host, port)
    except ReviewError as err:
        fail(str(err))
    bound_host, bound_port = server.server_address[:2]
    url = f"http://{'127.0.0.1' if bound_host in ('0.0.0.0', '') else bound_host}:{bound_port}/"
    console.print(f"[green]data review[/] of {cache_dir} ({server.review.table.n:,} documents) at [bold]{url}[/]  "
                  "(Ctrl-C stops)", highlight=False)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        server.server_close()
