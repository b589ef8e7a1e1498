"""Serving settings for the model's own forward pass with a key/value cache.

Generation never recomputes the prefix: :class:`~indicfm.model.transformer.Transformer` takes an
optional :class:`~indicfm.model.transformer.KVCache` (``model(tokens, segment, positions,
cache=cache, start_slot=slot)``), so training and decoding run the same blocks, unrolled or
scanned.  ``tests/test_generate.py`` checks the cached path against the full forward pass, logit
for logit and token for token.  What is left here is the one thing serving changes: the config.
"""

from __future__ import annotations

from indicfm.model.attention import SELF_ATTENTION_ONLY, resolve_impl
from indicfm.model.config import ModelConfig


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The training config adjusted for serving: same parameters (and parameter layout),
    inference-safe kernels.

    * ``dispatch="dropless"``: capacity dispatch drops tokens depending on what else is in the batch,
      so a prompt's continuation would depend on its neighbours and on the cache length; dropless
      computes every chosen expert (as Hugging Face's Qwen2-MoE does).
    * cuDNN attention applies its causal mask by index (``is_causal``), which is wrong for one new
      query against a cache of earlier keys, and TPU splash attention only attends a sequence to
      itself; the XLA kernel with the explicit slot mask is used instead of either.
    """
    impl = "xla" if resolve_impl(cfg.attention_impl) in SELF_ATTENTION_ONLY else cfg.attention_impl
    return cfg.model_copy(update={"dispatch": "dropless", "attention_impl": impl, "remat": "none"})
