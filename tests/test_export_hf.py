"""Export to a Hugging Face Qwen2-MoE directory, checked against an independent NumPy forward pass.

``indicfm.export.reference`` implements Qwen2-MoE from its published definition and reads only the
exported files (config.json + safetensors); its logits must match indicfm's own forward pass.
"""

import io
import json

import jax
import numpy as np
import pytest
from flax import nnx

from indicfm.export.hf import ExportError, check_exportable, export_hf, export_model, hf_tensors, read_safetensors
from indicfm.export.reference import qwen2_moe_logits
from indicfm.inference.decode import inference_config
from indicfm.model.config import ModelConfig
from indicfm.model.transformer import Transformer
from indicfm.tokenizer.load import TokenizerFile

from helpers import random_model

BASE = dict(
    vocab_size=640, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48,
    num_experts=4, top_k=2, d_expert=16, compute_dtype="float32", param_dtype="float32", max_seq_len=64,
    attention_impl="reference", rope_theta=500.0, norm_eps=1e-5,
)
VARIANTS = {
    # untied output, a shared expert, a dense first layer, head_dim * heads != d_model
    "shared-untied": dict(num_shared_experts=1, first_dense_layers=1, tie_embeddings=False, head_dim=12),
    # tied embeddings, no shared expert, every layer MoE, trained with capacity dispatch
    "tied-all-moe": dict(num_shared_experts=0, first_dense_layers=0, tie_embeddings=True, dispatch="capacity"),
}
SEQUENCES = [[5, 17, 200, 3, 44, 44, 9, 120, 7], [250, 1, 2, 3], list(range(10, 40))]


def train_small_tokenizer(sample_train_dir, model_type: str = "bpe") -> bytes:
    """A small SentencePiece model with indicfm's recipe flags and special ids, trained on two
    shipped samples (the other scripts then go through byte fallback)."""
    import sentencepiece as spm

    from indicfm.text import normalize

    lines = []
    for lang in ("hin_Deva", "tam_Taml"):
        text = (sample_train_dir / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:150]
        lines += [normalize(t) for t in text if t.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type=model_type,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_file(data: bytes) -> TokenizerFile:
    """A SentencePiece model as the run's tokenizer (what a checkpoint stores)."""
    return TokenizerFile(data, "tokenizer.model")


@pytest.fixture(scope="module")
def tokenizer_bytes(sample_train_dir) -> bytes:
    return train_small_tokenizer(sample_train_dir)


def _random_model(overrides: dict, seed: int = 0) -> Transformer:
    return random_model(inference_config(ModelConfig(**{**BASE, **overrides})), seed)


@nnx.jit
def _forward(model, tokens, segment_ids, positions):
    return model(tokens, segment_ids, positions)[0]


def _indicfm_logits(model: Transformer, sequences: list[list[int]]) -> list[np.ndarray]:
    """indicfm's forward pass on right-padded rows (one compile); padding is invisible to the
    causal positions before it."""
    L = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), L), np.int32)
    segment_ids = np.zeros_like(tokens)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = sequence
        segment_ids[row, : len(sequence)] = 1
    positions = np.broadcast_to(np.arange(L, dtype=np.int32), tokens.shape)
    logits = np.asarray(_forward(model, tokens, segment_ids, positions))
    return [logits[row, : len(sequence)] for row, sequence in enumerate(sequences)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exported_model_reproduces_indicfm_logits(variant, tokenizer_bytes, tmp_path):
    model = _random_model(VARIANTS[variant])
    export_model(model, tmp_path / "hf", tokenizer=sentencepiece_file(tokenizer_bytes), max_shard_size=40_000)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tensors = read_safetensors(tmp_path / "hf")
    for sequence, expected in zip(SEQUENCES, _indicfm_logits(model, SEQUENCES)):
        got = qwen2_moe_logits(tensors, config, np.asarray(sequence))
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) < 1e-4, variant


