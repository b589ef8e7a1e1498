"""Which ids a tokenizer begins and ends documents with, pads rows with and maps unknown text to.

Why not fixed ids: indicfm's own SentencePiece models put ``<pad> <unk> <s> </s>`` at 0-3, but an
open model's tokenizer puts them anywhere (Llama-3: ``<|begin_of_text|>`` = 128000,
``<|end_of_text|>`` = 128001) and may lack some (Llama-3 has no pad or unk, Qwen2 no bos).  Every
id used to frame, pad or stop comes from here, and every choice is stated (``notes``), so a run's
cache and its log say which tokens it trained on.

A ``tokenizer.json`` holds no "this is the bos" field, so its roles are read, first that answers:

1. ``tokenizer_config.json`` beside it (``bos_token``, ``eos_token``, ``pad_token``,
   ``unk_token``): what transformers uses; a key set to null says the tokenizer has none;
2. its post-processor: the special token a template puts before the text is its bos, after it its
   eos (``<|begin_of_text|> $A``, Roberta's ``cls``/``sep``);
3. its model's ``unk_token``;
4. a well-known name among its tokens (``<s>``, ``<|end_of_text|>``, ``<pad>``, ...).

Missing roles are chosen, never invented (no token is added to a vocabulary the model was trained
with): no eos is an error (documents must end with one, and generation stops at it); no bos →
documents begin with the eos, which then separates them (as GPT-2 and Qwen were trained); no pad →
rows are padded with the eos id, which is harmless because padding has segment id 0: it is never
attended to nor predicted (loss-masked).  ``pad``/``unk`` stay None where the tokenizer has none.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("bos", "eos", "pad", "unk")
#: Names open tokenizers give their special tokens, for tokenizers that say nothing else.
KNOWN_NAMES = {
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[EOS]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}
CONFIG_FILE = "tokenizer_config.json"


class TokenizerError(ValueError):
    """A tokenizer that can't be used as it is (no end-of-text token, unreadable file): the user's to fix."""


@dataclass(frozen=True)
class Special:
    """One role's token: its id, its text and where that was found."""

    id: int
    token: str
    source: str


@dataclass(frozen=True)
class SpecialTokens:
    """A tokenizer's special tokens (None where it has none) and the ids chosen for what it lacks."""

    eos: Special
    bos: Special | None = None
    pad: Special | None = None
    unk: Special | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def start_id(self) -> int:
        """The id every document begins with: the bos, or the eos where there is no bos."""
        return (self.bos or self.eos).id

    @property
    def padding_id(self) -> int:
        """The id rows are padded with: the pad, or the eos where there is no pad (loss-masked)."""
        return (self.pad or self.eos).id

    def to_json(self) -> dict[str, Any]:
        """For metadata.json: each role as {id, token, source} or null, and the notes."""
        out: dict[str, Any] = {role: asdict(s) if (s := getattr(self, role)) else None for role in ROLES}
        return {**out, "start_id": self.start_id, "padding_id": self.padding_id, "notes": list(self.notes)}


def complete(found: dict[str, Special | None], tokenizer_name: str) -> SpecialTokens:
    """The roles ``found``, with a note for each and the choices for missing bos and pad."""
    eos = found.get("eos")
    if eos is None:
        raise TokenizerError(
            f"{tokenizer_name}: no end-of-text token found (tokenizer_config.json's eos_token, the "
            f"post-processor, or one of {', '.join(KNOWN_NAMES['eos'])}); put a {CONFIG_FILE} naming "
            "its eos_token beside it")
    notes = []
    for role in ROLES:
        s = found.get(role)
        if s is not None:
            notes.append(f"{role} {s.token} = {s.id} ({s.source})")
        elif role == "bos":
            notes.append(f"bos: none in the tokenizer; documents begin with eos {eos.token} = {eos.id}")
        elif role == "pad":
            notes.append(f"pad: none in the tokenizer; rows are padded with eos id {eos.id} "
                         "(padding is never attended to nor predicted: loss-masked)")
        else:
            notes.append("unk: none in the tokenizer")
    return SpecialTokens(eos=eos, bos=found.get("bos"), pad=found.get("pad"), unk=found.get("unk"), notes=tuple(notes))


