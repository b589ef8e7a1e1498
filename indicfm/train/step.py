"""The one jitted train step (and the evaluation forward pass), over the train state of ``state.py``.

One step: the global batch is split into ``trainer.micro_batches`` micro-batches (gradient
accumulation, ``lax.scan``), loss = mean next-token cross-entropy over the whole global batch (each
micro-batch's CE *sum* is divided by the global batch's token count, so splitting does not change
the result) + the model's weighted MoE auxiliary losses (``stats.aux_loss``, averaged over
micro-batches); optax then clips, applies AdamW, and skips the update if anything is non-finite; the
loss-free router bias is updated from the step's expert counts (also skipped on a non-finite step).

:func:`build_train_step` is the step exactly as ``indicfm train`` compiles it (shardings, donation),
from the config and the mesh alone; the planner's ahead-of-time compile uses it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from indicfm.train.loss import count_loss_tokens, masked_cross_entropy_sum
from indicfm.train.state import TrainState

if TYPE_CHECKING:
    from indicfm.config import Config

Batch = dict[str, jax.Array]
BATCH_FIELDS = ("tokens", "segment_ids", "positions")


def _split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """``[B, L] → [M, B/M, L]`` taking every M-th row, so each device's rows spread over all micro-batches."""

    def split(x_BxL: jax.Array) -> jax.Array:
        B, L = x_BxL.shape
        return x_BxL.reshape(B // micro_batches, micro_batches, L).swapaxes(0, 1)

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    micro_batches: int = 1,
    router_bias_rate: float = 0.0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure (un-jitted) train step ``(state, batch) -> (state, metrics)``; jit it with
    :func:`jit_train_step`."""
    from indicfm.model.moe import update_router_bias

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        params, model_state = state["params"], state["model_state"]
        loss_tokens = jnp.maximum(count_loss_tokens(batch["segment_ids"]), 1.0)

        def micro_loss(params_, micro: Batch):
            model = nnx.merge(graphdef, params_, model_state)
            logits_BxLxV, stats = model(micro["tokens"], micro["segment_ids"], micro["positions"])
            ce_sum, _ = masked_cross_entropy_sum(logits_BxLxV, micro["tokens"], micro["segment_ids"])
            loss = ce_sum / loss_tokens + stats.aux_loss / micro_batches
            return loss, (ce_sum, stats)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if micro_batches == 1:
            (_, (ce_sum, stats)), grads = grad_fn(params, batch)
            aux, counts, dropped = stats.aux_loss, stats.expert_counts, stats.dropped_fraction
        else:
            micro = _split_micro_batches(batch, micro_batches)

            def accumulate(carry, one: Batch):
                grads_acc, ce_acc, aux_acc, counts_acc, dropped_acc = carry
                (_, (ce_sum_, stats_)), grads_ = grad_fn(params, one)
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads_)
                return (
                    grads_acc,
                    ce_acc + ce_sum_,
                    aux_acc + stats_.aux_loss,
                    counts_acc + stats_.expert_counts,
                    dropped_acc + stats_.dropped_fraction,
                ), None

            first = jax.tree.map(lambda x: x[0], micro)
            counts_shape = jax.eval_shape(lambda p: micro_loss(p, first)[1][1].expert_counts, params)
            zero = jnp.zeros((), jnp.float32)
            init = (jax.tree.map(jnp.zeros_like, params), zero, zero, jnp.zeros(counts_shape.shape, jnp.float32), zero)
            (grads, ce_sum, aux, counts, dropped), _ = jax.lax.scan(accumulate, init, micro)
            aux, dropped = aux / micro_batches, dropped / micro_batches

        ce_loss = ce_sum / loss_tokens
        loss = ce_loss + aux
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        step_ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # apply_if_finite looks at the gradients only; a non-finite loss with finite gradients is skipped too.
        new_params = jax.tree.map(lambda new, old: jnp.where(step_ok, new, old), new_params, params)

        new_model_state = model_state
        if router_bias_rate > 0:
            model = nnx.merge(graphdef, new_params, model_state)
            update_router_bias(model, counts, router_bias_rate)
            _, _, updated = nnx.split(model, nnx.Param, ...)
            new_model_state = jax.tree.map(lambda new, old: jnp.where(step_ok, new, old), updated, model_state)

        metrics = {
            "loss": loss,
            "ce_loss": ce_loss,
            "aux_loss": aux,
            "grad_norm": grad_norm,
            "lr": schedule(_applied_updates(state["opt_state"])),  # the rate this update used
            "loss_tokens": loss_tokens,
            "expert_counts": counts,
            "dropped_fraction": dropped,
            "step_ok": step_ok,
            "nonfinite_in_a_row": opt_state.notfinite_count,
            "nonfinite_total": opt_state.total_notfinite,
        }
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        return TrainState(params=new_params, opt_state=opt_state, model_state=new_model_state, rng=rng), metrics

    return train_step


def _applied_updates(opt_state: Any) -> jax.Array:
    """How many updates were applied so far (the schedule's position), from ``apply_if_finite``'s state."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state.inner_state, "count")
    return counts[0][1] if counts else jnp.zeros((), jnp.int32)


def jit_train_step(train_step: Callable, state_shardings: Any, batch_sharding: Any) -> Callable:
    """Compile the step with explicit shardings; the old state's buffers are donated (reused in place).

    Metrics come out replicated, so every process can read them (``jax.device_get``) on many hosts.
    """
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def build_train_step(
    cfg: "Config", mesh: jax.sharding.Mesh, graphdef: nnx.GraphDef, shardings: Any
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted train step ``indicfm train`` runs for ``cfg`` on ``mesh``: the optimizer and schedule
    of :func:`~indicfm.train.optimizer.run_optimizer`, micro-batches, the router-bias update, the
    state's ``shardings`` (from :func:`~indicfm.train.state.abstract_train_state` or
    ``init_train_state`` with the same optimizer), rows over the data-like axes, donated state.

    Call it (or ``.lower(state, batch)`` on abstract values from :func:`abstract_batch`) under
    ``jax.set_mesh(mesh)``: the layers' sharding constraints read the mesh.
    """
    from indicfm.sharding import batch_sharding
    from indicfm.train.optimizer import run_optimizer

    tx, schedule = run_optimizer(cfg)
    step = make_train_step(
        graphdef,
        tx,
        schedule,
        micro_batches=cfg.trainer.micro_batches,
        router_bias_rate=cfg.model.bias_update_rate if cfg.model.loss_free_bias else 0.0,
    )
    return jit_train_step(step, shardings, batch_sharding(mesh))


def abstract_batch(global_batch_size: int, seq_len: int, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step receives, as sharded ``jax.ShapeDtypeStruct`` (for ``.lower``)."""
    from indicfm.sharding import batch_sharding

    rows = batch_sharding(mesh)
    return {name: jax.ShapeDtypeStruct((global_batch_size, seq_len), jnp.int32, sharding=rows) for name in BATCH_FIELDS}


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[Any, Any, Batch], tuple[jax.Array, jax.Array]]:
    """``(params, model_state, batch) -> (CE sum in nats, number of predicted tokens)`` for evaluation."""

    def eval_step(params: Any, model_state: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params, model_state)
        logits_BxLxV, _ = model(batch["tokens"], batch["segment_ids"], batch["positions"])
        return masked_cross_entropy_sum(logits_BxLxV, batch["tokens"], batch["segment_ids"])

    return eval_step
