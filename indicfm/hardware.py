"""The hardware table (``configs/hardware.yaml``) and slice names such as ``v5p-128`` or ``h100x64``.

One table serves both the planner (memory, roofline step time, dollars) and the training metrics
(MFU needs the device's peak FLOP/s), so a price or a peak is edited in exactly one place.

Slice names follow what users already type:

* Cloud TPU accelerator types: ``v4-32`` and ``v5p-128`` count TensorCores (two per chip, so
  ``v5p-128`` is 64 chips); ``v5litepod-16`` / ``v5e-16`` and ``v6e-16`` count chips.
* GPUs and CPUs: ``h100x64`` is 64 GPUs, ``a100x8`` eight, a bare ``h100`` one.
* Multi-slice TPU jobs (slices joined over the data-centre network): ``2xv5p-128`` is two v5p-128
  slices, 128 chips in all.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from indicfm.package_data import CONFIG_DIR

HARDWARE_YAML = CONFIG_DIR / "hardware.yaml"

GIB = 1024**3


class HardwareError(ValueError):
    """A bad hardware table or slice name; the message says which entry or name and why."""


class Chip(BaseModel):
    """One chip's figures, as written in ``configs/hardware.yaml`` (units in the field names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    kind: Literal["cpu", "gpu", "tpu"]
    peak_tflops: float = Field(gt=0)
    hbm_gib: float = Field(gt=0)
    hbm_gbps: float = Field(gt=0)
    ici_gbps: float = Field(gt=0, description="collective bandwidth per chip in the fast domain, one way")
    dcn_gbps: float = Field(gt=0, description="bandwidth per chip between hosts/nodes, one way")
    chips_per_host: int = Field(gt=0)
    single_host_max_chips: int | None = Field(None, description="largest slice served by one host")
    cores_per_chip: int = Field(1, gt=0, description="TPU: how many cores one unit of the type name counts")
    accelerator_prefix: str | None = None
    runtime_version: str | None = None
    price_on_demand: float = Field(ge=0, description="USD per chip-hour")
    price_spot: float = Field(ge=0, description="USD per chip-hour")
    device_kinds: list[str] = Field(default_factory=list, description="substrings of jax Device.device_kind")
    typical_mfu: float = Field(0.35, gt=0, le=1, description="MFU the planner assumes when not told")
    topology_prefix: str | None = Field(None, description="TPU: libtpu's name of the generation (v5p:4x4x4)")
    topologies: dict[int, str] = Field(
        default_factory=dict, description="TPU: chips in one slice -> its physical shape, e.g. 64: 4x4x4"
    )

    @property
    def peak_flops(self) -> float:
        """Peak dense bf16 FLOP/s of one chip."""
        return self.peak_tflops * 1e12

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * GIB

    @property
    def ici_bytes_per_s(self) -> float:
        return self.ici_gbps * 1e9

    @property
    def dcn_bytes_per_s(self) -> float:
        return self.dcn_gbps * 1e9


class Slice(NamedTuple):
    """A chip type and how many of them (over ``num_slices`` TPU slices joined by the data-centre
    network; ``num_chips`` counts all of them)."""

    chip: Chip
    num_chips: int
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return self.num_chips // self.num_slices

    @property
    def num_hosts(self) -> int:
        """Host VMs / nodes in the slice: one JAX process runs on each."""
        per_slice = self.chips_per_slice
        limit = self.chip.single_host_max_chips or self.chip.chips_per_host
        if per_slice <= limit:
            return self.num_slices
        return math.ceil(per_slice / self.chip.chips_per_host) * self.num_slices

    @property
    def chips_per_host(self) -> int:
        return math.ceil(self.num_chips / self.num_hosts)

    @property
    def accelerator_type(self) -> str:
        """The gcloud ``--accelerator-type`` of one TPU slice, e.g. ``v5p-128`` for 64 v5p chips."""
        if self.chip.kind != "tpu" or not self.chip.accelerator_prefix:
            raise HardwareError(f"{self.chip.name} is not a Cloud TPU; it has no accelerator type")
        return f"{self.chip.accelerator_prefix}-{self.chips_per_slice * self.chip.cores_per_chip}"

    @property
    def name(self) -> str:
        if self.chip.kind == "tpu" and self.chip.accelerator_prefix:
            return self.accelerator_type if self.num_slices == 1 else f"{self.num_slices}x{self.accelerator_type}"
        return f"{self.chip.name}x{self.num_chips}"

    @property
    def price_per_hour(self) -> float:
        """On-demand USD per hour for the whole slice."""
        return self.chip.price_on_demand * self.num_chips


