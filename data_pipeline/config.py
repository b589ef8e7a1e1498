"""Config section ``data``: sources, cleaning, packing, token cache and loader (owned by data_pipeline/).

Every threshold has a default with its source.  Gopher = Rae et al. 2021, "Scaling Language Models:
Methods, Analysis & Insights from Training Gopher", appendix A (quality and repetition rules, made
for web pages of ≥ 50 words).  FineWeb-2 (Penedo et al. 2025) keeps Gopher's rule shapes and re-fits
the thresholds per language.  Setu / Sangraha (Khan et al. 2024, AI4Bharat) adds script-purity and
language-identification checks for Indian languages.  Our corpora are mostly one *sentence* per
document, so length rules are much looser than Gopher's and repetition rules only count n-grams that
actually repeat.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from indicfm.config_base import Section


class HubSource(Section):
    """A Hugging Face dataset streamed with ``datasets.load_dataset(name, config_name, streaming=True)``."""

    name: str = Field(description="hub dataset name, e.g. 'ai4bharat/sangraha'")
    config_name: str | None = Field(None, description="dataset configuration (subset)")
    split: str = "train"
    text_field: str = "text"
    lang_field: str | None = Field("lang", description="column holding a FLORES-200 code, or null")
    lang: str | None = Field(None, description="FLORES-200 code of every record (instead of lang_field)")


class FilterConfig(Section):
    """Quality thresholds; any of them can be overridden per language in ``data.language_filters``."""

    max_chars: int = Field(100_000, gt=0, description="longer → too_long (issue 4 default)")
    min_words: int = Field(
        3, ge=0, description="fewer whitespace words → too_short (Gopher: 50 for web pages; 3 for sentences)"
    )
    max_non_letter_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of non-space characters that are not letters/marks (digits, symbols, "
        "punctuation) above this → too_many_symbols (Gopher rule shape: ≥80% of words with a letter)",
    )
    max_duplicate_line_fraction: float = Field(
        0.30, ge=0, le=1, description="repeated lines / lines above this → repeated_lines (Gopher 0.30)"
    )
    repetition_min_words: int = Field(
        50,
        ge=0,
        description="n-gram repetition rules apply to documents of at least this many words (Gopher's "
        "rules assume ≥ 50-word pages; on single sentences they flag ~3% of clean FLORES text)",
    )
    max_top_ngram_fraction: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n → max share of characters in the most frequent repeated word n-gram (Gopher)",
    )
    max_duplicate_ngram_fraction: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n → max share of characters inside repeated word n-grams (Gopher)",
    )
    min_script_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="letters in the language's script(s) / all letters below this → wrong_script "
        "(Setu-style script purity; 0.5 = most letters must be in the script, which keeps "
        "FLORES sentences full of English names; 0.7 drops ~1% of FLORES Telugu)",
    )
    extra_scripts: list[str] = Field(
        default_factory=list, description="scripts also accepted for script purity (e.g. ['Latn'])"
    )


class LidConfig(Section):
    """Language identification where the script can't decide (Devanagari, Perso-Arabic, Bengali)."""

    enabled: bool = True
    backend: Literal["pycld2", "py3langid"] = Field(
        "pycld2", description="pycld2: compiled-in model, covers Sindhi; see benchmarks/lid_accuracy.py"
    )
    min_confidence: float = Field(
        0.9, ge=0, le=1, description="drop as wrong_language only when the other language is this sure"
    )
    min_chars: int = Field(
        50,
        ge=0,
        description="shorter documents are not judged by LID (pycld2 calls 5% of short Common Voice "
        "Nepali lines Hindi; at ≥ 50 characters 0.1%)",
    )
    skip_languages: list[str] = Field(
        default_factory=lambda: ["san_Deva"],
        description="script rules only for these (pycld2 labels 9% of FLORES Sanskrit as another "
        "language and would drop ~2% of genuine Sanskrit; benchmarks/lid_accuracy.py)",
    )


class DedupConfig(Section):
    exact: bool = Field(True, description="drop repeats of the same normalised text → exact_duplicate")
    near: bool = Field(True, description="MinHash LSH near-duplicates → near_duplicate")
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity of shingle sets")
    num_perm: int = Field(128, gt=0, description="MinHash permutations")
    shingle_size: int = Field(5, gt=0, description="n of the n-gram shingles")
    shingle_unit: Literal["char", "word"] = Field(
        "char", description="char 5-grams suit sentence-length documents (word 5-grams are for web pages)"
    )
    seed: int = 1


class DataConfig(Section):
    inputs: list[str] = Field(default_factory=list, description="files/dirs to prepare (.txt .dev .jsonl .parquet)")
    hub: list[HubSource] = Field(default_factory=list, description="Hugging Face datasets to stream (needs network)")
    text_field: str = Field("text", description="text column of .jsonl/.parquet records")
    lang_field: str = Field("lang", description="language column of .jsonl/.parquet records")
    allow_unknown_languages: bool = Field(
        False, description="accept .txt files whose name is not a known FLORES-200 code (as 'unknown')"
    )
    cache_dir: str | None = Field(None, description="token cache directory written by `data prepare`")
    seq_len: int = Field(512, gt=0, description="tokens per packed row")
    filters: FilterConfig = Field(default_factory=FilterConfig)
    language_filters: dict[str, FilterConfig] = Field(
        default_factory=dict,
        description="per-language overrides of data.filters (only the keys given), "
        "e.g. {san_Deva: {max_non_letter_ratio: 0.6}}",
    )
    lid: LidConfig = Field(default_factory=LidConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    workers: int = Field(
        0, ge=0, description="processes that clean and tokenize, this one included (0 = CPU count; 1 = no worker processes)"
    )
    checkpoint_every_docs: int = Field(
        200_000, gt=0, description="commit cache rows and resume state after this many documents"
    )
    examples_per_reason: int = Field(5, ge=0, description="dropped documents kept per reason for `data inspect`")
    features: bool = Field(
        True,
        description="also write features.parquet: per document the values the filters judged and the "
        "verdict, for `indicfm data review` (thresholds re-applied without re-reading the corpus)",
    )
    language_weights: dict[str, float] | None = Field(
        None, description="loader mixing weights per language (null = proportional to tokens in the cache)"
    )
    mixture_temperature: float | None = Field(
        None, gt=0, description="instead of weights: p_lang ∝ rows_lang^(1/T) (T > 1 flattens the mixture)"
    )
