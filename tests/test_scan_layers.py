"""model.scan_layers: the stacked, scanned MoE blocks compute what the unrolled blocks compute.

Reference = the unrolled model (the default layout).  The scanned model gets the unrolled model's
weights through :func:`copy_into_scanned`, written here attribute by attribute (independently of
``indicfm.model.layout``), then losses, router statistics and gradients must agree; so must a
sharded scanned step on 8 fake devices and the router-bias update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from indicfm.config import MeshConfig
from indicfm.model.config import ModelConfig
from indicfm.model.layout import with_layout
from indicfm.model.moe import update_router_bias
from indicfm.model.transformer import Transformer, param_layout
from indicfm.sharding import batch_sharding, make_mesh, state_shardings
from indicfm.train.state import create_model

# (module path inside a block, parameter name) of every variable of an MoE block with a shared expert
MOE_BLOCK_VARIABLES = [
    (("attn_norm",), "scale"), (("mlp_norm",), "scale"),
    (("attn",), "w_q_DxHxG"), (("attn",), "w_k_DxKxG"), (("attn",), "w_v_DxKxG"), (("attn",), "w_o_HxGxD"),
    (("mlp",), "router_DxE"), (("mlp",), "w_gate_ExDxF"), (("mlp",), "w_up_ExDxF"), (("mlp",), "w_down_ExFxD"),
    (("mlp",), "router_bias"),
    (("mlp", "shared"), "w_gate_DxF"), (("mlp", "shared"), "w_up_DxF"), (("mlp", "shared"), "w_down_FxD"),
]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                num_experts=8, top_k=2, d_expert=16, first_dense_layers=1, num_shared_experts=1,
                compute_dtype="float32", tie_embeddings=False, loss_free_bias=True, router="sigmoid",
                capacity_factor=1.0)
    base.update(kw)
    return ModelConfig(**base)


def module_at(root, names):
    for name in names:
        root = getattr(root, name)
    return root


def copy_into_scanned(unrolled: Transformer, scanned: Transformer) -> None:
    """Give ``scanned`` the weights of ``unrolled``: dense blocks and the rest as they are, MoE block
    ``first_dense_layers + n`` into row ``n`` of every stacked variable."""
    cfg = unrolled.cfg
    scanned.embed_VxD[...] = unrolled.embed_VxD[...]
    scanned.unembed_DxV[...] = unrolled.unembed_DxV[...]
    scanned.final_norm.scale[...] = unrolled.final_norm.scale[...]
    for i in range(cfg.first_dense_layers):
        dense_src, dense_dst = unrolled.blocks[i], scanned.blocks[i]
        for path, name in [(("attn_norm",), "scale"), (("mlp_norm",), "scale"), (("attn",), "w_q_DxHxG"),
                           (("attn",), "w_k_DxKxG"), (("attn",), "w_v_DxKxG"), (("attn",), "w_o_HxGxD"),
                           (("mlp",), "w_gate_DxF"), (("mlp",), "w_up_DxF"), (("mlp",), "w_down_FxD")]:
            getattr(module_at(dense_dst, path), name)[...] = getattr(module_at(dense_src, path), name)[...]
    moe_blocks = [unrolled.blocks[i] for i in range(cfg.first_dense_layers, cfg.num_layers)]
    for path, name in MOE_BLOCK_VARIABLES:
        rows = [np.asarray(getattr(module_at(block, path), name)[...]) for block in moe_blocks]
        getattr(module_at(scanned.scanned_blocks, path), name)[...] = jnp.asarray(np.stack(rows))


def unrolled_and_scanned(cfg: ModelConfig) -> tuple[Transformer, Transformer]:
    unrolled = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for block in unrolled.blocks[cfg.first_dense_layers:]:  # a bias that changes the routing
        block.mlp.router_bias[...] = jnp.asarray(rng.normal(0, 0.3, (cfg.num_experts,)), jnp.float32)
    scanned = Transformer(cfg.model_copy(update={"scan_layers": True}), rngs=nnx.Rngs(0))
    copy_into_scanned(unrolled, scanned)
    return unrolled, scanned


def batch(B=4, L=16):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (B, L)).astype(np.int32)
    seg = np.ones((B, L), np.int32)
    seg[:, L // 2:] = 2
    seg[::3, -3:] = 0
    pos = np.concatenate([np.arange(L // 2), np.arange(L - L // 2)])[None].repeat(B, 0).astype(np.int32)
    return tokens, seg, pos


def loss_and_grads(model: Transformer, tokens, seg, pos):
    """The trainer's pattern: gradients w.r.t. the Params only, the router bias as other state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest):
        logits, stats = nnx.merge(graphdef, params, rest)(tokens, seg, pos)
        mask = seg[:, 1:] > 0
        logp = jax.nn.log_softmax(logits[:, :-1])
        ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(ce * mask) / jnp.sum(mask) + stats.aux_loss, stats

    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rest)
    return loss, stats, grads


