"""The tokenizer files of an exported model.

* ``tokenizer.model`` — the SentencePiece model the run trained with (byte for byte).
* ``tokenizer_config.json`` / ``special_tokens_map.json`` — load it as transformers'
  ``LlamaTokenizer`` (the SentencePiece-backed slow tokenizer; ``use_fast=False``) with
  ``legacy: true``, which hands the text to SentencePiece unchanged, and with BOS/EOS *not* added:
  training documents are encoded without BOS and end with EOS (``data_pipeline/prepare.py``).

Normalisation: indicfm applies Unicode NFC (``indicfm.text.normalize``) *before* SentencePiece, and
the SentencePiece model itself is trained with the ``identity`` rule, so SentencePiece does not
normalise.  transformers does not apply NFC either: users must NFC-normalise text first (the model
card says so); text that is already NFC — most text — tokenizes identically.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_tokenizer_files(tokenizer_bytes: bytes, out_dir: Path, *, model_max_length: int) -> list[Path]:
    """Write the tokenizer files into ``out_dir``; returns their paths."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tokenizer_bytes)
    specials = {
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
    }
    if sp.pad_id() >= 0:
        specials["pad_token"] = sp.id_to_piece(sp.pad_id())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "vocab_file": "tokenizer.model",
        "legacy": True,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "sp_model_kwargs": {},
        **specials,
    }
    paths = [out_dir / "tokenizer.model", out_dir / "tokenizer_config.json", out_dir / "special_tokens_map.json"]
    paths[0].write_bytes(tokenizer_bytes)
    paths[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[2].write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths
