"""Quality and script filters against hand-computed values."""

import pytest

from indicfm.data.config import DataConfig, FilterConfig
from indicfm.data.filters import (
    duplicate_line_fraction,
    duplicate_ngram_fraction,
    filters_for,
    non_letter_ratio,
    quality_reason,
    script_reason,
    top_ngram_fraction,
)


def test_non_letter_ratio_counts_marks_as_letters():
    # "नमस्ते" is 6 code points, letters and combining marks; "123!" is 4 non-letters.
    assert non_letter_ratio("नमस्ते 123!") == pytest.approx(4 / 10)
    assert non_letter_ratio("   ") == 0.0


def test_duplicate_line_fraction():
    assert duplicate_line_fraction("a\nb\na\na") == pytest.approx(2 / 4)
    assert duplicate_line_fraction("one line") == 0.0


def test_top_ngram_fraction_only_counts_repeats():
    words = "a bb a bb c".split()  # "a bb" twice: 2 * 3 chars of 7
    assert top_ngram_fraction(words, 2) == pytest.approx(6 / 7)
    assert top_ngram_fraction("x yy zzz".split(), 2) == 0.0  # nothing repeats


def test_duplicate_ngram_fraction_covers_every_repeated_occurrence():
    words = "p q r s t p q r s t u".split()  # 5-gram "p q r s t" twice: 10 of 11 chars
    assert duplicate_ngram_fraction(words, 5) == pytest.approx(10 / 11)
    assert duplicate_ngram_fraction(words, 6) == 0.0


def test_quality_reasons_in_order():
    f = FilterConfig()
    assert quality_reason("एक दो", f) == "too_short"
    assert quality_reason("१२ ३४ ५६ ७८ %% ९० आ", f) == "too_many_symbols"
    assert quality_reason("\n".join(["यह एक पंक्ति है"] * 3 + ["दूसरी पंक्ति यहाँ है"]), f) == "repeated_lines"
    assert quality_reason(" ".join(["सच", "में", "बहुत", "अच्छा", "है"] * 12), f) == "repeated_ngrams"
    assert quality_reason("सोमवार को वैज्ञानिकों ने एक नए उपकरण की घोषणा की।", f) is None


def test_repetition_rules_skip_single_sentences():
    # A 20-word sentence repeating a 2-gram: Gopher's top-2-gram rule would flag it; we don't.
    s = "रोमन कैथोलिक देश में रोमन कैथोलिक चर्च ने इस पर विचार किया और फिर से विचार करने का निर्णय लिया गया"
    assert top_ngram_fraction(s.split(), 2) > FilterConfig().max_top_ngram_fraction[2]
    assert quality_reason(s, FilterConfig()) is None


def test_script_reason():
    f = FilterConfig()
    assert script_reason("This is English text in a Hindi file.", "hin_Deva", f) == "wrong_script"
    assert script_reason("यह हिंदी वाक्य है जिसमें कुछ English शब्द हैं", "hin_Deva", f) is None
    assert script_reason("১২৩ ৪৫৬", "ben_Beng", f) == "wrong_script"  # no letters at all
    assert script_reason("anything", "unknown", f) is None
    latin_ok = f.model_copy(update={"extra_scripts": ["Latn"]})
    assert script_reason("English in a Hindi file", "hin_Deva", latin_ok) is None


def test_per_language_overrides_only_the_given_keys():
    cfg = DataConfig.model_validate({"filters": {"min_words": 4}, "language_filters": {"san_Deva": {"max_non_letter_ratio": 0.9}}})
    san = filters_for(cfg, "san_Deva")
    assert san.max_non_letter_ratio == 0.9 and san.min_words == 4  # global value kept
    assert filters_for(cfg, "hin_Deva").max_non_letter_ratio == FilterConfig().max_non_letter_ratio


def test_batch_path_equals_per_document_path(sample_train_dir):
    """The vectorised batch checks give what indicfm.text.script_share and the per-document
    functions give, on real text of every shipped language."""
    from indicfm.data.filters import batch_reasons, char_stats, expected_scripts
    from indicfm.text import normalize, script_share

    f = FilterConfig()
    for path in sorted(sample_train_dir.glob("*.txt")):
        lang = path.name.split(".")[0]
        texts = [normalize(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()][:150]
        texts += ["English words only here", "१२३ ४५६ ७८९", "mixed हिंदी text 😀 𑀅"]
        texts += _awkward_documents(texts[:40])
        stats = char_stats(texts, [expected_scripts(lang, f)] * len(texts))
        ref = [script_share(t, lang.split("_")[1]) for t in texts]
        assert stats.in_script.tolist() == [r[0] for r in ref], lang
        assert stats.letters.tolist() == [r[1] for r in ref], lang
        assert stats.words.tolist() == [len(t.split()) for t in texts], lang
        assert stats.newlines.tolist() == [t.count("\n") for t in texts], lang
        assert stats.uncollapsed.tolist() == [t != " ".join(t.split()) for t in texts], lang
        per_doc = [quality_reason(t, f) or script_reason(t, lang, f) for t in texts]
        assert batch_reasons(texts, [lang] * len(texts), [f] * len(texts)) == per_doc, lang


def _awkward_documents(lines: list[str]) -> list[str]:
    """Whitespace and repetition cases for the batch path: leading, trailing, tab, runs, other
    Unicode spaces, a blank text, repeated lines, repeated n-grams in a long text."""
    a, b, c = lines[0], lines[1], lines[2]
    long_repeat = " ".join([a] * 12)
    return [
        " " + a, a + " ", a.replace(" ", "\t", 1), a.replace(" ", "  ", 1), a.replace(" ", "\u00a0", 1),
        a.replace(" ", "\u2003 ", 1), "   ", "", "\n".join([a, b, a, a]), "\n".join([a, b, c]), a + "\n",
        long_repeat, " ".join(lines[:12]), "\n".join([long_repeat, b]),
    ]
