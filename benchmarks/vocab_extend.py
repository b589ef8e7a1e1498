"""Does extending a weak tokenizer pay at CPU scale?  A small dense model trained with a tokenizer that is
weak on Indic text, then continued for the same training FLOPs with its own tokenizer and with the
tokenizer extended with Indic pieces; bits per byte per language on FLORES-200 dev.

    python -m benchmarks.vocab_extend [--parent-flops B] [--extra-flops C] [--output DIR] [--quick]

1. **base tokenizer**: a byte-level BPE (``tokenizers``, Llama-3/GPT style) trained on the English
   corpus plus a few lines of each Indic language: it spends several tokens on most Indic words;
2. **Indic pieces**: an indicfm SentencePiece model trained on the shared corpus' Indic files (never
   on FLORES dev), and ``indicfm tokenizer extend --base BASE --add INDIC.model --max-new N``;
3. **parent**: the dense compare config (``configs/compare/dense.yaml``) with the base tokenizer,
   trained from scratch for B FLOPs;
4. C more FLOPs two ways, from the parent's parameters with a fresh optimizer:
   (a) ``base-continued``: the same tokenizer and token cache;
   (b) ``extended``: ``indicfm import tokenizer`` gives the parent the extended vocabulary (base rows
   bit-identical, new rows the mean of their base sub-token rows), the same texts are prepared
   again with the extended tokenizer, and it trains on them.

Each arm runs ``floor(C / FLOPs per step)`` steps, FLOPs per step from :mod:`indicfm.model.flops` for
its own model (the extended vocabulary's larger output projection costs more per token), and is
evaluated with compare's planner (at the start and 5 times).  Bits per byte, not loss, compares
tokenizers: the same held-out bytes are scored whatever their tokenization.  Printed: tokens per
word of each tokenizer per language, and bits per byte per language for the parent and both arms
after C; ``indicfm compare``'s tables and plots (bits per byte against FLOPs and wall clock) are in
``OUTPUT/report/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

from indicfm.config import CONFIG_DIR
from indicfm.text import normalize

PARENT_FLOPS = 2e12
EXTRA_FLOPS = 2e12
QUICK_FLOPS = 2e11
BASE_VOCAB = 2000  # byte-level BPE entries (256 bytes included) before its two special tokens
INDIC_VOCAB = 8000  # the SentencePiece model the Indic pieces come from
MAX_NEW = 2000  # pieces the extension adds
LINES_PER_LANGUAGE = 3000  # training text per language (the runs read far fewer tokens than this)
INDIC_LINES_IN_BASE = 100  # the "little Indic" the base tokenizer sees per language
ARM_EVALS = 5
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]


def _nfc_lines(path: Path, limit: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()[:limit]
    return [normalize(line) for line in lines if line.strip()]


def _corpus(source: Path, out: Path, lines: int) -> Path:
    """The first ``lines`` lines of each language: the same texts for every tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.txt")):
        target = out / path.name
        if not target.is_file():
            target.write_text("\n".join(path.read_text(encoding="utf-8").splitlines()[:lines]) + "\n", encoding="utf-8")
    return out


def _base_tokenizer(corpus: Path, out: Path, vocab: int) -> Path:
    """A byte-level BPE trained on English plus a little of every Indic language."""
    path = out / "tokenizer.json"
    if path.is_file():
        return path
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    lines: list[str] = []
    for file in sorted(corpus.glob("*.txt")):
        lines += _nfc_lines(file, 10**9 if file.stem == "eng_Latn" else INDIC_LINES_IN_BASE)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _indic_model(corpus: Path, out: Path, vocab: int) -> Path:
    """indicfm's SentencePiece tokenizer trained on the corpus' Indic files (FLORES dev never)."""
    model = out / "tokenizer.model"
    if model.is_file():
        return model
    from indicfm.tokenizer.config import TokenizerConfig
    from indicfm.tokenizer.train import train_tokenizer

    inputs = [p for p in sorted(corpus.glob("*.txt")) if p.stem != "eng_Latn"]
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(inputs, out / "tokenizer", TokenizerConfig(vocab_size=vocab, model_type="bpe", max_sentences=40000))
    return model


def _extend(base: Path, indic: Path, out: Path, max_new: int, console: Any) -> tuple[Path, str]:
    """``indicfm tokenizer extend`` (and how it was extended)."""
    path = out / "tokenizer.json"
    if path.is_file():
        return path, json.loads((out / "method.json").read_text())["method"]
    from typer.testing import CliRunner

    from indicfm.cli import app

    out.mkdir(parents=True, exist_ok=True)
    args = ["tokenizer", "extend", "--base", str(base), "--add", str(indic), "--max-new", str(max_new), "--output", str(out)]
    result = CliRunner().invoke(app, args)
    if result.exit_code == 0 and path.is_file():
        method = "indicfm tokenizer extend --max-new " + str(max_new)
    else:
        console.print(f"indicfm tokenizer extend failed or is missing ({result.output.strip()[-300:]}); "
                      "falling back to added tokens")
        method = _extend_with_added_tokens(base, indic, path, max_new)
    (out / "method.json").write_text(json.dumps({"method": method}))
    return path, method


