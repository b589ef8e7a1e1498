"""Shared by the Ray engine's tests: a corpus whose duplicates cross files, shards and languages,
and the check that two token caches are the same (import as ``from prepare_checks import ...``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from indicfm.data.cache import read_metadata, read_rows
from indicfm.data.testing import make_injected_corpus

#: Files of a cache that must be byte-identical between engines.
SAME_FILES = ("report.json", "examples.json", "dropped.tsv", "metadata.json")


def _mutate(text: str, rng: random.Random) -> str:
    """``text`` with one character replaced (a near duplicate of it for long enough lines)."""
    i = rng.randrange(len(text))
    return text[:i] + rng.choice("कखगघचछजझ") + text[i + 1 :]


def make_crossing_corpus(sample_dir: Path, out_dir: Path) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """The injected corpus (indicfm.data.testing) plus a JSON-lines file, last in input order, of
    copies of earlier lines of other files: exact copies, whitespace variants, and chains of
    one-character mutations (each a near duplicate of the one before, not necessarily of the
    first: which ones are kept depends on what was kept before them), plus malformed records.

    Returns ((file, line) of an exact copy, (file, line) of its original) for each exact copy: the
    original is in another file (so another shard, and with two nodes perhaps another node)."""
    make_injected_corpus(sample_dir, out_dir, huge_line_bytes=1 << 16)
    rng = random.Random(18)
    hin = (sample_dir / "hin_Deva.txt").read_text(encoding="utf-8").splitlines()
    mar = (sample_dir / "mar_Deva.txt").read_text(encoding="utf-8").splitlines()
    lines: list[tuple[str, tuple | None]] = []  # (JSON line, (file, line) of the original of an exact copy)
    long_lines = [x for x in hin + mar if len(x) > 120]
    # originals spread over both files' whole length: many shards (and, on a cluster, both nodes)
    for k, line in enumerate(long_lines[:: max(len(long_lines) // 24, 1)][:24]):
        lang = "hin_Deva" if line in hin else "mar_Deva"
        original = (f"{lang}.txt", (hin if lang == "hin_Deva" else mar).index(line) + 1)
        if k % 3 == 0:
            lines.append((json.dumps({"text": line, "lang": lang}, ensure_ascii=False), original))
        elif k % 3 == 1:
            variant = "  " + line.replace(" ", "  ")
            lines.append((json.dumps({"text": variant, "lang": lang}, ensure_ascii=False), original))
        else:
            text = line
            for _ in range(4):  # a chain of near duplicates
                text = _mutate(text, rng)
                lines.append((json.dumps({"text": text, "lang": lang}, ensure_ascii=False), None))
    lines.insert(5, ('{"text": "no language"}', None))
    lines.insert(9, ("not json at all", None))
    (out_dir / "zz_copies.jsonl").write_text("".join(x + "\n" for x, _ in lines), encoding="utf-8")
    return [(("zz_copies.jsonl", n), original) for n, (_, original) in enumerate(lines, start=1) if original]


def assert_same_cache(reference: Path, other: Path) -> None:
    """Every array, report, example, drop-log line and the metadata are identical."""
    for name in SAME_FILES:
        assert (other / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs"
    info = read_metadata(reference)
    assert read_metadata(other).languages == info.languages
    assert sorted(p.name for p in (other / "rows").iterdir()) == sorted(info.languages)
    for lang, v in info.languages.items():
        a = read_rows(reference, lang, slice(0, v["rows"]))
        b = read_rows(other, lang, slice(None))
        for name in ("tokens", "segment_ids", "positions"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), f"{lang} {name} differ"
    assert not (other / ".prepare_state").exists()


def drop_reasons(cache: Path) -> dict[tuple[str, int], str]:
    """(file name, line) -> reason, from a cache's dropped.tsv."""
    out = {}
    for row in (cache / "dropped.tsv").read_text(encoding="utf-8").splitlines():
        source, line, _lang, reason = row.split("\t")
        out[(Path(source).name, int(line))] = reason
    return out
