"""Prompts for ``indicfm generate``: from the command line or a file, each with its language.

A prompts file has one prompt per line, optionally prefixed by a FLORES-200 code and a tab
(``hin_Deva<TAB>भारत की``); blank lines are skipped (and counted).  A prompt whose letters are
mostly not in its language's script gets a warning (it still runs): a Latin-script prompt under
``--lang hin_Deva`` is usually a mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from indicfm.text import LANGUAGES, normalize, script_of_language, script_share


@dataclass
class Prompt:
    text: str  # NFC-normalised
    lang: str | None
    source: str  # "--prompt" or "FILE:LINE", for messages


def check_language(code: str | None) -> None:
    if code is not None and code not in LANGUAGES:
        raise ValueError(f"unknown language code {code!r}; use a FLORES-200 code such as hin_Deva")


def script_warning(prompt: Prompt, min_share: float = 0.5) -> str | None:
    """A warning when under half of the prompt's letters are in its language's script."""
    if prompt.lang is None:
        return None
    in_script, letters = script_share(prompt.text, script_of_language(prompt.lang))
    if letters and in_script / letters < min_share:
        return f"{prompt.source}: only {in_script} of {letters} letters are in the {prompt.lang} script"
    return None


def read_prompts_file(path: str | Path, default_lang: str | None = None) -> tuple[list[Prompt], int]:
    """``(prompts, blank lines skipped)``; an unknown language prefix is an error naming the line."""
    path = Path(path)
    prompts, blank = [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        lang, text = default_lang, line
        head, sep, rest = line.partition("\t")
        if sep and "_" in head and " " not in head:
            if head not in LANGUAGES:
                raise ValueError(f"{path}:{number}: unknown language code {head!r} before the tab")
            lang, text = head, rest
        text = normalize(text).strip()
        if not text:
            blank += 1
            continue
        prompts.append(Prompt(text, lang, f"{path}:{number}"))
    return prompts, blank