def test_config_and_files(tokenizer_bytes, tmp_path):
    import sentencepiece as spm

    model = _random_model(VARIANTS["shared-untied"])
    out = tmp_path / "hf"
    result = export_model(model, out, tokenizer=sentencepiece_file(tokenizer_bytes), max_shard_size=40_000)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["model_type"] == "qwen2_moe"
    assert config["mlp_only_layers"] == [0] and config["decoder_sparse_step"] == 1
    assert config["norm_topk_prob"] is False and config["num_experts_per_tok"] == 2
    assert config["head_dim"] == 12 and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is False and config["shared_expert_intermediate_size"] == 16
    sp = spm.SentencePieceProcessor(model_proto=tokenizer_bytes)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)

    # sharded: every tensor in exactly one listed shard, all shards present
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert set(index["weight_map"]) == set(read_safetensors(out)) and len(index["weight_map"]) == result.num_tensors
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]
    assert "model.layers.0.mlp.gate_proj.weight" in index["weight_map"]  # the dense first layer

    assert (out / "tokenizer.model").read_bytes() == tokenizer_bytes
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["add_bos_token"] is True and tok_config["add_eos_token"] is False  # as training documents begin
    assert tok_config["eos_token"] == sp.id_to_piece(3) and tok_config["pad_token"] == sp.id_to_piece(0)


