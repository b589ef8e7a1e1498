"""Which of indicfm's SentencePiece pieces a base tokenizer gains, and the merges that reach them.

Used by ``indicfm tokenizer extend`` (:mod:`indicfm.tokenizer.extend`) for every kind of base; this
module knows nothing of a base's file format: the base is a few callables ("is this piece already a
token", "can this character be a symbol", ...).

* **Indic pieces.** A piece qualifies when it is an optional leading ``▁`` followed by letters and
  signs of the Brahmic scripts of :data:`indicfm.text.SCRIPT_RANGES`, plus Ol Chiki and Meetei
  Mayek (:data:`INDIC_SCRIPTS`), ZWJ/ZWNJ allowed after the first.  Latin is what the base must
  keep; Arabic-script pieces are left out because changing them would also change the base's
  Arabic and Persian text, which open models already tokenize reasonably.
* **Ranking** (``max_new``).  Single characters the base lacks come first (a few hundred at
  most), so every script's letters become symbols even with a small budget — a language without
  training text (Kannada here) would otherwise gain nothing.  Then, by default, the model's own
  order: indicfm's trainer gives every language the same sentence budget (``sampling_alpha =
  0``) and its BPE scores are merge order, so earlier pieces are the more frequent ones in a
  language-balanced sample, and a piece's ancestors come before it.  With text (``--text DIR``,
  one file per language), pieces are ranked by their share of each language's tokens when that
  text is encoded with the model, summed over languages: every language counts the same however
  much text it has, so each one gains.
* **Closure.** A piece is added with every piece SentencePiece builds it from (its derivation: the
  merges SentencePiece's BPE makes on the piece's own text) that the base lacks, so every added
  piece is reachable by merges; a candidate whose closure does not fit into ``max_new`` is passed.
* **Merges** (:func:`pair_merges`): every split ``a + b`` of a symbol whose halves are symbols
  (or tokens the base already makes), ranked by the symbol's score — how SentencePiece's BPE
  encodes (merge the adjacent pair whose concatenation scores highest) written as ranked merges,
  the way Hugging Face converts a SentencePiece BPE model to a ``tokenizer.json``.
* **Where they rank** (:func:`order_merges`), per script: before the base's merges where the base
  hardly knows the script, after them where it does (:data:`KNOWN_SCRIPT_SHARE`).  Measured on
  FLORES dev: Gemma-3 with the new merges first got worse on Bengali (1.669 → 1.844 tokens per
  word) and Telugu, with them after it improved on every language; Llama-3 with them after gained
  less on Hindi (1.58 vs 1.46), its Devanagari tokens being fragments.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from indicfm.text import SCRIPT_RANGES, ZWJ, ZWNJ, language_of_path, normalize, script_letters, script_of_char

#: SentencePiece's whitespace symbol.
WHITESPACE = "\u2581"
#: Scripts whose pieces are added: every script of SCRIPT_RANGES but Latin and Arabic (see the module docstring).
INDIC_SCRIPTS: tuple[str, ...] = tuple(s for s in SCRIPT_RANGES if s not in ("Latn", "Arab"))
#: Letters and combining signs of those scripts: what an added piece is made of.
INDIC_LETTERS: frozenset[str] = frozenset(ch for s in INDIC_SCRIPTS for ch in script_letters(s))
#: The Unicode blocks of those scripts.  Text without a character of these is "not Indic": the
#: extended tokenizer must give it exactly the base's ids.
INDIC_BLOCKS: tuple[tuple[int, int], ...] = tuple(r for s in INDIC_SCRIPTS for r in SCRIPT_RANGES[s])
JOINERS = frozenset((ZWJ, ZWNJ))


def in_indic_blocks(code_point: int) -> bool:
    return any(lo <= code_point <= hi for lo, hi in INDIC_BLOCKS)


def has_indic_character(text: str) -> bool:
    """Whether ``text`` holds a character of :data:`INDIC_BLOCKS` (the line between "unchanged" and "extended")."""
    return any(in_indic_blocks(ord(ch)) for ch in text)


def is_indic_piece(piece: str) -> bool:
    """An optional leading ``▁``, then an Indic letter or sign, then more of them or ZWJ/ZWNJ."""
    body = piece[1:] if piece.startswith(WHITESPACE) else piece
    return bool(body) and body[0] in INDIC_LETTERS and all(ch in INDIC_LETTERS or ch in JOINERS for ch in body)


def is_indic_symbol(piece: str) -> bool:
    """What a merge may produce: ``▁`` only first, then Indic letters, signs and ZWJ/ZWNJ, at least
    one letter or sign (so a merge can only fire on text that holds an Indic character)."""
    body = piece[1:] if piece.startswith(WHITESPACE) else piece
    return bool(body) and all(ch in INDIC_LETTERS or ch in JOINERS for ch in body) and any(ch in INDIC_LETTERS for ch in body)


def script_of_piece(piece: str) -> str:
    return next((s for ch in piece if (s := script_of_char(ch))), "?")


@dataclass(frozen=True)
class IndicModel:
    """The pieces of an indicfm (SentencePiece BPE) model that matter here: each Indic piece's score
    and id, and every normal piece's score (derivations pass through them)."""

    path: str
    scores: dict[str, float]  # every NORMAL piece -> score (higher merges first)
    ids: dict[str, int]
    model_proto: bytes

    @property
    def indic_pieces(self) -> list[str]:
        """Indic pieces in the model's order (score, then id)."""
        return sorted((p for p in self.scores if is_indic_piece(p)), key=lambda p: (-self.scores[p], self.ids[p]))


