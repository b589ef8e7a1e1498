"""configs/hardware.yaml and slice names: figures from the vendors' pages, TPU core vs chip counting."""

from __future__ import annotations

import pytest

from indicfm.hardware import HardwareError, chip_for_device_kind, load_hardware, parse_slice


def test_table_has_every_chip_with_documented_figures():
    chips = load_hardware()
    assert {"cpu", "a100", "h100", "h200", "v4", "v5e", "v5p", "v6e"} <= set(chips)
    # peak dense bf16 TFLOP/s and HBM per chip as published by Google Cloud and NVIDIA
    assert chips["v5p"].peak_tflops == 459 and chips["v5p"].hbm_gib == 95
    assert chips["v5e"].peak_tflops == 197 and chips["v5e"].hbm_gib == 16
    assert chips["v6e"].peak_tflops == 918 and chips["v4"].peak_tflops == 275
    assert chips["h100"].peak_tflops == 989 and chips["a100"].peak_tflops == 312
    for chip in chips.values():
        assert chip.price_spot <= chip.price_on_demand
        assert chip.peak_flops == chip.peak_tflops * 1e12


@pytest.mark.parametrize(
    "name, chip, chips, hosts, accelerator",
    [
        ("v5p-128", "v5p", 64, 16, "v5p-128"),  # v5p and v4 types count TensorCores, 2 per chip
        ("v4-8", "v4", 4, 1, "v4-8"),
        ("v5e-256", "v5e", 256, 64, "v5litepod-256"),  # v5e / v6e types count chips
        ("v5litepod-8", "v5e", 8, 1, "v5litepod-8"),  # one 8-chip host
        ("v6e-16", "v6e", 16, 4, "v6e-16"),
    ],
)
def test_tpu_slices(name, chip, chips, hosts, accelerator):
    s = parse_slice(name)
    assert (s.chip.name, s.num_chips, s.num_hosts, s.accelerator_type) == (chip, chips, hosts, accelerator)


def test_gpu_and_cpu_slices():
    s = parse_slice("h100x64")
    assert (s.chip.name, s.num_chips, s.num_slices) == ("h100", 64, 1)
    assert parse_slice("h100x64").num_hosts == 8
    assert parse_slice("a100").num_chips == 1
    assert parse_slice("cpux8").num_hosts == 1
    assert parse_slice("H200x16").price_per_hour == pytest.approx(16 * load_hardware()["h200"].price_on_demand)


@pytest.mark.parametrize("bad", ["v5p-127", "tpu9000", "h100x0", "v9-8", ""])
def test_bad_slice_names_are_explained(bad):
    with pytest.raises(HardwareError):
        parse_slice(bad)


def test_device_kinds_map_to_chips_most_specific_first():
    assert chip_for_device_kind("TPU v5 lite").name == "v5e"
    assert chip_for_device_kind("TPU v5").name == "v5p"
    assert chip_for_device_kind("TPU v6 lite").name == "v6e"
    assert chip_for_device_kind("NVIDIA H100 80GB HBM3").name == "h100"
    assert chip_for_device_kind("NVIDIA A100-SXM4-80GB").name == "a100"
    assert chip_for_device_kind("some new accelerator") is None


def test_a_broken_table_names_the_entry(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text("devices:\n  h100:\n    kind: gpu\n    peak_tflops: -1\n")
    with pytest.raises(HardwareError, match="devices.h100"):
        load_hardware(path)
