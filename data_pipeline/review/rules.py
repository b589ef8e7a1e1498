"""Re-apply ``data prepare``'s rules, with other thresholds, to the values in ``features.parquet``.

:meth:`FeatureTable.verdicts` gives every document the reason prepare would give it under a
changed config, without reading the corpus: the same rules in the same order as
``indicfm.data.stages`` (too_long, too_short, too_many_symbols, repeated_lines, repeated_ngrams,
wrong_script, wrong_language), then exact deduplication in input order over the documents that
pass (each document's key is stored).  Read-time reasons (invalid_utf8, empty, ...) don't depend
on thresholds and stay.

What can't be known without the corpus: whether a document that *newly* passes the filters is a
near duplicate of something (its MinHash was never compared), and whether a near duplicate whose
kept original is now dropped would match another document.  Both are counted as kept, and
:attr:`Verdicts.estimated` marks them, so the page can say how many of its figures are estimates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from indicfm.data.config import DataConfig, FilterConfig
from indicfm.data.filters import filters_for
from indicfm.data.lid import BACKEND_CODES, shares_script
from indicfm.data.report import DROP_REASONS
from indicfm.data.sources import READ_REASONS
from indicfm.text import is_known_language, script_of_language

KEPT = -1  # verdict code of a kept document; otherwise an index into DROP_REASONS
_CODE = {reason: i for i, reason in enumerate(DROP_REASONS)}


@dataclass(frozen=True)
class Rule:
    """One tunable threshold: the feature column it compares and which side is dropped."""

    name: str  # id in the page and API
    column: str  # feature column
    key: str  # config key: a FilterConfig field, "field.N" for an n-gram rule, "lid.min_confidence"
    reason: str  # the drop reason it gives
    drops: str  # "below": value < threshold is dropped; "above": value > threshold; "at_least": ≥
    label: str  # what a curator reads

    def threshold(self, f: FilterConfig, config: DataConfig) -> float:
        if self.key == "lid.min_confidence":
            return config.lid.min_confidence
        field, _, n = self.key.partition(".")
        value = getattr(f, field)
        return value[int(n)] if n else value

    @property
    def integer(self) -> bool:
        return self.column in ("words", "chars")


def rules_for(config: DataConfig) -> list[Rule]:
    """Every tunable rule of a cache made with ``config``, in the order prepare applies them."""
    from indicfm.data.features import ngram_sizes

    top_ns, dup_ns = ngram_sizes(config)
    rules = [
        Rule("max_chars", "chars", "max_chars", "too_long", "above", "characters (more → too_long)"),
        Rule("min_words", "words", "min_words", "too_short", "below", "words (fewer → too_short)"),
        Rule("max_non_letter_ratio", "non_letter_ratio", "max_non_letter_ratio", "too_many_symbols", "above",
             "share of non-letter characters (more → too_many_symbols)"),
        Rule("max_duplicate_line_fraction", "duplicate_line_fraction", "max_duplicate_line_fraction",
             "repeated_lines", "above", "share of repeated lines (more → repeated_lines)"),
    ]
    rules += [Rule(f"max_top_ngram_fraction.{n}", f"top_ngram_{n}", f"max_top_ngram_fraction.{n}", "repeated_ngrams",
                   "above", f"share in the most frequent repeated {n}-gram (more → repeated_ngrams)") for n in top_ns]
    rules += [Rule(f"max_duplicate_ngram_fraction.{n}", f"dup_ngram_{n}", f"max_duplicate_ngram_fraction.{n}",
                   "repeated_ngrams", "above", f"share inside repeated {n}-grams (more → repeated_ngrams)")
              for n in dup_ns]
    rules += [
        Rule("min_script_share", "script_share", "min_script_share", "wrong_script", "below",
             "share of letters in the language's script (less → wrong_script)"),
        Rule("lid.min_confidence", "lid_score", "lid.min_confidence", "wrong_language", "at_least",
             "language-ID confidence in another same-script language (at least → wrong_language; all languages)"),
    ]
    return rules


def apply_overrides(config: DataConfig, overrides: dict) -> DataConfig:
    """``config`` with the page's overrides: ``{"language_filters": {lang: {rule key: value}},
    "lid": {"min_confidence": value}}`` (an n-gram key "max_top_ngram_fraction.2" changes one
    entry of that language's dict).  Raises ValueError on a bad key or value."""
    # keep "only the keys given" per language: filters_for applies exactly those
    language_filters = {lang: f.model_dump(exclude_unset=True) for lang, f in config.language_filters.items()}
    for lang, values in (overrides.get("language_filters") or {}).items():
        own = language_filters.setdefault(lang, {})
        current = filters_for(config, lang)
        for key, value in values.items():
            field, _, n = str(key).partition(".")
            if field not in FilterConfig.model_fields:
                raise ValueError(f"unknown filter threshold {key!r}")
            if n:
                table = dict(own.get(field, getattr(current, field)))
                table[int(n)] = value
                own[field] = table
            else:
                own[field] = value
    data = config.model_dump(mode="python", exclude={"language_filters"})
    data["language_filters"] = language_filters
    for key, value in (overrides.get("lid") or {}).items():
        if key != "min_confidence":
            raise ValueError(f"unknown language-ID threshold {key!r}")
        data["lid"]["min_confidence"] = value
    try:
        return DataConfig.model_validate(data)
    except Exception as err:  # pydantic's message names the key and the bad value
        raise ValueError(str(err)) from None


def _decode_dictionary(column) -> np.ndarray:
    """A dictionary-encoded text column as an object array (None for null), chunk by chunk (each
    row group read may carry its own dictionary)."""
    import pyarrow.compute as pc

    parts = []
    for chunk in column.chunks:
        names = np.array(chunk.dictionary.to_pylist() + [None], object)  # code -1 (null) → None
        parts.append(names[pc.fill_null(chunk.indices, -1).to_numpy(zero_copy_only=False)])
    return np.concatenate(parts) if parts else np.zeros(0, object)


@dataclass
class Verdicts:
    codes: np.ndarray  # [docs] KEPT or an index into DROP_REASONS
    estimated: np.ndarray  # [docs] bool: kept on an assumption (see the module docstring)

    def reasons(self) -> list[str | None]:
        return [None if c == KEPT else DROP_REASONS[c] for c in self.codes.tolist()]


class FeatureTable:
    """The features of one cache as NumPy columns, and the config it was prepared with."""

    def __init__(self, table, config: DataConfig):
        self.config = config
        self.n = table.num_rows
        self.columns: dict[str, np.ndarray] = {}
        import pyarrow as pa
        import pyarrow.compute as pc

        for name in table.column_names:
            col = table.column(name)
            if pa.types.is_dictionary(col.type):  # a text column: look its few names up by code
                self.columns[name] = _decode_dictionary(col)
            elif name in ("source", "lang", "lid_lang", "reason"):
                self.columns[name] = np.array(col.to_pylist(), object)
            else:
                if pa.types.is_integer(col.type):  # null → -1 (every stored integer is ≥ 0)
                    col = pc.fill_null(col, -1)
                self.columns[name] = col.to_numpy(zero_copy_only=False)
        self.langs = sorted(set(self.columns["lang"].tolist()))
        self.lang_rows = {lang: np.flatnonzero(self.columns["lang"] == lang) for lang in self.langs}
        reasons = self.columns["reason"]
        self.original = np.array([KEPT if r is None else _CODE[r] for r in reasons.tolist()], np.int64)
        self.rules = rules_for(config)
        self._cache: dict[str, Verdicts] = {}

    @classmethod
    def load(cls, cache_dir: str | Path) -> FeatureTable:
        from indicfm.data.cache import METADATA
        from indicfm.data.features import read_features

        meta = json.loads((Path(cache_dir) / METADATA).read_text(encoding="utf-8"))
        return cls(read_features(cache_dir), DataConfig.model_validate(meta["config"]))

    def rule(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(f"unknown rule {name!r}; one of: {', '.join(r.name for r in self.rules)}")

    def column(self, name: str) -> np.ndarray:
        """A numeric column as float64 with NaN where there is no value."""
        values = self.columns[name]
        if values.dtype.kind == "f":
            return values.astype(np.float64, copy=False)
        out = values.astype(np.float64)
        out[values < 0] = np.nan
        return out

    @cached_property
    def _read_ok(self) -> np.ndarray:
        return self.columns["chars"] >= 0

    def verdicts(self, config: DataConfig) -> Verdicts:
        """Every document's verdict under ``config`` (memoised per config)."""
        memo_key = config.model_dump_json(include={"filters", "language_filters", "lid", "dedup"})
        if memo_key in self._cache:
            return self._cache[memo_key]
        c = self.columns
        read_codes = np.array([_CODE[r] for r in READ_REASONS])
        codes = np.where(np.isin(self.original, read_codes), self.original, KEPT)
        for lang, rows in self.lang_rows.items():
            rows = rows[self._read_ok[rows]]
            if len(rows):
                codes[rows] = self._filter_codes(lang, rows, filters_for(config, lang), config)
        estimated = np.zeros(self.n, bool)
        # Near duplicates stay near duplicates while the kept document they matched passes the
        # filters (it may become an exact duplicate of an earlier one: same text, same match);
        # when it is dropped, they are counted as kept, as an estimate.
        passing = codes == KEPT
        near = passing & (self.original == _CODE["near_duplicate"])
        target = np.maximum(c["duplicate_of"], 0)
        target_gone = near & (c["duplicate_of"] >= 0) & (codes[target] != KEPT)
        estimated |= target_gone
        near &= ~target_gone
        if config.dedup.exact:  # as DuplicateIndex: a document repeating a kept one's key is dropped
            candidates = np.flatnonzero(passing & ~near)
            keys = c["key64"][candidates]
            _, first = np.unique(keys, return_index=True)
            repeat = np.ones(len(candidates), bool)
            repeat[first] = False
            codes[candidates[repeat]] = _CODE["exact_duplicate"]
            kept_rows = candidates[first]  # the first occurrence of each key, kept
            order = np.argsort(c["key64"][kept_rows])
            sorted_keys, sorted_rows = c["key64"][kept_rows][order], kept_rows[order]
            near_rows = np.flatnonzero(near)
            if len(near_rows) and len(sorted_keys):
                at = np.clip(np.searchsorted(sorted_keys, c["key64"][near_rows]), 0, len(sorted_keys) - 1)
                earlier = (sorted_keys[at] == c["key64"][near_rows]) & (sorted_rows[at] < near_rows)
                codes[near_rows[earlier]] = _CODE["exact_duplicate"]
                near[near_rows[earlier]] = False
        codes[near] = _CODE["near_duplicate"]
        originally_filtered = ~np.isin(self.original, [KEPT, _CODE["exact_duplicate"], _CODE["near_duplicate"]])
        estimated |= originally_filtered & (codes == KEPT)
        out = Verdicts(codes, estimated)
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[memo_key] = out
        return out

    def _filter_codes(self, lang: str, rows: np.ndarray, f: FilterConfig, config: DataConfig) -> np.ndarray:
        """The first failing rule of each of ``lang``'s (readable) documents, in prepare's order."""
        c = self.columns

        def col(name):
            return c[name][rows] if name in c else np.full(len(rows), np.nan)

        words, chars = col("words"), col("chars")
        ngrams = np.zeros(len(rows), bool)
        for n, limit in f.max_top_ngram_fraction.items():
            ngrams |= col(f"top_ngram_{n}") > limit  # NaN (not measured) compares False
        for n, limit in f.max_duplicate_ngram_fraction.items():
            ngrams |= col(f"dup_ngram_{n}") > limit
        ngrams &= words >= f.repetition_min_words
        script = np.zeros(len(rows), bool)
        if is_known_language(lang):
            script = (col("letters") == 0) | (col("script_share") < f.min_script_share)
        rules = [
            ("too_long", chars > f.max_chars),
            ("too_short", words < f.min_words),
            ("too_many_symbols", col("non_letter_ratio") > f.max_non_letter_ratio),
            ("repeated_lines", col("duplicate_line_fraction") > f.max_duplicate_line_fraction),
            ("repeated_ngrams", ngrams),
            ("wrong_script", script),
            ("wrong_language", self._lid_drops(lang, rows, config)),
        ]
        return np.select([m for _, m in rules], [_CODE[r] for r, _ in rules], KEPT)

    def _lid_drops(self, lang: str, rows: np.ndarray, config: DataConfig) -> np.ndarray:
        lid = config.lid
        out = np.zeros(len(rows), bool)
        if not (lid.enabled and lang not in lid.skip_languages and shares_script(lang)
                and lang in BACKEND_CODES[lid.backend]):
            return out
        guesses = self.columns["lid_lang"][rows]
        score = self.columns["lid_score"][rows]
        script = script_of_language(lang)
        for guess in set(guesses.tolist()) - {None, lang}:
            if script_of_language(guess) == script:
                out |= (guesses == guess) & (score >= lid.min_confidence)
        return out & (self.columns["chars"][rows] >= lid.min_chars)


def export_overrides(config: DataConfig) -> dict:
    """The ``data`` section of a YAML file that makes ``data prepare`` apply ``config``'s
    thresholds: every filter value that differs from the defaults (``data.filters``), every
    language's values that differ from those (``data.language_filters``), and the language-ID
    confidence when it is not the default."""
    default = DataConfig()
    glob = config.filters.model_dump(mode="json")
    data: dict = {}
    changed = {k: v for k, v in glob.items() if v != default.filters.model_dump(mode="json")[k]}
    if changed:
        data["filters"] = changed
    languages = {}
    for lang in sorted(config.language_filters):
        diff = {k: v for k, v in filters_for(config, lang).model_dump(mode="json").items() if v != glob[k]}
        if diff:
            languages[lang] = diff
    if languages:
        data["language_filters"] = languages
    if config.lid.min_confidence != default.lid.min_confidence:
        data["lid"] = {"min_confidence": config.lid.min_confidence}
    return {"data": data}
