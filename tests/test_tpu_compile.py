"""Ahead-of-time compiles for Cloud TPU slices with libtpu (XLA's TPU compiler; no TPU present).

The reference for the planner's memory is XLA:TPU's own buffer assignment (``memory_analysis()`` of
the compiled train step), an independent program; the collective counter is checked on a
hand-written HLO text whose counts and bytes are worked out by hand below.

Every compile here runs on CPU: ``tests/conftest.py`` keeps JAX on its CPU backend, and
``indicfm.launch.compile.topology_devices`` asks libtpu only for a *description* of the slice's chips.
"""

from __future__ import annotations

import functools

import pytest

from indicfm.config import load_config
from indicfm.hardware import GIB, parse_slice
from indicfm.launch.hlo_stats import collective_stats

# the collective counter and topology names need no libtpu; everything that compiles does
try:
    import libtpu  # noqa: F401

    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason="libtpu (XLA's TPU compiler) is not installed: pip install 'indicfm[tpu-compile]'"
)

# tiny-moe cut to one dense and one MoE block: XLA:TPU compiles it in seconds
TINY = ("configs/model/tiny-moe.yaml", ("data.seq_len=256", "model.num_layers=2", "trainer.global_batch_size=8"))
MESHES = {
    "data": {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1},
    "expert": {"data": 1, "fsdp": 1, "expert": 4, "tensor": 1},
    "fsdp+expert": {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1},
    "data+expert": {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1},
    "data+fsdp": {"data": 2, "fsdp": 2, "expert": 1, "tensor": 1},
}
# Every mesh with both remat policies.  Known planner gap at toy size: with an expert axis and
# remat=full the planner reads ~0.8 of XLA:TPU.  The
# planner counts the exchange's overflow rounds in the MoE block's backward (where they are at pod
# scale: moe-30b reads ~1.0 with them), but this unscanned toy keeps its logits alive through the
# last block's backward, and XLA's allocator adds ~80% to the live peak here (heap fragmentation
# plus temporaries outside its buffer assignment, both growing with the overflow loop), which no
# buffer count explains.  Those cases are expected failures (strict, so fixing the planner shows
# up), not left out.
PLANNER_GAP = {("expert", "full"), ("data+expert", "full")}
RATIO_CASES = [
    pytest.param(m, r, marks=pytest.mark.xfail(strict=True, reason="planner undercounts remat=full with an expert axis"))
    if (m, r) in PLANNER_GAP else (m, r)
    for m in MESHES for r in ("none", "full")
]


@functools.lru_cache(maxsize=None)
def compiled(hardware: str, mesh: str, remat: str, extra: tuple[str, ...] = ()):
    """(planner bytes per chip, XLA:TPU's CompileReport) for tiny-moe on ``hardware`` (cached: one
    compile serves the memory, collective and kernel checks)."""
    from indicfm.launch.compile import compile_train_step, with_layout
    from indicfm.launch.plan_memory import memory_per_device

    config, sets = TINY
    cfg = with_layout(load_config(config, [*sets, *extra]), MESHES[mesh], remat, 1)
    slice_ = parse_slice(hardware)
    return memory_per_device(cfg, MESHES[mesh], slice_.chip).total, compile_train_step(cfg, slice_)


@needs_libtpu
@pytest.mark.parametrize("mesh, remat", RATIO_CASES)
def test_planner_memory_is_within_15_percent_of_xla_tpu(mesh, remat):
    planner, report = compiled("v5p-8", mesh, remat)
    ratio = planner / report.total_bytes
    assert 0.85 <= ratio <= 1.15, (
        f"mesh {mesh}, remat={remat}: planner {planner / 2**20:.1f} MiB vs XLA:TPU "
        f"{report.total_bytes / 2**20:.1f} MiB per chip (ratio {ratio:.2f})"
    )
    assert report.fits and report.topology == "v5p:2x2x1" and report.mesh == MESHES[mesh]


