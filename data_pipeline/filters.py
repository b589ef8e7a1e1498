"""Quality and script-purity filters: the cheap per-document checks after reading.

Each check returns the name of the rule a document breaks, or ``None``.  They run in this order
(cheapest and broadest first), and the first failing rule is the document's drop reason:
``too_short``, ``too_many_symbols``, ``repeated_lines``, ``repeated_ngrams``, then ``wrong_script``.
Thresholds come from :class:`indicfm.data.config.FilterConfig` (defaults and their sources are
documented there), overridable per language.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import regex

from indicfm.data.config import DataConfig, FilterConfig
from indicfm.text import SCRIPT_RANGES, is_known_language, script_of_char, script_of_language, script_share

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
    if _repeated_ngrams(words, f):
        return "repeated_ngrams"
    return None


def _repeated_ngrams(words: Sequence[str], f: FilterConfig) -> bool:
    # Without a repeated word no n-gram can repeat (a cheap exit for most documents).
    if len(words) < f.repetition_min_words or len(set(words)) == len(words):
        return False
    for n, limit in f.max_top_ngram_fraction.items():
        if top_ngram_fraction(words, n) > limit:
            return True
    for n, limit in f.max_duplicate_ngram_fraction.items():
        if duplicate_ngram_fraction(words, n) > limit:
            return True
    return False


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


# -- the same checks for a whole batch at once ---------------------------------------------------
#
# Per-character work (is it a letter? which script?) costs ~1 µs per character in a Python loop,
# more than tokenizing the document.  For a batch, all texts become one array of code points and
# the counts come from table look-ups and ``np.add.reduceat``.  The definitions are those of
# ``indicfm.text.script_share`` (letters = Unicode categories L* and M*; script by
# ``SCRIPT_RANGES``); tests compare the two on real text.

_SCRIPT_IDS = {script: i + 1 for i, script in enumerate(SCRIPT_RANGES)}  # 0 = no script
_BMP = 0x10000


@lru_cache(maxsize=1)
def _bmp_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is letter or mark, script id, is whitespace) for every Basic Multilingual Plane code point
    (no code point outside it is whitespace)."""
    letter = np.fromiter((unicodedata.category(chr(cp))[0] in "LM" for cp in range(_BMP)), bool, count=_BMP)
    script = np.zeros(_BMP, np.uint8)
    for name in reversed(SCRIPT_RANGES):  # reversed: the first script listed wins, as in indicfm.text
        for lo, hi in SCRIPT_RANGES[name]:
            if lo < _BMP:
                script[lo : min(hi, _BMP - 1) + 1] = _SCRIPT_IDS[name]
    space = np.fromiter((chr(cp).isspace() for cp in range(_BMP)), bool, count=_BMP)
    return letter, script, space


@lru_cache(maxsize=None)
def _script_mask(scripts: tuple[str, ...]) -> int:
    """Bit ``id`` set for each accepted script id."""
    return sum(1 << _SCRIPT_IDS[s] for s in set(scripts) if s in _SCRIPT_IDS)


@dataclass
class CharStats:
    non_space: np.ndarray  # [docs] characters that are not whitespace
    letters: np.ndarray  # [docs] letters and marks
    in_script: np.ndarray  # [docs] letters in the document's accepted scripts
    words: np.ndarray  # [docs] len(text.split())
    newlines: np.ndarray  # [docs] "\n" characters
    uncollapsed: np.ndarray  # [docs] bool: text != " ".join(text.split())


