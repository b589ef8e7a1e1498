"""Test set-up: 8 fake CPU devices (so meshes and expert parallelism are exercised) and sample paths.

XLA_FLAGS must be set before jax is first imported, which is why it happens here at import time.
"""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# The dev extra installs libtpu (XLA's TPU compiler, for tests/test_tpu_compile.py). With libtpu
# importable JAX would also try to start a TPU backend, which on a machine without a TPU probes the
# GCE metadata server and logs pages of warnings. Tests run on CPU devices, so only the CPU backend
# is started; compiling for a TPU topology (indicfm.launch.compile) asks libtpu for a slice description and
# needs no TPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_train_dir() -> Path:
    """Training text shipped with the repository: one file per language, one document per line."""
    return SAMPLES / "train"


@pytest.fixture(scope="session")
def sample_heldout_dir() -> Path:
    """Held-out parallel FLORES-200 lines shipped with the repository."""
    return SAMPLES / "heldout"