@needs_libtpu
def test_collectives_follow_the_mesh_and_kernels_are_mosaic():
    def count(mesh: str, *kinds: str) -> int:
        return sum(compiled("v5p-8", mesh, "none")[1].collectives[k]["count"] for k in kinds)

    all_to_all = ("all-to-all", "ragged-all-to-all")
    # data parallelism: gradients all-reduced, no token exchange, no weight gathering
    assert count("data", "all-reduce") > 0 and count("data", *all_to_all) == 0 and count("data", "all-gather") == 0
    # FSDP: weights gathered before use, gradients reduce-scattered (XLA:TPU writes them as
    # all-reduce-scatter fusions, counted as reduce-scatters), still no token exchange
    assert count("fsdp", "all-gather") > 0 and count("fsdp", "reduce-scatter") > 0
    assert count("fsdp", *all_to_all) == 0
    # expert parallelism: tokens travel to their experts' devices and back
    assert count("expert", *all_to_all) >= 2 and count("fsdp+expert", *all_to_all) >= 2
    for mesh in MESHES:
        report = compiled("v5p-8", mesh, "none")[1]
        # splash attention and the megablox grouped matmul compiled by Mosaic for the chip, not interpreted
        assert report.kernels["mosaic"] > 0, mesh
        assert report.flops_per_chip > 0 and report.unknown_trip_counts == 0


@needs_libtpu
def test_fsdp_gradients_are_reduce_scattered_not_all_reduced():
    """On fsdp=4 nearly every gradient is reduce-scattered; counted as the all-reduces inside XLA's
    all-reduce-scatter fusions, all-reduce read as the whole f32 gradient and reduce-scatter as 0."""
    from indicfm.model.flops import count_params

    config, sets = TINY
    gradient = count_params(load_config(config, list(sets)).model) * 4  # f32 parameters
    collectives = compiled("v5p-8", "fsdp", "none")[1].collectives
    # a ring reduce-scatter over 4 chips receives 3/4 of what it reduces, for most of the gradient
    assert 0.5 * 0.75 * gradient < collectives["reduce-scatter"]["bytes"] <= 0.75 * gradient
    assert collectives["all-reduce"]["bytes"] < 0.5 * gradient


@needs_libtpu
def test_per_step_flops_are_the_models_however_the_step_is_looped():
    """XLA's cost analysis counts a loop body once (two micro-batches halve its FLOPs) and splash
    attention as nothing; per step, the compiled program's FLOPs match the model's own count
    (remat none: no recompute) unrolled and looped alike."""
    from indicfm.launch.compile import compile_train_step, with_layout
    from indicfm.model.flops import train_flops_per_token

    _, flat = compiled("v5p-8", "fsdp", "none")
    config, sets = TINY
    cfg = with_layout(load_config(config, [*sets, "model.scan_layers=true"]), MESHES["fsdp"], "none", 2)
    looped = compile_train_step(cfg, parse_slice("v5p-8"))
    model = train_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.trainer.global_batch_size * cfg.data.seq_len / 4
    assert looped.flops_per_chip < 0.6 * flat.flops_per_chip and looped.flops_loop_scale > 1.9
    for report in (flat, looped):
        assert report.uncounted_kernel_flops_per_chip > 0  # splash attention
        assert 0.9 <= report.step_flops_per_chip / model <= 1.1, report.step_flops_per_chip / model


@needs_libtpu
def test_capacity_dispatch_with_expert_axis_compiles_for_v5e():
    _, report = compiled("v5e-4", "fsdp+expert", "none", ("model.dispatch=capacity",))
    assert report.topology == "v5e:2x2" and report.fits
    assert report.collectives["all-to-all"]["count"] >= 2 and report.kernels["mosaic"] > 0
    # No memory ratio here: for a model this small XLA:TPU probably keeps much of the step in the v5e's
    # on-chip memory, which memory_analysis() does not count as HBM (the same program reports
    # less than half the v5p's temporaries), so the planner's HBM figure has nothing to match.


