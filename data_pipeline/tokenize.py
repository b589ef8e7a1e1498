"""Encoding of a batch of documents as ``[start] ids [eos]`` each: SentencePiece memoised per word,
any other tokenizer (a Hugging Face ``tokenizer.json``) document by document (:func:`batch_encoder`).

Why: tokenizing is the largest single part of ``data prepare``'s work (``benchmarks/prepare.py``:
about 40% of its CPU time), and a corpus repeats its words over and over.  For the models
``indicfm tokenizer train`` writes, a document's ids are exactly the concatenation of the ids of its
space-separated words, so each distinct word is encoded by SentencePiece once and every later
occurrence is looked up (fast tokenizers keep such a word cache too; Hugging Face ``tokenizers``
with indicfm's model converted, ``indicfm.export.hf_tokenizer``, gives the same ids here but ran 3×
slower than SentencePiece on the benchmark corpus, 3-4× with a Metaspace pre-tokenizer).

Why that is exact: SentencePiece escapes each space to "▁" and prefixes the text with one
(``add_dummy_prefix``); BPE then repeatedly merges the adjacent pair whose merged piece scores best,
and only into pieces of the vocabulary.  When no piece has a "▁" anywhere but at its start, no merge
can cross the boundary before a "▁", and the merges inside one word depend only on that word's
symbols (scores are compared piece by piece; ties go to the leftmost pair, within the word as in the
document), so "a b" encodes as "▁a" followed by "▁b".  :func:`word_cacheable` checks that, and that
the normaliser leaves the text alone (``identity``, no whitespace squashing, as indicfm's tokenizers
are trained).  Not Unigram: its best segmentation is exact in real numbers, but SentencePiece sums
the path scores of a whole document in float32, and far into a long document rounding can flip a
near tie inside a word (found by review: a trained 8k Unigram model split 15 of 40 documents of
~10k pieces differently).  Other models are encoded document by document.

Why a NumPy table and not a ``dict``: looking up every word of a batch in a ``dict`` costs about
as much as SentencePiece's encoding of the words it saves (measured: 0.36 s for the 2.4M words of
the 163k-line benchmark corpus).  Here the words of a whole batch are hashed at once (two
independent 64-bit hashes of their code points) and looked up in a :class:`BandTable`; a word is
taken from the cache only when both hashes agree (a wrong hit needs a 128-bit collision), and a
batch where a 64-bit hash alone collides is simply encoded the plain way.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from indicfm.data.band_table import BandTable
from indicfm.data.dedup import splitmix64
from indicfm.tokenizer.load import SentencePieceTokenizer, Tokenizer

#: Joins a batch's documents into one string: never inside a document (the reader drops documents
#: with control characters; a batch that has one anyway is encoded the plain way).
_DOC_SEPARATOR = "\x00"
_SPACE_PIECE = "\u2581"  # "▁": SentencePiece's escaped space
#: Distinct words kept per process; past this the cache starts again empty.  Bounds its memory to
#: about 50 MB: the hash table (2^20 slots of 16 bytes, kept at most half full), the ids and 24
#: bytes per word.
MAX_WORDS = 500_000
#: New words encoded per SentencePiece call (joined by spaces, then cut at the pieces starting
#: with "▁"): one call per word costs several times more (SentencePiece's per-text overhead).
_NEW_WORDS_PER_CALL = 256
_SEED_1, _SEED_2 = np.uint64(0x243F6A8885A308D3), np.uint64(0x13198A2E03707344)


def word_cacheable(model_proto: bytes) -> bool:
    """Does a document of this model encode as the concatenation of its words' encodings?"""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    norm, trainer = model.normalizer_spec, model.trainer_spec
    plain_text = (
        norm.name == "identity" and not norm.precompiled_charsmap and norm.add_dummy_prefix
        and not norm.remove_extra_whitespaces and norm.escape_whitespaces
        and not trainer.treat_whitespace_as_suffix
    )
    bpe = trainer.model_type == sentencepiece_model_pb2.TrainerSpec.ModelType.BPE
    return plain_text and bpe and not any(_SPACE_PIECE in piece.piece[1:] for piece in model.pieces)


