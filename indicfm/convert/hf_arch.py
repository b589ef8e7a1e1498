"""The one table of Hugging Face architectures indicfm converts: config keys and tensor names.

For each supported ``architectures[0]`` of a ``config.json`` this module says

* how the Hugging Face config becomes a :class:`~indicfm.model.config.ModelConfig`
  (:func:`model_fields`), refusing with :class:`ConversionError` anything indicfm cannot compute
  exactly (a sliding window, an unknown RoPE scaling, an MLP bias, ...), never approximating;
* which tensor of the checkpoint holds which indicfm parameter, and how its layout changes
  (:func:`tensor_table`): ``nn.Linear.weight`` is ``[out, in]`` while indicfm stores ``[in, out]``
  with heads as axes of their own, so projections are transposed and split head-major.

Import (:mod:`~indicfm.convert.hf_import`) reads the table one way; it is also the list of names an
export must write.  Paths are the indicfm model's parameter paths in the *unrolled* layout
(``blocks.{i}`` per layer); a scanned model is converted after import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


class ConversionError(ValueError):
    """The source cannot be converted exactly (the message names the file or config key)."""


@dataclass(frozen=True)
class Architecture:
    """What differs between the supported families (everything else is shared)."""

    name: str
    moe: bool
    #: module holding a MoE layer's router and experts: ``mlp`` (Qwen) or ``block_sparse_moe`` (Mixtral)
    moe_module: str = "mlp"
    #: names of an expert's gate, up and down projections
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    #: q/k/v biases are always there (Qwen2), or switched by ``attention_bias`` (Llama: on o too)
    qkv_bias: bool = False
    qk_norm: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("LlamaForCausalLM", moe=False),
        Architecture("MistralForCausalLM", moe=False),
        Architecture("Qwen2ForCausalLM", moe=False, qkv_bias=True),
        Architecture("Qwen3ForCausalLM", moe=False, qk_norm=True),
        Architecture("MixtralForCausalLM", moe=True, moe_module="block_sparse_moe", expert_projections=("w1", "w3", "w2")),
        Architecture("Qwen2MoeForCausalLM", moe=True, qkv_bias=True),
        Architecture("Qwen3MoeForCausalLM", moe=True, qk_norm=True),
    )
}


def architecture_of(hf_config: dict, source: str = "config.json") -> Architecture:
    """The table entry for ``hf_config['architectures'][0]``; an unsupported one is an error naming it."""
    names = hf_config.get("architectures") or []
    if not names:
        raise ConversionError(f"{source}: no 'architectures' entry, so the model family is unknown")
    if names[0] not in ARCHITECTURES:
        raise ConversionError(
            f"{source}: architecture {names[0]!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[names[0]]


def _rope_fields(hf: dict, source: str) -> dict[str, Any]:
    """RoPE base and scaling, from transformers 4's ``rope_theta``/``rope_scaling`` or 5's ``rope_parameters``."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return fields
    if kind != "llama3":
        raise ConversionError(f"{source}: rope type {kind!r} (rope_scaling/rope_parameters) is not supported; "
                              "supported: default, llama3")
    fields.update(
        rope_scaling="llama3",
        rope_factor=float(scaling["factor"]),
        rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_len=int(scaling["original_max_position_embeddings"]),
    )
    return fields


def _moe_layers(hf: dict, arch: Architecture, num_layers: int, source: str) -> int:
    """How many leading layers are dense; indicfm's MoE layers must be the rest (a contiguous tail)."""
    if arch.name == "MixtralForCausalLM":
        return 0
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    dense |= {i for i in range(num_layers) if (i + 1) % step}
    first = len(dense)
    if dense != set(range(first)):
        raise ConversionError(
            f"{source}: dense layers {sorted(dense)} (mlp_only_layers, decoder_sparse_step={step}) are not the first "
            "layers; indicfm's dense layers must come first (model.first_dense_layers)"
        )
    return first


