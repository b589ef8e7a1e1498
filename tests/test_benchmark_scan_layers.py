"""Smoke tests of ``benchmarks.scan_layers`` (nothing timed: figures only checked for being present)."""

import pytest

from benchmarks import scan_layers
from indicfm.launch.hlo_stats import hlo_size

HLO = """HloModule jit_f, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %m = f32[4]{0} multiply(f32[4]{0} %p, f32[4]{0} %p)
}

ENTRY %main.3 (Arg_0.1: f32[4]) -> f32[4] {
  %Arg_0.1 = f32[4]{0} parameter(0), metadata={op_name="x = y"}
  ROOT %fusion = f32[4]{0} fusion(f32[4]{0} %Arg_0.1), kind=kLoop, calls=%fused
}
"""


def test_hlo_size_counts_the_instructions_of_every_computation():
    chars, instructions = hlo_size(HLO)
    assert chars == len(HLO) and instructions == 4


@pytest.mark.slow
def test_both_layouts_compile_and_the_scanned_program_is_smaller():
    import jax

    result = scan_layers.compare(scan_layers.cases(layers=6, tpu_layers=6)["cpu"], jax.devices("cpu"))
    for layout in ("unrolled", "scanned"):
        assert result[layout]["layout"] == layout and result[layout]["compile_s"] > 0
    assert result["hlo_instructions_ratio"] > 1
