"""Qwen2-MoE forward pass in NumPy float32, written from the published architecture definition.

This is the check of the export, so it deliberately shares no code with indicfm's model: it reads a
Hugging Face ``config.json`` dict and tensors by their Hugging Face names and layouts (``nn.Linear``
weights are ``[out, in]``), and follows transformers' ``modeling_qwen2_moe.py`` step by step:

* ``h = embed_tokens[ids]``; per layer ``h += o_proj(attn(input_layernorm(h)))`` then
  ``h += mlp(post_attention_layernorm(h))``; ``logits = lm_head(norm(h))`` (``lm_head`` is
  ``embed_tokens`` when ``tie_word_embeddings``);
* RMSNorm: ``w * x / sqrt(mean(x²) + eps)``;
* attention: q/k/v projections with bias, heads of ``head_dim``, rotary embedding with
  ``inv_freq = theta^(-2i/head_dim)`` applied as ``x*cos + rotate_half(x)*sin`` (the two halves of
  the head), key/value heads repeated for grouped queries, causal softmax scaled by
  ``1/sqrt(head_dim)``;
* a layer is sparse unless its index is in ``mlp_only_layers`` (or ``(i+1) % decoder_sparse_step``);
  sparse MLP: ``softmax`` over all expert logits, the ``num_experts_per_tok`` largest kept
  (renormalised when ``norm_topk_prob``), each chosen expert's SwiGLU weighted by its probability,
  plus ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``.

Shape legend: L length, D model, H heads, K kv heads, G head dim, V vocab.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def _rms_norm(x_LxD: np.ndarray, weight_D: np.ndarray, eps: float) -> np.ndarray:
    return weight_D * (x_LxD / np.sqrt(np.mean(x_LxD * x_LxD, axis=-1, keepdims=True) + eps))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _linear(x: np.ndarray, weight_OxI: np.ndarray, bias_O: np.ndarray | None = None) -> np.ndarray:
    y = x @ weight_OxI.T
    return y if bias_O is None else y + bias_O


def _swiglu(x_LxD: np.ndarray, t: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    gate = _linear(x_LxD, t[f"{prefix}.gate_proj.weight"])
    up = _linear(x_LxD, t[f"{prefix}.up_proj.weight"])
    return _linear(_silu(gate) * up, t[f"{prefix}.down_proj.weight"])


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _attention(x_LxD: np.ndarray, t: Mapping[str, np.ndarray], prefix: str, config: Mapping) -> np.ndarray:
    L = x_LxD.shape[0]
    H, K = config["num_attention_heads"], config["num_key_value_heads"]
    G = config.get("head_dim") or config["hidden_size"] // H
    q = _linear(x_LxD, t[f"{prefix}.q_proj.weight"], t.get(f"{prefix}.q_proj.bias")).reshape(L, H, G)
    k = _linear(x_LxD, t[f"{prefix}.k_proj.weight"], t.get(f"{prefix}.k_proj.bias")).reshape(L, K, G)
    v = _linear(x_LxD, t[f"{prefix}.v_proj.weight"], t.get(f"{prefix}.v_proj.bias")).reshape(L, K, G)

    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    inv_freq = 1.0 / (theta ** (np.arange(0, G, 2, dtype=np.float32) / G))
    freqs_LxG2 = np.arange(L, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb_LxG = np.concatenate([freqs_LxG2, freqs_LxG2], axis=-1)
    cos, sin = np.cos(emb_LxG)[:, None, :], np.sin(emb_LxG)[:, None, :]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin

    k = np.repeat(k, H // K, axis=1)  # kv head j serves query heads j*(H/K) ... (j+1)*(H/K)-1
    v = np.repeat(v, H // K, axis=1)
    scores_HxLxL = np.einsum("qhg,khg->hqk", q, k) / np.sqrt(G)
    causal_LxL = np.tril(np.ones((L, L), bool))
    scores_HxLxL = np.where(causal_LxL[None], scores_HxLxL, -np.inf)
    scores_HxLxL = scores_HxLxL - scores_HxLxL.max(axis=-1, keepdims=True)
    probs = np.exp(scores_HxLxL)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    out_LxHxG = np.einsum("hqk,khg->qhg", probs, v)
    return _linear(out_LxHxG.reshape(L, H * G), t[f"{prefix}.o_proj.weight"])


def _sparse_moe(x_LxD: np.ndarray, t: Mapping[str, np.ndarray], prefix: str, config: Mapping) -> np.ndarray:
    logits_LxE = _linear(x_LxD, t[f"{prefix}.gate.weight"])
    logits_LxE = logits_LxE - logits_LxE.max(axis=-1, keepdims=True)
    probs_LxE = np.exp(logits_LxE)
    probs_LxE = probs_LxE / probs_LxE.sum(axis=-1, keepdims=True)
    k = config["num_experts_per_tok"]
    out_LxD = np.zeros_like(x_LxD)
    for row in range(x_LxD.shape[0]):
        chosen = np.argsort(-probs_LxE[row], kind="stable")[:k]
        weights = probs_LxE[row, chosen]
        if config.get("norm_topk_prob", False):
            weights = weights / weights.sum()
        for expert, weight in zip(chosen, weights):
            out_LxD[row] += weight * _swiglu(x_LxD[row : row + 1], t, f"{prefix}.experts.{expert}")[0]
    shared_gate_Lx1 = 1.0 / (1.0 + np.exp(-_linear(x_LxD, t[f"{prefix}.shared_expert_gate.weight"])))
    return out_LxD + shared_gate_Lx1 * _swiglu(x_LxD, t, f"{prefix}.shared_expert")


def _is_sparse(layer: int, config: Mapping) -> bool:
    return (
        layer not in config.get("mlp_only_layers", [])
        and config["num_experts"] > 0
        and (layer + 1) % config.get("decoder_sparse_step", 1) == 0
    )


def qwen2_moe_logits(tensors: Mapping[str, np.ndarray], config: Mapping, input_ids: np.ndarray) -> np.ndarray:
    """Float32 logits ``[L, V]`` of one sequence of token ids (positions 0..L-1, causal)."""
    t = {name: np.asarray(value, np.float32) for name, value in tensors.items()}
    eps = config["rms_norm_eps"]
    h_LxD = t["model.embed_tokens.weight"][np.asarray(input_ids)]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        h_LxD = h_LxD + _attention(_rms_norm(h_LxD, t[f"{prefix}.input_layernorm.weight"], eps), t, f"{prefix}.self_attn", config)
        normed = _rms_norm(h_LxD, t[f"{prefix}.post_attention_layernorm.weight"], eps)
        if _is_sparse(layer, config):
            h_LxD = h_LxD + _sparse_moe(normed, t, f"{prefix}.mlp", config)
        else:
            h_LxD = h_LxD + _swiglu(normed, t, f"{prefix}.mlp")
    h_LxD = _rms_norm(h_LxD, t["model.norm.weight"], eps)
    lm_head = t["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else t["lm_head.weight"]
    return _linear(h_LxD, lm_head)
