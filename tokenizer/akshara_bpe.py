"""Akshara-preserving BPE: byte-pair merges between whole grapheme clusters only, saved as a plain
SentencePiece BPE model.

Why: SentencePiece's BPE merges any two adjacent characters, and in Indic scripts the most frequent
pairs often straddle an akshara: a vowel sign with the next consonant (``ा`` + ``र`` → ``ार``), an
anusvara with the next consonant (Kannada ``ಂ`` + ``ಗ``).  Pieces that begin with a combining mark
then cut aksharas in two (measured on FLORES dev: 12% of Malayalam aksharas split).  No library
trainer takes a "never split a grapheme cluster" constraint, so this module learns the merges
itself, in two stages, and SentencePiece still does all the encoding:

1. **Aksharas first.** Every grapheme cluster (``regex`` ``\\X``, conjunct rules included) seen at
   least ``min_cluster_count`` times becomes a piece, together with its prefixes (``क्`` for ``क्ष``)
   because SentencePiece builds a piece from two smaller pieces.  These get the highest scores, so
   the encoder completes every known akshara before it joins aksharas together.
2. **Then BPE over aksharas.** Words (``▁`` + the text between spaces, as SentencePiece sees them)
   are sequences of clusters; the most frequent adjacent pair of symbols is merged, repeatedly, as
   in ordinary BPE.  Like SentencePiece with ``split_by_unicode_script`` and ``split_digits``, a
   merge never mixes scripts, letters with punctuation, or digits with anything.  Clusters too rare
   for stage 1 stay as loose characters that never merge.

No piece then starts inside an akshara, and SentencePiece's BPE encoder (which merges the
highest-scoring adjacent pair whose concatenation is a piece) reproduces the segmentation; only
clusters missing from the vocabulary are split (measured: ≈1% of aksharas instead of ≈6%).
"""

from __future__ import annotations

import heapq
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from functools import lru_cache

from indicfm.text import graphemes, script_of_char

#: SentencePiece's whitespace symbol (U+2581); every word starts with it.
WHITESPACE = "\u2581"
#: Marks a character of a rare cluster: such symbols never merge.
_LOOSE = "\x01"


@lru_cache(maxsize=1 << 20)
def symbol_class(symbol: str) -> str:
    """What a piece is made of, for the no-mixing rule: a script code, 'P' (punctuation and
    symbols), 'N' (digits), 'S' (other spaces), 'Z' (only ▁), 'L'/'O' (letters/other, unknown script)."""
    body = symbol.lstrip(WHITESPACE)
    if not body:
        return "Z"
    first = body[0]
    category = unicodedata.category(first)
    if category == "Nd":
        return "N"
    if category[0] in "PS":
        return "P"
    if category[0] in "ZC":
        return "S"
    return script_of_char(first) or ("L" if category[0] == "L" else "O")


@lru_cache(maxsize=1 << 22)
def may_merge(left: str, right: str, max_piece_chars: int) -> bool:
    """Whether ``left + right`` may become a piece (``▁`` may start a piece of anything but digits)."""
    if left[0] == _LOOSE or right[0] == _LOOSE or len(left) + len(right) > max_piece_chars:
        return False
    left_class, right_class = symbol_class(left), symbol_class(right)
    if right_class in ("Z", "N", "S") or left_class in ("N", "S"):
        return False
    return left_class == "Z" or left_class == right_class


def word_counts(sentences: Iterable[str]) -> Counter[str]:
    """Words as SentencePiece sees them: ``▁`` + the text between single spaces."""
    counts: Counter[str] = Counter()
    for sentence in sentences:
        for word in sentence.split(" "):
            counts[WHITESPACE + word] += 1
    return counts


def _clusters_of(word: str) -> list[str]:
    clusters = graphemes(word)
    # \X may attach a combining mark to the leading ▁; SentencePiece keeps ▁ a symbol of its own.
    if clusters and clusters[0].startswith(WHITESPACE) and len(clusters[0]) > 1:
        clusters = [WHITESPACE, clusters[0][1:]] + clusters[1:]
    return clusters


