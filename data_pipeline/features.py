"""Per-document filter features: what each rule of ``data prepare`` measured, and the verdict.

``data prepare`` writes ``features.parquet`` beside the cache: one row per input document, in input
order (row number = document id), with the values its rules judged, so that ``indicfm data review``
can re-apply other thresholds without reading the corpus again.  Columns (null where a rule did not
look at the document):

========================  =======  ==============================================================
source, line              string,  where the document is (line / record number, 1-based)
                          int64
lang                      string   its language (FLORES-200 code)
reason                    string   drop reason, null when kept
chars, words, letters     int32    length; ``str.split()`` words; letters and marks
non_letter_ratio          float64  → ``too_many_symbols`` (exactly the filter's value)
duplicate_line_fraction   float64  → ``repeated_lines``
top_ngram_N, dup_ngram_N  float64  → ``repeated_ngrams``; only for documents of at least
                                   ``repetition_min_words`` words (below, the rule never applies)
script_share              float64  letters in the language's script(s) / letters → ``wrong_script``
lid_lang, lid_score       string,  the language-ID model's guess and confidence → ``wrong_language``
                          float64  (every document LID can judge, also those dropped before it)
key64                     int64    first 8 bytes of the exact-duplicate key (re-run exact dedup)
tokens                    int32    tokens (with BOS/EOS) of documents that reached deduplication
duplicate_of, similarity  int64,   for a duplicate: the id of the kept document it repeats, and
                          float32  the estimated Jaccard similarity (1 for exact duplicates)
========================  =======  ==============================================================

Workers compute the values (:func:`batch_features`, from what the filters counted anyway, as
NumPy columns); the main process adds the verdicts and dedup matches (:class:`FeatureCollector`:
a few array operations per batch, no per-document Python work), saves the columns so far at each
checkpoint (so a resumed prepare keeps them) and writes ``features.parquet`` once at the end, part
by part.  Text columns hold a handful of distinct values (sources, languages, reasons), so they are
stored dictionary-encoded.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indicfm.data.config import DataConfig, FilterConfig
from indicfm.data.dedup import exact_key
from indicfm.data.filters import CharStats, duplicate_line_fraction, duplicate_ngram_fraction, top_ngram_fraction
from indicfm.data.report import DROP_REASONS

FEATURES_FILE = "features.parquet"
#: Part files of an unfinished prepare, under its state directory.
PARTS_DIR = "features"
#: Dictionary-encoded text columns, stored as int32 codes (-1: null) into a list of names.
TEXT_COLUMNS = ("source", "lang", "reason", "lid_lang")
_REASON_CODE = {reason: i for i, reason in enumerate(DROP_REASONS)}


class FeaturesError(ValueError):
    """A features file that is missing or can't be read (the message says what to run)."""


def ngram_sizes(config: DataConfig) -> tuple[list[int], list[int]]:
    """The n of every top- and duplicate-n-gram rule of any language (one column each)."""
    filters = [config.filters, *config.language_filters.values()]
    top = sorted({n for f in filters for n in f.max_top_ngram_fraction})
    dup = sorted({n for f in filters for n in f.max_duplicate_ngram_fraction})
    return top, dup


def key64(keys: Sequence[bytes]) -> np.ndarray:
    """The first 8 bytes of each 16-byte exact-duplicate key (:func:`dedup.exact_key`) as an int64."""
    if not keys:
        return np.zeros(0, np.int64)
    return np.frombuffer(b"".join(keys), np.int64).reshape(-1, 2)[:, 0].copy()


@dataclass
class BatchFeatures:
    """A worker's feature columns for one batch (one value per document of the batch)."""

    columns: dict[str, np.ndarray]  # numeric columns; "lid_lang" as codes into lid_names
    lid_names: list[str]


def _by_language(langs: Sequence[str]) -> dict[str, np.ndarray]:
    """{language: positions} (one entry for the usual one-file batch)."""
    if len(set(langs)) <= 1:
        return {langs[0]: np.arange(len(langs))} if len(langs) else {}
    groups: dict[str, list[int]] = {}
    for i, lang in enumerate(langs):
        groups.setdefault(lang, []).append(i)
    return {lang: np.array(members) for lang, members in groups.items()}


