"""Language identification only decides between languages of the same script."""

from pathlib import Path

import pytest

from indicfm.data.lid import LanguageIdentifier, lid_reason, shares_script


def _first_long(path: Path, n: int = 80) -> str:
    return next(line for line in path.read_text(encoding="utf-8").splitlines() if len(line) >= n)


def test_shares_script():
    assert shares_script("hin_Deva") and shares_script("urd_Arab") and shares_script("ben_Beng")
    assert not shares_script("tam_Taml") and not shares_script("guj_Gujr")


# py3langid's probabilities are less peaked than CLD2's percentages.
@pytest.mark.parametrize("backend, confidence", [("pycld2", 0.9), ("py3langid", 0.5)])
def test_marathi_in_a_hindi_file_is_wrong_language(sample_train_dir, backend, confidence):
    ident = LanguageIdentifier(backend)
    mar = _first_long(sample_train_dir / "mar_Deva.txt")
    hin = _first_long(sample_train_dir / "hin_Deva.txt")
    assert lid_reason(mar, "hin_Deva", ident, confidence) == "wrong_language"
    assert lid_reason(hin, "hin_Deva", ident, confidence) is None
    assert lid_reason(mar, "hin_Deva", ident, confidence, min_chars=10_000) is None  # too short to judge


def test_uncovered_language_and_other_script_are_not_judged(sample_train_dir):
    ident = LanguageIdentifier("pycld2")
    hin = _first_long(sample_train_dir / "hin_Deva.txt")
    assert not ident.covers("mai_Deva") and not ident.covers("brx_Deva")
    assert lid_reason(hin, "mai_Deva", ident, 0.9) is None  # Maithili: script rules only
    eng = _first_long(sample_train_dir / "eng_Latn.txt", 60)
    assert lid_reason(eng, "hin_Deva", ident, 0.9) is None  # off-script guesses are the script rule's job


def test_sindhi_only_with_pycld2():
    assert LanguageIdentifier("pycld2").covers("snd_Arab")
    assert not LanguageIdentifier("py3langid").covers("snd_Arab")
    with pytest.raises(ValueError, match="fasttext"):
        LanguageIdentifier("fasttext")
