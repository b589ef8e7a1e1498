"""Collectives in a compiled XLA program, read from its HLO text: how many run per step, and how many
bytes they move on one device.

Why parse text: the compiled module is only exposed as text (``compiled.as_text()``), and it is what
the chip will execute after every XLA pass (async collectives, combined all-reduces, SPMD
partitioning).  Each computation's collectives are weighted by how often one step runs it (a loop
body by its trip count; :mod:`indicfm.launch.hlo_graph`).

Bytes are the data each chip receives from the others, which is what the interconnect moves.  For
most collectives that is about the size of the op's result on one device: an all-gather's gathered
array, an all-to-all's exchanged buffer, an all-reduce's whole operand.  A reduce-scatter's result
is only the chip's shard, but in a ring each chip receives the other ``n - 1`` partial sums of it:
its bytes are ``shard x (n - 1) = operand x (n - 1) / n`` (the same traffic as the all-gather that
undoes it), ``n`` the size of its replica group.

XLA:TPU emits FSDP gradient reduction as an *all-reduce-scatter fusion*: a ``kind=kCustom`` fusion
whose called computation all-reduces the whole gradient and returns this chip's slice of it
(``dynamic-slice``); the fusion's result is the shard.  The chip runs it as a reduce-scatter, so it
is counted as one, with ``operand - shard`` bytes (= ``shard x (n - 1)``), and its inner all-reduce
is not counted.

A collective inside a ``conditional``'s branch runs only when that branch is taken (the dropless
expert exchange's overflow rounds, taken only under skewed routing): those are counted apart
(``*_if_taken``), so ``count``/``bytes`` are what every step runs and the sum of both is the worst case.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from indicfm.launch.hlo_graph import INSTRUCTION, CallGraph, array_bytes, call_graph, run_counts

__all__ = ["COLLECTIVES", "CollectiveStats", "collective_stats", "hlo_size", "HLO_INSTRUCTION"]

#: Result kinds reported, in the order they are printed; ``*-start`` async forms count as their op.
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")

_GROUP_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUP_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_GROUP_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_GROUP_ALL = re.compile(r"replica_groups=\{\}")


#: a line that defines a value (``%x = ...`` or ``ROOT %x = ...``): one HLO instruction
HLO_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+\s*=\s*\S", re.MULTILINE)


def hlo_size(hlo_text: str) -> tuple[int, int]:
    """``(characters, instructions)`` of an HLO module's text: the program's size, which grows with
    depth when layers are unrolled and stays one block's with ``model.scan_layers``."""
    return len(hlo_text), len(HLO_INSTRUCTION.findall(hlo_text))


@dataclass
class CollectiveStats:
    """Per-step count and bytes received on one device, per collective kind."""

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


def group_size(line: str, num_partitions: int | None = None) -> int | None:
    """Devices in each replica group of a collective instruction, in any of XLA's spellings:
    ``{{0,1,2,3},...}``, ``[G,S]<=[N]`` (iota: G groups of S), ``mesh['a'=4,'b'=2] {'a'}`` (the
    named axes' product) or ``{}`` (every device of the program)."""
    found = _GROUP_LIST.search(line)
    if found:
        return len([d for d in found.group(1).split(",") if d])
    found = _GROUP_IOTA.search(line)
    if found:
        return int(found.group(1))
    found = _GROUP_MESH.search(line)
    if found:
        axes = dict(re.findall(r"'([^']+)'=(\d+)", found.group(1)))
        size = 1
        for name in re.findall(r"'([^']+)'", found.group(2)):
            size *= int(axes.get(name, 1))
        return size
    if _GROUP_ALL.search(line):
        return num_partitions
    return None


def _result_bytes(op: str, shape_text: str) -> float:
    """The size of what one collective delivers on a device (its result; for an async start, the
    result part of its tuple)."""
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


def _local_collectives(graph: CallGraph) -> dict[str, list[tuple[str, float]]]:
    """Each computation's own collectives as ``(kind, bytes received per run)``, with every
    all-reduce-scatter fusion's computation holding one reduce-scatter instead of its all-reduce."""
    local: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for name, computation in graph.computations.items():
        for line in computation.lines:
            instruction = INSTRUCTION.match(line)
            kind = _kind(instruction["op"]) if instruction else None
            if not kind:
                continue
            nbytes = _result_bytes(instruction["op"], instruction["shape"])
            if kind == "reduce-scatter":
                # a ring reduce-scatter: each chip receives the other n - 1 partial shards; where the
                # group cannot be read, the shard alone (a lower bound)
                n = group_size(line, graph.num_partitions)
                nbytes *= max(1, (n or 2) - 1)
            local[name].append((kind, nbytes))
    for name, kind in graph.fusion_kind.items():
        if kind != "kCustom" or name not in graph.computations:
            continue
        reduced = sum(b for k, b in local.get(name, ()) if k == "all-reduce")
        shard = sum(array_bytes(graph.computations[name].result))
        if 0 < shard < reduced:  # all-reduces the whole operand, returns this chip's shard of it
            rest = [(k, b) for k, b in local[name] if k != "all-reduce"]
            local[name] = [*rest, ("reduce-scatter", reduced - shard)]
    return local


def collective_stats(hlo: str | CallGraph) -> CollectiveStats:
    """Count the collectives one step runs (loop bodies weighted by their trip counts); ``hlo`` is
    the module's text or its already parsed :func:`~indicfm.launch.hlo_graph.call_graph`."""
    graph = hlo if isinstance(hlo, CallGraph) else call_graph(hlo)
    stats = CollectiveStats(unknown_trip_counts=graph.unknown_trip_counts)
    local = _local_collectives(graph)
    every, taken = run_counts(graph)
    for runs, count, nbytes_of in ((every, stats.count, stats.bytes), (taken, stats.count_if_taken, stats.bytes_if_taken)):
        for name, times in runs.items():
            for kind, nbytes in local.get(name, ()):
                count[kind] += times
                nbytes_of[kind] += times * nbytes
    return stats