def _split_words(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code points, start, end) of the words of ``text`` split at every U+0020, empty ones included."""
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    spaces = np.flatnonzero(points == 32)
    starts = np.concatenate([[0], spaces + 1])
    ends = np.append(spaces, len(points))
    return points, starts, ends


def _word_hashes(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of each word: sums over its characters of a mix of (code
    point, position in the word), and its length; spaces contribute nothing."""
    position = np.arange(len(points), dtype=np.int64) - np.repeat(starts, ends - starts + 1)[: len(points)]
    unit = points.astype(np.uint64) | (position.astype(np.uint64) << np.uint64(21))
    lengths = (ends - starts).astype(np.uint64)
    out = []
    with np.errstate(over="ignore"):
        for seed in (_SEED_1, _SEED_2):
            per_char = splitmix64(unit ^ seed)
            per_char[points == 32] = 0
            running = np.concatenate([[np.uint64(0)], np.cumsum(per_char, dtype=np.uint64)])
            out.append(splitmix64(running[ends] - running[starts] + splitmix64(lengths + seed)))
    return out[0], out[1]


class BatchEncoder:
    """``encode(texts)`` → (every document's ids with BOS and EOS, concatenated; their lengths),
    equal to ``sp.encode(texts, add_bos=True, add_eos=True)``, with the word cache when
    :func:`word_cacheable` allows.  One per process (not thread-safe)."""

    def __init__(self, sp, model_proto: bytes | None = None):
        self.sp = sp
        self.uses_word_cache = word_cacheable(model_proto if model_proto is not None else sp.serialized_model_proto())
        self._starts_with_space = np.array(
            [sp.id_to_piece(i).startswith(_SPACE_PIECE) for i in range(sp.get_piece_size())], bool)
        self._reset()

    def _reset(self) -> None:
        self._table = BandTable(1 << 16)  # word hash 1 -> word number
        self._hash2 = np.zeros(1 << 12, np.uint64)  # per word number: its hash 2
        self._word_start = np.zeros(1 << 12, np.int64)  # per word number: where its ids start in _ids
        self._word_length = np.zeros(1 << 12, np.int64)
        self._ids = np.zeros(1 << 14, np.int32)
        self._words = self._used = 0
        # Two pseudo-words: the separator between two documents stands for (EOS, BOS), and the
        # empty word (between two spaces, or before/after a leading/trailing one) for a lone "▁".
        lone_space = self.sp.encode(" a")[: -len(self.sp.encode("a"))]
        points, starts, ends = _split_words(f"{_DOC_SEPARATOR} ")
        h1, h2 = _word_hashes(points, starts, ends)  # the words "\x00" and ""
        self._add(h1, h2, np.array([self.sp.eos_id(), self.sp.bos_id(), *lone_space], np.int32),
                  np.array([2, len(lone_space)]))

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        if self.uses_word_cache and all(texts):  # SentencePiece gives "" no ids at all, not a lone "▁"
            encoded = self._encode_words(f" {_DOC_SEPARATOR} ".join(texts), len(texts))
            if encoded is not None:
                return encoded
        ids = self.sp.encode(list(texts), add_bos=True, add_eos=True, num_threads=1)
        lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(lengths.sum())), lengths

    def _encode_words(self, joined: str, documents: int, *, after_reset: bool = False
                      ) -> tuple[np.ndarray, np.ndarray] | None:
        """The batch's ids from its words, or None where the cache can't vouch for them (a control
        character in a document, a 64-bit hash collision, too many new words at once)."""
        points, starts, ends = _split_words(joined)
        h1, h2 = _word_hashes(points, starts, ends)
        separators = (ends - starts == 1) & (points[np.minimum(starts, len(points) - 1)] == 0)
        if int(separators.sum()) != documents - 1:
            return None
        number = self._table.lookup(h1)
        missing = np.flatnonzero(number < 0)
        if len(missing):
            new_h1, first, which = np.unique(h1[missing], return_index=True, return_inverse=True)
            if self._words + len(new_h1) > MAX_WORDS:
                if after_reset or len(new_h1) > MAX_WORDS // 2:
                    return None
                self._reset()
                return self._encode_words(joined, documents, after_reset=True)
            first = missing[first]
            words = [joined[s:e] for s, e in zip(starts[first].tolist(), ends[first].tolist())]
            number[missing] = self._words + which
            self._add(new_h1, h2[first], *self._encode_new_words(words))
        if not np.array_equal(self._hash2[number], h2):
            return None  # a word shares hash 1 with another word (cached, or new in this batch)
        length = self._word_length[number]
        end = np.cumsum(length)
        total = int(end[-1])
        flat = np.empty(total + 2, np.int32)  # + the first BOS and the last EOS
        flat[0], flat[-1] = self.sp.bos_id(), self.sp.eos_id()
        flat[1:-1] = self._ids[np.arange(total) + np.repeat(self._word_start[number] - (end - length), length)]
        # A separator's (EOS, BOS) sits at flat[end - 1], flat[end]: each document ends at its EOS.
        eos_at = np.append(end[separators] - 1, total + 1)
        return flat, np.diff(eos_at, prepend=-1)

    def _encode_new_words(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths) of each word as a document of its own ("w" → "▁w"), concatenated."""
        ids_parts, length_parts = [], []
        for lo in range(0, len(words), _NEW_WORDS_PER_CALL):
            chunk = words[lo : lo + _NEW_WORDS_PER_CALL]
            text = " ".join(chunk)
            if _SPACE_PIECE not in text:  # a "▁" inside a word would cut it again
                ids = np.array(self.sp.encode(text, num_threads=1), np.int32)
                starts = np.flatnonzero(self._starts_with_space[ids])
                if len(starts) == len(chunk) and starts[0] == 0:
                    ids_parts.append(ids)
                    length_parts.append(np.diff(starts, append=len(ids)))
                    continue
            encoded = self.sp.encode(chunk, num_threads=1)
            ids_parts.append(np.fromiter(itertools.chain.from_iterable(encoded), np.int32))
            length_parts.append(np.fromiter(map(len, encoded), np.int64, count=len(encoded)))
        return np.concatenate(ids_parts), np.concatenate(length_parts)

    def _add(self, h1: np.ndarray, h2: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Cache words (hashes ``h1``, ``h2``, distinct and new) whose ids, concatenated, are ``ids``."""
        first, used, n = self._words, self._used, len(h1)
        if first + n > len(self._word_start):
            size = max(2 * len(self._word_start), first + n)
            self._word_start, self._word_length, self._hash2 = (
                np.resize(x, size) for x in (self._word_start, self._word_length, self._hash2))
        if used + len(ids) > len(self._ids):
            self._ids = np.resize(self._ids, max(2 * len(self._ids), used + len(ids)))
        self._word_start[first : first + n] = used + np.cumsum(lengths) - lengths
        self._word_length[first : first + n] = lengths
        self._hash2[first : first + n] = h2
        self._ids[used : used + len(ids)] = ids
        self._table.insert_new(h1, np.arange(first, first + n))
        self._words += n
        self._used += len(ids)


class DocumentEncoder:
    """``encode(texts)`` like :class:`BatchEncoder`'s, for any :class:`~indicfm.tokenizer.load.Tokenizer`:
    each document's ids between the tokenizer's start id (bos, or eos where it has none) and its eos.

    No word cache: a ``tokenizer.json``'s pre-tokenizer and normaliser decide where words end (a
    byte-level regex, a Metaspace, ...), so the exactness argument above does not carry over; the
    ``tokenizers`` library keeps a word cache of its own."""

    uses_word_cache = False

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        start, eos = self.tokenizer.start_id, self.tokenizer.eos_id
        ids = self.tokenizer.encode_batch(list(texts)) if texts else []
        lengths = np.fromiter((len(x) + 2 for x in ids), np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable([start, *x, eos] for x in ids), np.int32,
                           count=int(lengths.sum()))
        return flat, lengths


def batch_encoder(tokenizer: Tokenizer) -> BatchEncoder | DocumentEncoder:
    """The encoder for ``tokenizer``: SentencePiece with its own bos keeps the word-cached
    :class:`BatchEncoder` (byte-identical caches to before other tokenizers were supported)."""
    if isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.bos_id is not None:
        return BatchEncoder(tokenizer.processor)
    return DocumentEncoder(tokenizer)
