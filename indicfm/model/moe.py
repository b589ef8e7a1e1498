"""Mixture-of-Experts feed-forward: router, two dispatch implementations, auxiliary losses.

Flow of one MoE layer (``MoE.__call__``):

1. **Route** (plain jit code, sharded by the compiler like any activation): float32 router logits
   ``[B, L, E]``; scores are softmax probabilities or sigmoids; the top-k experts are chosen on
   ``score + bias`` (the bias is the loss-free balancing term, used for *selection only*); gates are
   the softmax probabilities of the chosen experts, or the chosen sigmoid scores renormalised to sum
   to one.  Load-balancing loss, z-loss, per-expert counts and (capacity dispatch) each
   assignment's slot in its expert's buffer are computed here over the *global* batch, so they do
   not depend on the mesh.
2. **Experts** (inside ``jax.shard_map`` when a mesh is set): tokens are grouped per expert, sent
   with ``all_to_all`` over the ``expert`` mesh axis to the devices owning their experts, run
   through the SwiGLU experts (hidden width split over ``tensor``, partial sums ``psum``-ed), and
   sent back, then combined with their gates.  Shared experts are a dense SwiGLU on every token.

Dispatch implementations (``ModelConfig.dispatch``), with T tokens per device, k = top_k,
E experts, D model width, F = d_expert, n = size of the expert mesh axis:

* ``capacity`` — token-choice top-k with a fixed buffer of ``C = ceil(capacity_factor * L * k / E)``
  slots per expert *per sequence* (a sequence is the balancing group, so results do not depend on
  how the batch is sharded).  Priority: all first choices in sequence order, then all second
  choices, ...  Assignments beyond C are dropped: the token passes through the residual only for
  that expert, and is counted in ``dropped_fraction``.  Buffers ``[E, B, C, D]`` are filled by a
  scatter and read back by a gather.  FLOPs: ``6 * E * B * C * D * F`` ≈ ``capacity_factor * 6 * T * k
  * D * F`` (padding slots are computed too); memory: ``E * B * C * (D + 2F)`` activations, i.e.
  ``capacity_factor`` times the useful ``T * k * (D + 2F)``; one all-to-all of ``T*k*cf*D`` each way.
* ``dropless`` — assignments sorted by expert and a grouped matmul (``jax.lax.ragged_dot`` on TPU;
  tokamax's grouped matmul on GPU when installed, else ``blocks``: each expert's rows padded to
  whole blocks and one batched matmul; on CPU ``rounds``: capacity-sized ``[E, width, D]`` buffers
  filled from the sorted rows and run again until the largest group is done, with a hand-written
  backward (``custom_vjp``) because autodiff cannot reverse a ``while_loop`` — never ``ragged_dot``
  on CPU/GPU, which XLA lowers to a dense product over every expert with the other rows masked).
  Nothing is dropped.
  FLOPs: exactly ``6 * T * k * D * F`` with ragged_dot/tokamax, ~1.25x that with ``blocks``, and
  ~1.25x per round with ``rounds`` (one round when no expert gets more than 1.25x its share)
  (``E`` times that with ``ragged_dot`` on CPU/GPU or the ``dense`` loop); memory ``T * k * (D + 2F)``.  With expert parallelism the number of rows a device sends
  to each peer is data-dependent, so each peer gets a worst-case buffer of ``T * k`` rows:
  all-to-all traffic and receive memory are ``n * T * k * D`` (n times the useful amount) — exact
  and never dropping, at a memory price that grows with the expert axis.

Shape legend: B batch, L length, D model, E experts, F expert hidden, C capacity slots,
k chosen experts per token, T tokens, M token-expert assignments (T*k), N expert-axis size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from indicfm.model.config import ModelConfig
from indicfm.model.dispatch import run_experts
from indicfm.model.grouped_matmul import grouped_matmul, resolve_grouped_matmul
from indicfm.model.layers import SwiGLU, make_param, param_dtype, token_matmul
from indicfm.model.routing import Routing, capacity_per_sequence, route

# Names other modules import from here (the layer's public face); the pieces live in routing,
# dispatch and grouped_matmul.
__all__ = ["MoE", "MoEStats", "RouterBias", "Routing", "capacity_per_sequence", "grouped_matmul",
           "resolve_grouped_matmul", "route", "run_experts", "update_router_bias"]


class RouterBias(nnx.Variable):
    """Loss-free balancing bias (DeepSeek-V3). Not an ``nnx.Param``: the optimizer never updates it;
    ``update_router_bias`` does, from the routed token counts."""


@struct.dataclass
class MoEStats:
    """Router statistics of a forward pass (a pytree, so it can leave a jitted step).

    aux_loss: scalar, already weighted: sum over MoE layers of
        ``aux_loss_weight * load_balance + z_loss_weight * z_loss`` — add it to the CE loss.
    load_balance_loss, z_loss: unweighted, mean over MoE layers (for logging).
    expert_counts: ``[num_moe_layers, E]`` token assignments routed to each expert (before drops,
        padding excluded).
    dropped_fraction: scalar, share of (non-padding) assignments dropped by capacity, mean over layers.
    """

    aux_loss: jax.Array
    load_balance_loss: jax.Array
    z_loss: jax.Array
    expert_counts: jax.Array
    dropped_fraction: jax.Array



class MoE(nnx.Module):
    """Routed SwiGLU experts (+ optional shared experts) replacing the dense MLP of a block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F = cfg.d_model, cfg.num_experts, cfg.d_expert
        pdt = param_dtype(cfg)
        self.cfg = cfg
        self.router_DxE = make_param(rngs, (D, E), ("embed", None), pdt)
        self.w_gate_ExDxF = make_param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), pdt, fan_in=D)
        self.w_up_ExDxF = make_param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), pdt, fan_in=D)
        self.w_down_ExFxD = make_param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), pdt, fan_in=F)
        self.shared = SwiGLU(D, cfg.shared_width, pdt, rngs=rngs) if cfg.num_shared_experts else None
        # Qwen2-MoE scales the shared experts' output per token by sigmoid(x . w)
        self.shared_gate_D = (
            make_param(rngs, (D,), ("embed",), pdt) if cfg.num_shared_experts and cfg.shared_expert_gate else None
        )
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32)) if cfg.loss_free_bias else None

    def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array) -> tuple[jax.Array, Routing]:
        cfg = self.cfg
        logits_BxLxE = token_matmul(x_BxLxD.astype(jnp.float32), self.router_DxE[...].astype(jnp.float32))
        bias_E = None if self.router_bias is None else self.router_bias[...]
        capacity = capacity_per_sequence(cfg, x_BxLxD.shape[1]) if cfg.dispatch == "capacity" else None
        routing = route(logits_BxLxE, valid_BxL, cfg, bias_E, capacity)
        y_BxLxD = run_experts(x_BxLxD, routing, self.w_gate_ExDxF[...], self.w_up_ExDxF[...],
                              self.w_down_ExFxD[...], cfg, capacity)
        if self.shared is not None:
            shared_BxLxD = self.shared(x_BxLxD)
            if self.shared_gate_D is not None:
                gate_BxL = jnp.einsum("bld,d->bl", x_BxLxD.astype(jnp.float32), self.shared_gate_D[...].astype(jnp.float32))
                shared_BxLxD = shared_BxLxD * jax.nn.sigmoid(gate_BxL)[..., None].astype(shared_BxLxD.dtype)
            y_BxLxD = y_BxLxD + shared_BxLxD
        return y_BxLxD, routing


def update_router_bias(model: nnx.Module, expert_counts: jax.Array, rate: float) -> None:
    """DeepSeek-V3 loss-free balancing: ``bias += rate * sign(mean_count - count)`` per MoE layer.

    ``expert_counts`` is ``MoEStats.expert_counts`` ``[num_moe_layers, E]`` of the last step; layers
    are matched in the model's order (a scanned model's one MoE holds a stacked ``[N, E]`` bias for
    ``N`` consecutive rows).  Under-loaded experts get a larger bias, so they are selected more
    often; the gates (and thus gradients) are unaffected.  Works eagerly or inside ``nnx.jit``.
    A no-op for models built without ``loss_free_bias``.
    """
    row = 0
    for layer in model.moe_layers():
        if layer.router_bias is None:
            continue
        bias = layer.router_bias[...]
        rows = 1 if bias.ndim == 1 else bias.shape[0]
        counts_NxE = expert_counts[row : row + rows].astype(jnp.float32)
        delta_NxE = rate * jnp.sign(jnp.mean(counts_NxE, axis=-1, keepdims=True) - counts_NxE)
        layer.router_bias[...] = bias + delta_NxE.reshape(bias.shape)
        row += rows
