"""Per-language tables on an 80-column terminal or log file: no language code or figure is cut, and
every cell survives a split into several tables.

The rendered text is parsed back into cells and compared with figures formatted here, independently
of the code that lays the tables out.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from indicfm.data.report import DROP_REASONS, render_table
from indicfm.tables import print_table

# The longest names the pipeline writes: FLORES-200 codes, 'unknown', and a script-only code.
LANGUAGES = ["asm_Beng", "hin_Deva", "kas_Arab", "mni_Mtei", "sat_Olck", "unknown"]


def _render(width: int, draw) -> str:
    out = io.StringIO()
    draw(Console(file=out, width=width, color_system=None, legacy_windows=False))
    return out.getvalue()


def _parse(text: str, n_keys: int) -> tuple[list[str], dict[tuple[str, ...], list[str]]]:
    """(value headings in order, row key -> value cells in order), across every table in ``text``."""
    headings: list[str] = []
    rows: dict[tuple[str, ...], list[str]] = {}
    header_lines: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("┃"):
            header_lines.append([cell.strip() for cell in line.strip("┃").split("┃")])
        elif line.startswith("┡"):  # end of one table's heading: join the stacked words per column
            columns = zip(*header_lines)
            headings += [" ".join(w for w in words if w) for words in list(columns)[n_keys:]]
            header_lines = []
        elif line.startswith("│"):
            cells = [cell.strip() for cell in line.strip("│").split("│")]
            rows.setdefault(tuple(cells[:n_keys]), []).extend(cells[n_keys:])
    return headings, rows


def _report() -> dict:
    languages = {}
    for n, lang in enumerate(LANGUAGES):
        dropped = {reason: 1_000 * (n + 1) + i for i, reason in enumerate(DROP_REASONS)}
        docs_in = 10_000_000 + n
        kept = docs_in - sum(dropped.values())
        languages[lang] = {"docs_in": docs_in, "docs_kept": kept, "tokens": 3_000_000_000 + n, "dropped": dropped}
    return {"languages": languages}


@pytest.mark.parametrize("width", [80, 60, 200])
def test_prepare_table_keeps_every_language_code_and_figure_whole(width):
    report = _report()
    text = _render(width, lambda console: render_table(report, console))
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    headings, rows = _parse(text, n_keys=1)
    assert headings == ["in", "kept", "kept %", "tokens", *(r.replace("_", " ") for r in DROP_REASONS)]
    for lang, v in report["languages"].items():
        expected = [f"{v['docs_in']:,}", f"{v['docs_kept']:,}", f"{100 * v['docs_kept'] / v['docs_in']:.1f}%",
                    f"{v['tokens']:,}", *(f"{v['dropped'][r]:,}" for r in DROP_REASONS)]  # fmt: skip
        assert rows[(lang,)] == expected
    total_in = sum(v["docs_in"] for v in report["languages"].values())
    assert rows[("total",)][0] == f"{total_in:,}"
    tables = text.count("┡")
    assert (tables == 1) == (width == 200)  # split only where one table would not fit


def test_two_key_columns_and_group_lines_survive_a_split():
    names = ["sentencepiece-64k", "gemma3"]
    values = ["fertility", "chars/tok", "parity", "akshara split", "byte fb", "round trip", "ZWJ/ZWNJ"]
    rows: list = []
    for n, lang in enumerate(LANGUAGES):
        for i, name in enumerate(names):
            rows.append([lang, name, *(f"{n + i + k / 7:.3f}" for k in range(len(values)))])
        rows.append(None)
    text = _render(60, lambda console: print_table(console, "fairness", ["language", "tokenizer"], values, rows))
    assert "…" not in text and text.count("┡") > 1
    headings, parsed = _parse(text, n_keys=2)
    assert headings == values
    for row in filter(None, rows):
        assert parsed[tuple(row[:2])] == row[2:]


def test_a_table_that_fits_is_printed_as_it_is():
    rows = [[lang, "2.345", "2.100"] for lang in LANGUAGES]
    text = _render(80, lambda console: print_table(console, "bits per byte", ["language"], ["before", "after"], rows))
    assert text.count("┡") == 1 and "bits per byte" in text
    assert _parse(text, 1) == (["before", "after"], {(r[0],): r[1:] for r in rows})
