"""The optimizer: optax AdamW, a learning-rate schedule, gradient clipping, a weight-decay mask and a
non-finite guard, all from optax's own building blocks.

* Schedule: linear warmup to the peak, then ``cosine`` decay to ``min_lr_ratio × peak``, or ``wsd``
  (warmup, stable plateau, linear decay over the last ``decay_fraction`` of the run), or ``constant``.
* Weight decay only on matrices (``ndim ≥ 2``): norm scales and biases are vectors and never decay;
  embedding tables decay only with ``optimizer.decay_embeddings``.  The MoE router bias is not an
  ``nnx.Param`` at all, so it is not even seen by the optimizer.
* ``optax.apply_if_finite`` skips (zero update, moments untouched) any step whose gradients hold a NaN
  or inf and counts them; the loop stops the run after ``trainer.max_consecutive_nonfinite`` in a row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import optax

from indicfm.train.config import OptimizerConfig

if TYPE_CHECKING:
    from indicfm.config import Config

#: Parameter names that start with one of these are token embedding / unembedding tables
#: (``indicfm.model.transformer`` names them ``embed_VxD`` and ``unembed_DxV``).
EMBEDDING_PREFIXES = ("embed", "unembed", "lm_head", "wte", "tok_emb")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based)."""
    peak = cfg.learning_rate
    final = peak * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=final
        )
    warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if cfg.schedule == "constant":
        return optax.join_schedules([warmup_fn, optax.constant_schedule(peak)], [warmup])
    decay_steps = max(1, round(total_steps * cfg.decay_fraction))
    decay_start = max(warmup, total_steps - decay_steps)
    return optax.join_schedules(
        [warmup_fn, optax.constant_schedule(peak), optax.linear_schedule(peak, final, max(total_steps - decay_start, 1))],
        [warmup, decay_start],
    )


def _path_names(path: tuple) -> list[str]:
    names = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        names.append(str(name).lower())
    return names


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """Pytree of bools like ``params``: True where AdamW's decoupled weight decay applies."""

    def decays(path: tuple, leaf: Any) -> bool:
        names = _path_names(path)
        if getattr(leaf, "ndim", 0) < 2 or any("norm" in n for n in names):
            return False
        is_embedding = any(n.startswith(EMBEDDING_PREFIXES) for n in names)
        return decay_embeddings or not is_embedding

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, max_consecutive_nonfinite: int) -> optax.GradientTransformation:
    """clip → AdamW(schedule, masked decay), wrapped so non-finite gradients skip the update.

    ``max_consecutive_nonfinite`` is passed to ``apply_if_finite`` only so it never lets a NaN update
    through: the loop stops the run when that many non-finite steps come in a row.
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.beta1,
            b2=cfg.beta2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda params: weight_decay_mask(params, cfg.decay_embeddings),
        )
    )
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=max_consecutive_nonfinite)


def run_optimizer(cfg: "Config") -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and learning-rate schedule of a run: ``cfg.optimizer`` over ``trainer.steps``,
    stopping after ``trainer.max_consecutive_nonfinite`` skipped steps in a row.  The train state,
    the jitted step and a restored checkpoint must all agree on this one."""
    steps = cfg.trainer.steps
    return make_optimizer(cfg.optimizer, steps, cfg.trainer.max_consecutive_nonfinite), learning_rate_schedule(cfg.optimizer, steps)
