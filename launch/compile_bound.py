"""A step-time bound from the compiled program, beside the planner's assumed-MFU estimate.

Why: ``indicfm plan`` prices a pod from an MFU it assumes (each chip's ``typical_mfu`` in
``configs/hardware.yaml``).  Once XLA:TPU has built the step (``plan --compile``), the program
itself says how much work one chip does per step, so the guess can be checked against it:

    step >= max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth) + exposed all-to-all time

per chip, where the FLOPs and bytes are the compiled step's, loop bodies counted once per iteration
(:mod:`indicfm.launch.hlo_cost`), and the all-to-all is the expert exchange, which sits on the
critical path (each layer waits for its tokens), at the slice's interconnect bandwidth priced as the
planner prices it (:func:`indicfm.launch.plan_roofline.ring_seconds`).  FSDP gathers and gradient
reductions are left out: XLA overlaps them with compute.  The MFU this implies is the model's FLOPs
(``indicfm.model.flops``, what MFU is defined on) over that time at peak: a ceiling, since every
kernel is assumed to run at the chip's peak or at its full HBM bandwidth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from indicfm.hardware import Slice
from indicfm.launch.plan_roofline import ring_seconds


@dataclass
class CompiledBound:
    """Per-chip work of one compiled step and the step time and MFU it implies."""

    #: FLOPs per chip per step: XLA's count scaled by loop trip counts, plus kernels XLA does not count
    flops: float
    #: the model's own FLOPs per chip per step (no remat recompute): the numerator of MFU
    model_flops: float
    #: HBM bytes read and written per chip per step
    hbm_bytes: float
    #: all-to-all bytes one chip receives per step (balanced routing)
    all_to_all_bytes: float
    peak_flops: float
    hbm_bytes_per_s: float
    flops_seconds: float
    memory_seconds: float
    all_to_all_seconds: float
    #: the planner's step time at its assumed MFU, and that MFU
    assumed_step_seconds: float
    assumed_mfu: float

    @property
    def compute_seconds(self) -> float:
        return max(self.flops_seconds, self.memory_seconds)

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + self.all_to_all_seconds

    @property
    def mfu(self) -> float:
        """The MFU the bound implies: model FLOPs over the bound's step time at peak."""
        return self.model_flops / (self.step_seconds * self.peak_flops) if self.step_seconds else 0.0

    @property
    def bound_by(self) -> str:
        return "FLOPs" if self.flops_seconds >= self.memory_seconds else "HBM bandwidth"

    def to_dict(self) -> dict:
        return asdict(self) | {
            "compute_seconds": self.compute_seconds,
            "step_seconds": self.step_seconds,
            "mfu": self.mfu,
            "bound_by": self.bound_by,
        }


def compiled_bound(
    *,
    flops: float,
    hbm_bytes: float,
    all_to_all_bytes: float,
    model_flops: float,
    mesh: dict[str, int],
    slice_: Slice,
    assumed_step_seconds: float,
    assumed_mfu: float,
) -> CompiledBound:
    """The bound for one compiled step on ``slice_`` (figures per chip; see the module docstring)."""
    chip = slice_.chip
    hbm_bytes_per_s = chip.hbm_gbps * 1e9
    return CompiledBound(
        flops=flops,
        model_flops=model_flops,
        hbm_bytes=hbm_bytes,
        all_to_all_bytes=all_to_all_bytes,
        peak_flops=chip.peak_flops,
        hbm_bytes_per_s=hbm_bytes_per_s,
        flops_seconds=flops / chip.peak_flops,
        memory_seconds=hbm_bytes / hbm_bytes_per_s,
        all_to_all_seconds=ring_seconds(all_to_all_bytes, mesh.get("expert", 1), "expert", mesh, slice_),
        assumed_step_seconds=assumed_step_seconds,
        assumed_mfu=assumed_mfu,
    )


def seconds(value: float) -> str:
    """A duration to three significant figures, in the unit that keeps it readable."""
    return f"{value:.3g} s" if value >= 0.1 else f"{value * 1e3:.3g} ms"


def size(nbytes: float) -> str:
    """Bytes in GiB, or MiB below one GiB (a toy model's collectives)."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def bound_lines(bound: CompiledBound) -> list[str]:
    """What ``indicfm plan --compile`` prints for the bound, one line per figure."""
    lines = [
        f"  bound from the compiled program, per chip: max(FLOPs {bound.flops:.3e} / "
        f"{bound.peak_flops / 1e12:.0f} TFLOP/s = {seconds(bound.flops_seconds)}, HBM {size(bound.hbm_bytes)} / "
        f"{bound.hbm_bytes_per_s / 1e9:.0f} GB/s = {seconds(bound.memory_seconds)}) + all-to-all "
        f"{size(bound.all_to_all_bytes)} on the critical path = {seconds(bound.all_to_all_seconds)}",
    ]
    if bound.step_seconds:
        lines.append(
            f"  step >= {seconds(bound.step_seconds)} ({bound.bound_by}-bound), so MFU <= {bound.mfu:.0%}; the planner's "
            f"estimate at its assumed {bound.assumed_mfu:.0%} MFU: {seconds(bound.assumed_step_seconds)} "
            f"({bound.assumed_step_seconds / bound.step_seconds:.2f}x the bound)"
        )
    return lines
