"""``indicfm launch tpu --package``: the workers install a requirement or a wheel instead of the source
tree.  Specs are checked before any slice is asked for; the install command is run by a real shell
against fake ``python3`` and ``indicfm`` to see what pip would be given on a worker."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from typer.testing import CliRunner

from indicfm.cli import app
from indicfm.config import load_config
from indicfm.launch import tpu
from indicfm.launch.tpu import LaunchError, TpuJob, parse_package
from test_launch_tpu import _calls, _verbs, assert_documented, fake_gcloud  # noqa: F401 - fake_gcloud is a fixture

REPO = Path(__file__).resolve().parent.parent
WHEEL_NAME = "indicfm-0.1.0-py3-none-any.whl"


def _wheel(folder: Path, name: str = WHEEL_NAME, members: tuple[str, ...] = ("indicfm/configs/hardware.yaml",)) -> Path:
    """A zip with a wheel's name and the listed members: what parse_package looks at."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with zipfile.ZipFile(path, "w") as whl:
        for member in members:
            whl.writestr(member, "x: 1\n")
    return path


def _pip_target(package) -> Requirement:
    (argument,) = shlex.split(package.pip_argument)
    return Requirement(argument)


@pytest.mark.parametrize(
    "spec, extras, url",
    [
        ("indicfm[tpu]==0.1.0", {"tpu"}, None),
        ("indicfm>=0.1", {"tpu"}, None),  # the tpu extra is added: without it jax would run on the CPUs
        ("indicfm[ray]", {"ray", "tpu"}, None),
        ("indicfm @ git+https://github.com/org/indicfm@v0.1.0", {"tpu"}, "git+https://github.com/org/indicfm@v0.1.0"),
        ("indicfm[tpu] @ https://example.org/indicfm-0.1.0-py3-none-any.whl", {"tpu"},
         "https://example.org/indicfm-0.1.0-py3-none-any.whl"),
    ],
)  # fmt: skip
def test_requirements_name_indicfm_and_get_the_tpu_extra(spec, extras, url, monkeypatch):
    monkeypatch.chdir(REPO)  # a folder named indicfm/ here does not make `indicfm[...]` a path
    package = parse_package(spec)
    target = _pip_target(package)
    assert target.name == "indicfm" and target.extras == extras and target.url == url
    assert target.specifier == Requirement(spec).specifier
    assert package.wheel is None and package.added_extra == ("tpu" not in Requirement(spec).extras)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("torch>=2", "installs 'torch'"),
        ("indicfm[tpu", "not a pip requirement"),
        ("indicfm ==", "not a pip requirement"),
        ("indicfm[tpu] @ ", "not a pip requirement"),
        ("dist/indicfm-0.1.0-py3-none-any.whl", "no such wheel file"),
        ("./no/such/folder", "no such file or folder"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LaunchError, match=message) as err:
        parse_package(spec)
    if message != "installs 'torch'" and spec.strip():
        assert "indicfm[tpu]==0.1.0" in str(err.value)  # every such error shows the forms that work


def test_local_folders_and_foreign_or_broken_wheels_are_refused(tmp_path):
    with pytest.raises(LaunchError, match="local folder.*Leave --package out"):
        parse_package(str(tmp_path))
    (tmp_path / "indicfm-0.1.0.tar.gz").write_bytes(b"")
    with pytest.raises(LaunchError, match="local file"):
        parse_package(str(tmp_path / "indicfm-0.1.0.tar.gz"))
    with pytest.raises(LaunchError, match="wheel of 'torch'"):
        parse_package(str(_wheel(tmp_path / "a", "torch-2.4.0-cp311-cp311-linux_x86_64.whl")))
    with pytest.raises(LaunchError, match="not a wheel file name"):
        parse_package(str(_wheel(tmp_path / "b", "indicfm.whl")))
    with pytest.raises(LaunchError, match="no indicfm/configs/hardware.yaml"):
        parse_package(str(_wheel(tmp_path / "c", members=("indicfm/__init__.py",))))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / WHEEL_NAME).write_bytes(b"not a zip")
    with pytest.raises(LaunchError, match="not a zip file"):
        parse_package(str(tmp_path / "d" / WHEEL_NAME))


