"""The tokenizer files of an exported model.

A run whose tokenizer is a Hugging Face ``tokenizer.json`` (an imported open model's) ships that
file as it is — it *is* the tokenizer the model was trained with — with a ``tokenizer_config.json``
and ``special_tokens_map.json`` naming its special tokens as indicfm found them
(:mod:`indicfm.tokenizer.specials`; a role it lacks is left out, as transformers expects).  Its
normaliser is its own: indicfm NFC-normalised text before it, which the model card says.

A run with a SentencePiece model gets:

* ``tokenizer.json`` — a Hugging Face *fast* tokenizer (built with the ``tokenizers`` library) that
  reproduces indicfm's encoding exactly, NFC included: normaliser ``NFC → prepend "▁" → spaces to
  "▁"`` (SentencePiece's ``add_dummy_prefix`` and whitespace handling; indicfm's tokenizer is trained
  with the ``identity`` rule, so SentencePiece itself never normalises), then byte-pair merges with
  byte fallback.  ``tests/test_export_hf.py`` checks it against ``normalize`` + SentencePiece on
  every shipped sample line, raw (un-normalised) text included.
* ``tokenizer_config.json`` / ``special_tokens_map.json`` — ``PreTrainedTokenizerFast`` (loads
  ``tokenizer.json`` as written; a model-specific class could rebuild its own normaliser and lose
  NFC), adding BOS (a ``TemplateProcessing`` post-processor) but not EOS: training documents are
  packed as ``[BOS] tokens [EOS]``, so a prompt is ``[BOS] tokens``.
* ``tokenizer.model`` — the SentencePiece model itself, byte for byte, for SentencePiece users
  (who must apply NFC first, as ``indicfm.text.normalize`` does).

For BPE, the merges list is derived from the SentencePiece vocabulary: every split of a piece into two
pieces of the vocabulary is a merge, ranked by the merged piece's id (SentencePiece BPE numbers
pieces in the order it learned them, and encodes by repeatedly applying the best-scoring merge).
A unigram model maps directly to ``tokenizers``' Unigram model (pieces with their scores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from indicfm.tokenizer.load import HF, Tokenizer


def _bpe_model(sp: Any, special: list[int]) -> Any:
    from tokenizers import models

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, piece_id in vocab.items():
        if piece_id in special or sp.is_byte(piece_id):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    return models.BPE(
        vocab=vocab, merges=[(left, right) for *_, left, right in merges],
        unk_token=sp.id_to_piece(sp.unk_id()), byte_fallback=True, fuse_unk=True,
    )


def fast_tokenizer(sp: Any, unigram: bool = False) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to ``sp.encode(normalize(text))`` (BPE or unigram ``sp``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    size = sp.get_piece_size()
    special = [i for i in range(size) if sp.is_control(i) or sp.is_unknown(i)]
    if unigram:
        # byte and control pieces never match text in SentencePiece: a score no path would choose
        pieces = [
            (sp.id_to_piece(i), -1e9 if (i in special or sp.is_byte(i)) and i != sp.unk_id() else sp.get_score(i))
            for i in range(size)
        ]
        model = models.Unigram(pieces, sp.unk_id(), True)
    else:
        model = _bpe_model(sp, special)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    bos = sp.id_to_piece(sp.bos_id())
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
    )
    return tokenizer


def write_tokenizer_files(tokenizer: Tokenizer, out_dir: Path, *, model_max_length: int) -> list[Path]:
    """Write the tokenizer files of ``tokenizer`` (the run's) into ``out_dir``; returns their paths."""
    if tokenizer.kind == HF:
        return _write_tokenizer_json_files(tokenizer, out_dir, model_max_length=model_max_length)
    return _write_sentencepiece_files(tokenizer.file.data, out_dir, model_max_length=model_max_length)


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _write_tokenizer_json_files(tokenizer: Tokenizer, out_dir: Path, *, model_max_length: int) -> list[Path]:
    """The run's tokenizer.json byte for byte, and its special tokens for ``PreTrainedTokenizerFast``."""
    special = tokenizer.special
    specials = {f"{role}_token": s.token for role in ("bos", "eos", "unk", "pad") if (s := getattr(special, role))}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        **specials,
    }
    path = out_dir / "tokenizer.json"
    path.write_bytes(tokenizer.file.data)
    return [path, _write_json(out_dir / "tokenizer_config.json", config),
            _write_json(out_dir / "special_tokens_map.json", specials)]


def _write_sentencepiece_files(tokenizer_bytes: bytes, out_dir: Path, *, model_max_length: int) -> list[Path]:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer_bytes)
    model_type = proto.trainer_spec.model_type
    if model_type not in (sentencepiece_model_pb2.TrainerSpec.BPE, sentencepiece_model_pb2.TrainerSpec.UNIGRAM):
        raise ValueError("only SentencePiece BPE and unigram tokenizers can be exported")
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_bytes)
    specials = {
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
    }
    if sp.pad_id() >= 0:
        specials["pad_token"] = sp.id_to_piece(sp.pad_id())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        **specials,
    }
    paths = [out_dir / name for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")]
    fast_tokenizer(sp, unigram=model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM).save(str(paths[0]))
    paths[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[2].write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[3].write_bytes(tokenizer_bytes)
    return paths
