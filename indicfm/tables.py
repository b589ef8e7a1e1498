"""Per-language tables that fit the console without ever cutting a language code.

Rich squeezes a table wider than the console by cutting its cells ("asm_B…", "langu…"), and a log
file or a pipe is only 80 columns wide.  :func:`print_table` lays a table out so that rich never has
to squeeze it: first as it is; if that is too wide, with headings of several words stacked one word
a line; if still too wide, spread over as many tables as it takes, each repeating the key columns
(the language).
"""

from __future__ import annotations

from typing import Sequence

Row = Sequence[str] | None  # None: a line between groups of rows


def _build(title: str | None, keys: Sequence[str], values: Sequence[str], rows: Sequence[Row], picked: Sequence[int]):
    from rich.table import Table

    table = Table(title=title)
    for header in keys:
        table.add_column(header, justify="left", no_wrap=True)
    for i in picked:
        table.add_column(values[i], justify="right")
    for row in rows:
        if row is None:
            table.add_section()
        else:
            table.add_row(*row[: len(keys)], *(row[len(keys) + i] for i in picked))
    return table


def fitting_tables(console, title: str, keys: Sequence[str], values: Sequence[str], rows: Sequence[Row]) -> list:
    """The rich tables :func:`print_table` prints, each no wider than the console at its natural width.

    A key column plus one value column always makes a table, even on a console too narrow for it.
    """
    from rich.measure import Measurement

    unbounded = console.options.update_width(1 << 20)  # measure natural widths, not squeezed ones

    def width(heads: Sequence[str], picked: list[int]) -> int:
        return Measurement.get(console, unbounded, _build(None, keys, heads, rows, picked)).maximum

    everything = list(range(len(values)))
    if width(values, everything) <= console.width:
        return [_build(title, keys, values, rows, everything)]
    stacked = [header.replace(" ", "\n") for header in values]
    groups: list[list[int]] = [[]]
    for i in everything:
        if groups[-1] and width(stacked, groups[-1] + [i]) > console.width:
            groups.append([])
        groups[-1].append(i)
    return [
        _build(title if n == 0 else f"{title} (continued)", keys, stacked, rows, picked)
        for n, picked in enumerate(groups)
    ]


def print_table(console, title: str, keys: Sequence[str], values: Sequence[str], rows: Sequence[Row]) -> None:
    """Print rows of ``keys + values`` cells (strings) as one table, or several if one would not fit.

    ``keys`` are the left-aligned columns that name a row (a language, a tokenizer); ``values`` are
    right-aligned figures.  A ``None`` row draws a line between groups of rows.
    """
    for table in fitting_tables(console, title, keys, values, rows):
        console.print(table)
