"""Device mesh and the ONE table of sharding rules (a leaf module: it imports no model code).

Layers name the axes of their parameters and key activations with *logical* names (``embed``,
``heads``, ``mlp``, ``experts``, ``batch``, ...).  :data:`LOGICAL_AXIS_RULES` maps each logical name
to mesh axes of the 4-axis mesh ``(data, fsdp, expert, tensor)``.  Changing the parallelism plan
means editing that table, not the layers.

What lives here: the table, :func:`logical_to_spec` / :func:`constrain` (used by the layers),
:func:`state_shardings` / :func:`batch_sharding` (jit and Orbax targets), the mesh
(:func:`resolve_mesh_sizes`, shared with the planner, and :func:`make_mesh`), and the table read
as arithmetic for the planner (:func:`batch_shards`, :func:`weight_shards`: how many ways the batch
and FSDP-sharded weights are split), so a plan follows the table as training does.  Building a
sharded model and the train state from them is ``indicfm.train.state`` (``create_model``,
``init_train_state``, ``abstract_train_state``); the jitted step is ``indicfm.train.step``.

Flax's own ``nnx.get_partition_spec`` would return the *logical* names; use :func:`state_shardings`
instead.

Rules that cannot apply to a given array (the dimension does not divide the product of the mesh
axes, or a mesh axis is already used by an earlier dimension) fall back to replication on that
dimension, so e.g. 2 KV heads on a 4-way tensor axis are replicated rather than failing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:
    from indicfm.config import MeshConfig

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")

# Logical axis name -> mesh axis (str), several mesh axes (tuple), or None (replicated).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp", "expert"),  # every data-like axis: expert-parallel devices see different tokens
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",  # FSDP: the d_model dimension of every weight is split over `fsdp`
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "norm": None,
    "layers": None,  # the stacked axis of scanned blocks (model.scan_layers): each device holds every layer
}

Rules = Mapping[str, "str | tuple[str, ...] | None"]


def logical_axis_rules(shard_weights_over_data: bool = False) -> dict[str, Any]:
    """The rules table, optionally also sharding weights over ``data`` (ZeRO-3 over every data-like axis)."""
    rules = dict(LOGICAL_AXIS_RULES)
    if shard_weights_over_data:
        rules["embed"] = ("data", "fsdp")
    return rules


def rule_axes(logical: str, rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes the rules table splits the logical axis ``logical`` over, in order (empty:
    replicated).  Unknown names are an error: a typo would silently replicate."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    if logical not in rules:
        raise KeyError(f"logical axis {logical!r} has no rule in indicfm.sharding.LOGICAL_AXIS_RULES")
    target = rules[logical]
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def batch_axes(rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes the batch is split over: the ``batch`` rule (every data-like axis)."""
    return rule_axes("batch", rules)


def batch_shards(sizes: Mapping[str, int], rules: Rules | None = None) -> int:
    """Into how many parts the batch is split on a mesh of ``sizes`` (axis name -> size): the product
    of the sizes of the :func:`batch_axes`.  Pure arithmetic, for the planner's per-device rows."""
    return math.prod(sizes[axis] for axis in batch_axes(rules))


def weight_axes(rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes FSDP splits weights over: the ``embed`` rule (the ``d_model`` dimension every
    weight has), ``fsdp`` and, with ``mesh.shard_weights_over_data``, also ``data``."""
    return rule_axes("embed", rules)


def weight_shards(sizes: Mapping[str, int], rules: Rules | None = None) -> int:
    """Into how many parts FSDP splits every weight on a mesh of ``sizes``: the product of the sizes
    of the :func:`weight_axes`, which is also how many devices an all-gather of a weight spans."""
    return math.prod(sizes[axis] for axis in weight_axes(rules))


def resolve_mesh_sizes(mesh_cfg: "MeshConfig", num_devices: int) -> dict[str, int]:
    """Sizes of the ``(data, fsdp, expert, tensor)`` axes on ``num_devices`` devices; one size may be
    -1 for "all remaining devices".  Pure arithmetic, so the planner uses it for hardware it does not
    have; a mesh that cannot fit raises ``ValueError`` naming the ``mesh.*`` keys."""
    sizes = {name: int(getattr(mesh_cfg, name)) for name in MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    bad = [name for name, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise ValueError(f"mesh.{bad[0]} = {sizes[bad[0]]}: sizes must be positive or -1")
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + n for n in free)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes "
                f"({' x '.join(f'{n}={s}' for n, s in sizes.items() if s != -1)} = {fixed}) to fill mesh.{free[0]}=-1"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh: data x fsdp x expert x tensor = {fixed} but there are {num_devices} devices; "
            "set one axis to -1 or make the product equal the device count"
        )
    return sizes


def make_mesh(mesh_cfg: "MeshConfig", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the ``(data, fsdp, expert, tensor)`` mesh with :func:`resolve_mesh_sizes`.

    Works for any device count, multi-host included (``jax.devices()`` lists every host's devices
    once ``jax.distributed.initialize`` has run).  Axis types are ``Auto`` so the compiler propagates
    shardings from the constraints the layers place.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_sizes(mesh_cfg, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    # jax.make_mesh orders devices by physical topology (ICI/NVLink neighbours) where it knows it.
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # A TPU torus whose sides do not multiply into the axes (fsdp=8 x expert=8 on a v5p-128's
        # 4x4x4): an axis then spans parts of two physical axes, still neighbours on the torus.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None,
    mesh: Mesh | jax.sharding.AbstractMesh,
    rules: Rules | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry logical ``names``.

    A dimension is only split over mesh axes whose product divides it; a mesh axis is used at most
    once per array.  Unknown logical names are an error (a typo would silently replicate).
    """
    if not names:
        return PartitionSpec()
    axis_sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        axes = tuple(a for a in rule_axes(name, rules) if a in axis_sizes and axis_sizes[a] > 1 and a not in used)
        if shape is not None:
            # drop axes from the end until the product divides the dimension
            while axes and shape[dim] % math.prod(axis_sizes[a] for a in axes):
                axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def named_sharding(
    names: Sequence[str | None] | None, shape: Sequence[int] | None, mesh: Mesh, rules: Rules | None = None
) -> NamedSharding:
    """``NamedSharding`` for an array with logical axis ``names`` (see :func:`logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by ``jax.set_mesh`` (None when running without one, e.g. single-device tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not mesh.axis_names:
        return None
    return mesh


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op without a mesh."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def _var_names(var: nnx.Variable) -> tuple | None:
    return var.get_metadata().get("out_sharding")


def state_shardings(model_or_state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedSharding tree for a model, an ``nnx.State`` (params, optimizer state) or an abstract state.

    Each ``nnx.Variable`` is mapped through its ``out_sharding`` logical names (optimizer-state
    variables created by ``nnx.Optimizer`` inherit them from their parameter); arrays without
    metadata are replicated.  Use it for ``jax.jit`` in/out shardings and Orbax restore targets.
    """
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state

    def one(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            shape = getattr(value, "shape", None)
            return leaf.replace(named_sharding(_var_names(leaf), shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """Sharding of ``[B, L]`` token/segment/position batches: B split over every data-like axis."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), None, mesh, rules))
