"""How a config's layout lands on the devices, for the planner: mesh sizes, rows per device, the rules.

The planner prices hardware it does not have, so it cannot build a mesh; it needs the same answers
training gets from one as plain arithmetic: the axis sizes (``indicfm.sharding.resolve_mesh_sizes``,
the trainer's own function), the rules table the config trains with, and how many rows of a
micro-batch each device holds (the ``batch`` rule of that table). Every other planner module takes
its layout from here, so none of them restates the table; a layout that cannot work is a
:class:`PlanError` naming the config keys to change.
"""

from __future__ import annotations

from typing import Any

from indicfm.sharding import Rules, batch_axes, batch_shards, logical_axis_rules, resolve_mesh_sizes


class PlanError(ValueError):
    """The config cannot be planned on this hardware as given (e.g. a mesh that does not fit the slice)."""


def mesh_sizes(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """Sizes of the (data, fsdp, expert, tensor) axes on ``num_devices`` (-1 fills the rest): the
    trainer's own arithmetic (``indicfm.sharding.resolve_mesh_sizes``), its errors as ``PlanError``."""
    try:
        return resolve_mesh_sizes(mesh_cfg, num_devices)
    except ValueError as err:
        raise PlanError(str(err)) from None


def rules_for(cfg: Any) -> Rules:
    """The logical-axis rules training shards ``cfg`` with (``mesh.shard_weights_over_data`` included)."""
    return logical_axis_rules(cfg.mesh.shard_weights_over_data)


def per_device_batch(cfg: Any, sizes: dict[str, int]) -> int:
    """Rows of one micro-batch on one device: the batch is split over the axes of the ``batch`` rule."""
    rules = rules_for(cfg)
    shards = batch_shards(sizes, rules)
    micro = cfg.trainer.global_batch_size // cfg.trainer.micro_batches
    if micro % shards:
        raise PlanError(
            f"trainer.global_batch_size / trainer.micro_batches = {micro} rows do not split over "
            f"{' x '.join(batch_axes(rules))} = {shards} devices; make the batch a multiple of {shards} "
            f"(e.g. --set trainer.global_batch_size={shards * cfg.trainer.micro_batches * max(1, -(-micro // shards))})"
        )
    return micro // shards
