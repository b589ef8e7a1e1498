"""The train state: a sharded model, split into the arrays the jitted step carries.

The model is an NNX module; the step (``step.py``) is a pure function over its split state, so it can
be compiled once with explicit shardings and donated buffers.  This module builds that state three
ways (:mod:`indicfm.train.start` chooses between random, restored and another checkpoint's
parameters):

* :func:`create_model`: the transformer with every parameter born in its sharded layout;
* :func:`init_train_state`: a fresh state from such a model (optimizer moments created sharded);
* :func:`abstract_train_state`: the same tree with nothing allocated, the restore target and what
  ahead-of-time compilation (``indicfm plan --compile``) lowers against.

The sharding of every array comes from the one rules table in :mod:`indicfm.sharding`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

import jax
import optax
from flax import nnx

from indicfm.sharding import Rules, state_shardings

if TYPE_CHECKING:
    from indicfm.model.config import ModelConfig
    from indicfm.model.transformer import Transformer


class TrainState(TypedDict):
    """What one train step reads and returns (a plain dict at run time, so checkpoints keep their
    layout): ``params`` (every ``nnx.Param``), ``model_state`` (every other ``nnx.Variable``, e.g. the
    MoE router bias), ``opt_state`` (optax's, moments sharded like their parameters) and ``rng`` (uint32
    key data, advanced each step)."""

    params: nnx.State
    model_state: nnx.State
    opt_state: optax.OptState
    rng: jax.Array


def create_model(
    cfg: "ModelConfig", mesh: jax.sharding.Mesh, seed: int = 0, rules: Rules | None = None
) -> "Transformer":
    """Instantiate the transformer with every parameter created directly in its sharded layout.

    The constructor runs under ``jax.jit`` with ``out_shardings`` computed from the abstract model
    (``nnx.eval_shape``), so each device only ever materialises its own shard.
    """
    from indicfm.model.transformer import Transformer

    def build() -> Transformer:
        return Transformer(cfg, rngs=nnx.Rngs(seed))

    # eval_shape outside the mesh context: with a mesh set, Flax would try to read the logical
    # names as mesh axes.
    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    with jax.set_mesh(mesh):
        init = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)
        state = init()
    return nnx.merge(graphdef, state)


def _fresh_optimizer_and_rng(tx: optax.GradientTransformation, seed: int) -> Any:
    def fresh(params: Any) -> dict[str, Any]:
        return {"opt_state": tx.init(params), "rng": jax.random.key_data(jax.random.key(seed))}

    return fresh


def init_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    seed: int,
    mesh: jax.sharding.Mesh,
    rules: Rules | None = None,
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """Split a sharded model (:func:`create_model`) into its graph definition, a fresh train state
    and the state's sharding tree (for ``jax.jit`` and Orbax restore targets).

    Optimizer moments are built with ``jax.tree.map`` over the ``nnx.Param`` variables, so they keep
    the parameters' logical-axis metadata and ``state_shardings`` shards them like the parameters.
    They are created inside ``jax.jit`` with those output shardings: every array is born global and
    sharded (this is also what makes it work with several processes).
    """
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    fresh = _fresh_optimizer_and_rng(tx, seed)
    abstract = {"params": params, "model_state": model_state, **jax.eval_shape(fresh, params)}
    shardings = state_shardings(abstract, mesh, rules)
    created = jax.jit(fresh, out_shardings={k: shardings[k] for k in ("opt_state", "rng")})(params)
    state = TrainState(params=params, model_state=model_state, **created)
    return graphdef, state, shardings


def abstract_train_state(
    model_cfg: "ModelConfig",
    tx: optax.GradientTransformation,
    seed: int,
    mesh: jax.sharding.Mesh,
    rules: Rules | None = None,
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """Like :func:`init_train_state` but nothing is allocated: ``jax.ShapeDtypeStruct`` leaves that
    carry their target sharding on ``mesh``.

    This is the restore target: Orbax reads each array straight into its sharding (the mesh may
    differ from the one the checkpoint was saved from) and no throw-away initialisation runs.  It is
    also what ``jax.jit(...).lower`` needs to compile the step ahead of time.
    """
    from indicfm.model.transformer import Transformer

    abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed)))
    graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
    fresh = jax.eval_shape(_fresh_optimizer_and_rng(tx, seed), params)
    abstract = {"params": params, "model_state": model_state, **fresh}
    shardings = state_shardings(abstract, mesh, rules)
    with_shardings = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    return graphdef, with_shardings, shardings
