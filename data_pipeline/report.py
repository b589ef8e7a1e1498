"""Per-language accounting of every document: in, kept, tokens, dropped by reason; and examples.

``report.json`` has exactly the shape::

    {"languages": {LANG: {"docs_in": int, "docs_kept": int, "tokens": int, "dropped": {REASON: int}}}}

with ``docs_in == docs_kept + sum(dropped.values())`` for every language (checked before writing).
``examples.json`` keeps the first few dropped documents per reason for ``indicfm data inspect``;
``dropped.tsv`` lists every dropped document (source, line, language, reason).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from indicfm.data.sources import READ_REASONS
from indicfm.data.filters import QUALITY_REASONS, SCRIPT_REASON
from indicfm.data.lid import LID_REASON

#: Every drop reason in the order the pipeline checks them (a document gets the first that applies).
DROP_REASONS = (
    *READ_REASONS,
    *QUALITY_REASONS,
    SCRIPT_REASON,
    LID_REASON,
    "exact_duplicate",
    "near_duplicate",
)
REPORT_FILE = "report.json"
EXAMPLES_FILE = "examples.json"
#: Every dropped document, one line each: source, line, language, reason (tab-separated; see
#: :func:`drop_log_line`).  Both engines write it, so it is named and formatted here once.
DROP_LOG = "dropped.tsv"
#: Characters of a dropped document a report example keeps (see :meth:`Report.dropped`).
EXAMPLE_CHARS = 300


@dataclass
class LanguageCounts:
    docs_in: int = 0
    docs_kept: int = 0
    tokens: int = 0
    dropped: Counter = field(default_factory=Counter)


class Report:
    def __init__(self, examples_per_reason: int = 5):
        self.languages: dict[str, LanguageCounts] = defaultdict(LanguageCounts)
        self.examples: dict[str, list[dict]] = defaultdict(list)
        self.examples_per_reason = examples_per_reason

    def kept(self, lang: str, tokens: int) -> None:
        counts = self.languages[lang]
        counts.docs_in += 1
        counts.docs_kept += 1
        counts.tokens += tokens

    def kept_many(self, lang: str, docs: int, tokens: int) -> None:
        """:meth:`kept` for ``docs`` documents of ``lang`` with ``tokens`` tokens in all."""
        counts = self.languages[lang]
        counts.docs_in += docs
        counts.docs_kept += docs
        counts.tokens += tokens

    def wants_example(self, reason: str) -> bool:
        """Would :meth:`dropped` keep the text of a document dropped for ``reason``?"""
        return len(self.examples[reason]) < self.examples_per_reason

    def dropped(self, lang: str, reason: str, source: str, line: int, text: str) -> None:
        counts = self.languages[lang]
        counts.docs_in += 1
        counts.dropped[reason] += 1
        if self.wants_example(reason):
            self.examples[reason].append(
                {"lang": lang, "source": source, "line": line, "text": text[:EXAMPLE_CHARS]}
            )

    def totals(self) -> LanguageCounts:
        total = LanguageCounts()
        for c in self.languages.values():
            total.docs_in += c.docs_in
            total.docs_kept += c.docs_kept
            total.tokens += c.tokens
            total.dropped.update(c.dropped)
        return total

    def to_dict(self) -> dict:
        out = {}
        for lang in sorted(self.languages):
            c = self.languages[lang]
            if c.docs_in != c.docs_kept + sum(c.dropped.values()):
                raise AssertionError(f"report for {lang} does not add up: {c}")
            dropped = {r: c.dropped[r] for r in DROP_REASONS if c.dropped.get(r)}
            out[lang] = {"docs_in": c.docs_in, "docs_kept": c.docs_kept, "tokens": c.tokens, "dropped": dropped}
        return {"languages": out}

    def state(self) -> dict:
        return {"report": self.to_dict(), "examples": dict(self.examples)}

    @classmethod
    def from_state(cls, state: dict, examples_per_reason: int) -> "Report":
        report = cls(examples_per_reason)
        for lang, c in state["report"]["languages"].items():
            report.languages[lang] = LanguageCounts(c["docs_in"], c["docs_kept"], c["tokens"], Counter(c["dropped"]))
        for reason, items in state["examples"].items():
            report.examples[reason] = list(items)
        return report

    def save(self, directory: Path) -> None:
        from indicfm.data.cache import write_json_atomic

        write_json_atomic(directory / REPORT_FILE, self.to_dict())
        write_json_atomic(directory / EXAMPLES_FILE, dict(self.examples))


def drop_log_line(source: str, line: int, lang: str, reason: str) -> str:
    """One dropped document's line of :data:`DROP_LOG`: one format, so that the local and the Ray
    engine's logs of the same run are the same bytes."""
    return f"{source}\t{line}\t{lang}\t{reason}\n"


def render_table(report: dict, console) -> None:
    """Print the per-language table (documents in/kept, tokens, the drop reasons that occurred),
    split into several tables where one would not fit the console (a language code is never cut)."""
    from indicfm.tables import print_table

    langs = report["languages"]
    reasons = [r for r in DROP_REASONS if any(r in v["dropped"] for v in langs.values())]
    total = {"docs_in": 0, "docs_kept": 0, "tokens": 0, "dropped": Counter()}
    for v in langs.values():
        for key in ("docs_in", "docs_kept", "tokens"):
            total[key] += v[key]
        total["dropped"].update(v["dropped"])

    def cells(v: dict) -> list[str]:
        pct = f"{v['docs_kept'] / v['docs_in']:.1%}" if v["docs_in"] else "-"
        return [f"{v['docs_in']:,}", f"{v['docs_kept']:,}", pct, f"{v['tokens']:,}",
                *(f"{v['dropped'].get(r, 0):,}" for r in reasons)]  # fmt: skip

    rows = [[lang, *cells(v)] for lang, v in langs.items()] + [["[bold]total", *cells(total)]]
    headers = ["in", "kept", "kept %", "tokens", *(r.replace("_", " ") for r in reasons)]
    print_table(console, "data prepare: documents per language", ["language"], headers, rows)


def load_examples(directory: str | Path) -> dict[str, list[dict]]:
    from indicfm.storage import as_path

    path = as_path(directory) / EXAMPLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no examples file (is {directory} a token cache made by `data prepare`?)")
    return json.loads(path.read_text(encoding="utf-8"))