def batch_features(
    n_docs: int,
    accepted: Sequence[int],
    langs: Sequence[str],
    texts: Sequence[str],
    stats: CharStats,
    predictions: dict[int, tuple[str | None, float]],
    filters_of: Callable[[str], FilterConfig],
    config: DataConfig,
    passing: np.ndarray,
    passing_keys: Sequence[bytes],
) -> BatchFeatures:
    """Feature columns for the ``n_docs`` documents of a batch (see the module docstring).

    ``accepted``: the positions of the documents the reader accepted, whose ``langs``/``texts``
    follow; ``stats``: their :class:`indicfm.data.filters.CharStats`; ``predictions``: {index
    into texts: (language, confidence)} of those LID judged; ``filters_of(lang)``: the thresholds
    of a language (its n-gram rules decide which n-gram values are computed); ``passing``: which
    of the texts passed the filters, ``passing_keys`` their exact-duplicate keys (in order; the
    others are hashed here, so that a re-run of exact dedup can see them too).
    """
    accepted = np.asarray(accepted, np.int64)
    out: dict[str, np.ndarray] = {}

    def column(dtype, fill) -> np.ndarray:
        return np.full(n_docs, fill, dtype)

    for name, values in (("chars", np.fromiter(map(len, texts), np.int64, count=len(texts))),
                         ("words", stats.words), ("letters", stats.letters)):
        out[name] = column(np.int32, -1)
        out[name][accepted] = values
    # exactly the expression filters.batch_check compares (0 for a text with no non-space character)
    out["non_letter_ratio"] = column(np.float64, np.nan)
    out["non_letter_ratio"][accepted] = np.where(
        stats.non_space > 0, 1.0 - stats.letters / np.maximum(stats.non_space, 1), 0.0)
    out["duplicate_line_fraction"] = lines = column(np.float64, np.nan)
    lines[accepted] = 0.0
    for k in np.flatnonzero(stats.newlines > 0).tolist():
        lines[accepted[k]] = duplicate_line_fraction(texts[k])
    out["script_share"] = column(np.float64, np.nan)
    top_ns, dup_ns = ngram_sizes(config)
    for n in top_ns:
        out[f"top_ngram_{n}"] = column(np.float64, np.nan)
    for n in dup_ns:
        out[f"dup_ngram_{n}"] = column(np.float64, np.nan)
    from indicfm.text import is_known_language

    for lang, members in _by_language(langs).items():
        if is_known_language(lang):
            out["script_share"][accepted[members]] = stats.in_script[members] / np.maximum(stats.letters[members], 1)
        f = filters_of(lang)
        for k in members[stats.words[members] >= f.repetition_min_words].tolist():
            words = texts[k].split()
            unique = len(set(words)) == len(words)  # then no n-gram repeats: every value is 0
            for n in f.max_top_ngram_fraction:
                out[f"top_ngram_{n}"][accepted[k]] = 0.0 if unique else top_ngram_fraction(words, n)
            for n in f.max_duplicate_ngram_fraction:
                out[f"dup_ngram_{n}"][accepted[k]] = 0.0 if unique else duplicate_ngram_fraction(words, n)
    lid_names: dict[str, int] = {}
    out["lid_lang"] = column(np.int32, -1)
    out["lid_score"] = column(np.float64, np.nan)
    for k, (predicted, confidence) in predictions.items():
        if predicted is not None:
            out["lid_lang"][accepted[k]] = lid_names.setdefault(predicted, len(lid_names))
        out["lid_score"][accepted[k]] = confidence
    out["key64"] = column(np.int64, 0)
    passing = np.asarray(passing, bool)
    keys = np.zeros(len(texts), np.int64)
    keys[passing] = key64(passing_keys)
    keys[~passing] = key64([exact_key(texts[k]) for k in np.flatnonzero(~passing).tolist()])
    out["key64"][accepted] = keys
    return BatchFeatures(out, list(lid_names))


class _Names:
    """Codes for the values of a text column, in order of first appearance."""

    def __init__(self, names: Sequence[str] = ()):
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}

    def code(self, name: str) -> int:
        if name not in self.index:
            self.index[name] = len(self.names)
            self.names.append(name)
        return self.index[name]

    def codes(self, names: Sequence[str]) -> np.ndarray:
        if len(set(names)) <= 1:  # the usual batch: one language
            return np.full(len(names), self.code(names[0]) if len(names) else 0, np.int32)
        return np.fromiter((self.code(x) for x in names), np.int32, count=len(names))


