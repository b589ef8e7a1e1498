"""Language-balanced sampling of training documents for the tokenizer.

A corpus of the languages of India is very uneven (here 500 Kannada sentences next to 45,000 English
ones).  Trained on it as is, a tokenizer spends its vocabulary on the big languages and cuts the
small ones into many short pieces.  We therefore draw a sentence budget across languages with a
temperature: language ``l`` with ``n_l`` documents gets a share ``p_l ∝ n_l ** alpha`` (``alpha = 1``
keeps the natural proportions, ``alpha = 0`` gives every language the same budget).

A language never gets more documents than it has: repeating a small language's few sentences
teaches the tokenizer those sentences, not the language (measured: it raised fertility on unseen
text).  What a small language cannot use is handed to the others in proportion to their shares
("water-filling"), so the whole budget is spent whenever the corpus is big enough.

Everything is deterministic: counts come from integer arithmetic with ties broken by language code,
and the documents chosen come from a ``random.Random(seed)`` per language.
"""

from __future__ import annotations

import random
from collections.abc import Mapping


def _proportional(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Split ``total`` units in proportion to ``weights`` exactly (largest remainders get the rest)."""
    weight_sum = sum(weights.values())
    exact = {lang: total * w / weight_sum for lang, w in weights.items()}
    counts = {lang: int(value) for lang, value in exact.items()}
    leftover = total - sum(counts.values())
    by_remainder = sorted(exact, key=lambda lang: (-(exact[lang] - counts[lang]), lang))
    for lang in by_remainder[:leftover]:
        counts[lang] += 1
    return counts


def allocate(available: Mapping[str, int], budget: int, alpha: float) -> dict[str, int]:
    """How many documents to take from each language: ``p ∝ n ** alpha``, capped at ``n``, summing to
    ``min(budget, total available)``.

    >>> allocate({"a": 100, "b": 25}, budget=60, alpha=0.5)  # weights 10 : 5
    {'a': 40, 'b': 20}
    >>> allocate({"a": 100, "b": 10}, budget=60, alpha=0.0)  # b is capped at 10, a gets the rest
    {'a': 50, 'b': 10}
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    counts = {lang: 0 for lang in available}
    open_langs = {lang: n for lang, n in available.items() if n > 0}
    left = min(budget, sum(open_langs.values()))
    while open_langs and left > 0:
        share = _proportional({lang: n**alpha for lang, n in open_langs.items()}, left)
        capped = {lang for lang, k in share.items() if k >= open_langs[lang]}
        if not capped:
            for lang, k in share.items():
                counts[lang] += k
            break
        # Languages that can't use their share take everything they have; the rest is re-split.
        for lang in sorted(capped):
            everything = open_langs.pop(lang)
            counts[lang] = everything
            left -= everything
    return counts


def choose_indices(available: int, take: int, seed: int, lang: str) -> set[int]:
    """Which of a language's ``available`` documents (0-based, in reading order) to keep.

    Seeded by ``(seed, lang)``, so adding a language does not change the others' choice.
    """
    if take >= available:
        return set(range(available))
    rng = random.Random(f"{seed}:{lang}")
    return set(rng.sample(range(available), take))