def learn_pieces(
    sentences: Iterable[str],
    budget: int,
    *,
    min_cluster_count: int = 5,
    max_piece_chars: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[str], set[str]]:
    """Learn up to ``budget`` multi-character pieces, best first; also return every character seen.

    At most half of ``budget`` goes to stage 1 (most frequent clusters first), so a small vocabulary
    still gets merges.
    """
    counts = word_counts(sentences)
    clusters_of_word = {word: _clusters_of(word) for word in counts}
    characters = {ch for word in counts for ch in word}
    cluster_counts: Counter[str] = Counter()
    for word, n in counts.items():
        for cluster in clusters_of_word[word]:
            cluster_counts[cluster] += n

    # Stage 1: frequent multi-character clusters and their prefixes.
    pieces: list[str] = []
    known: set[str] = set()
    for cluster, n in sorted(cluster_counts.items(), key=lambda item: (-item[1], item[0])):
        if n < min_cluster_count or len(pieces) >= budget // 2:
            break
        if len(cluster) < 2:
            continue
        for end in range(2, len(cluster) + 1):
            prefix = cluster[:end]
            if prefix not in known:
                known.add(prefix)
                pieces.append(prefix)
    pieces = pieces[: budget // 2]
    known = set(pieces)
    complete = known | characters

    # Stage 2: BPE over clusters. Symbols of words; rare clusters become loose characters.
    words: list[list[str]] = []
    weights: list[int] = []
    for word, n in counts.items():
        symbols: list[str] = []
        for cluster in clusters_of_word[word]:
            if len(cluster) == 1 or cluster in complete:
                symbols.append(cluster)
            else:
                symbols.extend(_LOOSE + ch for ch in cluster)
        words.append(symbols)
        weights.append(n)

    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            if may_merge(*pair, max_piece_chars):
                pair_counts[pair] += weights[index]
                pair_words[pair].add(index)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    target = budget - len(pieces)
    merged = 0
    while merged < target and heap:
        negative, pair = heapq.heappop(heap)
        current = pair_counts.get(pair, 0)
        if current != -negative:  # stale entry: the count fell since it was pushed
            if current > 0:
                heapq.heappush(heap, (-current, pair))
            continue
        left, right = pair
        new = left + right
        if new not in known:
            known.add(new)
            pieces.append(new)
            merged += 1
            if on_progress and merged % 1000 == 0:
                on_progress(merged, target)
        for index in pair_words.pop(pair, set()):
            _merge_in_word(words, weights, index, left, right, pair_counts, pair_words, heap, max_piece_chars)
        pair_counts.pop(pair, None)
    return pieces, characters


def _merge_in_word(words, weights, index, left, right, pair_counts, pair_words, heap, max_piece_chars) -> None:
    """Replace every (left, right) in one word and update the pair statistics incrementally."""
    symbols, weight = words[index], weights[index]
    for pair in zip(symbols, symbols[1:]):
        if pair in pair_counts and index in pair_words.get(pair, ()):
            pair_counts[pair] -= weight
            if pair_counts[pair] <= 0:
                del pair_counts[pair]
    for pair in set(zip(symbols, symbols[1:])):
        if pair in pair_words:
            pair_words[pair].discard(index)
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
            out.append(left + right)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    words[index] = out
    touched = set()
    for pair in zip(out, out[1:]):
        if may_merge(*pair, max_piece_chars):
            pair_counts[pair] += weight
            pair_words[pair].add(index)
            touched.add(pair)
    for pair in touched:
        heapq.heappush(heap, (-pair_counts[pair], pair))


def build_model(skeleton: bytes, pieces: list[str], characters: Iterable[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE ModelProto: the skeleton's specs, special and byte pieces, then ``pieces``
    in order (scores 0, -1, -2, ...: earlier pieces merge first), then every single character."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    skeleton_model = model_pb2.ModelProto()
    skeleton_model.ParseFromString(skeleton)
    normal = model_pb2.ModelProto.SentencePiece.NORMAL
    head = [p for p in skeleton_model.pieces if p.type != normal]
    head_strings = {p.piece for p in head}
    singles = set(characters) | {p.piece for p in skeleton_model.pieces if p.type == normal and len(p.piece) == 1}
    singles = sorted(singles - head_strings)
    multi = [p for p in pieces if len(p) > 1 and p not in head_strings]
    room = vocab_size - len(head) - len(singles)
    if room < 0:
        raise ValueError(f"vocab_size {vocab_size} cannot hold {len(head)} special/byte pieces and {len(singles)} characters")
    model = model_pb2.ModelProto()
    model.CopyFrom(skeleton_model)
    del model.pieces[:]
    model.pieces.extend(head)
    for rank, text in enumerate(multi[:room] + singles):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = text, -float(rank), normal
    model.trainer_spec.vocab_size = len(model.pieces)
    return model.SerializeToString()