def scanned_row(tree, path, name, n):
    return np.asarray(getattr(module_at(tree.scanned_blocks, path), name)[...])[n]


def assert_same_results(cfg, unrolled_results, scanned_results, rtol=1e-5, atol=1e-6):
    (loss_u, stats_u, grads_u), (loss_s, stats_s, grads_s) = unrolled_results, scanned_results
    np.testing.assert_allclose(float(loss_s), float(loss_u), rtol=rtol)
    for field in ("aux_loss", "load_balance_loss", "z_loss", "dropped_fraction"):
        np.testing.assert_allclose(float(getattr(stats_s, field)), float(getattr(stats_u, field)),
                                   rtol=rtol, atol=1e-7, err_msg=field)
    np.testing.assert_array_equal(np.asarray(stats_s.expert_counts), np.asarray(stats_u.expert_counts))
    # gradients: nnx.State trees of Params, indexed like the modules
    close = dict(rtol=rtol, atol=atol)
    for keys in [("embed_VxD",), ("unembed_DxV",), ("final_norm", "scale"), ("blocks", 0, "attn", "w_q_DxHxG"),
                 ("blocks", 0, "mlp", "w_down_FxD")]:
        np.testing.assert_allclose(value_at(grads_s, keys), value_at(grads_u, keys), err_msg=str(keys), **close)
    for n, i in enumerate(range(cfg.first_dense_layers, cfg.num_layers)):
        for path, name in MOE_BLOCK_VARIABLES:
            if name == "router_bias":
                continue  # not a Param: no gradient
            np.testing.assert_allclose(value_at(grads_s, ("scanned_blocks", *path, name))[n],
                                       value_at(grads_u, ("blocks", i, *path, name)),
                                       err_msg=f"layer {i} {path} {name}", **close)


def value_at(state, keys) -> np.ndarray:
    for key in keys:
        state = state[key]
    return np.asarray(state[...])


