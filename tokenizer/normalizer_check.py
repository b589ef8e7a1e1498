"""Does a tokenizer's own normaliser change Indic text that indicfm keeps as it is?

indicfm normalises once, to NFC (:mod:`indicfm.text`): NFKC folds compatibility characters, and
dropping ZERO WIDTH JOINER / NON-JOINER (U+200D / U+200C) changes the spelling of Malayalam
chillus, Bengali ya-phala and more.  An open model's tokenizer may do either inside itself
(SentencePiece's default ``nmt_nfkc``; a ``tokenizer.json`` normaliser with ``NFKC``, a ``Replace``
of U+200D, BERT's ``clean_text``, ``StripAccents``, which removes vowel signs and viramas).
indicfm still uses such a tokenizer as it is — its model was trained that way — but says so: a
warning in ``data prepare``, a column in ``tokenizer eval``.

Two views, both reported: the normaliser's structure (the JSON's ``type`` names, searched
recursively, say *which* step does it) and its behaviour on probe strings (which also catches
opaque steps such as a ``Precompiled`` SentencePiece charsmap).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from indicfm.text import ZWJ, ZWNJ


@dataclass(frozen=True)
class NormalizerWarning:
    short: str  # for a table column: "NFKC", "drops ZWJ/ZWNJ", "strips vowel signs"
    detail: str  # a sentence for a log


#: (short, probes that change, sentence): each probe is kept by NFC, changed by the step named.
_CHECKS = (
    ("NFKC", ("\ufb01", "\u2460", "\uff21"),
     "applies compatibility normalisation (NFKC/NFKD): characters like \ufb01, \u2460 and full-width letters change"),
    ("drops ZWJ/ZWNJ", (f"\u0d28\u0d4d{ZWJ}", f"\u0915\u094d{ZWNJ}\u0937"),
     "removes ZERO WIDTH JOINER / NON-JOINER (U+200D / U+200C), which spell Malayalam chillus, "
     "Bengali ya-phala and other conjuncts"),
    ("strips vowel signs", ("\u0915\u093f", "\u0915\u094d\u0937"),
     "removes combining marks (vowel signs, viramas) of Indic scripts"),
)
_ZERO_WIDTH = re.compile(f"[{ZWJ}{ZWNJ}]")


def _structural_causes(node: object) -> dict[str, list[str]]:
    """short label -> normaliser steps (type names) that cause it, searched through the JSON."""
    found: dict[str, list[str]] = {}

    def visit(n: object) -> None:
        if isinstance(n, list):
            for item in n:
                visit(item)
            return
        if not isinstance(n, dict):
            return
        kind = n.get("type")
        if kind in ("NFKC", "NFKD"):
            found.setdefault("NFKC", []).append(n.get("name", kind))
        elif kind == "StripAccents":
            found.setdefault("strips vowel signs", []).append(kind)
        elif kind == "BertNormalizer":
            if n.get("clean_text"):  # removes every format character (Cf), ZWJ/ZWNJ among them
                found.setdefault("drops ZWJ/ZWNJ", []).append("BertNormalizer(clean_text)")
            if n.get("strip_accents") or (n.get("strip_accents") is None and n.get("lowercase")):
                found.setdefault("strips vowel signs", []).append("BertNormalizer(strip_accents)")
        elif kind == "Replace" and _replaces_zero_width(n.get("pattern") or {}, n.get("content", "")):
            found.setdefault("drops ZWJ/ZWNJ", []).append("Replace")
        # "Strip" trims White_Space only, which ZWJ/ZWNJ are not: nothing to report
        for value in n.values():
            visit(value)

    visit(node)
    return found


def _replaces_zero_width(pattern: dict, content: str) -> bool:
    if ZWJ in content or ZWNJ in content:
        return False
    if "String" in pattern:
        return bool(_ZERO_WIDTH.search(pattern["String"]))
    if "Regex" in pattern:
        try:
            return any(re.search(pattern["Regex"], ch) for ch in (ZWJ, ZWNJ))
        except re.error:  # an Oniguruma-only pattern: the probes below still judge it
            return False
    return False


def normalizer_warnings(normalize: Callable[[str], str] | None, structure: object = None) -> list[NormalizerWarning]:
    """What a normaliser does that NFC would not: ``normalize`` applies it (None: there is none),
    ``structure`` is its JSON (a ``tokenizer.json``'s ``normalizer``, or ``{"type": name}``)."""
    causes = _structural_causes(structure)
    warnings = []
    for short, probes, sentence in _CHECKS:
        # a probe "survives" when it is still inside the output: a normaliser may add a prefix
        # or escape spaces (SentencePiece's "▁")
        changed = [p for p in probes if normalize is not None and p not in normalize(p)]
        if not (changed or short in causes):
            continue
        steps = f" ({', '.join(dict.fromkeys(causes[short]))})" if short in causes else ""
        warnings.append(NormalizerWarning(short, f"its normaliser{steps} {sentence}"))
    return warnings


def hf_normalizer_warnings(tokenizer: object) -> list[NormalizerWarning]:
    """:func:`normalizer_warnings` of a ``tokenizers.Tokenizer``."""
    normalizer = tokenizer.normalizer  # type: ignore[attr-defined]
    structure = json.loads(tokenizer.to_str()).get("normalizer")  # type: ignore[attr-defined]
    return normalizer_warnings(normalizer.normalize_str if normalizer is not None else None, structure)


def sentencepiece_normalizer_warnings(processor: object, model_proto: bytes) -> list[NormalizerWarning]:
    """:func:`normalizer_warnings` of a SentencePiece model (its normaliser rule, e.g. ``nmt_nfkc``)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    name = model.normalizer_spec.name or "identity"
    structure = {"type": "NFKC", "name": name} if "nfkc" in name.lower() else {"type": name}
    return normalizer_warnings(processor.normalize, structure)  # type: ignore[attr-defined]
