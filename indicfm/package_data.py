"""Where the files indicfm ships next to its code are: ``configs/`` and the quickstart sample ``samples/``.

In the repository they are top-level folders; ``indicfm/configs`` and ``indicfm/samples`` are
symbolic links to them, which is how setuptools packs them into a wheel as package data of
``indicfm`` (see ``[tool.setuptools.package-data]`` in pyproject.toml).  Both layouts are found the
same way, through :mod:`importlib.resources`, so a source checkout, an editable install and a wheel
in ``site-packages`` all work, from any current directory.

A relative path such as ``samples/train`` or ``configs/model/moe-8b.yaml`` (what the shipped configs,
the README and ``--help`` name) means the current directory's file if there is one, else the shipped
one: :func:`resolve_path`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED_FOLDERS = ("configs", "samples")


def _shipped_dir(name: str) -> Path:
    folder = Path(str(resources.files("indicfm").joinpath(name)))
    if not folder.is_dir():
        # A checkout whose git wrote the link as a plain file (Windows without symlink support).
        folder = Path(__file__).resolve().parent.parent / name
    return folder.resolve()


CONFIG_DIR = _shipped_dir("configs")
SAMPLES_DIR = _shipped_dir("samples")


def shipped_path(path: str | Path) -> Path | None:
    """The shipped file or folder a relative ``configs/...`` or ``samples/...`` path names, if it exists."""
    parts = Path(path).parts
    if not parts or parts[0] not in SHIPPED_FOLDERS:
        return None
    root = CONFIG_DIR if parts[0] == "configs" else SAMPLES_DIR
    found = root.joinpath(*parts[1:])
    return found if found.exists() else None


def shipped_config_names() -> list[str]:
    """Names ``--config`` accepts for the shipped run configs, e.g. ``model/moe-8b`` (not the hardware table)."""
    return sorted(
        p.relative_to(CONFIG_DIR).with_suffix("").as_posix()
        for p in CONFIG_DIR.rglob("*.yaml")
        if p.name != "hardware.yaml"
    )


def resolve_path(path: str | Path) -> Path | str:
    """A path as given if it exists (or is absolute), else the shipped ``samples/...`` or ``configs/...`` it names.

    A URL (``gs://...``) is returned as given: it names neither a local nor a shipped file, and
    ``Path`` would collapse its ``//``."""
    from indicfm.storage import is_url

    if is_url(path):
        return str(path)
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    shipped = shipped_path(path)
    return shipped if shipped is not None else path.resolve()
