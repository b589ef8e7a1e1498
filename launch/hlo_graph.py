"""The call graph of a compiled XLA program, read from its HLO text: which computations run how often
in one step.

Why: XLA's own accounts of a program count a computation once per call site.  A ``while`` body (the
scan over micro-batches or over scanned layers) runs once per iteration, so both the collective
table (:mod:`indicfm.launch.hlo_stats`) and the trip-count-scaled FLOPs and bytes
(:mod:`indicfm.launch.hlo_cost`) weight each computation by how often the program calls it: a
``while`` body by its ``known_trip_count`` (or the ``counter < N`` of its condition), fusions, calls
and async wrappers once.  One parser here, so both agree on what "once per step" means.

A computation reached only through a ``conditional``'s branch runs only when that branch is taken
(the dropless expert exchange's overflow rounds, taken only under skewed routing): its runs are
counted apart, so callers can report what every step runs and the worst case separately.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
    "f64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(map(re.escape, sorted(_DTYPE_BYTES, key=len, reverse=True))) + r")\[([0-9,]*)\](\{[^}]*\})?")
#: a layout's memory space other than the default (HBM): ``S(1)`` is TPU VMEM, ``S(6)`` SMEM, ...
_OTHER_MEMORY = re.compile(r"S\([1-9]\d*\)")
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY )?%(?P<name>[^\s(]+) .*\{\s*$")
#: one instruction: ``[ROOT ]%name = SHAPE op(operands), attributes``
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>\S+) = (?P<shape>.+?) (?P<op>[a-z][a-z0-9-]*)\((?P<operands>[^)]*)\)")
_CALLEE = re.compile(r"\b(?:calls|body|to_apply)=%([^\s,)]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"\bcondition=%([^\s,)]+)")
_CONSTANT = re.compile(r"^\s*%(?P<name>\S+) = s(?:32|64)\[\]\S* constant\((?P<value>-?\d+)\)")
_LOOP_TEST = re.compile(r"^\s*ROOT %\S+ = pred\[\]\S* compare\(%\S+, %(?P<bound>[^\s,)]+)\), direction=LT")
#: ops whose ``to_apply`` computation is a program of its own instructions, not a scalar function
_CALL_OPS = frozenset({"call", "call-start", "async-start"})
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")


def array_dims(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, dims)`` of every array in an HLO shape (``f32[8,128]{1,0}`` or a tuple of them)."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims, _ in _ARRAY.findall(shape_text)]


def array_bytes(shape_text: str, *, hbm_only: bool = False) -> list[float]:
    """Bytes of every array in an HLO shape (``f32[8,128]{1,0}`` or a tuple of them), in order;
    with ``hbm_only``, 0 for an array whose layout puts it in another memory space (``S(1)``: a
    buffer XLA keeps in on-chip memory costs no HBM traffic)."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shape_text):
        elements = 1
        for d in filter(None, dims.split(",")):
            elements *= int(d)
        out.append(0.0 if hbm_only and _OTHER_MEMORY.search(layout) else elements * _DTYPE_BYTES[dtype])
    return out


@dataclass
class Computation:
    """One computation of the module: its result shape (from the header) and its instruction lines."""

    name: str
    result: str
    lines: list[str] = field(default_factory=list)


@dataclass
class CallGraph:
    """The module's computations and who calls whom, how many times per call (trip counts resolved)."""

    entry: str | None
    computations: dict[str, Computation]
    calls: dict[str, list[tuple[str, int]]]
    #: computations that are a conditional's branch
    branches: set[str]
    #: computations called by a ``fusion`` (their instructions run as one kernel) and by which kind
    fusion_kind: dict[str, str]
    #: computations that run inside one instruction: fused computations and the scalar functions a
    #: reduce, scatter or all-reduce applies (``to_apply``); not a ``call``'s body
    inside_instruction: set[str] = field(default_factory=set)
    #: loops whose trip count XLA did not record nor their condition gave (counted once)
    unknown_trip_counts: int = 0
    #: ``num_partitions`` from the module header: the devices one program runs on
    num_partitions: int | None = None


