"""Sparse upcycling: a dense model into a Mixture of Experts that computes the same function at step 0.

Recipe (Komatsuzaki et al. 2023 for the copies; He et al. 2024, arXiv 2410.07524, for fine-grained
experts, virtual groups and weight scaling):

* attention, norms and embeddings are copied; every MoE layer's experts come from the same
  layer's dense SwiGLU ``down(silu(x W_gate) * (x W_up))`` of hidden width F;
* **granularity G**: the hidden width is cut into G slices of F/G; ``E = copies x G`` experts,
  expert ``c*G + j`` is slice j of copy c (``G = 1``: every expert is a whole copy).  Because the
  SwiGLU is a sum over its hidden units, the G slices of one copy add up to the dense FFN;
* **router virtual groups**: the router gets one random vector per copy (normal, std 1/sqrt(D), as
  indicfm initialises any router), repeated for the copy's G slices, so a copy's slices always
  have the same score, are chosen together, and ``top_k`` (a multiple of G) picks whole copies;
* **exact step 0**: gates are the chosen experts' softmax probabilities renormalised to sum to one
  (``norm_topk_prob``, as Mixtral and Qwen-MoE do; indicfm's plain top-k probabilities would scale
  the output by their sum), and the down projections are multiplied by G (weight scaling): each
  chosen copy then contributes ``p_c / sum(p) x FFN(x)``, which sums to ``FFN(x)``.  Why renormalise
  rather than scale by a constant: the sum of the top-k probabilities differs per token, so no
  constant makes the sum exact;
* **shared experts** (optional): one always-on SwiGLU of width S x F/G whose gate and up projections
  are slices of the dense FFN and whose down projection starts at zero: it adds nothing at step 0
  and learns from there.

Routing is dropless (``dispatch`` is forced to ``dropless`` for the equality; training may switch
to capacity later, which drops tokens and so changes the function).  The copies are identical at
step 0; the random router breaks the symmetry from the first step on, since copies chosen for
different tokens receive different gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from indicfm.convert.hf_arch import plain_path
from indicfm.model.config import ModelConfig
from indicfm.sharding import Rules, state_shardings


class UpcycleError(ValueError):
    """The requested MoE cannot be made from the dense parent (the message says which setting)."""


def upcycled_config(
    parent: ModelConfig, *, num_experts: int, top_k: int, granularity: int = 1, shared_experts: int = 0,
    first_dense_layers: int = 0, **overrides: Any,
) -> ModelConfig:
    """The MoE config upcycled from the dense ``parent`` (checks that the recipe is exact)."""
    if parent.num_moe_layers:
        raise UpcycleError(f"the parent already has {parent.num_moe_layers} MoE layers; upcycling starts from a dense model")
    if granularity < 1 or parent.d_ff % granularity:
        raise UpcycleError(f"--granularity {granularity} must divide the parent's d_ff={parent.d_ff}")
    if num_experts % granularity:
        raise UpcycleError(f"model.num_experts={num_experts} must be a multiple of --granularity {granularity}")
    if top_k % granularity or not 0 < top_k <= num_experts:
        raise UpcycleError(f"model.top_k={top_k} must be a multiple of --granularity {granularity} and at most "
                           f"num_experts={num_experts}: whole copies are chosen at step 0")
    fields = parent.model_dump()
    fields.update(
        num_experts=num_experts, top_k=top_k, d_expert=parent.d_ff // granularity,
        first_dense_layers=first_dense_layers, num_shared_experts=shared_experts, d_shared=0,
        shared_expert_gate=False, router="softmax", norm_topk_prob=True, loss_free_bias=False, dispatch="dropless",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _host(value: Any) -> np.ndarray:
    return np.asarray(jax.device_get(value))


def upcycle_parameters(parent: Any, cfg: ModelConfig, granularity: int, seed: int) -> dict[tuple, np.ndarray]:
    """The MoE model's parameters (unrolled layout, path -> array) from the dense ``parent`` model."""
    from indicfm.model.layout import with_layout

    parent = with_layout(parent, scan_layers=False) if getattr(parent, "scanned_blocks", None) is not None else parent
    flat = {plain_path(path): _host(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(parent, nnx.Param))}
    G, E, D = granularity, cfg.num_experts, cfg.d_model
    copies, width = E // G, cfg.d_expert
    rng = np.random.default_rng(seed)
    out: dict[tuple, np.ndarray] = {}
    for path, value in flat.items():
        if len(path) < 4 or path[0] != "blocks" or path[2] != "mlp" or path[1] < cfg.first_dense_layers:
            out[path] = value
    for layer in range(cfg.first_dense_layers, cfg.num_layers):
        b = ("blocks", layer, "mlp")
        gate, up, down = flat[(*b, "w_gate_DxF")], flat[(*b, "w_up_DxF")], flat[(*b, "w_down_FxD")]
        slices = [slice(j * width, (j + 1) * width) for j in range(G)]
        out[(*b, "w_gate_ExDxF")] = np.stack([gate[:, slices[e % G]] for e in range(E)])
        out[(*b, "w_up_ExDxF")] = np.stack([up[:, slices[e % G]] for e in range(E)])
        out[(*b, "w_down_ExFxD")] = np.stack([G * down[slices[e % G], :] for e in range(E)])
        per_copy = (rng.standard_normal((D, copies)) * D**-0.5).astype(gate.dtype)
        out[(*b, "router_DxE")] = np.repeat(per_copy, G, axis=1)  # column c*G + j = copy c's vector
        if cfg.num_shared_experts:
            shared = slice(0, cfg.shared_width) if cfg.shared_width <= gate.shape[1] else slice(None)
            reps = -(-cfg.shared_width // gate.shape[1])
            out[(*b, "shared", "w_gate_DxF")] = np.tile(gate[:, shared], (1, reps))[:, : cfg.shared_width]
            out[(*b, "shared", "w_up_DxF")] = np.tile(up[:, shared], (1, reps))[:, : cfg.shared_width]
            out[(*b, "shared", "w_down_FxD")] = np.zeros((cfg.shared_width, D), down.dtype)
    return out


def upcycle(parent: Any, cfg: ModelConfig, mesh: jax.sharding.Mesh, *, granularity: int = 1, seed: int = 0,
            rules: Rules | None = None) -> Any:
    """The upcycled ``Transformer(cfg)`` on ``mesh`` (either parameter layout, as ``cfg`` says)."""
    from indicfm.model.layout import placed_with_layout
    from indicfm.model.transformer import Transformer

    values = upcycle_parameters(parent, cfg, granularity, seed)
    unrolled = cfg.model_copy(update={"scan_layers": False})
    abstract = nnx.eval_shape(lambda: Transformer(unrolled, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules)

    def place(key_path: tuple, leaf: Any, sharding: Any) -> jax.Array:
        path = plain_path(key_path)
        if path not in values:
            if path[-1] == "router_bias":
                return jax.device_put(np.zeros(leaf.shape, leaf.dtype), sharding)
            raise UpcycleError(f"no value for {'.'.join(map(str, path))} (the parent and the MoE config disagree)")
        value = values.pop(path)
        if value.shape != tuple(leaf.shape):
            raise UpcycleError(f"{'.'.join(map(str, path))}: the parent gives {value.shape}, the MoE needs {leaf.shape}")
        return jax.device_put(value.astype(leaf.dtype), sharding)

    placed = jax.tree_util.tree_map_with_path(place, state, shardings)
    return placed_with_layout(nnx.merge(graphdef, placed), cfg.scan_layers, mesh, rules)
