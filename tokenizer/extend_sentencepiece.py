"""Extend a SentencePiece-style BPE (byte fallback; Llama-2, Mistral, Gemma) with Indic pieces.

Two forms of the same kind of base:

* a ``tokenizer.json`` converted from one (Gemma-3's: pieces with ``▁`` for the space, a BPE
  ``model`` with ``byte_fallback``, a ``Replace``/``Metaspace`` step making spaces ``▁``): new
  pieces are appended to the vocabulary with their merges (SentencePiece's order,
  :func:`indicfm.tokenizer.piece_selection.pair_merges`, a half may be a base token);
* a SentencePiece ``.model``: pieces are appended to the ``ModelProto``.  SentencePiece's BPE
  merges the adjacent pair whose concatenation scores highest, so scores are the merge order.
  :func:`sentencepiece_to_tokenizer_json` writes the ``tokenizer.json`` transformers loads beside it.

Per script (:func:`indicfm.tokenizer.piece_selection.order_merges`): where the base hardly knows
the script the new merges rank before the base's (scores above every base piece, the base's own
Indic pieces re-scored in indicfm's order), so it is segmented as indicfm's model does; where it
knows the script (Gemma-3: Devanagari, Bengali, Tamil, ...) they rank after (scores below), so the
base's segmentation is kept and only joined further: no word of it gets more tokens.

Either way no character is cut (these bases work on characters, not bytes), no pre-tokenizer
changes (words are split at spaces only, so Indic words are whole already), and every new piece or
re-scored base piece contains an Indic letter or sign, so it can never be formed in text without
one: English and code keep their ids.  An Indic character the base lacks (it fell back to bytes)
becomes a piece of its own.
"""

from __future__ import annotations

import base64
from typing import Any

from indicfm.tokenizer.piece_selection import (
    KNOWN_SCRIPT_SHARE,
    IndicModel,
    Selection,
    contiguous_vocab,
    is_indic_symbol,
    order_merges,
    pair_merges,
    script_of_piece,
    scripts_the_base_knows,
    select_pieces,
)


def extend_sentencepiece_json(
    spec: dict[str, Any], model: IndicModel, max_new: int | None, ranking: dict[str, float] | None, name: str, on_progress=None
) -> tuple[dict[str, Any], list[dict[str, Any]], Selection, list[str]]:
    """The extended ``tokenizer.json`` (a dict), the added tokens ``[{id, token, text, bytes}]`` in
    id order, the selection and notes."""
    bpe = spec["model"]
    vocab, base_size = contiguous_vocab(spec, name)
    selection = select_pieces(model, lambda p: p in vocab, lambda ch: True, max_new, ranking, on_progress)
    known = scripts_the_base_knows(model, lambda p: p in vocab)  # before the vocabulary grows
    added = []
    for piece in selection.new:
        vocab[piece] = base_size + len(added)
        text = piece.replace("\u2581", " ")
        added.append({"id": vocab[piece], "token": piece, "text": text, "bytes": text.encode("utf-8").hex()})
    merges = pair_merges(selection.symbols, {t for t in vocab if is_indic_symbol(t)})
    assert all(is_indic_symbol(a + b) for a, b in merges), "a new merge could fire on non-Indic text"
    base_merges = [(m.split(" ", 1)[0], m.split(" ", 1)[1]) if isinstance(m, str) else (m[0], m[1]) for m in bpe["merges"]]
    first, after, first_scripts, after_scripts = order_merges(merges, known, base_merges)
    ahead = set(first)
    moved = sum(1 for m in base_merges if m in ahead)
    all_merges = first + [m for m in base_merges if m not in ahead] + after
    as_strings = bool(bpe["merges"]) and isinstance(bpe["merges"][0], str)
    if as_strings and any(" " in a or " " in b for a, b in merges):
        raise AssertionError("a merge holds a space and cannot be written as 'a b'")
    out = {**spec, "model": {**bpe, "vocab": vocab, "merges": [f"{a} {b}" if as_strings else [a, b] for a, b in all_merges]}}
    notes = [
        "pre-tokenizer unchanged (words are split at spaces only)",
        f"{len(first):,} merges put before the base's {len(base_merges):,} ({moved:,} of them the base's own, moved), "
        f"for the scripts it hardly knows ({', '.join(first_scripts) or 'none'})",
        f"{len(after):,} merges put after the base's, for the scripts it knows ({', '.join(after_scripts) or 'none'})",
    ]
    return out, added, selection, notes