@needs_libtpu
@pytest.mark.slow  # two compiles of a 1.3B-parameter model: minutes of CPU
def test_too_big_config_is_refused_with_xlas_number_and_the_suggestion_fits():
    """Three moe-8b-wide blocks (~1.3B parameters) replicated on 16 GiB v5e chips: parameters,
    gradients and AdamW moments alone are ~20 GiB per chip. XLA:TPU must refuse it with its own
    figure, and the planner's suggested layout must compile and fit."""
    from indicfm.launch.compile import compile_plan
    from indicfm.launch.plan import make_plan

    cfg = load_config(
        "configs/model/moe-8b.yaml",
        ["model.num_layers=3", "mesh.data=-1", "mesh.fsdp=1", "mesh.expert=1", "trainer.global_batch_size=4",
         "data.seq_len=256", "model.remat=none"],
    )
    plan = make_plan(cfg, "v5e-4")
    assert not plan.memory.fits and plan.suggestion is not None
    as_planned, suggested = compile_plan(cfg, plan)
    assert not as_planned.fits
    if as_planned.report is None:  # XLA refused to compile: its message carries its figure
        assert "out of HBM" in as_planned.error or "memory" in as_planned.error.lower()
    else:
        assert as_planned.report.total_bytes > as_planned.report.hbm_bytes
    assert suggested.label == "suggested" and suggested.fits
    assert suggested.mesh == plan.suggestion.sizes and suggested.report.total_bytes < 16 * GIB


def test_topology_names_of_every_tpu_generation_and_multi_slice():
    from indicfm.launch.compile import CompileError, topology_name

    assert topology_name(parse_slice("v4-8")) == "v4:2x2x1"  # v4 counts TensorCores: 4 chips
    assert topology_name(parse_slice("v5e-4")) == "v5e:2x2"
    assert topology_name(parse_slice("v5litepod-256")) == "v5e:16x16"
    assert topology_name(parse_slice("v5p-8")) == "v5p:2x2x1"
    assert topology_name(parse_slice("v5p-128")) == "v5p:4x4x4"
    assert topology_name(parse_slice("v6e-8")).startswith("v6e:")
    two = parse_slice("2xv5p-128")
    assert (two.num_slices, two.num_chips, two.chips_per_slice) == (2, 128, 64)
    assert topology_name(two) == "v5p:4x4x4"  # each slice's shape; the slices join over DCN
    with pytest.raises(CompileError, match="TPU slice"):
        topology_name(parse_slice("h100x8"))


@needs_libtpu
def test_multi_slice_topology_lists_every_chip():
    from indicfm.launch.compile import topology_devices

    devices = topology_devices(parse_slice("2xv5p-8"))
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}