def _extend_with_added_tokens(base: Path, indic: Path, path: Path, max_new: int) -> str:
    """The simple fallback: the SentencePiece model's first ``max_new`` multi-character Indic pieces
    the base lacks, appended as added tokens (matched in the text before the base's pre-tokenizer)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer

    from indicfm.text import script_of_char

    tok = Tokenizer.from_file(str(base))
    sp = spm.SentencePieceProcessor(model_file=str(indic))
    pieces = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i):
            continue
        text = sp.id_to_piece(i).replace("▁", " ")
        if len(text.strip()) >= 2 and script_of_char(text.strip()[0]) not in ("Latn", None):
            pieces.append(text)
        if len(pieces) == max_new:
            break
    tok.add_tokens([AddedToken(p, normalized=False) for p in pieces])
    tok.save(str(path))
    return f"fallback: {len(pieces)} SentencePiece pieces as added tokens"


def _write_config(path: Path, settings: dict) -> Path:
    data = {"include": [str(CONFIG_DIR / "compare" / "dense.yaml")], **settings}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def _train(config: Path, budget: float, workdir: Path, evals: int, console: Any) -> tuple[Any, Any, float]:
    """Train ``config`` for ``budget`` FLOPs (compare's planner); its plan, history and wall seconds."""
    from indicfm.config import load_config
    from indicfm.data.cache import read_metadata
    from indicfm.report.compare import plan_run
    from indicfm.report.runs import load_run
    from indicfm.train.inputs import ensure_tokenizer_and_cache
    from indicfm.train.loop import train

    cfg = load_config(config)
    cfg = ensure_tokenizer_and_cache(cfg, workdir, progress=False, console=console)
    run = plan_run(config.stem, str(config), cfg, read_metadata(cfg.data.cache_dir).seq_len, budget, evals)
    overrides = [f"data.cache_dir={cfg.data.cache_dir}", f"trainer.steps={run.steps}",
                 f"eval.every_steps={run.eval_every_steps}", "eval.at_start=true"]
    console.print(f"[bold]{config.stem}[/]: {run.flops_per_token / 1e6:.2f} MFLOP/token, {run.steps} steps in {workdir}")
    start = time.perf_counter()
    train(load_config(config, overrides), workdir, console=console)
    return run, load_run(workdir, config.stem), time.perf_counter() - start


def _fertility(tokenizers: dict[str, Path], heldout: Path, languages: list[str], lines: int) -> dict[str, dict[str, float]]:
    """Tokens per whitespace word on the held-out lines, per tokenizer and language."""
    from indicfm.tokenizer.load import load_tokenizer

    out: dict[str, dict[str, float]] = {}
    for name, path in tokenizers.items():
        tok = load_tokenizer(path)
        out[name] = {}
        for lang in languages:
            text = _nfc_lines(heldout / f"{lang}.dev", lines)
            out[name][lang] = sum(len(ids) for ids in tok.encode_batch(text)) / sum(len(t.split()) for t in text)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from benchmarks.quality import add_budget_arguments, budgets

    add_budget_arguments(parser, Path("runs/vocab_extend"), PARENT_FLOPS, EXTRA_FLOPS, QUICK_FLOPS)
    parser.add_argument("--max-new", type=int, default=MAX_NEW, help="pieces the extension adds")
    args = parser.parse_args(argv)

    from rich.console import Console

    from benchmarks.common import cpu_load, device_description
    from indicfm.config import load_config
    from indicfm.report.compare import flops_to_reach, summarise, write_outputs

    B, C = budgets(args, PARENT_FLOPS, EXTRA_FLOPS, QUICK_FLOPS)
    out = args.output.resolve()
    console = Console(stderr=True)
    load_before, started = cpu_load(), time.perf_counter()

    text = _corpus(args.corpus.resolve(), out / "corpus", LINES_PER_LANGUAGE)
    base = _base_tokenizer(text, out / "base", BASE_VOCAB)
    indic = _indic_model(text, out / "indic", INDIC_VOCAB)
    extended, method = _extend(base, indic, out / "extended", args.max_new, console)
    from indicfm.tokenizer.extend import padded
    from indicfm.tokenizer.load import load_tokenizer

    base_size = load_tokenizer(base).vocab_size
    base_rows = padded(base_size)
    common = {"data": {"inputs": [str(text)]}, "eval": {"heldout_dir": str(args.heldout.resolve())}}

    # the parent: the base tokenizer, from scratch, for B
    parent_cfg = _write_config(out / "configs" / "parent.yaml", {
        **common, "model": {"vocab_size": base_rows},
        "tokenizer": {"model_file": str(base)}, "checkpoint": {"every_steps": 100000}})
    parent_run = out / "runs" / "parent"
    parent_plan, parent_history, parent_s = _train(parent_cfg, B, parent_run, 2, console)

    # (a) the same tokenizer and cache, continued for C
    cache = load_config(parent_run / "config.yaml").data.cache_dir
    arm_a = _write_config(out / "configs" / "base-continued.yaml", {
        **common, "model": {"vocab_size": base_rows}, "tokenizer": {"model_file": str(base)},
        "data": {**common["data"], "cache_dir": cache}, "trainer": {"init_from": str(parent_run)}})
    # (b) the parent given the extended vocabulary (indicfm import tokenizer), its data prepared again
    initial = out / "initial" / "extended"
    if not (initial / "config.yaml").is_file():
        from typer.testing import CliRunner

        from indicfm.cli import app

        result = CliRunner().invoke(app, ["import", "tokenizer", "--from", str(parent_run), "--tokenizer", str(extended),
                                          "--output", str(initial), "--overwrite"])
        if result.exit_code != 0:
            raise SystemExit(f"indicfm import tokenizer failed:\n{result.output}")
        console.print(result.output.strip(), highlight=False, markup=False)
    ext_cfg = load_config(initial / "config.yaml")
    arm_b = _write_config(out / "configs" / "extended.yaml", {
        **common, "model": ext_cfg.model.model_dump(mode="json"), "tokenizer": {"model_file": ext_cfg.tokenizer.model_file},
        "trainer": {"init_from": str(initial)}})

    plans, histories, seconds = {}, {}, {}
    for config, name in ((arm_a, "base-continued"), (arm_b, "extended")):
        plans[name], histories[name], seconds[name] = _train(config, C, out / "runs" / name, ARM_EVALS, console)
    result = summarise([plans["base-continued"], plans["extended"]], list(histories.values()), "base-continued", C, seconds)
    write_outputs(result, list(histories.values()), out / "report")

    languages = [l for l in result.languages if l != "mean"]
    fertility = _fertility({"base": base, "extended": extended}, args.heldout.resolve(), languages, 200)
    parent_final = {l: float(v[-1]) for l, v in parent_history.bpb.items()}
    start = {n: {l: float(v[0]) for l, v in h.bpb.items()} for n, h in histories.items()}
    final = result.final_bpb
    names = ["base-continued", "extended"]
    print(f"\nmachine: {device_description()}; load before {load_before}, after {cpu_load()}; "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"base tokenizer: byte-level BPE, {base_size:,} entries; extended: {load_tokenizer(extended).vocab_size:,} "
          f"entries ({method}); model rows {plans['base-continued'].flops_per_token / 1e6:.2f} vs "
          f"{plans['extended'].flops_per_token / 1e6:.2f} MFLOP/token")
    print(f"parent: {parent_plan.steps} steps = {parent_plan.train_flops:.2e} FLOPs; then C = {C:.1e} FLOPs per arm: "
          + ", ".join(f"{n} {plans[n].steps} steps = {plans[n].train_flops:.2e}" for n in names))
    print("| language | tokens/word base | tokens/word extended | parent (B) | base-continued start | base-continued (B+C) "
          "| extended start | extended (B+C) |")
    print("|---" * 8 + "|")
    for lang in languages + ["mean"]:
        fert = [fertility[k].get(lang) for k in ("base", "extended")]
        fert_text = [f"{v:.2f}" if v is not None else "" for v in fert] if lang != "mean" else [
            f"{sum(fertility[k].values()) / len(languages):.2f}" for k in ("base", "extended")]
        print(f"| {lang} | {fert_text[0]} | {fert_text[1]} | {parent_final.get(lang, float('nan')):.4f} | "
              f"{start['base-continued'].get(lang, float('nan')):.4f} | {final['base-continued'].get(lang, float('nan')):.4f} | "
              f"{start['extended'].get(lang, float('nan')):.4f} | {final['extended'].get(lang, float('nan')):.4f} |")
    wins = sum(final["extended"][l] < final["base-continued"][l] for l in languages)
    h = histories["extended"]
    needed = flops_to_reach(h.eval_flops, h.bpb["mean"], final["base-continued"]["mean"])
    reach = "never" if needed is None else f"after {needed / C:.2f} C"
    print(f"extended beats base-continued on {wins} of {len(languages)} languages at equal FLOPs; it reaches "
          f"base-continued's final mean ({final['base-continued']['mean']:.4f}) {reach}; plots: {out / 'report'}")
    summary = {"B": B, "C": C, "method": method, "fertility": fertility, "parent_bpb": parent_final, "start_bpb": start,
               "final_bpb": final, "steps": {n: plans[n].steps for n in names},
               "flops_per_token": {n: plans[n].flops_per_token for n in names}, "wall_s": {**seconds, "parent": parent_s}}
    (out / "vocab_extend.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