class SelectionError(ValueError):
    """The ``--add`` model cannot be used (not SentencePiece, not BPE, no Indic pieces)."""


def parse_sentencepiece(data: bytes) -> tuple[object, str | None]:
    """``(ModelProto, None)`` for a SentencePiece BPE model's bytes; ``(None, why it does not parse)``
    for something else; ``(ModelProto, "a SentencePiece <KIND> model")`` for another model type."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as err:
        return None, str(err)
    if not proto.pieces:
        return None, "no pieces"
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        return proto, f"a SentencePiece {model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)} model"
    return proto, None


def read_indic_model(path: str | Path) -> IndicModel:
    """Parse ``path`` as a SentencePiece BPE model; a clear :class:`SelectionError` otherwise."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SelectionError(f"{path}: cannot read the --add model ({err.strerror or err})") from None
    model, problem = parse_sentencepiece(data)
    if model is None:
        raise SelectionError(f"{path}: not a SentencePiece model ({problem})")
    if problem is not None:
        raise SelectionError(f"{path}: {problem}; --add needs a BPE model (indicfm tokenizer train --model-type bpe)")
    normal = model_pb2.ModelProto.SentencePiece.NORMAL
    scores = {p.piece: p.score for p in model.pieces if p.type == normal}
    ids = {p.piece: i for i, p in enumerate(model.pieces)}
    indic = IndicModel(str(path), scores, ids, data)
    if not indic.indic_pieces:
        raise SelectionError(f"{path}: holds no piece of the Indic scripts ({', '.join(INDIC_SCRIPTS)})")
    return indic


def derivation(piece: str, scores: dict[str, float]) -> list[str] | None:
    """The pieces SentencePiece's BPE makes, in order, when it encodes ``piece`` alone (the last is
    ``piece``); None when it does not end in ``piece`` (not reachable in the model itself)."""
    symbols = list(piece)
    made: list[str] = []
    while len(symbols) > 1:
        best, at = None, -1
        for i in range(len(symbols) - 1):
            score = scores.get(symbols[i] + symbols[i + 1])
            if score is not None and (best is None or score > best):
                best, at = score, i
        if best is None:
            return None
        symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
        made.append(symbols[at])
    return made if symbols == [piece] else None


