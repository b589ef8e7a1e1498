"""Cloud TPU: build the ``gcloud`` commands for a training run, and drive them through preemptions.

A run is one *queued resource* holding one TPU slice (``gcloud compute tpus queued-resources``):
queued resources wait for capacity instead of failing, and are the documented way to ask for spot
or reserved TPUs. Every host of the slice gets the same source tree (or, with ``--package``, the same
wheel or pip requirement, checked by :func:`parse_package`) and config and runs the same
``indicfm train`` (``tpu-vm ssh --worker=all``); the workdir is on GCS so checkpoints outlive the VMs.

When a spot slice is preempted the queued resource goes to ``SUSPENDED``; it cannot be restarted,
only deleted and created again. :func:`launch` does exactly that, reinstalls, and runs the same
``indicfm train``, which finds the last checkpoint in the gs:// workdir and resumes.

Documented forms (cloud.google.com/sdk/gcloud/reference/compute/tpus/...):

* ``queued-resources create QR --node-id=N --accelerator-type=T --runtime-version=V --zone=Z [--spot|--reserved]``
* ``queued-resources describe QR --zone=Z`` ; ``queued-resources delete QR --zone=Z --force``
* ``tpu-vm scp SRC N:DEST --worker=all --zone=Z`` ; ``tpu-vm ssh N --worker=all --command=CMD --zone=Z``
"""

from __future__ import annotations

import shlex
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from indicfm.launch.commands import Result, Shell
from indicfm.hardware import Slice, parse_slice

Provisioning = Literal["on-demand", "spot", "reserved"]

REMOTE_DIR = "indicfm"  # under the remote user's home directory
SOURCE_ARCHIVE = "indicfm-src.tar.gz"
REMOTE_CONFIG = "config.yaml"

#: queued-resource states (REST QueuedResourceState.State) and what the launcher does in each
READY_STATES = {"ACTIVE"}
WAITING_STATES = {"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"}
LOST_STATES = {"SUSPENDING", "SUSPENDED", "FAILED", "DELETING"}


class LaunchError(RuntimeError):
    """The launch cannot go on; the message says what failed and what to run to clean up."""


# ---------------------------------------------------------------- what the workers install

#: What every worker needs: ``indicfm train`` on TPUs.  Added to a ``--package`` that lacks it.
WORKER_EXTRA = "tpu"
#: A file the wheel must ship for ``indicfm train`` to run from it (configs as package data).
WHEEL_MUST_SHIP = "indicfm/configs/hardware.yaml"
PACKAGE_EXAMPLES = (
    "e.g. --package 'indicfm[tpu]==0.1.0', --package 'indicfm[tpu] @ git+https://github.com/ORG/indicfm@TAG', "
    "or a wheel built here with `pip wheel --no-deps -w dist .`: --package dist/indicfm-0.1.0-py3-none-any.whl"
)


@dataclass(frozen=True)
class Package:
    """What the workers ``pip install`` instead of this source tree (``indicfm launch tpu --package``)."""

    pip_argument: str  # already quoted for the worker's shell
    wheel: Path | None = None  # a wheel file here, copied to every worker before the install
    added_extra: bool = False  # the spec lacked the tpu extra and got it

    @property
    def remote_wheel(self) -> str:
        assert self.wheel is not None
        return f"~/{REMOTE_DIR}/{self.wheel.name}"


def _split_extras(spec: str) -> tuple[str, set[str]]:
    """``dist/x.whl[tpu,ray]`` -> (``dist/x.whl``, {tpu, ray}): pip's form for a file with extras."""
    if spec.endswith("]") and "[" in spec:
        path, extras = spec[:-1].rsplit("[", 1)
        return path, {e.strip() for e in extras.split(",") if e.strip()}
    return spec, set()


