"""`indicfm tokenizer train|eval` (issue 3) and `extend` (issue 28)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from indicfm.cli.common import ConfigOption, InputsArgument, SetOption, console, fail, input_paths, load_config_or_exit

app = typer.Typer(help="Train and evaluate a SentencePiece tokenizer fair to Indic scripts; extend an open model's tokenizer with its pieces.", no_args_is_help=True)


@app.command("train")
def train(
    output_prefix: Annotated[Path, typer.Option("--output-prefix", "-o", help="Writes PREFIX.model, PREFIX.vocab, PREFIX.json")],
    paths: InputsArgument = None,
    input: Annotated[
        Optional[list[str]],
        typer.Option(
            "--input", "-i",
            help="Text/JSONL file or directory; several may follow one --input (--input a b). "
            "hin_Deva.txt = Hindi, one document per line.",
        ),
    ] = None,
    vocab_size: Annotated[Optional[int], typer.Option("--vocab-size", help="Vocabulary size (default from config: 64000)")] = None,
    model_type: Annotated[Optional[str], typer.Option("--model-type", help="bpe (default) or unigram")] = None,
    allow_unknown: Annotated[
        bool, typer.Option("--allow-unknown", help="Count files without a language code under 'unknown' instead of failing")
    ] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Train a SentencePiece tokenizer with language-balanced sampling.

    Text is NFC-normalised once by indicfm; SentencePiece does not normalise again, so ZWJ/ZWNJ
    survive. Special ids: pad=0, unk=1, bos=2, eos=3.

    Example:

        indicfm tokenizer train --input samples/train --vocab-size 8000 --output-prefix out/tok

        indicfm tokenizer train --input corpus/hin_Deva.txt corpus/tam_Taml.txt -o out/tok
    """
    inputs = input_paths(input, paths)
    if not inputs:
        fail("no input: give the text files or directories to train on, e.g. --input samples/train")
    cfg = load_config_or_exit(config, set_)
    tok_cfg = cfg.tokenizer
    try:
        if vocab_size is not None:
            tok_cfg.vocab_size = vocab_size
        if model_type is not None:
            tok_cfg.model_type = model_type
    except ValueError as err:
        fail(f"invalid option: {err}")

    from indicfm.data.sources import InputError
    from indicfm.tokenizer.train import train_tokenizer

    try:
        result = train_tokenizer(inputs, output_prefix, tok_cfg, allow_unknown=allow_unknown, progress=True)
    except (InputError, FileNotFoundError) as err:
        fail(str(err))
    except (ValueError, RuntimeError) as err:  # SentencePiece reports a bad vocab size etc. as RuntimeError
        fail(f"training failed: {err}")
    _print_training_summary(result)


def _print_training_summary(result) -> None:
    from rich.table import Table

    from indicfm.tables import print_table

    rows = [[lang, f"{available:,}", f"{result.sampled[lang]:,}"] for lang, available in result.available.items()]
    print_table(console, "documents per language", ["language"], ["available", "sampled"], rows)
    skipped = [(f.path, f.dropped) for f in result.files if f.dropped]
    if skipped:
        skip_table = Table(title="skipped lines per file")
        skip_table.add_column("file")
        skip_table.add_column("skipped (reason: count)")
        for path, dropped in skipped:
            skip_table.add_row(path, ", ".join(f"{reason}: {n:,}" for reason, n in dropped.items()))
        console.print(skip_table)
    else:
        console.print("no lines skipped")
    console.print(
        f"wrote {result.model_file}, {result.vocab_file}, {result.manifest_file} in {result.seconds:.1f} s", highlight=False
    )


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="indicfm/SentencePiece .model to evaluate")],
    parallel: Annotated[Path, typer.Option("--parallel", "-p", help="Directory with one parallel file per language (hin_Deva.dev, eng_Latn.dev, ...)")],
    compare: Annotated[
        Optional[list[str]],
        typer.Option("--compare", help="Another .model or HF tokenizer.json to put side by side; NAME=PATH names it. Repeatable."),
    ] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Write REPORT.json and REPORT.md")] = None,
) -> None:
    """Per-language fairness report: fertility, chars/token, parity vs English, akshara split rate,
    byte-fallback rate, round trip and ZWJ/ZWNJ kept.

    Example:

        indicfm tokenizer eval --model out/tok.model --parallel samples/heldout --compare gemma3=tokenizer.json --output out/report
    """
    from indicfm.tokenizer.evaluate import evaluate_tokenizers, write_report

    try:
        report = evaluate_tokenizers([str(model), *(compare or [])], parallel)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        fail(str(err))
    _print_report(report)
    if output is not None:
        json_path, md_path = write_report(report, output)
        console.print(f"wrote {json_path} and {md_path}", highlight=False)


