"""Prompts, choices and metrics of the ``indic-core`` tasks (referenced from the YAML files with
``!function utils.<name>``).  Cloze form throughout: the model scores each answer's *text* as the
continuation of the prompt (not a letter), the form that rises above chance early for small models
(FineWeb-2's FineTasks, OLMo's notes).  Metrics: :mod:`indicfm.evaluation.metrics`."""

from __future__ import annotations

from functools import partial

from indicfm.evaluation.metrics import choice_results


# -- Belebele (facebook/belebele): a FLORES passage, a question, four answers ---------------------

def belebele_text(doc: dict) -> str:
    return f"{doc['flores_passage'].strip()}\nQuestion: {doc['question'].strip()}\nAnswer:"


def belebele_choices(doc: dict) -> list[str]:
    return [doc[f"mc_answer{i}"].strip() for i in range(1, 5)]


def belebele_gold(doc: dict) -> int:
    return int(doc["correct_answer_num"]) - 1


belebele_results = choice_results(belebele_choices, belebele_gold)


# -- XStoryCloze (juletxara/xstory_cloze): four sentences, two endings --------------------------

def storycloze_text(doc: dict) -> str:
    return " ".join(doc[f"input_sentence_{i}"].strip() for i in range(1, 5))


def storycloze_choices(doc: dict) -> list[str]:
    return [doc["sentence_quiz1"].strip(), doc["sentence_quiz2"].strip()]


def storycloze_gold(doc: dict) -> int:
    return int(doc["answer_right_ending"]) - 1


storycloze_results = choice_results(storycloze_choices, storycloze_gold)


# -- XCOPA (cambridgeltl/xcopa): premise + "because"/"so", two alternatives ----------------------

COPA_CONNECTORS = {"ta": {"cause": "காரணமாக", "effect": "எனவே"}}  # lm-eval's xcopa_ta words


def copa_text(doc: dict, lang: str) -> str:
    premise = doc["premise"].strip()
    if premise.endswith((".", "।")):
        premise = premise[:-1]
    return f"{premise} {COPA_CONNECTORS[lang][doc['question']]}"


copa_text_ta = partial(copa_text, lang="ta")


def copa_choices(doc: dict) -> list[str]:
    return [doc["choice1"].strip(), doc["choice2"].strip()]


def copa_gold(doc: dict) -> int:
    return int(doc["label"])


copa_results = choice_results(copa_choices, copa_gold)


# -- XNLI (facebook/xnli) and IndicXNLI (Divyanshu/indicxnli): lm-eval's cloze form -------------
# "premise, right? Yes/Also/No, hypothesis" for entailment / neutral / contradiction (label 0/1/2),
# scored with an empty context.  hi, ur, gu: lm-eval's own words; the others are indicfm's renderings
# of the same three phrases.

NLI_WORDS = {
    "hi": ("सही? हाँ", "सही? इसलिए", "सही? नहीं"),
    "ur": ("صحیح? جی ہاں", "صحیح? اس لئے", "صحیح? نہیں"),
    "gu": ("સાચું? હા", "સાચું? તેથી", "સાચું? ના"),
    "bn": ("সঠিক? হ্যাঁ", "সঠিক? তাই", "সঠিক? না"),
    "as": ("শুদ্ধ? হয়", "শুদ্ধ? সেয়েহে", "শুদ্ধ? নহয়"),
    "mr": ("बरोबर? होय", "बरोबर? म्हणून", "बरोबर? नाही"),
    "pa": ("ਸਹੀ? ਹਾਂ", "ਸਹੀ? ਇਸ ਲਈ", "ਸਹੀ? ਨਹੀਂ"),
    "or": ("ଠିକ୍? ହଁ", "ଠିକ୍? ତେଣୁ", "ଠିକ୍? ନା"),
    "ta": ("சரியா? ஆம்", "சரியா? எனவே", "சரியா? இல்லை"),
    "te": ("సరియేనా? అవును", "సరియేనా? కాబట్టి", "సరియేనా? కాదు"),
    "kn": ("ಸರಿಯೇ? ಹೌದು", "ಸರಿಯೇ? ಆದ್ದರಿಂದ", "ಸರಿಯೇ? ಇಲ್ಲ"),
    "ml": ("ശരിയല്ലേ? അതെ", "ശരിയല്ലേ? അതിനാൽ", "ശരിയല്ലേ? അല്ല"),
}


def nli_choices(doc: dict, lang: str) -> list[str]:
    premise, hypothesis = doc["premise"].strip(), doc["hypothesis"].strip()
    return [f"{premise}, {words}, {hypothesis}" for words in NLI_WORDS[lang]]


def nli_gold(doc: dict) -> int:
    return int(doc["label"])


for _lang in NLI_WORDS:
    globals()[f"nli_choices_{_lang}"] = partial(nli_choices, lang=_lang)
    globals()[f"nli_results_{_lang}"] = choice_results(partial(nli_choices, lang=_lang), nli_gold)


# -- Global-PIQA (mrlbenchmarks/global-piqa-nonparallel): a goal, two solutions -----------------

def piqa_choices(doc: dict) -> list[str]:
    return [doc["solution0"].strip(), doc["solution1"].strip()]


def piqa_gold(doc: dict) -> int:
    return int(doc["label"])


piqa_results = choice_results(piqa_choices, piqa_gold)
