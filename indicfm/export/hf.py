"""Export a trained indicfm model as a Hugging Face ``Qwen2MoeForCausalLM`` directory.

Why Qwen2-MoE (transformers ``model_type: qwen2_moe``) and not its neighbours:

* **Qwen3-MoE** always applies RMSNorm to queries and keys per head (q_norm/k_norm); indicfm has
  no qk-norm, and no weight setting turns that normalisation into the identity.
* **Mixtral** has no dense layers (indicfm's ``first_dense_layers``), no shared experts, and always
  renormalises the top-k router probabilities, whereas indicfm's softmax gates are the plain
  probabilities of the chosen experts.
* **Qwen2-MoE** matches: pre-norm RMSNorm blocks, RoPE in the rotate-half layout, GQA, SwiGLU,
  dense layers listed in ``mlp_only_layers``, a softmax router over all experts with
  ``norm_topk_prob: false`` (gates = softmax probabilities of the top-k), optional tied embeddings.

How the differences are bridged, exactly (no approximation):

* Qwen2-MoE's attention has q/k/v biases: they are written as zeros.
* Qwen2-MoE always has one shared expert, scaled by ``sigmoid(shared_expert_gate · x)``; indicfm's
  ``S`` shared experts are one ungated SwiGLU of width ``S * d_expert``.  The gate weight is written
  as zeros, so the gate is ``sigmoid(0) = 0.5`` for every token, and the shared expert's
  ``down_proj`` is multiplied by 2 (exact in binary floating point).  A model without shared
  experts gets a width-1 shared expert whose weights are all zero (its output is exactly 0).
* Capacity dispatch (training-time token dropping) has no inference counterpart: the export, like
  ``indicfm generate``, computes every chosen expert (dropless).

Refused (the architecture cannot express them): the sigmoid router, and the loss-free balancing
bias (it changes which experts are chosen).

Tensor layout: ``nn.Linear.weight`` is ``[out, in]``; indicfm stores ``[in, out]`` (with heads as
separate axes), so projections are reshaped head-major and transposed.  Experts are written one
per module (``mlp.experts.{e}.gate_proj.weight`` ...), the layout of published Qwen2-MoE
checkpoints, which every transformers version loads.  Layers are written one per
``model.layers.{i}`` whatever the parameter layout: a model trained with ``model.scan_layers``
exports exactly the tensors of its unrolled equivalent.  Weights are written with ``safetensors``
(sharded like ``save_pretrained``: shard plan from ``huggingface_hub``, an index file when there is
more than one shard).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from indicfm.model.config import ModelConfig

ARCHITECTURE = "Qwen2MoeForCausalLM"
MODEL_TYPE = "qwen2_moe"
DEFAULT_MAX_SHARD_SIZE = "5GB"


class ExportError(ValueError):
    """The model uses something the target architecture cannot express (the message says what)."""


def check_exportable(cfg: ModelConfig) -> list[str]:
    """Raise :class:`ExportError` naming every config option Qwen2-MoE cannot express; return notes
    about options that are mapped (printed by the CLI and written into the model card)."""
    problems = []
    if cfg.router == "sigmoid":
        problems.append(
            "model.router=sigmoid: Qwen2-MoE routes with a softmax over all experts; sigmoid scores "
            "renormalised over the chosen experts cannot be expressed"
        )
    if cfg.loss_free_bias:
        problems.append(
            "model.loss_free_bias=true: the per-expert bias that changes which experts are chosen has no "
            "counterpart in Qwen2-MoE's router"
        )
    if problems:
        raise ExportError("cannot export to Qwen2-MoE:\n  - " + "\n  - ".join(problems))
    notes = ["q/k/v projection biases are zeros (indicfm has none)"]
    if cfg.num_shared_experts:
        notes.append(
            f"{cfg.num_shared_experts} shared expert(s) → one Qwen2-MoE shared expert of width "
            f"{cfg.num_shared_experts * cfg.d_expert}; its sigmoid gate is fixed at 0.5 (zero weights) and its "
            "down_proj doubled"
        )
    else:
        notes.append("no shared experts → a width-1 all-zero Qwen2-MoE shared expert (output exactly 0)")
    if cfg.dispatch == "capacity":
        notes.append("trained with capacity dispatch (tokens over capacity skipped the layer); served dropless")
    if cfg.num_heads * cfg.head_dim != cfg.d_model:
        notes.append(
            f"head_dim {cfg.head_dim} x {cfg.num_heads} heads != d_model {cfg.d_model}: needs a transformers "
            "version whose Qwen2-MoE attention reads config.head_dim"
        )
    return notes


def hf_config(cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int, dtype: str) -> dict[str, Any]:
    """``config.json`` for ``Qwen2MoeForCausalLM``."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "qkv_bias": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "attention_dropout": 0.0,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(cfg.first_dense_layers)),
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.d_expert,
        "shared_expert_intermediate_size": cfg.num_shared_experts * cfg.d_expert or 1,
        "norm_topk_prob": False,
        "output_router_logits": False,
        "router_aux_loss_coef": cfg.aux_loss_weight,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
    }


