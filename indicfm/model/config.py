"""Config section ``model``: architecture of the MoE transformer (owned by indicfm/model/).

Every field is a plain scalar or string (no lists) so the whole config is hashable and can be
a static argument under ``jax.jit``.
"""

from typing import Literal

from pydantic import Field, model_validator

from indicfm.config_base import Section


#: Settings a run chooses freely for given parameters: dtypes, kernels, layout, remat, routing
#: implementation and loss weights.  They change neither the parameters' shapes nor their meaning,
#: so an imported, upcycled or restored model keeps them from the run, not from its source.
RUN_SETTINGS = ("param_dtype", "compute_dtype", "remat", "scan_layers", "attention_impl", "dispatch", "grouped_matmul",
                "expert_exchange", "capacity_factor", "aux_loss_weight", "z_loss_weight", "bias_update_rate")


class ModelConfig(Section):
    """Decoder-only Mixture-of-Experts transformer (GQA attention, RoPE, RMSNorm, SwiGLU experts)."""

    model_config = Section.model_config | {"frozen": True}

    vocab_size: int = Field(64000, gt=0, description="tokenizer vocabulary size (rows of the embedding)")
    d_model: int = Field(256, gt=0, description="width of the residual stream (D)")
    num_layers: int = Field(4, gt=0, description="number of transformer blocks")
    num_heads: int = Field(4, gt=0, description="query heads (H)")
    num_kv_heads: int = Field(2, gt=0, description="key/value heads (K) for grouped-query attention; divides num_heads")
    head_dim: int = Field(64, gt=0, description="width of one attention head")
    d_ff: int = Field(1024, gt=0, description="hidden width (F) of the SwiGLU MLP in dense layers")
    num_experts: int = Field(8, gt=0, description="routed experts per MoE layer (E)")
    num_shared_experts: int = Field(0, ge=0, description="always-on shared experts per MoE layer (S)")
    top_k: int = Field(2, gt=0, description="routed experts chosen per token")
    d_expert: int = Field(256, gt=0, description="hidden width of one expert's SwiGLU MLP")
    first_dense_layers: int = Field(1, ge=0, description="the first N blocks use a dense MLP instead of MoE")
    router: Literal["softmax", "sigmoid"] = Field(
        "softmax",
        description="softmax: gates are the softmax probabilities of the chosen experts; "
        "sigmoid: sigmoid scores normalised over the chosen k (DeepSeek-V3)",
    )
    dispatch: Literal["capacity", "dropless"] = Field(
        "dropless",
        description="capacity: fixed per-expert buffers, over-capacity tokens skip the layer; "
        "dropless: tokens sorted by expert and a grouped matmul, nothing dropped",
    )
    grouped_matmul: Literal["auto", "megablox", "ragged_dot", "tokamax", "rounds", "blocks", "dense"] = Field(
        "auto",
        description="dropless kernel: auto = megablox (Pallas) on TPU, tokamax on GPU if installed, else blocks on "
        "GPU and rounds on CPU (rounds: capacity-sized per-expert buffers repeated until every token is done; "
        "blocks: groups padded to whole blocks, one batched matmul); ragged_dot/dense cost E x the FLOPs on CPU/GPU",
    )
    expert_exchange: Literal["auto", "ragged_all_to_all", "all_to_all"] = Field(
        "auto",
        description="dropless over an expert mesh axis: how rows travel to their experts' devices and back, in "
        "rounds of receive buffers of 1.25x a device's own rows (overflow rounds when routing is skewed, nothing "
        "dropped); auto = ragged_all_to_all (only the useful rows move) on TPU/GPU, else all_to_all (an emulation "
        "of it with dense buffers, for XLA:CPU which cannot run ragged_all_to_all)",
    )
    capacity_factor: float = Field(
        1.25, gt=0, description="capacity dispatch: slots per expert = ceil(factor * seq_len * top_k / E) per sequence"
    )
    aux_loss_weight: float = Field(0.01, ge=0, description="weight of the Switch/GShard load-balancing loss")
    z_loss_weight: float = Field(0.001, ge=0, description="weight of the router z-loss (mean squared logsumexp)")
    loss_free_bias: bool = Field(
        False, description="DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias added for selection only"
    )
    bias_update_rate: float = Field(0.001, ge=0, description="step size of the loss-free balancing bias update")
    tie_embeddings: bool = Field(True, description="reuse the input embedding as the output projection")
    rope_theta: float = Field(10000.0, gt=0, description="rotary embedding base")
    rope_scaling: Literal["none", "llama3"] = Field(
        "none",
        description="none: plain RoPE frequencies; llama3: Llama 3.1's frequency-dependent scaling (long "
        "wavelengths divided by rope_factor, short ones kept, a smooth blend between)",
    )
    rope_factor: float = Field(8.0, gt=0, description="llama3 RoPE scaling: factor for the long wavelengths")
    rope_low_freq_factor: float = Field(1.0, gt=0, description="llama3 RoPE scaling: low_freq_factor")
    rope_high_freq_factor: float = Field(4.0, gt=0, description="llama3 RoPE scaling: high_freq_factor")
    rope_original_max_len: int = Field(
        8192, gt=0, description="llama3 RoPE scaling: the context length the frequencies were trained for"
    )
    attention_bias: bool = Field(False, description="learned biases on the q/k/v projections (Qwen2)")
    qk_norm: bool = Field(False, description="RMSNorm over each query and key head before RoPE (Qwen3)")
    norm_topk_prob: bool = Field(
        False,
        description="softmax router: renormalise the chosen experts' probabilities to sum to one (Mixtral, "
        "Qwen2/3-MoE's norm_topk_prob); false: gates are the plain softmax probabilities",
    )
    d_shared: int = Field(
        0, ge=0, description="hidden width of the shared experts' one SwiGLU; 0 = num_shared_experts x d_expert"
    )
    shared_expert_gate: bool = Field(
        False, description="scale the shared experts' output by sigmoid(x . w) per token (Qwen2-MoE)"
    )
    norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon")
    param_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype parameters are stored in")
    compute_dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="dtype matmuls run in")
    remat: Literal["none", "attention", "full"] = Field(
        "none", description="rematerialisation: recompute nothing, the attention sub-layer, or the whole block"
    )
    scan_layers: bool = Field(
        False,
        description="store the MoE blocks' parameters stacked on a leading 'layers' axis and run them with one "
        "lax.scan (compile time and program size stop growing with depth); the first_dense_layers stay a "
        "loop.  Changes the checkpoint layout: a run resumes only with the value it was saved with",
    )
    attention_impl: Literal["auto", "xla", "cudnn", "splash", "reference"] = Field(
        "auto", description="auto: cudnn on GPU, splash on TPU, xla elsewhere; reference: plain einsum (tests)"
    )
    max_seq_len: int = Field(2048, gt=0, description="longest sequence the model is trained/served with")

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        if self.first_dense_layers > self.num_layers:
            raise ValueError(
                f"first_dense_layers ({self.first_dense_layers}) must not exceed num_layers ({self.num_layers})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        return self

    def run_settings(self) -> dict:
        """This config's :data:`RUN_SETTINGS`, to carry over to another model's config."""
        return {k: getattr(self, k) for k in RUN_SETTINGS}

    @property
    def shared_width(self) -> int:
        """Hidden width of the shared experts' SwiGLU (0: no shared experts)."""
        if not self.num_shared_experts:
            return 0
        return self.d_shared or self.num_shared_experts * self.d_expert

    @property
    def num_moe_layers(self) -> int:
        """Blocks whose MLP is a Mixture of Experts."""
        return self.num_layers - self.first_dense_layers
