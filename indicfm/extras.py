"""indicfm's optional extras (``pip install "indicfm[gpu]"``), and which of them this environment has.

pip prints nothing about extras after an install, so ``indicfm --help`` lists them and
``indicfm --version`` says which are installed.  The extras and what each requires are read from
the installed package's metadata (``Provides-Extra`` / ``Requires-Dist``, written from
pyproject.toml's ``[project.optional-dependencies]``), so the list cannot drift from what pip
installs.  Metadata cannot say what an extra is *for*; :data:`EXTRA_USES` does, one line each
(tests/test_extras.py fails when pyproject.toml gains an extra without one).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

DISTRIBUTION = "indicfm"

#: Why a user would install each extra, and the commands that need it.
EXTRA_USES: dict[str, str] = {
    "gpu": "JAX for CUDA 12, for `indicfm train` and `indicfm launch gpu` on NVIDIA GPUs",
    "tpu": "JAX with libtpu, for `indicfm train` on Cloud TPU VMs (`indicfm launch tpu` installs it on "
    "every worker)",
    "tpu-compile": "libtpu (XLA's TPU compiler only), for `indicfm plan --compile` on any Linux machine, "
    "no TPU needed",
    "export": "torch and transformers, to load what `indicfm export hf` wrote with AutoModelForCausalLM "
    "(the export itself needs neither)",
    "ray": "Ray, for `indicfm data prepare --engine ray` on a Ray cluster",
    "gcs": "gcsfs and universal-pathlib, for gs:// inputs, tokenizers and token caches in `indicfm data prepare`",
    "eval": "lm-evaluation-harness (no torch), for `indicfm eval` and downstream tasks during `indicfm train`",
    "dev": "pytest and the wheel build, for the test suite (`pytest -m \"not slow\" -n 2 -q`)",
}


@dataclass(frozen=True)
class Extra:
    """One extra: the requirements it adds and those this environment does not satisfy."""

    name: str
    requirements: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def installed(self) -> bool:
        return not self.missing

    @property
    def uses(self) -> str | None:
        return EXTRA_USES.get(self.name)

    @property
    def install_command(self) -> str:
        return install_command(self.name)


def install_command(extra: str) -> str:
    """What to run to get an extra (as a wheel; in a checkout: ``pip install -e ".[NAME]"``)."""
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def extra_names(distribution: str = DISTRIBUTION) -> list[str]:
    """The extras the installed package declares, in its metadata's order; none when it is not installed.

    Cheap (one metadata file, no requirement parsing): ``indicfm --help`` calls it on every start.
    """
    try:
        return list(dict.fromkeys(metadata.metadata(distribution).get_all("Provides-Extra") or []))
    except metadata.PackageNotFoundError:
        return []


def _requirements_of(distribution: str, extra: str):
    """The requirements ``distribution[extra]`` adds to the plain install (parsed ``Requires-Dist``)."""
    from packaging.requirements import Requirement

    added = []
    for line in metadata.requires(distribution) or []:
        requirement = Requirement(line)
        marker = requirement.marker
        # Gated on this extra (true with it, false without it), and meant for this Python and OS.
        if marker is not None and marker.evaluate({"extra": extra}) and not marker.evaluate({"extra": ""}):
            added.append(requirement)
    return added


def _shown(requirement, extra: str | None = None) -> str:
    """A requirement as pyproject.toml writes it: without the ``extra == ...`` marker pip's metadata
    adds, but with the platform conditions pyproject.toml gave it (``libtpu``: Linux only)."""
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    url = f" @ {requirement.url}" if requirement.url else ""
    condition = ""
    if extra is not None and requirement.marker is not None:
        marker = str(requirement.marker)
        gate = f'extra == "{extra}"'
        if marker != gate and marker.endswith(f" and {gate}"):
            condition = f"; {_without_enclosing_parentheses(marker[: -len(f' and {gate}')])}"
    return f"{requirement.name}{extras}{requirement.specifier}{url}{condition}"


def _without_enclosing_parentheses(text: str) -> str:
    """``(a and (b or c))`` -> ``a and (b or c)``; ``(a) or (b)`` stays (its parentheses do not
    enclose the whole).  The metadata writer wraps the original marker before adding the extra's."""
    if not (text.startswith("(") and text.endswith(")")):
        return text
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and i < len(text) - 1:
            return text
    return text[1:-1]


