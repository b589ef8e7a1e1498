"""Text facts shared by the tokenizer, the data pipeline and evaluation.

Everything that touches raw text goes through :func:`normalize` exactly once, so the tokenizer is
trained, the corpus is prepared and the model is evaluated on identically normalised strings.  We
use NFC and nothing else: NFKC (SentencePiece's default ``nmt_nfkc``) folds compatibility forms and
drops ZERO WIDTH JOINER / NON-JOINER (U+200D / U+200C), which changes the spelling of Malayalam
chillus, Bengali ya-phala, Sinhala conjuncts and more.

Languages are named by FLORES-200 codes (``hin_Deva``: ISO 639-3 language + ISO 15924 script).
Several languages share a script (Hindi, Marathi, Nepali, Maithili, Sanskrit, Konkani and Bodo all
write Devanagari), so a script check can reject a wrong-script document but cannot identify the
language; that is the job of ``indicfm.data.lid``.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import regex

ZWJ = "\u200d"
ZWNJ = "\u200c"


def normalize(text: str) -> str:
    """Return ``text`` in Unicode NFC: the one normalisation indicfm applies anywhere.

    NFC composes canonically equivalent sequences (e.g. a nukta written as a separate mark) so the
    same word always has the same code points, while keeping ZWJ/ZWNJ and compatibility characters
    untouched.
    """
    return unicodedata.normalize("NFC", text)


@dataclass(frozen=True)
class Language:
    code: str  # FLORES-200 code, e.g. "hin_Deva"
    name: str
    script: str  # ISO 15924 code, e.g. "Deva"
    scheduled: bool  # one of the 22 languages of the Eighth Schedule of India's constitution


def _lang(code: str, name: str, scheduled: bool = True) -> Language:
    return Language(code=code, name=name, script=code.split("_", 1)[1], scheduled=scheduled)


#: The 22 scheduled languages (in every script they are commonly written in), related languages
#: found in FLORES-200, and English as the parity reference.
LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in [
        _lang("asm_Beng", "Assamese"),
        _lang("ben_Beng", "Bengali"),
        _lang("brx_Deva", "Bodo"),
        _lang("doi_Deva", "Dogri"),
        _lang("gom_Deva", "Konkani"),
        _lang("guj_Gujr", "Gujarati"),
        _lang("hin_Deva", "Hindi"),
        _lang("kan_Knda", "Kannada"),
        _lang("kas_Arab", "Kashmiri (Perso-Arabic)"),
        _lang("kas_Deva", "Kashmiri (Devanagari)"),
        _lang("mai_Deva", "Maithili"),
        _lang("mal_Mlym", "Malayalam"),
        _lang("mar_Deva", "Marathi"),
        _lang("mni_Beng", "Manipuri (Bengali script)"),
        _lang("mni_Mtei", "Manipuri (Meetei Mayek)"),
        _lang("npi_Deva", "Nepali"),
        _lang("ory_Orya", "Odia"),
        _lang("pan_Guru", "Punjabi"),
        _lang("san_Deva", "Sanskrit"),
        _lang("sat_Olck", "Santali"),
        _lang("snd_Arab", "Sindhi (Perso-Arabic)"),
        _lang("snd_Deva", "Sindhi (Devanagari)"),
        _lang("tam_Taml", "Tamil"),
        _lang("tel_Telu", "Telugu"),
        _lang("urd_Arab", "Urdu"),
        _lang("awa_Deva", "Awadhi", scheduled=False),
        _lang("bho_Deva", "Bhojpuri", scheduled=False),
        _lang("hne_Deva", "Chhattisgarhi", scheduled=False),
        _lang("mag_Deva", "Magahi", scheduled=False),
        _lang("eng_Latn", "English", scheduled=False),
    ]
}

#: Unicode blocks of each script (inclusive code-point ranges).
SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "Deva": ((0x0900, 0x097F), (0xA8E0, 0xA8FF), (0x1CD0, 0x1CFF)),  # + Extended, Vedic extensions
    "Beng": ((0x0980, 0x09FF),),
    "Guru": ((0x0A00, 0x0A7F),),
    "Gujr": ((0x0A80, 0x0AFF),),
    "Orya": ((0x0B00, 0x0B7F),),
    "Taml": ((0x0B80, 0x0BFF),),
    "Telu": ((0x0C00, 0x0C7F),),
    "Knda": ((0x0C80, 0x0CFF),),
    "Mlym": ((0x0D00, 0x0D7F),),
    "Olck": ((0x1C50, 0x1C7F),),
    "Mtei": ((0xABC0, 0xABFF), (0xAAE0, 0xAAFF)),
    "Arab": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "Latn": ((0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F)),
}

#: Characters that several Indic scripts borrow from Devanagari (danda, double danda).
SHARED_INDIC_PUNCTUATION = frozenset("\u0964\u0965")


def _build_script_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for script, ranges in SCRIPT_RANGES.items():
        for lo, hi in ranges:
            for cp in range(lo, hi + 1):
                table.setdefault(cp, script)
    return table


_SCRIPT_OF_CODEPOINT = _build_script_table()


def script_of_char(ch: str) -> str | None:
    """ISO 15924 code of the script block ``ch`` belongs to, or ``None`` (digits, spaces, symbols)."""
    return _SCRIPT_OF_CODEPOINT.get(ord(ch))


@lru_cache(maxsize=None)
def script_letters(script: str) -> tuple[str, ...]:
    """Every assigned letter and combining sign (Unicode categories L* and M*) of ``script``.

    The tokenizer makes these required characters, so no letter of a low-resource language falls
    back to bytes just because the training sample happened not to contain it.
    """
    if script not in SCRIPT_RANGES:
        raise KeyError(f"unknown script {script!r}; known: {', '.join(SCRIPT_RANGES)}")
    chars = []
    for lo, hi in SCRIPT_RANGES[script]:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            if unicodedata.category(ch)[0] in "LM" and unicodedata.name(ch, ""):
                chars.append(ch)
    return tuple(chars)


def language_of_path(path: str | Path) -> str:
    """The language code a file name carries: the name up to its first dot (``hin_Deva.txt``)."""
    return Path(str(path)).name.split(".", 1)[0]  # str(): a gs:// path (UPath) is no os.PathLike


def is_known_language(code: str) -> bool:
    return code in LANGUAGES


def script_of_language(code: str) -> str:
    """Script part of a FLORES-200 code; works for codes not in :data:`LANGUAGES` too."""
    if "_" not in code:
        raise ValueError(f"{code!r} is not a FLORES-200 code like 'hin_Deva'")
    return code.split("_", 1)[1]


_GRAPHEME = regex.compile(r"\X")


def graphemes(text: str) -> list[str]:
    """Extended grapheme clusters of ``text``: for Indic scripts, close to aksharas."""
    return _GRAPHEME.findall(text)


def script_share(text: str, script: str) -> tuple[int, int]:
    """(letters in ``script``, all letters) of ``text``; digits, spaces and punctuation don't count."""
    in_script = total = 0
    for ch in text:
        if not unicodedata.category(ch).startswith(("L", "M")):
            continue
        total += 1
        if _SCRIPT_OF_CODEPOINT.get(ord(ch)) == script:
            in_script += 1
    return in_script, total
