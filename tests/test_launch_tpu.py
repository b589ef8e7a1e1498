"""Cloud TPU launcher: gcloud commands against the documented forms, and an end-to-end run with a fake
``gcloud`` on PATH that records every call and plays a spot preemption."""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from indicfm.cli import app
from indicfm.launch import tpu
from indicfm.launch.tpu import TpuJob

REPO = Path(__file__).resolve().parent.parent

# Flags each gcloud command accepts, typed from its reference page
# (cloud.google.com/sdk/gcloud/reference/compute/tpus/...), plus the gcloud-wide ones we use.
GCLOUD_WIDE = {"--project", "--quiet", "--format"}
DOCUMENTED_FLAGS = {
    ("queued-resources", "create"): {
        "--zone", "--runtime-version", "--accelerator-type", "--topology", "--type", "--node-id", "--node-count",
        "--node-prefix", "--async", "--boot-disk", "--data-disk", "--description", "--guaranteed", "--internal-ips",
        "--labels", "--metadata", "--metadata-from-file", "--network", "--range", "--reserved", "--scopes",
        "--service-account", "--shielded-secure-boot", "--spot", "--subnetwork", "--tags", "--valid-after-duration",
        "--valid-after-time", "--valid-until-duration", "--valid-until-time",
    },
    ("queued-resources", "describe"): {"--zone"},
    ("queued-resources", "delete"): {"--zone", "--async", "--force"},
    ("tpu-vm", "ssh"): {
        "--dry-run", "--force-key-file-overwrite", "--internal-ip", "--plain", "--ssh-flag", "--ssh-key-file",
        "--strict-host-key-checking", "--worker", "--zone", "--command", "--output-directory",
    },
    ("tpu-vm", "scp"): {
        "--compress", "--dry-run", "--force-key-file-overwrite", "--internal-ip", "--plain", "--recurse",
        "--scp-flag", "--ssh-key-file", "--strict-host-key-checking", "--worker", "--zone",
    },
}  # fmt: skip


def assert_documented(argv: list[str]) -> None:
    """The command is `gcloud compute tpus GROUP VERB POSITIONAL... --flag[=value]...` with known flags."""
    assert argv[:3] == ["gcloud", "compute", "tpus"], argv
    group, verb = argv[3], argv[4]
    allowed = DOCUMENTED_FLAGS[(group, verb)] | GCLOUD_WIDE
    flags = [a.split("=", 1)[0] for a in argv[5:] if a.startswith("--")]
    unknown = set(flags) - allowed
    assert not unknown, f"{group} {verb}: undocumented flags {unknown} in {argv}"
    positionals = [a for a in argv[5:] if not a.startswith("--")]
    assert positionals, f"{group} {verb} needs its resource name: {argv}"


def job(**overrides) -> TpuJob:
    base = dict(
        name="run1", tpu_type="v5p-128", zone="us-east5-a", project="proj", config_path=Path("/tmp/c.yaml"),
        bucket="gs://bkt/runs",
    )  # fmt: skip
    base.update(overrides)
    return TpuJob(**base)


def test_create_matches_the_documented_example_form():
    # reference example: queued-resources create my-qr --accelerator-type=v4-8
    #   --runtime-version=v2-alpha-tpuv4 --node-id=my-node-001 --zone=us-central2-b --project=my-project
    argv = tpu.create_command(job(provisioning="spot"))
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "run1"]
    assert set(argv[6:]) == {
        "--node-id=run1",
        "--accelerator-type=v5p-128",  # v5p types count TensorCores: 64 chips
        "--runtime-version=v2-alpha-tpuv5",
        "--zone=us-east5-a",
        "--project=proj",
        "--spot",
    }
    assert_documented(argv)


@pytest.mark.parametrize(
    "tpu_type, accelerator, runtime",
    [
        ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5litepod-256", "v5litepod-256", "v2-alpha-tpuv5-lite"),
        ("v6e-64", "v6e-64", "v2-alpha-tpuv6e"),
        ("v4-32", "v4-32", "tpu-ubuntu2204-base"),
    ],
)
def test_accelerator_types_and_runtime_versions(tpu_type, accelerator, runtime):
    argv = tpu.create_command(job(tpu_type=tpu_type, provisioning="reserved"))
    assert f"--accelerator-type={accelerator}" in argv
    assert f"--runtime-version={runtime}" in argv
    assert "--reserved" in argv and "--spot" not in argv
    assert_documented(argv)


