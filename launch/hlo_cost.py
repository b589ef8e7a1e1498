"""FLOPs and HBM bytes of one step of a compiled XLA program, with loop bodies counted once per
iteration, read from its HLO text.

Why: XLA's ``cost_analysis()`` is not a per-step account of a TPU train step, in three ways that
were measured on tiny-moe compiled for v5p-8:

* it counts a ``while`` body once, however many times it runs: two micro-batches halve its FLOPs,
  and a model with ``scan_layers`` reads as one block however deep it is;
* a Mosaic kernel without a ``cost_estimate`` (splash attention) counts as no FLOPs;
* its "bytes accessed" charges such a kernel ~15x the bytes of its operands and results, and counts
  operands a fusion only slices in full, so it is no estimate of HBM traffic.

XLA gives no per-computation figures to re-weight, so this module counts each computation's own
work from the text and weights it by how often the step runs it (:mod:`indicfm.launch.hlo_graph`,
the weights the collective table uses).  What is counted, per run of a computation:

* FLOPs XLA also counts: ``2 x`` the multiply-adds of every ``dot`` and ``convolution`` (XLA:TPU
  writes matmuls as convolutions, often with padded windows; only taps that land inside the input
  count) and the ``cost_estimate`` of a Mosaic kernel that carries one (the grouped matmul).  This
  is within a few percent of XLA's figure when counted XLA's way (elementwise work is left out),
  so it is used as a *scale* on XLA's FLOPs (:meth:`ProgramCost.step_flops`).
* FLOPs XLA does not see: the splash attention kernels', from their query's shape
  ``[B, K, R, L, G]``: ``2 x G x B K R x L^2 / 2`` (the causal half; the kernel also computes the
  diagonal blocks, a few percent more) per matmul, 2 matmuls forward (``Q K^T``, ``P V``), 4 in the
  key/value gradient pass and 3 in the query gradient pass.
* HBM bytes: for every instruction that runs as a kernel of its own (not inside a fusion), what it
  reads and writes: operands plus result; a fusion's operands as its fused computation reads them (a
  parameter only ``dynamic-slice``d, like one layer of the stacked weights in a scanned body, costs
  the slice) and an in-place ``dynamic-update-slice`` writes the update, not the buffer; a Mosaic
  kernel its ``cost_estimate`` bytes where it has one (the grouped matmul's counts the weight tiles
  it reads again for every row tile).  An array XLA placed in another memory space (``S(1)`` in its
  layout: on-chip VMEM) costs nothing; what a fusion streams through on-chip memory internally is
  not seen, so this is an estimate of HBM traffic from the program's buffers, not a measurement.

Conditional branches are left out of the per-step figures: the expert exchange's overflow rounds
run only under skewed routing.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from indicfm.launch.hlo_graph import INSTRUCTION, CallGraph, array_bytes, array_dims, call_graph, run_counts

#: ops that move no data of their own (views, tuples, control flow whose bodies are counted apart)
_FREE = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
    "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "call-start", "call-done",
})
_OPERAND = re.compile(r"%([^\s,)]+)")
_DIM_LABELS = re.compile(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)")
_WINDOW = re.compile(r"window=\{([^}]*)\}")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_MOSAIC_COST = re.compile(r'"cost_estimate":\{"flops":"(\d+)"[^}]*?"bytes_accessed":"(\d+)"')
#: matmuls per (query, key) pair in each splash attention pass, by the kernel's name
_SPLASH_MATMULS = {"_fwd": 2, "_dkv": 4, "_dq": 3}


@dataclass
class ProgramCost:
    """Per-chip FLOPs and HBM bytes of one step, and the FLOPs counted XLA's way (each computation
    once per call site, every branch) to compare with ``cost_analysis()``."""

    #: dots, convolutions and Mosaic kernels with a cost estimate: what XLA counts
    flops_once: float
    flops_per_step: float
    #: Mosaic kernels XLA counts as nothing (splash attention), per step
    kernel_flops_per_step: float
    bytes_per_step: float

    @property
    def flops_scale(self) -> float:
        """Per-step work over XLA's count of it: 1 without loops, ~N for a step that is one N-trip loop."""
        return self.flops_per_step / self.flops_once if self.flops_once else 1.0

    def step_flops(self, xla_flops: float) -> float:
        """XLA's FLOPs scaled to one step, plus the kernels XLA does not count."""
        return xla_flops * self.flops_scale + self.kernel_flops_per_step


def _hbm(shape_text: str) -> float:
    """Bytes of an HLO shape that live in HBM (not in on-chip memory)."""
    return sum(array_bytes(shape_text, hbm_only=True))


