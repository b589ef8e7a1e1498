"""Small building blocks: parameter creation with logical axis names, RMSNorm, RoPE, SwiGLU MLP.

Shape legend (used in every model module): B batch, L length, D model width, H query heads,
K key/value heads, G head dim, F ffn hidden, E experts, C capacity per expert, V vocab,
T tokens (B*L flattened), M token-expert assignments (T*top_k).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from indicfm.model.config import ModelConfig
from indicfm.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    names: tuple[str | None, ...],
    dtype: jnp.dtype,
    *,
    fan_in: int | None = None,
    init: str = "normal",
) -> nnx.Param:
    """A parameter tagged with logical axis ``names`` (read by ``indicfm.sharding.state_shardings``).

    ``eager_sharding=False``: Flax would otherwise try to shard at creation and needs a mesh; here
    sharding is applied by ``create_model`` through jit ``out_shardings`` (one place, one table).
    ``normal`` init is truncated-normal with std 1/sqrt(fan_in) (fan_in defaults to shape[0]).
    """
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        std = (fan_in or shape[0]) ** -0.5
        value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
        value = value.astype(dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned scale; statistics in float32 for stability."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, *, rngs: nnx.Rngs,
                 names: tuple[str | None, ...] = ("norm",)):
        self.scale = make_param(rngs, (dim,), names, param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x32 = x_BxLxD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(x_BxLxD.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies ``[G/2]`` of the rotary embedding, with the config's scaling.

    ``theta ** (-i / (G/2))``; ``rope_scaling="llama3"`` rescales them as Llama 3.1 does: wavelengths
    longer than ``rope_original_max_len / rope_low_freq_factor`` are divided by ``rope_factor``,
    those shorter than ``rope_original_max_len / rope_high_freq_factor`` kept, and the band between
    blended linearly in ``rope_original_max_len / wavelength``.  Computed in float32 like the
    reference implementation, so imported Llama 3 checkpoints give the same angles.
    """
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if cfg.rope_scaling == "none":
        return inv_freq
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original = cfg.rope_original_max_len
    wavelength = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelength < original / high) & ~(wavelength > original / low)
    return jnp.where(in_band, blended, scaled)


def rope(x_BxLxNxG: jax.Array, positions_BxL: jax.Array, inv_freq_G2: jax.Array) -> jax.Array:
    """Rotary position embedding (half-split layout) at explicit per-token positions.

    Positions come from the data pipeline and restart at 0 for each packed document, so a
    document's encoding does not depend on where it landed in the pack.  ``inv_freq_G2``:
    :func:`rope_frequencies`.
    """
    half = x_BxLxNxG.shape[-1] // 2
    angle_BxLxG2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_G2
    sin = jnp.sin(angle_BxLxG2)[:, :, None, :]
    cos = jnp.cos(angle_BxLxG2)[:, :, None, :]
    x32 = x_BxLxNxG.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxG.dtype)


class SwiGLU(nnx.Module):
    """Dense gated MLP ``down(silu(x @ gate) * (x @ up))``; hidden width split over ``tensor``."""

    def __init__(self, d_model: int, d_hidden: int, param_dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.w_gate_DxF = make_param(rngs, (d_model, d_hidden), ("embed", "mlp"), param_dtype)
        self.w_up_DxF = make_param(rngs, (d_model, d_hidden), ("embed", "mlp"), param_dtype)
        self.w_down_FxD = make_param(rngs, (d_hidden, d_model), ("mlp", "embed"), param_dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dtype = x_BxLxD.dtype
        gate_BxLxF = token_matmul(x_BxLxD, self.w_gate_DxF[...].astype(dtype))
        up_BxLxF = token_matmul(x_BxLxD, self.w_up_DxF[...].astype(dtype))
        h_BxLxF = constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "act_mlp"))
        return token_matmul(h_BxLxF, self.w_down_FxD[...].astype(dtype))


def token_matmul(x_BxLxD: jax.Array, w_DxF: jax.Array) -> jax.Array:
    """``x @ w`` for activations ``[B, L, D]`` and a weight ``[D, F]``, computed on ``[B*L, D]`` rows.

    Why flatten: the weight gradient of the 3-D product contracts two axes (B and L); XLA:CPU lowers
    that to a transposing copy of the activations and a slower dot.  On ``[B*L, D]`` rows it is one
    plain matrix product: a dense SwiGLU forward+backward ran 2.4x faster on CPU (``benchmarks.moe``).
    The reshape is free (row-major bitcast) and keeps the batch sharding on the leading axis.
    """
    B, L, D = x_BxLxD.shape
    return (x_BxLxD.reshape(B * L, D) @ w_DxF).reshape(B, L, w_DxF.shape[-1])


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return DTYPES[cfg.compute_dtype]


def param_dtype(cfg: ModelConfig) -> jnp.dtype:
    return DTYPES[cfg.param_dtype]
