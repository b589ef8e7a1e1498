"""``indicfm tokenizer extend``: give an open model's tokenizer indicfm's Indic pieces.

The result keeps every base id (0 .. base size - 1: the same strings, the same special tokens)
and gives exactly the base's ids to text without an Indic character (English, code); new pieces
get the ids after.  What is added and how it becomes reachable is the job of three modules:

* :mod:`indicfm.tokenizer.piece_selection` — which pieces of the ``--add`` model, ranked and
  closed under the model's merges;
* :mod:`indicfm.tokenizer.extend_bytelevel` — byte-level BPE bases (Llama-3, Qwen, GPT-2 style);
* :mod:`indicfm.tokenizer.extend_sentencepiece` — SentencePiece-style BPE with byte fallback, as a
  ``tokenizer.json`` (Gemma-3) or a ``.model`` (Llama-2, Mistral).

Other bases (WordPiece, Unigram, BPE with neither byte level nor byte fallback) are refused with
:class:`ExtendError` naming the file and what it holds.  The output is a directory:
``tokenizer.json`` (what :func:`indicfm.tokenizer.load.load_tokenizer` and transformers load),
``tokenizer_config.json`` (the base's, or one naming the special tokens), ``tokenizer.model`` where
the base is one, and ``extension.json``: base and ``--add`` files with sha256, base and new
vocabulary sizes, the added tokens in id order with their text, the selection method.  The
vocabulary is not padded (the model's embedding table is, by ``import hf``); the size padded to a
multiple of 128 is reported.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indicfm import __version__
from indicfm.tokenizer.load import HF, Tokenizer, TokenizerFile, load_tokenizer, read_tokenizer_file
from indicfm.tokenizer.piece_selection import (
    SelectionError,
    balanced_frequency,
    parse_sentencepiece,
    count_by_script,
    read_indic_model,
)
from indicfm.tokenizer.specials import CONFIG_FILE

BYTE_LEVEL, SENTENCEPIECE_JSON, SENTENCEPIECE_MODEL = "byte-level BPE", "SentencePiece-style BPE (tokenizer.json)", "SentencePiece BPE (.model)"
#: the size is reported padded to a multiple of this (the tile size matrix units and Megatron's padding use)
PAD_MULTIPLE = 128
MANIFEST = "extension.json"


class ExtendError(ValueError):
    """A base or ``--add`` file this command cannot use; the message names it (CLI exit 2)."""


@dataclass
class ExtensionResult:
    output_dir: Path
    tokenizer_file: Path
    model_file: Path | None  # tokenizer.model where the base is a .model
    manifest_file: Path
    base_kind: str
    base_size: int
    vocab_size: int
    added: list[dict[str, Any]]
    by_script: dict[str, int]
    skipped: dict[str, int]
    method: str
    notes: list[str] = field(default_factory=list)
    normalizer: str = ""

    @property
    def padded_size(self) -> int:
        return padded(self.vocab_size)


def padded(size: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-size // multiple) * multiple


def read_base(path: Path) -> TokenizerFile:
    """The base tokenizer file (with the special tokens a tokenizer_config.json beside it names),
    read once; ExtendError where it cannot be read."""
    try:
        return read_tokenizer_file(path)
    except OSError as err:
        raise ExtendError(f"{path}: cannot read the base tokenizer ({err.strerror or err})") from None


def base_kind(path: Path, file: TokenizerFile) -> tuple[str, Any]:
    """(kind, parsed base): a tokenizer.json as a dict, a .model as its bytes; ExtendError otherwise."""
    data = file.data
    if file.kind == HF:
        try:
            spec = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ExtendError(f"{path}: not a valid tokenizer.json ({err})") from None
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict) or "type" not in model and "vocab" not in model:
            raise ExtendError(f"{path}: not a tokenizer.json (no 'model' section)")
        kind = model.get("type") or ("BPE" if "merges" in model else "?")
        if kind != "BPE":
            raise ExtendError(
                f"{path}: a {kind} tokenizer; extend works on BPE bases only (byte-level like Llama-3/Qwen, "
                "or SentencePiece-style with byte fallback like Gemma/Llama-2)")
        text = json.dumps({k: spec.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")})
        if '"ByteLevel"' in text:
            return BYTE_LEVEL, spec
        if model.get("byte_fallback") or "\u2581" in text or '"Metaspace"' in text or "\\u2581" in text:
            return SENTENCEPIECE_JSON, spec
        raise ExtendError(f"{path}: a BPE tokenizer.json with neither a ByteLevel pre-tokenizer nor byte fallback/'▁' spaces; "
                          "cannot tell how it spells text, so cannot extend it")
    proto, problem = parse_sentencepiece(data)
    if proto is None:
        raise ExtendError(f"{path}: neither a tokenizer.json nor a SentencePiece model ({problem})")
    if problem is not None:
        raise ExtendError(f"{path}: {problem}; extend works on SentencePiece BPE models only")
    return SENTENCEPIECE_MODEL, data


def extend_tokenizer(
    base: str | Path,
    add: str | Path,
    output: str | Path,
    *,
    max_new: int | None = None,
    text_dir: str | Path | None = None,
    progress: bool = False,
) -> ExtensionResult:
    """Write the extended tokenizer of ``base`` with pieces of ``add`` into the directory ``output``."""
    from indicfm.tokenizer.extend_bytelevel import extend_byte_level
    from indicfm.tokenizer.extend_sentencepiece import (
        extend_sentencepiece_json,
        extend_sentencepiece_model,
        sentencepiece_to_tokenizer_json,
    )

    base, add, output = Path(base), Path(add), Path(output)
    if max_new is not None and max_new < 1:
        raise ExtendError(f"--max-new {max_new}: must be at least 1")
    base_file = read_base(base)
    kind, parsed = base_kind(base, base_file)
    try:
        model = read_indic_model(add)
        ranking, languages = balanced_frequency(model, Path(text_dir)) if text_dir is not None else (None, [])
    except SelectionError as err:
        raise ExtendError(str(err)) from None

    with _Progress(progress) as bar:
        bar.stage(f"choosing pieces of {add.name} for {base.name}")
        model_bytes = None
        try:
            if kind == BYTE_LEVEL:
                spec, added, selection, notes = extend_byte_level(parsed, model, max_new, ranking, str(base), bar.update)
            elif kind == SENTENCEPIECE_JSON:
                spec, added, selection, notes = extend_sentencepiece_json(parsed, model, max_new, ranking, str(base), bar.update)
        except SelectionError as err:
            raise ExtendError(str(err)) from None
        if kind == SENTENCEPIECE_MODEL:
            model_bytes, added, selection, notes = extend_sentencepiece_model(parsed, model, max_new, ranking, bar.update)
            spec = sentencepiece_to_tokenizer_json(model_bytes)
        base_size = added[0]["id"] if added else _size_of(kind, parsed)
        bar.stage(f"writing {output}")
        output.mkdir(parents=True, exist_ok=True)
        tokenizer_file = output / "tokenizer.json"
        tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        model_file = None
        if model_bytes is not None:
            model_file = output / "tokenizer.model"
            model_file.write_bytes(model_bytes)
        base_tokenizer = base_file.load()
        _write_config(base, base_tokenizer, output, kind)

    vocab_size = base_size + len(added)
    normalizer = _check_normalizer(base_tokenizer, tokenizer_file)
    result = ExtensionResult(
        output_dir=output, tokenizer_file=tokenizer_file, model_file=model_file, manifest_file=output / MANIFEST,
        base_kind=kind, base_size=base_size, vocab_size=vocab_size, added=added,
        by_script=count_by_script(a["text"] for a in added if a["text"]), skipped=dict(selection.skipped),
        method=selection.method, notes=notes, normalizer=normalizer,
    )  # fmt: skip
    manifest = {
        "indicfm_version": __version__,
        "base": {"path": str(base), "sha256": hashlib.sha256(base_file.data).hexdigest(), "kind": kind, "vocab_size": base_size},
        "add": {"path": str(add), "sha256": hashlib.sha256(model.model_proto).hexdigest()},
        "selection": {"method": selection.method, "max_new": max_new, "text_dir": str(text_dir) if text_dir else None,
                      "languages": languages, "skipped": result.skipped},
        "vocab_size": vocab_size,
        "padded_vocab_size": result.padded_size,
        "pad_multiple": PAD_MULTIPLE,
        "added_by_script": result.by_script,
        "normalizer": normalizer,
        "notes": notes,
        "added": added,
    }  # fmt: skip
    result.manifest_file.write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return result


def _size_of(kind: str, parsed: Any) -> int:
    if kind == SENTENCEPIECE_MODEL:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        proto = model_pb2.ModelProto()
        proto.ParseFromString(parsed)
        return len(proto.pieces)
    return max([*parsed["model"]["vocab"].values(), *(t["id"] for t in parsed.get("added_tokens", []))]) + 1


def _write_config(base: Path, base_tokenizer: Tokenizer, output: Path, kind: str) -> None:
    """The base's tokenizer_config.json (and special_tokens_map.json) where it has them, else one
    naming the special tokens indicfm finds in it: what load_tokenizer and transformers read."""
    copied = False
    if kind != SENTENCEPIECE_MODEL:
        for companion in (CONFIG_FILE, "special_tokens_map.json"):
            if (base.parent / companion).is_file():
                shutil.copyfile(base.parent / companion, output / companion)
                copied = True
    if copied:
        return
    special = base_tokenizer.special
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for role in ("bos", "eos", "pad", "unk"):
        s = getattr(special, role)
        config[f"{role}_token"] = s.token if s is not None else None
    (output / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _check_normalizer(base: Tokenizer, extended: Path) -> str:
    """What the extended tokenizer's normaliser does beyond NFC; it must be what the base's does."""
    before = [w.short for w in base.normalizer_warnings()]
    after = [w.short for w in load_tokenizer(extended).normalizer_warnings()]
    if before != after:  # a bug of the conversion, never the user's
        raise AssertionError(f"the extended tokenizer's normaliser differs from the base's: {after} vs {before}")
    return ", ".join(after) or "NFC-safe"


class _Progress:
    """A rich progress bar over the candidate pieces, or nothing (library calls and tests)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._progress.__enter__()
        return self

    def stage(self, description: str) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.update(self._task, completed=self._progress.tasks[-1].total or 1, total=self._progress.tasks[-1].total or 1)
            self._task = self._progress.add_task(description, total=None)

    def update(self, done: int, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

