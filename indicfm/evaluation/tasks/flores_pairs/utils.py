"""Loads the ``flores_pairs`` items for lm-evaluation-harness (the tasks' ``custom_dataset``).

The items are built from the held-out FLORES-200 lines the package ships (``samples/heldout``) by
:mod:`indicfm.evaluation.minimal_pairs`, found through the package, not the current directory, so
the tasks work from an installed wheel, in any directory, offline.  (``dataset_path: json`` +
``data_files`` would not: lm-eval hands ``data_files`` to ``datasets.load_dataset`` unchanged, which
resolves a relative path against the current directory.)
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _items() -> dict:
    from indicfm.evaluation.minimal_pairs import parallel_items
    from indicfm.package_data import SAMPLES_DIR

    return parallel_items(SAMPLES_DIR / "heldout")


def load_pairs(lang: str, **metadata):
    """``{"test": Dataset}`` of ``lang``'s items; each has ``choices`` = [real sentence, swapped]."""
    import datasets

    items = _items()
    if lang not in items:
        raise FileNotFoundError(f"flores_pairs has no items for {lang!r} (it has: {', '.join(sorted(items))})")
    rows = [{**row, "choices": [row["good"], row["bad"]]} for row in items[lang]]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