def model_fields(hf: dict, source: str = "config.json") -> dict[str, Any]:
    """The ``model`` config section (as a dict of :class:`ModelConfig` fields) of a Hugging Face config.

    Every key that changes the function the model computes is either mapped or refused here.
    """
    arch = architecture_of(hf, source)

    def refuse_if(condition: bool, key: str, why: str) -> None:
        if condition:
            raise ConversionError(f"{source}: {key}={hf.get(key)!r}: {why}")

    refuse_if(hf.get("hidden_act", "silu") != "silu", "hidden_act", "indicfm's MLPs are SwiGLU (silu)")
    refuse_if(bool(hf.get("mlp_bias")), "mlp_bias", "indicfm's MLPs have no biases")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", window is not None) and window is not None
    refuse_if(bool(uses_window), "sliding_window", "sliding-window attention is not supported (indicfm attends to "
              "the whole causal context)")
    refuse_if(arch.name == "LlamaForCausalLM" and bool(hf.get("attention_bias")), "attention_bias",
              "Llama's attention_bias also puts a bias on o_proj, which indicfm has not")
    refuse_if(arch.name.startswith("Qwen3") and bool(hf.get("attention_bias")), "attention_bias",
              "Qwen3's attention_bias also puts a bias on o_proj, which indicfm has not")
    refuse_if(float(hf.get("attention_dropout", 0.0) or 0.0) != 0.0, "attention_dropout", "not supported")

    heads = int(hf["num_attention_heads"])
    d_model = int(hf["hidden_size"])
    layers = int(hf["num_hidden_layers"])
    fields: dict[str, Any] = {
        "vocab_size": int(hf["vocab_size"]),
        "d_model": d_model,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or d_model // heads),
        "d_ff": int(hf["intermediate_size"]),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_seq_len": int(hf.get("max_position_embeddings", 2048)),
        "attention_bias": arch.qkv_bias,
        "qk_norm": arch.qk_norm,
        **_rope_fields(hf, source),
    }
    if not arch.moe:
        # a dense model: every layer is a dense SwiGLU; the expert fields are unused but must be valid
        fields.update(first_dense_layers=layers, num_experts=1, top_k=1)
        return fields
    experts = int(hf.get("num_local_experts") or hf.get("num_experts"))
    fields.update(
        num_experts=experts,
        top_k=int(hf["num_experts_per_tok"]),
        d_expert=int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
        first_dense_layers=_moe_layers(hf, arch, layers, source),
        router="softmax",
        # Mixtral always renormalises the chosen experts' probabilities
        norm_topk_prob=True if arch.name == "MixtralForCausalLM" else bool(hf.get("norm_topk_prob", False)),
        dispatch="dropless",
    )
    if arch.name == "Qwen2MoeForCausalLM":
        fields.update(num_shared_experts=1, d_shared=int(hf["shared_expert_intermediate_size"]), shared_expert_gate=True)
    return fields


# ------------------------------------------------------------------------------------ tensor names


def plain_path(key_path: tuple) -> tuple:
    """A jax key path of an nnx state leaf (``DictKey('blocks'), DictKey(0), ..., GetAttrKey('value')``)
    -> the plain path the tables here use (``("blocks", 0, ...)``)."""
    import jax

    out = []
    for key in key_path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            continue  # the Variable's .value
        if isinstance(key, jax.tree_util.DictKey):
            out.append(key.key)
        else:
            out.append(getattr(key, "idx", key))
    return tuple(out)


Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TensorSource:
    """Where one indicfm parameter comes from: one checkpoint tensor, or (``stacked``) one per expert
    stacked on a leading axis, each changed by ``transform`` into indicfm's layout (``inverse``: back
    into the checkpoint's, for export)."""

    names: tuple[str, ...]
    transform: Transform
    inverse: Transform
    stacked: bool = False  # True: names[e] is expert e of an [E, ...] parameter

    def write(self, value: np.ndarray) -> dict[str, np.ndarray]:
        """The checkpoint tensors holding ``value`` (the indicfm parameter)."""
        if not self.stacked:
            return {self.names[0]: self.inverse(value)}
        return {name: self.inverse(value[e]) for e, name in enumerate(self.names)}

    def read(self, get: Callable[[str], np.ndarray], experts: range | None = None) -> np.ndarray:
        """The parameter's value (only the experts in ``experts`` for a stacked one)."""
        if not self.stacked:
            return self.transform(get(self.names[0]))
        chosen = experts if experts is not None else range(len(self.names))
        return np.stack([self.transform(get(self.names[e])) for e in chosen])


def _linear(*out_axes: int) -> tuple[Transform, Transform]:
    """``[out, in]`` <-> ``[in, *out_axes]`` (``out_axes`` split the output features head-major)."""

    def to_ours(w: np.ndarray) -> np.ndarray:
        return w.T.reshape(w.shape[1], *out_axes) if out_axes else w.T

    def to_theirs(a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0], -1).T

    return to_ours, to_theirs


