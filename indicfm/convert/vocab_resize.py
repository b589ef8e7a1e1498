"""Give a model an extended vocabulary: resize its embedding and output rows and initialise the new ones.

The extended tokenizer keeps the base tokenizer's ids (``0 .. base_size - 1``: the same strings, the
same special tokens; :func:`check_extends` refuses anything else) and appends new pieces after them.
The model is resized so that, on any sequence of base ids, it computes exactly what it did:

* **base rows are copied bit for bit**, in the input embedding and in the output projection;
* **each new row is the mean of the base model's rows for the base tokenizer's encoding of the new
  piece's text** (input and output alike; with tied embeddings the one table serves both).  Why
  this and not something more elaborate: two 2024 studies found the mean of the sub-token
  embeddings as good as the elaborate schemes (Mundra et al., CoNLL 2024, on Indic languages;
  Tejaswi et al., EMNLP Findings 2024), and it needs nothing but the model itself.  A piece's text
  is what it stands for in a document, as bytes: a byte-level piece (``Ġ``-form) mapped back
  through the byte alphabet, a SentencePiece-style piece with ``▁`` read as a space and ``<0xNN>``
  as a byte, an added token's own text.  The base encoding is the one the base tokenizer gives
  that text *inside* a document: its pre-tokenizer and normaliser apply (that is what the base model
  saw), but not what only happens at the start of a text (a prepended ``▁``/dummy prefix, a
  byte-level ``add_prefix_space``), so ``▁हिन्दी`` (word-initial) and ``न्दी`` (word-internal) get the
  base rows of exactly their own bytes;
* **the row count is padded** to a multiple that shards well (:func:`row_multiple`: 128, the
  tile size matrix units and Megatron's vocabulary padding use, or a multiple of the mesh's
  ``tensor x fsdp`` devices when that product does not divide 128).  No token id reaches a padded
  row.  Each padded row, input and output, is the mean of all base rows: as an input it looks like
  an average token; as an output its logit is the mean of the base logits, so by Jensen's
  inequality ``exp(mean logit) <= mean exp(logit)``: a padded id is never more probable than the
  average base token (Hewitt 2021's argument for mean initialisation), and training only pushes it
  down.  ``model.vocab_size`` becomes the padded row count; a tokenizer smaller than the table is
  allowed (``generate`` samples only the tokenizer's ids).

Rows a base model already had beyond its tokenizer (Qwen pads its vocabulary) were never trained
on any token: new ids and padding take their place.  Embedding tables are top-level parameters in
both parameter layouts, so the resize is the same for a scanned or unrolled model; the resized
model is placed by the one sharding rules table, like an import or an upcycle.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx

from indicfm.convert.hf_arch import ConversionError, plain_path
from indicfm.sharding import Rules, state_shardings
from indicfm.tokenizer.extend import PAD_MULTIPLE, padded
from indicfm.tokenizer.extend_bytelevel import byte_to_unicode, unicode_to_byte
from indicfm.tokenizer.load import HF, Tokenizer
from indicfm.tokenizer.piece_selection import WHITESPACE

#: a tokenizer larger than this is almost certainly the wrong file (the largest open vocabularies are ~262k)
MAX_VOCABULARY = 1 << 20
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class VocabularyError(ConversionError):
    """The extended tokenizer does not extend the model's base tokenizer (the message names the file)."""


# ------------------------------------------------------------------------------ which base rows