# A compiled module as XLA prints it, cut to what the counter reads: the entry runs a loop with a
# recorded trip count (3) whose body all-reduces and calls a fusion that all-gathers, a second loop
# whose trip count is only in its condition (`i < 4`) and exchanges tokens, and one
# reduce-scatter outside any loop.
HLO = """
HloModule jit_step, entry_computation_layout={(f32[8,128]{1,0})->f32[8,128]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

%gather_fusion (p: bf16[4,64]) -> bf16[16,64] {
  %p = bf16[4,64]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[16,64]{1,0} all-gather(%p), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
}

%body.1 (t: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %t = (s32[], f32[8,128]{1,0}) parameter(0)
  %v = f32[8,128]{1,0} get-tuple-element(%t), index=1
  %all-reduce.1 = f32[8,128]{1,0:T(8,128)} all-reduce(%v), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  %w = bf16[4,64]{1,0} parameter(1)
  %fusion.1 = bf16[16,64]{1,0} fusion(%w), kind=kCustom, calls=%gather_fusion
  ROOT %r = (s32[], f32[8,128]{1,0}) tuple(%i, %all-reduce.1)
}

%cond.1 (t: (s32[], f32[8,128])) -> pred[] {
  %t = (s32[], f32[8,128]{1,0}) parameter(0)
  %constant.9 = s32[] constant(3)
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %lt = pred[] compare(%i, %constant.9), direction=LT
}

%body.2 (t: (s32[], bf16[32,16])) -> (s32[], bf16[32,16]) {
  %t = (s32[], bf16[32,16]{1,0}) parameter(0)
  %x = bf16[32,16]{1,0} get-tuple-element(%t), index=1
  %all-to-all.1 = bf16[32,16]{1,0} all-to-all(%x), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %maybe.1 = bf16[32,16]{1,0} conditional(%p, %x, %x), branch_computations={%overflow_round, %skip_round}
  ROOT %r = (s32[], bf16[32,16]{1,0}) tuple(%i, %all-to-all.1)
}

%overflow_round (x: bf16[32,16]) -> bf16[32,16] {
  %x = bf16[32,16]{1,0} parameter(0)
  ROOT %ragged.1 = bf16[40,16]{1,0} ragged-all-to-all(%x, %x, %o, %s, %o, %s), channel_id=5, replica_groups={{0,1,2,3}}
}

%skip_round (x: bf16[32,16]) -> bf16[32,16] {
  ROOT %x = bf16[32,16]{1,0} parameter(0)
}

%cond.2 (t: (s32[], bf16[32,16])) -> pred[] {
  %t = (s32[]{:T(128)}, bf16[32,16]{1,0}) parameter(0)
  %constant.4 = s32[]{:T(128)} constant(4)
  %i = s32[]{:T(128)} get-tuple-element(%t), index=0
  ROOT %lt.2 = pred[]{:T(512)} compare(%i, %constant.4), direction=LT, metadata={op_name="jit(step)/while/cond/lt"}
}

ENTRY %main (a: f32[8,128], b: bf16[32,16]) -> f32[8,128] {
  %a = f32[8,128]{1,0} parameter(0)
  %loop.1 = (s32[], f32[8,128]{1,0}) while(%init.1), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"3"}}
  %loop.2 = (s32[], bf16[32,16]{1,0}) while(%init.2), condition=%cond.2, body=%body.2, metadata={op_name="jit(step)/while"}
  %reduce-scatter.1 = f32[2,128]{1,0} reduce-scatter(%a), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  ROOT %out = f32[8,128]{1,0} copy(%a)
}
"""


def test_collective_stats_weight_loop_bodies_by_their_trip_counts():
    stats = collective_stats(HLO).to_dict()
    never = {"count_if_taken": 0, "bytes_if_taken": 0.0}
    # all-reduce of f32[8,128] = 4096 bytes, 3 iterations
    assert stats["all-reduce"] == {"count": 3, "bytes": 3 * 8 * 128 * 4, **never}
    # the fusion inside the loop gathers bf16[16,64] = 2048 bytes, 3 times
    assert stats["all-gather"] == {"count": 3, "bytes": 3 * 16 * 64 * 2, **never}
    # trip count 4 read from the loop condition; bf16[32,16] = 1024 bytes each
    assert stats["all-to-all"] == {"count": 4, "bytes": 4 * 32 * 16 * 2, **never}
    # inside a conditional's branch in that loop: only when taken, up to 4 times bf16[40,16]
    assert stats["ragged-all-to-all"] == {"count": 0, "bytes": 0.0, "count_if_taken": 4, "bytes_if_taken": 4 * 40 * 16 * 2}
    # outside any loop: once; in a ring over its 4 devices each chip receives the other 3 partial
    # sums of its f32[2,128] shard
    assert stats["reduce-scatter"] == {"count": 1, "bytes": 3 * 2 * 128 * 4, **never}
    assert stats["collective-permute"] == {"count": 0, "bytes": 0.0, **never}
    assert collective_stats(HLO).unknown_trip_counts == 0


