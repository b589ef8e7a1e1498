"""Multiple-choice metrics of the shipped cloze tasks, as lm-eval ``process_results`` functions.

For a document with answer choices c_1..c_n, gold g and the model's log-likelihoods ll_i of each
choice as continuation of the prompt:

* ``acc``: argmax_i ll_i == g;
* ``acc_norm``: argmax_i ll_i / chars(c_i) == g (lm-eval's length normalisation);
* ``acc_bytes``: argmax_i ll_i / bytes(c_i) == g, bytes of the NFC text (what the model reads):
  unlike characters, UTF-8 bytes weigh Indic scripts' combining marks, and unlike tokens they do
  not depend on the tokenizer;
* ``gold_bpb``: the gold continuation's bits per byte, −Σ ll_g / ln 2 / Σ bytes(c_g) over the
  documents (lm-eval's ``bits_per_byte`` aggregation): a smooth signal that moves before accuracy
  leaves chance.

lm-eval computes ``acc``, ``acc_norm`` and ``acc_bytes`` itself when a task has no
``process_results``; a task that also wants ``gold_bpb`` must replace the whole function, hence
this one.  A task file binds it to its choices with :func:`choice_results`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from indicfm.text import normalize


def utf8_bytes(text: str) -> int:
    """Bytes of ``text`` after NFC, as the model reads it."""
    return len(normalize(text).encode("utf-8"))


def choice_scores(choices: Sequence[str], gold: int, results: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """``acc``, ``acc_norm``, ``acc_bytes`` and ``gold_bpb``'s ``(ll, bytes)`` item of one document."""
    lls = np.array([float(r[0]) for r in results])
    chars = np.array([max(len(c), 1) for c in choices], float)
    nbytes = np.array([max(utf8_bytes(c), 1) for c in choices], float)
    return {
        "acc": float(np.argmax(lls) == gold),
        "acc_norm": float(np.argmax(lls / chars) == gold),
        "acc_bytes": float(np.argmax(lls / nbytes) == gold),
        "gold_bpb": (float(lls[gold]), float(nbytes[gold])),
    }


def choice_results(
    choices: Callable[[dict], Sequence[str]], gold: Callable[[dict], int]
) -> Callable[[dict, Sequence[tuple[float, bool]]], dict[str, Any]]:
    """A task's ``process_results(doc, results)`` from its ``doc_to_choice`` and gold index."""

    def process_results(doc: dict, results: Sequence[tuple[float, bool]]) -> dict[str, Any]:
        return choice_scores(choices(doc), gold(doc), results)

    return process_results
