"""Test set-up: 8 fake CPU devices (so meshes and expert parallelism are exercised) and sample paths.

XLA_FLAGS must be set before jax is first imported, which is why it happens here at import time.
"""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
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