# XLA:TPU's FSDP gradient reduction as it prints it (cut from tiny-moe, fsdp=4, on v5p-8): a kCustom
# fusion whose computation all-reduces the whole gradient and returns this chip's dynamic-slice of
# it.  Beside it, a kCustom fusion that all-reduces and keeps everything (a real all-reduce) and a
# plain reduce-scatter whose groups are written in the iota form (2 groups of 4).
ALL_REDUCE_SCATTER_HLO = """
HloModule jit_train_step, is_scheduled=true, num_partitions=8

%add.1.clone (x.1: f32[], y.1: f32[]) -> f32[] {
  %x.1 = f32[] parameter(0)
  %y.1 = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%x.1, %y.1)
}

%all-reduce-scatter (input: f32[128,2,32]) -> f32[32,2,32] {
  %input = f32[128,2,32]{2,0,1:T(8,128)} parameter(0)
  %all-reduce.113 = f32[128,2,32]{2,0,1:T(8,128)} all-reduce(%input), channel_id=58, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add.1.clone, frontend_attributes={from-cross-replica-sharding="true"}, backend_config={"flag_configs":[],"barrier_config":{"barrier_type":"CUSTOM","id":"1"},"scoped_memory_configs":[],"used_scoped_memory_configs":[]}
  %partition-id.38 = u32[] partition-id()
  %constant.1497 = u32[] constant(32)
  %multiply.157 = u32[]{:T(128)} multiply(%partition-id.38, %constant.1497)
  %constant.1498 = u32[] constant(0)
  ROOT %dynamic-slice.134 = f32[32,2,32]{2,0,1:T(8,128)} dynamic-slice(%all-reduce.113, %multiply.157, %constant.1498, %constant.1498), dynamic_slice_sizes={32,2,32}
}

%all-reduce-whole (p.1: bf16[64,128]) -> bf16[64,128] {
  %p.1 = bf16[64,128]{1,0} parameter(0)
  ROOT %all-reduce.7 = bf16[64,128]{1,0} all-reduce(%p.1), channel_id=7, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add.1.clone
}

ENTRY %main.168_spmd (g: f32[128,2,32], h: bf16[64,128]) -> (f32[32,2,32], bf16[64,128], bf16[16,128]) {
  %g = f32[128,2,32]{2,0,1:T(8,128)} parameter(0)
  %h = bf16[64,128]{1,0} parameter(1)
  %fusion = f32[32,2,32]{2,0,1:T(8,128)} fusion(%g), kind=kCustom, calls=%all-reduce-scatter, metadata={op_name="jit(train_step)/transpose(jvp(bld,dkg->blkg))/dot_general"}, backend_config={"flag_configs":[],"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion","strategy":"StrategySubgroupND"}}
  %fusion.1 = bf16[64,128]{1,0} fusion(%h), kind=kCustom, calls=%all-reduce-whole
  %reduce-scatter.2 = bf16[16,128]{1,0} reduce-scatter(%h), channel_id=9, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add.1.clone
  ROOT %t = (f32[32,2,32]{2,0,1}, bf16[64,128]{1,0}, bf16[16,128]{1,0}) tuple(%fusion, %fusion.1, %reduce-scatter.2)
}
"""


def test_all_reduce_scatter_fusion_counts_as_a_reduce_scatter():
    stats = collective_stats(ALL_REDUCE_SCATTER_HLO).to_dict()
    never = {"count_if_taken": 0, "bytes_if_taken": 0.0}
    shard = 32 * 2 * 32 * 4  # the fusion's f32[32,2,32] result: a quarter of the f32[128,2,32] gradient
    # the fusion: the whole gradient less the shard this chip keeps = its 3 partial shards from the
    # others; the plain reduce-scatter: 3 x its bf16[16,128] shard (groups of 4)
    assert stats["reduce-scatter"] == {"count": 2, "bytes": 3 * shard + 3 * 16 * 128 * 2, **never}
    assert 3 * shard == 128 * 2 * 32 * 4 - shard
    # only the fusion that keeps the whole all-reduced array is an all-reduce: bf16[64,128]
    assert stats["all-reduce"] == {"count": 1, "bytes": 64 * 128 * 2, **never}


