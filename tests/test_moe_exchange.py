"""Dropless expert parallelism's exchange (indicfm/model/exchange.py) on 8 fake CPU devices.

* The CPU emulation of ``ragged_all_to_all`` against a NumPy transcription of the contract in
  ``jax.lax.ragged_all_to_all``'s docstring.
* The dropless MoE layer, sharded over several expert-axis sizes, against the same layer on one
  device (no exchange at all): outputs and gradients, with balanced and skewed routing; the skewed
  case is checked to need overflow rounds, so they are exercised.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from indicfm.config import MeshConfig
from indicfm.model.config import ModelConfig
from indicfm.model.exchange import emulated_ragged_all_to_all, max_rounds, resolve_exchange
from indicfm.model.grouped_matmul import round_width
from indicfm.model.moe import MoE
from indicfm.sharding import make_mesh, state_shardings


def numpy_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets):
    """The docstring's SEND/RECEIVE pseudocode, per device, in NumPy."""
    n = len(operands)
    results = [o.copy() for o in outputs]
    for src in range(n):
        per_peer = len(input_offsets[src]) // n
        for q in range(len(input_offsets[src])):
            dst = q // per_peer
            i, s, o = input_offsets[src][q], send_sizes[src][q], output_offsets[src][q]
            results[dst][o:o + s] = operands[src][i:i + s]
    return results


def test_emulated_ragged_all_to_all_follows_the_contract():
    n, per_peer, rows_in, rows_out, width = 4, 2, 10, 12, 3
    rng = np.random.default_rng(0)
    operands = rng.standard_normal((n, rows_in, width)).astype(np.float32)
    outputs = rng.standard_normal((n, rows_out, width)).astype(np.float32)  # unwritten rows are kept
    # sizes[src, dst, s]; each receiver packs its incoming slices back to back, sender by sender
    sizes = rng.integers(0, 3, (n, n, per_peer))
    input_offsets = rng.integers(0, rows_in - 2, (n, n, per_peer))  # any (even overlapping) source rows
    recv_start = np.cumsum(sizes.transpose(1, 0, 2).reshape(n, -1), axis=1) - sizes.transpose(1, 0, 2).reshape(n, -1)
    output_offsets = recv_start.reshape(n, n, per_peer).transpose(1, 0, 2)  # [src, dst, s]
    recv_sizes = sizes.transpose(1, 0, 2)  # [dst, src, s]: what each device receives from each sender
    flat = lambda a: a.reshape(n, -1).astype(np.int32)  # noqa: E731

    mesh = jax.make_mesh((n,), ("e",), devices=jax.devices()[:n])
    f = jax.shard_map(functools.partial(emulated_ragged_all_to_all, axis_name="e"), mesh=mesh,
                      in_specs=(P("e"),) * 6, out_specs=P("e"))
    args = [operands.reshape(n * rows_in, width), outputs.reshape(n * rows_out, width)]
    args += [flat(a).reshape(-1) for a in (input_offsets, sizes, output_offsets, recv_sizes)]
    args = [jax.device_put(a, NamedSharding(mesh, P("e"))) for a in args]
    got = np.asarray(jax.jit(f)(*args)).reshape(n, rows_out, width)
    want = numpy_ragged_all_to_all(operands, outputs, flat(input_offsets), flat(sizes), flat(output_offsets))
    np.testing.assert_array_equal(got, np.stack(want))


def test_auto_exchange_is_ragged_only_where_xla_can_run_it():
    assert resolve_exchange("auto", "tpu") == "ragged_all_to_all"
    assert resolve_exchange("auto", "gpu") == "ragged_all_to_all"
    assert resolve_exchange("auto", "cpu") == "all_to_all"
    assert resolve_exchange("ragged_all_to_all", "cpu") == "ragged_all_to_all"  # an explicit choice is kept


D, E, B, L = 16, 8, 8, 16


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=D, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, d_ff=32,
                num_experts=E, top_k=2, d_expert=8, first_dense_layers=1, num_shared_experts=1,
                dispatch="dropless", router="sigmoid", loss_free_bias=True, compute_dtype="float32")
    base.update(kw)
    return ModelConfig(**base)


