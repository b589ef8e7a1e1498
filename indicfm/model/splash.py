"""TPU attention with JAX's Pallas splash-attention kernel: causal, segment-aware, GQA.

Why a kernel of its own on TPU: XLA's attention materialises the ``[B, H, L, L]`` logits in HBM,
while splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``, the kernel MaxText
uses) streams blocks of keys through VMEM and skips the blocks the causal mask rules out entirely,
so it needs no ``L × L`` memory and about half the FLOPs at long sequence lengths.  Packed
documents come in as segment ids, which the kernel takes natively (no ``[B, 1, L, L]`` mask).

A Pallas kernel is opaque to XLA's automatic partitioning, so under a mesh it runs inside
``jax.shard_map``: each device attends over its own rows of the batch and its own heads, as laid out
by the ``batch`` / ``act_heads`` / ``act_kv_heads`` rules of :mod:`indicfm.sharding`.  On a backend
other than TPU the same kernel runs in Pallas's interpreter (slow: for tests on CPU).

Shape legend: B batch, L length, H query heads, K kv heads, R = H / K query heads per kv head,
G head dim.
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import numpy as np

from indicfm.model.platform import target_platform
from indicfm.sharding import current_mesh, logical_to_spec

#: Largest query / key block a kernel step works on (MaxText's default for v4-v6e TPUs).
MAX_BLOCK = 512


def block_size(length: int) -> int:
    """The kernel's block edge for sequences of ``length``: a multiple of 128 dividing it."""
    for block in range(min(MAX_BLOCK, length), 127, -128):
        if length % block == 0 and block % 128 == 0:
            return block
    raise ValueError(
        f"splash attention needs a sequence length that is a multiple of 128 (got {length}); "
        "set model.attention_impl to 'xla' or pad the sequence length (data.seq_len)"
    )


@functools.lru_cache(maxsize=None)
def _kernel(length: int, heads_per_kv_head: int, interpret: bool):
    """One causal MQA kernel: ``R`` query heads sharing one key/value head (cached per shape)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = block_size(length)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    causal = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads_per_kv_head)])

    def build():
        kernel = splash.make_splash_mqa(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.tree.map(np.asarray, kernel)

    # The kernel (a pytree) keeps the block mask's tables as arrays.  This cached one must hold plain
    # NumPy tables: built while a step is traced they would be that trace's tracers, built inside
    # shard_map they would carry its manual sharding into every later use, and under the mesh of an
    # ahead-of-time TPU compile there is no device to put them on.  JAX's trace and mesh contexts
    # are per thread, so a fresh thread builds them eagerly on the host, outside all of those.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(build).result()


def _local_attention(q_BxLxHxG, k_BxLxKxG, v_BxLxKxG, segment_ids_BxL, interpret: bool):
    """Splash attention on the arrays one device holds (no mesh axes involved)."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    B, L, H, G = q_BxLxHxG.shape
    K = k_BxLxKxG.shape[2]
    kernel = _kernel(L, H // K, interpret)
    # The kernel does not scale the logits; it wants heads before length.
    q_BxKxRxLxG = (q_BxLxHxG * G**-0.5).reshape(B, L, K, H // K, G).transpose(0, 2, 3, 1, 4)
    k_BxKxLxG = k_BxLxKxG.transpose(0, 2, 1, 3)
    v_BxKxLxG = v_BxLxKxG.transpose(0, 2, 1, 3)

    def one_row(q_KxRxLxG, k_KxLxG, v_KxLxG, segment_L):
        segments = SegmentIds(q=segment_L, kv=segment_L)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q_KxRxLxG, k_KxLxG, v_KxLxG)

    out_BxKxRxLxG = jax.vmap(one_row)(q_BxKxRxLxG, k_BxKxLxG, v_BxKxLxG, segment_ids_BxL)
    return out_BxKxRxLxG.transpose(0, 3, 1, 2, 4).reshape(B, L, H, G)


def splash_attention(q_BxLxHxG, k_BxLxKxG, v_BxLxKxG, segment_ids_BxL) -> jax.Array:
    """Causal self-attention within segments (keys and queries are the same ``L`` tokens)."""
    interpret = target_platform() != "tpu"
    run = functools.partial(_local_attention, interpret=interpret)
    mesh = current_mesh()
    if mesh is None:
        return run(q_BxLxHxG, k_BxLxKxG, v_BxLxKxG, segment_ids_BxL)
    q_spec = logical_to_spec(("batch", None, "act_heads", None), q_BxLxHxG.shape, mesh)
    kv_spec = logical_to_spec(("batch", None, "act_kv_heads", None), k_BxLxKxG.shape, mesh)
    if q_spec[2] != kv_spec[2]:
        # Query heads split but key/value heads not (too few to split): each device would need the
        # key/value heads of its own query heads only; keep all heads on every device instead.
        q_spec = kv_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
    segment_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec), out_specs=q_spec,
                         check_vma=False)(q_BxLxHxG, k_BxLxKxG, v_BxLxKxG, segment_ids_BxL)