def test_replica_group_sizes_in_every_spelling():
    from indicfm.launch.hlo_stats import group_size

    assert group_size("all-reduce(%a), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add") == 4
    assert group_size("reduce-scatter(%a), replica_groups=[2,4]<=[8], dimensions={0}") == 4
    assert group_size("all-gather(%a), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}") == 2
    assert group_size("all-reduce(%a), replica_groups=mesh['axis_0'=2,'axis_1'=4,'axis_2'=2] {'axis_1','axis_2'}, x") == 8
    assert group_size("all-reduce(%a), replica_groups={}, to_apply=%add", num_partitions=16) == 16
    assert group_size("all-reduce(%a), to_apply=%add") is None


# Work per step on a hand-written module: a loop run 3 times whose body holds a matmul written as
# a padded 1-D convolution (XLA:TPU's form), a dot, a grouped matmul with its cost estimate, a
# splash attention forward kernel (no cost estimate), and a conditional branch with a dot; and a dot
# outside the loop.  Every figure below is worked out by hand.
COST_HLO = """
HloModule jit_step, num_partitions=4

%conv_fusion (p0: f32[2,16,8], p1: f32[4,16,3]) -> f32[2,4,8] {
  %p0 = f32[2,16,8]{2,1,0} parameter(0)
  %p1 = f32[4,16,3]{2,1,0} parameter(1)
  ROOT %convolution.1 = f32[2,4,8]{2,1,0} convolution(%p0, %p1), window={size=3 pad=1_1}, dim_labels=bf0_oi0->bf0
}

%overflow (x: f32[8,64]) -> f32[8,16] {
  %x = f32[8,64]{1,0} parameter(0)
  %w2 = f32[64,16]{1,0} constant({...})
  ROOT %dot.3 = f32[8,16]{1,0} dot(%x, %w2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%skip (x.2: f32[8,64]) -> f32[8,16] {
  %x.2 = f32[8,64]{1,0} parameter(0)
  ROOT %zero = f32[8,16]{1,0} constant(0)
}

%body (t: (s32[], f32[8,64])) -> (s32[], f32[8,64]) {
  %t = (s32[], f32[8,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %a = f32[8,64]{1,0} get-tuple-element(%t), index=1
  %lhs = f32[2,16,8]{2,1,0} parameter(1)
  %rhs = f32[4,16,3]{2,1,0} parameter(2)
  %fusion.1 = f32[2,4,8]{2,1,0} fusion(%lhs, %rhs), kind=kOutput, calls=%conv_fusion
  %b = f32[64,32]{1,0} parameter(3)
  %dot.1 = f32[8,32]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %gmm.1 = f32[8,32]{1,0} custom-call(%a, %b), custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"cost_estimate":{"flops":"1000","transcendentals":"0","bytes_accessed":"500","remote_bytes_transferred":"0"}}}
  %m0 = s8[1,1,1]{2,1,0} parameter(4)
  %q = f32[2,2,2,128,32]{4,3,2,1,0} parameter(5)
  %k = f32[2,2,128,32]{3,2,1,0} parameter(6)
  %splash_mqa_fwd_segmented_residuals.1 = f32[2,2,2,128,32]{4,3,2,1,0} custom-call(%m0, %m0, %q, %k, %k), custom_call_target="tpu_custom_call"
  %p = pred[] parameter(7)
  %maybe = f32[8,16]{1,0} conditional(%p, %a, %a), branch_computations={%overflow, %skip}
  ROOT %r = (s32[], f32[8,64]{1,0}) tuple(%i, %a)
}

%cond (t.1: (s32[], f32[8,64])) -> pred[] {
  %t.1 = (s32[], f32[8,64]{1,0}) parameter(0)
  %n = s32[] constant(3)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a.0: f32[8,64], c: f32[64,128]) -> f32[8,128] {
  %a.0 = f32[8,64]{1,0} parameter(0)
  %c = f32[64,128]{1,0} parameter(1)
  %loop = (s32[], f32[8,64]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %dot.2 = f32[8,128]{1,0} dot(%a.0, %c), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
# 1-D convolution, input length 8, kernel 3, padding 1 on each side: the taps that read the input
# are 7 + 8 + 7 = 22 of the 24 (output, tap) pairs; batch 2 x output features 4 x input features 16
CONV_FLOPS = 2 * (2 * 4 * 16 * 22)
DOT_1, DOT_2, DOT_3 = 2 * 8 * 32 * 64, 2 * 8 * 128 * 64, 2 * 8 * 16 * 64
GMM_FLOPS = 1000
# forward: Q K^T and P V over the causal half of 128 x 128, for 2 x 2 x 2 heads of width 32
SPLASH_FLOPS = 2 * 2 * (2 * 2 * 2) * (128 * 128 / 2) * 32


def test_program_cost_counts_loop_bodies_per_iteration_and_kernels_xla_misses():
    from indicfm.launch.hlo_cost import program_cost

    cost = program_cost(COST_HLO)
    # XLA's way: the body once, the branch included
    assert cost.flops_once == CONV_FLOPS + DOT_1 + GMM_FLOPS + DOT_3 + DOT_2
    # per step: the body 3 times, the overflow branch (taken only when routing is skewed) left out
    assert cost.flops_per_step == 3 * (CONV_FLOPS + DOT_1 + GMM_FLOPS) + DOT_2
    assert cost.kernel_flops_per_step == 3 * SPLASH_FLOPS
    assert cost.step_flops(1e6) == pytest.approx(1e6 * cost.flops_per_step / cost.flops_once + 3 * SPLASH_FLOPS)


BYTES_HLO = """
HloModule jit_step

