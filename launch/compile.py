"""Ahead-of-time compile of the real train step for a Cloud TPU slice, on any machine.

XLA's TPU compiler ships in ``libtpu`` (the ``tpu`` extra) and runs without a TPU: JAX's
``jax.experimental.topologies`` describes the chips of a slice (``v5p:4x4x4`` = 64 chips), and a
jitted function lowered over a :class:`jax.sharding.Mesh` of those devices compiles exactly as it
would on the slice.  Nothing runs; what comes back is XLA:TPU's own account of the program:

* memory per chip (``memory_analysis()``): arguments (the sharded train state and batch), outputs,
  the part of the outputs aliased to donated arguments, temporaries (activations, gradients,
  collective buffers), and generated code;
* FLOPs and bytes accessed per chip (``cost_analysis()``), and the same per step: XLA counts a loop
  body once and splash attention as no FLOPs (:mod:`indicfm.launch.hlo_cost`);
* the collectives in the compiled HLO, with their bytes per step (:mod:`indicfm.launch.hlo_stats`);
* with the plan, a step-time bound from that work beside the planner's assumed-MFU estimate
  (:mod:`indicfm.launch.compile_bound`).

The program compiled is :func:`indicfm.train.step.build_train_step`'s step, the function
``indicfm train`` runs, traced with :func:`indicfm.model.platform.compiling_for` ``("tpu")`` so the
TPU backends are chosen (splash attention and other Pallas kernels lowered through Mosaic for real
TPU, not the CPU interpreter).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from indicfm.hardware import GIB, Slice, parse_slice
from indicfm.launch.compile_bound import CompiledBound, bound_lines, compiled_bound, size
from indicfm.launch.hlo_cost import program_cost
from indicfm.launch.hlo_graph import CallGraph, call_graph
from indicfm.launch.hlo_stats import collective_stats, hlo_size

# libtpu is only used as a compiler here.  It normally takes a machine-wide lock (one TPU runtime
# per host), asks the GCE metadata server what TPU it runs on and logs at length when that fails;
# none of that applies to compiling for a described topology, and the lock would stop two compiles
# (e.g. test workers) from running at once.
_LIBTPU_ENV = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5p-8",  # any valid type: only silences libtpu's start-up probe
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "GRPC_VERBOSITY": "ERROR",
}


class CompileError(RuntimeError):
    """The slice cannot be compiled for (no libtpu, no topology for this size, XLA refused)."""


def prepare_libtpu_env() -> None:
    for key, value in _LIBTPU_ENV.items():
        # libtpu's own start-up fills some of these with "WARNING: could not determine ..." on a
        # machine without a TPU; those placeholders are replaced, real settings kept
        if not os.environ.get(key) or os.environ[key].startswith("WARNING"):
            os.environ[key] = value


def topology_name(slice_: Slice) -> str:
    """``v5p:4x4x4`` for 64 v5p chips, from ``topologies`` in ``configs/hardware.yaml``."""
    chip = slice_.chip
    if chip.kind != "tpu":
        raise CompileError(f"--compile needs a TPU slice (v4-, v5e-, v5p-, v6e-N); {slice_.name} is a {chip.kind}")
    shape = chip.topologies.get(slice_.chips_per_slice)  # the shape of one slice; slices join over DCN
    if shape is None:
        sizes = ", ".join(f"{n} ({Slice(chip, n).name})" for n in sorted(chip.topologies))
        raise CompileError(
            f"configs/hardware.yaml: devices.{chip.name}.topologies has no entry for {slice_.chips_per_slice} chips "
            f"({slice_.name}); known slice sizes: {sizes}"
        )
    return f"{chip.topology_prefix or chip.name}:{shape}"


def topology_devices(slice_: Slice) -> list[Any]:
    """The devices of the slice (all of its ``num_slices`` slices), for compiling only."""
    prepare_libtpu_env()
    import jax

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise CompileError(
            "compiling for TPU needs libtpu (XLA's TPU compiler): pip install 'indicfm[tpu-compile]' "
            "(or pip install 'libtpu==0.0.42.*' for jax 0.10.2); no TPU is needed"
        ) from None
    from jax.experimental import topologies

    name = topology_name(slice_)
    dims = [int(d) for d in name.split(":")[1].split("x")]
    # one host drives a 2x2 block of chips on multi-host slices; a single-host slice is one block
    single_host = slice_.num_hosts == slice_.num_slices
    bounds = tuple(dims) + (1,) * (3 - len(dims)) if single_host else (2, 2, 1)
    try:
        devices = topologies.get_topology_desc(
            platform="tpu", topology_name=name, chips_per_host_bounds=bounds, num_slices=slice_.num_slices
        ).devices
    except Exception as err:  # libtpu reports bad topologies as plain runtime errors
        raise CompileError(f"libtpu could not describe topology {name} x {slice_.num_slices} slice(s): {err}") from None
    # Some generations (v4) list each TensorCore; JAX runs one device per chip (megacore).
    devices = [d for d in devices if getattr(d, "core_on_chip", 0) == 0]
    expected = slice_.num_chips  # all slices together
    if len(devices) != expected:
        raise CompileError(f"topology {name} gave {len(devices)} chips, expected {expected} for {slice_.name}")
    return devices


@dataclass
class CompileReport:
    """What XLA:TPU says about one compiled train step (bytes are per chip)."""

    hardware: str
    topology: str
    num_slices: int
    mesh: dict[str, int]
    argument_bytes: float
    output_bytes: float
    alias_bytes: float
    temp_bytes: float
    code_bytes: float
    hbm_bytes: float
    flops_per_chip: float
    bytes_accessed_per_chip: float
    compile_seconds: float
    lower_seconds: float
    collectives: dict[str, dict[str, float]] = field(default_factory=dict)
    kernels: dict[str, int] = field(default_factory=dict)
    unknown_trip_counts: int = 0
    hlo_chars: int = 0  # size of the optimized program (grows with depth unless layers are scanned)
    hlo_instructions: int = 0
    #: per step (loop bodies once per iteration): XLA's FLOPs scaled, plus kernels XLA counts as none
    step_flops_per_chip: float = 0.0
    #: how much more the step runs than XLA's cost analysis counts (loop trip counts)
    flops_loop_scale: float = 1.0
    #: FLOPs of Mosaic kernels without a cost estimate (splash attention), per step
    uncounted_kernel_flops_per_chip: float = 0.0
    #: HBM bytes read and written per step, counted from the program (XLA's "bytes accessed" is not)
    step_hbm_bytes_per_chip: float = 0.0

    @property
    def all_to_all_bytes(self) -> float:
        """Expert-exchange bytes one chip receives every step (overflow rounds, which run only under
        skewed routing, left out)."""
        return sum(v["bytes"] for k, v in self.collectives.items() if "all-to-all" in k)

    @property
    def total_bytes(self) -> float:
        """HBM the step's data needs at its peak: arguments + outputs - donated aliases + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes + self.code_bytes <= self.hbm_bytes

    def to_dict(self) -> dict:
        out = asdict(self)
        out["total_bytes"] = self.total_bytes
        out["fits"] = self.fits
        out["memory_gib"] = {
            "arguments": self.argument_bytes / GIB,
            "outputs": self.output_bytes / GIB,
            "aliased": self.alias_bytes / GIB,
            "temporaries": self.temp_bytes / GIB,
            "code": self.code_bytes / GIB,
            "total": self.total_bytes / GIB,
            "hbm": self.hbm_bytes / GIB,
        }
        return out


