"""Meshes, the rules table, and sharded == single-device (logits, loss, gradients) on 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from indicfm.config import MeshConfig
from indicfm.model.config import ModelConfig
from indicfm.model.moe import update_router_bias
from indicfm.model.transformer import Transformer
from indicfm import sharding
from indicfm.sharding import (
    MESH_AXES,
    batch_axes,
    batch_shards,
    batch_sharding,
    logical_axis_rules,
    logical_to_spec,
    make_mesh,
    resolve_mesh_sizes,
    state_shardings,
    weight_axes,
    weight_shards,
)
from indicfm.train.state import abstract_train_state, create_model

MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "expert8": dict(data=1, expert=8),
    "data2_expert4": dict(data=2, expert=4),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2),
}


def tiny_cfg(dispatch: str) -> ModelConfig:
    """``dispatch`` "megablox" is dropless with the TPU Pallas grouped matmul (interpreted on CPU)."""
    gmm = {"megablox": "megablox"}.get(dispatch, "auto")
    return ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       d_ff=64, num_experts=8, top_k=2, d_expert=16, first_dense_layers=1,
                       num_shared_experts=1, dispatch="capacity" if dispatch == "capacity" else "dropless",
                       grouped_matmul=gmm, capacity_factor=1.0, compute_dtype="float32", tie_embeddings=False)


def batch(B=8, L=16):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (B, L)).astype(np.int32)
    seg = np.ones((B, L), np.int32)
    seg[:, L // 2:] = 2  # two documents per row
    seg[::3, -3:] = 0  # and padding in some rows
    pos = np.concatenate([np.arange(L // 2), np.arange(L - L // 2)])[None].repeat(B, 0).astype(np.int32)
    return tokens, seg, pos


def loss_fn(model, tokens, seg, pos):
    """Next-token cross entropy over non-padding targets of the same document, plus the aux loss."""
    logits, stats = model(tokens, seg, pos)
    targets, mask = tokens[:, 1:], (seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    loss = jnp.sum(ce * mask) / jnp.sum(mask) + stats.aux_loss
    return loss, (logits, stats)


def run(model, tokens, seg, pos):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, stats)), grads = nnx.jit(grad_fn)(model, tokens, seg, pos)
    return loss, logits, stats, grads


@functools.lru_cache(maxsize=None)
def reference(dispatch: str):
    """Single-device, unsharded forward and backward (computed once per dispatch per worker)."""
    cfg = tiny_cfg(dispatch)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    return cfg, run(model, *map(jnp.asarray, batch()))


# The mesh using every parallelism kind at once runs in the fast suite for each dispatch; all six
# meshes under -m slow.  Compiling a sharded forward+backward takes ~5-10 s per mesh on 2 CPU cores.
FAST = {("capacity", "fsdp2_expert2_tensor2"), ("dropless", "fsdp2_expert2_tensor2"), ("megablox", "fsdp2_expert2_tensor2")}
CASES = [
    pytest.param(d, m, marks=() if (d, m) in FAST else pytest.mark.slow, id=f"{d}-{m}")
    for d in ("capacity", "dropless", "megablox") for m in MESHES
]


@pytest.mark.parametrize("dispatch,mesh_name", CASES)
def test_sharded_matches_single_device(dispatch, mesh_name):
    cfg, (ref_loss, ref_logits, ref_stats, ref_grads) = reference(dispatch)
    mesh = make_mesh(MeshConfig(**MESHES[mesh_name]))
    # Place the single-device initial parameters with the rules (create_model is tested below).
    single = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(single)
    model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    bs = batch_sharding(mesh)
    with jax.set_mesh(mesh):
        loss, logits, stats, grads = run(model, *(jax.device_put(a, bs) for a in batch()))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.expert_counts), np.asarray(ref_stats.expert_counts))
    np.testing.assert_allclose(float(stats.dropped_fraction), float(ref_stats.dropped_fraction), atol=1e-7)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    assert len(flat) == len(ref_flat)
    for path, g in flat:
        np.testing.assert_allclose(np.asarray(g[...]), np.asarray(ref_flat[path][...]), rtol=1e-4, atol=1e-6,
                                   err_msg=str(path))
    if dispatch == "megablox":  # the single-device reference runs the same kernel: check it against XLA too
        dense_loss = run(Transformer(tiny_cfg("dropless"), rngs=nnx.Rngs(0)), *map(jnp.asarray, batch()))[0]
        np.testing.assert_allclose(float(ref_loss), float(dense_loss), rtol=1e-5)
    if cfg.dispatch == "capacity":
        assert float(ref_stats.dropped_fraction) > 0  # the comparison covers dropping too


def test_parameters_are_created_sharded():
    cfg = tiny_cfg("dropless")
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    model = create_model(cfg, mesh, seed=0)
    # same values as the unsharded constructor with the same seed
    ref = dict(nnx.to_flat_state(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        np.testing.assert_allclose(np.asarray(var[...]), np.asarray(ref[path][...]), rtol=1e-6, err_msg=str(path))
    w = model.blocks[1].mlp.w_gate_ExDxF[...]
    assert w.sharding.spec == P("expert", "fsdp", "tensor")
    assert w.addressable_shards[0].data.shape == (4, 16, 8)
    assert model.blocks[0].attn.w_q_DxHxG[...].sharding.spec == P("fsdp", "tensor", None)


def test_optimizer_state_shardings_follow_params():
    cfg = tiny_cfg("dropless")
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    abstract_opt = nnx.eval_shape(
        lambda: nnx.Optimizer(Transformer(cfg, rngs=nnx.Rngs(0)), optax.adamw(1e-3), wrt=nnx.Param))
    shardings = state_shardings(nnx.state(abstract_opt), mesh)
    specs = {path: s.spec for path, s in nnx.to_flat_state(shardings)
             if path[-1] == "w_gate_ExDxF" or "w_gate_ExDxF" in path}
    assert specs and all(spec == P("expert", None, None) for spec in specs.values()), specs


def test_abstract_train_state_is_a_restore_target():
    cfg = tiny_cfg("dropless")
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    _, target, _ = abstract_train_state(cfg, optax.adam(1e-2), 0, mesh)
    leaf = target["params"]["blocks"][1]["mlp"]["w_gate_ExDxF"].get_value()
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (8, 32, 16)
    assert leaf.sharding.spec == P("expert", "fsdp", "tensor")
    moment = target["opt_state"][0].mu["blocks"][1]["mlp"]["w_gate_ExDxF"].get_value()
    assert moment.sharding.spec == P("expert", "fsdp", "tensor")  # AdamW's moments like their parameter


def test_make_mesh_sizes_and_errors():
    mesh = make_mesh(MeshConfig(data=-1, expert=4))
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    with pytest.raises(ValueError, match="not divisible"):
        make_mesh(MeshConfig(data=-1, expert=3))
    with pytest.raises(ValueError, match="8 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, expert=1, tensor=1))
    with pytest.raises(ValueError, match="only one axis"):
        make_mesh(MeshConfig(data=-1, fsdp=-1))
    # the same arithmetic without devices (the planner's): a 256-chip slice
    assert resolve_mesh_sizes(MeshConfig(data=-1, fsdp=16, expert=4), 256) == {"data": 4, "fsdp": 16, "expert": 4, "tensor": 1}
    with pytest.raises(ValueError, match="256 devices"):
        resolve_mesh_sizes(MeshConfig(data=2, fsdp=2), 256)


def test_logical_to_spec_falls_back_to_replication():
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, expert=1, tensor=4))
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh) == P(None, None, None)
    assert logical_to_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == P(None, "tensor", None)
    assert logical_to_spec(("batch", "length"), (8, 16), mesh) == P("data", None)
    assert logical_to_spec(("batch", "length"), (3, 16), mesh) == P(None, None)
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("embedd",), (4,), mesh)


def test_batch_and_weight_shards_are_read_from_the_rules_table():
    """Hand-computed on data=2 fsdp=4 expert=8 tensor=2: the batch splits 2 x 4 x 8 = 64 ways (every
    data-like axis), FSDP splits weights 4 ways, or 2 x 4 = 8 ways when they are also sharded over data."""
    sizes = {"data": 2, "fsdp": 4, "expert": 8, "tensor": 2}
    assert batch_axes() == ("data", "fsdp", "expert") and batch_shards(sizes) == 64
    assert weight_axes() == ("fsdp",) and weight_shards(sizes) == 4
    over_data = logical_axis_rules(shard_weights_over_data=True)
    assert weight_axes(over_data) == ("data", "fsdp") and weight_shards(sizes, over_data) == 8
    assert batch_shards(sizes, over_data) == 64  # sharding weights over data leaves the batch as it was
    # the same split as the PartitionSpec training places on a batch (no devices needed)
    mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    assert logical_to_spec(("batch", "length"), (128, 16), mesh) == P(("data", "fsdp", "expert"), None)
    assert logical_to_spec(("embed", "mlp"), (32, 64), mesh, over_data) == P(("data", "fsdp"), "tensor")


def test_the_planners_batch_split_follows_the_rules_table(monkeypatch):
    """Edit the table's ``batch`` rule and the planner's rows per device follow, with no planner change."""
    from indicfm.config import load_config
    from indicfm.launch.plan_layout import PlanError, per_device_batch

    cfg = load_config(None, ["trainer.global_batch_size=64", "trainer.micro_batches=1"])
    sizes = {"data": 2, "fsdp": 2, "expert": 4, "tensor": 1}
    assert per_device_batch(cfg, sizes) == 64 // (2 * 2 * 4)
    # expert-parallel devices sharing their rows: the batch then splits over data x fsdp only
    monkeypatch.setitem(sharding.LOGICAL_AXIS_RULES, "batch", ("data", "fsdp"))
    assert batch_shards(sizes) == 4
    assert per_device_batch(cfg, sizes) == 64 // (2 * 2)
    odd = load_config(None, ["trainer.global_batch_size=6", "trainer.micro_batches=1"])
    with pytest.raises(PlanError, match="over data x fsdp = 4 devices"):
        per_device_batch(odd, sizes)


def test_trainer_recipe_jits_a_sharded_step():
    """A hand-written step over ``nnx.Optimizer`` with the rules' shardings: explicit in/out
    shardings, donated state, parameters stay in their layout."""
    cfg = tiny_cfg("dropless").model_copy(update={"loss_free_bias": True, "router": "sigmoid"})
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    model = create_model(cfg, mesh, seed=0)
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    shardings = state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    rows = batch_sharding(mesh)

    @functools.partial(jax.jit, in_shardings=(shardings, rows, rows, rows), out_shardings=(shardings, None),
                       donate_argnums=0)
    def train_step(state, tokens, seg, pos):
        model, optimizer = nnx.merge(graphdef, state)
        (loss, (_, stats)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens, seg, pos)
        optimizer.update(model, grads)
        update_router_bias(model, stats.expert_counts, 0.01)
        return nnx.state((model, optimizer)), loss

    with jax.set_mesh(mesh):
        losses = []
        for _ in range(3):
            state, loss = train_step(state, *batch())
            losses.append(float(loss))
    assert losses[-1] < losses[0]
    model, optimizer = nnx.merge(graphdef, state)
    assert model.blocks[1].mlp.w_gate_ExDxF[...].sharding.spec == P("expert", "fsdp", "tensor")
    assert float(jnp.abs(model.blocks[1].mlp.router_bias[...]).sum()) > 0
