"""The optional extras: read from package metadata, each explained, and which are installed here.

A fake distribution on ``sys.path`` gives metadata whose answer is known; the real package is checked
against pyproject.toml read with tomllib (tests/test_wheel.py does the same on an installed wheel).
"""

from __future__ import annotations

import functools
import re
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from indicfm.cli import app
from indicfm.extras import EXTRA_USES, extra_names, help_epilog, package_extras, version_report

REPO = Path(__file__).resolve().parent.parent


def _dist(site: Path, name: str, version: str, lines: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    header = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    (info / "METADATA").write_text(header + textwrap.dedent(lines).lstrip())


@pytest.fixture
def fake_site(tmp_path, monkeypatch) -> Path:
    """``fakepkg`` with six extras over ``depa`` 1.5 (itself with an extra), on sys.path."""
    site = tmp_path / "site"
    _dist(site, "fakepkg", "3.2", textwrap.dedent("""
        Provides-Extra: fine
        Provides-Extra: too-old
        Provides-Extra: absent
        Provides-Extra: nested
        Provides-Extra: empty
        Provides-Extra: many
        Requires-Dist: depa>=1
        Requires-Dist: depa>=1.0; extra == "fine"
        Requires-Dist: neverhere; python_version < "3" and extra == "fine"
        Requires-Dist: depa>=2.0; extra == "too-old"
        Requires-Dist: nodep; extra == "absent"
        Requires-Dist: depa[inner]; extra == "nested"
    """) + "".join(f'Requires-Dist: a-long-package-name-{i}>=1.0; extra == "many"\n' for i in range(6)))  # fmt: skip
    _dist(site, "depa", "1.5", """
        Provides-Extra: inner
        Requires-Dist: innerdep>=0.1; extra == "inner"
    """)  # fmt: skip
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    return site


def test_extras_and_what_each_misses_come_from_metadata(fake_site):
    extras = {e.name: e for e in package_extras("fakepkg")}
    assert list(extras) == ["fine", "too-old", "absent", "nested", "empty", "many"]  # metadata order
    # Listed whatever this Python is; a requirement for another Python is not missing here.
    # as pyproject.toml would write them: the extra's gate dropped, a platform/Python condition kept
    assert extras["fine"].requirements == ("depa>=1.0", 'neverhere; python_version < "3"')
    assert extras["fine"].installed and extras["empty"].installed and extras["empty"].requirements == ()
    assert extras["too-old"].missing == ("depa>=2.0 (have 1.5)",)
    assert extras["absent"].missing == ("nodep (not installed)",)
    # depa is installed, but not its `inner` extra's own requirement.
    assert extras["nested"].requirements == ("depa[inner]",)
    assert extras["nested"].missing == ("innerdep (not installed)",)
    assert extras["absent"].install_command == 'pip install "indicfm[absent]"'


def test_version_report_says_what_is_installed_and_how_to_get_the_rest(fake_site):
    report = version_report("fakepkg")
    assert report.splitlines()[0] == "fakepkg 3.2"
    lines = {line.split()[0]: line for line in report.splitlines()[4:] if line.startswith("  ") and line[2] != " "}
    assert lines["fine"].split()[1] == "installed:" and lines["absent"].split()[1:3] == ["not", "installed:"]
    assert "nodep (not installed)" in report and 'pip install "indicfm[absent]"' in report
    assert all(len(line) <= 80 for line in report.splitlines()[3:])  # a log file or an 80-column console
    extras_part = report.split("Extras (", 1)[1].splitlines()[1:]
    indent = " " * (2 + len("too-old") + 2)  # under the descriptions, past the longest extra name
    for line in extras_part:  # an extra's name and state, or one of its lines under the description
        assert re.match(r"  \S", line) or (line.startswith(indent) and line[len(indent)] != " "), line
    for i in range(6):  # wrapped, but never inside a requirement
        assert report.count(f"a-long-package-name-{i}>=1.0") == 1
        assert report.count(f"a-long-package-name-{i} (not installed)") == 1


def test_a_package_that_is_not_installed_has_no_extras():
    assert extra_names("no-such-distribution-xyz") == [] and package_extras("no-such-distribution-xyz") == []
    assert help_epilog("no-such-distribution-xyz") is None
    assert "not installed" in version_report("no-such-distribution-xyz").splitlines()[0]


def test_every_extra_in_pyproject_says_what_it_is_for():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    unexplained = sorted(set(declared) - set(EXTRA_USES))
    assert not unexplained, f"add a line to indicfm.extras.EXTRA_USES for {unexplained}"
    for name in declared:
        assert "`indicfm" in EXTRA_USES[name] or "pytest" in EXTRA_USES[name], name  # names the commands


def test_help_lists_the_extras_and_version_shows_them(fake_site, monkeypatch):
    import indicfm.extras

    # The CLI imports these when it needs them, so it picks up the ones bound to the fake package.
    monkeypatch.setattr(indicfm.extras, "help_epilog", functools.partial(help_epilog, "fakepkg"))
    monkeypatch.setattr(indicfm.extras, "version_report", functools.partial(version_report, "fakepkg"))
    runner = CliRunner()
    shown = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    for name in ["fine", "too-old", "absent", "nested", "empty", "many"]:
        assert f"• {name}:" in shown.output
    assert "indicfm --version" in shown.output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0, version.output
    assert version.output.startswith("fakepkg 3.2\n") and "innerdep (not installed)" in version.output


def test_a_markers_own_parentheses_stay_when_they_do_not_enclose_it():
    from indicfm.extras import _without_enclosing_parentheses

    assert _without_enclosing_parentheses('(a == "1" and (b == "2" or b == "3"))') == 'a == "1" and (b == "2" or b == "3")'
    assert _without_enclosing_parentheses('(a == "1") or (b == "2")') == '(a == "1") or (b == "2")'
    assert _without_enclosing_parentheses('a == "1"') == 'a == "1"'