_OOM_BYTES = re.compile(r"(?:Used|used)\s+([0-9.]+)([KMGT])?(?:i?B)?\s+of\s+([0-9.]+)([KMGT])?(?:i?B)?")


def _oom_message(err: Exception, slice_: Slice) -> str:
    """XLA's out-of-memory error, shortened to its numbers where it gives them."""
    text = str(err)
    found = _OOM_BYTES.search(text)
    if found:
        return f"XLA:TPU: out of HBM: used {found.group(1)}{found.group(2) or ''} of {found.group(3)}{found.group(4) or ''} per chip"
    first = next((line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line or "memory" in line.lower()), text)
    return f"XLA:TPU: {first.strip()[:400]}"


class OutOfMemory(CompileError):
    """XLA:TPU refused the program because it does not fit in HBM."""


def compile_train_step(cfg: Any, slice_: Slice) -> CompileReport:
    """Lower and compile ``cfg``'s train step for ``slice_`` (see the module docstring)."""
    devices = topology_devices(slice_)
    import jax

    from indicfm.model.platform import compiling_for
    from indicfm.sharding import MESH_AXES, logical_axis_rules, make_mesh
    from indicfm.train.optimizer import run_optimizer
    from indicfm.train.state import abstract_train_state
    from indicfm.train.step import abstract_batch, build_train_step

    try:
        mesh = make_mesh(cfg.mesh, devices=devices)
    except ValueError as err:
        raise CompileError(str(err)) from None
    sizes = dict(zip(MESH_AXES, mesh.devices.shape))
    with compiling_for("tpu"):
        tx, _ = run_optimizer(cfg)
        rules = logical_axis_rules(cfg.mesh.shard_weights_over_data)  # as indicfm train lays it out
        graphdef, abstract_state, shardings = abstract_train_state(cfg.model, tx, cfg.trainer.seed, mesh, rules)
        step = build_train_step(cfg, mesh, graphdef, shardings)
        batch = abstract_batch(cfg.trainer.global_batch_size, cfg.data.seq_len, mesh)
        started = time.perf_counter()
        with jax.set_mesh(mesh):
            lowered = step.lower(abstract_state, batch)
        lowered_at = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as err:
            if "RESOURCE_EXHAUSTED" in str(err) or "Ran out of memory" in str(err):
                raise OutOfMemory(_oom_message(err, slice_)) from None
            raise CompileError(f"XLA:TPU could not compile the train step: {str(err)[:2000]}") from None
        done = time.perf_counter()

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    hlo = compiled.as_text()
    graph = call_graph(hlo)  # parsed once for the collectives and the per-step costs
    stats = collective_stats(graph)
    hlo_chars, hlo_instructions = hlo_size(hlo)
    per_step = step_costs(cost, graph)
    return CompileReport(
        hardware=slice_.name,
        topology=topology_name(slice_),
        num_slices=slice_.num_slices,
        mesh=sizes,
        argument_bytes=float(memory.argument_size_in_bytes),
        output_bytes=float(memory.output_size_in_bytes),
        alias_bytes=float(memory.alias_size_in_bytes),
        temp_bytes=float(memory.temp_size_in_bytes),
        code_bytes=float(memory.generated_code_size_in_bytes),
        hbm_bytes=slice_.chip.hbm_bytes,
        flops_per_chip=float(cost.get("flops", 0.0)),
        bytes_accessed_per_chip=float(cost.get("bytes accessed", 0.0)),
        compile_seconds=done - lowered_at,
        lower_seconds=lowered_at - started,
        collectives=stats.to_dict(),
        kernels={"mosaic": hlo.count('custom_call_target="tpu_custom_call"')},
        unknown_trip_counts=stats.unknown_trip_counts,
        hlo_chars=hlo_chars,
        hlo_instructions=hlo_instructions,
        **per_step,
    )