@functools.lru_cache(maxsize=8)
def _load_cached(path: str) -> dict[str, Chip]:
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise HardwareError(f"cannot read hardware table {file}: {err}") from None
    except yaml.YAMLError as err:
        raise HardwareError(f"{file}: not valid YAML: {err}") from None
    entries = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise HardwareError(f"{file}: expected a top-level 'devices:' mapping of chip name -> figures")
    chips: dict[str, Chip] = {}
    for name, figures in entries.items():
        try:
            chips[name] = Chip.model_validate({**(figures or {}), "name": name})
        except ValidationError as err:
            problems = "; ".join(f"devices.{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise HardwareError(f"{file}: {problems}") from None
    return chips


def load_hardware(path: str | Path | None = None) -> dict[str, Chip]:
    """Chip name (``cpu``, ``a100``, ``h100``, ``h200``, ``v4``, ``v5e``, ``v5p``, ``v6e``) → :class:`Chip`."""
    return dict(_load_cached(str(Path(path) if path else HARDWARE_YAML)))


_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}
_TPU_NAME = re.compile(r"^(?P<chip>[a-z0-9]+?)-(?P<count>\d+)$")
_MULTI_SLICE = re.compile(r"^(?P<slices>\d+)x(?P<rest>[a-z].*)$")
_MULTI_NAME = re.compile(r"^(?P<chip>[a-z0-9]+?)(?:x(?P<count>\d+))?$")


def parse_slice(name: str, hardware: dict[str, Chip] | None = None) -> Slice:
    """``"v5p-128"`` → (v5p chip, 64); ``"v5e-256"`` → (v5e, 256); ``"h100x64"`` → (h100, 64); ``"cpu"`` → (cpu, 1);
    ``"2xv5p-128"`` → (v5p, 128 chips, 2 slices)."""
    chips = hardware if hardware is not None else load_hardware()
    text = name.strip().lower()
    num_slices = 1
    multi_slice = _MULTI_SLICE.match(text)
    if multi_slice:
        num_slices, text = int(multi_slice["slices"]), multi_slice["rest"]
    tpu = _TPU_NAME.match(text)
    multi = _MULTI_NAME.match(text)
    if tpu:
        key = _ALIASES.get(tpu["chip"], tpu["chip"])
        units = int(tpu["count"])
    elif multi:
        key = _ALIASES.get(multi["chip"], multi["chip"])
        units = int(multi["count"] or 1)
    else:
        key, units = "", 0
    chip = chips.get(key)
    if chip is None:
        raise HardwareError(
            f"unknown hardware {name!r}: expected a TPU type like v5p-128 / v5e-256 / v6e-64 / v4-32 "
            f"or chipxN like h100x8 (known chips: {', '.join(sorted(chips))})"
        )
    if units <= 0:
        raise HardwareError(f"hardware {name!r}: the count must be positive")
    if tpu and chip.kind == "tpu":
        if units % chip.cores_per_chip:
            raise HardwareError(
                f"hardware {name!r}: {key} types count TensorCores ({chip.cores_per_chip} per chip), "
                f"so the number must be a multiple of {chip.cores_per_chip}"
            )
        return Slice(chip, units // chip.cores_per_chip * num_slices, num_slices)
    if num_slices > 1:
        raise HardwareError(f"hardware {name!r}: several slices (NxTYPE-COUNT) are for Cloud TPU types like 2xv5p-128")
    return Slice(chip, units)


def chip_for_device_kind(device_kind: str, hardware: dict[str, Chip] | None = None) -> Chip | None:
    """The table entry for a ``jax.Device.device_kind`` string (``"TPU v5 lite"``, ``"NVIDIA H100 80GB HBM3"``).

    The longest matching pattern wins, so ``"TPU v5 lite"`` is a v5e and not a v5p.  ``None`` when the
    device is unknown (MFU is then not reported rather than reported wrong).
    """
    chips = hardware if hardware is not None else load_hardware()
    kind = device_kind.lower()
    best: tuple[int, Chip] | None = None
    for chip in chips.values():
        for pattern in chip.device_kinds:
            if pattern.lower() in kind and (best is None or len(pattern) > best[0]):
                best = (len(pattern), chip)
    return best[1] if best else None


def spec_peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of one device of this kind, for MFU; ``None`` when the kind is not in the table."""
    chip = chip_for_device_kind(device_kind)
    return chip.peak_flops if chip else None
