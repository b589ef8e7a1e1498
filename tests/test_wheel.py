"""indicfm as a wheel: built from the source tree, installed into a fresh virtual environment and run
from a directory outside the repository, so nothing can lean on files next to the source.

The venv reuses the dependencies this interpreter already has (a ``.pth`` file naming its
site-packages folders, not ``--system-site-packages``: run from inside a virtual environment, that
would reach the base interpreter's packages, not the environment's) and the wheel is built and
installed offline (``--no-build-isolation``, ``--no-index``, ``--no-deps``): the test needs no
network and takes seconds, not the minutes a full dependency install would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IGNORED_IN_COPY = shutil.ignore_patterns(".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache")
POD_SETTINGS = ["--set", "trainer.global_batch_size=256"]  # splits over v5p-128's 64 devices


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH (it would import the checkout instead of the installed wheel)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", COLUMNS="80", NO_COLOR="1")
    return env


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _copy_source(destination: Path) -> None:
    """What a clean checkout has (git's tracked and untracked-but-not-ignored files), links kept as links.

    Building from a copy keeps the build's ``build/`` and ``*.egg-info`` out of the repository and
    stale files of an earlier build out of the wheel.
    """
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        capture_output=True, text=True,
    )  # fmt: skip
    if listed.returncode != 0:  # not a git checkout (an unpacked sdist): copy the tree
        shutil.copytree(REPO, destination, symlinks=True, ignore=IGNORED_IN_COPY)
        return
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if not (source.exists() or source.is_symlink()):
            continue  # deleted in the working tree
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


@pytest.fixture(scope="module")
def wheel_file(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel", reason="building the wheel offline needs the 'wheel' package (the dev extra has it)")
    root = tmp_path_factory.mktemp("wheel")
    _copy_source(root / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(root / "dist"), str(root / "src")], cwd=root)  # fmt: skip
    (wheel,) = (root / "dist").glob("indicfm-*.whl")
    return wheel


@pytest.fixture(scope="module")
def venv(wheel_file, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin/ (Scripts\\ on Windows) folder."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(root / "venv")], cwd=root)
    bin_dir = root / "venv" / ("Scripts" if os.name == "nt" else "bin")
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel_file)], cwd=root)
    # Then the dependencies: the site-packages folders this interpreter imports from (a virtual
    # environment's own and, if it was made with --system-site-packages, the base's).  A path in a
    # .pth file goes on sys.path after the venv's own site-packages, and .pth files inside it are
    # not run, so an editable install of indicfm there cannot shadow the wheel.
    purelib = _run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   cwd=root).stdout.strip()  # fmt: skip
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(purelib) / "indicfm_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return bin_dir


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A working directory with no configs/ or samples/ in it or above it."""
    assert not tmp_path.is_relative_to(REPO)
    return tmp_path


def test_wheel_ships_every_config_and_the_quickstart_sample(wheel_file):
    shipped = {
        f"indicfm/{p.relative_to(REPO).as_posix()}": p
        for folder in ("configs", "samples/train", "samples/heldout")
        for p in (REPO / folder).rglob("*")
        if p.is_file()
    }
    shipped["indicfm/samples/README.md"] = REPO / "samples" / "README.md"  # the sample's licences
    with zipfile.ZipFile(wheel_file) as whl:
        names = set(whl.namelist())
        missing = sorted(set(shipped) - names)
        assert not missing, f"not in the wheel: {missing}"
        for name, source in shipped.items():
            assert whl.read(name) == source.read_bytes(), f"{name} differs from {source}"
    assert not any(n.startswith(("configs/", "samples/")) for n in names), "data must live inside the indicfm package"
    assert "indicfm/samples/build_sample.py" not in names  # a maintainer's script, not package code
    assert "indicfm/package_data.py" in names and "indicfm/cli/__init__.py" in names


def test_wheel_owns_one_top_level_name(wheel_file):
    """Installed, indicfm puts only ``indicfm`` into site-packages (plus its own .dist-info): the
    repository's tokenizer/, data_pipeline/ and launch/ are inside it, benchmarks/ is not shipped."""
    with zipfile.ZipFile(wheel_file) as whl:
        names = whl.namelist()
        top_level = {n.split("/", 1)[0] for n in names}
        (dist_info,) = [t for t in top_level if t.endswith(".dist-info")]
        declared = whl.read(f"{dist_info}/top_level.txt").decode().split() if f"{dist_info}/top_level.txt" in names else []
    assert top_level - {dist_info} == {"indicfm"}, sorted(top_level)
    assert declared in ([], ["indicfm"]), declared
    for folder, package in (("tokenizer", "tokenizer"), ("data_pipeline", "data"), ("launch", "launch")):
        code = sorted(p.relative_to(REPO / folder).as_posix() for p in (REPO / folder).rglob("*.py"))
        shipped = sorted(n.removeprefix(f"indicfm/{package}/") for n in names
                         if n.startswith(f"indicfm/{package}/") and n.endswith(".py"))  # fmt: skip
        assert shipped == code, (folder, sorted(set(code) ^ set(shipped)))
    assert "indicfm/data/review/page.html" in names  # served by `data review`, read as package data
    assert not any("benchmarks" in n.split("/") for n in names)


FIND_QUICKSTART_FILES = """
import json
import indicfm.package_data as p
from indicfm.config import load_config
from indicfm.train.inputs import resolve_path
from indicfm.train.quickstart import QUICKSTART_CONFIG
cfg = load_config(QUICKSTART_CONFIG)
print(json.dumps({"module": p.__file__, "configs": str(p.CONFIG_DIR),
                  "inputs": [str(resolve_path(i)) for i in cfg.data.inputs],
                  "heldout": str(resolve_path(cfg.eval.heldout_dir))}))
"""


def test_installed_wheel_uses_its_own_files_not_the_checkouts(venv, outside):
    """Fast stand-in for the quickstart test (slow): the quickstart finds its sample in the wheel."""
    found = json.loads(_run([str(venv / "python"), "-c", FIND_QUICKSTART_FILES], cwd=outside).stdout)
    venv_root = venv.parent.resolve()
    for path in [found["module"], found["configs"], found["heldout"], *found["inputs"]]:
        assert Path(path).resolve().is_relative_to(venv_root), found
    (inputs,) = found["inputs"]
    for folder, shipped in (("train", inputs), ("heldout", found["heldout"])):
        expected = sorted(p.name for p in (REPO / "samples" / folder).iterdir())
        assert sorted(p.name for p in Path(shipped).iterdir()) == expected


def test_installed_wheel_plans_a_shipped_pod_config_from_outside_the_repo(venv, outside):
    from indicfm.config import CONFIG_DIR, load_config
    from indicfm.launch.plan import make_plan

    proc = _run([str(venv / "indicfm"), "plan", "--config", "model/moe-8b", "--hardware", "v5p-128", *POD_SETTINGS,
                 "--json"], cwd=outside)  # fmt: skip
    # Reference: the same plan computed here from the checkout's own YAML file and hardware table.
    expected = make_plan(load_config(CONFIG_DIR / "model" / "moe-8b.yaml", POD_SETTINGS[1::2]), "v5p-128")
    assert json.loads(proc.stdout) == json.loads(json.dumps(expected.to_dict()))


LIST_EXTRAS = """
import json
from indicfm.extras import package_extras
print(json.dumps({e.name: list(e.requirements) for e in package_extras()}))
"""


def test_installed_wheel_lists_its_extras_from_its_metadata(venv, outside):
    from packaging.requirements import Requirement

    # Reference: pyproject.toml itself, read with tomllib (the wheel's metadata was written from it).
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    listed = json.loads(_run([str(venv / "python"), "-c", LIST_EXTRAS], cwd=outside).stdout)
    assert sorted(listed) == sorted(declared)
    for name, requirements in declared.items():
        assert sorted(map(str, map(Requirement, listed[name]))) == sorted(map(str, map(Requirement, requirements)))
    version = _run([str(venv / "indicfm"), "--version"], cwd=outside).stdout
    assert version.startswith("indicfm 0.1.0\n")
    assert str(venv.parent.resolve()) in version  # the wheel's copy, not the checkout
    shown = _run([str(venv / "indicfm"), "--help"], cwd=outside).stdout
    for name in declared:
        assert f"\n  {name} " in version and f"• {name}:" in shown, name


def test_installed_wheel_launches_tpu_with_itself_as_the_package(venv, outside, wheel_file):
    """A wheel install has no source tree: `launch tpu` needs --package, and ships that wheel."""
    launch = [str(venv / "indicfm"), "launch", "tpu", "--config", "model/moe-8b", *POD_SETTINGS, "--tpu-type",
              "v5p-128", "--zone", "us-east5-a", "--project", "proj", "--bucket", "gs://bkt/runs", "--dry-run"]  # fmt: skip
    refused = subprocess.run(launch, cwd=outside, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pass --package" in refused.stderr, refused.stderr
    printed = _run([*launch, "--package", str(wheel_file)], cwd=outside).stdout.splitlines()
    assert not any(line.startswith("git ") for line in printed)  # nothing to pack: the wheel is the code
    assert any(line.startswith("gcloud compute tpus tpu-vm scp") and str(wheel_file) in line for line in printed)
    (install,) = [line for line in printed if "pip install" in line and wheel_file.name in line]
    assert f'$HOME/indicfm/{wheel_file.name}[tpu]' in install and "indicfm --version" in install
    # pip takes that form (a wheel file with an extra), resolving the tpu extra of indicfm.
    report = _run([str(venv / "python"), "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                   "--ignore-installed", "-q", "--report", "-", f"{wheel_file}[tpu]"], cwd=outside)  # fmt: skip
    ((name, extras),) = [(i["metadata"]["name"], i.get("requested_extras")) for i in json.loads(report.stdout)["install"]]
    assert (name, extras) == ("indicfm", ["tpu"])


@pytest.mark.slow  # trains a tokenizer, builds the token cache and trains: too long for the fast run
def test_installed_wheel_runs_a_short_quickstart_from_outside_the_repo(venv, outside):
    proc = _run([str(venv / "indicfm"), "quickstart", "--workdir", "qs", "--set", "trainer.steps=10"], cwd=outside,
                timeout=600)  # fmt: skip
    workdir = outside / "qs"
    steps = [json.loads(line).get("step") for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 10
    assert (workdir / "tokenizer" / "tokenizer.model").is_file() and (workdir / "data" / "metadata.json").is_file()
    log = proc.stdout + proc.stderr
    # Every held-out language of the shipped sample is in the bits-per-byte table, its code whole,
    # though the output is a log file (80 columns).
    for dev_file in sorted((REPO / "samples" / "heldout").glob("*.dev")):
        assert f" {dev_file.stem} " in log, f"{dev_file.stem} missing or cut in:\n{log[-3000:]}"
    assert "resumed from step 5" in log