def test_on_demand_has_neither_spot_nor_reserved():
    argv = tpu.create_command(job())
    assert "--spot" not in argv and "--reserved" not in argv


def test_every_planned_command_is_a_documented_form(tmp_path):
    commands = tpu.plan_commands(job(), REPO, tmp_path / "src.tgz")
    assert commands[0][:2] == ["git", "-C"]  # local packing, not gcloud
    for argv in commands[1:]:
        assert_documented(argv)
    ssh = [c for c in commands if c[3:5] == ["tpu-vm", "ssh"]]
    scp = [c for c in commands if c[3:5] == ["tpu-vm", "scp"]]
    assert all("--worker=all" in c for c in ssh + scp)  # every host gets the same files and command
    train = ssh[-1]
    command = next(a.split("=", 1)[1] for a in train if a.startswith("--command="))
    words = shlex.split(command.replace("&&", " && "))
    assert "indicfm" in words and "train" in words
    assert words[words.index("--workdir") + 1] == "gs://bkt/runs/run1"
    assert "INDICFM_DISTRIBUTED=auto" in command
    delete = tpu.delete_command(job())
    assert "--force" in delete and "--quiet" in delete
    assert_documented(delete)


# ------------------------------------------------------------------ end to end with a fake gcloud

FAKE_GCLOUD = textwrap.dedent(
    """\
    #!{python}
    # Fake gcloud: records argv, keeps the queued resource's state in a file, and on the first
    # `indicfm train` marks the slice SUSPENDED and fails (a spot preemption).
    import json, os, shutil, sys
    from pathlib import Path
    root = Path(os.environ["FAKE_GCLOUD_DIR"])
    argv = sys.argv[1:]
    with open(root / "calls.jsonl", "a") as f:
        f.write(json.dumps(argv) + "\\n")
    state_file = root / "state"
    verb = " ".join(argv[2:4])
    if verb == "queued-resources describe":
        if not state_file.exists():
            print("ERROR: NOT_FOUND", file=sys.stderr); sys.exit(1)
        print(state_file.read_text()); sys.exit(0)
    if verb == "queued-resources create":
        state_file.write_text("ACTIVE"); sys.exit(0)
    if verb == "queued-resources delete":
        state_file.unlink(missing_ok=True); sys.exit(0)
    if verb == "tpu-vm scp":
        remote = root / "remote"; remote.mkdir(exist_ok=True)
        shutil.copy(argv[4], remote / argv[5].split("/")[-1]); sys.exit(0)
    if verb == "tpu-vm ssh":
        command = next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))
        if "indicfm train" in command:
            trains = root / "trains"
            n = int(trains.read_text()) + 1 if trains.exists() else 1
            trains.write_text(str(n))
            if "FAKE_TRAIN_EXIT" in os.environ:  # a bug in training: the slice stays healthy
                sys.exit(int(os.environ["FAKE_TRAIN_EXIT"]))
            if n == 1:
                state_file.write_text("SUSPENDED"); sys.exit(255)
        sys.exit(0)
    sys.exit(0)
    """
)


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(FAKE_GCLOUD.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(tmp_path))
    return tmp_path


def _calls(root: Path) -> list[list[str]]:
    path = root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _verbs(calls: list[list[str]]) -> list[str]:
    return [" ".join(c[2:4]) for c in calls]


def _write_config(path: Path) -> Path:
    path.write_text("trainer:\n  steps: 20\n  global_batch_size: 16\n")
    return path