def test_a_local_wheel_is_copied_and_installed_with_its_extras(tmp_path):
    wheel = _wheel(tmp_path / "dist")
    plain = parse_package(str(wheel))
    assert plain.wheel == wheel.resolve() and plain.added_extra
    with_ray = parse_package(f"{wheel}[ray]")
    assert with_ray.wheel == wheel.resolve() and with_ray.added_extra
    assert parse_package(f"{wheel}[tpu]").added_extra is False
    job = TpuJob("run1", "v5p-128", "us-east5-a", "proj", tmp_path / "c.yaml", bucket="gs://b/r", package=with_ray)
    commands = tpu.plan_commands(job, REPO, tmp_path / "src.tgz")
    assert all(argv[0] == "gcloud" for argv in commands)  # nothing packs the source tree
    for argv in commands:
        assert_documented(argv)
    scp = [argv for argv in commands if argv[3:5] == ["tpu-vm", "scp"]]
    assert [argv[5:7] for argv in scp] == [
        [str(wheel.resolve()), f"run1:~/indicfm/{WHEEL_NAME}"],
        [str(tmp_path / "c.yaml"), "run1:~/indicfm/config.yaml"],
    ]
    train = next(a for a in commands[-1] if a.startswith("--command="))
    assert "indicfm train --config ~/indicfm/config.yaml" in train and "cd ~/indicfm/src" not in train


def _run_install_script(script: str, home: Path) -> list[list[str]]:
    """Run the worker's install shell with ``python3`` and ``indicfm`` faked; what each was called with."""
    bin_dir = home / "fakebin"
    bin_dir.mkdir(parents=True)
    log = home / "calls.jsonl"
    for name in ("python3", "indicfm"):
        fake = bin_dir / name
        fake.write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            f"open({str(log)!r}, 'a').write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n"
        )
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    subprocess.run(["bash", "-c", script], env=env, check=True, cwd=home)
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("form", ["wheel", "requirement"])
def test_the_workers_install_shell_gives_pip_the_package_and_checks_the_command(form, tmp_path):
    if form == "wheel":
        package = parse_package(str(_wheel(tmp_path / "dist")))
        expected = f"{tmp_path / 'home'}/indicfm/{WHEEL_NAME}[tpu]"  # $HOME expanded on the worker
    else:
        package = parse_package("indicfm[ray] @ git+https://github.com/org/indicfm@v0.1.0")
        expected = "indicfm[ray,tpu]@ git+https://github.com/org/indicfm@v0.1.0"
    job = TpuJob("run1", "v5p-8", "z", "p", tmp_path / "c.yaml", package=package)
    calls = _run_install_script(tpu.install_script(job), tmp_path / "home")
    assert calls[0] == ["python3", "-m", "pip", "install", "--upgrade", "pip"]
    assert calls[1][:4] == ["python3", "-m", "pip", "install"] and len(calls[1]) == 5
    if form == "wheel":
        assert calls[1][4] == expected
    else:
        got = Requirement(calls[1][4])
        assert (got.name, got.extras, got.url) == ("indicfm", {"ray", "tpu"}, Requirement(expected).url)
    assert calls[2] == ["indicfm", "--version"]  # fails the setup on a worker where the install did not work


def test_launch_with_a_wheel_and_a_shipped_config_name(fake_gcloud, tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "dist")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the config is found by its shipped name, not as a file here
    sets = ["trainer.global_batch_size=256", "trainer.steps=30"]
    result = CliRunner().invoke(
        app,
        ["launch", "tpu", "--config", "model/moe-8b", *[a for s in sets for a in ("--set", s)], "--tpu-type",
         "v5p-128", "--zone", "us-east5-a", "--project", "proj", "--spot", "--bucket", "gs://bkt/runs",
         "--package", str(wheel), "--poll", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "the workers install it with [tpu]" in result.output
    calls = _calls(fake_gcloud)
    one_round = ["queued-resources create", "queued-resources describe", "tpu-vm ssh", "tpu-vm scp", "tpu-vm scp",
                 "tpu-vm ssh", "tpu-vm ssh"]  # fmt: skip
    assert _verbs(calls)[1:8] == one_round  # the fake's first train is preempted; the launcher goes again
    remote = fake_gcloud / "remote"
    assert (remote / WHEEL_NAME).read_bytes() == wheel.read_bytes()
    # Reference: the checkout's own moe-8b file with the same overrides.
    assert load_config(remote / "config.yaml") == load_config(REPO / "configs" / "model" / "moe-8b.yaml", sets)


def test_bad_package_fails_before_any_gcloud_call(fake_gcloud, tmp_path):
    result = CliRunner().invoke(
        app,
        ["launch", "tpu", "--config", "model/moe-8b", "--tpu-type", "v5p-128", "--zone", "z", "--project", "p",
         "--bucket", "gs://b", "--package", "jax[tpu]"],
    )  # fmt: skip
    assert result.exit_code == 2 and "installs 'jax'" in result.output
    assert _calls(fake_gcloud) == []


def test_without_package_an_installed_wheel_has_no_source_tree_to_ship(tmp_path):
    with pytest.raises(LaunchError, match="pass --package"):
        tpu.check_source_tree(tmp_path)
    tpu.check_source_tree(REPO)  # a checkout (a worktree's .git is a file) ships itself