def _local_wheel(spec: str, path: Path, extras: set[str]) -> Package:
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    if not path.is_file():
        raise LaunchError(f"--package {spec}: no such wheel file {path.absolute()}; {PACKAGE_EXAMPLES}")
    try:
        name = parse_wheel_filename(path.name)[0]
    except InvalidWheelFilename as err:
        raise LaunchError(f"--package {spec}: not a wheel file name ({err}); {PACKAGE_EXAMPLES}") from None
    if name != canonicalize_name("indicfm"):
        raise LaunchError(f"--package {spec} is a wheel of {name!r}, but the workers run `indicfm train`: give indicfm's wheel")
    try:
        with zipfile.ZipFile(path) as wheel:
            ships = WHEEL_MUST_SHIP in wheel.namelist()
    except zipfile.BadZipFile:
        raise LaunchError(f"--package {spec}: {path} is not a zip file (a broken or partly copied wheel?)") from None
    if not ships:
        raise LaunchError(
            f"--package {spec}: the wheel has no {WHEEL_MUST_SHIP}, so `indicfm train` cannot run from it "
            "(built before configs shipped as package data?); rebuild it: pip wheel --no-deps -w dist ."
        )
    added = WORKER_EXTRA not in extras
    listed = ",".join(sorted(extras | {WORKER_EXTRA}))
    # $HOME, not ~: the wheel's path is quoted for the shell, and ~ does not expand inside quotes.
    return Package(f'"$HOME/{REMOTE_DIR}/{path.name}[{listed}]"', wheel=path.resolve(), added_extra=added)


def parse_package(spec: str) -> Package:
    """Check ``--package`` here, before any slice is asked for: a pip requirement naming indicfm, or
    a local wheel file of indicfm (copied to the workers).  Either way the workers get the tpu extra.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    spec = spec.strip()
    if not spec:
        raise LaunchError(f"--package is empty; {PACKAGE_EXAMPLES}")
    path_text, file_extras = _split_extras(spec)
    path = Path(path_text).expanduser()
    # A requirement's name has no "/" and a URL has "://": what is left names a file or folder here.
    looks_local = "://" not in spec and "@" not in spec and (
        path_text.endswith(".whl") or "/" in path_text or path_text.startswith((".", "~"))
    )
    if looks_local and path_text.endswith(".whl"):
        return _local_wheel(spec, path, file_extras)
    if looks_local:
        if not path.exists():
            raise LaunchError(f"--package {spec}: no such file or folder {path.absolute()}; {PACKAGE_EXAMPLES}")
        raise LaunchError(
            f"--package {spec} is a local {'folder' if path.is_dir() else 'file'}, which the workers do not have. "
            "Leave --package out to ship this checkout, or build a wheel and pass it: pip wheel --no-deps -w dist ."
        )
    try:
        requirement = Requirement(spec)
    except InvalidRequirement as err:
        raise LaunchError(f"--package {spec!r} is not a pip requirement ({err}); {PACKAGE_EXAMPLES}") from None
    if canonicalize_name(requirement.name) != canonicalize_name("indicfm"):
        raise LaunchError(
            f"--package {spec!r} installs {requirement.name!r}, but the workers run `indicfm train`: "
            f"name indicfm; {PACKAGE_EXAMPLES}"
        )
    added = WORKER_EXTRA not in requirement.extras
    requirement.extras.add(WORKER_EXTRA)
    return Package(shlex.quote(str(requirement)), added_extra=added)


def check_source_tree(repo: Path) -> None:
    """Without ``--package`` the workers get ``git archive`` of this checkout; an installed wheel has none."""
    if not (repo / ".git").exists():
        raise LaunchError(
            f"indicfm here is installed as a package ({repo}), not a git checkout, so there is no source tree "
            f"to ship: pass --package, {PACKAGE_EXAMPLES}"
        )


@dataclass(frozen=True)
class TpuJob:
    """Everything the gcloud commands of one TPU run need."""

    name: str
    tpu_type: str
    zone: str
    project: str
    config_path: Path
    provisioning: Provisioning = "on-demand"
    bucket: str | None = None
    runtime_version: str | None = None
    package: Package | None = None  # what to pip install instead of this source tree
    train_args: tuple[str, ...] = ()

    @property
    def slice(self) -> Slice:
        return parse_slice(self.tpu_type)

    @property
    def accelerator_type(self) -> str:
        return self.slice.accelerator_type

    @property
    def runtime(self) -> str:
        version = self.runtime_version or self.slice.chip.runtime_version
        if not version:
            raise LaunchError(f"no TPU runtime version known for {self.tpu_type}; pass --runtime-version")
        return version

    @property
    def workdir(self) -> str:
        """Where checkpoints and logs go: ``gs://bucket/.../NAME``, or the VM's disk without a bucket."""
        if self.bucket:
            return f"{self.bucket.rstrip('/')}/{self.name}"
        return f"$HOME/{REMOTE_DIR}/runs/{self.name}"

    def _scope(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]


# ---------------------------------------------------------------- pure command builders