def _get(variable: Any) -> np.ndarray:
    import jax

    return np.asarray(jax.device_get(variable[...]))


def unrolled_on_host(model: Any) -> Any:
    """``model`` in the unrolled layout (one ``blocks[i]`` per layer), its arrays as NumPy on the host.

    Qwen2-MoE names every layer's weights (``model.layers.{i}...``), so a scanned model
    (``model.scan_layers``: MoE blocks stacked along a leading layer axis) is split per layer first.
    The split happens after the copy to the host, where a layer is a NumPy view of the stacked
    array: it costs no second copy of the weights on the device or in host memory.
    """
    if getattr(model, "scanned_blocks", None) is None:
        return model
    import jax
    from flax import nnx

    from indicfm.model.layout import with_layout

    graphdef, state = nnx.split(model)
    return with_layout(nnx.merge(graphdef, jax.device_get(state)), scan_layers=False)


def hf_tensors(model: Any, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Every weight of an indicfm ``Transformer`` (either parameter layout) under its Qwen2-MoE
    name, in ``nn.Linear`` layout."""
    import ml_dtypes

    model = unrolled_on_host(model)
    cfg: ModelConfig = model.cfg
    D, H, K, G = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": _get(model.embed_VxD)}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}"
        attn = block.attn
        out[f"{p}.input_layernorm.weight"] = _get(block.attn_norm.scale)
        out[f"{p}.self_attn.q_proj.weight"] = _get(attn.w_q_DxHxG).reshape(D, H * G).T
        out[f"{p}.self_attn.k_proj.weight"] = _get(attn.w_k_DxKxG).reshape(D, K * G).T
        out[f"{p}.self_attn.v_proj.weight"] = _get(attn.w_v_DxKxG).reshape(D, K * G).T
        for name, width in (("q", H * G), ("k", K * G), ("v", K * G)):
            out[f"{p}.self_attn.{name}_proj.bias"] = np.zeros((width,), np.float32)
        out[f"{p}.self_attn.o_proj.weight"] = _get(attn.w_o_HxGxD).reshape(H * G, D).T
        out[f"{p}.post_attention_layernorm.weight"] = _get(block.mlp_norm.scale)
        mlp = block.mlp
        if not block.is_moe:
            out[f"{p}.mlp.gate_proj.weight"] = _get(mlp.w_gate_DxF).T
            out[f"{p}.mlp.up_proj.weight"] = _get(mlp.w_up_DxF).T
            out[f"{p}.mlp.down_proj.weight"] = _get(mlp.w_down_FxD).T
            continue
        out[f"{p}.mlp.gate.weight"] = _get(mlp.router_DxE).T
        gate_ExDxF, up_ExDxF, down_ExFxD = _get(mlp.w_gate_ExDxF), _get(mlp.w_up_ExDxF), _get(mlp.w_down_ExFxD)
        for e in range(cfg.num_experts):
            out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = gate_ExDxF[e].T
            out[f"{p}.mlp.experts.{e}.up_proj.weight"] = up_ExDxF[e].T
            out[f"{p}.mlp.experts.{e}.down_proj.weight"] = down_ExFxD[e].T
        if mlp.shared is not None:
            out[f"{p}.mlp.shared_expert.gate_proj.weight"] = _get(mlp.shared.w_gate_DxF).T
            out[f"{p}.mlp.shared_expert.up_proj.weight"] = _get(mlp.shared.w_up_DxF).T
            # sigmoid(0) = 0.5 below; doubling is exact in binary floating point
            out[f"{p}.mlp.shared_expert.down_proj.weight"] = 2 * _get(mlp.shared.w_down_FxD).T
        else:
            out[f"{p}.mlp.shared_expert.gate_proj.weight"] = np.zeros((1, D), np.float32)
            out[f"{p}.mlp.shared_expert.up_proj.weight"] = np.zeros((1, D), np.float32)
            out[f"{p}.mlp.shared_expert.down_proj.weight"] = np.zeros((D, 1), np.float32)
        out[f"{p}.mlp.shared_expert_gate.weight"] = np.zeros((1, D), np.float32)
    out["model.norm.weight"] = _get(model.final_norm.scale)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _get(model.unembed_DxV).T
    target = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    return {name: np.ascontiguousarray(value.astype(target)) for name, value in out.items()}


def write_safetensors(
    tensors: dict[str, np.ndarray], out_dir: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[Path]:
    """Write ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.numpy import save_file

    split = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda array: array.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    written = []
    for filename, names in split.filename_to_tensors.items():
        path = out_dir / filename
        # "format": "pt" is what transformers expects in a PyTorch checkpoint's metadata
        save_file({name: tensors[name] for name in names}, str(path), metadata={"format": "pt"})
        written.append(path)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written


def read_safetensors(out_dir: str | Path) -> dict[str, np.ndarray]:
    """All tensors of an exported directory (single file or shards), as NumPy arrays."""
    from safetensors.numpy import load_file

    out_dir = Path(out_dir)
    tensors: dict[str, np.ndarray] = {}
    for path in sorted(out_dir.glob("model*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@dataclass
class ExportResult:
    output: Path
    step: int
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    num_tensors: int = 0
    total_bytes: int = 0


def export_model(
    model: Any,
    output: str | Path,
    *,
    tokenizer_bytes: bytes,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    card: Callable[[Path, list[str]], None] | None = None,
    step: int = 0,
) -> ExportResult:
    """Write config, weights and tokenizer files for ``model`` into ``output`` (created; must be
    empty or absent, so an export never silently mixes with an older one)."""
    import sentencepiece as spm

    from indicfm.export.hf_tokenizer import write_tokenizer_files

    cfg: ModelConfig = model.cfg
    notes = check_exportable(cfg)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ExportError(f"output directory {output} is not empty; choose a new one")
    dtype = dtype or cfg.param_dtype
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_bytes)
    if sp.get_piece_size() > cfg.vocab_size:
        raise ExportError(f"the tokenizer has {sp.get_piece_size()} pieces but model.vocab_size={cfg.vocab_size}")
    output.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg, bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=max(sp.pad_id(), 0), dtype=dtype)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": max(sp.pad_id(), 0)}
    (output / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    tensors = hf_tensors(model, dtype)
    files = write_safetensors(tensors, output, max_shard_size)
    files += write_tokenizer_files(tokenizer_bytes, output, model_max_length=cfg.max_seq_len)
    if card is not None:
        card(output, notes)
    return ExportResult(output, step, files, notes, len(tensors), sum(a.nbytes for a in tensors.values()))


def export_hf(
    workdir: str | Path,
    output: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> ExportResult:
    """``indicfm export hf``: restore a checkpoint of the run in ``workdir`` and export it."""
    import jax

    from indicfm.export.model_card import write_model_card
    from indicfm.inference.load import inference_mesh, load_for_inference, read_checkpoint_meta

    step, meta = read_checkpoint_meta(workdir, step)
    check_exportable(ModelConfig(**meta["config"]["model"]))  # refuse before reading any weights
    # The weights end up in host memory anyway: restore them onto the host (CPU) device.
    loaded = load_for_inference(workdir, step, mesh=inference_mesh(devices=jax.devices("cpu")[:1]))

    def card(out_dir: Path, notes: list[str]) -> None:
        write_model_card(out_dir, loaded, notes, workdir=Path(workdir))

    return export_model(
        loaded.model, output, tokenizer_bytes=loaded.tokenizer_bytes, dtype=dtype,
        max_shard_size=max_shard_size, card=card, step=loaded.step,
    )