def step_costs(cost: dict[str, float], hlo: str | CallGraph) -> dict[str, float]:
    """The per-step fields of a :class:`CompileReport`, from XLA's ``cost_analysis()`` and the
    compiled program's text or its parsed call graph (see :mod:`indicfm.launch.hlo_cost` for why
    XLA's own figures are not per step)."""
    program = program_cost(hlo)
    return {
        "step_flops_per_chip": program.step_flops(float(cost.get("flops", 0.0))),
        "flops_loop_scale": program.flops_scale,
        "uncounted_kernel_flops_per_chip": program.kernel_flops_per_step,
        "step_hbm_bytes_per_chip": program.bytes_per_step,
    }


# ------------------------------------------------------------------------------ with the planner


def with_layout(cfg: Any, mesh: dict[str, int], remat: str, micro_batches: int) -> Any:
    """``cfg`` with an explicit mesh, remat policy and micro-batch count (a plan's or a suggestion's)."""
    return cfg.model_copy(
        update={
            "mesh": cfg.mesh.model_copy(update=dict(mesh)),
            "model": cfg.model.model_copy(update={"remat": remat}),
            "trainer": cfg.trainer.model_copy(update={"micro_batches": micro_batches}),
        }
    )


@dataclass
class CompiledCandidate:
    """One layout compiled: what it was, the planner's bytes for it, and XLA's verdict."""

    label: str
    mesh: dict[str, int]
    remat: str
    micro_batches: int
    planner_bytes: float
    report: CompileReport | None = None
    error: str | None = None  # XLA refused it (out of memory, ...)
    bound: CompiledBound | None = None  # the step time the compiled program implies

    @property
    def fits(self) -> bool:
        return self.report is not None and self.report.fits

    @property
    def planner_over_xla(self) -> float | None:
        return self.planner_bytes / self.report.total_bytes if self.report and self.report.total_bytes else None

    def to_dict(self) -> dict:
        out = {
            "label": self.label,
            "mesh": self.mesh,
            "remat": self.remat,
            "micro_batches": self.micro_batches,
            "planner_gib": self.planner_bytes / GIB,
            "fits": self.fits,
        }
        if self.report:
            out["xla"] = self.report.to_dict()
            out["planner_over_xla"] = self.planner_over_xla
        if self.bound:
            out["bound"] = self.bound.to_dict()
        if self.error:
            out["error"] = self.error
        return out


