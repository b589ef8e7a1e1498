"""Extend a byte-level BPE ``tokenizer.json`` (Llama-3, Qwen2/3, GPT-2/GPT-4o style) with Indic pieces.

Three changes, each unable to touch text without an Indic character (a character of
:data:`indicfm.tokenizer.piece_selection.INDIC_BLOCKS`), so English and code keep their ids:

1. **Pre-tokenizer.** The base's split regex takes words as ``\\p{L}+``, and Indic vowel signs and
   viramas are ``\\p{M}``: Llama-3 cuts ``हिन्दी`` into ``ह | िन | ्द | ी`` before BPE runs, so no
   merge can make a whole-word token.  An alternative is put first in the regex: an optional
   leading character like the base's own word rule (``[^\\r\\n\\p{L}\\p{N}]?``, usually the
   space), an Indic letter or sign, then Indic letters, signs and ZWJ/ZWNJ.  Where no Indic letter
   or sign occurs it never matches, and the regex finds exactly the base's pieces.
2. **Merges.** New merges build each Indic character from its UTF-8 bytes (lead byte first:
   ``E0 A4`` then ``+ B9`` for ``ह``), then the pieces in SentencePiece's own order
   (:func:`indicfm.tokenizer.piece_selection.pair_merges`; a half may also be a base token).
   Where they rank is decided per script (:func:`indicfm.tokenizer.piece_selection.order_merges`):
   for a script the base hardly knows (Llama-3: every Indic script) they rank before every base
   merge, so the base's merges across character boundaries never get in first and the script is
   segmented as indicfm's model does (a base merge they repeat is moved, not repeated); for a
   script the base knows they rank after all of the base's, so its segmentation is kept and only
   joined further.  Every new merge's result fixes an Indic character (a lead byte with the
   continuation byte that places it in an Indic block), checked by :func:`fires_only_on_indic`:
   on other text none can fire, and the base's merges run in their old order whatever the
   position of the new ones.  ZWJ/ZWNJ are general punctuation bytes (``E2 80``): they are never
   built by new merges; pieces holding them are added only where the base has them as a token.
3. **Vocabulary.** New tokens get ids after the base's last id (added tokens included); every base
   id keeps its string.  Byte prefixes of Indic characters the base lacks (``E0 A4``) are tokens
   too: they are listed in ``extension.json`` with their bytes and no text.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from indicfm.tokenizer.piece_selection import (
    INDIC_BLOCKS,
    INDIC_LETTERS,
    JOINERS,
    WHITESPACE,
    IndicModel,
    Selection,
    is_indic_symbol,
    contiguous_vocab,
    order_merges,
    pair_merges,
    script_of_piece,
    scripts_the_base_knows,
    select_pieces,
)

#: The split regex ``tokenizers``' ByteLevel pre-tokenizer uses with ``use_regex: true`` (GPT-2's).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table, which every byte-level BPE vocabulary is written in:
    printable Latin-1 bytes stand for themselves, the others are shifted to U+0100 and up."""
    from tokenizers import pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())  # the library's own alphabet
    return table


