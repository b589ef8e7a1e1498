"""``data prepare --engine ray --ray-address`` on a real two-node Ray cluster started on this machine
(``ray start --head`` plus ``ray start --address`` with its own node resources, one CPU each): the
cache equals the local engine's, duplicates are found across shards and nodes, a killed worker and
a killed driver change nothing.  The cluster's processes are this test's own: each ``ray start
--block`` runs in a session of its own and is stopped by signalling that session's process group
(never ``ray stop``, which would stop every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from indicfm.data.prepare import prepare
from indicfm.data.ray_engine import KILL_ONCE_ENV
from indicfm.data.testing import train_tiny_tokenizer
from prepare_checks import assert_same_cache, drop_reasons, make_crossing_corpus

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 64

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 20000:  # Ray's worker ports are 10002-19999 by default
            return port


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop(KILL_ONCE_ENV, None)
    return env


def _stop(process: subprocess.Popen) -> None:
    """End a ``ray start --block`` and everything it started (its own session / process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is still there
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@contextlib.contextmanager
def _two_node_cluster():
    """(address, the second node's ``ray start`` process) of a new head + second node."""
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="r18", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--block", "--disable-usage-stats",
              f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    logs = Path(temp)
    # the `ray` command of this interpreter's environment (a virtual environment's bin/ need not be on PATH)
    ray_cli = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"
    processes = []
    try:
        processes.append(subprocess.Popen(
            [ray_cli, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", *common],
            env=_env(), start_new_session=True, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT))
        _wait_for_port(port, processes[0], logs / "head.log")
        processes.append(subprocess.Popen(
            [ray_cli, "start", f"--address={address}", "--resources={\"second_node\": 1}", *common],
            env=_env(), start_new_session=True, stdout=open(logs / "node2.log", "w"), stderr=subprocess.STDOUT))
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        deadline = time.monotonic() + 90
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert processes[1].poll() is None, (logs / "node2.log").read_text()
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(0.5)
        ray.shutdown()
        yield address, processes[1]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for process in reversed(processes):
            _stop(process)
        subprocess.run(["rm", "-rf", temp], check=False)


@pytest.fixture(scope="module")
def cluster():
    with _two_node_cluster() as (address, _):
        yield address


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, log.read_text()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, "the head node did not start"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def corpus_and_reference(tmp_path_factory, sample_train_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = tmp_path_factory.mktemp("cluster_corpus")
    copies = make_crossing_corpus(sample_train_dir, tmp / "corpus")
    hin = (sample_train_dir / "hin_Deva.txt").read_text(encoding="utf-8").splitlines()
    # a parquet file (one shard of its own): an exact copy of a Hindi line, a record without text
    pq.write_table(pa.table({"text": [hin[3], None, "A record in English with enough words."],
                             "lang": ["hin_Deva", "hin_Deva", "eng_Latn"]}), tmp / "corpus" / "zy_records.parquet")
    tokenizer = train_tiny_tokenizer(sample_train_dir, tmp / "tok")
    reference = tmp / "local"
    prepare([tmp / "corpus"], tokenizer, reference, seq_len=SEQ_LEN, workers=1, show_progress=False)
    return tmp / "corpus", tokenizer, reference, copies


def _cli(*args: str) -> list[str]:
    """``indicfm data prepare ARGS`` as a command line of this interpreter."""
    return [sys.executable, "-c", "from indicfm.cli import main; main()", "data", "prepare", *args]


def test_two_nodes_build_the_local_engines_cache_and_survive_a_killed_worker(cluster, corpus_and_reference,
                                                                              tmp_path, monkeypatch):
    import ray

    import indicfm.data.ray_engine as ray_engine
    import indicfm.data.stages as stages

    corpus, tokenizer, reference, copies = corpus_and_reference
    monkeypatch.setattr(stages, "BATCH_DOCS", 96)  # many shards, spread over both nodes
    monkeypatch.setattr(ray_engine, "SHARD_RANGES", 2)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ONCE_ENV, str(marker))
    out = tmp_path / "ray"
    try:
        result = prepare([corpus], tokenizer, out, seq_len=SEQ_LEN, engine="ray", ray_address=cluster,
                         show_progress=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert marker.exists(), "no worker was killed"
    assert len(result.nodes) == 2, "the shards did not run on both nodes"
    assert_same_cache(reference, out)
    reasons = drop_reasons(out)
    for copy, original in copies:
        assert reasons[copy] == "exact_duplicate" and original not in reasons
    across = [(c, o) for c, o in copies if _node_of(result.placement, *c) != _node_of(result.placement, *o)]
    assert across, "no exact copy ran on another node than its original"


def _node_of(placement: list, name: str, line: int) -> str:
    """The node that processed line ``line`` of the input file called ``name``."""
    for source, first, last, node in placement:
        if Path(source).name == name and first <= line and (last == -1 or line <= last):
            return node
    raise AssertionError(f"{name}:{line} is in no shard")


def test_cli_on_the_cluster_after_a_killed_driver_gives_the_same_cache(cluster, corpus_and_reference, tmp_path):
    corpus, tokenizer, reference, _ = corpus_and_reference
    out = tmp_path / "ray"
    args = ["-i", str(corpus), "-t", str(tokenizer), "-o", str(out), "--seq-len", str(SEQ_LEN),
            "--engine", "ray", "--ray-address", cluster]
    env = _env()
    driver = subprocess.Popen(_cli(*args), env=env, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / ".prepare_state" / "ray.json").exists():  # the run has begun
        assert driver.poll() is None, driver.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert not (out / "metadata.json").exists()
    done = subprocess.run(_cli(*args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "token cache ready" in done.stderr
    assert_same_cache(reference, out)


def _descendants(root: int) -> dict[int, bytes]:
    """{pid: command line} of every process below ``root`` (Ray workers run in process groups of
    their own, under their node's raylet)."""
    parents, cmdlines = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                parents[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdlines[int(entry)] = f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
            continue
    found: dict[int, bytes] = {}
    for pid in parents:
        p = pid
        while p in parents and p != root and p > 1:
            p = parents[p]
        if p == root and pid != root:
            found[pid] = cmdlines.get(pid, b"")
    return found


def test_a_node_that_leaves_mid_run_does_not_change_the_cache(sample_train_dir, tmp_path):
    """The second node (its raylet, object store and workers) is killed while it runs a process
    task: its tasks are retried and its lost results rebuilt on the head node."""
    import json

    corpus = tmp_path / "corpus"
    make_crossing_corpus(sample_train_dir, corpus)
    # more work, so the process stage is still running when the node goes: every sample line again,
    # several times (exact duplicates, all decided across shards)
    bulk = []
    for path in sorted(sample_train_dir.glob("*.txt")):
        lang = path.stem
        bulk += [json.dumps({"text": line, "lang": lang}, ensure_ascii=False)
                 for line in path.read_text(encoding="utf-8").splitlines()]
    (corpus / "zx_bulk.jsonl").write_text("".join(x + "\n" for x in bulk * 6), encoding="utf-8")
    tokenizer = train_tiny_tokenizer(sample_train_dir, tmp_path / "tok")
    reference = tmp_path / "local"
    prepare([corpus], tokenizer, reference, seq_len=SEQ_LEN, workers=1, show_progress=False)
    out = tmp_path / "ray"
    with _two_node_cluster() as (address, second_node):
        args = ["-i", str(corpus), "-t", str(tokenizer), "-o", str(out), "--seq-len", str(SEQ_LEN),
                "--engine", "ray", "--ray-address", address]
        driver = subprocess.Popen(_cli(*args), env=_env(), cwd=tmp_path, start_new_session=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 180
            # Ray names a busy worker's process ray::<task>
            while not any(c.startswith(b"ray::process_shard") for c in _descendants(second_node.pid).values()):
                assert driver.poll() is None, driver.stdout.read()
                assert time.monotonic() < deadline, "the second node never ran a process task"
                time.sleep(0.05)
            node = _descendants(second_node.pid)
            os.killpg(second_node.pid, signal.SIGKILL)  # the node: raylet, object store, agents
            for pid in node:  # and its workers, at once, as when a machine goes
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            output, _ = driver.communicate(timeout=360)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait(timeout=30)
        assert driver.returncode == 0, output
    assert "token cache ready" in output
    assert_same_cache(reference, out)