def balanced_frequency(model: IndicModel, text_dir: Path, max_lines: int = 20_000) -> tuple[dict[str, float], list[str]]:
    """piece -> sum over languages of (its count ÷ the language's tokens) when ``text_dir``'s files
    (``hin_Deva.txt``, ...; at most ``max_lines`` lines each, NFC) are encoded with ``model``; and the
    languages read.  Files of other scripts (English, Urdu) are ignored."""
    import sentencepiece as spm

    text_dir = Path(text_dir)
    if not text_dir.is_dir():
        raise SelectionError(f"{text_dir}: no such directory (--text wants one text file per language, e.g. hin_Deva.txt)")
    processor = spm.SentencePieceProcessor(model_proto=model.model_proto)
    share: Counter[str] = Counter()
    languages = []
    for path in sorted(p for p in text_dir.iterdir() if p.is_file()):
        lang = language_of_path(path)
        if "_" not in lang or lang.split("_", 1)[1] not in INDIC_SCRIPTS:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [normalize(line.rstrip("\n")) for _, line in zip(range(max_lines), f)]
        counts: Counter[int] = Counter()
        for ids in processor.encode([line for line in lines if line.strip()]):
            counts.update(ids)
        total = sum(counts.values())
        if not total:
            continue
        languages.append(lang)
        for piece_id, n in counts.items():
            share[processor.id_to_piece(piece_id)] += n / total
    if not languages:
        raise SelectionError(f"{text_dir}: no text file of an Indic script (names like hin_Deva.txt)")
    return dict(share), languages


@dataclass
class Selection:
    """What a base gains: ``new`` pieces in id order (each after the pieces it is built from) and
    the symbols the merges work on (``new`` + the model's Indic pieces the base already has + the
    characters of both)."""

    new: list[str]
    symbols: dict[str, float]  # symbol -> score for pair_merges (characters get -inf: never merged into)
    method: str
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> candidates passed over


def select_pieces(
    model: IndicModel,
    in_base: Callable[[str], bool],
    usable_char: Callable[[str], bool],
    max_new: int | None,
    ranking: dict[str, float] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    char_extras: Callable[[str], Iterable[str]] = lambda ch: (),
) -> Selection:
    """Choose up to ``max_new`` (None: all) pieces the base lacks, closed under derivation.

    ``in_base(piece)``: the base has the piece as a token already.  ``usable_char(ch)``: a
    character the extended tokenizer can hold as one symbol (a byte-level base cannot build ZWJ
    safely itself unless it already does).  ``ranking``: piece -> weight (higher first; the model's
    order breaks ties and orders the rest); None: the model's order.  ``char_extras(ch)``: other
    new tokens a character needs (a byte-level base's missing byte prefixes), counted in ``max_new``.
    """
    candidates = model.indic_pieces
    order = {p: i for i, p in enumerate(candidates)}
    weight = ranking or {}
    # single characters first: every script's letters become symbols even with a small budget
    candidates = sorted(candidates, key=lambda p: (len(p) > 1, -weight.get(p, 0.0), order[p]))
    limit = len(candidates) if max_new is None else max_new
    chosen: dict[str, None] = {}  # ordered set
    skipped: Counter[str] = Counter()
    present = [p for p in model.scores if len(p) > 1 and is_indic_symbol(p) and in_base(p) and all(map(usable_char, p))]
    extras = dict.fromkeys(x for p in present for ch in p for x in char_extras(ch))
    for done, piece in enumerate(candidates):
        if on_progress and done % 2000 == 0:
            on_progress(done, len(candidates))
        if piece in chosen or in_base(piece):
            continue
        if not all(usable_char(ch) for ch in piece):
            skipped["holds a character the base cannot build safely"] += 1
            continue
        steps = derivation(piece, model.scores) if len(piece) > 1 else [piece]
        if steps is None:
            skipped["not reachable by the model's own merges"] += 1
            continue
        need = [ch for ch in piece if ch not in chosen and not in_base(ch)]
        need += [p for p in steps if p not in chosen and not in_base(p)]
        need = list(dict.fromkeys(need))
        if not all(len(p) == 1 or is_indic_symbol(p) for p in need):
            skipped["built from a piece that is not Indic text"] += 1
            continue
        need_extras = [x for x in dict.fromkeys(x for ch in piece for x in char_extras(ch)) if x not in extras]
        if len(chosen) + len(extras) + len(need) + len(need_extras) > limit:
            skipped["closure does not fit into --max-new"] += 1
            continue
        chosen.update(dict.fromkeys(need))
        extras.update(dict.fromkeys(need_extras))
    if on_progress:
        on_progress(len(candidates), len(candidates))
    symbols: dict[str, float] = {}
    for piece in [*present, *chosen]:
        for ch in piece:
            symbols.setdefault(ch, float("-inf"))
    for piece in [*present, *chosen]:
        if len(piece) > 1:
            symbols[piece] = model.scores[piece]
    method = "balanced frequency over --text languages" if ranking is not None else "model order (language-balanced BPE merge order)"
    return Selection(new=list(chosen), symbols=symbols, method=method, skipped=skipped)