def _style(tokenizer_json: dict) -> str:
    """``byte-level``, ``metaspace`` (SentencePiece-style ``▁`` for spaces) or ``plain`` token strings."""
    text = json.dumps([tokenizer_json.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")], ensure_ascii=False)
    if '"ByteLevel"' in text:
        return "byte-level"
    return "metaspace" if WHITESPACE in text or '"Metaspace"' in text else "plain"


def _piece_bytes(piece: str, style: str) -> bytes:
    """What a vocabulary entry stands for in a document, as bytes."""
    if style == "byte-level":
        inverse = unicode_to_byte()
        if all(c in inverse for c in piece):
            return bytes(inverse[c] for c in piece)
        return piece.encode("utf-8")
    if style == "metaspace":
        match = _BYTE_PIECE.fullmatch(piece)
        if match:  # a byte-fallback piece stands for one byte
            return bytes([int(match.group(1), 16)])
        return piece.replace(WHITESPACE, " ").encode("utf-8")
    return piece.encode("utf-8")


def token_strings(tokenizer: Tokenizer) -> list[str]:
    """Every id's vocabulary string (what :func:`check_extends` compares)."""
    if tokenizer.kind == HF:
        return [tokenizer.tokenizer.id_to_token(i) or "" for i in range(tokenizer.vocab_size)]
    return [tokenizer.processor.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def new_piece_texts(extended: Tokenizer, base_size: int) -> list[bytes]:
    """The text (bytes) of each id ``base_size ..`` of ``extended``."""
    if extended.kind != HF:
        sp = extended.processor
        return [_piece_bytes(sp.id_to_piece(i), "metaspace") for i in range(base_size, extended.vocab_size)]
    tok = extended.tokenizer
    style = _style(json.loads(tok.to_str()))
    added = tok.get_added_tokens_decoder()
    out = []
    for i in range(base_size, extended.vocab_size):
        if i in added:  # an added token's content is text (with "▁" for spaces in a metaspace tokenizer)
            content = added[i].content
            out.append(content.replace(WHITESPACE, " ").encode("utf-8") if style == "metaspace" else content.encode("utf-8"))
        else:
            out.append(_piece_bytes(tok.id_to_token(i) or "", style))
    return out


def _without_start_effects(tokenizer_json: dict) -> dict:
    """The tokenizer.json with what happens only at the start of a text switched off: a normaliser
    that prepends ``▁``, a Metaspace that prepends one, a byte-level ``add_prefix_space``."""

    def edit(node: Any) -> Any:
        if isinstance(node, list):
            return [edit(n) for n in node if not (isinstance(n, dict) and n.get("type") == "Prepend")]
        if not isinstance(node, dict):
            return node
        node = {k: edit(v) for k, v in node.items()}
        if node.get("type") == "ByteLevel":
            node["add_prefix_space"] = False
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
            node.pop("add_prefix_space", None)  # older files' spelling of prepend_scheme
        if node.get("type") == "Prepend":
            return None
        return node

    out = dict(tokenizer_json)
    for key in ("normalizer", "pre_tokenizer"):
        out[key] = edit(out.get(key))
    return out


class _InContextEncoder:
    """The base tokenizer's encoding of a text as it appears inside a document (see the module docstring)."""

    def __init__(self, base: Tokenizer):
        self.kind = base.kind
        if base.kind == HF:
            from tokenizers import Tokenizer as HfTokenizer

            data = json.loads(base.tokenizer.to_str())
            self.style = _style(data)
            self.tokenizer = HfTokenizer.from_str(json.dumps(_without_start_effects(data)))
            self.tokenizer.encode_special_tokens = True
            self.vocab = base.tokenizer.get_vocab(with_added_tokens=True)
        else:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(base.file.data)
            proto.normalizer_spec.add_dummy_prefix = False
            proto.normalizer_spec.remove_extra_whitespaces = False
            self.style = "metaspace"
            self.processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            self.vocab = {self.processor.id_to_piece(i): i for i in range(self.processor.get_piece_size())}

    def encode(self, data: bytes) -> list[int]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:  # part of a character (a byte-level ``E0 A4``): those bytes' own pieces
            return self.encode(data[: err.start]) + self._bytes(data[err.start : err.end]) + self.encode(data[err.end :])
        if self.kind == HF:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.processor.encode(text)

    def _bytes(self, data: bytes) -> list[int]:
        names = ([byte_to_unicode()[b] for b in data] if self.style == "byte-level"
                 else [f"<0x{b:02X}>" for b in data])
        return [self.vocab[n] for n in names if n in self.vocab]


# ------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class VocabularyPlan:
    """Which rows the resized model has and where each new one comes from."""

    base_size: int  # entries of the base tokenizer (rows 0 .. base_size - 1 are copied)
    size: int  # entries of the extended tokenizer
    rows: int  # the resized table (padded; model.vocab_size)
    old_rows: int  # the model's table before
    multiple: int  # rows is a multiple of this
    sources: tuple[tuple[int, ...], ...]  # per new id: the base ids whose rows are averaged

    def describe(self) -> str:
        lengths = [len(s) for s in self.sources]
        empty = sum(1 for s in self.sources if not s)
        return (
            f"vocabulary {self.base_size:,} -> {self.size:,} entries ({self.size - self.base_size:,} new, each the mean of "
            f"{np.mean(lengths) if lengths else 0:.2f} base rows on average"
            + (f"; {empty} with no base encoding get the mean of all base rows" if empty else "")
            + f"); embedding rows {self.old_rows:,} -> {self.rows:,} (a multiple of {self.multiple})"
        )


def row_multiple(mesh: jax.sharding.Mesh | None) -> int:
    """:data:`PAD_MULTIPLE`, or the least common multiple of it and ``tensor x fsdp`` of ``mesh``
    (the vocabulary rows are split over ``tensor``; ``fsdp`` is included so a rules table that also
    splits them there divides them too)."""
    if mesh is None:
        return PAD_MULTIPLE
    shape = dict(mesh.shape)
    return math.lcm(PAD_MULTIPLE, int(shape.get("tensor", 1)) * int(shape.get("fsdp", 1)))


def check_extends(base: Tokenizer, extended: Tokenizer, base_name: str, extended_name: str) -> None:
    """``extended``'s first ids are exactly ``base``'s (strings and special tokens), and it adds some."""
    if extended.vocab_size > MAX_VOCABULARY:
        raise VocabularyError(f"{extended_name}: {extended.vocab_size:,} entries, more than the {MAX_VOCABULARY:,} "
                              "indicfm accepts (is this the right file?)")
    ours, theirs = token_strings(base), token_strings(extended)[: base.vocab_size]
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if differ:
        i = differ[0]
        raise VocabularyError(
            f"{extended_name} does not extend the model's tokenizer {base_name}: id {i} is {theirs[i]!r} there but "
            f"{ours[i]!r} in the model's ({len(differ):,} of the first {len(theirs):,} ids differ); extend the "
            "model's own tokenizer (indicfm tokenizer extend --base ...)"
        )
    if extended.vocab_size <= base.vocab_size:
        raise VocabularyError(
            f"{extended_name}: {extended.vocab_size:,} entries, not more than the {base.vocab_size:,} of the model's "
            f"tokenizer {base_name}: it adds no token to extend the model with"
        )
    for role in ("bos", "eos", "pad", "unk"):
        a, b = getattr(base.special, role), getattr(extended.special, role)
        if (a.id if a else None) != (b.id if b else None):
            raise VocabularyError(
                f"{extended_name}: its {role} token is {b.token if b else None!r} (id {b.id if b else None}) but the "
                f"model's tokenizer {base_name} has {a.token if a else None!r} (id {a.id if a else None}); the "
                "extended tokenizer must keep the base's special tokens"
            )


def plan_vocabulary(
    base: Tokenizer, extended: Tokenizer, model_rows: int, multiple: int = PAD_MULTIPLE, *,
    base_name: str = "the base tokenizer", extended_name: str = "the extended tokenizer",
) -> VocabularyPlan:
    """Check that ``extended`` extends ``base`` and work out every new row's base ids."""
    if model_rows < base.vocab_size:
        raise VocabularyError(f"the model has {model_rows} embedding rows but its tokenizer {base_name} has "
                              f"{base.vocab_size} entries")
    check_extends(base, extended, base_name, extended_name)
    encoder = _InContextEncoder(base)
    sources = tuple(tuple(encoder.encode(text)) for text in new_piece_texts(extended, base.vocab_size))
    rows = padded(max(extended.vocab_size, model_rows), multiple)
    return VocabularyPlan(base.vocab_size, extended.vocab_size, rows, model_rows, multiple, sources)


# ----------------------------------------------------------------------------------- the rows


def resized_table(table_VxD: np.ndarray, plan: VocabularyPlan) -> np.ndarray:
    """One ``[rows, D]`` table (the embedding, or the output projection transposed): base rows
    copied, new rows the mean of their sources' rows, padded rows the mean of all base rows."""
    base = np.asarray(table_VxD[: plan.base_size])
    fill = base.astype(np.float64).mean(axis=0)
    out = np.empty((plan.rows, base.shape[1]), base.dtype)
    out[: plan.base_size] = base
    for n, ids in enumerate(plan.sources):
        out[plan.base_size + n] = base[list(ids)].astype(np.float64).mean(axis=0) if ids else fill
    out[plan.size:] = fill
    return out


def extend_vocabulary(model: Any, plan: VocabularyPlan, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Any:
    """``model`` with ``plan.rows`` embedding (and output) rows, every array placed on ``mesh`` as the
    rules table says; the model's parameter layout (scanned or unrolled) is kept."""
    from indicfm.model.transformer import Transformer

    if model.cfg.vocab_size != plan.old_rows:
        raise VocabularyError(f"the plan is for a table of {plan.old_rows} rows but the model has {model.cfg.vocab_size}")
    cfg = model.cfg.model_copy(update={"vocab_size": plan.rows})
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    old = {plain_path(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model))}

    def host(path: tuple) -> np.ndarray:
        return np.asarray(jax.device_get(old[path]))

    resized = {("embed_VxD",): resized_table(host(("embed_VxD",)), plan)}
    if not cfg.tie_embeddings:
        resized[("unembed_DxV",)] = resized_table(host(("unembed_DxV",)).T, plan).T

    def place(key_path: tuple, leaf: Any, sharding: Any) -> jax.Array:
        path = plain_path(key_path)
        value = resized.pop(path) if path in resized else old[path]
        if tuple(value.shape) != tuple(leaf.shape):
            raise VocabularyError(f"{'.'.join(map(str, path))}: shape {tuple(value.shape)}, the resized model needs "
                                  f"{tuple(leaf.shape)}")
        return jax.device_put(value if isinstance(value, jax.Array) else np.asarray(value, leaf.dtype), sharding)

    placed = jax.tree_util.tree_map_with_path(place, abstract_state, shardings)
    return nnx.merge(graphdef, placed)
