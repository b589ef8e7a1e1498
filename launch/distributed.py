"""Multi-host set-up: start ``jax.distributed`` from the environment, and helpers every host needs.

One JAX process runs per host (a Cloud TPU VM worker, a SLURM node); together they see one global
device list and one mesh. :func:`initialize` must run before anything else touches JAX devices.
Where the settings come from, in order:

1. explicit arguments (``indicfm train --coordinator H:P --num-processes N --process-id I``);
2. the environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
   (what the GPU launcher and the tests set);
3. the cluster, detected by JAX itself: SLURM (``SLURM_*`` variables, more than one task) or a Cloud
   TPU slice (the TPU launcher sets ``INDICFM_DISTRIBUTED=auto``; JAX reads the VM metadata);
4. nothing of the above: a single process, and initialising is a no-op.

The data helpers follow Levanter's habit of step-pure data: every host computes which rows of the
global batch it owns from its process index, builds only those, and
``jax.make_array_from_process_local_data`` stitches them into one global array.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_AUTO = "INDICFM_DISTRIBUTED"  # "auto": let JAX detect the cluster (Cloud TPU, SLURM, Open MPI)


class DistributedError(RuntimeError):
    """Incomplete or contradictory multi-host settings; the message names the missing value."""


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in the job."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


def _int_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def _slurm_multi_task() -> bool:
    return "SLURM_JOB_ID" in os.environ and (_int_env("SLURM_NTASKS") or 1) > 1


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    timeout_s: int = 300,
) -> ProcessInfo:
    """Join the multi-host job this process belongs to (or do nothing for a single process).

    Safe to call twice. Returns this process's :class:`ProcessInfo`.
    """
    import jax

    if not jax.distributed.is_initialized():
        coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
        num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
        process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
        explicit = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
        given = {k for k, v in explicit.items() if v is not None}

        if given == set(explicit):
            join = num_processes > 1  # type: ignore[operator]
            if join:
                logger.info("jax.distributed: process %s of %s, coordinator %s", process_id, num_processes, coordinator)
        elif _auto_requested() or _slurm_multi_task():
            # JAX fills in whatever was not given from SLURM / the Cloud TPU metadata.
            join = True
            logger.info("jax.distributed: detecting the cluster (SLURM / Cloud TPU)")
        elif given:
            missing = ", ".join(sorted(set(explicit) - given))
            raise DistributedError(
                f"multi-host set-up is incomplete: {missing} not given. Pass --coordinator HOST:PORT "
                f"--num-processes N --process-id I (or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                f"{ENV_PROCESS_ID}), or none of them for a single process."
            )
        else:
            join = False  # a single process: nothing to join
        if join:
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=num_processes,
                process_id=process_id,
                local_device_ids=local_device_ids,
                initialization_timeout=timeout_s,
            )
    return process_info()


def _auto_requested() -> bool:
    return os.environ.get(ENV_AUTO, "").strip().lower() in {"auto", "1", "true"}


def process_info() -> ProcessInfo:
    import jax

    return ProcessInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
    )


def is_main_process() -> bool:
    """True on process 0: the only one that prints progress, writes logs and metrics files."""
    import jax

    return jax.process_index() == 0


def host_batch_slice(global_batch_size: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """Rows of the global batch this host builds: a contiguous block, equal for every host.

    Contiguous blocks match how a batch axis sharded over all devices is laid out when each host's
    devices are contiguous in the mesh (what ``jax.make_mesh`` produces), so no data moves between hosts.
    """
    import jax

    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise DistributedError(
            f"global batch size {global_batch_size} does not split evenly over {count} hosts; "
            f"make trainer batch size a multiple of {count}"
        )
    per_host = global_batch_size // count
    return slice(index * per_host, (index + 1) * per_host)


def global_batch_from_local(local_batch: Any, sharding: Any) -> Any:
    """Stitch each host's rows (a pytree of NumPy arrays) into global ``jax.Array``s with ``sharding``.

    With one process this is simply a sharded ``device_put``.
    """
    import jax

    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def shutdown() -> None:
    """Leave the job cleanly (lets the coordinator stop without waiting for a heartbeat timeout)."""
    import jax

    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
