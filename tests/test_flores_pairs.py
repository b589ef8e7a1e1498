"""The shipped offline task ``flores_pairs`` (minimal pairs from FLORES-200 dev): its items checked
against the held-out text read independently (unicodedata, str.split), and every task through
lm-eval's own loader and evaluator with a scorer that knows the real sentences."""

from __future__ import annotations

import re
import unicodedata

import pytest

from conftest import REPO

TASK_DIR = REPO / "indicfm" / "evaluation" / "tasks" / "flores_pairs"
HELDOUT = REPO / "samples" / "heldout"
LANGUAGES = sorted(p.stem for p in HELDOUT.glob("*.dev"))


def _items(lang: str) -> list[dict]:
    """The items the task loads (built from the shipped held-out files when it loads)."""
    from indicfm.evaluation.minimal_pairs import parallel_items

    return parallel_items(HELDOUT)[lang]


def _heldout(lang: str) -> list[str]:
    return (HELDOUT / f"{lang}.dev").read_text(encoding="utf-8").split("\n")


def test_every_item_is_its_heldout_sentence_and_one_neighbour_swap_of_it():
    ids = None
    for lang in LANGUAGES:
        items, source = _items(lang), _heldout(lang)
        assert len(items) >= 150, lang  # almost every line makes an item
        if ids is None:
            ids = [item["id"] for item in items]
        assert [item["id"] for item in items] == ids, f"{lang}: not the same items as the other languages"
        for item in items:
            line = source[item["id"]]
            good, bad = item["good"], item["bad"]
            assert good == unicodedata.normalize("NFC", line).strip() and unicodedata.is_normalized("NFC", bad)
            # ZWJ / ZWNJ survive, in both sentences, as often as in the source line
            for mark in ("\u200c", "\u200d"):
                assert good.count(mark) == bad.count(mark) == line.count(mark)
            a, b = good.split(), bad.split()
            assert len(a) == len(b) and a != b
            differ = [i for i in range(len(a)) if a[i] != b[i]]
            assert len(differ) == 2 and differ[1] == differ[0] + 1, (lang, item["id"], differ)
            i = differ[0]
            assert (a[i], a[i + 1]) == (b[i + 1], b[i]) and i + 1 < len(a) - 1  # the last word never moves
            assert re.findall(r"\s+", good) == re.findall(r"\s+", bad)  # the gaps between words kept
            assert sorted(good) == sorted(bad)  # same characters: neither length nor bytes favour one


def test_swaps_sit_at_the_same_relative_place_in_every_language():
    """Item k swaps at the same fraction of its sentence in every language (up to a word, or two
    where a pair of equal words pushed the swap along)."""
    by_item: dict[int, list[float]] = {}
    for lang in LANGUAGES:
        for item in _items(lang):
            words = len(item["good"].split())
            by_item.setdefault(item["id"], []).append((item["swap_at"] + 0.5) / (words - 2))
    spread = [max(v) - min(v) for v in by_item.values()]
    assert sorted(spread)[len(spread) // 2] < 0.2  # median item: within a fifth of the sentence
    assert len({round(min(v), 1) for v in by_item.values()}) >= 8  # and items spread over the sentence


def test_there_is_a_task_for_every_heldout_language_and_the_group_has_them_all():
    import yaml

    tasks = sorted(p.stem for p in TASK_DIR.glob("flores_pairs_*.yaml"))
    assert tasks == [f"flores_pairs_{lang}" for lang in LANGUAGES]
    group = yaml.safe_load((TASK_DIR / "_flores_pairs.yaml").read_text())
    assert group["group"] == "flores_pairs" and sorted(group["task"]) == tasks


def test_every_task_runs_through_lm_eval_and_a_scorer_that_knows_the_sentences_gets_them_all():
    """lm-eval builds the requests (empty context, the two sentences as continuations, gold = 0);
    a model that scores real sentences higher gets accuracy 1.0 on every language and the group."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.model import LM

    from indicfm.evaluation.harness import load_tasks, resolve_tasks

    real = {unicodedata.normalize("NFC", line).strip() for lang in LANGUAGES for line in _heldout(lang)}

    class KnowsTheSentences(LM):
        contexts: set[str] = set()

        def loglikelihood(self, requests):
            self.contexts.update(r.args[0] for r in requests)
            return [(0.0 if r.args[1] in real else -1.0, False) for r in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            raise NotImplementedError

    names = resolve_tasks(["flores_pairs"], None, None)
    lm = KnowsTheSentences()
    out = lm_eval.evaluate(lm=lm, task_dict=load_tasks(names, None, None, 0), limit=3, verbosity="ERROR")
    per_language = {t: r["acc,none"] for t, r in out["results"].items() if t != "flores_pairs"}
    assert sorted(per_language) == [f"flores_pairs_{lang}" for lang in LANGUAGES]
    assert set(per_language.values()) == {1.0} and out["results"]["flores_pairs"]["acc,none"] == 1.0
    assert lm.contexts == {""}