def create_command(job: TpuJob) -> list[str]:
    """Ask for the slice as a queued resource (node id = queued resource id = job name)."""
    argv = [
        "gcloud", "compute", "tpus", "queued-resources", "create", job.name,
        f"--node-id={job.name}",
        f"--accelerator-type={job.accelerator_type}",
        f"--runtime-version={job.runtime}",
        *job._scope(),
    ]  # fmt: skip
    if job.provisioning == "spot":
        argv.append("--spot")
    elif job.provisioning == "reserved":
        argv.append("--reserved")
    return argv


def describe_command(job: TpuJob) -> list[str]:
    """Print only the state (``ACTIVE``, ``SUSPENDED``, ...) of the queued resource."""
    return [
        "gcloud", "compute", "tpus", "queued-resources", "describe", job.name,
        *job._scope(), "--format=value(state.state)",
    ]  # fmt: skip


def delete_command(job: TpuJob) -> list[str]:
    """Delete the queued resource and (``--force``) its TPU VMs, without a confirmation prompt."""
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", job.name, *job._scope(), "--force", "--quiet"]


def archive_command(repo: Path, destination: Path) -> list[str]:
    """Pack the committed source tree (what ``git`` tracks: code, configs, samples) for the workers."""
    return ["git", "-C", str(repo), "archive", "--format=tar.gz", "-o", str(destination), "HEAD"]


def scp_command(job: TpuJob, local: Path | str, remote: str) -> list[str]:
    """Copy one local file to the same path on every worker."""
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", str(local), f"{job.name}:{remote}",
        "--worker=all", *job._scope(),
    ]  # fmt: skip


def ssh_command(job: TpuJob, command: str) -> list[str]:
    """Run one shell command on every worker at once; output streams back to this terminal."""
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", job.name,
        "--worker=all", f"--command={command}", *job._scope(),
    ]  # fmt: skip


def mkdir_script() -> str:
    return f"mkdir -p ~/{REMOTE_DIR}/src"


def install_script(job: TpuJob) -> str:
    """Shell run on each worker: ``pip install`` the package, or unpack and install the source tree,
    with the TPU extra.  ``indicfm --version`` then fails the setup if the command did not install,
    and puts the version and extras each worker got in the log.

    The source tree is installed editable, so a traceback on a worker names ``~/indicfm/src`` files.
    """
    check = "export PATH=$HOME/.local/bin:$PATH && indicfm --version"
    if job.package:
        return f"python3 -m pip install --upgrade pip && python3 -m pip install {job.package.pip_argument} && {check}"
    return (
        f"cd ~/{REMOTE_DIR}/src && tar -xzf ../{SOURCE_ARCHIVE} && "
        f"python3 -m pip install --upgrade pip && python3 -m pip install -e '.[{WORKER_EXTRA}]' && {check}"
    )


def train_script(job: TpuJob) -> str:
    """Shell run on each worker: ``indicfm train`` with JAX detecting the slice's hosts by itself.

    The same command starts a run and resumes one: ``indicfm train`` restores the newest checkpoint
    it finds in the workdir.
    """
    args = " ".join(shlex.quote(a) for a in job.train_args)
    cd = f"cd ~/{REMOTE_DIR}/src && " if not job.package else ""
    workdir = shlex.quote(job.workdir) if job.bucket else job.workdir  # $HOME must expand remotely
    return (
        f"{cd}export PATH=$HOME/.local/bin:$PATH INDICFM_DISTRIBUTED=auto && "
        f"indicfm train --config ~/{REMOTE_DIR}/{REMOTE_CONFIG} --workdir {workdir}"
        + (f" {args}" if args else "")
    )


def setup_commands(job: TpuJob, archive: Path) -> list[list[str]]:
    """Once the slice is ACTIVE: copy source and config to every worker and install."""
    commands = [ssh_command(job, mkdir_script())]
    if not job.package:
        commands.append(scp_command(job, archive, f"~/{REMOTE_DIR}/{SOURCE_ARCHIVE}"))
    elif job.package.wheel is not None:
        commands.append(scp_command(job, job.package.wheel, job.package.remote_wheel))
    commands.append(scp_command(job, job.config_path, f"~/{REMOTE_DIR}/{REMOTE_CONFIG}"))
    commands.append(ssh_command(job, install_script(job)))
    return commands


