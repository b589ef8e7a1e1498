"""Parameter and FLOP counts from the config alone (used for MFU, planning and the model card).

Counts follow the module structure of :mod:`indicfm.model.transformer` (D d_model, H heads,
K kv heads, G head_dim, F d_ff, E experts, S shared experts, Fe d_expert, V vocab, k top_k):

* embedding ``V*D`` (+ ``D*V`` output projection when not tied)
* per block: attention ``D*H*G + 2*D*K*G + H*G*D``, two RMSNorm scales ``2*D``, and either a dense
  SwiGLU ``3*D*F`` or an MoE: router ``D*E``, experts ``3*E*D*Fe``, shared experts ``3*D*S*Fe``
* final RMSNorm ``D``.

The loss-free router bias is not a trainable parameter and is not counted.

**Active parameters per token**: total minus the ``(E - k)`` routed experts a token does not use in
each MoE layer (embeddings included, as MoE papers report them).

**Training FLOPs per token** = ``6 * N_matmul + 12 * num_layers * H * G * seq_len`` where
``N_matmul`` = active parameters that take part in a matmul: the input embedding (a lookup) and the
norm scales are excluded, the output projection ``D*V`` is included (also when tied).  6 = 2 FLOPs
per multiply-add x (1 forward + 2 backward).  The attention term is PaLM's (Chowdhery et al. 2022,
appendix B): ``QK^T`` and ``AV`` cost ``2 * 2 * L * H * G`` per token forward, x3 for training, over
the full ``L x L`` square (causal masking not halved, as in PaLM's MFU definition).  These are
*model* FLOPs: capacity dispatch also computes its padding slots (``capacity_factor`` x the expert
FLOPs), which counts as overhead, not as useful work.
"""

from __future__ import annotations

from indicfm.model.config import ModelConfig


def _attention_params(cfg: ModelConfig) -> int:
    D, H, K, G = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    biases = (H + 2 * K) * G if cfg.attention_bias else 0
    return D * H * G + 2 * D * K * G + H * G * D + biases


def _moe_params(cfg: ModelConfig, experts: int) -> int:
    D, Fe = cfg.d_model, cfg.d_expert
    shared_gate = D if cfg.num_shared_experts and cfg.shared_expert_gate else 0
    return D * cfg.num_experts + 3 * experts * D * Fe + 3 * D * cfg.shared_width + shared_gate


def _params(cfg: ModelConfig, experts_per_moe_layer: int) -> int:
    D, V = cfg.d_model, cfg.vocab_size
    n_dense, n_moe = cfg.first_dense_layers, cfg.num_moe_layers
    embeddings = V * D * (1 if cfg.tie_embeddings else 2)
    per_block = _attention_params(cfg) + 2 * D + (2 * cfg.head_dim if cfg.qk_norm else 0)
    return (
        embeddings
        + cfg.num_layers * per_block
        + n_dense * 3 * D * cfg.d_ff
        + n_moe * _moe_params(cfg, experts_per_moe_layer)
        + D  # final norm
    )


def count_params(cfg: ModelConfig) -> int:
    """Trainable parameters (``nnx.Param`` elements) of ``Transformer(cfg)``."""
    return _params(cfg, cfg.num_experts)


def count_active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses: only ``top_k`` of the routed experts in each MoE layer."""
    return _params(cfg, cfg.top_k)


def count_matmul_params(cfg: ModelConfig) -> int:
    """Active parameters that take part in a matmul (the ``N`` of ``6N``): no input lookup, no norms,
    the output projection counted once even when tied."""
    D, V = cfg.d_model, cfg.vocab_size
    embeddings = V * D * (1 if cfg.tie_embeddings else 2)
    norms = (2 * cfg.num_layers + 1) * D + (2 * cfg.num_layers * cfg.head_dim if cfg.qk_norm else 0)
    biases = cfg.num_layers * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim if cfg.attention_bias else 0
    norms += biases  # added, not multiplied: no matmul FLOPs
    return count_active_params(cfg) - embeddings - norms + D * V


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward) per token at sequence length ``seq_len``."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return float(6 * count_matmul_params(cfg) + attention)