def _unsatisfied(requirement, seen: set[tuple[str, str]]) -> list[str]:
    """Why ``requirement`` is not met here ([] when it is), following its own extras (``jax[cuda12]``)."""
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return [f"{requirement.name} (not installed)"]
    if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        return [f"{_shown(requirement)} (have {version})"]
    missing = []
    for extra in sorted(requirement.extras):
        if (requirement.name, extra) in seen:
            continue
        seen.add((requirement.name, extra))
        for inner in _requirements_of(requirement.name, extra):
            missing.extend(_unsatisfied(inner, seen))
    return missing


def package_extras(distribution: str = DISTRIBUTION) -> list[Extra]:
    """Every extra of the installed package with its requirements and what is missing for it here."""
    from packaging.requirements import Requirement

    try:
        lines = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return []
    parsed = [Requirement(line) for line in lines]
    extras = []
    for name in extra_names(distribution):
        # Every requirement listed for the extra, whatever this machine's Python or OS ...
        listed = [r for r in parsed if r.marker is not None and f'extra == "{name}"' in str(r.marker)]
        seen: set[tuple[str, str]] = set()
        # ... but only those meant for this machine count as missing.
        missing = [m for r in _requirements_of(distribution, name) for m in _unsatisfied(r, seen)]
        extras.append(Extra(name, tuple(_shown(r, name) for r in listed), tuple(dict.fromkeys(missing))))
    return extras


def help_epilog(distribution: str = DISTRIBUTION) -> str | None:
    """The extras paragraph of ``indicfm --help``: one line per extra, what it is for."""
    names = extra_names(distribution)
    if not names:
        return None
    lines = [f"Optional extras, {install_command('NAME')} (in a checkout: pip install -e \".[NAME]\"); "
             "`indicfm --version` shows which are installed:"]  # fmt: skip
    lines += [f"• {name}: {EXTRA_USES.get(name, 'see pyproject.toml')}" for name in names]
    return "\n\n".join(lines)


def version_report(distribution: str = DISTRIBUTION) -> str:
    """What ``indicfm --version`` prints: versions, where indicfm is installed, and each extra's state."""
    import platform
    from pathlib import Path

    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        version = "(not installed: running from a source tree on PYTHONPATH)"
    import indicfm

    where = Path(indicfm.__file__).parent
    versions = ", ".join(f"{name} {_version_or_dash(name)}" for name in ("jax", "jaxlib", "flax"))
    lines = [f"{distribution} {version}", f"  at {where}", f"  python {platform.python_version()}, {versions}"]
    extras = package_extras(distribution)
    if not extras:
        return "\n".join(lines)
    lines += ["", f"Extras ({install_command('NAME')}):"]
    width = max(len(e.name) for e in extras)
    indent = " " * (width + 4)
    for extra in extras:
        state = "installed" if extra.installed else "not installed"
        lines += _wrapped([f"  {extra.name:<{width}}  {state}:", *_listed(extra.requirements or ("(nothing)",))], indent)
        first, *rest = (extra.uses or "(see pyproject.toml)").split()
        lines += _wrapped([indent + first, *rest], indent)
        if extra.missing:
            *listed, last = _listed(extra.missing)
            lines += _wrapped([f"{indent}missing", *listed, f"{last};", "to install:", extra.install_command], indent)
    return "\n".join(lines)


def _listed(items) -> list[str]:
    """``a, b, c`` as units that :func:`_wrapped` never splits."""
    items = list(items)
    return [f"{item}," for item in items[:-1]] + items[-1:]


def _wrapped(units: list[str], indent: str, width: int = 80) -> list[str]:
    """The units joined by spaces into lines of at most ``width`` (a unit longer than a line keeps its own),
    the lines after the first starting with ``indent``.  A unit, such as ``torch (not installed)``, is
    never split: a log file or an 80-column console shows every requirement whole.
    """
    lines = [units[0]]
    for unit in units[1:]:
        if len(lines[-1]) + 1 + len(unit) <= width:
            lines[-1] += " " + unit
        else:
            lines.append(indent + unit)
    return lines


def _version_or_dash(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "-"
