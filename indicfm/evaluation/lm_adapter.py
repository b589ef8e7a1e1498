"""An indicfm model as an lm-evaluation-harness model (``lm_eval.api.model.LM``).

lm-eval turns every task into three kinds of requests and computes the metrics itself; this class
answers them with indicfm's own code:

* ``loglikelihood(context, continuation)``: the continuation's log-probability and whether greedy
  decoding would produce it.  Text is NFC-normalised once (:func:`indicfm.text.normalize`, as
  training text is) and tokenised like lm-eval's ``hf`` backend does (whitespace at the end of the
  context moves to the continuation; the continuation's tokens are those of ``context +
  continuation`` after the context's), after the run's start token, as every training document
  begins.  Requests are packed into fixed-shape rows (:mod:`~indicfm.evaluation.packing`) and
  scored by one jitted forward pass (:mod:`~indicfm.evaluation.scorer`).
* ``loglikelihood_rolling(text)``: the whole text's log-probability, in windows of a row
  (lm-eval's ``get_rolling_token_windows``), packed and scored the same way.
* ``generate_until(context, gen_kwargs)``: indicfm's KV-cache generation
  (:func:`indicfm.inference.generate.generate_ids`), greedy unless ``gen_kwargs`` ask to sample,
  cut at the first ``until`` string.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from lm_eval.api.model import LM

from indicfm.evaluation.packing import pack_requests
from indicfm.evaluation.scorer import Scorer
from indicfm.text import normalize

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


class IndicfmLM(LM):
    """lm-eval's model interface over an indicfm :class:`~indicfm.model.transformer.Transformer`.

    ``scorer`` holds the model and mesh (:class:`~indicfm.evaluation.scorer.Scorer`); ``tokenizer``
    is the run's :class:`indicfm.tokenizer.load.Tokenizer`.
    """

    def __init__(self, scorer: Scorer, tokenizer: Any, *, seed: int = 0):
        super().__init__()
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.seed = seed
        self.requests_scored = 0

    # -- tokenisation ----------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``([start] + context ids, continuation ids)`` as lm-eval's ``hf`` backend splits them."""
        context, continuation = normalize(context), normalize(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context) if context else []
        return [self.tokenizer.start_id] + context_ids, whole[len(context_ids):]

    # -- scoring ---------------------------------------------------------------------------------

    def score_pairs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """``(sum of the continuation's log-probs, every continuation token is the argmax)`` per
        ``(context ids, continuation ids)`` pair, packed ``scorer.rows`` rows to a batch."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        scorable = [i for i, (_, continuation) in enumerate(pairs) if len(continuation) > 0]
        for i in set(range(len(pairs))) - set(scorable):
            results[i] = (0.0, True)  # an empty continuation is certain
        packed = pack_requests([pairs[i] for i in scorable], self.scorer.row_len)
        if packed.truncated:
            log.warning("%d request(s) longer than a row (%d tokens) were cut from the left", packed.truncated,
                        self.scorer.row_len)
        by_row: dict[int, list[int]] = {}
        for k, span in enumerate(packed.spans):
            by_row.setdefault(span.row, []).append(k)
        for first_row, batch in packed.batches(self.scorer.rows):
            logp_RxL, greedy_RxL = self.scorer.score(batch)
            for r in range(self.scorer.rows):
                for k in by_row.get(first_row + r, ()):
                    span = packed.spans[k]
                    part = slice(span.first, span.first + span.count)
                    results[scorable[k]] = (float(np.sum(logp_RxL[r, part], dtype=np.float64)),
                                            bool(np.all(greedy_RxL[r, part])))
        self.requests_scored += len(pairs)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's ``loglikelihood``: ``(log p(continuation | context), is greedy)`` per request."""
        return self.score_pairs([self.encode_pair(*request.args) for request in requests])

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's ``loglikelihood_rolling``: log p(text) of each whole text, in windows of one row."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for index, request in enumerate(requests):
            ids = self.tokenizer.encode(normalize(request.args[0]))
            for window in get_rolling_token_windows(ids, self.tokenizer.start_id, self.scorer.row_len, 1):
                pairs.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logp, _) in zip(owner, self.score_pairs(pairs)):
            totals[index] += logp
        return totals

    # -- generation ------------------------------------------------------------------------------

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """lm-eval's ``generate_until``: each context continued (greedy unless ``do_sample`` or a
        ``temperature`` > 0 is asked) and cut before the first ``until`` string."""
        from indicfm.inference.generate import continuation_text

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        max_len = self.scorer.model.cfg.max_seq_len
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", DEFAULT_MAX_GEN_TOKS)))
            max_new = max(1, min(max_new, max_len - 1))
            sample = bool(kwargs.pop("do_sample", False)) or float(kwargs.get("temperature", 0.0) or 0.0) > 0
            options = {
                "max_new_tokens": max_new,
                "temperature": float(kwargs.get("temperature", 1.0) or 1.0) if sample else 0.0,
                "top_p": float(kwargs.get("top_p", 1.0) or 1.0) if sample else 1.0,
                "seed": self.seed,
                "eos_id": self.tokenizer.eos_id,
                "pad_id": self.tokenizer.padding_id,
                "vocab_limit": self.tokenizer.vocab_size,
            }
            for start in range(0, len(indices), self.scorer.rows):
                chunk = indices[start : start + self.scorer.rows]
                prompts = []
                for index in chunk:
                    ids = [self.tokenizer.start_id] + self.tokenizer.encode(normalize(requests[index].args[0]))
                    prompts.append(ids[-(max_len - max_new):])  # keep the end of a long prompt
                for index, generation in zip(chunk, self.scorer.generate(prompts, options)):
                    text = continuation_text(self.tokenizer, generation)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[index] = text
        return out  # type: ignore[return-value]
