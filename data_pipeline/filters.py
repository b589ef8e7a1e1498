"""Quality and script-purity filters: the cheap per-document checks after reading.

Each check returns the name of the rule a document breaks, or ``None``.  They run in this order
(cheapest and broadest first), and the first failing rule is the document's drop reason:
``too_short``, ``too_many_symbols``, ``repeated_lines``, ``repeated_ngrams``, then ``wrong_script``.
Thresholds come from :class:`data_pipeline.config.FilterConfig` (defaults and their sources are
documented there), overridable per language.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import regex

from data_pipeline.config import DataConfig, FilterConfig
from indicfm.text import is_known_language, script_of_language, script_share

QUALITY_REASONS = ("too_short", "too_many_symbols", "repeated_lines", "repeated_ngrams")
SCRIPT_REASON = "wrong_script"

_NON_SPACE = regex.compile(r"\S")
_LETTER = regex.compile(r"[\p{L}\p{M}]")


def filters_for(config: DataConfig, lang: str) -> FilterConfig:
    """The global filter thresholds with ``lang``'s overrides (only the keys it sets) applied."""
    override = config.language_filters.get(lang)
    if override is None:
        return config.filters
    return config.filters.model_copy(update=override.model_dump(exclude_unset=True))


def non_letter_ratio(text: str) -> float:
    """Share of non-space characters that are not letters or combining marks (0 for blank text)."""
    non_space = len(_NON_SPACE.findall(text))
    if non_space == 0:
        return 0.0
    return 1.0 - len(_LETTER.findall(text)) / non_space


def duplicate_line_fraction(text: str) -> float:
    """Share of a document's non-blank lines that repeat an earlier line (0 for one-line documents)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def top_ngram_fraction(words: Sequence[str], n: int) -> float:
    """Characters in all occurrences of the most frequent word n-gram / all word characters.

    Only n-grams that occur at least twice count: in a one-sentence document every n-gram is "the
    most frequent" once, which would flag every short text (Gopher's rule assumes long pages).
    """
    total = sum(map(len, words))
    if total == 0 or len(words) < n + 1:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / total


def duplicate_ngram_fraction(words: Sequence[str], n: int) -> float:
    """Characters of the words covered by any word n-gram that occurs more than once / all."""
    total = sum(map(len, words))
    if total == 0 or len(words) < n + 1:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered) if c) / total


def quality_reason(text: str, f: FilterConfig) -> str | None:
    """First quality rule ``text`` breaks, or None."""
    words = text.split()
    if len(words) < f.min_words:
        return "too_short"
    if non_letter_ratio(text) > f.max_non_letter_ratio:
        return "too_many_symbols"
    if duplicate_line_fraction(text) > f.max_duplicate_line_fraction:
        return "repeated_lines"
    # Without a repeated word no n-gram can repeat (a cheap exit for most sentences).
    if len(words) >= f.repetition_min_words and len(set(words)) < len(words):
        for n, limit in f.max_top_ngram_fraction.items():
            if top_ngram_fraction(words, n) > limit:
                return "repeated_ngrams"
        for n, limit in f.max_duplicate_ngram_fraction.items():
            if duplicate_ngram_fraction(words, n) > limit:
                return "repeated_ngrams"
    return None


def expected_scripts(lang: str, f: FilterConfig) -> tuple[str, ...]:
    return (script_of_language(lang), *f.extra_scripts)


def script_reason(text: str, lang: str, f: FilterConfig) -> str | None:
    """``wrong_script`` when too few of the letters are in ``lang``'s script(s).

    Unknown languages are not checked (their script is unknown).  A document with no letters at all
    is wrong-script too: nothing in it is in the language's script.
    """
    if not is_known_language(lang):
        return None
    in_script = total = 0
    for script in expected_scripts(lang, f):
        hit, total = script_share(text, script)
        in_script += hit
    if total == 0 or in_script / total < f.min_script_share:
        return SCRIPT_REASON
    return None
