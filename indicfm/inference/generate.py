"""The generation loop: prompts in, continuations out, with a KV cache.

``generate_ids`` works on token ids and a model; ``generate_text`` adds the run's tokenizer
(SentencePiece or a ``tokenizer.json``, :mod:`indicfm.tokenizer.load`): NFC through
``indicfm.text.normalize``, then its ids after its start id (bos, or eos where it has none) and
without EOS — exactly how training documents begin: ``[BOS] tokens [EOS]``, positions from 0.

One jitted program per (batch bucket, prompt-length bucket, max_new_tokens, temperature, top_p);
token ids (EOS, padding, vocabulary limit) are traced values:

1. *prefill*: the left-padded prompts go through the model's forward pass once with an empty
   :class:`~indicfm.model.transformer.KVCache`, filling it; the first new token is chosen from the last column's logits;
2. *decode*: a ``lax.while_loop`` feeds one token per row per iteration (``L = 1``), so each new
   token costs one token's forward pass against the cache, and stops when every row has produced
   EOS or ``max_new_tokens`` tokens.  Rows that finished keep running (their output is padding),
   so the batch stays rectangular.

Shape legend: B batch, P prompt slots (longest prompt), N max new tokens, S cache slots, V vocab.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from indicfm.inference.sampling import sample_next
from indicfm.model.transformer import Transformer
from indicfm.tokenizer.load import Tokenizer

PAD_ID = 0
EOS_ID = 3
PROMPT_BUCKET = 16


@dataclass
class Generation:
    """One prompt's result.  ``token_ids`` are the new tokens, without the final EOS."""

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "eos" | "length"