def _print_report(report) -> None:
    from rich.console import Console

    from indicfm.tables import print_table
    from indicfm.tokenizer.evaluate import _fmt, _pct

    out = Console()
    rows: list = []
    for lang in report.tokenizers[0].languages:
        for i, t in enumerate(report.tokenizers):
            m = t.languages[lang]
            rows.append([
                lang if i == 0 else "", t.name, _fmt(m.fertility), _fmt(m.chars_per_token), _fmt(m.parity),
                _pct(m.akshara_split_rate), _pct(m.byte_fallback_rate), _pct(m.round_trip_rate),
                f"{m.zero_width_kept}/{m.zero_width}", t.normalizer,
            ])  # fmt: skip
        if len(report.tokenizers) > 1:
            rows.append(None)  # a line between languages
    values = ["fertility", "chars/tok", "parity", "akshara split", "byte fb", "round trip", "ZWJ/ZWNJ", "normaliser"]
    print_table(out, f"tokenizer fairness on {report.parallel_dir}", ["language", "tokenizer"], values, rows)
    for t in report.tokenizers:
        s = t.summary()
        out.print(
            f"{t.name}: mean fertility ({s['focus_languages']} focus languages) {_fmt(s['mean_fertility'])}, "
            f"worst parity {_fmt(s['max_parity'])}, worst akshara split {_pct(s['max_akshara_split_rate'])}, "
            f"lowest round trip {_pct(s['min_round_trip_rate'])}, ZWJ/ZWNJ kept {s['zero_width_kept']}/{s['zero_width_total']}",
            highlight=False,
        )
        for warning in t.normalizer_warnings:
            out.print(f"[yellow]warning:[/] {t.name}: {warning.detail}", highlight=False)


@app.command("extend")
def extend(
    base: Annotated[Path, typer.Option("--base", "-b", help="The open model's tokenizer.json (byte-level BPE or SentencePiece-style BPE) or SentencePiece .model")],
    add: Annotated[Path, typer.Option("--add", "-a", help="indicfm's SentencePiece BPE .model whose Indic pieces are added")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for tokenizer.json, tokenizer_config.json, extension.json (+ tokenizer.model)")],
    max_new: Annotated[Optional[int], typer.Option("--max-new", help="At most this many new tokens (default: every Indic piece the base lacks)")] = None,
    text: Annotated[
        Optional[Path],
        typer.Option("--text", help="Directory of Indic text (hin_Deva.txt, ...): rank pieces by their share of each language's "
                     "tokens, languages weighted equally (default: the --add model's own, language-balanced order)"),
    ] = None,
) -> None:
    """Add indicfm's Indic pieces to an open model's tokenizer; base ids and English encoding unchanged.

    New ids come after the base's; text without an Indic character gets exactly the base's ids.

    Example:

        indicfm tokenizer extend --base llama3/tokenizer.json --add out/tok.model --max-new 32000 --output out/llama3-indic
    """
    from indicfm.tokenizer.extend import ExtendError, extend_tokenizer
    from indicfm.tokenizer.specials import TokenizerError

    try:
        result = extend_tokenizer(base, add, output, max_new=max_new, text_dir=text, progress=True)
    except (ExtendError, TokenizerError) as err:
        fail(str(err))
    _print_extension(result)


def _print_extension(result) -> None:
    from indicfm.tables import print_table

    rows = [[script, f"{n:,}"] for script, n in result.by_script.items()]
    prefixes = sum(1 for a in result.added if a["text"] is None)
    if prefixes:
        rows.append(["byte prefixes", f"{prefixes:,}"])
    print_table(console, f"tokens added to {result.base_kind}", ["script"], ["added"], rows)
    for reason, n in result.skipped.items():
        console.print(f"passed over {n:,} candidate pieces: {reason}", highlight=False)
    for note in result.notes:
        console.print(note, highlight=False)
    console.print(
        f"vocabulary {result.base_size:,} -> {result.vocab_size:,} (+{len(result.added):,}; padded to a multiple of 128: "
        f"{result.padded_size:,}); pieces chosen by {result.method}; normaliser: {result.normalizer}", highlight=False)
    console.print(f"wrote {result.tokenizer_file}, {result.manifest_file}" + (f", {result.model_file}" if result.model_file else ""), highlight=False)