def compile_plan(cfg: Any, plan: Any) -> list[CompiledCandidate]:
    """Compile the layout the plan priced; when it does not fit (by the planner or by XLA), also the
    planner's suggested layout, so the suggestion is checked by the compiler before anyone uses it."""
    from indicfm.launch.plan_memory import memory_per_device
    from indicfm.launch.plan_search import suggest_mesh

    slice_ = parse_slice(plan.hardware)
    candidates = [CompiledCandidate("as planned", plan.mesh, plan.remat, plan.micro_batches, plan.memory.total)]
    _compile_into(candidates[0], cfg, slice_, plan, plan.time.total)
    if not candidates[0].fits or not plan.memory.fits:
        suggestion = plan.suggestion
        if suggestion is None or (suggestion.sizes, suggestion.remat, suggestion.micro_batches) == (
            plan.mesh, plan.remat, plan.micro_batches
        ):
            # XLA disagrees with the planner (or the planner had nothing): ask for a layout with more
            # headroom than the planner thinks it needs, by pretending the chip is smaller.
            shrunk = slice_._replace(chip=slice_.chip.model_copy(update={"hbm_gib": slice_.chip.hbm_gib * 0.8}))
            suggestion, _ = suggest_mesh(with_layout(cfg, plan.mesh, plan.remat, plan.micro_batches), shrunk, plan.mfu)
        if suggestion is not None:
            trial = with_layout(cfg, suggestion.sizes, suggestion.remat, suggestion.micro_batches)
            planner = memory_per_device(trial, suggestion.sizes, slice_.chip).total
            candidate = CompiledCandidate("suggested", suggestion.sizes, suggestion.remat, suggestion.micro_batches, planner)
            _compile_into(candidate, cfg, slice_, plan, suggestion.time.total)
            candidates.append(candidate)
    return candidates


def _compile_into(candidate: CompiledCandidate, cfg: Any, slice_: Slice, plan: Any, assumed_step: float) -> None:
    trial = with_layout(cfg, candidate.mesh, candidate.remat, candidate.micro_batches)
    try:
        candidate.report = compile_train_step(trial, slice_)
    except OutOfMemory as err:
        candidate.error = str(err)
        return
    candidate.bound = bound_for(candidate.report, plan, assumed_step)


def bound_for(report: CompileReport, plan: Any, assumed_step_seconds: float) -> CompiledBound:
    """The step time the compiled program implies (:mod:`indicfm.launch.compile_bound`), beside the
    planner's ``assumed_step_seconds`` for the same layout at its assumed MFU."""
    return compiled_bound(
        flops=report.step_flops_per_chip,
        hbm_bytes=report.step_hbm_bytes_per_chip,
        all_to_all_bytes=report.all_to_all_bytes,
        model_flops=model_flops_per_chip(plan),
        mesh=report.mesh,
        slice_=parse_slice(report.hardware),
        assumed_step_seconds=assumed_step_seconds,
        assumed_mfu=plan.mfu,
    )