@dataclass
class TextGeneration(Generation):
    prompt: str = ""
    text: str = ""  # the decoded continuation (without the prompt)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = PAD_ID, multiple_of: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``tokens, segment_ids, positions`` ``[B, P]`` with each prompt right-aligned (padding first);
    P is the longest prompt rounded up to ``multiple_of``.

    Padding has segment 0 and position 0; a prompt's tokens have segment 1 and positions 0, 1, ...
    """
    P = -(-max(len(p) for p in prompts) // multiple_of) * multiple_of
    B = len(prompts)
    tokens = np.full((B, P), pad_id, np.int32)
    segment = np.zeros((B, P), np.int32)
    positions = np.zeros((B, P), np.int32)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[row, P - n :] = prompt
        segment[row, P - n :] = 1
        positions[row, P - n :] = np.arange(n)
    return tokens, segment, positions


def mask_logits(logits_BxV: jax.Array, vocab_limit: jax.Array | int, pad_id: jax.Array | int) -> jax.Array:
    """Never pick padding, nor ids past the tokenizer's vocabulary (the model's table may be larger)."""
    ids_V = jnp.arange(logits_BxV.shape[-1])
    banned_V = (ids_V == pad_id) | (ids_V >= vocab_limit)
    return jnp.where(banned_V, -jnp.inf, logits_BxV)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"),
)
def _generate_program(
    state: Any,
    tokens_BxP: jax.Array,
    segment_BxP: jax.Array,
    positions_BxP: jax.Array,
    key: jax.Array,
    eos_id: jax.Array,
    pad_id: jax.Array,
    vocab_limit: jax.Array,
    *,
    graphdef: Any,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> tuple[jax.Array, jax.Array]:
    """Prefill + while-loop decode; returns new tokens ``[B, N]`` (pad after EOS) and how many
    tokens each row produced ``[B]`` (EOS included).  Token ids are traced values, so changing
    them does not recompile."""
    model = nnx.merge(graphdef, state)
    B, P = tokens_BxP.shape
    N = max_new_tokens
    cache = model.init_cache(B, P + N)

    # A tokenizer without a pad token pads with its eos (indicfm.tokenizer.specials): that id must
    # stay choosable, or no row could ever stop.
    never_id = jnp.where(pad_id == eos_id, -1, pad_id)

    def choose(logits_BxV: jax.Array, key_: jax.Array) -> jax.Array:
        return sample_next(mask_logits(logits_BxV, vocab_limit, never_id), key_, temperature, top_p)

    logits_BxPxV, _, cache = model(tokens_BxP, segment_BxP, positions_BxP, cache=cache, start_slot=0)
    key, sub = jax.random.split(key)
    first_B = choose(logits_BxPxV[:, -1], sub)  # left padding: the last column is every prompt's end
    out_BxN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(first_B)
    done_B = first_B == eos_id
    length_B = jnp.ones((B,), jnp.int32)
    next_position_B = jnp.sum(segment_BxP, axis=1).astype(jnp.int32)  # prompt lengths

    def keep_going(carry) -> jax.Array:
        i, _, _, done_B_, _, _, _ = carry
        return (i < N) & ~jnp.all(done_B_)

    def one_token(carry):
        i, cache_, out_BxN_, done_B_, length_B_, position_B, key_ = carry
        previous_B = out_BxN_[:, i - 1]
        segment_B = jnp.where(done_B_, 0, 1).astype(jnp.int32)  # finished rows feed padding
        logits_Bx1xV, _, cache_ = model(
            previous_B[:, None], segment_B[:, None], position_B[:, None], cache=cache_, start_slot=P + i - 1
        )
        key_, sub_ = jax.random.split(key_)
        token_B = jnp.where(done_B_, pad_id, choose(logits_Bx1xV[:, 0], sub_))
        out_BxN_ = out_BxN_.at[:, i].set(token_B)
        length_B_ = length_B_ + (~done_B_).astype(jnp.int32)
        done_B_ = done_B_ | (token_B == eos_id)
        return i + 1, cache_, out_BxN_, done_B_, length_B_, position_B + 1, key_

    carry = (jnp.int32(1), cache, out_BxN, done_B, length_B, next_position_B, key)
    _, _, out_BxN, _, length_B, _, _ = jax.lax.while_loop(keep_going, one_token, carry)
    return out_BxN, length_B


def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
    vocab_limit: int | None = None,
) -> list[Generation]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    ``temperature == 0`` is greedy; otherwise tokens are drawn from the temperature-scaled
    distribution restricted to the ``top_p`` nucleus, reproducibly for a given ``seed``.
    ``vocab_limit``: ids at or above it are never chosen (the tokenizer's size when the model's
    embedding table is larger).  Build the model from ``inference_config(cfg)``.
    """
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty: the model needs at least one token to continue")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({longest - max_new_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {longest} exceeds "
            f"model.max_seq_len={model.cfg.max_seq_len}; ask for fewer new tokens or shorten the prompt"
        )
    # Shapes are bucketed (rows to a power of two, prompt slots to a multiple of 16) so a batch run
    # over many prompts compiles a handful of programs, not one per distinct prompt length.
    rows = 1 << (len(prompts) - 1).bit_length()
    padded = list(prompts) + [prompts[0]] * (rows - len(prompts))  # extra rows are dropped below
    tokens, segment, positions = left_pad(padded, pad_id, multiple_of=PROMPT_BUCKET)
    graphdef, state = nnx.split(model)
    out_BxN, length_B = _generate_program(
        state, jnp.asarray(tokens), jnp.asarray(segment), jnp.asarray(positions), jax.random.key(seed),
        jnp.int32(eos_id), jnp.int32(pad_id), jnp.int32(model.cfg.vocab_size if vocab_limit is None else vocab_limit),
        graphdef=graphdef, max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
    )
    out_BxN, length_B = np.asarray(out_BxN), np.asarray(length_B)
    results = []
    for row, prompt in enumerate(prompts):
        new = [int(t) for t in out_BxN[row, : length_B[row]]]
        finished = bool(new) and new[-1] == eos_id
        results.append(Generation(list(map(int, prompt)), new[:-1] if finished else new, "eos" if finished else "length"))
    return results


def generate_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    **options: Any,
) -> list[TextGeneration]:
    """:func:`generate_ids` on text: prompts are NFC-normalised and encoded as ``[BOS] tokens`` (as
    training documents begin); continuations are decoded with the same ``tokenizer``."""
    from indicfm.text import normalize

    encoded = [[tokenizer.start_id] + tokenizer.encode(normalize(p)) for p in prompts]
    options.setdefault("vocab_limit", tokenizer.vocab_size)
    options.setdefault("eos_id", tokenizer.eos_id)
    options.setdefault("pad_id", tokenizer.padding_id)
    results = generate_ids(model, encoded, **options)
    return [
        TextGeneration(g.prompt_ids, g.token_ids, g.finish_reason, prompt=p, text=continuation_text(tokenizer, g))
        for p, g in zip(prompts, results)
    ]


def continuation_text(tokenizer: Tokenizer, generation: Generation) -> str:
    """The new text as it reads after the prompt.

    Decoding the new ids alone would drop the space a first piece like ``▁word`` stands for
    (SentencePiece strips the leading space of a decoded text), so the whole sequence is decoded
    and the decoded prompt is cut off the front.
    """
    prompt_text = tokenizer.decode(generation.prompt_ids)
    full_text = tokenizer.decode(generation.prompt_ids + generation.token_ids)
    if full_text.startswith(prompt_text):
        return full_text[len(prompt_text):]
    return tokenizer.decode(generation.token_ids)  # a character's bytes split across the boundary