def _window(line: str, spatial: int) -> list[dict[str, int]]:
    """Size, padding, stride and dilations of each spatial dimension of a convolution's window."""
    dims = [{"size": 1, "pad_low": 0, "stride": 1, "lhs_dilate": 1, "rhs_dilate": 1} for _ in range(spatial)]
    found = _WINDOW.search(line)
    if not found:
        return dims
    for item in found.group(1).split():
        key, _, value = item.partition("=")
        parts = value.split("x")
        for d, part in enumerate(parts[:spatial]):
            if key == "pad":
                dims[d]["pad_low"] = int(part.split("_")[0])
            elif key in ("size", "stride", "lhs_dilate", "rhs_dilate"):
                dims[d][key] = int(part)
    return dims


def _taps(in_size: int, out_size: int, w: dict[str, int]) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that read a real input element,
    not padding nor a dilation hole."""
    total = 0
    last = (in_size - 1) * w["lhs_dilate"]  # last input position in the dilated input
    for k in range(w["size"]):
        offset = k * w["rhs_dilate"] - w["pad_low"]  # input position of output 0 for this tap
        if w["lhs_dilate"] == 1:
            lo = max(0, math.ceil(-offset / w["stride"]))
            hi = min(out_size - 1, math.floor((last - offset) / w["stride"]))
            total += max(0, hi - lo + 1)
        else:
            total += sum(
                1 for o in range(out_size)
                if 0 <= o * w["stride"] + offset <= last and (o * w["stride"] + offset) % w["lhs_dilate"] == 0
            )
    return total


def convolution_flops(line: str, out_shape: str, lhs_shape: str, rhs_shape: str) -> float:
    """``2 x`` multiply-adds of one convolution: output batch x output features x kernel input
    features x, per spatial dimension, the (output, tap) pairs that fall inside the input."""
    labels = _DIM_LABELS.search(line)
    out, lhs, rhs = (array_dims(s) for s in (out_shape, lhs_shape, rhs_shape))
    if not labels or not out or not lhs or not rhs:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    out_dims, lhs_dims, rhs_dims = out[0][1], lhs[0][1], rhs[0][1]
    spatial = [c for c in out_l if c.isdigit()]
    macs = out_dims[out_l.index("b")] * out_dims[out_l.index("f")] * rhs_dims[rhs_l.index("i")]
    for d, w in zip(spatial, _window(line, len(spatial))):
        macs *= _taps(lhs_dims[lhs_l.index(d)], out_dims[out_l.index(d)], w)
    return 2.0 * macs


def dot_flops(line: str, out_shape: str, lhs_shape: str) -> float:
    """``2 x`` output elements x the product of the contracted dimensions of the left operand."""
    out, lhs = array_dims(out_shape), array_dims(lhs_shape)
    contracting = _CONTRACTING.search(line)
    if not out or not lhs:
        return 0.0
    size = math.prod(lhs[0][1][int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    return 2.0 * math.prod(out[0][1]) * size


def _fused_io_bytes(lines: list[str], shapes: dict[str, str], result_bytes: float) -> tuple[float, float]:
    """``(bytes read, bytes written)`` of one run of a fused computation whose result is
    ``result_bytes``: a parameter used only by slices costs the slices; a ``dynamic-update-slice``
    that reaches the root (through bitcasts and tuples) updates its buffer in place, so it writes
    the update and does not read the buffer."""
    defs: dict[str, tuple[str, list[str]]] = {}  # name -> (op, operands)
    params: dict[str, float] = {}
    uses: dict[str, list[tuple[str, int, str]]] = defaultdict(list)  # name -> (user op, operand index, user shape)
    root = None
    for line in lines:
        found = INSTRUCTION.match(line)
        if not found:
            continue
        operands = _OPERAND.findall(found["operands"])
        defs[found["name"]] = (found["op"], operands)
        if found["op"] == "parameter":
            params[found["name"]] = _hbm(found["shape"])
        for i, name in enumerate(operands):
            uses[name].append((found["op"], i, found["shape"]))
        if line.lstrip().startswith("ROOT"):
            root = found["name"]

    def through_views(name: str) -> str:
        while defs.get(name, ("",))[0] in ("bitcast", "copy") and defs[name][1]:
            name = defs[name][1][0]
        return name

    in_place: set[str] = set()
    written = result_bytes
    pending = [root] if root else []
    while pending:
        name = through_views(pending.pop())
        op, operands = defs.get(name, ("", []))
        if op == "tuple":
            pending.extend(operands)
        elif op == "dynamic-update-slice" and len(operands) > 1:
            in_place.add(through_views(operands[0]))
            buffer = _hbm(shapes.get(name, ""))  # 0 when the buffer is on chip: nothing goes to HBM
            written -= buffer - (sum(array_bytes(shapes.get(operands[1], ""))) if buffer else 0.0)
    read = 0.0
    for name, nbytes in params.items():
        used = uses.get(name, [])
        if name in in_place:
            continue
        if used and all(op in ("dynamic-slice", "slice") and i == 0 for op, i, _ in used):
            read += sum(sum(array_bytes(shape)) for _, _, shape in used) if nbytes else 0.0
        else:
            read += nbytes
    return read, max(0.0, written)


def splash_flops(kernel: str, query_shape: str) -> float:
    """FLOPs of one splash attention kernel (see the module docstring), from its query
    ``[B, K, R, L, G]``; 0 for a kernel of another name."""
    matmuls = next((n for tag, n in _SPLASH_MATMULS.items() if tag in kernel), 0)
    dims = array_dims(query_shape)
    if not kernel.startswith("splash") or not matmuls or not dims or len(dims[0][1]) < 3:
        return 0.0
    *heads, length, head_dim = dims[0][1]
    return 2.0 * matmuls * math.prod(heads) * length * length / 2 * head_dim


def _local_costs(graph: CallGraph) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Each computation's own FLOPs (XLA's kind, and the kernels XLA does not count) and HBM bytes
    per run (see the module docstring)."""
    shapes: dict[str, str] = {}
    parsed: dict[str, list[tuple[str, re.Match]]] = {}
    for name, computation in graph.computations.items():
        parsed[name] = []
        for line in computation.lines:
            found = INSTRUCTION.match(line)
            if found:
                shapes[found["name"]] = found["shape"]  # instruction names are unique in a module
                parsed[name].append((line, found))
    flops: dict[str, float] = defaultdict(float)
    hidden: dict[str, float] = defaultdict(float)
    nbytes: dict[str, float] = defaultdict(float)
    for name, instructions in parsed.items():
        top_level = name not in graph.inside_instruction
        for line, found in instructions:
            op, shape = found["op"], found["shape"]
            operands = _OPERAND.findall(found["operands"])
            mosaic = _MOSAIC_COST.search(line) if op == "custom-call" else None
            if op == "convolution" and len(operands) >= 2:
                flops[name] += convolution_flops(line, shape, shapes.get(operands[0], ""), shapes.get(operands[1], ""))
            elif op == "dot" and operands:
                flops[name] += dot_flops(line, shape, shapes.get(operands[0], ""))
            elif op == "custom-call":
                if mosaic:
                    flops[name] += float(mosaic.group(1))
                elif 'custom_call_target="tpu_custom_call"' in line and len(operands) > 2:
                    hidden[name] += splash_flops(found["name"], shapes.get(operands[2], ""))
            if not top_level or op in _FREE or op.endswith("-done"):
                continue
            result = _hbm(shape)
            if op.endswith("-start"):  # async: the tuple holds what is read and what is written
                nbytes[name] += result
            elif op == "fusion":
                callee = re.search(r"\bcalls=%([^\s,)]+)", line)
                fused = graph.computations.get(callee.group(1)) if callee else None
                if fused is not None:
                    nbytes[name] += sum(_fused_io_bytes(fused.lines, shapes, result))
                else:
                    nbytes[name] += result + sum(_hbm(shapes.get(o, "")) for o in operands)
            elif op == "dynamic-slice":
                nbytes[name] += 2 * result
            elif op == "dynamic-update-slice" and len(operands) > 1:
                nbytes[name] += 2 * _hbm(shapes.get(operands[1], ""))
            elif mosaic:
                nbytes[name] += float(mosaic.group(2))
            else:
                nbytes[name] += result + sum(_hbm(shapes.get(o, "")) for o in operands)
    return flops, hidden, nbytes


def program_cost(hlo: str | CallGraph) -> ProgramCost:
    """FLOPs and bytes of one step (loop bodies once per iteration), and the FLOPs counted as XLA's
    cost analysis counts them; ``hlo`` is the module's text or its already parsed
    :func:`~indicfm.launch.hlo_graph.call_graph`."""
    graph = hlo if isinstance(hlo, CallGraph) else call_graph(hlo)
    flops, hidden, nbytes = _local_costs(graph)
    every, _ = run_counts(graph)
    once_every, once_taken = run_counts(graph, trip_counts=False)
    once = {name: once_every.get(name, 0) + once_taken.get(name, 0) for name in {*once_every, *once_taken}}

    def total(local: dict[str, float], runs: dict[str, int]) -> float:
        return sum(local.get(name, 0.0) * times for name, times in runs.items())

    return ProgramCost(
        flops_once=total(flops, once),
        flops_per_step=total(flops, every),
        kernel_flops_per_step=total(hidden, every),
        bytes_per_step=total(nbytes, every),
    )