def char_stats(texts: Sequence[str], accepted_scripts: Sequence[tuple[str, ...]]) -> CharStats:
    """Counts per document, for all documents of a batch in a few NumPy passes."""
    n = len(texts)
    if n == 0:
        z = np.zeros(0, np.int64)
        return CharStats(z, z, z, z, z, np.zeros(0, bool))
    lengths = np.fromiter((len(t) for t in texts), np.int64, count=n)
    cps = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)
    letter_tab, script_tab, space_tab = _bmp_tables()
    outside = np.nonzero(cps >= _BMP)[0]  # rare: emoji, historic scripts, CJK extensions
    safe = cps if not len(outside) else np.where(cps < _BMP, cps, 0)
    is_letter = letter_tab[safe]
    script_id = script_tab[safe]
    is_space = space_tab[safe]
    for i in outside:
        ch = chr(int(cps[i]))
        is_letter[i] = unicodedata.category(ch)[0] in "LM"
        sc = script_of_char(ch)
        script_id[i] = _SCRIPT_IDS[sc] if sc else 0
        is_space[i] = False
    masks = [_script_mask(tuple(scripts)) for scripts in accepted_scripts]
    if len(set(masks)) == 1:  # the usual batch: one file, one language
        accepted = np.array([(masks[0] >> i) & 1 for i in range(256)], bool)[script_id]
    else:
        accepted = (np.left_shift(1, script_id.astype(np.int64)) & np.repeat(np.array(masks, np.int64), lengths)) != 0
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    nonempty = lengths > 0

    def per_doc(flags: np.ndarray) -> np.ndarray:
        out = np.zeros(n, np.int64)
        if nonempty.any() and len(flags):
            out[nonempty] = np.add.reduceat(flags, starts[nonempty], dtype=np.int64)
        return out

    # Whitespace as str.split() sees it: a word starts at a non-space after a space or at the
    # document's start; a text is already collapsed when every space is a single U+0020 between
    # two words (no other whitespace, no runs, nothing leading or trailing).
    after_space = np.empty(len(cps), bool)
    after_space[1:] = is_space[:-1]
    after_space[starts[nonempty]] = True
    irregular = is_space & ((cps != 32) | after_space)
    ends = (starts + lengths - 1)[nonempty]
    uncollapsed = per_doc(irregular) > 0
    uncollapsed[nonempty] |= is_space[ends]
    return CharStats(
        per_doc(~is_space), per_doc(is_letter), per_doc(is_letter & accepted),
        per_doc(~is_space & after_space), per_doc(cps == 10), uncollapsed,
    )


#: Batch reasons in the order they apply (index 0: none).
_BATCH_REASONS = (None, "too_short", "too_many_symbols", "repeated_lines", "repeated_ngrams", SCRIPT_REASON)


def batch_reasons(texts: Sequence[str], langs: Sequence[str], configs: Sequence[FilterConfig]) -> list[str | None]:
    """:func:`quality_reason` then :func:`script_reason` for every document of a batch."""
    return batch_check(texts, langs, configs)[0]


def batch_check(
    texts: Sequence[str], langs: Sequence[str], configs: Sequence[FilterConfig]
) -> tuple[list[str | None], CharStats]:
    """Each document's first failing rule (as :func:`batch_reasons`), and the batch's
    :class:`CharStats` (callers reuse its word counts and whitespace flags).

    The counting rules are whole-batch array comparisons per (language, thresholds) group; only
    the documents that could break a line or n-gram rule (several lines, or at least
    ``repetition_min_words`` words) are looked at one by one.
    """
    groups: dict[tuple[str, int], list[int]] = {}  # configs are shared objects per language
    if len(set(langs)) == 1 and len(set(map(id, configs))) == 1:  # the usual batch: one file
        groups[(langs[0], id(configs[0]))] = list(range(len(texts)))
    else:
        for i, (lang, f) in enumerate(zip(langs, configs)):
            groups.setdefault((lang, id(f)), []).append(i)
    scripts: list[tuple[str, ...]] = [()] * len(texts)
    for (lang, _), members in groups.items():
        f = configs[members[0]]
        accepted = expected_scripts(lang, f) if is_known_language(lang) else ()
        for i in members:
            scripts[i] = accepted
    stats = char_stats(texts, scripts)
    codes = np.zeros(len(texts), np.int64)
    for (lang, _), members in groups.items():
        f = configs[members[0]]
        idx = np.array(members)
        words, letters = stats.words[idx], stats.letters[idx]
        non_space = stats.non_space[idx]
        symbols = (non_space > 0) & (1.0 - letters / np.maximum(non_space, 1) > f.max_non_letter_ratio)
        lines = np.zeros(len(idx), bool)
        ngrams = np.zeros(len(idx), bool)
        for k in np.flatnonzero(stats.newlines[idx] > 0).tolist():
            lines[k] = duplicate_line_fraction(texts[members[k]]) > f.max_duplicate_line_fraction
        for k in np.flatnonzero(words >= f.repetition_min_words).tolist():
            ngrams[k] = _repeated_ngrams(texts[members[k]].split(), f)
        script = np.zeros(len(idx), bool)
        if is_known_language(lang):
            script = (letters == 0) | (stats.in_script[idx] / np.maximum(letters, 1) < f.min_script_share)
        rules = [words < f.min_words, symbols, lines, ngrams, script]  # in _BATCH_REASONS order
        codes[idx] = np.select(rules, range(1, len(rules) + 1), 0)
    return [_BATCH_REASONS[c] for c in codes.tolist()], stats
