"""Peak benchmark: the achievable matmul FLOP/s of this device — the denominator of every ratio.

``python -m benchmarks.peak [--quick]``.  A large batched matrix product (bfloat16 with float32
accumulation on GPU/TPU, float32 on CPU, matching what the models compute in there: see
:func:`benchmarks.common.matmul_dtype`) on random inputs, several input sets rotated so a cache
does not hold them, the *fastest* of the repeats: the achievable rate.  On a shared machine the
median of a short matmul loop drops with other processes' load (it halved here at a load of 3 on 2
cores), which would shrink the denominator and inflate every ratio above it (a dense step once
read 1.2x "peak"); the best repeat keeps the ratios conservative.  The median is printed beside
it.  The spec-sheet figure of ``configs/hardware.yaml`` is shown beside it when the device kind is
in that table: measured ÷ spec says how much of the datasheet a plain XLA matmul reaches here.

Other benchmarks call :func:`measured_peak_flops`, which measures once per process and remembers the
result, so ``python -m benchmarks.run`` divides every figure by a peak taken in the same run.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from benchmarks.common import backend, cpu_load, device_description, matmul_dtype, random_like, round_figures, quick_flag_main, time_fn

_CACHE: dict[bool, dict] = {}


def _sizes(quick: bool) -> tuple[int, int, int]:
    """(batch of matrices, n, repeats): a few GFLOP per call on CPU, a few TFLOP on an accelerator."""
    if backend() == "cpu":
        return (2, 1024, 9) if quick else (4, 1536, 9)
    return (4, 8192, 10) if quick else (8, 8192, 30)


def measure(quick: bool) -> dict:
    """Time ``[nb, n, n] @ [nb, n, n]`` and return the figures (FLOP/s in ``peak_flops_per_s``)."""
    nb, n, repeats = _sizes(quick)
    dtype = matmul_dtype()
    sets = 3  # rotate input sets: repeated calls on one buffer would measure the cache
    keys = jax.random.split(jax.random.key(0), 2 * sets)
    inputs = [(random_like(keys[2 * i], (nb, n, n), dtype), random_like(keys[2 * i + 1], (nb, n, n), dtype))
              for i in range(sets)]
    matmul = jax.jit(lambda a, b: jnp.einsum("bik,bkj->bij", a, b, preferred_element_type=dtype))
    calls = iter(range(10**9))

    def run():
        a, b = inputs[next(calls) % sets]
        return matmul(a, b)

    timing = time_fn(run, warmup=2, repeats=repeats)
    flops = 2.0 * nb * n * n * n
    peak = flops / timing.min_s
    figures = {
        "device": device_description(),
        "dtype": jnp.dtype(dtype).name,
        "matmul": f"{nb}x[{n}x{n}]@[{n}x{n}]",
        "peak_tflops": peak / 1e12,
        "median_tflops": flops / timing.median_s / 1e12,
        "peak_flops_per_s": peak,
        "spread_max_over_min": timing.spread,
        "load": cpu_load(),
    }
    spec = _spec_flops()
    if spec:
        figures["spec_tflops"] = spec / 1e12
        figures["measured_over_spec"] = peak / spec
    return figures


def _spec_flops() -> float | None:
    """Datasheet bf16 peak of this device from ``configs/hardware.yaml`` (None when unknown)."""
    try:
        from indicfm.hardware import spec_peak_flops

        return spec_peak_flops(jax.devices()[0].device_kind)
    except Exception:  # the table is advisory: a missing or broken file must not stop the benchmark
        return None


def measured_peak_flops(quick: bool) -> float:
    """Achievable matmul FLOP/s, measured once per process (and per ``quick``)."""
    if quick not in _CACHE:
        _CACHE[quick] = measure(quick)
    return _CACHE[quick]["peak_flops_per_s"]


def run(quick: bool) -> dict:
    if quick not in _CACHE:
        _CACHE[quick] = measure(quick)
    return round_figures(_CACHE[quick])


def main(argv: list[str] | None = None) -> None:
    quick_flag_main(run, __doc__, "smaller matrices, fewer repeats", argv)


if __name__ == "__main__":
    main()
