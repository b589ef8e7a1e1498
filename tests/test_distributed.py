"""launch.distributed: two real local JAX processes join one job and run collectives over 8 devices."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from indicfm.launch import distributed

from helpers import cpu_process_env, free_port, wait_for_results

REPO = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import json
    import numpy as np
    from indicfm.launch import distributed

    info = distributed.initialize()            # settings come from JAX_* environment variables
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)   # the global batch, known to every host
    mine = rows[distributed.host_batch_slice(16)]                 # ... but each host builds only its rows
    x = distributed.global_batch_from_local(mine, NamedSharding(mesh, P("data")))
    replicated = NamedSharding(mesh, P())
    gram = jax.jit(lambda a: a.T @ a, out_shardings=replicated)(x)        # all-reduce across hosts
    gathered = jax.jit(lambda a: a * 2.0, out_shardings=replicated)(x)    # all-gather across hosts
    print("RESULT " + json.dumps({
        "process_index": info.process_index,
        "process_count": info.process_count,
        "local_device_count": info.local_device_count,
        "device_count": info.device_count,
        "is_main": distributed.is_main_process(),
        "rows": mine.tolist(),
        "gram": np.asarray(gram).tolist(),
        "gathered": np.asarray(gathered).tolist(),
    }), flush=True)
    distributed.shutdown()
    """
)


def _run_two_processes(script: Path, timeout: int = 120) -> list[dict]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=cpu_process_env(4, i, port),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    results = wait_for_results(procs, timeout)
    return sorted(results, key=lambda r: r["process_index"])


def test_two_processes_form_one_8_device_job_and_run_collectives(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    results = _run_two_processes(script)

    rows = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    assert [r["process_index"] for r in results] == [0, 1]
    assert [r["is_main"] for r in results] == [True, False]
    for r in results:
        assert (r["process_count"], r["local_device_count"], r["device_count"]) == (2, 4, 8)
        # every host ends up with the same all-reduced / all-gathered values as a single NumPy computation
        np.testing.assert_allclose(np.array(r["gram"]), rows.T @ rows, rtol=1e-6)
        np.testing.assert_array_equal(np.array(r["gathered"]), rows * 2.0)
    # the hosts built disjoint halves of the batch
    np.testing.assert_array_equal(np.array(results[0]["rows"]), rows[:8])
    np.testing.assert_array_equal(np.array(results[1]["rows"]), rows[8:])


def test_single_process_is_a_no_op(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID, distributed.ENV_AUTO):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    info = distributed.initialize()
    assert (info.process_index, info.process_count) == (0, 1)
    assert info.is_main and distributed.is_main_process()


def test_incomplete_settings_name_what_is_missing(monkeypatch):
    monkeypatch.delenv(distributed.ENV_AUTO, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES, raising=False)
    monkeypatch.delenv(distributed.ENV_PROCESS_ID, raising=False)
    with pytest.raises(distributed.DistributedError, match="num_processes, process_id"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES"):
        distributed.initialize()


def test_host_batch_slice_splits_evenly_and_rejects_uneven():
    assert distributed.host_batch_slice(12, 0, 3) == slice(0, 4)
    assert distributed.host_batch_slice(12, 2, 3) == slice(8, 12)
    with pytest.raises(distributed.DistributedError, match="multiple of 3"):
        distributed.host_batch_slice(10, 0, 3)


def test_train_cli_rejects_incomplete_multi_host_flags(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from indicfm.cli import app

    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID, distributed.ENV_AUTO):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    result = CliRunner().invoke(app, ["train", "--workdir", str(tmp_path), "--coordinator", "10.0.0.1:1234"])
    assert result.exit_code == 2
    assert "num_processes, process_id" in result.output
