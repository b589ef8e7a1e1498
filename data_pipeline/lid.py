"""Language identification for languages that share a script.

The script check in :mod:`indicfm.data.filters` rejects an English line in ``hin_Deva.txt`` but
cannot tell Hindi from Marathi or Nepali (all Devanagari), Urdu from Sindhi (Perso-Arabic) or
Bengali from Assamese.  Here a language-ID model that ships inside its pip package (nothing is
downloaded) decides those cases.

Default backend: **pycld2** (Google's CLD2, compiled into the wheel): it covers every language
py3langid does plus Sindhi and Sanskrit, is fast (a few µs per sentence) and deterministic.
**py3langid** (langid.py's model inside the wheel) is available as an alternative.  Accuracy per
language on FLORES-200 dev is printed by ``benchmarks/lid_accuracy.py``.  Neither model knows Bodo,
Dogri, Konkani, Maithili, Manipuri or Santali: for those (and any language the chosen model does not
cover) only the script rules apply.

A document is dropped as ``wrong_language`` only when the model is confident it is *another*
language it covers that is written in the *same* script; an unsure or off-script guess keeps it.
"""

from __future__ import annotations

from functools import lru_cache

from indicfm.text import LANGUAGES, script_of_language

LID_REASON = "wrong_language"

#: FLORES-200 code → the code each backend uses, for languages the backend can identify.
_CLD2_CODES = {
    "asm_Beng": "as",
    "ben_Beng": "bn",
    "guj_Gujr": "gu",
    "hin_Deva": "hi",
    "kan_Knda": "kn",
    "mal_Mlym": "ml",
    "mar_Deva": "mr",
    "npi_Deva": "ne",
    "ory_Orya": "or",
    "pan_Guru": "pa",
    "san_Deva": "sa",
    "snd_Arab": "sd",
    "tam_Taml": "ta",
    "tel_Telu": "te",
    "urd_Arab": "ur",
    "eng_Latn": "en",
}
_PY3LANGID_CODES = {
    code: iso
    for code, iso in _CLD2_CODES.items()
    if code not in ("snd_Arab", "san_Deva")  # not in py3langid's model
}
BACKEND_CODES = {"pycld2": _CLD2_CODES, "py3langid": _PY3LANGID_CODES}


@lru_cache(maxsize=None)
def shares_script(lang: str) -> bool:
    """True when another known language is written in ``lang``'s script (so LID is needed)."""
    script = script_of_language(lang)
    return any(other != lang and info.script == script for other, info in LANGUAGES.items())


class LanguageIdentifier:
    """``predict(text) -> (FLORES-200 code or None, confidence in [0, 1])`` with one backend."""

    def __init__(self, backend: str = "pycld2"):
        if backend not in BACKEND_CODES:
            raise ValueError(f"unknown LID backend {backend!r}; choose one of {', '.join(BACKEND_CODES)}")
        self.backend = backend
        self._to_flores = {iso: code for code, iso in BACKEND_CODES[backend].items()}
        if backend == "py3langid":
            from py3langid.langid import MODEL_FILE, LanguageIdentifier as _Py3

            self._py3 = _Py3.from_model_file(MODEL_FILE, norm_probs=True)

    def covers(self, lang: str) -> bool:
        return lang in BACKEND_CODES[self.backend]

    def predict(self, text: str) -> tuple[str | None, float]:
        if self.backend == "pycld2":
            import pycld2

            try:
                reliable, _, details = pycld2.detect(text)
            except pycld2.error:  # e.g. text CLD2 considers invalid; treat as unknown
                return None, 0.0
            if not reliable:
                return None, 0.0
            _, iso, percent, _ = details[0]
            return self._to_flores.get(iso), percent / 100.0
        iso, prob = self._py3.classify(text)
        return self._to_flores.get(iso), float(prob)


@lru_cache(maxsize=None)
def get_identifier(backend: str) -> LanguageIdentifier:
    """One identifier per process (py3langid's model takes ~0.5 s to load)."""
    return LanguageIdentifier(backend)


def lid_reason(
    text: str, lang: str, identifier: LanguageIdentifier, min_confidence: float, min_chars: int = 0
) -> str | None:
    """``wrong_language`` when ``text`` is confidently another same-script language, else None.

    Texts shorter than ``min_chars`` are not judged: on a few words the models guess.
    """
    if len(text) < min_chars or not shares_script(lang) or not identifier.covers(lang):
        return None
    predicted, confidence = identifier.predict(text)
    return lid_verdict(lang, predicted, confidence, min_confidence)


def lid_verdict(lang: str, predicted: str | None, confidence: float, min_confidence: float) -> str | None:
    """``wrong_language`` when a prediction for a ``lang`` document means dropping it: another
    language in the same script, at least ``min_confidence`` sure.  (Also what ``data review``
    re-applies to the predictions stored in the features file.)"""
    if predicted is None or predicted == lang or confidence < min_confidence:
        return None
    if script_of_language(predicted) != script_of_language(lang):
        return None
    return LID_REASON
