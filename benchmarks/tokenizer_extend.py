"""Fertility of open tokenizers before and after ``indicfm tokenizer extend`` (issue 28).

``python -m benchmarks.tokenizer_extend [--sizes 16000,32000,all]``

* indicfm's own 64k tokenizer is trained with the default recipe on ``../shared/data/corpus`` only
  (FLORES dev is what we measure on, so it stays out), once: the model is cached in
  ``workdir/tokenizer_extend/`` (git-ignored) and reused while it exists.
* Llama-3 and Gemma-3 ``tokenizer.json`` come from ``$INDICFM_ANCHOR_TOKENIZERS`` or
  ``../notes/anchor_tok`` (see ``../shared/data/README.md``; never in the repository); a missing one
  is skipped.  Each is extended with 16k, 32k and all of the 64k model's Indic pieces.
* Fertility (tokens per whitespace word) on FLORES-200 dev for the ten major Indic languages and
  English, through the fairness report of ``tokenizer eval --compare``
  (:func:`indicfm.tokenizer.evaluate.evaluate_tokenizers`); the mean over the ten and its ratio to
  indicfm's own (the goal: at most 1.10); the share of English lines (FLORES dev, and the
  paragraphs of indicfm's own Python source without an Indic character) whose ids are identical
  before and after; the tokens added.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import anchor_tokenizer

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CACHE = REPO / "workdir" / "tokenizer_extend"
LANGUAGES = ("hin_Deva", "ben_Beng", "mar_Deva", "tel_Telu", "tam_Taml", "guj_Gujr", "kan_Knda", "mal_Mlym", "ory_Orya", "pan_Guru")
ENGLISH = "eng_Latn"


def own_tokenizer() -> Path:
    """indicfm's 64k tokenizer trained on the shared corpus (no FLORES dev), cached."""
    from indicfm.tokenizer.config import TokenizerConfig
    from indicfm.tokenizer.train import train_tokenizer

    model = CACHE / "indic64k.model"
    if not model.is_file():
        print(f"training indicfm's 64k tokenizer on {SHARED / 'corpus'} (cached in {CACHE}) ...", file=sys.stderr)
        train_tokenizer([SHARED / "corpus"], CACHE / "indic64k", TokenizerConfig(vocab_size=64000))
    return model


def english_lines() -> list[str]:
    """FLORES English, then paragraphs of indicfm's Python source with no Indic character."""
    from indicfm.tokenizer.piece_selection import has_indic_character

    flores = (SHARED / "flores200" / "dev" / f"{ENGLISH}.dev").read_text(encoding="utf-8").splitlines()
    code = []
    for path in sorted((REPO / "indicfm").rglob("*.py")) + sorted((REPO / "tokenizer").rglob("*.py")):
        code += [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip() and not has_indic_character(p)]
    return flores, code


def token_ids(tokenizer: Any, lines: list[str]) -> list[list[int]]:
    """Each line's ids (no special tokens) under a ``tokenizers.Tokenizer``."""
    return [encoding.ids for encoding in tokenizer.encode_batch(lines, add_special_tokens=False)]


def identical_share(base_ids: list[list[int]], extended: Any, lines: list[str]) -> float:
    """The share of ``lines`` the extended tokenizer encodes exactly as the base did (``base_ids``,
    from :func:`token_ids`, computed once per base)."""
    same = sum(x == y for x, y in zip(base_ids, token_ids(extended, lines)))
    return same / len(lines)


