"""The train step with a tiny stand-in NNX model (fast to compile): gradient accumulation gives the
same update as one big batch, the loss is the masked mean CE plus the aux loss, and a non-finite
step leaves the parameters untouched and is counted."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, struct

from indicfm.train.config import OptimizerConfig
from indicfm.train.optimizer import learning_rate_schedule, make_optimizer
from indicfm.train.step import make_train_step

V, D = 32, 8


@struct.dataclass
class Stats:
    aux_loss: jax.Array
    expert_counts: jax.Array
    dropped_fraction: jax.Array


class StandIn(nnx.Module):
    """Embedding → linear; aux loss = 0.01 · mean squared hidden state (depends on the batch)."""

    def __init__(self, rngs):
        self.embed_VxD = nnx.Param(jax.random.normal(rngs.params(), (V, D)) * 0.5)
        self.out = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tokens, segment_ids, positions):
        h = self.embed_VxD[...][tokens] + 0.01 * positions[..., None]
        aux = 0.01 * jnp.mean(h**2)
        return self.out(h), Stats(aux, jnp.ones((1, 4)), jnp.zeros(()))


def _batch(seed=0, B=8, L=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, L)).astype(np.int32)
    segments = np.ones((B, L), np.int32)
    segments[:, 7:] = 2
    segments[::3, 10:] = 0  # some padding
    positions = np.where(segments == 1, np.arange(L), np.arange(L) - 7).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments), "positions": jnp.asarray(positions)}


def _setup(micro_batches):
    cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0, schedule="constant")
    tx = make_optimizer(cfg, 10, 3)
    graphdef, params, rest = nnx.split(StandIn(nnx.Rngs(0)), nnx.Param, ...)
    state = {"params": params, "opt_state": tx.init(params), "model_state": rest, "rng": jax.random.key_data(jax.random.key(0))}
    step = jax.jit(make_train_step(graphdef, tx, learning_rate_schedule(cfg, 10), micro_batches=micro_batches))
    return graphdef, state, step


def test_loss_is_masked_mean_cross_entropy_plus_aux():
    graphdef, state, step = _setup(1)
    batch = _batch()
    model = nnx.merge(graphdef, state["params"], state["model_state"])
    logits, stats = model(batch["tokens"], batch["segment_ids"], batch["positions"])
    logits = np.asarray(logits, np.float64)
    tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    nll, n = 0.0, 0
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1] - 1):
            if seg[b, i] and seg[b, i + 1] == seg[b, i]:
                row = logits[b, i]
                nll += np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[b, i + 1]]
                n += 1
    _, metrics = step(state, batch)
    assert float(metrics["ce_loss"]) == pytest.approx(nll / n, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(nll / n + float(stats.aux_loss), rel=1e-5)


@pytest.mark.parametrize("micro_batches", [4])
def test_gradient_accumulation_matches_one_big_batch(micro_batches):
    _, state, step1 = _setup(1)
    _, state_m, step_m = _setup(micro_batches)
    batch = _batch(1)
    new1, m1 = step1(state, batch)
    new_m, m_m = step_m(state_m, batch)
    assert float(m_m["ce_loss"]) == pytest.approx(float(m1["ce_loss"]), rel=1e-5)
    assert float(m_m["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-4)
    for a, b in zip(jax.tree.leaves(new1["params"]), jax.tree.leaves(new_m["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_nonfinite_step_is_skipped_and_counted():
    _, state, step = _setup(1)
    state["params"]["out"]["bias"] = state["params"]["out"]["bias"].replace(jnp.full((V,), jnp.nan))
    before = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
    new, metrics = step(state, _batch())
    assert not bool(metrics["step_ok"]) and int(metrics["nonfinite_in_a_row"]) == 1
    for a, b in zip(before, jax.tree.leaves(new["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))  # NaN == NaN here: unchanged, bit for bit
