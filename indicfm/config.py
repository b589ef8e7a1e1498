"""The one config schema of indicfm, YAML loading and ``--set`` overrides.

Each section is a pydantic model defined next to the code that uses it (``indicfm.tokenizer.config``,
``indicfm.data.config``, ``indicfm.model.config``, ``indicfm.train.config``); this module composes
them into :class:`Config`, the single source of truth.  YAML files only set values: every key they
name must exist in the schema, and a wrong key or type is a :class:`ConfigError` that names the
dotted key and suggests the nearest valid one.

A YAML file may start with ``include: [other.yaml, ...]`` (paths relative to the file); included
files are merged first, in order, then the file's own values, then ``--set`` overrides.

A config is named by its path, or by the name of one shipped with indicfm (``model/moe-8b``, see
:func:`find_config_file`), so the shipped configs work from any directory and from a wheel.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from indicfm.data.config import DataConfig
from indicfm.config_base import Section
from indicfm.model.config import ModelConfig
from indicfm.package_data import CONFIG_DIR, shipped_config_names, shipped_path  # noqa: F401 - CONFIG_DIR re-exported
from indicfm.train.config import CheckpointConfig, EvalConfig, LoggingConfig, OptimizerConfig, TrainerConfig
from indicfm.tokenizer.config import TokenizerConfig


class ConfigError(ValueError):
    """A config problem a user can fix; the CLI prints it without a traceback and exits 2."""


class MeshConfig(Section):
    """Device mesh (see ``indicfm.sharding``): sizes of the named axes; exactly one may be -1 meaning
    "all remaining devices".  data x fsdp x expert x tensor must equal the device count."""

    data: int = Field(-1, ge=-1, description="pure data parallelism (replicated weights)")
    fsdp: int = Field(1, ge=-1, description="data parallelism with weights sharded (ZeRO-3 style)")
    expert: int = Field(1, ge=-1, description="expert parallelism: experts split over this axis, tokens all-to-all")
    tensor: int = Field(1, ge=-1, description="tensor parallelism: heads and MLP hidden split")
    shard_weights_over_data: bool = Field(
        False, description="also shard weights over the data axis (FSDP over data x fsdp)"
    )


class Config(BaseModel):
    """Everything a run needs. Sections are documented in their own modules."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(map(str, seen + (path,)))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        inc_path = Path(inc)
        if not inc_path.is_absolute():
            inc_path = path.parent / inc_path
        merged = _deep_merge(merged, _read_yaml(inc_path, seen + (path,)))
    return _deep_merge(merged, data)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set trainer.steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _fields_at(path: Iterable[str | int]) -> list[str]:
    """Names of the schema fields at a dotted location (for 'did you mean' suggestions)."""
    model: Any = Config
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _explain(err: ValidationError, path: str | Path | None, override_keys: set[str]) -> ConfigError:
    """One line per problem, each naming the dotted key and where it was set (file or ``--set``)."""
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc)
        from_set = any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in override_keys)
        source = "--set" if from_set or not path else str(path)
        if item["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=1)
            hint = f"; did you mean '{'.'.join(loc[:-1] + close)}'?" if close else ""
            where = ".".join(loc[:-1]) or "the top level"
            lines.append(f"{source}: unknown config key '{key}'{hint} (valid keys in {where}: {', '.join(valid)})")
        else:
            lines.append(f"{source}: config key '{key}': {item['msg']} (got {item.get('input')!r})")
    return ConfigError("\n".join(lines))


def find_config_file(name: str | Path) -> Path:
    """The YAML file ``name`` means: a path that exists, else a config shipped with indicfm.

    A shipped config may be named ``model/moe-8b``, ``model/moe-8b.yaml`` or
    ``configs/model/moe-8b.yaml`` (the path in the repository, so README commands work anywhere).
    """
    path = Path(name).expanduser()
    if path.is_file() or path.is_absolute():
        return path
    relative = path if path.parts[:1] == ("configs",) else Path("configs", path)
    for candidate in (relative, relative.with_name(relative.name + ".yaml")):
        found = shipped_path(candidate)
        if found is not None and found.is_file():
            return found
    raise ConfigError(
        f"config file not found: {path} (it is neither a file nor the name of a shipped config; "
        f"shipped: {', '.join(shipped_config_names())})"
    )


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Build the run's :class:`Config` from defaults, an optional YAML file (a path or a shipped
    config's name, see :func:`find_config_file`) and ``--set`` overrides."""
    if path:
        path = find_config_file(path)
    data = _read_yaml(path) if path else {}
    override_keys: set[str] = set()
    for item in overrides:
        keys, value = _parse_override(item)
        override_keys.add(".".join(keys))
        cursor = data
        for k in keys[:-1]:
            nxt = cursor.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                cursor[k] = nxt
            cursor = nxt
        cursor[keys[-1]] = value
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _explain(err, path, override_keys) from None


def save_config(config: Config, path: str | Path) -> None:
    """Write the fully resolved config (every value, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
