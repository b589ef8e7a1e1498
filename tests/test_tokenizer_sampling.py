"""Language-balanced sampling: counts checked against hand computations of p ∝ n^alpha."""

import pytest

from indicfm.tokenizer.sampling import allocate, choose_indices


def test_counts_follow_power_law_computed_by_hand():
    # alpha = 0.5: weights sqrt(10000)=100, sqrt(2500)=50, sqrt(400)=20, sum 170.
    # Shares of 1000: 588.235, 294.118, 117.647 -> floors 588 + 294 + 117 = 999; the one unit left
    # goes to the largest remainder (c, .647).
    assert allocate({"a": 10000, "b": 2500, "c": 400}, budget=1000, alpha=0.5) == {"a": 588, "b": 294, "c": 118}


def test_alpha_one_keeps_natural_proportions_and_zero_is_equal():
    assert allocate({"a": 300, "b": 100}, budget=100, alpha=1.0) == {"a": 75, "b": 25}
    assert allocate({"a": 300, "b": 100}, budget=100, alpha=0.0) == {"a": 50, "b": 50}


def test_small_language_is_capped_not_repeated_and_rest_redistributed():
    # Equal shares would be 300 each; c only has 50, the other 250 go to a and b equally.
    assert allocate({"a": 1000, "b": 1000, "c": 50}, budget=900, alpha=0.0) == {"a": 425, "b": 425, "c": 50}
    # alpha = 0.5 after the cap: a and b (n = 900 and 100) split 400 as 30 : 10.
    assert allocate({"a": 900, "b": 100, "c": 10}, budget=410, alpha=0.5) == {"a": 300, "b": 100, "c": 10}


def test_budget_above_corpus_takes_everything_and_empty_language_gets_nothing():
    assert allocate({"a": 7, "b": 3, "c": 0}, budget=1000, alpha=0.3) == {"a": 7, "b": 3, "c": 0}


def test_negative_budget_rejected():
    with pytest.raises(ValueError):
        allocate({"a": 1}, budget=-1, alpha=0.3)


def test_choice_is_seeded_deterministic_and_without_repetition():
    first = choose_indices(1000, 100, seed=0, lang="hin_Deva")
    assert first == choose_indices(1000, 100, seed=0, lang="hin_Deva")
    assert len(first) == 100 and all(0 <= i < 1000 for i in first)
    assert first != choose_indices(1000, 100, seed=1, lang="hin_Deva")
    assert first != choose_indices(1000, 100, seed=0, lang="tam_Taml")
    assert choose_indices(5, 10, seed=0, lang="x") == {0, 1, 2, 3, 4}
