"""`indicfm generate` and `indicfm export hf` on a run directory laid out like `indicfm train`'s:
a checkpoint saved with ``indicfm.train.checkpoint.Checkpointer`` from an 8-device
(data 2 x expert 2 x tensor 2) mesh, ``config.yaml`` and ``metrics.jsonl`` with held-out bits per
byte.  Restoring must work on any device count, and the export must carry the run's numbers.
"""

import io
import json

import jax
import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

from indicfm.cli import app
from indicfm.config import Config, save_config
from indicfm.model.config import ModelConfig
from indicfm.model.transformer import Transformer

MODEL = dict(
    vocab_size=640, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48,
    num_experts=4, top_k=2, d_expert=16, num_shared_experts=1, first_dense_layers=1,
    compute_dtype="float32", tie_embeddings=False, max_seq_len=64,
)
STEP = 5
BPB = {"hin_Deva": 1.2345, "tam_Taml": 1.5, "mean": 1.36725}


def _tokenizer_bytes(sample_train_dir) -> bytes:
    import sentencepiece as spm

    from indicfm.text import normalize

    lines = []
    for lang in ("hin_Deva", "tam_Taml"):
        text = (sample_train_dir / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:150]
        lines += [normalize(t) for t in text if t.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe",
        normalization_rule_name="identity", byte_fallback=True, character_coverage=1.0,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_train_dir):
    """A run directory with one checkpoint at step STEP, saved from a data x expert x tensor mesh."""
    from indicfm.sharding import make_mesh, state_shardings
    from indicfm.train.checkpoint import Checkpointer, tokenizer_item
    from indicfm.train.optimizer import make_optimizer
    from indicfm.train.state import init_train_state

    workdir = tmp_path_factory.mktemp("run")
    cfg = Config(model=MODEL, mesh={"data": 2, "expert": 2, "tensor": 2})
    cfg.eval.heldout_dir = "samples/heldout"
    mesh = make_mesh(cfg.mesh)
    # random weights drawn with NumPy, then placed sharded (no compiled initialiser needed)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(ModelConfig(**MODEL), rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda leaf: 0.2 * rng.standard_normal(leaf.shape).astype(np.float32), abstract)
    state = jax.device_put(values, state_shardings(abstract, mesh))
    model = nnx.merge(graphdef, state)
    tx = make_optimizer(cfg.optimizer, cfg.trainer.steps, cfg.trainer.max_consecutive_nonfinite)
    _, train_state, _ = init_train_state(model, tx, 0, mesh)

    tokenizer_file = workdir / "tokenizer.model"
    tokenizer_file.write_bytes(_tokenizer_bytes(sample_train_dir))
    checkpointer = Checkpointer(workdir / cfg.checkpoint.dir_name, cfg.checkpoint)
    checkpointer.save(STEP, train_state, {"config": cfg.model_dump(mode="json")}, tokenizer_item(tokenizer_file))
    checkpointer.close()
    save_config(cfg, workdir / "config.yaml")
    records = [{"step": 2, "loss": 5.0}, {"step": STEP, **{f"bpb/{k}": v for k, v in BPB.items()}}]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = {"w_gate": np.asarray(values["blocks"][1]["mlp"]["w_gate_ExDxF"].get_value()),
                "router": np.asarray(values["blocks"][1]["mlp"]["router_DxE"].get_value())}
    return workdir, expected


def test_checkpoint_restores_onto_one_device_and_onto_a_mesh(run_dir):
    """Saved from 8 devices; restored onto 1 device and onto tensor 2 x expert 2: same weights,
    and greedy generation gives the same tokens on both."""
    from indicfm.inference.generate import generate_ids
    from indicfm.inference.load import inference_mesh, load_for_inference

    workdir, expected = run_dir
    outputs = []
    for mesh in (inference_mesh(), inference_mesh(tensor=2, expert=2)):
        loaded = load_for_inference(workdir, mesh=mesh)
        assert loaded.step == STEP
        mlp = loaded.model.blocks[1].mlp
        np.testing.assert_array_equal(np.asarray(mlp.w_gate_ExDxF[...]), expected["w_gate"])
        np.testing.assert_array_equal(np.asarray(mlp.router_DxE[...]), expected["router"])
        assert loaded.tokenizer().vocab_size == 600
        results = generate_ids(loaded.model, [[40, 41, 42], [7]], max_new_tokens=6, eos_id=-1)
        outputs.append([r.token_ids for r in results])
    assert outputs[0] == outputs[1]


def test_generate_command(run_dir, tmp_path):
    workdir, _ = run_dir
    runner = CliRunner()
    prompt = "भारत की राजधानी"
    args = ["generate", "-w", str(workdir), "--prompt", prompt, "--lang", "hin_Deva", "-n", "8", "--temperature", "0", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][0])
    assert record["prompt"] == prompt and record["lang"] == "hin_Deva" and record["step"] == STEP
    assert 1 <= record["tokens"] <= 8 and record["finish_reason"] in ("eos", "length")

    prompts = tmp_path / "prompts.tsv"
    prompts.write_text(f"hin_Deva\t{prompt}\n\ntam_Taml\tதமிழ்நாடு\n", encoding="utf-8")
    result = runner.invoke(app, ["generate", "-w", str(workdir), "--prompts-file", str(prompts), "-n", "4", "--json", "--seed", "3"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["lang"] for r in records] == ["hin_Deva", "tam_Taml"]

    result = runner.invoke(app, ["generate", "-w", str(workdir), "--prompt", "x", "--step", "99"])
    assert result.exit_code == 2 and "no checkpoint for step 99" in " ".join(result.output.split())


def test_export_hf_command(run_dir, tmp_path):
    from indicfm.export.hf import read_safetensors

    workdir, expected = run_dir
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", "hf", "-w", str(workdir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["num_experts"] == 4
    tensors = read_safetensors(out)
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.gate.weight"], expected["router"].T)
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.experts.2.gate_proj.weight"], expected["w_gate"][2].T)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| Hindi | `hin_Deva` | 1.2345 |" in card and "| Tamil | `tam_Taml` | 1.5000 |" in card
    assert "- hin" in card and "step 5" in card  # ISO 639-3 language tag; eval step

    again = CliRunner().invoke(app, ["export", "hf", "-w", str(workdir), "-o", str(out)])
    assert again.exit_code == 2 and "not empty" in " ".join(again.output.split())
