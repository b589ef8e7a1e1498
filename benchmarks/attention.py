"""Attention benchmark: the backend the model chooses vs the XLA reference, causal with segment ids.

``python -m benchmarks.attention [--quick]``.  Forward + backward (gradients for q, k, v) of
``indicfm.model.attention.dot_product_attention`` on packed rows (three documents per row, so the
segment mask matters), for the chosen backend (``resolve_impl("auto")``: cuDNN on GPU, splash on
TPU, XLA elsewhere)
and for ``xla`` — jax's own XLA implementation, the reference the issue compares against; on GPU
both run in bfloat16.  Also the plain-einsum float32 ``reference`` as an independent correctness
check: the relative error ‖chosen − reference‖ / ‖reference‖ is printed.

TFLOP/s use the PaLM convention of ``indicfm.model.flops``: ``4 * B * L * L * H * G`` forward over
the full ``L x L`` square (causality not halved), ×3 for forward + backward.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import backend, cpu_load, matmul_dtype, random_like, round_figures, quick_flag_main, time_fn


def backends(platform: str | None = None) -> list[str]:
    """The chosen backend first, then the XLA reference (once, when they are the same), then the
    plain float32 einsum (``reference``, what the tests check against)."""
    from indicfm.model.attention import resolve_impl

    chosen = resolve_impl("auto", platform or backend())
    return ([chosen] if chosen == "xla" else [chosen, "xla"]) + ["reference"]


def sizes(quick: bool, platform: str | None = None) -> tuple[int, int, int, int, int]:
    """(B, L, H, K, G): small-moe's heads at 4 x 4096 on accelerators, a CPU-sized slice otherwise."""
    if (platform or backend()) == "cpu":
        return (1, 512, 4, 2, 64) if quick else (2, 1024, 4, 2, 64)
    return (2, 2048, 16, 4, 64) if quick else (4, 4096, 16, 4, 64)


def _packed_segments(B: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions of three documents per row (cut at 1/4 and 3/5 of the row)."""
    segment = np.ones((B, L), np.int32)
    segment[:, L // 4:] = 2
    segment[:, 3 * L // 5:] = 3
    positions = np.zeros((B, L), np.int32)
    for start, end in ((0, L // 4), (L // 4, 3 * L // 5), (3 * L // 5, L)):
        positions[:, start:end] = np.arange(end - start)
    return segment, positions


def run(quick: bool) -> dict:
    from benchmarks.peak import measured_peak_flops
    from indicfm.model.attention import dot_product_attention, reference_attention, resolve_impl, segment_mask

    peak = measured_peak_flops(quick)
    B, L, H, K, G = sizes(quick)
    dtype = matmul_dtype()
    keys = jax.random.split(jax.random.key(0), 4)
    q = random_like(keys[0], (B, L, H, G), dtype)
    k = random_like(keys[1], (B, L, K, G), dtype)
    v = random_like(keys[2], (B, L, K, G), dtype)
    cotangent = random_like(keys[3], (B, L, H, G), dtype)
    segment, _ = _packed_segments(B, L)
    segment = jnp.asarray(segment)
    mask = segment_mask(segment, segment)
    flops = 3 * 4.0 * B * L * L * H * G
    figures: dict = {
        "shape": f"B={B} L={L} H={H} K={K} G={G} {jnp.dtype(dtype).name}",
        "chosen": resolve_impl("auto"),
        "peak_tflops": peak / 1e12,
        "load_before": cpu_load(),
    }
    reference = reference_attention(q, k, v, mask).astype(jnp.float32)
    times = {}
    for impl in backends():

        def loss(q_, k_, v_, impl=impl):
            out = dot_product_attention(q_, k_, v_, mask, impl, segment)
            return jnp.sum((out * cotangent).astype(jnp.float32))

        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        timing = time_fn(lambda: fwd_bwd(q, k, v), warmup=1, repeats=3 if quick else 7)
        times[impl] = timing.median_s
        out = jax.jit(lambda q_, k_, v_, impl=impl: dot_product_attention(q_, k_, v_, mask, impl, segment))(q, k, v)
        err = jnp.linalg.norm(out.astype(jnp.float32) - reference) / jnp.linalg.norm(reference)
        figures[f"{impl}_fwd_bwd_ms"] = timing.median_s * 1e3
        figures[f"{impl}_tflops"] = flops / timing.median_s / 1e12
        figures[f"{impl}_over_peak"] = flops / timing.median_s / peak
        figures[f"{impl}_rel_err_vs_float32_reference"] = float(err)
    chosen = backends()[0]
    figures["chosen_speedup_over_xla"] = times["xla"] / times[chosen]
    figures["load_after"] = cpu_load()
    return round_figures(figures)


def main(argv: list[str] | None = None) -> None:
    quick_flag_main(run, __doc__, "shorter sequences, fewer repeats", argv)


if __name__ == "__main__":
    main()