def call_graph(hlo_text: str) -> CallGraph:
    """Parse the computations of an HLO module and the calls between them."""
    computations: dict[str, Computation] = {}
    calls: dict[str, list[tuple[str, int | str]]] = defaultdict(list)
    branches: set[str] = set()
    fusion_kind: dict[str, str] = {}
    inside: set[str] = set()
    constants: dict[str, dict[str, int]] = defaultdict(dict)  # computation -> integer scalar constants
    bounds: dict[str, int] = {}  # loop condition -> N of its `counter < N`
    entry = None
    current: Computation | None = None
    partitions = _PARTITIONS.search(hlo_text[:20000])
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            result = line.rsplit(" -> ", 1)[1] if " -> " in line else ""
            current = computations[header["name"]] = Computation(header["name"], result)
            if header["entry"]:
                entry = current.name
            continue
        if current is None:
            continue
        current.lines.append(line)
        constant = _CONSTANT.match(line)
        if constant:
            constants[current.name][constant["name"]] = int(constant["value"])
        test = _LOOP_TEST.match(line)
        if test and test["bound"] in constants[current.name]:
            bounds[current.name] = constants[current.name][test["bound"]]
        instruction = INSTRUCTION.match(line)
        if not instruction:
            continue
        op = instruction["op"]
        times: int | str = 1
        if op == "while":
            trip = _TRIP_COUNT.search(line)
            condition = _CONDITION.search(line)
            # without a recorded trip count, the condition's `counter < N` gives it (resolved below)
            times = int(trip.group(1)) if trip else f"?{condition.group(1) if condition else ''}"
        for callee in _CALLEE.findall(line):
            calls[current.name].append((callee, times))
            if op == "fusion":
                kind = re.search(r"\bkind=(k\w+)", line)
                fusion_kind[callee] = kind.group(1) if kind else ""
            if op == "fusion" or (op not in _CALL_OPS and f"to_apply=%{callee}" in line):
                inside.add(callee)
        for group in _BRANCHES.findall(line):  # a conditional runs one branch: count each once
            names = [name.strip().lstrip("%") for name in group.split(",") if name.strip()]
            calls[current.name].extend((name, 1) for name in names)
            branches.update(names)

    # JAX lowers scans and fori_loops with a counter from 0 in steps of 1, so `counter < N` runs N
    # times; a loop whose condition is not of that form is counted once and reported.
    unknown = 0
    resolved: dict[str, list[tuple[str, int]]] = {}
    for name, edges in calls.items():
        resolved[name] = []
        for callee, times in edges:
            if isinstance(times, str):
                bound = bounds.get(times[1:])
                unknown += bound is None
                times = bound if bound is not None else 1
            resolved[name].append((callee, times))
    return CallGraph(
        entry=entry,
        computations=computations,
        calls=resolved,
        branches=branches,
        fusion_kind=fusion_kind,
        inside_instruction=inside,
        unknown_trip_counts=unknown,
        num_partitions=int(partitions.group(1)) if partitions else None,
    )


def run_counts(graph: CallGraph, *, trip_counts: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """How many times each computation runs in one step: ``(every step, only when a branch is taken)``.

    With ``trip_counts=False`` every loop body counts once, as XLA's cost analysis counts it.
    """
    every: dict[str, int] = defaultdict(int)
    taken: dict[str, int] = defaultdict(int)
    if graph.entry is None:
        return every, taken

    def visit(name: str, times: int, in_branch: bool, depth: int) -> None:
        if depth > 64:  # HLO call graphs are acyclic; this only guards against a malformed text
            return
        in_branch = in_branch or name in graph.branches
        (taken if in_branch else every)[name] += times
        for callee, n in graph.calls.get(name, ()):
            visit(callee, times * (n if trip_counts else 1), in_branch, depth + 1)

    visit(graph.entry, 1, False, 0)
    return every, taken
