"""Config section ``tokenizer``: how the SentencePiece tokenizer is trained (owned by tokenizer/)."""

from typing import Literal

from pydantic import Field

from indicfm.config_base import Section


class TokenizerConfig(Section):
    vocab_size: int = Field(64000, gt=0, description="SentencePiece vocabulary size")
    model_type: Literal["unigram", "bpe"] = "unigram"
    sampling_alpha: float = Field(0.3, ge=0.0, le=1.0, description="p_lang ∝ n_lang^alpha")
    seed: int = 0
    model_file: str | None = Field(None, description="trained tokenizer .model used by data/train")
