"""Prompt files for `indicfm generate --prompts-file`: language prefixes, blank lines, NFC, errors."""

import pytest

from indicfm.inference.prompts import Prompt, read_prompts_file, script_warning


def test_prompts_file_with_language_prefixes(tmp_path):
    path = tmp_path / "prompts.tsv"
    decomposed = "\u0915\u093c\u0932"  # not NFC: ka + nukta + la
    path.write_text(f"hin_Deva\tभारत की\n\n   \ntam_Taml\tதமிழ்\nno prefix {decomposed}\nnot_a code\tkept whole\n", encoding="utf-8")
    prompts, blank = read_prompts_file(path, default_lang="mar_Deva")
    assert blank == 2
    assert [(p.lang, p.text) for p in prompts[:2]] == [("hin_Deva", "भारत की"), ("tam_Taml", "தமிழ்")]
    import unicodedata

    assert prompts[2].lang == "mar_Deva" and prompts[2].text == unicodedata.normalize("NFC", f"no prefix {decomposed}")
    assert prompts[3].text == "not_a code\tkept whole"  # a first field with a space is not a code
    assert prompts[1].source.endswith(":4")


def test_unknown_language_prefix_names_the_line(tmp_path):
    path = tmp_path / "prompts.tsv"
    path.write_text("hin_Deva\tठीक\nxyz_Abcd\tनहीं\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts.tsv:2: unknown language code 'xyz_Abcd'"):
        read_prompts_file(path)


def test_script_warning():
    assert script_warning(Prompt("hello world", "hin_Deva", "--prompt")) is not None
    assert script_warning(Prompt("भारत की राजधानी", "hin_Deva", "--prompt")) is None
    assert script_warning(Prompt("hello", None, "--prompt")) is None
