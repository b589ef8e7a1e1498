"""Export an indicfm model as a Hugging Face directory transformers loads (``AutoModelForCausalLM``).

Which architecture (:func:`export_architecture`), the one that expresses the model exactly:

* a dense model (every layer a dense SwiGLU, e.g. one imported from Llama, Qwen2 or Qwen3): **Qwen3**
  when it has per-head q/k RMSNorm, **Qwen2** when it has q/k/v biases, else **Llama** (with Llama 3's
  RoPE scaling when it uses it);
* an MoE with per-head q/k RMSNorm: **Qwen3-MoE** (it has no shared experts and no attention biases,
  so a model with either is refused);
* any other MoE: **Qwen2-MoE**, the one that fits indicfm's own layers best: pre-norm RMSNorm blocks,
  RoPE in the rotate-half layout, GQA, SwiGLU, dense layers listed in ``mlp_only_layers``, a softmax
  router over all experts with ``norm_topk_prob`` (plain or renormalised top-k probabilities),
  optional tied embeddings.  (Mixtral has no dense layers nor shared experts and always
  renormalises.)

How Qwen2-MoE's differences are bridged, exactly (no approximation):

* its attention has q/k/v biases: a model without them gets zeros;
* it always has one shared expert, scaled by ``sigmoid(shared_expert_gate · x)``: a model whose
  shared experts have no gate gets a zero gate weight (``sigmoid(0) = 0.5`` for every token) and a
  doubled ``down_proj`` (exact in binary floating point); a model without shared experts a width-1
  shared expert whose weights are all zero (its output is exactly 0);
* capacity dispatch (training-time token dropping) has no inference counterpart: the export, like
  ``indicfm generate``, computes every chosen expert (dropless).

Refused (no architecture expresses them): the sigmoid router, and the loss-free balancing bias (it
changes which experts are chosen).

Tensor names and layouts come from the one table of :mod:`indicfm.convert.hf_arch` (the one import
reads), so an exported model imports back to the same parameters.  Experts are written one per
module (``mlp.experts.{e}.gate_proj.weight`` ...), the layout of published checkpoints, which every
transformers version loads.  Layers are written one per ``model.layers.{i}`` whatever the parameter
layout: a model trained with ``model.scan_layers`` exports exactly the tensors of its unrolled
equivalent.  Weights are written with ``safetensors`` (sharded like ``save_pretrained``: shard plan
from ``huggingface_hub``, an index file when there is more than one shard).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from indicfm.convert.hf_arch import ARCHITECTURES, Architecture, plain_path, tensor_table
from indicfm.model.config import ModelConfig
from indicfm.tokenizer.load import TokenizerFile

DEFAULT_MAX_SHARD_SIZE = "5GB"
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
               "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe"}


class ExportError(ValueError):
    """The model uses something the target architecture cannot express (the message says what)."""


def export_architecture(cfg: ModelConfig) -> Architecture:
    """The Hugging Face architecture that expresses ``cfg`` exactly (see the module docstring)."""
    if cfg.num_moe_layers == 0:
        name = "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.attention_bias else "LlamaForCausalLM"
    else:
        name = "Qwen3MoeForCausalLM" if cfg.qk_norm else "Qwen2MoeForCausalLM"
    return ARCHITECTURES[name]


def check_exportable(cfg: ModelConfig) -> list[str]:
    """Raise :class:`ExportError` naming every config option the target cannot express; return notes
    about options that are mapped (printed by the CLI and written into the model card)."""
    arch = export_architecture(cfg)
    problems = []
    if cfg.num_moe_layers and cfg.router == "sigmoid":
        problems.append(
            "model.router=sigmoid: Qwen-MoE routes with a softmax over all experts; sigmoid scores "
            "renormalised over the chosen experts cannot be expressed"
        )
    if cfg.num_moe_layers and cfg.loss_free_bias:
        problems.append(
            "model.loss_free_bias=true: the per-expert bias that changes which experts are chosen has no "
            "counterpart in a Qwen-MoE router"
        )
    if cfg.qk_norm and cfg.attention_bias:
        problems.append("model.qk_norm with model.attention_bias: Qwen3's attention_bias also biases o_proj")
    if arch.name == "Qwen3MoeForCausalLM" and cfg.num_shared_experts:
        problems.append("model.num_shared_experts with model.qk_norm: Qwen3-MoE has no shared experts")
    if problems:
        raise ExportError(f"cannot export to {arch.name}:\n  - " + "\n  - ".join(problems))
    notes = [f"written as {arch.name}"]
    if arch.name == "Qwen2MoeForCausalLM":
        if not cfg.attention_bias:
            notes.append("q/k/v projection biases are zeros (the model has none)")
        if cfg.num_shared_experts and not cfg.shared_expert_gate:
            notes.append(
                f"{cfg.num_shared_experts} shared expert(s) → one Qwen2-MoE shared expert of width "
                f"{cfg.shared_width}; its sigmoid gate is fixed at 0.5 (zero weights) and its down_proj doubled"
            )
        elif not cfg.num_shared_experts:
            notes.append("no shared experts → a width-1 all-zero Qwen2-MoE shared expert (output exactly 0)")
    if cfg.num_moe_layers and cfg.dispatch == "capacity":
        notes.append("trained with capacity dispatch (tokens over capacity skipped the layer); served dropless")
    if cfg.num_heads * cfg.head_dim != cfg.d_model:
        notes.append(
            f"head_dim {cfg.head_dim} x {cfg.num_heads} heads != d_model {cfg.d_model}: needs a transformers "
            "version whose attention reads config.head_dim"
        )
    return notes


def _target_config(cfg: ModelConfig, arch: Architecture) -> ModelConfig:
    """``cfg`` as the target architecture states it (Qwen2-MoE: biases and one gated shared expert)."""
    if arch.name != "Qwen2MoeForCausalLM":
        return cfg
    return cfg.model_copy(update={"attention_bias": True, "num_shared_experts": 1, "shared_expert_gate": True,
                                  "d_shared": cfg.shared_width or 1})


def _rope(cfg: ModelConfig) -> dict[str, Any]:
    """RoPE keys in both spellings (transformers 4: rope_theta/rope_scaling, 5: rope_parameters)."""
    scaling = None
    if cfg.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len}
    parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta} if scaling is None else {
        **scaling, "rope_theta": cfg.rope_theta}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": parameters}


def hf_config(cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int | None, dtype: str) -> dict[str, Any]:
    """``config.json`` for the architecture :func:`export_architecture` picks (``pad_id`` None: the
    tokenizer has no pad token)."""
    arch = export_architecture(cfg)
    target = _target_config(cfg, arch)
    config: dict[str, Any] = {
        "architectures": [arch.name],
        "model_type": MODEL_TYPES[arch.name],
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
        **_rope(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "attention_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
    }
    if arch.name == "LlamaForCausalLM":
        config["mlp_bias"] = False
    if arch.name != "LlamaForCausalLM":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if arch.name == "Qwen2ForCausalLM":
        config["qkv_bias"] = True
    if arch.moe:
        config.update(
            decoder_sparse_step=1,
            mlp_only_layers=list(range(cfg.first_dense_layers)),
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k,
            moe_intermediate_size=cfg.d_expert,
            norm_topk_prob=cfg.norm_topk_prob,
            output_router_logits=False,
            router_aux_loss_coef=cfg.aux_loss_weight,
        )
    if arch.name == "Qwen2MoeForCausalLM":
        config.update(qkv_bias=True, shared_expert_intermediate_size=target.shared_width)
    return config


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


def _bridged_values(model: Any, cfg: ModelConfig, target: ModelConfig) -> dict[tuple, np.ndarray]:
    """The model's parameters by path, plus what the target states that the model lacks (zeros,
    or a doubled shared-expert down projection under a fixed 0.5 gate; see the module docstring)."""
    import jax
    from flax import nnx

    values = {plain_path(path): np.asarray(_host(leaf))
              for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
    H, K, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    for layer in range(cfg.num_layers):
        attn, mlp = ("blocks", layer, "attn"), ("blocks", layer, "mlp")
        if target.attention_bias and not cfg.attention_bias:
            for name, heads in (("b_q_HxG", H), ("b_k_KxG", K), ("b_v_KxG", K)):
                values[(*attn, name)] = np.zeros((heads, G), np.float32)
        if layer < cfg.first_dense_layers or not target.num_shared_experts:
            continue
        if not cfg.num_shared_experts:
            for name, shape in (("w_gate_DxF", (D, 1)), ("w_up_DxF", (D, 1)), ("w_down_FxD", (1, D))):
                values[(*mlp, "shared", name)] = np.zeros(shape, np.float32)
        elif not cfg.shared_expert_gate:
            down = (*mlp, "shared", "w_down_FxD")
            values[down] = 2 * values[down]  # sigmoid(0) = 0.5 below; doubling is exact in binary floating point
        if not cfg.shared_expert_gate:
            values[(*mlp, "shared_gate_D")] = np.zeros((D,), np.float32)
    return values


def _host(value: Any) -> np.ndarray:
    import jax

    return np.asarray(jax.device_get(value))


def hf_tensors(model: Any, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Every weight of an indicfm ``Transformer`` (either parameter layout) under its name in the
    architecture :func:`export_architecture` picks, in that architecture's layout."""
    import ml_dtypes

    model = unrolled_on_host(model)
    cfg: ModelConfig = model.cfg
    arch = export_architecture(cfg)
    target = _target_config(cfg, arch)
    values = _bridged_values(model, cfg, target)
    out: dict[str, np.ndarray] = {}
    for path, source in tensor_table(arch, target).items():
        out.update(source.write(values[path]))
    kind = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    return {name: np.ascontiguousarray(value.astype(kind)) for name, value in out.items()}


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
    tokenizer: TokenizerFile,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    card: Callable[[Path, list[str]], None] | None = None,
    step: int = 0,
) -> ExportResult:
    """Write config, weights and tokenizer files for ``model`` into ``output`` (created; must be
    empty or absent, so an export never silently mixes with an older one).  ``tokenizer``: the run's
    (a checkpoint's :func:`~indicfm.train.checkpoint.stored_tokenizer`).

    ``bos_token_id`` is the id the model saw begin every document (the tokenizer's bos, or its eos
    where it has none); ``pad_token_id`` the tokenizer's pad (null where it has none; generation
    then pads with eos, as indicfm's rows were)."""
    from indicfm.export.hf_tokenizer import write_tokenizer_files

    cfg: ModelConfig = model.cfg
    notes = check_exportable(cfg)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ExportError(f"output directory {output} is not empty; choose a new one")
    dtype = dtype or cfg.param_dtype
    tok = tokenizer.load()
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"the tokenizer has {tok.vocab_size} entries but model.vocab_size={cfg.vocab_size}")
    output.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg, bos_id=tok.start_id, eos_id=tok.eos_id, pad_id=tok.pad_id, dtype=dtype)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {"bos_token_id": tok.start_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.padding_id}
    (output / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    tensors = hf_tensors(model, dtype)
    files = write_safetensors(tensors, output, max_shard_size)
    files += write_tokenizer_files(tok, output, model_max_length=cfg.max_seq_len)
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
    check_exportable(meta.saved_model_config())  # refuse before reading any weights
    # The weights end up in host memory anyway: restore them onto the host (CPU) device.
    loaded = load_for_inference(workdir, step, mesh=inference_mesh(devices=jax.devices("cpu")[:1]))

    def card(out_dir: Path, notes: list[str]) -> None:
        write_model_card(out_dir, loaded, notes, workdir=Path(workdir))

    return export_model(
        loaded.model, output, tokenizer=loaded.tokenizer_file, dtype=dtype,
        max_shard_size=max_shard_size, card=card, step=loaded.step,
    )
