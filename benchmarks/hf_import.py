"""`indicfm import hf`: accuracy against transformers per architecture, and time and peak host memory
of importing a checkpoint of at least 1 GB.

    python -m benchmarks.hf_import                 # both parts
    python -m benchmarks.hf_import --no-memory     # accuracy only (seconds)

Accuracy: for every golden checkpoint of tests/golden/hf (written by transformers, with the logits
it computed), the imported model's float32 logits: max |delta logit| / max |golden logit| and the
mean KL(transformers || indicfm) over positions.

Memory: a Llama-shaped checkpoint with random float32 weights (default ~1.2 GB: vocab 32000, width
1024, 20 layers, GQA 16/4 heads, MLP 2816, untied) is written into a temporary folder, then
`indicfm import hf` runs in a child process on the CPU; its peak resident memory (the child's
ru_maxrss) is divided by the checkpoint's bytes.  On a CPU mesh the placed model itself lives in
host memory, so 1.0x is the floor; a second copy of the weights would show as 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (the tpu-compile extra) must not start a TPU backend

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "hf"


def accuracy() -> list[dict]:
    import jax
    import jax.numpy as jnp

    from indicfm.config import MeshConfig
    from indicfm.convert.hf_import import imported_model_config, load_hf_model
    from indicfm.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
    rows = []
    for folder in sorted(p for p in GOLDEN.iterdir() if (p / "golden.npz").is_file()):
        golden = np.load(folder / "golden.npz")
        cfg = imported_model_config(folder, param_dtype="float32", compute_dtype="float32", attention_impl="reference")
        model = load_hf_model(folder, mesh, cfg)
        tokens = golden["tokens"]
        B, L = tokens.shape
        logits, _ = model(jnp.asarray(tokens, jnp.int32), jnp.ones((B, L), jnp.int32), jnp.broadcast_to(jnp.arange(L), (B, L)))
        got, want = np.asarray(logits, np.float64), golden["logits"].astype(np.float64)
        log_p = want - want.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        log_q = got - got.max(-1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
        kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
        architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
        rows.append({"name": folder.name, "architecture": architecture,
                     "relative_error": float(np.max(np.abs(got - want)) / np.max(np.abs(want))), "kl": kl})
    return rows


def write_checkpoint(out: Path, vocab: int, width: int, layers: int, heads: int, kv_heads: int, mlp: int) -> int:
    """A Llama-shaped checkpoint of random float32 weights, one shard per layer (and one for the
    embeddings), so writing it never holds more than a layer in memory; returns its bytes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    head_dim = width // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": width,
              "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "rope_theta": 500000.0, "tie_word_embeddings": False}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))

    def draw(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    weight_map: dict[str, str] = {}
    shards = [("model.embed_tokens.weight", (vocab, width)), ("lm_head.weight", (vocab, width)),
              ("model.norm.weight", (width,))]
    file = "model-embeddings.safetensors"
    save_file({n: draw(*s) for n, s in shards}, str(out / file), metadata={"format": "pt"})
    weight_map.update({n: file for n, _ in shards})
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors = {
            f"{p}.input_layernorm.weight": draw(width), f"{p}.post_attention_layernorm.weight": draw(width),
            f"{p}.self_attn.q_proj.weight": draw(heads * head_dim, width),
            f"{p}.self_attn.k_proj.weight": draw(kv_heads * head_dim, width),
            f"{p}.self_attn.v_proj.weight": draw(kv_heads * head_dim, width),
            f"{p}.self_attn.o_proj.weight": draw(width, heads * head_dim),
            f"{p}.mlp.gate_proj.weight": draw(mlp, width), f"{p}.mlp.up_proj.weight": draw(mlp, width),
            f"{p}.mlp.down_proj.weight": draw(width, mlp),
        }
        file = f"model-layer-{i:03d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def _import_peak(src: Path, out: Path, env: dict) -> tuple[int, float]:
    """Peak resident bytes and seconds of `indicfm import hf SRC --output OUT` in a child process
    (its own peak, read from /proc through a wrapper, since ru_maxrss of children is a running max)."""
    wrapper = ("import resource, sys; from indicfm.cli import main; sys.argv = ['indicfm', *sys.argv[1:]]\n"
               "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
               "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\nsys.exit(code)")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, "import", "hf", str(src), "--output", str(out)],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(proc.stdout + proc.stderr)
    peak = int(next(line for line in proc.stdout.splitlines() if line.startswith("PEAK")).split()[1])
    return peak, seconds


def memory(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "run"
        nbytes = write_checkpoint(src, args.vocab, args.width, args.layers, args.heads, args.kv_heads, args.mlp)
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        peak, seconds = _import_peak(src, out, env)
        # the same command on a 40 kB checkpoint: what the process needs with (almost) no weights
        idle, _ = _import_peak(GOLDEN / "llama3", Path(tmp) / "tiny", env)
    return {"checkpoint_bytes": nbytes, "import_seconds": seconds, "peak_rss_bytes": peak,
            "peak_over_checkpoint": peak / nbytes, "process_baseline_bytes": idle,
            "peak_minus_baseline_over_checkpoint": (peak - idle) / nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-memory", action="store_true", help="only the accuracy table")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--tmp", default=None, help="where to write the temporary checkpoint")
    args = parser.parse_args()
    print("architecture            golden       max|dlogit|/max|logit|   KL")
    for row in accuracy():
        print(f"{row['architecture']:<23} {row['name']:<12} {row['relative_error']:>12.2e}            {row['kl']:.2e}")
    if not args.no_memory:
        m = memory(args)
        gib = 2**30
        print(f"\nimport of a {m['checkpoint_bytes'] / gib:.2f} GiB checkpoint: {m['import_seconds']:.1f} s, "
              f"peak RSS {m['peak_rss_bytes'] / gib:.2f} GiB = {m['peak_over_checkpoint']:.2f}x the checkpoint "
              f"(the same import of a 40 kB checkpoint peaks at {m['process_baseline_bytes'] / gib:.2f} GiB; "
              f"above that: {m['peak_minus_baseline_over_checkpoint']:.2f}x)")


if __name__ == "__main__":
    main()
