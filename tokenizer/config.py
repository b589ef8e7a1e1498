"""Config section ``tokenizer``: how the SentencePiece tokenizer is trained (owned by tokenizer/).

The defaults are the recipe chosen on FLORES-200 dev (train on corpus + one half of dev, measure on
the other half; see the README's tokenizer section): BPE whose merges keep aksharas whole, every
language given the same sentence budget (``sampling_alpha = 0``) and no sentence repeated.  Settings that the issue fixes for
fairness (NFC by indicfm and no SentencePiece normalisation, byte fallback, split digits, every
letter of the 22 languages' scripts required) are not options: turning them off breaks round trips.
"""

from typing import Literal

from pydantic import Field

from indicfm.config_base import Section


class TokenizerConfig(Section):
    vocab_size: int = Field(64000, gt=0, description="SentencePiece vocabulary size (incl. 4 special and 256 byte pieces)")
    model_type: Literal["unigram", "bpe"] = Field(
        "bpe", description="bpe: lower fertility on FLORES dev than unigram (2.15 vs 2.47)"
    )
    whole_aksharas: bool = Field(
        True,
        description="bpe only: merge whole grapheme clusters only (tokenizer/akshara_bpe.py), so no piece starts "
        "inside an akshara; false = SentencePiece's own BPE trainer",
    )
    min_cluster_count: int = Field(
        2, gt=0, description="whole_aksharas: a grapheme cluster seen this often becomes a piece of its own"
    )
    sampling_alpha: float = Field(
        0.0, ge=0.0, le=1.0, description="p_lang ∝ n_lang^alpha; 0 = equal budget per language, 1 = natural"
    )
    max_sentences: int = Field(
        60000,
        gt=0,
        description="sentence (document) budget shared by all languages; no sentence is ever repeated",
    )
    max_document_chars: int = Field(
        100_000, gt=0, description="longer documents are skipped and counted as too_long"
    )
    max_piece_chars: int = Field(16, gt=0, le=64, description="longest piece in characters (SentencePiece max_sentencepiece_length)")
    seed: int = Field(0, description="seed of the per-language document choice")
    num_threads: int | None = Field(None, gt=0, description="SentencePiece trainer threads; default all CPU cores")
    model_file: str | None = Field(
        None, description="the run's tokenizer: a SentencePiece .model or a Hugging Face tokenizer.json (special "
        "tokens from a tokenizer_config.json beside it), used by data prepare, train, eval and generate")
