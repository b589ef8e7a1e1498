"""Convert parameters between the unrolled and the scanned layout (``model.scan_layers``).

Unrolled: every block is ``blocks[i]``.  Scanned: the dense first blocks stay ``blocks[i]``
(``i < first_dense_layers``) and the MoE blocks are one ``scanned_blocks`` whose arrays carry a
leading layer axis: ``scanned_blocks/<rest>[n]`` is ``blocks[first_dense_layers + n]/<rest>``.

The conversion works on flat paths, so it applies to any state tree that nests a model's state
under some prefix: a model's own state, or a train state ``(model, optimizer)`` whose optimizer
moments mirror the parameters' paths.  Used by the Hugging Face export (which reads per-layer
weights) and by anyone moving a checkpoint from one layout to the other.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from indicfm.model.config import ModelConfig
from indicfm.model.transformer import SCANNED, UNROLLED, Transformer, param_layout

Path = tuple[Any, ...]


def stack_paths(flat: dict[Path, Any], first_dense_layers: int, num_moe_layers: int) -> dict[Path, Any]:
    """Unrolled -> scanned: ``.../blocks/<i >= first_dense>/rest`` arrays stacked as ``.../scanned_blocks/rest``."""
    out: dict[Path, Any] = {}
    groups: dict[Path, dict[int, Any]] = {}
    for path, value in flat.items():
        at = _blocks_index(path)
        if at is None or path[at + 1] < first_dense_layers:
            out[path] = value
            continue
        target = path[:at] + ("scanned_blocks",) + path[at + 2:]
        groups.setdefault(target, {})[path[at + 1] - first_dense_layers] = value
    for target, layers in groups.items():
        if sorted(layers) != list(range(num_moe_layers)):
            raise ValueError(f"{'/'.join(map(str, target))}: expected MoE layers 0..{num_moe_layers - 1}, "
                             f"found {sorted(layers)}")
        out[target] = jnp.stack([jnp.asarray(layers[n]) for n in range(num_moe_layers)])
    return out


def unstack_paths(flat: dict[Path, Any], first_dense_layers: int) -> dict[Path, Any]:
    """Scanned -> unrolled: ``.../scanned_blocks/rest`` ``[N, ...]`` split into ``.../blocks/<first_dense + n>/rest``."""
    out: dict[Path, Any] = {}
    for path, value in flat.items():
        if "scanned_blocks" not in path:
            out[path] = value
            continue
        at = path.index("scanned_blocks")
        for n in range(value.shape[0]):
            out[path[:at] + ("blocks", first_dense_layers + n) + path[at + 1:]] = value[n]
    return out


def convert_state(state: Any, from_cfg: ModelConfig, target_abstract_state: Any) -> Any:
    """``state`` (of a model built from ``from_cfg``, possibly nested in a larger tree) rearranged
    into the layout of ``target_abstract_state`` (e.g. ``nnx.state(nnx.eval_shape(...))``), whose
    variables supply the metadata (logical axis names)."""
    to_cfg_layout = _layout_of(target_abstract_state)
    arrays = {path: var.get_value() if isinstance(var, nnx.Variable) else var
              for path, var in nnx.to_flat_state(state)}
    if param_layout(from_cfg) != to_cfg_layout:
        if to_cfg_layout == SCANNED:
            arrays = stack_paths(arrays, from_cfg.first_dense_layers, from_cfg.num_moe_layers)
        else:
            arrays = unstack_paths(arrays, from_cfg.first_dense_layers)
    flat_target = list(nnx.to_flat_state(target_abstract_state))
    missing = [path for path, _ in flat_target if path not in arrays]
    if missing or len(flat_target) != len(arrays):
        extra = sorted(set(arrays) - {path for path, _ in flat_target}, key=str)
        raise ValueError(f"layout conversion does not match the target state: missing {missing[:3]}, extra {extra[:3]}")
    converted = []
    for path, var in flat_target:
        value = arrays[path]
        if tuple(value.shape) != tuple(var.get_value().shape):
            raise ValueError(f"{'/'.join(map(str, path))}: shape {tuple(value.shape)} after conversion, "
                             f"the target expects {tuple(var.get_value().shape)}")
        converted.append((path, var.replace(value) if isinstance(var, nnx.Variable) else value))
    return nnx.from_flat_state(converted)


def with_layout(model: Transformer, scan_layers: bool) -> Transformer:
    """The same model (same weights, same router bias) in the layout ``scan_layers`` asks for."""
    cfg = model.cfg.model_copy(update={"scan_layers": scan_layers})
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, convert_state(nnx.state(model), model.cfg, abstract_state))


def placed_with_layout(model: Transformer, scan_layers: bool, mesh: Any, rules: Any = None) -> Transformer:
    """:func:`with_layout`, then every array placed as the one rules table says on ``mesh``:
    stacking or splitting layers makes new arrays, which must not keep whatever layout jnp.stack gave.
    A model already in that layout is returned as it is."""
    if (model.scanned_blocks is not None) == (scan_layers and model.cfg.num_moe_layers > 0):
        return model
    import jax

    from indicfm.sharding import state_shardings

    graphdef, state = nnx.split(with_layout(model, scan_layers))
    return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))


def _blocks_index(path: Path) -> int | None:
    """Position of ``"blocks"`` in a path when an integer layer index follows it."""
    for at in range(len(path) - 1):
        if path[at] == "blocks" and isinstance(path[at + 1], int):
            return at
    return None


def _layout_of(state: Any) -> str:
    return SCANNED if any("scanned_blocks" in path for path, _ in nnx.to_flat_state(state)) else UNROLLED
