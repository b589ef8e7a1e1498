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
    # FSDP: weights gathered before use, gradients reduce-scattered (XLA may fuse the scatter into
    # an all-reduce over the shards), still no token exchange
    assert count("fsdp", "all-gather") > 0 and count("fsdp", "reduce-scatter", "all-reduce") > 0
    assert count("fsdp", *all_to_all) == 0
    # expert parallelism: tokens travel to their experts' devices and back
    assert count("expert", *all_to_all) >= 2 and count("fsdp+expert", *all_to_all) >= 2
    for mesh in MESHES:
        report = compiled("v5p-8", mesh, "none")[1]
        # splash attention and the megablox grouped matmul compiled by Mosaic for the chip, not interpreted
        assert report.kernels["mosaic"] > 0, mesh
        assert report.flops_per_chip > 0 and report.unknown_trip_counts == 0


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
    # outside any loop: once, the f32[2,128] shard it delivers
    assert stats["reduce-scatter"] == {"count": 1, "bytes": 2 * 128 * 4, **never}
    assert stats["collective-permute"] == {"count": 0, "bytes": 0.0, **never}
    assert collective_stats(HLO).unknown_trip_counts == 0


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