def main() -> None:
    from tokenizers import Tokenizer

    from indicfm.tokenizer.evaluate import evaluate_tokenizers
    from indicfm.tokenizer.extend import extend_tokenizer

    sizes_arg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--sizes=")), "16000,32000,all")
    sizes = [None if s == "all" else int(s) for s in sizes_arg.split(",")]
    own = own_tokenizer()
    flores, code = english_lines()
    specs = []
    rows_meta = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        dev = Path(tmp) / "dev"
        dev.mkdir()
        for lang in (*LANGUAGES, ENGLISH):
            (dev / f"{lang}.dev").symlink_to(SHARED / "flores200" / "dev" / f"{lang}.dev")
        for name in ("llama3", "gemma3"):
            base = anchor_tokenizer(name)
            if base is None:
                print(f"skipping {name}: no tokenizer.json (set INDICFM_ANCHOR_TOKENIZERS)", file=sys.stderr)
                continue
            specs.append(f"{name}={base}")
            base_tokenizer = Tokenizer.from_file(str(base))
            base_ids = {"eng": token_ids(base_tokenizer, flores), "code": token_ids(base_tokenizer, code)}
            rows_meta[name] = {"added": 0, "vocab": None, "eng": 1.0, "code": 1.0, "seconds": 0.0}
            for size in sizes:
                label = f"{name}+{'all' if size is None else f'{size // 1000}k'}"
                start = time.perf_counter()
                result = extend_tokenizer(base, own, Path(tmp) / label, max_new=size)
                seconds = time.perf_counter() - start
                specs.append(f"{label}={result.tokenizer_file}")
                extended = Tokenizer.from_file(str(result.tokenizer_file))
                rows_meta[label] = {
                    "added": len(result.added), "vocab": result.vocab_size, "padded": result.padded_size, "seconds": seconds,
                    "eng": identical_share(base_ids["eng"], extended, flores), "code": identical_share(base_ids["code"], extended, code),
                }
                rows_meta[name]["vocab"] = result.base_size
                notes.append(f"{label}: added per script {result.by_script}; " + "; ".join(result.notes))
        specs.append(f"indicfm-64k={own}")
        rows_meta["indicfm-64k"] = {"added": None, "vocab": 64000, "eng": None, "code": None, "seconds": 0.0}
        report = evaluate_tokenizers(specs, dev)

    own_report = report.tokenizers[-1]
    own_mean = sum(own_report.languages[lang].fertility for lang in LANGUAGES) / len(LANGUAGES)
    names = [t.name for t in report.tokenizers]
    width = max(len(n) for n in names) + 2
    print(f"fertility (tokens per word) on FLORES-200 dev ({len(flores)} lines per language); "
          f"indicfm-64k trained on {SHARED / 'corpus'} only")
    print("language".ljust(10) + "".join(n.rjust(width) for n in names))
    for lang in (*LANGUAGES, ENGLISH):
        print(lang.ljust(10) + "".join(f"{t.languages[lang].fertility:{width}.3f}" for t in report.tokenizers))
    means = {t.name: sum(t.languages[lang].fertility for lang in LANGUAGES) / len(LANGUAGES) for t in report.tokenizers}
    print("mean of 10".ljust(10) + "".join(f"{means[n]:{width}.3f}" for n in names))
    print("÷ own".ljust(10) + "".join(f"{means[n] / own_mean:{width}.3f}" for n in names))
    print()
    print("tokenizer".ljust(width) + "vocab".rjust(10) + "added".rjust(10) + "padded/128".rjust(12)
          + "eng ids same".rjust(14) + "code ids same".rjust(15) + "round trip".rjust(12) + "extend s".rjust(10))
    for t in report.tokenizers:
        m = rows_meta[t.name]
        rt = min(x.round_trip_rate for x in t.languages.values())
        print(t.name.ljust(width) + f"{t.vocab_size:10,}" + (f"{m['added']:10,}" if m["added"] is not None else " " * 10)
              + (f"{m.get('padded', 0):12,}" if m.get("padded") else " " * 12)
              + (f"{100 * m['eng']:13.1f}%" if m["eng"] is not None else " " * 14)
              + (f"{100 * m['code']:14.1f}%" if m["code"] is not None else " " * 15)
              + f"{100 * rt:11.1f}%" + f"{m['seconds']:10.1f}")
    print(f"\nEnglish lines compared: {len(flores)} FLORES dev + {len(code)} Python paragraphs of indicfm's source")
    print("\n".join(notes))
    out = {"own_mean": own_mean, "means": means, "meta": rows_meta,
           "fertility": {t.name: {lang: t.languages[lang].fertility for lang in (*LANGUAGES, ENGLISH)} for t in report.tokenizers}}
    (CACHE / "results.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