def _output_projection(heads: int, head_dim: int) -> tuple[Transform, Transform]:
    """``o_proj.weight [D, H*G]`` <-> ``[H, G, D]``."""
    return (lambda w: w.T.reshape(heads, head_dim, w.shape[0]),
            lambda a: a.reshape(heads * head_dim, a.shape[-1]).T)


def _reshape(*shape: int) -> tuple[Transform, Transform]:
    return lambda w: w.reshape(shape), lambda a: a.reshape(-1)


def _same(w: np.ndarray) -> np.ndarray:
    return w


SAME = (_same, _same)
#: a ``[1, D]`` linear weight (Qwen2-MoE's shared-expert gate) <-> indicfm's ``[D]`` vector
ROW_VECTOR = (lambda w: w.reshape(-1), lambda a: a.reshape(1, -1))


def _source(names: str | tuple[str, ...], transforms: tuple[Transform, Transform], stacked: bool = False) -> TensorSource:
    return TensorSource((names,) if isinstance(names, str) else names, *transforms, stacked=stacked)


def tensor_table(arch: Architecture, cfg: Any) -> dict[tuple, TensorSource]:
    """indicfm parameter path (unrolled layout, e.g. ``("blocks", 0, "attn", "w_q_DxHxG")``) ->
    its source in a checkpoint of ``arch``, for the model config ``cfg`` made by :func:`model_fields`."""
    H, K, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    table: dict[tuple, TensorSource] = {
        ("embed_VxD",): _source("model.embed_tokens.weight", SAME),
        ("final_norm", "scale"): _source("model.norm.weight", SAME),
    }
    if not cfg.tie_embeddings:
        table[("unembed_DxV",)] = _source("lm_head.weight", _linear())
    for i in range(cfg.num_layers):
        p, b = f"model.layers.{i}", ("blocks", i)
        attn = f"{p}.self_attn"
        table[(*b, "attn_norm", "scale")] = _source(f"{p}.input_layernorm.weight", SAME)
        table[(*b, "mlp_norm", "scale")] = _source(f"{p}.post_attention_layernorm.weight", SAME)
        table[(*b, "attn", "w_q_DxHxG")] = _source(f"{attn}.q_proj.weight", _linear(H, G))
        table[(*b, "attn", "w_k_DxKxG")] = _source(f"{attn}.k_proj.weight", _linear(K, G))
        table[(*b, "attn", "w_v_DxKxG")] = _source(f"{attn}.v_proj.weight", _linear(K, G))
        table[(*b, "attn", "w_o_HxGxD")] = _source(f"{attn}.o_proj.weight", _output_projection(H, G))
        if cfg.attention_bias:
            table[(*b, "attn", "b_q_HxG")] = _source(f"{attn}.q_proj.bias", _reshape(H, G))
            table[(*b, "attn", "b_k_KxG")] = _source(f"{attn}.k_proj.bias", _reshape(K, G))
            table[(*b, "attn", "b_v_KxG")] = _source(f"{attn}.v_proj.bias", _reshape(K, G))
        if cfg.qk_norm:
            table[(*b, "attn", "q_norm", "scale")] = _source(f"{attn}.q_norm.weight", SAME)
            table[(*b, "attn", "k_norm", "scale")] = _source(f"{attn}.k_norm.weight", SAME)
        if i < cfg.first_dense_layers:
            for ours, theirs in (("w_gate_DxF", "gate_proj"), ("w_up_DxF", "up_proj"), ("w_down_FxD", "down_proj")):
                table[(*b, "mlp", ours)] = _source(f"{p}.mlp.{theirs}.weight", _linear())
            continue
        moe = f"{p}.{arch.moe_module}"
        table[(*b, "mlp", "router_DxE")] = _source(f"{moe}.gate.weight", _linear())
        experts = range(cfg.num_experts)
        for ours, theirs in zip(("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD"), arch.expert_projections):
            names = tuple(f"{moe}.experts.{e}.{theirs}.weight" for e in experts)
            table[(*b, "mlp", ours)] = _source(names, _linear(), stacked=True)
        if cfg.num_shared_experts:
            for ours, theirs in (("w_gate_DxF", "gate_proj"), ("w_up_DxF", "up_proj"), ("w_down_FxD", "down_proj")):
                table[(*b, "mlp", "shared", ours)] = _source(f"{moe}.shared_expert.{theirs}.weight", _linear())
            if cfg.shared_expert_gate:
                table[(*b, "mlp", "shared_gate_D")] = _source(f"{moe}.shared_expert_gate.weight", ROW_VECTOR)
    return table
