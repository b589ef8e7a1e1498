"""MoE benchmark: the MoE feed-forward alone (router + dispatch + experts + shared experts), forward
and backward, for each dispatch implementation, ÷ a dense SwiGLU with the same active FLOPs.

``python -m benchmarks.moe [--quick]``.  Goal (issue 8): MoE time ÷ dense time ≤ 1.25.

The dense reference has hidden width ``(top_k + num_shared_experts) * d_expert``: exactly the
matmul FLOPs one token does in the MoE layer (the router's ``D x E`` product aside), so the ratio is
the price of routing, dispatch and any padding or wasted expert FLOPs.  Useful TFLOP/s counts only
those active FLOPs (``18 * T * D * hidden`` for forward + backward of three matmuls).

Implementations (see ``indicfm/model/moe.py``): ``capacity`` (fixed per-expert buffers, batched
einsum; drops over-capacity assignments, the dropped share is printed); ``dropless/rounds``
(capacity-sized per-expert buffers repeated until every assignment is done: the CPU default);
``dropless/blocks`` (groups padded to whole blocks, one batched matmul: the GPU default without
tokamax); ``dropless/ragged_dot`` (native
on TPU; on CPU/GPU XLA lowers it to a dense masked product over all experts); on GPU also
``dropless/ragged_dot_pallas`` (jax's Pallas-Triton lowering, ``jax_ragged_dot_use_gpu_pallas_triton_lowering``)
and ``dropless/tokamax`` when tokamax is installed.  Sizes: ``bench-moe`` (64 experts, top-8, one
shared) on CPU; ``small-moe`` at 4 x 4096 tokens and its top-8/1-shared variant on GPU/TPU.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import backend, cpu_load, matmul_dtype, random_like, round_figures, quick_flag_main, time_fn
from benchmarks.step import MODEL_CONFIGS, platform_overrides


def implementations(platform: str | None = None, quick: bool = False) -> list[str]:
    """Dispatch variants worth timing here, as ``dispatch/kernel`` names."""
    platform = platform or backend()
    names = ["capacity", "dropless/rounds", "dropless/blocks"]
    if platform == "tpu":
        names.append("dropless/ragged_dot")
    elif platform == "gpu":
        names += ["dropless/ragged_dot", "dropless/ragged_dot_pallas"]
        try:
            import tokamax  # noqa: F401

            names.append("dropless/tokamax")
        except ImportError:
            pass
    elif not quick:  # CPU: the E-times-FLOPs lowering, to show what the default avoids
        names.append("dropless/ragged_dot")
    return names


def shapes(quick: bool, platform: str | None = None) -> list[tuple[str, list[str], int, int]]:
    """(label, config overrides on top of the base file, batch, seq_len) per measured shape."""
    platform = platform or backend()
    if platform == "cpu":
        return [("bench_moe", [], 2 if quick else 8, 512)]
    seq = 2048 if quick else 4096
    return [
        ("small_moe", [], 4, seq),
        ("top8_shared1", ["model.top_k=8", "model.num_shared_experts=1"], 4, seq),
    ]


def _base_config(platform: str | None = None) -> str:
    return str(MODEL_CONFIGS / ("bench-moe.yaml" if (platform or backend()) == "cpu" else "small-moe.yaml"))


@contextlib.contextmanager
def _pallas_ragged_dot(enabled: bool) -> Iterator[None]:
    """Switch jax's Pallas-Triton lowering of ragged_dot on GPU for the duration of a measurement."""
    if not enabled:
        yield
        return
    previous = jax.config.jax_ragged_dot_use_gpu_pallas_triton_lowering
    jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
    try:
        yield
    finally:
        jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", previous)


def _time_fwd_bwd(module: nnx.Module, x_BxLxD: jax.Array, call, repeats: int):
    """Median seconds of forward + backward (gradients for the input and every parameter)."""
    graphdef, params = nnx.split(module)
    cotangent = random_like(jax.random.key(7), x_BxLxD.shape, x_BxLxD.dtype)

    def loss(params_, x_):
        y_BxLxD = call(nnx.merge(graphdef, params_), x_)
        return jnp.sum((y_BxLxD * cotangent).astype(jnp.float32))

    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return time_fn(lambda: fwd_bwd(params, x_BxLxD), warmup=1, repeats=repeats)


def measure_shape(label: str, overrides: list[str], batch: int, seq_len: int, quick: bool, peak_flops: float) -> dict:
    from indicfm.config import load_config
    from indicfm.model.layers import SwiGLU, param_dtype
    from indicfm.model.moe import MoE

    base = load_config(_base_config(), [*platform_overrides(), *overrides]).model
    D, F, k, S = base.d_model, base.d_expert, base.top_k, base.num_shared_experts
    hidden = (k + S) * F
    tokens = batch * seq_len
    useful_flops = 18.0 * tokens * D * hidden
    dtype = matmul_dtype()
    repeats = 3 if quick else 5
    x_BxLxD = random_like(jax.random.key(0), (batch, seq_len, D), dtype)
    valid_BxL = jnp.ones((batch, seq_len), bool)

    dense = SwiGLU(D, hidden, param_dtype(base), rngs=nnx.Rngs(0))
    dense_t = _time_fwd_bwd(dense, x_BxLxD, lambda m, x: m(x), repeats)
    figures = {
        f"{label}_shape": f"T={tokens} D={D} E={base.num_experts} k={k} shared={S} F={F}",
        f"{label}_dense_ms": dense_t.median_s * 1e3,
        f"{label}_dense_useful_tflops": useful_flops / dense_t.median_s / 1e12,
        f"{label}_dense_over_peak": useful_flops / dense_t.median_s / peak_flops,
    }
    for name in implementations(quick=quick):
        dispatch, _, kernel = name.partition("/")
        cfg_overrides = {"dispatch": dispatch}
        if kernel:
            cfg_overrides["grouped_matmul"] = "ragged_dot" if kernel == "ragged_dot_pallas" else kernel
        cfg = base.model_copy(update=cfg_overrides)
        moe = MoE(cfg, rngs=nnx.Rngs(0))
        key = name.replace("/", "_")
        try:
            with _pallas_ragged_dot(kernel == "ragged_dot_pallas"):
                t = _time_fwd_bwd(moe, x_BxLxD, lambda m, x: m(x, valid_BxL)[0], repeats)
        except Exception as err:  # one kernel failing to lower (or a missing flag) must not hide the others
            figures[f"{label}_{key}_status"] = f"failed: {type(err).__name__}: {str(err)[:120]}"
            continue
        figures[f"{label}_{key}_ms"] = t.median_s * 1e3
        figures[f"{label}_{key}_over_dense"] = t.median_s / dense_t.median_s
        figures[f"{label}_{key}_useful_tflops"] = useful_flops / t.median_s / 1e12
        if dispatch == "capacity":
            routing = jax.jit(lambda m, x: m(x, valid_BxL)[1].dropped_fraction)(moe, x_BxLxD)
            figures[f"{label}_{key}_dropped_fraction"] = float(routing)
    return figures


def run(quick: bool) -> dict:
    from benchmarks.peak import measured_peak_flops

    peak = measured_peak_flops(quick)
    figures: dict = {"peak_tflops": peak / 1e12, "load_before": cpu_load()}
    for label, overrides, batch, seq_len in shapes(quick):
        figures.update(measure_shape(label, overrides, batch, seq_len, quick, peak))
    figures["load_after"] = cpu_load()
    return round_figures(figures)


def main(argv: list[str] | None = None) -> None:
    quick_flag_main(run, __doc__, "fewer tokens and repeats", argv)


if __name__ == "__main__":
    main()
