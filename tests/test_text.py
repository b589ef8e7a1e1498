"""indicfm.text: NFC normalisation keeps ZWJ/ZWNJ; script tables; language codes."""

import unicodedata

from indicfm import text


def test_normalize_is_nfc_and_keeps_joiners():
    # Malayalam chillu written with ZWJ, Bengali ya-phala with ZWNJ: must survive.
    samples = ["\u0d28\u0d4d\u200d", "\u09b0\u200c\u09cd\u09af", "क\u093c"]  # last: ka + nukta
    for s in samples:
        out = text.normalize(s)
        assert out == unicodedata.normalize("NFC", s)
        assert out.count("\u200d") == s.count("\u200d") and out.count("\u200c") == s.count("\u200c")
    # U+0958 (QA) is a composition exclusion: NFC writes it as KA + NUKTA, so both spellings meet.
    assert text.normalize("\u0958") == "\u0915\u093c" == text.normalize("क\u093c")


def test_script_letters_cover_known_letters():
    assert "क" in text.script_letters("Deva") and "\u094d" in text.script_letters("Deva")  # virama
    assert "ണ" in text.script_letters("Mlym")
    assert "ᱚ" in text.script_letters("Olck")
    assert "0" not in text.script_letters("Deva")


def test_language_of_path_and_scripts():
    assert text.language_of_path("/x/hin_Deva.txt") == "hin_Deva"
    assert text.language_of_path("tam_Taml.dev") == "tam_Taml"
    assert text.is_known_language("sat_Olck") and not text.is_known_language("xxx_Yyyy")
    assert sum(lang.scheduled for lang in text.LANGUAGES.values()) >= 22
    assert text.script_share("नमस्ते hello", "Deva") == (6, 11)


def test_graphemes_are_aksharas():
    assert text.graphemes("क्षि") == ["क्षि"]
    assert len(text.graphemes("नमस्ते")) == 3