def plan_commands(job: TpuJob, repo: Path, archive: Path) -> list[list[str]]:
    """Every command of a fresh launch, in order (what ``--dry-run`` prints)."""
    local = [] if job.package else [archive_command(repo, archive)]
    return [
        *local,
        create_command(job),
        describe_command(job),
        *setup_commands(job, archive),
        ssh_command(job, train_script(job)),
    ]


# ---------------------------------------------------------------- the launcher loop


def slice_state(shell: Shell, job: TpuJob) -> str | None:
    """The queued resource's state, or ``None`` when it does not exist."""
    result = shell.run(describe_command(job), capture=True, quiet=True)
    if not result.ok:
        return None
    return result.stdout.strip().splitlines()[-1].strip() if result.stdout.strip() else None


def _check(result: Result, what: str, job: TpuJob) -> None:
    if not result.ok:
        raise LaunchError(
            f"{what} failed (exit code {result.returncode}). The slice may still be billed: "
            f"run `indicfm launch tpu --delete --name {job.name} --zone {job.zone} --project {job.project}`"
        )


def wait_until_active(
    shell: Shell, job: TpuJob, *, poll_s: float, timeout_s: float, sleep: Callable[[float], None], log: Callable[[str], None]
) -> None:
    """Poll until the queued resource is ACTIVE; a lost slice (FAILED, SUSPENDED) is an error."""
    waited = 0.0
    last = None
    while True:
        state = slice_state(shell, job)
        if state != last:
            log(f"slice {job.name}: {state or 'not found'}")
            last = state
        if state in READY_STATES:
            return
        if state is None or state in LOST_STATES:
            raise LaunchError(f"slice {job.name} is {state or 'gone'} while waiting for it to become ACTIVE")
        if waited >= timeout_s:
            raise LaunchError(f"slice {job.name} still {state} after {timeout_s:.0f}s; it stays queued (delete it with --delete)")
        sleep(poll_s)
        waited += poll_s


def ensure_slice(shell: Shell, job: TpuJob, **wait) -> None:
    """Create the slice, reuse it when ACTIVE, or delete and recreate it when it was lost."""
    state = slice_state(shell, job)
    if state in LOST_STATES:
        wait["log"](f"slice {job.name} is {state}: deleting it to ask again")
        _check(shell.run(delete_command(job)), "deleting the lost slice", job)
        state = None
    if state is None:
        _check(shell.run(create_command(job)), "creating the queued resource", job)
    elif state in READY_STATES:
        wait["log"](f"reusing ACTIVE slice {job.name}")
    wait_until_active(shell, job, **wait)


def launch(
    job: TpuJob,
    shell: Shell,
    *,
    repo: Path,
    archive: Path,
    max_restarts: int = 100,
    poll_s: float = 30.0,
    queue_timeout_s: float = 7 * 24 * 3600.0,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> int:
    """Run training on the slice until it finishes, recreating the slice after each preemption.

    Returns the number of restarts. A training failure on a healthy slice is not retried: it would
    fail the same way again.
    """
    if not job.package:
        check_source_tree(repo)
    if shell.dry_run:
        for argv in plan_commands(job, repo, archive):
            shell.run(argv)
        log(
            "# on preemption (slice SUSPENDED or FAILED): the launcher runs "
            f"`{' '.join(delete_command(job))}` and repeats from `queued-resources create`; "
            "`indicfm train` then resumes from the newest checkpoint in the workdir"
        )
        return 0

    if not job.package:
        _check(shell.run(archive_command(repo, archive)), "packing the source tree (git archive)", job)
    wait = dict(poll_s=poll_s, timeout_s=queue_timeout_s, sleep=sleep, log=log)
    restarts = 0
    while True:
        ensure_slice(shell, job, **wait)
        for argv in setup_commands(job, archive):
            _check(shell.run(argv), "setting up the workers", job)
        result = shell.run(ssh_command(job, train_script(job)))
        if result.ok:
            log(f"training finished on {job.name}; delete the slice with `indicfm launch tpu --delete --name {job.name} ...`")
            return restarts
        state = slice_state(shell, job)
        if state in READY_STATES:
            raise LaunchError(
                f"indicfm train exited with code {result.returncode} on a healthy slice (state ACTIVE): "
                f"see the log above. The slice is still up (and billed): fix and rerun, or delete it."
            )
        restarts += 1
        if restarts > max_restarts:
            raise LaunchError(f"slice {job.name} was lost {restarts} times; giving up (max restarts {max_restarts})")
        log(f"slice {job.name} lost ({state or 'gone'}): restart {restarts}, resuming from the last checkpoint")