def test_end_to_end_launch_survives_a_preemption_and_resumes(fake_gcloud, tmp_path):
    config = _write_config(tmp_path / "run.yaml")
    result = CliRunner().invoke(
        app,
        ["launch", "tpu", "--config", str(config), "--set", "trainer.steps=30", "--tpu-type", "v5e-16",
         "--zone", "us-west4-a", "--project", "proj", "--spot", "--name", "job", "--bucket", "gs://bkt/runs",
         "--poll", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    calls = _calls(fake_gcloud)
    for argv in calls:
        assert_documented(["gcloud", *argv])
    round_ = ["queued-resources create", "queued-resources describe", "tpu-vm ssh", "tpu-vm scp", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
    assert _verbs(calls) == [
        "queued-resources describe",  # not found: create it
        *round_,  # ... train is preempted
        "queued-resources describe",  # SUSPENDED: a preemption, not a bug
        "queued-resources describe",
        "queued-resources delete",  # a suspended queued resource can only be deleted and asked again
        *round_,  # ... and train resumes
    ]
    trains = [c for c in calls if c[2:4] == ["tpu-vm", "ssh"] and "indicfm train" in " ".join(c)]
    assert len(trains) == 2 and trains[0] == trains[1]  # same command, same gs:// workdir: resume
    assert "--spot" in calls[1]
    # the workers received a self-contained, fully resolved config with the override applied
    shipped = yaml.safe_load((fake_gcloud / "remote" / "config.yaml").read_text())
    assert shipped["trainer"]["steps"] == 30 and shipped["trainer"]["global_batch_size"] == 16
    assert "include" not in shipped and "model" in shipped


def test_dry_run_prints_every_command_and_calls_nothing(fake_gcloud, tmp_path):
    config = _write_config(tmp_path / "run.yaml")
    result = CliRunner().invoke(
        app,
        ["launch", "tpu", "--config", str(config), "--tpu-type", "v5p-8", "--zone", "us-east5-a", "--project",
         "proj", "--reserved", "--bucket", "gs://bkt/r", "--dry-run"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _calls(fake_gcloud) == []
    printed = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("gcloud ")]
    for argv in printed:
        assert_documented(argv)
    assert _verbs([argv[1:] for argv in printed]) == [
        "queued-resources create", "queued-resources describe", "tpu-vm ssh", "tpu-vm scp", "tpu-vm scp",
        "tpu-vm ssh", "tpu-vm ssh",
    ]  # fmt: skip
    assert "--accelerator-type=v5p-8" in printed[0] and "--reserved" in printed[0]


def test_delete_removes_the_queued_resource(fake_gcloud):
    (fake_gcloud / "state").write_text("ACTIVE")
    result = CliRunner().invoke(
        app, ["launch", "tpu", "--delete", "--name", "job", "--zone", "us-east5-a", "--project", "proj"]
    )
    assert result.exit_code == 0, result.output
    assert _calls(fake_gcloud) == [
        ["compute", "tpus", "queued-resources", "delete", "job", "--zone=us-east5-a", "--project=proj", "--force", "--quiet"]
    ]
    assert not (fake_gcloud / "state").exists()


def test_training_failure_on_a_healthy_slice_is_not_retried(fake_gcloud, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_EXIT", "3")
    config = _write_config(tmp_path / "run.yaml")
    result = CliRunner().invoke(
        app,
        ["launch", "tpu", "--config", str(config), "--tpu-type", "v6e-8", "--zone", "z", "--project", "p",
         "--bucket", "gs://b", "--poll", "0"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "healthy slice" in result.output
    assert sum("indicfm train" in " ".join(c) for c in _calls(fake_gcloud)) == 1


def test_bad_inputs_fail_before_any_command(fake_gcloud, tmp_path):
    config = _write_config(tmp_path / "run.yaml")
    runner = CliRunner()
    bad_type = runner.invoke(app, ["launch", "tpu", "--config", str(config), "--tpu-type", "v5p-3", "--zone", "z", "--project", "p", "--bucket", "gs://b"])
    assert bad_type.exit_code != 0 and "multiple of 2" in bad_type.output
    bad_bucket = runner.invoke(app, ["launch", "tpu", "--config", str(config), "--tpu-type", "v5p-8", "--zone", "z", "--project", "p", "--bucket", "/local"])
    assert bad_bucket.exit_code == 2 and "gs://" in bad_bucket.output
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("trainer:\n  stepz: 3\n")
    bad_config = runner.invoke(app, ["launch", "tpu", "--config", str(bad_key), "--tpu-type", "v5p-8", "--zone", "z", "--project", "p", "--bucket", "gs://b"])
    assert bad_config.exit_code == 2 and "trainer.stepz" in bad_config.output
    assert _calls(fake_gcloud) == []
