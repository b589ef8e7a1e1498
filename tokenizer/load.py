"""Load any tokenizer indicfm runs with: a SentencePiece model or a Hugging Face ``tokenizer.json``.

Why one interface: an open model comes with its own tokenizer (Gemma, Llama, Qwen ship a
``tokenizer.json``; older models a SentencePiece ``tokenizer.model``), and a continued run must
prepare, train, evaluate, generate and export with exactly that tokenizer.  Every place that
tokenizes takes a :class:`Tokenizer`:

* ``encode(text)`` gives the text's ids and nothing else (no special token added): framing is the
  caller's, with ``start_id`` before and ``eos_id`` after a document, as ``data prepare`` packs it;
* ``bos_id``/``eos_id``/``pad_id``/``unk_id`` come from the tokenizer itself (None where it has
  none; :mod:`indicfm.tokenizer.specials` says how they are found and what is chosen instead);
* normalisation stays indicfm's: callers pass NFC text (:func:`indicfm.text.normalize`); what the
  tokenizer's own normaliser would change on top is reported by ``normalizer_warnings()``.

Files are read as bytes through :mod:`indicfm.storage` (SentencePiece and ``tokenizers`` know
nothing of buckets), so the same tokenizer loads from a path, a ``gs://`` URL or a checkpoint.
The kind is told by the file's suffix (``.json``, ``.model``), else by content (a ``tokenizer.json``
is a JSON object, a SentencePiece model a binary protobuf).  A ``tokenizer.json`` brings the special-token names of
a ``tokenizer_config.json`` beside it (:class:`TokenizerFile` ``declared``), which checkpoints store
with the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from indicfm.storage import as_path, read_bytes
from indicfm.tokenizer.normalizer_check import (
    NormalizerWarning,
    hf_normalizer_warnings,
    sentencepiece_normalizer_warnings,
)
from indicfm.tokenizer.specials import (
    CONFIG_FILE,
    SpecialTokens,
    TokenizerError,
    declared_in_config,
    hf_special_tokens,
    sentencepiece_special_tokens,
)

SENTENCEPIECE, HF = "sentencepiece", "hf"


@dataclass(frozen=True)
class TokenizerFile:
    """A tokenizer file's bytes and name, and for a ``tokenizer.json`` the special tokens a
    ``tokenizer_config.json`` beside it names (None: there was none) — all a checkpoint stores."""

    data: bytes
    name: str
    declared: dict[str, str | None] | None = None

    @property
    def kind(self) -> str:
        """By the name's usual suffix, else by content: a tokenizer.json is a JSON object (text
        starting with "{"), a SentencePiece model a binary protobuf."""
        if self.name.endswith(".json"):
            return HF
        if self.name.endswith(".model"):
            return SENTENCEPIECE
        return HF if self.data.lstrip(b" \t\r\n")[:1] == b"{" else SENTENCEPIECE

    def load(self) -> Tokenizer:
        return HFTokenizer(self) if self.kind == HF else SentencePieceTokenizer(self)

    def write(self, directory: Path) -> Path:
        """Write the file (and a tokenizer_config.json naming its declared special tokens) into
        ``directory``; returns the tokenizer file's path."""
        path = Path(directory) / self.name
        path.write_bytes(self.data)
        if self.declared is not None:
            config = {f"{role}_token": token for role, token in self.declared.items()}
            (path.parent / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path


def read_tokenizer_file(location: str | Path) -> TokenizerFile:
    """The tokenizer file at ``location`` (a path or URL), with the special tokens named by a
    ``tokenizer_config.json`` (and ``special_tokens_map.json``) beside a file named ``tokenizer.json``
    — the Hugging Face layout; another name has no companion files."""
    path = as_path(location)
    data = read_bytes(path)
    declared = None
    if path.name == "tokenizer.json":
        for companion in ("special_tokens_map.json", CONFIG_FILE):  # the config's word wins
            if (path.parent / companion).is_file():
                config = json.loads(read_bytes(path.parent / companion).decode("utf-8"))
                declared = {**(declared or {}), **declared_in_config(config)}
    return TokenizerFile(data, path.name, declared)


def load_tokenizer(location: str | Path) -> Tokenizer:
    """The :class:`Tokenizer` of the file at ``location`` (SentencePiece model or tokenizer.json)."""
    return read_tokenizer_file(location).load()


class Tokenizer:
    """What indicfm needs of a tokenizer; see the module docstring."""

    kind: str
    file: TokenizerFile
    vocab_size: int  # ids are 0 .. vocab_size - 1 (added tokens included)
    special: SpecialTokens

    def encode(self, text: str) -> list[int]:
        """``text``'s ids, no special token added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens (bos, eos, ...) decode to nothing."""
        raise NotImplementedError

    def normalizer_warnings(self) -> list[NormalizerWarning]:
        raise NotImplementedError

    @property
    def bos_id(self) -> int | None:
        return self.special.bos.id if self.special.bos else None

    @property
    def eos_id(self) -> int:
        return self.special.eos.id

    @property
    def pad_id(self) -> int | None:
        return self.special.pad.id if self.special.pad else None

    @property
    def unk_id(self) -> int | None:
        return self.special.unk.id if self.special.unk else None

    @property
    def start_id(self) -> int:
        """What every document begins with: bos, or eos where the tokenizer has no bos."""
        return self.special.start_id

    @property
    def padding_id(self) -> int:
        """What rows are padded with: pad, or eos where the tokenizer has no pad."""
        return self.special.padding_id

    def describe(self) -> str:
        """One line: the file, its kind, its size and its special tokens as found or chosen."""
        return f"{self.file.name} ({self.kind}, {self.vocab_size:,} entries): " + "; ".join(self.special.notes)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model.  ``processor`` is the ``SentencePieceProcessor`` itself (the data
    pipeline's word cache works on it directly)."""

    kind = SENTENCEPIECE

    def __init__(self, file: TokenizerFile):
        import sentencepiece as spm

        self.file = file
        try:
            self.processor = spm.SentencePieceProcessor(model_proto=file.data)
        except RuntimeError as err:
            raise TokenizerError(f"{file.name}: not a SentencePiece model nor a tokenizer.json ({err})") from None
        self.vocab_size = self.processor.get_piece_size()
        self.special = sentencepiece_special_tokens(self.processor, file.name)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode(list(ids))

    def normalizer_warnings(self) -> list[NormalizerWarning]:
        return sentencepiece_normalizer_warnings(self.processor, self.file.data)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library).  ``tokenizer`` is the
    ``tokenizers.Tokenizer``, set to encode special tokens' text found in a document as text:
    a corpus line holding ``<|endoftext|>`` must not end its document early (SentencePiece never
    maps text to its control tokens either)."""

    kind = HF

    def __init__(self, file: TokenizerFile):
        from tokenizers import Tokenizer as HfTokenizer

        self.file = file
        try:
            self.tokenizer = HfTokenizer.from_str(file.data.decode("utf-8"))
        except Exception as err:  # the Rust side raises a bare Exception for a malformed file
            raise TokenizerError(f"{file.name}: not a valid tokenizer.json ({err})") from None
        self.tokenizer.encode_special_tokens = True
        self.special = hf_special_tokens(self.tokenizer, file.declared, file.name)

    @cached_property
    def vocab_size(self) -> int:  # type: ignore[override]
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def normalizer_warnings(self) -> list[NormalizerWarning]:
        return hf_normalizer_warnings(self.tokenizer)

