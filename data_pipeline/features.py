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

Workers compute the values (:func:`batch_features`, from what the filters counted anyway); the
main process adds the verdicts and dedup matches (:class:`FeatureCollector`), writes a part file at
each checkpoint (so a resumed prepare keeps them) and joins the parts into one file at the end.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipeline.config import DataConfig, FilterConfig
from data_pipeline.dedup import exact_key
from data_pipeline.filters import duplicate_line_fraction, duplicate_ngram_fraction, top_ngram_fraction

FEATURES_FILE = "features.parquet"
#: Part files of an unfinished prepare, under its state directory.
PARTS_DIR = "features"


class FeaturesError(ValueError):
    """A features file that is missing or can't be read (the message says what to run)."""


def ngram_sizes(config: DataConfig) -> tuple[list[int], list[int]]:
    """The n of every top- and duplicate-n-gram rule of any language (one column each)."""
    filters = [config.filters, *config.language_filters.values()]
    top = sorted({n for f in filters for n in f.max_top_ngram_fraction})
    dup = sorted({n for f in filters for n in f.max_duplicate_ngram_fraction})
    return top, dup


def key64(keys: Sequence[bytes]) -> np.ndarray:
    """The first 8 bytes of each exact-duplicate key as an int64."""
    if not keys:
        return np.zeros(0, np.int64)
    return np.frombuffer(b"".join(k[:8] for k in keys), np.int64).copy()


def batch_features(
    n_docs: int,
    accepted: Sequence[int],
    langs: Sequence[str],
    texts: Sequence[str],
    stats,
    predictions: dict[int, tuple[str | None, float]],
    filters_of,
    config: DataConfig,
) -> dict[str, np.ndarray]:
    """Feature columns for the ``n_docs`` documents of a batch (see the module docstring).

    ``accepted``: the positions of the documents the reader accepted, whose ``langs``/``texts``
    follow; ``stats``: their :class:`data_pipeline.filters.CharStats`; ``predictions``: {index
    into texts: (language, confidence)} of those LID judged; ``filters_of(lang)``: the thresholds
    of a language (its n-gram rules decide which n-gram values are computed).  ``key64`` is left
    for the caller to fill in (it has the passing documents' keys already).
    """
    accepted = np.asarray(accepted, np.int64)
    out: dict[str, np.ndarray] = {}

    def column(dtype, fill) -> np.ndarray:
        return np.full(n_docs, fill, dtype)

    for name in ("chars", "words", "letters"):
        out[name] = column(np.int32, -1)
    lengths = np.fromiter((len(t) for t in texts), np.int64, count=len(texts))
    out["chars"][accepted] = lengths
    out["words"][accepted] = stats.words
    out["letters"][accepted] = stats.letters
    ratio = column(np.float64, np.nan)
    # exactly the expression filters.batch_check compares (0 for a text with no non-space character)
    ratio[accepted] = np.where(stats.non_space > 0, 1.0 - stats.letters / np.maximum(stats.non_space, 1), 0.0)
    out["non_letter_ratio"] = ratio
    lines = column(np.float64, np.nan)
    lines[accepted] = 0.0
    for k in np.flatnonzero(stats.newlines > 0).tolist():
        lines[accepted[k]] = duplicate_line_fraction(texts[k])
    out["duplicate_line_fraction"] = lines
    share = column(np.float64, np.nan)
    from indicfm.text import is_known_language

    known = np.fromiter((is_known_language(lang) for lang in langs), bool, count=len(langs))
    share[accepted[known]] = (stats.in_script / np.maximum(stats.letters, 1))[known]
    out["script_share"] = share
    top_ns, dup_ns = ngram_sizes(config)
    for n in top_ns:
        out[f"top_ngram_{n}"] = column(np.float64, np.nan)
    for n in dup_ns:
        out[f"dup_ngram_{n}"] = column(np.float64, np.nan)
    for k, lang in enumerate(langs):
        f: FilterConfig = filters_of(lang)
        if stats.words[k] < f.repetition_min_words:
            continue
        words = texts[k].split()
        unique = len(set(words)) == len(words)  # then no n-gram repeats: every value is 0
        for n in f.max_top_ngram_fraction:
            out[f"top_ngram_{n}"][accepted[k]] = 0.0 if unique else top_ngram_fraction(words, n)
        for n in f.max_duplicate_ngram_fraction:
            out[f"dup_ngram_{n}"][accepted[k]] = 0.0 if unique else duplicate_ngram_fraction(words, n)
    lid_lang = np.full(n_docs, None, object)
    lid_score = column(np.float64, np.nan)
    for k, (predicted, confidence) in predictions.items():
        lid_lang[accepted[k]] = predicted
        lid_score[accepted[k]] = confidence
    out["lid_lang"] = lid_lang
    out["lid_score"] = lid_score
    out["key64"] = column(np.int64, 0)
    return out


def fill_keys(features: dict[str, np.ndarray], accepted: Sequence[int], texts: Sequence[str],
              passing: Sequence[bool], passing_keys: Sequence[bytes]) -> None:
    """Set ``key64`` of every accepted document: the passing ones' keys are given (in order); the
    others (dropped by a filter) are hashed here, so a re-run of exact dedup can see them too."""
    keys = iter(passing_keys)
    features["key64"][np.asarray(accepted, np.int64)] = key64(
        [next(keys) if ok else exact_key(text) for text, ok in zip(texts, passing)])


