"""Collectives in a compiled XLA program, read from its HLO text: how many run per step, and how many
bytes they produce on one device.

Why parse text: the compiled module is only exposed as text (``compiled.as_text()``), and it is what
the chip will execute after every XLA pass (async collectives, combined all-reduces, SPMD
partitioning).  A collective inside a loop body runs once per iteration, so each computation's
collectives are weighted by how often the program calls it: a ``while`` body by its
``known_trip_count`` (the scan over micro-batches or layers), fusions, calls and async wrappers once.

Bytes are the size of the op's result on one device (an all-gather's gathered array, a
reduce-scatter's scattered shard, an all-reduce's whole operand, an all-to-all's exchanged buffer):
the data each chip receives from the others, which is what the interconnect moves.

A collective inside a ``conditional``'s branch runs only when that branch is taken (the dropless
expert exchange's overflow rounds, taken only under skewed routing): those are counted apart
(``*_if_taken``), so ``count``/``bytes`` are what every step runs and the sum of both is the worst case.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

#: Result kinds reported, in the order they are printed; ``*-start`` async forms count as their op.
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
    "f64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(map(re.escape, sorted(_DTYPE_BYTES, key=len, reverse=True))) + r")\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY )?%(?P<name>[^\s(]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (?P<shape>.+?) (?P<op>[a-z][a-z0-9-]*)\(")
_CALLEE = re.compile(r"\b(?:calls|body|to_apply)=%([^\s,)]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"\bcondition=%([^\s,)]+)")
_CONSTANT = re.compile(r"^\s*%(?P<name>\S+) = s(?:32|64)\[\]\S* constant\((?P<value>-?\d+)\)")
_LOOP_TEST = re.compile(r"^\s*ROOT %\S+ = pred\[\]\S* compare\(%\S+, %(?P<bound>[^\s,)]+)\), direction=LT")


#: a line that defines a value (``%x = ...`` or ``ROOT %x = ...``): one HLO instruction
HLO_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+\s*=\s*\S", re.MULTILINE)


def hlo_size(hlo_text: str) -> tuple[int, int]:
    """``(characters, instructions)`` of an HLO module's text: the program's size, which grows with
    depth when layers are unrolled and stays one block's with ``model.scan_layers``."""
    return len(hlo_text), len(HLO_INSTRUCTION.findall(hlo_text))


@dataclass
class CollectiveStats:
    """Per-step count and result bytes on one device, per collective kind."""

    count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    #: the same for collectives inside conditional branches (they run only when the branch is taken)
    count_if_taken: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_if_taken: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    #: loops whose trip count XLA did not record (their collectives are counted once)
    unknown_trip_counts: int = 0

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {
            kind: {
                "count": self.count.get(kind, 0),
                "bytes": self.bytes.get(kind, 0.0),
                "count_if_taken": self.count_if_taken.get(kind, 0),
                "bytes_if_taken": self.bytes_if_taken.get(kind, 0.0),
            }
            for kind in COLLECTIVES
        }


def array_bytes(shape_text: str) -> list[float]:
    """Bytes of every array in an HLO shape (``f32[8,128]{1,0}`` or a tuple of them), in order."""
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        elements = 1
        for d in filter(None, dims.split(",")):
            elements *= int(d)
        out.append(elements * _DTYPE_BYTES[dtype])
    return out


def _result_bytes(op: str, shape_text: str) -> float:
    """What one collective delivers on a device (see the module docstring)."""
    arrays = array_bytes(shape_text)
    if not arrays:
        return 0.0
    if op == "all-gather-start":  # (operands..., results...)
        return float(sum(arrays[len(arrays) // 2 :]))
    if op == "collective-permute-start":  # (operand, result, context scalars)
        return float(arrays[1] if len(arrays) > 1 else arrays[0])
    return float(sum(arrays))


def _kind(op: str) -> str | None:
    base = op[: -len("-start")] if op.endswith("-start") else op
    return base if base in COLLECTIVES else None


def collective_stats(hlo_text: str) -> CollectiveStats:
    """Count the collectives one step runs (loop bodies weighted by their trip counts)."""
    local: dict[str, list[tuple[str, float]]] = defaultdict(list)  # computation -> its collectives
    calls: dict[str, list[tuple[str, int | str]]] = defaultdict(list)  # computation -> (callee, times)
    branches: set[str] = set()  # computations that are a conditional's branch
    constants: dict[str, dict[str, int]] = defaultdict(dict)  # computation -> integer scalar constants
    bounds: dict[str, int] = {}  # loop condition -> N of its `counter < N`
    entry = None
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header["name"]
            if header["entry"]:
                entry = current
            continue
        if current is None:
            continue
        constant = _CONSTANT.match(line)
        if constant:
            constants[current][constant["name"]] = int(constant["value"])
        test = _LOOP_TEST.match(line)
        if test and test["bound"] in constants[current]:
            bounds[current] = constants[current][test["bound"]]
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        op = instruction["op"]
        kind = _kind(op)
        if kind:
            local[current].append((kind, _result_bytes(op, instruction["shape"])))
        times: int | str = 1
        if op == "while":
            trip = _TRIP_COUNT.search(line)
            condition = _CONDITION.search(line)
            # without a recorded trip count, the condition's `counter < N` gives it (resolved below)
            times = int(trip.group(1)) if trip else f"?{condition.group(1) if condition else ''}"
        for callee in _CALLEE.findall(line):
            calls[current].append((callee, times))
        for group in _BRANCHES.findall(line):  # a conditional runs one branch: count each once
            names = [name.strip().lstrip("%") for name in group.split(",") if name.strip()]
            calls[current].extend((name, 1) for name in names)
            branches.update(names)

    # JAX lowers scans and fori_loops with a counter from 0 in steps of 1, so `counter < N` runs N
    # times; a loop whose condition is not of that form is counted once and reported.
    unknown = 0
    for name, edges in calls.items():
        for i, (callee, times) in enumerate(edges):
            if isinstance(times, str):
                bound = bounds.get(times[1:])
                unknown += bound is None
                edges[i] = (callee, bound if bound is not None else 1)
    stats = CollectiveStats(unknown_trip_counts=unknown)
    if entry is None:
        return stats

    def visit(name: str, times: int, in_branch: bool = False, depth: int = 0) -> None:
        if depth > 64:  # HLO call graphs are acyclic; this only guards against a malformed text
            return
        in_branch = in_branch or name in branches
        count, nbytes_of = (stats.count_if_taken, stats.bytes_if_taken) if in_branch else (stats.count, stats.bytes)
        for kind, nbytes in local.get(name, ()):
            count[kind] += times
            nbytes_of[kind] += times * nbytes
        for callee, n in calls.get(name, ()):
            visit(callee, times * n, in_branch, depth + 1)

    visit(entry, 1)
    return stats