def to_byte_level(data: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


def piece_bytes(piece: str) -> bytes:
    """A SentencePiece piece's text as UTF-8 (``▁`` is the space)."""
    return piece.replace(WHITESPACE, " ").encode("utf-8")


def fires_only_on_indic(data: bytes) -> bool:
    """Whether any text holding ``data`` holds an Indic character: some lead byte in ``data``,
    with the continuation bytes after it, leaves only code points in the Indic blocks."""
    for i, lead in enumerate(data):
        if lead < 0xC0:
            continue
        length = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        tail = data[i + 1 : i + length]
        known = 0
        for b in tail:
            if b & 0xC0 != 0x80:
                break
            known += 1
        if known == 0:
            continue
        value = lead & (0x7F >> length)
        for b in tail[:known]:
            value = (value << 6) | (b & 0x3F)
        free = 6 * (length - 1 - known)
        lo, hi = value << free, (value << free) | ((1 << free) - 1)
        if any(a <= lo and hi <= b for a, b in INDIC_BLOCKS):
            return True
    return False


def _class_ranges(chars: set[str]) -> str:
    """A regex character class body (``\\x{0900}-\\x{0903}...``) for ``chars``."""
    points = sorted(ord(c) for c in chars)
    parts, start = [], points[0]
    for prev, cp in zip(points, [*points[1:], None]):
        if cp is None or cp != prev + 1:
            parts.append(f"\\x{{{start:04X}}}" + (f"-\\x{{{prev:04X}}}" if prev != start else ""))
            start = cp if cp is not None else start
    return "".join(parts)


def indic_word_alternative() -> str:
    """The regex alternative put first in the base's split: an Indic word with its leading character."""
    letters = _class_ranges(set(INDIC_LETTERS))
    joiners = _class_ranges(set(JOINERS))
    return f"[^\\r\\n\\p{{L}}\\p{{N}}]?[{letters}][{letters}{joiners}]*"


def patch_pre_tokenizer(pre: dict[str, Any] | None, name: str) -> tuple[dict[str, Any], str]:
    """The base's pre-tokenizer with :func:`indic_word_alternative` first in its split regex, and
    a sentence saying what was done.  A ``ByteLevel`` that splits by itself (``use_regex``) becomes
    the equivalent Split(GPT-2 regex) + ByteLevel without regex, as Llama-3's is written."""
    from indicfm.tokenizer.extend import ExtendError

    alternative = indic_word_alternative()
    if pre is None:
        raise ExtendError(f"{name}: a byte-level BPE without a pre-tokenizer; expected ByteLevel (and a Split)")
    if pre.get("type") == "ByteLevel":
        if not pre.get("use_regex", True):
            return pre, "pre-tokenizer unchanged (ByteLevel without a split regex: words are not cut)"
        split = {"type": "Split", "pattern": {"Regex": f"{alternative}|{GPT2_REGEX}"}, "behavior": "Isolated", "invert": False}
        level = {**pre, "use_regex": False}
        return {"type": "Sequence", "pretokenizers": [split, level]}, "ByteLevel's GPT-2 split regex made explicit, Indic words first"
    if pre.get("type") == "Sequence":
        steps = [dict(step) for step in pre.get("pretokenizers", [])]
        for i, step in enumerate(steps):
            if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
                if step.get("invert") or step.get("behavior") != "Isolated":
                    raise ExtendError(f"{name}: its Split pre-tokenizer is not an isolating regex split; cannot add Indic words")
                steps[i] = {**step, "pattern": {"Regex": f"{alternative}|{step['pattern']['Regex']}"}}
                return {**pre, "pretokenizers": steps}, "Indic-word alternative put first in the split regex"
            if step.get("type") == "ByteLevel" and step.get("use_regex", True):
                steps[i:i + 1] = list(patch_pre_tokenizer(step, name)[0]["pretokenizers"])
                return {**pre, "pretokenizers": steps}, "ByteLevel's GPT-2 split regex made explicit, Indic words first"
        return pre, "pre-tokenizer unchanged (no split regex)"
    raise ExtendError(f"{name}: byte-level BPE with a {pre.get('type')} pre-tokenizer; expected ByteLevel or a Sequence with a Split")


def extend_byte_level(
    spec: dict[str, Any], model: IndicModel, max_new: int | None, ranking: dict[str, float] | None, name: str, on_progress=None
) -> tuple[dict[str, Any], list[dict[str, Any]], Selection, list[str]]:
    """The extended ``tokenizer.json`` (as a dict), the added tokens ``[{id, token, text, bytes}]``
    in id order, the selection, and notes on what was done."""
    bpe = spec["model"]
    vocab, base_size = contiguous_vocab(spec, name)

    def in_base(piece: str) -> bool:
        return to_byte_level(piece_bytes(piece)) in vocab

    def usable_char(ch: str) -> bool:
        data = piece_bytes(ch)
        if len(data) == 1:
            return True
        if ch in JOINERS:  # general punctuation bytes: only where the base has the joiner as a token
            return to_byte_level(data) in vocab
        return all(fires_only_on_indic(data[:k]) for k in range(2, len(data) + 1))

    def missing_prefixes(ch: str) -> list[str]:
        data = piece_bytes(ch)
        if ch in JOINERS:
            return []
        return [data[:k].hex() for k in range(2, len(data)) if to_byte_level(data[:k]) not in vocab]

    selection = select_pieces(model, in_base, usable_char, max_new, ranking, on_progress, missing_prefixes)
    known = scripts_the_base_knows(model, in_base)  # before the vocabulary grows

    # characters from bytes, lead byte first; byte prefixes the base lacks become tokens
    char_merges: list[tuple[str, str]] = []
    prefixes: list[bytes] = []
    for ch in selection.symbols:
        data = piece_bytes(ch)
        if len(ch) > 1 or len(data) == 1 or ch in JOINERS:
            continue
        for k in range(2, len(data) + 1):
            char_merges.append((to_byte_level(data[: k - 1]), to_byte_level(data[k - 1 : k])))
            if k < len(data) and to_byte_level(data[:k]) not in vocab:
                prefixes.append(data[:k])
    piece_merges = [(to_byte_level(piece_bytes(a)), to_byte_level(piece_bytes(b)))
                    for a, b in pair_merges(selection.symbols, base_indic_tokens(vocab))]  # fmt: skip
    merges = list(dict.fromkeys(char_merges + piece_merges))
    unsafe = [m for m in merges if not fires_only_on_indic(_bytes_of(m[0] + m[1]))]
    if unsafe:  # a bug, never the user's input: refuse rather than change English
        raise AssertionError(f"merges that could fire on non-Indic text: {unsafe[:5]}")

    added: list[dict[str, Any]] = []
    for data in dict.fromkeys(prefixes):
        token = to_byte_level(data)
        vocab[token] = base_size + len(added)
        added.append({"id": vocab[token], "token": token, "text": None, "bytes": data.hex()})
    for piece in selection.new:
        token = to_byte_level(piece_bytes(piece))
        vocab[token] = base_size + len(added)
        added.append({"id": vocab[token], "token": token, "text": piece.replace(WHITESPACE, " "), "bytes": piece_bytes(piece).hex()})

    base_merges = [_pair(m) for m in bpe["merges"]]
    # characters' merges go with their script's: a script the base knows keeps the base's own
    # byte merges (which may cross characters) first
    first, after, first_scripts, after_scripts = order_merges(merges, known, base_merges, _script_of_token)
    ahead = set(first)
    moved = sum(1 for m in base_merges if m in ahead)
    all_merges = first + [m for m in base_merges if m not in ahead] + after
    as_strings = bool(bpe["merges"]) and isinstance(bpe["merges"][0], str)
    pre, pre_note = patch_pre_tokenizer(spec.get("pre_tokenizer"), name)
    out = {**spec, "pre_tokenizer": pre, "model": {**bpe, "vocab": vocab, "merges": [f"{a} {b}" if as_strings else [a, b] for a, b in all_merges]}}
    notes = [
        pre_note,
        f"{len(first):,} merges put before the base's {len(base_merges):,} ({moved:,} of them the "
        f"base's own, moved): Indic characters from bytes, and the pieces of {', '.join(first_scripts) or 'no script'}",
        f"{len(after):,} merges put after the base's, for the scripts it knows ({', '.join(after_scripts) or 'none'})",
    ]
    if prefixes:
        notes.append(f"{len(set(prefixes))} byte prefixes of Indic characters added as tokens (the base lacked them)")
    return out, added, selection, notes


def base_indic_tokens(vocab: dict[str, int]) -> set[str]:
    """The base's tokens that are Indic text (SentencePiece spelling, ``▁`` for the space)."""
    table = unicode_to_byte()
    out = set()
    for token in vocab:
        try:
            text = bytes(table[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        piece = text.replace(" ", WHITESPACE)
        if is_indic_symbol(piece):
            out.add(piece)
    return out


def _script_of_token(token: str) -> str:
    """The script of a byte-level token's text, or of the character its bytes begin (a prefix)."""
    data = _bytes_of(token)
    script = script_of_piece(data.decode("utf-8", errors="ignore"))
    if script != "?":
        return script
    lead = next((i for i, b in enumerate(data) if b >= 0xC0), None)
    if lead is None or lead + 1 >= len(data):
        return "?"
    length = 2 if data[lead] < 0xE0 else 3 if data[lead] < 0xF0 else 4
    value = data[lead] & (0x7F >> length)
    for b in data[lead + 1 : lead + length]:
        value = (value << 6) | (b & 0x3F)
    value <<= 6 * max(0, length - (len(data) - lead))
    return script_of_piece(chr(value))


def _pair(merge: str | list[str]) -> tuple[str, str]:
    if isinstance(merge, str):
        a, b = merge.split(" ", 1)
        return a, b
    return merge[0], merge[1]


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """The inverse of :func:`byte_to_unicode`: a byte-level vocabulary character -> its byte."""
    return {c: b for b, c in byte_to_unicode().items()}


def _bytes_of(token: str) -> bytes:
    table = unicode_to_byte()
    return bytes(table[c] for c in token)