def test_bfloat16_export(tokenizer_bytes, tmp_path):
    import ml_dtypes

    model = _random_model(VARIANTS["tied-all-moe"])
    export_model(model, tmp_path, tokenizer=sentencepiece_file(tokenizer_bytes), dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = read_safetensors(tmp_path)
    assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    embed = np.asarray(model.embed_VxD[...])
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], embed.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_json_encodes_like_indicfm(model_type, sample_train_dir, sample_heldout_dir, tmp_path):
    """tokenizer.json on raw text == indicfm's NFC + SentencePiece, on every shipped sample line
    (16 languages; most scripts are unseen by this small tokenizer, so byte fallback is exercised)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from indicfm.export.hf_tokenizer import write_tokenizer_files
    from indicfm.text import normalize

    data = train_small_tokenizer(sample_train_dir, model_type)
    write_tokenizer_files(sentencepiece_file(data).load(), tmp_path, model_max_length=64)
    fast = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_proto=data)
    lines = [line for f in sorted(sample_heldout_dir.glob("*.dev")) for line in f.read_text(encoding="utf-8").splitlines()]
    lines += [line for f in sorted(sample_train_dir.glob("*.txt")) for line in f.read_text(encoding="utf-8").splitlines()[:20]]
    lines += ["two  spaces, digits 2024 and a ZWJ: क्‍ष", "\u0915\u093c (not NFC)"]
    assert len(lines) > 3000
    expected = sp.encode([normalize(line) for line in lines])
    got = [e.ids for e in fast.encode_batch(lines, add_special_tokens=False)]
    mismatches = [line for line, a, b in zip(lines, expected, got) if a != b]
    assert not mismatches, mismatches[:3]
    for line, ids in zip(lines[::50], got[::50]):
        assert fast.decode(ids) == sp.decode(sp.encode(normalize(line)))
    # With special tokens, a text is presented as training documents begin: [BOS] tokens.
    assert fast.encode(lines[0]).ids == [sp.bos_id()] + expected[0]


def test_unexpressible_options_are_refused():
    with pytest.raises(ExportError, match="model.router=sigmoid"):
        check_exportable(ModelConfig(**{**BASE, "router": "sigmoid"}))
    with pytest.raises(ExportError, match="model.loss_free_bias"):
        check_exportable(ModelConfig(**{**BASE, "loss_free_bias": True}))
    notes = check_exportable(ModelConfig(**{**BASE, "dispatch": "capacity"}))
    assert any("dropless" in n for n in notes)


def test_export_refuses_a_non_empty_output(tokenizer_bytes, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_model(_random_model(VARIANTS["tied-all-moe"]), tmp_path, tokenizer=sentencepiece_file(tokenizer_bytes))


def _scanned_and_unrolled(overrides: dict, seed: int = 5) -> tuple[Transformer, Transformer]:
    """A random model in the scanned layout (model.scan_layers) and its unrolled equivalent, built
    here from flat paths (independently of ``indicfm.model.layout``): unrolled block
    ``first_dense_layers + n`` takes row ``n`` of every stacked array."""
    cfg = inference_config(ModelConfig(**{**BASE, "num_layers": 4, **overrides}))
    scanned = random_model(cfg.model_copy(update={"scan_layers": True}), seed)
    assert scanned.scanned_blocks is not None
    stacked = {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(scanned))}
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    values = []
    for path, var in nnx.to_flat_state(abstract):
        if path[0] == "blocks" and path[1] >= cfg.first_dense_layers:
            value = stacked[("scanned_blocks", *path[2:])][path[1] - cfg.first_dense_layers]
        else:
            value = stacked[path]
        values.append((path, var.replace(value)))
    return scanned, nnx.merge(graphdef, nnx.from_flat_state(values))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_scanned_model_exports_the_tensors_of_its_unrolled_equivalent(variant):
    scanned, unrolled = _scanned_and_unrolled(VARIANTS[variant])
    expected = hf_tensors(unrolled)
    got = hf_tensors(scanned)
    assert sorted(got) == sorted(expected)
    assert "model.layers.3.mlp.experts.3.down_proj.weight" in got
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_an_exported_scanned_model_reproduces_its_logits(tokenizer_bytes, tmp_path):
    scanned, _ = _scanned_and_unrolled(VARIANTS["shared-untied"])
    export_model(scanned, tmp_path / "hf", tokenizer=sentencepiece_file(tokenizer_bytes))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["mlp_only_layers"] == [0]
    tensors = read_safetensors(tmp_path / "hf")
    for sequence, expected in zip(SEQUENCES, _indicfm_logits(scanned, SEQUENCES)):
        np.testing.assert_allclose(qwen2_moe_logits(tensors, config, np.asarray(sequence)), expected, atol=1e-4)


def test_export_hf_of_a_scanned_checkpoint(tokenizer_bytes, tmp_path):
    """``indicfm export hf`` on a run trained with model.scan_layers: the checkpoint holds stacked
    arrays; the export holds the unrolled equivalent's per-layer tensors."""
    from indicfm.config import Config
    from indicfm.model.transformer import param_layout
    from indicfm.sharding import make_mesh
    from indicfm.train.checkpoint import Checkpointer, tokenizer_item
    from indicfm.train.checkpoint_meta import PARAM_LAYOUT_KEY
    from indicfm.train.optimizer import make_optimizer
    from indicfm.train.state import init_train_state

    scanned, unrolled = _scanned_and_unrolled(VARIANTS["tied-all-moe"])
    cfg = Config(model=scanned.cfg.model_dump(), mesh={"data": 1})
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    tx = make_optimizer(cfg.optimizer, cfg.trainer.steps, cfg.trainer.max_consecutive_nonfinite)
    _, train_state, _ = init_train_state(scanned, tx, 0, mesh)
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_bytes)
    checkpointer = Checkpointer(tmp_path / "run" / cfg.checkpoint.dir_name, cfg.checkpoint)
    meta = {"config": cfg.model_dump(mode="json"), PARAM_LAYOUT_KEY: param_layout(cfg.model)}
    checkpointer.save(3, train_state, meta, tokenizer_item(tmp_path / "tokenizer.model"))
    checkpointer.close()

    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert result.step == 3
    got = read_safetensors(tmp_path / "hf")
    expected = hf_tensors(unrolled)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.slow
def test_transformers_loads_the_export_and_matches(tokenizer_bytes, tmp_path):
    """With the optional `export` extra (torch + transformers): AutoModelForCausalLM on OUT."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for variant in sorted(VARIANTS):
        model = _random_model(VARIANTS[variant])
        out = tmp_path / variant
        export_model(model, out, tokenizer=sentencepiece_file(tokenizer_bytes), max_shard_size=40_000)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
        hf_model.eval()
        for sequence, expected in zip(SEQUENCES, _indicfm_logits(model, SEQUENCES)):
            with torch.no_grad():
                got = hf_model(torch.tensor([sequence])).logits[0].numpy()
            assert np.max(np.abs(got - expected)) < 1e-4, variant
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        import sentencepiece as spm

        from indicfm.text import normalize

        sp = spm.SentencePieceProcessor(model_proto=tokenizer_bytes)
        text = "भारत एक विशाल देश है \u0915\u093c"
        assert tokenizer(text).input_ids == [sp.bos_id()] + sp.encode(normalize(text))