def extend_sentencepiece_model(
    proto: bytes, model: IndicModel, max_new: int | None, ranking: dict[str, float] | None, on_progress=None
) -> tuple[bytes, list[dict[str, Any]], Selection, list[str]]:
    """The extended ``.model`` bytes, the added pieces ``[{id, token, text, bytes}]``, the selection, notes."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    base = model_pb2.ModelProto()
    base.ParseFromString(proto)
    base_index = {p.piece: i for i, p in enumerate(base.pieces)}
    selection = select_pieces(model, lambda p: p in base_index, lambda ch: True, max_new, ranking, on_progress)
    out = model_pb2.ModelProto()
    out.CopyFrom(base)
    normal = model_pb2.ModelProto.SentencePiece.NORMAL
    top = max((p.score for p in base.pieces if p.type == normal), default=0.0)
    bottom = min((p.score for p in base.pieces if p.type == normal), default=0.0)
    added = []
    for piece in selection.new:
        entry = out.pieces.add()
        entry.piece, entry.type, entry.score = piece, normal, bottom - 1.0  # characters: never a merge's result
        text = piece.replace("\u2581", " ")
        added.append({"id": len(out.pieces) - 1, "token": piece, "text": text, "bytes": text.encode("utf-8").hex()})
    index = {p.piece: i for i, p in enumerate(out.pieces)}
    known = scripts_the_base_knows(model, lambda p: p in base_index)
    after_scripts = {script for script, share in known.items() if share >= KNOWN_SCRIPT_SHARE}
    ranked = sorted((p for p in selection.symbols if len(p) > 1), key=lambda p: -selection.symbols[p])
    first = [p for p in ranked if script_of_piece(p) not in after_scripts]
    after = [p for p in ranked if script_of_piece(p) in after_scripts and index[p] >= len(base.pieces)]
    for rank, piece in enumerate(first):  # above every base piece, in indicfm's order
        out.pieces[index[piece]].score = float(top + 1 + len(first) - rank)
    for rank, piece in enumerate(after):  # below every base piece: the base's own pieces are made first
        out.pieces[index[piece]].score = float(bottom - 1 - rank)
    rescored = sum(1 for p in first if index[p] < len(base.pieces))
    out.trainer_spec.vocab_size = len(out.pieces)
    notes = [
        f"{len(first):,} Indic pieces scored above the base's ({rescored:,} of them the base's own, re-scored), "
        f"for the scripts it hardly knows ({', '.join(sorted(set(known) - after_scripts)) or 'none'})",
        f"{len(after):,} new pieces scored below the base's, for the scripts it knows ({', '.join(sorted(after_scripts)) or 'none'})",
    ]
    return out.SerializeToString(), added, selection, notes


def sentencepiece_to_tokenizer_json(proto: bytes) -> dict[str, Any]:
    """A ``tokenizer.json`` that encodes as the SentencePiece BPE model ``proto`` does.

    The way Hugging Face converts such models (transformers' ``SpmConverter``): the vocabulary in id
    order, every split of a piece into two pieces as a merge ranked by the piece's score, the
    model's normaliser (its precompiled character map, the dummy ``▁`` prefix, spaces as ``▁``),
    byte fallback, and the bos before the text where the model has one.
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    m = model_pb2.ModelProto()
    m.ParseFromString(proto)
    types = model_pb2.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    scores = {p.piece: p.score for p in m.pieces if p.type == types.NORMAL}
    merges = pair_merges(scores)
    unk = next((p.piece for p in m.pieces if p.type == types.UNKNOWN), None)
    added = [
        {"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": p.type != types.USER_DEFINED}
        for i, p in enumerate(m.pieces) if p.type in (types.CONTROL, types.UNKNOWN, types.USER_DEFINED)
    ]  # fmt: skip
    spec = m.normalizer_spec
    normalizers: list[dict[str, Any]] = []
    if spec.precompiled_charsmap:
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode()})
    if spec.remove_extra_whitespaces:
        normalizers += [{"type": "Strip", "strip_left": True, "strip_right": True},
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]  # fmt: skip
    if spec.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "\u2581"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if spec.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = m.pieces[m.trainer_spec.bos_id].piece if 0 <= m.trainer_spec.bos_id < len(m.pieces) else None
    post = None
    if bos is not None:
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        }  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": True, "byte_fallback": m.trainer_spec.byte_fallback, "ignore_merges": False,
            "vocab": vocab, "merges": [[a, b] for a, b in merges],
        },
    }  # fmt: skip
