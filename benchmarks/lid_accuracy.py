"""Language-ID accuracy per language on FLORES-200 dev, for each backend (pycld2, py3langid).

Accuracy = share of a language's FLORES-200 dev lines the model labels with that language.  Also
printed: the share the pipeline would actually drop as ``wrong_language`` with the default
confidence (what matters for data loss: an unsure prediction keeps the document).  Languages the
backend cannot identify are listed as "script rules only".

    python -m benchmarks.lid_accuracy            # all 997 lines per language
    python -m benchmarks.lid_accuracy --quick    # first 200 lines
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from indicfm.data.config import LidConfig
from indicfm.data.lid import LanguageIdentifier, lid_reason, shares_script
from indicfm.text import normalize

FLORES_DEV = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flores200" / "dev"
SAMPLE_DEV = Path(__file__).resolve().parent.parent / "samples" / "heldout"


def _lines(path: Path, limit: int | None) -> list[str]:
    lines = [normalize(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:limit] if limit else lines


def measure(quick: bool = False) -> dict:
    """Nested figures: {"backends": {backend: {"languages": {lang: {...} or "script rules only"}}}}."""
    data_dir = FLORES_DEV if FLORES_DEV.is_dir() else SAMPLE_DEV
    limit = 200 if quick else None
    lid_cfg = LidConfig()
    results: dict = {"data": str(data_dir), "lines_per_language": limit or "all", "backends": {}}
    for backend in ("pycld2", "py3langid"):
        ident = LanguageIdentifier(backend)
        per_lang: dict = {}
        start = time.perf_counter()
        n_total = 0
        for path in sorted(data_dir.glob("*.dev")):
            lang = path.name.split(".")[0]
            if not ident.covers(lang):
                per_lang[lang] = "script rules only"
                continue
            lines = _lines(path, limit)
            n_total += len(lines)
            correct = sum(ident.predict(line)[0] == lang for line in lines)
            dropped = sum(lid_reason(line, lang, ident, lid_cfg.min_confidence, lid_cfg.min_chars) is not None for line in lines)
            per_lang[lang] = {
                "accuracy": round(correct / len(lines), 4),
                "dropped_as_wrong_language": round(dropped / len(lines), 4),
                "lid_applied": shares_script(lang),
                "lines": len(lines),
            }
        elapsed = time.perf_counter() - start
        results["backends"][backend] = {"languages": per_lang, "lines_per_s": round(2 * n_total / elapsed)}
    return results


def run(quick: bool = False) -> dict:
    """Flat figures for ``benchmarks.run``: accuracy per backend and language, and pycld2's drop rate."""
    res = measure(quick)
    flat: dict = {"data": res["data"]}
    for backend, b in res["backends"].items():
        for lang, v in b["languages"].items():
            flat[f"{backend} {lang}"] = v["accuracy"] if isinstance(v, dict) else v
            if backend == "pycld2" and isinstance(v, dict) and v["lid_applied"]:
                flat[f"{backend} {lang} dropped_as_wrong_language"] = v["dropped_as_wrong_language"]
        flat[f"{backend} lines_per_s"] = b["lines_per_s"]
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    res = measure(quick=args.quick)
    print(f"LID accuracy on {res['data']} (lines per language: {res['lines_per_language']})")
    backends = list(res["backends"])
    print(f"{'language':<10}" + "".join(f"{b + ' acc':>16}{'drop':>8}" for b in backends))
    langs = sorted({lang for b in backends for lang in res["backends"][b]["languages"]})
    for lang in langs:
        row = f"{lang:<10}"
        for b in backends:
            v = res["backends"][b]["languages"].get(lang)
            if isinstance(v, dict):
                drop = f"{v['dropped_as_wrong_language']:.1%}" if v["lid_applied"] else "n/a"
                row += f"{v['accuracy']:>16.1%}{drop:>8}"
            else:
                row += f"{'script only':>16}{'':>8}"
        print(row)
    for b in backends:
        print(f"{b}: {res['backends'][b]['lines_per_s']} lines/s (2 predictions per line)")


if __name__ == "__main__":
    main()