class FeatureCollector:
    """The main process's side: verdicts and dedup matches added in input order; parts on disk."""

    def __init__(self, out: Path, state_dir: Path):
        self.out = out
        self.parts_dir = state_dir / PARTS_DIR
        self.batches: list = []  # pyarrow RecordBatches since the last part

    def add(self, result, reasons: Sequence[str | None], passing: Sequence[int],
            matches: dict[int, tuple[int, float]]) -> None:
        """One consumed batch: ``reasons`` (final, dedup included) of every document; ``passing``:
        positions of those that reached dedup (``result.lengths`` follows them); ``matches``:
        {index into passing: (kept id, similarity)} of near duplicates."""
        import pyarrow as pa

        n = len(reasons)
        features = result.features
        tokens = np.full(n, -1, np.int32)
        tokens[np.asarray(passing, np.int64)] = result.lengths
        duplicate_of = np.full(n, -1, np.int64)
        similarity = np.full(n, np.nan, np.float32)
        passing = list(passing)
        for k, (doc, sim) in matches.items():
            duplicate_of[passing[k]] = doc
            similarity[passing[k]] = sim
        read = features["chars"] >= 0
        columns = {
            "source": pa.array([result.source] * n, pa.string()),
            "line": pa.array(np.asarray(result.lines, np.int64)),
            "lang": pa.array(result.langs, pa.string()),
            "reason": pa.array(reasons, pa.string()),
        }
        for name, values in features.items():
            if values.dtype == object:
                columns[name] = pa.array(values.tolist(), pa.string())
            elif values.dtype.kind == "f":
                columns[name] = pa.array(values, from_pandas=True)  # NaN → null
            else:
                columns[name] = pa.array(values, mask=~read)
        columns["tokens"] = pa.array(tokens, mask=tokens < 0)
        columns["duplicate_of"] = pa.array(duplicate_of, mask=duplicate_of < 0)
        columns["similarity"] = pa.array(similarity, from_pandas=True)
        self.batches.append(pa.RecordBatch.from_pydict(columns))

    def save_part(self, part: int) -> None:
        """Write what was added since the last part as part ``part`` (called at a checkpoint)."""
        import pyarrow.parquet as pq

        if not self.batches:
            return
        import pyarrow as pa

        self.parts_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.parts_dir / f"part-{part:06d}.parquet.tmp"
        pq.write_table(pa.Table.from_batches(self.batches), tmp, compression="zstd")
        tmp.replace(self.parts_dir / f"part-{part:06d}.parquet")
        self.batches = []

    def resume(self, parts: int) -> None:
        """Forget part files past ``parts`` (written after the checkpoint being resumed)."""
        if self.parts_dir.is_dir():
            for path in self.parts_dir.glob("part-*.parquet*"):
                if path.suffix != ".parquet" or int(path.stem.split("-")[1]) >= parts:
                    path.unlink()

    def finish(self) -> Path:
        """Join the parts and the rest into ``features.parquet``, naming for each exact duplicate
        the kept document with the same key (near duplicates already name theirs)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        tables = [pq.read_table(p) for p in sorted(self.parts_dir.glob("part-*.parquet"))] if self.parts_dir.is_dir() else []
        if self.batches:
            tables.append(pa.Table.from_batches(self.batches))
        self.batches = []
        if not tables:
            return self.out / FEATURES_FILE
        table = pa.concat_tables(tables, promote_options="default")
        reason = table.column("reason")
        keys = table.column("key64").to_numpy(zero_copy_only=False)
        kept = pc.is_null(reason).to_numpy(zero_copy_only=False)
        exact = pc.fill_null(pc.equal(reason, "exact_duplicate"), False).to_numpy(zero_copy_only=False)
        if exact.any():
            kept_ids = np.flatnonzero(kept)
            order = np.argsort(keys[kept_ids], kind="stable")
            sorted_keys = keys[kept_ids][order]
            where = np.clip(np.searchsorted(sorted_keys, keys[exact]), 0, max(len(sorted_keys) - 1, 0))
            found = sorted_keys[where] == keys[exact] if len(sorted_keys) else np.zeros(exact.sum(), bool)
            duplicate_of = table.column("duplicate_of").to_numpy(zero_copy_only=False).astype(np.float64)
            similarity = table.column("similarity").to_numpy(zero_copy_only=False).astype(np.float32)
            rows = np.flatnonzero(exact)
            duplicate_of[rows[found]] = kept_ids[order][where[found]]
            similarity[rows[found]] = 1.0
            table = table.set_column(table.schema.get_field_index("duplicate_of"), "duplicate_of",
                                     pa.array(duplicate_of, from_pandas=True).cast(pa.int64()))
            table = table.set_column(table.schema.get_field_index("similarity"), "similarity",
                                     pa.array(similarity, from_pandas=True))
        tmp = self.out / (FEATURES_FILE + ".tmp")
        pq.write_table(table, tmp, compression="zstd", row_group_size=1 << 20)
        tmp.replace(self.out / FEATURES_FILE)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return self.out / FEATURES_FILE


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
