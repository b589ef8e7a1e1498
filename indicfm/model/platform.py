"""Which platform the code is being traced for.

Backends are picked per platform (splash attention and Pallas kernels on TPU, cuDNN on GPU, XLA
elsewhere).  Normally that is the machine's own default backend, but an ahead-of-time compile for a
TPU slice (``indicfm plan --compile``) traces on a CPU-only host for TPU devices: it sets the target
with :func:`compiling_for` so the step it lowers is the one a TPU run would execute (real Mosaic
kernels, not Pallas's CPU interpreter).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("indicfm_target_platform", default=None)


def target_platform() -> str:
    """``"tpu"``, ``"gpu"`` or ``"cpu"``: the platform being compiled for (default: the local backend)."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Trace for ``platform`` inside this block (e.g. ``"tpu"`` for topology devices)."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
