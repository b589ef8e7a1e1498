"""Write the tiny Hugging Face checkpoints and the golden outputs tests/test_hf_import.py compares with.

Run from the repository root with torch and transformers installed (``pip install torch==2.13.0
transformers``; any other torch spec pulls a CUDA build of several GB):

    python tests/golden/hf/make_goldens.py [--check]

For each architecture indicfm imports, a 2-3 layer model with random weights (every weight drawn
afresh, norms and biases too, so none is at its neutral initial value), grouped-query attention and
odd sizes, is saved with ``save_pretrained`` (float32 safetensors) into ``tests/golden/hf/NAME/``
next to ``golden.npz``: the token ids, transformers' float32 logits for them (eager attention) and
a 16-token greedy continuation of the first row's first 6 tokens.  ``--check`` (the slow test)
recomputes everything in a temporary folder and compares it with the committed files instead of
writing.  This script is the only code that produces the expected values: indicfm is never called.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 20261207
BATCH, LENGTH, PROMPT, NEW_TOKENS = 2, 12, 6, 16

COMMON = dict(vocab_size=101, hidden_size=20, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=6, intermediate_size=28, rms_norm_eps=1e-5, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def configs():
    import transformers as t

    return {
        # Llama 3.x: llama3 RoPE scaling with a band of blended frequencies (theta 500: wavelengths
        # 6.3, 49.9, 396 against 16 and 64), untied embeddings
        "llama3": t.LlamaConfig(**COMMON, rope_theta=500.0, tie_word_embeddings=False,
                                rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        # SmolLM2 / TinyLlama style: tied embeddings, plain RoPE, 3 layers
        "llama_tied": t.LlamaConfig(**{**COMMON, "num_hidden_layers": 3}, rope_theta=10000.0, tie_word_embeddings=True),
        "mistral": t.MistralConfig(**COMMON, rope_theta=1000.0, sliding_window=None, tie_word_embeddings=False),
        "qwen2": t.Qwen2Config(**COMMON, rope_theta=1000.0, tie_word_embeddings=True, use_sliding_window=False),
        "qwen3": t.Qwen3Config(**COMMON, rope_theta=1000.0, tie_word_embeddings=False, attention_bias=False),
        "mixtral": t.MixtralConfig(**{**COMMON, "intermediate_size": 14}, num_local_experts=4, num_experts_per_tok=2,
                                   rope_theta=1000.0, sliding_window=None, tie_word_embeddings=False),
        "qwen2_moe": t.Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 3}, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=10, shared_expert_intermediate_size=18,
                                      mlp_only_layers=[0], decoder_sparse_step=1, norm_topk_prob=False,
                                      rope_theta=1000.0, tie_word_embeddings=False, use_sliding_window=False),
        "qwen3_moe": t.Qwen3MoeConfig(**COMMON, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=10,
                                      norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1,
                                      rope_theta=1000.0, tie_word_embeddings=True),
    }


def build(name: str, config, out: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(SEED)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # a plain loop over experts: the reference, not a fused kernel
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight") or "layernorm" in pname:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(3, config.vocab_size, size=(BATCH, LENGTH)).astype(np.int64)
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.float().numpy()
        prompt = torch.tensor(tokens[:1, :PROMPT])
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    np.savez(out / "golden.npz", tokens=tokens, logits=logits, greedy=generated[0, PROMPT:].numpy())
    (out / "made_by.json").write_text(json.dumps(
        {"script": "tests/golden/hf/make_goldens.py", "transformers": transformers.__version__,
         "torch": torch.__version__, "architecture": type(model).__name__}, indent=1) + "\n")


def check(name: str, config) -> list[str]:
    """Rebuild ``name`` in a temporary folder; differences from the committed files."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        build(name, config, Path(tmp))
        fresh, committed = np.load(Path(tmp) / "golden.npz"), np.load(HERE / name / "golden.npz")
        for key in ("tokens", "greedy"):
            if not np.array_equal(fresh[key], committed[key]):
                problems.append(f"{name}: {key} differs")
        if not np.allclose(fresh["logits"], committed["logits"], rtol=1e-5, atol=1e-5):
            problems.append(f"{name}: logits differ")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="recompute and compare instead of writing")
    parser.add_argument("--only", action="append", help="architecture name(s) to build")
    args = parser.parse_args()
    problems = []
    for name, config in configs().items():
        if args.only and name not in args.only:
            continue
        if args.check:
            problems += check(name, config)
        else:
            shutil.rmtree(HERE / name, ignore_errors=True)
            build(name, config, HERE / name)
            print(f"wrote {HERE / name}")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