%update_layer (stack: f32[3,64], x: f32[64], i: s32[]) -> f32[3,64] {
  %stack = f32[3,64]{1,0} parameter(0)
  %x = f32[64]{0} parameter(1)
  %i = s32[] parameter(2)
  %zero = s32[] constant(0)
  %row = f32[1,64]{1,0} bitcast(%x)
  ROOT %dynamic-update-slice.1 = f32[3,64]{1,0} dynamic-update-slice(%stack, %row, %i, %zero)
}

%read_layer (weights: f32[3,64], j: s32[]) -> f32[1,64] {
  %weights = f32[3,64]{1,0} parameter(0)
  %j = s32[] parameter(1)
  %zero.1 = s32[] constant(0)
  ROOT %dynamic-slice.1 = f32[1,64]{1,0} dynamic-slice(%weights, %j, %zero.1), dynamic_slice_sizes={1,64}
}

ENTRY %main (s: f32[3,64], v: f32[64], w: f32[64], n: s32[], u: f32[64]) -> f32[3,64] {
  %s = f32[3,64]{1,0} parameter(0)
  %v = f32[64]{0} parameter(1)
  %w = f32[64]{0} parameter(2)
  %n = s32[] parameter(3)
  %u = f32[64]{0:S(1)} parameter(4)
  %add.1 = f32[64]{0} add(%v, %w)
  %scaled = f32[64]{0:S(1)} multiply(%u, %w)
  %layer = f32[1,64]{1,0} fusion(%s, %n), kind=kLoop, calls=%read_layer
  ROOT %saved = f32[3,64]{1,0} fusion(%s, %add.1, %n), kind=kLoop, calls=%update_layer
}
"""


def test_hbm_bytes_count_slices_in_place_updates_and_hbm_only():
    from indicfm.launch.hlo_cost import program_cost

    add = 3 * 64 * 4  # reads two f32[64], writes one
    scaled = 64 * 4  # reads w from HBM; u and the result are in on-chip memory (S(1))
    read_layer = 64 * 4 + 4 + 64 * 4  # reads one row of the f32[3,64] stack and the index, writes the row
    update_layer = 64 * 4 + 4 + 64 * 4  # reads the row and the index, writes the row in place
    assert program_cost(BYTES_HLO).bytes_per_step == add + scaled + read_layer + update_layer


def test_compiled_bound_from_a_cost_analysis_by_hand():
    """The bound on v5p-128 (459 TFLOP/s, 2765 GB/s HBM, 300 GB/s ICI per chip) from a made-up
    cost analysis of COST_HLO, with numbers chosen to come out round."""
    from types import SimpleNamespace

    from indicfm.launch.compile import CompileReport, bound_for, step_costs
    from indicfm.launch.hlo_stats import COLLECTIVES

    xla_flops = 1e6
    per_step = step_costs({"flops": xla_flops, "bytes accessed": 123.0}, COST_HLO)
    scale = (3 * (CONV_FLOPS + DOT_1 + GMM_FLOPS) + DOT_2) / (CONV_FLOPS + DOT_1 + GMM_FLOPS + DOT_3 + DOT_2)
    assert per_step["flops_loop_scale"] == pytest.approx(scale)
    assert per_step["step_flops_per_chip"] == pytest.approx(xla_flops * scale + 3 * SPLASH_FLOPS)
    assert per_step["uncounted_kernel_flops_per_chip"] == 3 * SPLASH_FLOPS

    peak, hbm, ici = 459e12, 2765e9, 300e9
    collectives = {k: {"count": 0, "bytes": 0.0, "count_if_taken": 0, "bytes_if_taken": 0.0} for k in COLLECTIVES}
    # expert=8: 7/8 of the exchanged buffer comes from other chips; 0.1 s of it at ICI bandwidth
    collectives["ragged-all-to-all"] |= {"count": 4, "bytes": 0.1 * ici * 8 / 7}
    collectives["ragged-all-to-all"]["bytes_if_taken"] = 1e15  # overflow rounds: not every step
    collectives["all-gather"] |= {"count": 9, "bytes": 1e12}  # overlapped with compute: not in the bound
    report = CompileReport(
        hardware="v5p-128", topology="v5p:4x4x4", num_slices=1,
        mesh={"data": 1, "fsdp": 8, "expert": 8, "tensor": 1},
        argument_bytes=0.0, output_bytes=0.0, alias_bytes=0.0, temp_bytes=0.0, code_bytes=0.0,
        hbm_bytes=95 * GIB, flops_per_chip=xla_flops, bytes_accessed_per_chip=123.0,
        compile_seconds=0.0, lower_seconds=0.0, collectives=collectives,
        step_flops_per_chip=0.5 * peak,  # 0.5 s at peak
        step_hbm_bytes_per_chip=0.2 * hbm,  # 0.2 s at HBM bandwidth
    )
    # model FLOPs per chip: 0.3 s of peak; 64 chips
    plan = SimpleNamespace(flops_per_token=0.3 * peak * 64 / (16 * 4096), global_batch=16, seq_len=4096, num_chips=64, mfu=0.4)
    bound = bound_for(report, plan, assumed_step_seconds=1.0)
    assert bound.flops_seconds == pytest.approx(0.5) and bound.memory_seconds == pytest.approx(0.2)
    assert bound.all_to_all_seconds == pytest.approx(0.1)
    assert bound.compute_seconds == pytest.approx(0.5) and bound.bound_by == "FLOPs"
    assert bound.step_seconds == pytest.approx(0.6)
    assert bound.mfu == pytest.approx(0.3 / 0.6)
    out = bound.to_dict()
    assert out["step_seconds"] == pytest.approx(0.6) and out["assumed_step_seconds"] == 1.0 and out["assumed_mfu"] == 0.4


@needs_libtpu
@pytest.mark.slow
def test_shipped_moe_8b_compiles_and_fits_on_v5p_128():
    """The shipped pod config on the slice it is meant for: its mesh, batch, sequence length and
    remat as shipped, cut to one dense and one MoE block (every per-block buffer and collective of
    the real step; 24 unrolled blocks take far longer to compile on a small CPU machine)."""
    from benchmarks.pod_compile import measure_pair

    row = measure_pair("configs/model/moe-8b.yaml", "v5p-128", ["model.num_layers=2"])
    assert "error" not in row, row.get("error")
    assert row["mesh"] == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}
    assert row["fits"] and row["planner_fits"]
    assert 0.85 <= row["ratio"] <= 1.15, row
    assert row["all_to_all_gib"] > 0 and row["mosaic_kernels"] > 0