def layer_and_inputs(skewed: bool):
    cfg = moe_cfg()
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    if skewed:  # the selection bias sends most choices to experts 0 and 1 (gates are unaffected)
        layer.router_bias[...] = jnp.asarray([0.6, 0.6] + [0.0] * (E - 2), jnp.float32)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    valid = np.ones((B, L), bool)
    valid[::3, -4:] = False  # padding tokens route nowhere
    cotangent = rng.standard_normal((B, L, D)).astype(np.float32)
    return cfg, layer, x, valid, cotangent


def forward_and_grads(layer, x, valid, cotangent):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params_, x_):
        y, _ = nnx.merge(graphdef, params_, rest)(x_, valid)
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads


@functools.lru_cache(maxsize=None)
def single_device(skewed: bool):
    _, layer, x, valid, cotangent = layer_and_inputs(skewed)
    return forward_and_grads(layer, jnp.asarray(x), jnp.asarray(valid), jnp.asarray(cotangent))


MESHES = {
    "expert8": dict(data=1, expert=8),  # one expert per device
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2),
}
FAST = {("expert8", True), ("data2_expert4", False), ("fsdp2_expert2_tensor2", True)}
CASES = [pytest.param(m, s, marks=() if (m, s) in FAST else pytest.mark.slow, id=f"{m}-{'skewed' if s else 'balanced'}")
         for m in MESHES for s in (False, True)]


def rounds_needed(cfg: ModelConfig, layer: MoE, x, expert_axis: int, token_shards: int) -> int:
    """Rounds the batch needs, from the single-device routing (independent of exchange.py)."""
    logits = np.asarray(x, np.float64) @ np.asarray(layer.router_DxE[...], np.float64)
    chosen = np.argsort(-(1 / (1 + np.exp(-logits)) + np.asarray(layer.router_bias[...])), -1)[..., :cfg.top_k]
    # every token's assignments travel, padding included (their gates are zero); the batch is split
    # over (data, fsdp, expert) with expert fastest, so consecutive shards form one expert group
    per_group = chosen.reshape(token_shards // expert_axis, expert_axis, -1)
    rows_per_device = per_group.shape[2]
    most = max(np.bincount(group.reshape(-1) // (E // expert_axis), minlength=expert_axis).max() for group in per_group)
    return -(-most // round_width(rows_per_device, 1))


@pytest.mark.parametrize("mesh_name,skewed", CASES)
def test_sharded_dropless_matches_single_device(mesh_name, skewed):
    ref_y, (ref_params, ref_dx) = single_device(skewed)
    cfg, layer, x, valid, cotangent = layer_and_inputs(skewed)
    sizes = MESHES[mesh_name]
    mesh = make_mesh(MeshConfig(**sizes))
    n = sizes["expert"]
    token_shards = sizes.get("data", 1) * sizes.get("fsdp", 1) * n
    rounds = rounds_needed(cfg, layer, x, n, token_shards)
    rows = B * L * cfg.top_k // token_shards
    assert rounds <= max_rounds(rows, n, round_width(rows, 1))
    if skewed:  # the comparison must cover overflow rounds
        assert rounds > 1, rounds
    graphdef, state = nnx.split(layer)
    layer = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    by_row = NamedSharding(mesh, P(("data", "fsdp", "expert")))
    with jax.set_mesh(mesh):
        y, (params, dx) = forward_and_grads(layer, *(jax.device_put(jnp.asarray(a), by_row) for a in (x, valid, cotangent)))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(ref_dx), rtol=1e-5, atol=1e-5)
    ref_flat = dict(nnx.to_flat_state(ref_params))
    for path, g in nnx.to_flat_state(params):
        np.testing.assert_allclose(np.asarray(g[...]), np.asarray(ref_flat[path][...]), rtol=1e-4, atol=1e-5,
                                   err_msg=str(path))
