"""Minimal pairs from parallel held-out lines: the offline task ``flores_pairs``'s items.

Each item is one held-out line (the shipped ``samples/heldout/<lang>.dev``: FLORES-200 dev, CC-BY-SA
4.0) and the same line with two neighbouring words swapped.  A language model that reads the
language gives the real sentence the higher log-likelihood, so the gold answer is always right and
needs no human label; both sentences have the same characters, so neither the length nor the byte
count favours either one.  Item ``k`` is line ``k`` in every language (the lines are parallel), so
languages are compared on the same content.  The items are built when the task loads, from the
held-out files the package already ships, rather than shipped a second time.

The swap position is deterministic and language-independent where word counts allow: item ``k``
takes the fraction ``f_k`` (the fractional part of ``(k + 1) x`` the golden ratio, spread evenly over
[0, 1) without a random generator) of the sentence's candidate positions, so the swap sits at the
same relative place in every language.  The last word never moves (it carries the sentence-final
punctuation, which would make the swap trivially visible), and a pair of identical words is passed
over for the next position (swapping them would change nothing).

Text is normalised once, to NFC (``indicfm.text.normalize``; ZWJ/ZWNJ are kept: they are not
whitespace, so they stay inside their words), and stripped of leading and trailing whitespace;
the whitespace between words is kept as it is.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from indicfm.text import normalize

GOLDEN = (math.sqrt(5) - 1) / 2
WORD_GAP = re.compile(r"(\s+)")  # keeps the separators, so the whitespace between words survives

def swap_fraction(item: int) -> float:
    """Where in its sentence item ``item`` swaps, as a fraction of the candidate positions."""
    return ((item + 1) * GOLDEN) % 1.0


def minimal_pair(sentence: str, item: int) -> tuple[str, int] | None:
    """(the sentence with words i and i+1 swapped, i), or None when no swap changes it."""
    parts = WORD_GAP.split(sentence)  # word, gap, word, gap, ..., word
    words = parts[0::2]
    candidates = len(words) - 2  # pairs (i, i+1) that leave the last word in place
    if candidates < 1:
        return None
    first = int(swap_fraction(item) * candidates)
    for offset in range(candidates):
        i = (first + offset) % candidates
        if words[i] != words[i + 1]:
            words[i], words[i + 1] = words[i + 1], words[i]
            parts[0::2] = words
            return "".join(parts), i
    return None


def read_lines(path: Path) -> list[str]:
    """The file's lines, NFC-normalised and stripped (the newline ending the file is not a line)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the file
    return [normalize(line).strip() for line in lines]


def parallel_items(heldout: Path) -> dict[str, list[dict]]:
    """Every ``<heldout>/<lang>.dev``'s items: ``{lang: [{"id", "lang", "good", "bad", "swap_at"}]}``.

    An item is kept only if every language has a pair for it, so all languages hold the same items."""
    texts = {path.stem: read_lines(path) for path in sorted(heldout.glob("*.dev"))}
    counts = {len(lines) for lines in texts.values()}
    if len(counts) != 1:
        raise ValueError(f"{heldout}: the .dev files must be parallel (same line count), got {sorted(counts)}")
    pairs = {lang: [minimal_pair(line, k) for k, line in enumerate(lines)] for lang, lines in texts.items()}
    kept = [k for k in range(counts.pop()) if all(pairs[lang][k] is not None for lang in pairs)]
    return {
        lang: [{"id": k, "lang": lang, "good": lines[k], "bad": pairs[lang][k][0], "swap_at": pairs[lang][k][1]}
               for k in kept]
        for lang, lines in texts.items()
    }
