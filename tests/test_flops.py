"""Parameter and FLOP counts: hand count, instantiated model, shipped configs."""

import math
from pathlib import Path

import jax
import pytest
from flax import nnx

from indicfm.config import load_config
from indicfm.model.config import ModelConfig
from indicfm.model.flops import count_active_params, count_params, train_flops_per_token
from indicfm.model.transformer import Transformer

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "model").glob("*.yaml"))

SMALL = ModelConfig(vocab_size=100, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4, d_ff=40,
                    num_experts=6, num_shared_experts=1, top_k=2, d_expert=8, first_dense_layers=1,
                    tie_embeddings=False)


def test_hand_count_small_config():
    # embeddings: 100*16 in + 16*100 out                                     = 3200
    # attention per block: q 16*4*4 + k 16*2*4 + v 16*2*4 + o 4*4*16         = 256+128+128+256 = 768
    # norms per block 2*16 = 32; 3 blocks -> 3*(768+32)                      = 2400
    # dense MLP (1 block): 3*16*40                                          = 1920
    # MoE (2 blocks): router 16*6 + experts 3*6*16*8 + shared 3*16*8 = 96+2304+384 = 2784 -> 5568
    # final norm                                                            = 16
    assert count_params(SMALL) == 3200 + 2400 + 1920 + 5568 + 16  # 13104
    # active: each MoE block uses 2 of 6 experts: minus 2 * (4 * 3*16*8)       = 13104 - 3072
    assert count_active_params(SMALL) == 13104 - 3072
    # FLOPs: matmul params = active - input embedding 1600 - norms (2*3+1)*16 = 10032 - 1600 - 112 = 8320
    # (the output projection 1600 is a matmul and stays); attention 12 * 3 * 4*4 * 32 = 18432
    assert train_flops_per_token(SMALL, seq_len=32) == 6 * 8320 + 18432


def test_tied_embedding_counted_once_in_params_but_as_matmul_in_flops():
    tied = SMALL.model_copy(update={"tie_embeddings": True})
    assert count_params(SMALL) - count_params(tied) == 1600
    assert train_flops_per_token(SMALL, 32) == train_flops_per_token(tied, 32)


def _model_params(cfg: ModelConfig) -> int:
    """Parameters of the actual module tree, from abstract shapes (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_count_matches_instantiated_model():
    assert count_params(SMALL) == _model_params(SMALL)
    loss_free = SMALL.model_copy(update={"loss_free_bias": True, "tie_embeddings": True})
    assert count_params(loss_free) == _model_params(loss_free)  # the bias is not a parameter


def _independent_count(m: ModelConfig) -> int:
    """Count written from the architecture description, per module, without flops.py."""
    embed = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    attn = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    swiglu = lambda hidden: 3 * m.d_model * hidden  # noqa: E731
    moe = m.d_model * m.num_experts + m.num_experts * swiglu(m.d_expert) + swiglu(m.num_shared_experts * m.d_expert)
    blocks = [attn + 2 * m.d_model + (swiglu(m.d_ff) if i < m.first_dense_layers else moe)
              for i in range(m.num_layers)]
    return embed + sum(blocks) + m.d_model


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs(path):
    cfg = load_config(path).model
    assert count_params(cfg) == _independent_count(cfg)
    if cfg.num_moe_layers and cfg.top_k < cfg.num_experts:
        assert count_active_params(cfg) < count_params(cfg)
    else:
        assert count_active_params(cfg) == count_params(cfg)


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow if p.stem.startswith("moe-") else (), id=p.stem) for p in CONFIGS
])
def test_shipped_configs_match_module_tree(path):
    cfg = load_config(path).model
    assert count_params(cfg) == _model_params(cfg)  # abstract shapes: fine even for 30B (slow to trace)


def test_shipped_config_sizes_are_as_advertised():
    sizes = {p.stem: load_config(p).model for p in CONFIGS}
    assert {"tiny-moe", "small-moe", "moe-8b", "moe-30b"} <= set(sizes)
    assert 1e6 < count_params(sizes["tiny-moe"]) < 10e6
    for name, total, active in [("small-moe", 1e9, 0.2e9), ("moe-8b", 8e9, 1e9), ("moe-30b", 30e9, 3e9)]:
        assert 0.8 * total < count_params(sizes[name]) < 1.25 * total, name
        assert 0.8 * active < count_active_params(sizes[name]) < 1.25 * active, name
