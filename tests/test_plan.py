"""The planner against independent references: XLA's memory analysis of the compiled train step,
the instantiated model's parameter count, hand-computed activation sizes, and hardware figures."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

from indicfm.cli import app
from indicfm.config import load_config
from indicfm.hardware import GIB, parse_slice
from indicfm.launch.plan import make_plan
from indicfm.launch.plan_layout import PlanError, mesh_sizes
from indicfm.launch.plan_memory import activation_bytes_per_device, memory_per_device, overflow_round_bytes
from indicfm.launch.plan_roofline import step_time
from indicfm.launch.plan_trace import _conditional_output_bytes, saved_residuals

# Small MoE configs unlike the shipped ones: odd widths, 3 layers, a shared expert, untied output.
SMALL = [
    "model.vocab_size=3000", "model.d_model=96", "model.num_layers=3", "model.num_heads=6",
    "model.num_kv_heads=2", "model.head_dim=16", "model.d_ff=320", "model.num_experts=4",
    "model.num_shared_experts=1", "model.top_k=2", "model.d_expert=80", "model.first_dense_layers=1",
    "model.tie_embeddings=false", "model.remat=none", "data.seq_len=64", "trainer.global_batch_size=16",
]  # fmt: skip


def small_config(*extra: str):
    return load_config(None, [*SMALL, *extra])


def xla_memory_per_device(cfg) -> tuple[int, int]:
    """(arguments, peak total) bytes per device XLA reports for the compiled, donated train step."""
    from indicfm.sharding import batch_sharding, make_mesh
    from indicfm.train.optimizer import learning_rate_schedule, make_optimizer
    from indicfm.train.state import create_model, init_train_state
    from indicfm.train.step import jit_train_step, make_train_step

    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optimizer, cfg.trainer.steps, cfg.trainer.max_consecutive_nonfinite)
    model = create_model(cfg.model, mesh, 0)
    graphdef, state, shardings = init_train_state(model, tx, 0, mesh)
    step = make_train_step(
        graphdef, tx, learning_rate_schedule(cfg.optimizer, cfg.trainer.steps), micro_batches=cfg.trainer.micro_batches
    )
    rows = batch_sharding(mesh)
    shape = (cfg.trainer.global_batch_size, cfg.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for k in ("tokens", "segment_ids", "positions")}
    with jax.set_mesh(mesh):
        stats = jit_train_step(step, shardings, rows).lower(state, batch).compile().memory_analysis()
    peak = stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return stats.argument_size_in_bytes, peak


def planned(cfg):
    sizes = mesh_sizes(cfg.mesh, jax.device_count())
    return memory_per_device(cfg, sizes, parse_slice("cpux8").chip)


def assert_close_to_xla(cfg, tolerance: float = 0.25) -> None:
    arguments, peak = xla_memory_per_device(cfg)
    memory = planned(cfg)
    # the train state the step receives: parameters and AdamW moments (the batch is a few KiB)
    assert memory.params + memory.optimizer == pytest.approx(arguments, rel=0.05)
    assert memory.total == pytest.approx(peak, rel=tolerance), (
        f"planner {memory.total / 2**20:.2f} MiB vs XLA {peak / 2**20:.2f} MiB per device"
    )


def test_memory_matches_xla_with_fsdp_and_expert_parallelism():
    assert jax.device_count() == 8
    # two blocks (one dense, one MoE) keep the CPU compile short
    assert_close_to_xla(small_config("model.num_layers=2", "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=1"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh",
    [
        ("mesh.data=-1",),
        ("mesh.data=1", "mesh.fsdp=-1"),
        ("mesh.data=2", "mesh.expert=4"),
        ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
    ],
)
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_memory_matches_xla_across_meshes_and_dtypes(mesh, compute):
    assert_close_to_xla(small_config(*mesh, f"model.compute_dtype={compute}"))


@pytest.mark.slow
def test_memory_matches_xla_with_capacity_dispatch_and_micro_batches():
    assert_close_to_xla(
        small_config("mesh.data=-1", "model.dispatch=capacity", "trainer.micro_batches=2", "trainer.global_batch_size=32")
    )


def test_parameter_counts_agree_with_the_instantiated_model_and_flops():
    from indicfm.model.flops import count_params, train_flops_per_token
    from indicfm.model.transformer import Transformer

    cfg = small_config("mesh.data=1")
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    result = make_plan(cfg, "cpu")
    assert result.params == real == count_params(cfg.model)
    assert result.flops_per_token == train_flops_per_token(cfg.model, cfg.data.seq_len)
    # one device with a replicated model holds every parameter in float32
    one = memory_per_device(load_config(None, [*SMALL, "mesh.data=1"]), {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, parse_slice("cpu").chip)
    assert one.params == real * 4 and one.optimizer == 2 * real * 4


def test_dense_model_flops_agree_with_xla_cost_analysis():
    """For a dense model (no routing overhead), XLA's FLOP count of one forward+backward step matches
    the model counter: 6 x matmul params per token + the attention term."""
    from indicfm.model.flops import train_flops_per_token
    from indicfm.model.transformer import Transformer
    from indicfm.train.loss import masked_cross_entropy_sum

    cfg = small_config("model.num_layers=2", "model.first_dense_layers=2", "model.compute_dtype=float32", "mesh.data=1")
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.ones((2, cfg.data.seq_len), jnp.int32)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p, rest)(tokens, tokens, tokens)
        return masked_cross_entropy_sum(logits, tokens, tokens)[0]

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    expected = train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens.size
    assert cost["flops"] == pytest.approx(expected, rel=0.15)


def test_full_remat_keeps_one_block_input_per_layer():
    """Hand-computed: with remat=full each extra block saves only its input, B x L x D in bf16."""
    base = ["model.remat=full", "model.compute_dtype=bfloat16", "mesh.data=1"]
    three, four = (
        sum(r.nbytes for r in saved_residuals(small_config(*base, f"model.num_layers={n}").model, 16, 64, (1, 1, 1, 1)))
        for n in (3, 4)
    )
    assert four - three == 16 * 64 * 96 * 2
    none = small_config("model.remat=none", "mesh.data=1")
    attention = small_config("model.remat=attention", "mesh.data=1")
    full = small_config("model.remat=full", "mesh.data=1")
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    saved = [activation_bytes_per_device(c, sizes)[0] for c in (none, attention, full)]
    assert saved[0] > saved[1] > saved[2]


def test_a_conditional_writes_out_each_computed_output_once():
    """Hand-computed: of a ``cond``'s outputs only those some branch computes are buffers (a
    constant such as ``zeros_like`` or a placeholder is not), each variable once per branch."""

    def f(x_NxD, flag):
        def taken(x):
            y = jnp.sin(x)
            return y, y, jnp.zeros_like(x), jnp.sum(x)

        def skipped(x):
            return x, jnp.zeros_like(x), jnp.zeros_like(x), jnp.float32(0)

        return jax.lax.cond(flag, taken, skipped, x_NxD)

    jaxpr = jax.make_jaxpr(f)(jnp.ones((64, 48), jnp.float32), True).jaxpr
    (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    # output 0: sin(x) or x (64 x 48 float32); output 1: y again or zeros: never a new buffer;
    # output 2: zeros in both; output 3: a float32 scalar
    assert _conditional_output_bytes(cond) == 64 * 48 * 4 + 4


def test_overflow_rounds_are_priced_only_with_an_expert_axis():
    """The exchange's overflow rounds exist only over an expert axis. Hand-computed bounds: over 4
    peers the round being differentiated holds at least its receive buffer and its output (W x D
    each, W = 1.25 M rows) and the cotangent it returns (M x D), and far less than 20 round-sized
    buffers."""
    cfg = small_config("model.num_layers=2", "mesh.data=1")
    model = cfg.model
    M = cfg.trainer.global_batch_size * cfg.data.seq_len // 4 * model.top_k  # rows one device sends
    W = -(-math.ceil(1.25 * M) // 8) * 8
    item = {"float32": 4, "bfloat16": 2}[model.compute_dtype]
    assert overflow_round_bytes(cfg, {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1}, "tpu") == 0
    # traced as on TPU (ragged_all_to_all, megablox); the CPU's emulated exchange sends n-fold chunks
    four = overflow_round_bytes(cfg, {"data": 1, "fsdp": 1, "expert": 4, "tensor": 1}, "tpu")
    assert (2 * W + M) * model.d_model * item <= four < 20 * W * max(model.d_model, model.d_expert) * item


def test_activations_per_device_depend_on_the_rows_each_device_holds():
    """8-way data parallelism over an 8x larger batch leaves each device the same rows and the
    same activations; weights in compute dtype are not split by the batch."""
    one = activation_bytes_per_device(
        small_config("mesh.data=1", "trainer.global_batch_size=4"), {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    )
    eight = activation_bytes_per_device(
        small_config("mesh.data=8", "trainer.global_batch_size=32"), {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    )
    assert eight == pytest.approx(one, rel=1e-5)  # a few scalar residuals (loss normalisers) do not split


def test_too_big_config_is_reported_as_not_fitting_with_the_reason():
    cfg = load_config("configs/model/moe-8b.yaml", ["mesh.data=1", "mesh.fsdp=1", "mesh.expert=1", "trainer.global_batch_size=8"])
    result = make_plan(cfg, "h100x1")
    assert not result.memory.fits
    reason = result.memory.reason()
    assert "does not fit" in reason and "80.0 GiB" in reason
    # 8.8B float32 parameters + AdamW moments: far beyond one GPU, and the reason says what dominates
    memory = result.memory
    assert memory.params + memory.grads + memory.optimizer > 80 * GIB and "optimizer state" in reason
    assert result.suggestion is None and "no mesh fits" in result.suggestion_note


def test_a_mesh_that_fits_is_suggested_when_the_configs_does_not():
    # replicated weights (data parallel only) overflow a 16 GiB v5e chip; sharding them fits
    cfg = load_config(
        "configs/model/moe-8b.yaml",
        ["model.num_layers=4", "mesh.data=-1", "mesh.fsdp=1", "mesh.expert=1", "trainer.global_batch_size=64",
         "data.seq_len=1024"],
    )
    result = make_plan(cfg, "v5e-64")
    assert not result.memory.fits
    suggestion = result.suggestion
    assert suggestion is not None and suggestion.memory.fits
    assert math.prod(suggestion.sizes.values()) == 64
    # recomputed independently for that mesh, it fits
    trial = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"remat": suggestion.remat}),
            "trainer": cfg.trainer.model_copy(update={"micro_batches": suggestion.micro_batches}),
        }
    )
    assert memory_per_device(trial, suggestion.sizes, parse_slice("v5e-64").chip).fits


def test_costs_and_chips_for_a_deadline_follow_from_throughput():
    cfg = load_config("configs/model/small-moe.yaml", ["trainer.global_batch_size=128", "data.seq_len=2048"])
    result = make_plan(cfg, "v5p-16", tokens=1e11, days=10, mfu=0.4)
    chips = parse_slice("v5p-16").num_chips
    assert chips == 8
    tokens_per_s = 128 * 2048 / result.time.total
    assert result.tokens_per_second == pytest.approx(tokens_per_s)
    assert result.price_per_hour == pytest.approx(8 * parse_slice("v5p-16").chip.price_on_demand)
    assert result.dollars_per_billion == pytest.approx(1e9 / tokens_per_s / 3600 * result.price_per_hour)
    needed = 1e11 / (10 * 86400) / (tokens_per_s / chips)
    assert result.chips_for_days >= needed and result.chips_for_days < 2 * max(needed, 1)
    # compute time is the roofline at the given MFU
    from indicfm.model.flops import train_flops_per_token

    flops = train_flops_per_token(cfg.model, 2048) * 128 * 2048
    assert result.time.compute == pytest.approx(flops / chips / (459e12 * 0.4))


def test_communication_grows_with_the_mesh_axes_that_move_data():
    cfg = load_config("configs/model/small-moe.yaml", ["trainer.global_batch_size=64", "data.seq_len=1024"])
    slice_ = parse_slice("h100x16")  # two nodes: an axis spanning both goes over InfiniBand
    within = step_time(cfg, {"data": 2, "fsdp": 1, "expert": 8, "tensor": 1}, slice_, 0.35)
    across = step_time(cfg, {"data": 1, "fsdp": 1, "expert": 16, "tensor": 1}, slice_, 0.35)
    assert within.all_to_all > 0 and across.all_to_all > within.all_to_all * 4  # NVLink 450 GB/s vs IB 50 GB/s
    none = step_time(cfg, {"data": 16, "fsdp": 1, "expert": 1, "tensor": 1}, slice_, 0.35)
    assert none.all_to_all == 0 and none.fsdp == 0 and none.data_parallel > 0


def test_mesh_errors_name_the_problem():
    # a mesh for another device count: the problem is named and a mesh of 8 devices is planned instead
    cfg = small_config("mesh.data=3")
    result = make_plan(cfg, "cpux8")
    assert "8 devices" in result.mesh_note and "mesh" in result.mesh_note
    assert math.prod(result.mesh.values()) == 8 and result.memory.fits
    assert result.suggestion is not None and result.suggestion.sizes == result.mesh
    assert result.to_dict()["mesh_note"] == result.mesh_note
    cfg = small_config("mesh.data=-1", "trainer.global_batch_size=12")
    with pytest.raises(PlanError, match="global_batch_size"):
        make_plan(cfg, "cpux8")


def test_cli_prints_the_plan(tmp_path):
    result = CliRunner().invoke(
        app,
        ["plan", "--config", "configs/model/tiny-moe.yaml", "--hardware", "cpux8", "--tokens", "1e8", "--json"],
    )
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.stdout)
    assert data["fits"] and data["chips"] == 8 and data["mesh"]["data"] == 8
    assert data["dollars"] == pytest.approx(0.1 * data["dollars_per_billion_tokens"])
    text = CliRunner().invoke(app, ["plan", "--config", "configs/model/tiny-moe.yaml", "--hardware", "cpux8"])
    assert text.exit_code == 0 and "per billion tokens" in text.stdout
    bad = CliRunner().invoke(app, ["plan", "--config", "configs/model/tiny-moe.yaml", "--hardware", "tpu9000"])
    assert bad.exit_code == 2 and "unknown hardware" in bad.output