def model_flops_per_chip(plan: Any) -> float:
    """The plan's model FLOPs per step per chip: training FLOPs per token x tokens per step / chips."""
    return plan.flops_per_token * plan.global_batch * plan.seq_len / plan.num_chips


def render_compiled(candidates: list[CompiledCandidate], plan: Any, console: Any = None) -> None:
    """Print XLA:TPU's figures next to the planner's, one block per compiled layout."""
    from rich.console import Console
    from rich.table import Table

    from indicfm.launch.plan_render import describe_mesh

    console = console or Console(soft_wrap=True)
    for c in candidates:
        layout = f"mesh {describe_mesh(c.mesh)}, remat={c.remat}, {c.micro_batches} micro-batch(es)"
        if c.report is None:
            console.print(f"[bold red]{c.label}: {layout}: does not compile: {c.error}[/] (planner: {c.planner_bytes / GIB:.2f} GiB)")
            continue
        r = c.report
        table = Table(
            title=f"XLA:TPU, {c.label}: {r.topology} x {r.num_slices} slice(s), {layout}; "
            f"compiled in {r.compile_seconds:.1f} s (traced in {r.lower_seconds:.1f} s)",
            title_justify="left",
        )
        table.add_column("per chip")
        table.add_column("XLA:TPU", justify="right")
        for label, value in (
            ("arguments (state, batch)", r.argument_bytes),
            ("outputs", r.output_bytes),
            ("  of which donated (aliased)", r.alias_bytes),
            ("temporaries", r.temp_bytes),
            ("total", r.total_bytes),
            ("program code", r.code_bytes),
        ):
            table.add_row(label, f"{value / GIB:.2f} GiB")
        console.print(table)
        verdict = "fits" if r.fits else "does not fit"
        console.print(
            ("[green]" if r.fits else "[bold red]")
            + f"{verdict}: XLA:TPU {r.total_bytes / GIB:.2f} GiB + {r.code_bytes / GIB:.2f} GiB code of "
            f"{r.hbm_bytes / GIB:.1f} GiB; planner {c.planner_bytes / GIB:.2f} GiB "
            f"(planner / XLA = {c.planner_over_xla:.2f})[/]"
        )
        console.print(
            f"  FLOPs per chip: XLA's cost analysis {r.flops_per_chip:.3e} (a loop body once, splash attention "
            f"as none); per step {r.step_flops_per_chip:.3e} (x{r.flops_loop_scale:.2f} for loop trip counts, "
            f"+{r.uncounted_kernel_flops_per_chip:.3e} in splash attention); model FLOPs "
            f"{c.bound.model_flops if c.bound else model_flops_per_chip(plan):.3e}"
        )
        console.print(
            f"  HBM read+written per step per chip: {size(r.step_hbm_bytes_per_chip)} (XLA's \"bytes accessed\" "
            f"{size(r.bytes_accessed_per_chip)} counts a loop body once and Mosaic kernels many times "
            f"their operands); Mosaic kernels: {r.kernels.get('mosaic', 0)}"
        )
        parts = [
            f"{kind} {v['count']:.0f} x, {size(v['bytes'])}"
            for kind, v in r.collectives.items()
            if v["count"]
        ]
        console.print("  collectives per step per chip: " + ("; ".join(parts) if parts else "none"))
        branch = [
            f"{kind} {v['count_if_taken']} x, {size(v['bytes_if_taken'])}"
            for kind, v in r.collectives.items()
            if v.get("count_if_taken")
        ]
        if branch:  # e.g. the expert exchange's overflow rounds
            console.print("  at most, in conditional branches (taken only when needed, e.g. skewed routing): " + "; ".join(branch))
        if r.unknown_trip_counts:
            console.print(f"  [yellow]{r.unknown_trip_counts} loop(s) without a known trip count were counted once[/]")
        for line in bound_lines(c.bound) if c.bound else ():
            console.print(line)