def _bitmap(valid: np.ndarray):
    """Arrow validity bitmap of a bool mask (None when all are valid: no bitmap needed)."""
    import pyarrow as pa

    return None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))


def _arrow(values: np.ndarray, valid: np.ndarray):
    """A NumPy column as an Arrow array without a copy: ``pyarrow.array`` would also import
    pandas, which costs a short prepare more than writing its whole features file."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [_bitmap(valid), pa.py_buffer(values)], null_count=int((~valid).sum()))


def _string_array(names: Sequence[str]):
    import pyarrow as pa

    data = [name.encode("utf-8") for name in names]
    offsets = np.zeros(len(data) + 1, np.int32)
    offsets[1:] = np.cumsum([len(x) for x in data])
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


class FeatureCollector:
    """The main process's side: verdicts and dedup matches added in input order; parts on disk."""

    def __init__(self, out: Path, state_dir: Path):
        self.out = out
        self.parts_dir = state_dir / PARTS_DIR
        self.pending: list[dict[str, np.ndarray]] = []  # per batch since the last part: its columns
        self.sources, self.langs, self.lid_langs = _Names(), _Names(), _Names()

    def add(self, result, reasons: Sequence[str | None], passing: Sequence[int],
            matches: dict[int, tuple[int, float]]) -> None:
        """One consumed batch: ``reasons`` (final, dedup included) of every document; ``passing``:
        positions of those that reached dedup (``result.lengths`` follows them); ``matches``:
        {index into passing: (kept id, similarity)} of near duplicates."""
        n = len(reasons)
        features: BatchFeatures = result.features
        columns = dict(features.columns)
        columns["source"] = np.full(n, self.sources.code(result.source), np.int32)
        columns["line"] = np.asarray(result.lines, np.int64)
        columns["lang"] = self.langs.codes(result.langs)
        columns["reason"] = np.full(n, -1, np.int32)
        if reasons.count(None) < n:
            for i, r in enumerate(reasons):
                if r is not None:
                    columns["reason"][i] = _REASON_CODE[r]
        if features.lid_names:  # batch codes → this collector's
            remap = np.array([self.lid_langs.code(x) for x in features.lid_names] + [-1], np.int32)
            columns["lid_lang"] = remap[columns["lid_lang"]]
        passing = np.asarray(passing, np.int64)
        columns["tokens"] = np.full(n, -1, np.int32)
        columns["tokens"][passing] = result.lengths
        columns["duplicate_of"] = np.full(n, -1, np.int64)
        columns["similarity"] = np.full(n, np.nan, np.float32)
        for k, (doc, sim) in matches.items():
            columns["duplicate_of"][passing[k]] = doc
            columns["similarity"][passing[k]] = sim
        self.pending.append(columns)

    def _take_pending(self) -> dict[str, np.ndarray] | None:
        if not self.pending:
            return None
        names = self.pending[0].keys()
        out = {name: np.concatenate([batch[name] for batch in self.pending]) for name in names}
        self.pending = []
        return out

    def save_part(self, part: int) -> None:
        """Save what was added since the last part as part ``part`` (called at a checkpoint), with
        the text columns' names so far (they only grow: the last part's names cover every part)."""
        columns = self._take_pending()
        if columns is None:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.parts_dir / f"part-{part:06d}.npz.tmp"
        with open(tmp, "wb") as stream:
            np.savez(stream, **columns, **{f"names.{k}": np.array(v.names, str) for k, v in self._name_sets().items()})
            stream.flush()
            os.fsync(stream.fileno())
        tmp.replace(self.parts_dir / f"part-{part:06d}.npz")

    def _name_sets(self) -> dict[str, _Names]:
        return {"source": self.sources, "lang": self.langs, "lid_lang": self.lid_langs}

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.npz")) if self.parts_dir.is_dir() else []

    def resume(self, parts: int) -> None:
        """Forget part files past ``parts`` (written after the checkpoint being resumed) and take
        the text columns' names from the last one kept."""
        if self.parts_dir.is_dir():
            for path in self.parts_dir.glob("part-*"):
                if path.suffix != ".npz" or int(path.stem.split("-")[1]) >= parts:
                    path.unlink()
        kept = self._parts()
        if kept:
            with np.load(kept[-1]) as last:
                for name, names in self._name_sets().items():
                    names.__init__(last[f"names.{name}"].tolist())

    def finish(self) -> Path:
        """Write ``features.parquet`` from the parts and the rest, part by part, naming for each
        exact duplicate the kept document with the same key (near duplicates already name theirs)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rest = self._take_pending()
        paths = self._parts()
        if rest is None and not paths:
            return self.out / FEATURES_FILE

        def chunks(names=None):
            for path in paths:
                with np.load(path) as part:
                    yield {name: part[name] for name in (names or part.files) if not name.startswith("names.")}
            if rest is not None:
                yield rest

        # exact duplicates: the kept document with the same key is the first kept one (keys of
        # all documents, one part at a time, are few bytes each)
        whole = [(c["reason"], c["key64"]) for c in chunks(["reason", "key64"])]
        reason = np.concatenate([r for r, _ in whole])
        keys = np.concatenate([k for _, k in whole])
        exact_rows = np.flatnonzero(reason == _REASON_CODE["exact_duplicate"])
        exact_target = np.full(len(exact_rows), -1, np.int64)
        if len(exact_rows):
            kept_ids = np.flatnonzero(reason == -1)
            order = np.argsort(keys[kept_ids], kind="stable")
            sorted_keys = keys[kept_ids][order]
            if len(sorted_keys):
                where = np.clip(np.searchsorted(sorted_keys, keys[exact_rows]), 0, len(sorted_keys) - 1)
                found = sorted_keys[where] == keys[exact_rows]
                exact_target[found] = kept_ids[order][where[found]]
        del whole, reason, keys
        dictionaries = {name: _string_array(names.names) for name, names in self._name_sets().items()}
        dictionaries["reason"] = _string_array(DROP_REASONS)
        tmp = self.out / (FEATURES_FILE + ".tmp")
        writer = None
        start = 0
        try:
            for columns in chunks():
                n = len(columns["reason"])
                mine = (exact_rows >= start) & (exact_rows < start + n)
                rows, targets = exact_rows[mine] - start, exact_target[mine]
                columns["duplicate_of"][rows[targets >= 0]] = targets[targets >= 0]
                columns["similarity"][rows[targets >= 0]] = 1.0
                table = self._table(columns, dictionaries)
                if writer is None:
                    # line numbers mostly count up by one: delta encoding makes them nearly free
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd", write_statistics=False,
                                              use_dictionary=list(TEXT_COLUMNS),
                                              column_encoding={"line": "DELTA_BINARY_PACKED"})
                writer.write_table(table, row_group_size=1 << 20)
                start += n
        finally:
            if writer is not None:
                writer.close()
        tmp.replace(self.out / FEATURES_FILE)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return self.out / FEATURES_FILE

    @staticmethod
    def _table(columns: dict[str, np.ndarray], dictionaries: dict):
        """The columns of some documents as an Arrow table, in the documented column order."""
        import pyarrow as pa

        order = ["source", "line", "lang", "reason"]
        order += [name for name in columns if name not in order and name not in ("tokens", "duplicate_of", "similarity")]
        order += ["tokens", "duplicate_of", "similarity"]
        arrays = []
        for name in order:
            values = columns[name]
            if name in TEXT_COLUMNS:
                arrays.append(pa.DictionaryArray.from_arrays(_arrow(values, values >= 0), dictionaries[name]))
            elif values.dtype.kind == "f":
                arrays.append(_arrow(values, ~np.isnan(values)))
            elif name == "key64":  # any int64 is a key: null where the document was never read
                arrays.append(_arrow(values, columns["chars"] >= 0))
            else:  # counts and ids: -1 stands for null
                arrays.append(_arrow(values, values >= 0))
        return pa.Table.from_arrays(arrays, names=order)


def read_features(cache_dir: str | Path, columns: Sequence[str] | None = None):
    """The features table of a cache, or a :class:`FeaturesError` that says what to run."""
    import pyarrow.parquet as pq

    path = Path(cache_dir) / FEATURES_FILE
    if not path.is_file():
        raise FeaturesError(
            f"{path}: no features file; this cache was made by an older `indicfm data prepare` or with "
            f"data.features=false. Re-run the same prepare with --overwrite (and data.features=true) to write it"
        )
    try:
        return pq.read_table(path, columns=list(columns) if columns else None)
    except Exception as err:  # a truncated or foreign file
        raise FeaturesError(f"{path}: can't read the features file ({err}); re-run `indicfm data prepare --overwrite`") from err
