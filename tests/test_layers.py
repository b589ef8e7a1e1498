"""The order of indicfm's layers (the import-linter contracts in pyproject.toml) holds, and the check
can fail: an import that breaks a contract, planted in each folder the repository maps into the
package (data_pipeline/ -> indicfm.data, tokenizer/ -> indicfm.tokenizer, launch/ -> indicfm.launch),
is caught.  A contract tool that did not see those folders would pass without checking them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="the dev extra installs import-linter")

REPO = Path(__file__).resolve().parent.parent
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"


def _lint(project: Path) -> subprocess.CompletedProcess:
    """import-linter on ``project``'s own indicfm package (PYTHONPATH puts it before any install)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(project), COLUMNS="200", NO_COLOR="1")
    return subprocess.run([sys.executable, "-c", LINT], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _copy_code(destination: Path) -> None:
    """The package's code and pyproject.toml, links kept as links (so indicfm/data still points at
    the copy's data_pipeline/)."""
    for name in ("indicfm", "tokenizer", "data_pipeline", "launch", "configs", "samples"):
        shutil.copytree(REPO / name, destination / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.txt", "*.dev"))  # fmt: skip
    shutil.copy2(REPO / "pyproject.toml", destination / "pyproject.toml")


def test_the_repository_keeps_every_contract():
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout and "KEPT" in proc.stdout


PLANTED = [
    # (file in the repository, the module it is installed as, the import added, the contract it breaks)
    ("data_pipeline/cache.py", "indicfm.data.cache", "indicfm.cli.common", "Layers"),
    ("data_pipeline/review/rules.py", "indicfm.data.review.rules", "indicfm.model.layers",
     "Data preparation and the tokenizer know nothing"),
    ("tokenizer/load.py", "indicfm.tokenizer.load", "indicfm.train.loop", "Layers"),
    ("launch/hlo_stats.py", "indicfm.launch.hlo_stats", "indicfm.cli", "Layers"),
    ("indicfm/model/routing.py", "indicfm.model.routing", "indicfm.data.loader", "The model knows nothing"),
]


@pytest.mark.parametrize(("path", "module", "imported", "contract"), PLANTED, ids=[p[0] for p in PLANTED])
def test_a_forbidden_import_in_any_folder_breaks_a_contract(tmp_path, path, module, imported, contract):
    _copy_code(tmp_path)
    planted = tmp_path / path
    planted.write_text(planted.read_text() + f"\nimport {imported}  # planted by tests/test_layers.py\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0, f"import {imported} in {path} went unnoticed:\n{proc.stdout}"
    assert "BROKEN" in proc.stdout and contract in proc.stdout.replace("\n", " "), proc.stdout
    assert f"{module} -> {imported}" in proc.stdout, proc.stdout


def test_a_new_module_outside_every_layer_is_an_error(tmp_path):
    """The layers contract is exhaustive: a new top-level module must be given a place."""
    _copy_code(tmp_path)
    (tmp_path / "indicfm" / "unplaced.py").write_text('"""A module no layer names."""\n')
    proc = _lint(tmp_path)
    assert proc.returncode != 0 and "indicfm.unplaced" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