#: A script the base "knows": it has at least this share of the model's most frequent pieces of
#: the script as tokens already (of the first KNOWN_SCRIPT_PROBE multi-character pieces).
KNOWN_SCRIPT_SHARE = 0.2
KNOWN_SCRIPT_PROBE = 2000


def scripts_the_base_knows(model: IndicModel, in_base: Callable[[str], bool]) -> dict[str, float]:
    """Script -> share of the model's first :data:`KNOWN_SCRIPT_PROBE` multi-character pieces of
    that script that the base has as tokens (scripts with no such piece are left out)."""
    by_script: dict[str, list[str]] = {}
    for piece in model.indic_pieces:
        if len(piece.lstrip(WHITESPACE)) > 1:
            pieces = by_script.setdefault(script_of_piece(piece), [])
            if len(pieces) < KNOWN_SCRIPT_PROBE:
                pieces.append(piece)
    return {script: sum(map(in_base, pieces)) / len(pieces) for script, pieces in sorted(by_script.items())}


def order_merges(
    merges: list[tuple[str, str]],
    known: dict[str, float],
    base_merges: list[tuple[str, str]],
    script_of: Callable[[str], str] = script_of_piece,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str], list[str]]:
    """Split new merges by the script of what they make: (before the base's, after them, scripts
    first, scripts after).  Where the base knows a script (:data:`KNOWN_SCRIPT_SHARE`) its own
    merges run first and the new ones join its tokens further, so no word of that script gets more
    tokens than before; elsewhere the new merges run first and the script is segmented as
    indicfm's model does (the base's merges there are byte or character fragments).  A pair the
    base has keeps its place when it goes after; going first, it is moved.  ``script_of``: the
    script of a merge's result as written in the base's vocabulary."""
    after_scripts = {script for script, share in known.items() if share >= KNOWN_SCRIPT_SHARE}
    base_pairs = set(base_merges)
    first, after = [], []
    for a, b in merges:
        if script_of(a + b) in after_scripts:
            if (a, b) not in base_pairs:
                after.append((a, b))
        else:
            first.append((a, b))
    first_scripts = sorted(set(known) - after_scripts)
    return first, after, first_scripts, sorted(after_scripts)


def pair_merges(symbols: dict[str, float], halves: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Every ``(a, b)`` with ``a + b`` a symbol and ``a``, ``b`` symbols or ``halves`` (tokens the
    base makes), best-scored ``a + b`` first (ties: the longer left part first, so merges are
    deterministic)."""
    merges = []
    for piece, score in symbols.items():
        if len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if (left in symbols or left in halves) and (right in symbols or right in halves):
                merges.append((-score, -len(left), piece, left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def contiguous_vocab(spec: dict, name: str) -> tuple[dict[str, int], int]:
    """A ``tokenizer.json``'s model vocabulary holding its added tokens too, and the base size.

    Why: ``tokenizers`` gives an added token missing from the model's vocabulary the id "model
    vocabulary size + its index", ignoring the id written in the file.  Llama-3's 256 special
    tokens (128000-128255) sit above a 128,000-entry model vocabulary; once new pieces are appended
    after them the model vocabulary grows and the specials would move.  Written into the model's
    vocabulary at their own ids they stay put (added tokens are still matched before the model runs).
    """
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    taken = set(vocab.values())
    for token in spec.get("added_tokens", []):
        if token["content"] not in vocab and token["id"] not in taken:
            vocab[token["content"]] = token["id"]
            taken.add(token["id"])
    size = max(taken) + 1
    if len(taken) != size:
        missing = sorted(set(range(size)) - taken)[:5]
        raise SelectionError(f"{name}: its ids are not contiguous (no token has id {missing}...); cannot append after them")
    return vocab, size


def count_by_script(pieces: Iterable[str]) -> dict[str, int]:
    counts = Counter(script_of_piece(p) for p in pieces)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