CASES = [
    pytest.param("dropless", "none", id="dropless"),
    pytest.param("capacity", "full", id="capacity-remat_full"),
    pytest.param("dropless", "attention", id="dropless-remat_attention", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("dispatch,remat", CASES)
def test_scanned_model_has_the_unrolled_losses_stats_and_gradients(dispatch, remat):
    cfg = tiny_cfg(dispatch=dispatch, remat=remat)
    unrolled, scanned = unrolled_and_scanned(cfg)
    assert param_layout(scanned.cfg) == "scanned" and len(scanned.blocks) == cfg.first_dense_layers
    inputs = tuple(map(jnp.asarray, batch()))
    results_u = loss_and_grads(unrolled, *inputs)
    results_s = loss_and_grads(scanned, *inputs)
    assert_same_results(cfg, results_u, results_s)
    assert np.asarray(results_u[1].expert_counts).shape == (cfg.num_moe_layers, cfg.num_experts)
    if dispatch == "capacity":
        assert float(results_u[1].dropped_fraction) > 0  # the comparison covers dropping too


def residual_bytes(cfg: ModelConfig) -> int:
    """Bytes the backward pass keeps from the forward pass (the leaves of ``jax.vjp``'s function,
    shapes only: nothing is compiled or run)."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    tokens, seg, pos = map(jnp.asarray, batch())

    def loss(params_, rest_):
        logits, stats = nnx.merge(graphdef, params_, rest_)(tokens, seg, pos)
        return jnp.mean(logits) + stats.aux_loss

    saved = jax.eval_shape(lambda p, r: jax.vjp(lambda p_: loss(p_, r), p)[1], params, rest)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(saved))


@pytest.mark.parametrize("remat", ["attention", "full"])
def test_remat_is_applied_per_scanned_block(remat):
    """With remat, a scanned model keeps no more for the backward pass than the unrolled model
    (which rematerialises each block, or each attention, in its Python loop), and less than
    without remat: the scan body, one block, is what gets recomputed."""
    cfg = tiny_cfg(num_layers=6, remat=remat)
    scanned = residual_bytes(cfg.model_copy(update={"scan_layers": True}))
    scanned_without = residual_bytes(cfg.model_copy(update={"scan_layers": True, "remat": "none"}))
    unrolled = residual_bytes(cfg)
    assert scanned <= unrolled, (scanned, unrolled)
    assert scanned < (0.5 if remat == "full" else 0.9) * scanned_without, (scanned, scanned_without)


def test_scanned_parameters_shard_like_unrolled_and_a_sharded_step_matches():
    cfg = tiny_cfg()
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    scanned_cfg = cfg.model_copy(update={"scan_layers": True})
    born_sharded = create_model(scanned_cfg, mesh, seed=0)
    w = born_sharded.scanned_blocks.mlp.w_gate_ExDxF[...]
    assert w.shape == (3, 8, 32, 16) and w.sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert born_sharded.scanned_blocks.attn.w_q_DxHxG[...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert born_sharded.scanned_blocks.mlp.router_bias[...].sharding.spec == P()

    unrolled, scanned = unrolled_and_scanned(cfg)
    inputs = tuple(map(jnp.asarray, batch(B=8)))
    reference = loss_and_grads(unrolled, *inputs)  # single device, unrolled
    graphdef, state = nnx.split(scanned)
    placed = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    rows = batch_sharding(mesh)
    with jax.set_mesh(mesh):
        sharded = loss_and_grads(placed, *(jax.device_put(a, rows) for a in inputs))
    assert_same_results(cfg, reference, sharded, rtol=1e-4, atol=1e-6)


def test_router_bias_update_of_the_stacked_layers_matches_per_layer():
    cfg = tiny_cfg()
    unrolled, scanned = unrolled_and_scanned(cfg)
    counts = jnp.asarray(np.random.default_rng(2).integers(0, 20, (cfg.num_moe_layers, cfg.num_experts)), jnp.float32)
    update_router_bias(unrolled, counts, 0.01)
    update_router_bias(scanned, counts, 0.01)
    for n, block in enumerate(unrolled.blocks[cfg.first_dense_layers:]):
        np.testing.assert_allclose(scanned_row(scanned, ("mlp",), "router_bias", n),
                                   np.asarray(block.mlp.router_bias[...]), rtol=1e-6)


def test_layout_conversion_both_ways():
    cfg = tiny_cfg()
    unrolled, scanned = unrolled_and_scanned(cfg)
    converted = with_layout(unrolled, scan_layers=True)
    expected = dict(nnx.to_flat_state(nnx.state(scanned)))
    got = list(nnx.to_flat_state(nnx.state(converted)))
    assert len(got) == len(expected)
    for path, var in got:
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(expected[path][...]), err_msg=str(path))
    assert converted.scanned_blocks.mlp.w_gate_ExDxF.get_metadata()["out_sharding"][0] == "layers"
    back = with_layout(scanned, scan_layers=False)
    expected = dict(nnx.to_flat_state(nnx.state(unrolled)))
    got = list(nnx.to_flat_state(nnx.state(back)))
    assert len(got) == len(expected) and back.scanned_blocks is None
    for path, var in got:
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(expected[path][...]), err_msg=str(path))


def test_a_dense_only_model_has_the_unrolled_layout_either_way():
    cfg = tiny_cfg(first_dense_layers=4, scan_layers=True)
    assert param_layout(cfg) == "unrolled"
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assert model.scanned_blocks is None and len(model.blocks) == 4