def declared_in_config(config: dict) -> dict[str, str | None]:
    """The roles a ``tokenizer_config.json`` (or ``special_tokens_map.json``) names: token text, or
    None for a key set to null (the tokenizer has none); roles it does not mention are left out."""
    out: dict[str, str | None] = {}
    for role in ROLES:
        key = f"{role}_token"
        if key in config:
            value = config[key]
            if isinstance(value, dict):  # a serialised AddedToken
                value = value.get("content")
            out[role] = value if isinstance(value, str) else None
    return out


def _post_processor_roles(processor: dict | None) -> dict[str, str]:
    """bos/eos token text from a post-processor: the special tokens a template puts before and after
    the text (``TemplateProcessing``, also inside a ``Sequence``; Roberta/Bert's cls and sep)."""
    if not processor:
        return {}
    kind = processor.get("type")
    if kind == "Sequence":
        out: dict[str, str] = {}
        for inner in processor.get("processors", []):
            out = {**_post_processor_roles(inner), **out}  # the first processor that names a role wins
        return out
    if kind in ("RobertaProcessing", "BertProcessing"):
        return {"bos": processor["cls"][0], "eos": processor["sep"][0]}
    if kind != "TemplateProcessing":
        return {}
    single = processor.get("single", [])
    text_at = next((i for i, item in enumerate(single) if "Sequence" in item), None)
    if text_at is None:
        return {}
    out = {}
    if text_at > 0 and "SpecialToken" in single[text_at - 1]:
        out["bos"] = single[text_at - 1]["SpecialToken"]["id"]
    if text_at + 1 < len(single) and "SpecialToken" in single[text_at + 1]:
        out["eos"] = single[text_at + 1]["SpecialToken"]["id"]
    return out


def hf_special_tokens(tokenizer: Any, declared: dict[str, str | None] | None, name: str) -> SpecialTokens:
    """Special tokens of a ``tokenizers.Tokenizer`` (see the module docstring for the order);
    ``declared``: what a tokenizer_config.json beside it names (None: there is none)."""
    spec = json.loads(tokenizer.to_str())
    declared = declared or {}
    from_processor = _post_processor_roles(spec.get("post_processor"))
    model_unk = (spec.get("model") or {}).get("unk_token")
    found: dict[str, Special | None] = {}
    for role in ROLES:
        if role in declared:
            token, source = declared[role], CONFIG_FILE
        elif role in from_processor:
            token, source = from_processor[role], "post-processor"
        elif role == "unk" and isinstance(model_unk, str) and tokenizer.token_to_id(model_unk) is not None:
            token, source = model_unk, "model's unk_token"
        else:
            token = next((t for t in KNOWN_NAMES[role] if tokenizer.token_to_id(t) is not None), None)
            source = "known name"
        token_id = tokenizer.token_to_id(token) if token is not None else None
        if token is not None and token_id is None and role in ("bos", "eos"):
            raise TokenizerError(f"{name}: its {source} names {role} {token!r}, which is not in its vocabulary")
        found[role] = Special(token_id, token, source) if token_id is not None else None
    return complete(found, name)


def sentencepiece_special_tokens(processor: Any, name: str) -> SpecialTokens:
    """Special tokens of a ``sentencepiece.SentencePieceProcessor``: its own ids (-1 where it has none)."""
    source = "SentencePiece model"
    found: dict[str, Special | None] = {}
    for role, token_id in zip(ROLES, (processor.bos_id(), processor.eos_id(), processor.pad_id(), processor.unk_id())):
        found[role] = Special(token_id, processor.id_to_piece(token_id), source) if token_id >= 0 else None
    return complete(found, name)
