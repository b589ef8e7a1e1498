"""An imported model given an extended vocabulary (`indicfm import hf --tokenizer`, `indicfm import tokenizer`).

The models are the tiny Hugging Face goldens (tests/golden/hf: 101 embedding rows; bos 1, eos 2, pad
0).  The base tokenizer is a byte-level BPE trained here with ``tokenizers`` on a little English and
Hindi (90 entries, ``<pad> <s> </s>`` = 0, 1, 2); extended tokenizers append pieces after its ids,
as added tokens (text) or as vocabulary entries with merges (byte-level form).  Expected rows are
NumPy means of the golden safetensors' rows, the base ids from ``tokenizers`` called directly:
never from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

from indicfm.cli import app
from indicfm.config import MeshConfig
from indicfm.convert.hf_import import imported_model_config, load_hf_model
from indicfm.convert.vocab_resize import (
    VocabularyError,
    extend_vocabulary,
    plan_vocabulary,
    row_multiple,
)
from indicfm.sharding import make_mesh, state_shardings
from indicfm.tokenizer.load import load_tokenizer

GOLDEN = Path(__file__).resolve().parent / "golden" / "hf"
FLOAT32 = {"param_dtype": "float32", "compute_dtype": "float32", "attention_impl": "reference"}
ENGLISH = ["the cat sat on the mat", "a dog and a cat", "the sun is hot", "on the road to the sea", "it is a good day"]
HINDI = ["हिन्दी भाषा", "भारत देश"]
BASE_SIZE = 90
ADDED = [" हिन्दी", "भारत", "न्दी", " देश"]  # word-initial (leading space) and word-internal pieces


def _mesh(**sizes):
    count = int(np.prod(list(sizes.values()))) if sizes else 1
    return make_mesh(MeshConfig(**{"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **sizes}), jax.devices()[:count])


@nnx.jit
def _forward(model, tokens_BxL: jax.Array) -> jax.Array:
    B, L = tokens_BxL.shape
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    return model(tokens_BxL, jnp.ones((B, L), jnp.int32), positions)[0]


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    """Compiled once per model shape: cheaper than op-by-op execution, the same arithmetic."""
    return np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32)), np.float64)


def _golden_tables(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(embedding [V, D], output rows [V, D]) as transformers saved them."""
    from safetensors.numpy import load_file

    tensors = load_file(GOLDEN / name / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    return embed, tensors.get("lm_head.weight", embed)


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Path]:
    """base, ``added`` (pieces as added tokens), ``merged`` (pieces as vocabulary entries + merges),
    ``other`` (same size, different strings) tokenizer.json files, each alone in its folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("vocab_toks")

    def save(tok_or_json, name: str) -> Path:
        (root / name).mkdir()
        path = root / name / "tokenizer.json"
        if isinstance(tok_or_json, dict):
            path.write_text(json.dumps(tok_or_json, ensure_ascii=False), encoding="utf-8")
        else:
            tok_or_json.save(str(path))
        return path

    def trained(lines: list[str]) -> Tokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=BASE_SIZE, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
        tok.train_from_iterator(lines, trainer)
        return tok

    base = trained(ENGLISH * 20 + HINDI)
    assert base.get_vocab_size() == BASE_SIZE
    paths = {"base": save(base, "base")}
    added = Tokenizer.from_str(base.to_str())
    added.add_tokens(ADDED)
    paths["added"] = save(added, "added")

    data = json.loads(base.to_str())
    pieces = base.encode(" हिन्दी").tokens  # Ġà¤ ¹ à¤¿ à¤¨ ...: merge neighbours into new entries
    new = [(pieces[0], pieces[1]), (pieces[2], pieces[3]), (pieces[0] + pieces[1], pieces[2] + pieces[3])]
    for left, right in new:
        data["model"]["vocab"][left + right] = len(data["model"]["vocab"])
        data["model"]["merges"].append([left, right])
    paths["merged"] = save(data, "merged")
    other = trained(ENGLISH[::-1] * 7 + HINDI * 3 + ["zebra quiz"] * 9)
    other.add_tokens(ADDED)
    paths["other"] = save(other, "other")
    return paths


def _base_ids(base: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(base)).encode(text, add_special_tokens=False).ids


def _expected_texts(toks: dict[str, Path], kind: str) -> list[str]:
    """The new pieces' texts, worked out from how the test made them."""
    if kind == "added":
        return ADDED
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(toks["base"]))
    ids = base.encode(" हिन्दी").ids
    return [base.decode(ids[0:2]), base.decode(ids[2:4]), base.decode(ids[0:4])]


@pytest.fixture(scope="module")
def imported() -> dict[str, object]:
    out = {}
    for name in ("llama3", "llama_tied"):
        cfg = imported_model_config(GOLDEN / name, **FLOAT32)
        out[name] = load_hf_model(GOLDEN / name, _mesh(), cfg)
    return out


@pytest.mark.parametrize("name", ["llama3", "llama_tied"])
@pytest.mark.parametrize("kind", ["added", "merged"])
def test_base_rows_are_bit_identical_and_new_rows_are_means_of_the_base_encoding(toks, imported, name, kind):
    base, extended = load_tokenizer(toks["base"]), load_tokenizer(toks[kind])
    plan = plan_vocabulary(base, extended, 101)
    model = extend_vocabulary(imported[name], plan, _mesh())
    texts = _expected_texts(toks, kind)
    size = BASE_SIZE + len(texts)
    assert (plan.size, plan.rows, model.cfg.vocab_size) == (size, 128, 128)

    embed, output = _golden_tables(name)
    got_embed = np.asarray(model.embed_VxD[...])
    got_output = got_embed if model.cfg.tie_embeddings else np.asarray(model.unembed_DxV[...]).T
    assert model.cfg.tie_embeddings == (name == "llama_tied")
    for got, table in ((got_embed, embed), (got_output, output)):
        assert got.shape == (128, embed.shape[1])
        np.testing.assert_array_equal(got[:BASE_SIZE], table[:BASE_SIZE])  # bit for bit
        for n, text in enumerate(texts):
            ids = _base_ids(toks["base"], text)
            assert ids and all(i < BASE_SIZE for i in ids)
            np.testing.assert_allclose(got[BASE_SIZE + n], table[ids].astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
        fill = table[:BASE_SIZE].astype(np.float64).mean(0)
        np.testing.assert_allclose(got[size:], np.broadcast_to(fill, (128 - size, fill.size)), rtol=1e-6, atol=1e-7)


def test_the_extended_tokenizer_uses_the_new_pieces(toks):
    extended = load_tokenizer(toks["merged"])
    assert any(i >= BASE_SIZE for i in extended.encode("भारत हिन्दी"))
    english = "the cat sat on the mat"
    assert extended.encode(english) == load_tokenizer(toks["base"]).encode(english)


@pytest.mark.parametrize(("name", "scan"), [("llama3", False), ("qwen3_moe", True)])
def test_logits_over_base_ids_are_the_originals(toks, name, scan):
    cfg = imported_model_config(GOLDEN / name, **FLOAT32, scan_layers=scan)
    original = load_hf_model(GOLDEN / name, _mesh(), cfg)
    plan = plan_vocabulary(load_tokenizer(toks["base"]), load_tokenizer(toks["added"]), cfg.vocab_size)
    extended = extend_vocabulary(original, plan, _mesh())
    assert (extended.scanned_blocks is not None) == scan
    tokens = np.load(GOLDEN / name / "golden.npz")["tokens"] % BASE_SIZE
    before, after = _logits(original, tokens)[..., :BASE_SIZE], _logits(extended, tokens)[..., :BASE_SIZE]
    assert np.max(np.abs(after - before)) / np.max(np.abs(before)) <= 1e-5


def test_sentencepiece_style_pieces_keep_their_leading_space(tmp_path):
    """A metaspace (Llama-2 style) base: ``▁word`` is word-initial, ``word`` word-internal; each new
    row's sources are the base BPE model's own segmentation of exactly that piece."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(ENGLISH * 20 + HINDI, trainer)
    (tmp_path / "base.json").write_text(tok.to_str(), encoding="utf-8")
    data = json.loads(tok.to_str())
    new = ["▁हिन्दी", "न्दी", "▁भारत"]
    for piece in new:
        data["model"]["vocab"][piece] = len(data["model"]["vocab"])
    (tmp_path / "ext.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    base = load_tokenizer(tmp_path / "base.json")
    plan = plan_vocabulary(base, load_tokenizer(tmp_path / "ext.json"), 101)
    reference = Tokenizer.from_file(str(tmp_path / "base.json")).model
    assert [list(s) for s in plan.sources] == [[t.id for t in reference.tokenize(p)] for p in new]
    assert plan.sources[0][0] != plan.sources[1][0]  # "▁ह..." and "न..." start differently


def test_eight_devices_place_the_resized_model_like_one(toks, imported):
    plan = plan_vocabulary(load_tokenizer(toks["base"]), load_tokenizer(toks["added"]), 101)
    mesh = _mesh(fsdp=4, tensor=2)
    assert row_multiple(mesh) == 128
    assert row_multiple(jax.sharding.Mesh(np.array(jax.devices()[:6]).reshape(1, 2, 1, 3),
                                          ("data", "fsdp", "expert", "tensor"))) == 384
    on_one = extend_vocabulary(imported["llama3"], plan, _mesh())
    on_eight = extend_vocabulary(load_hf_model(GOLDEN / "llama3", mesh, imported["llama3"].cfg), plan, mesh)
    state = nnx.state(on_eight)
    expected = dict(jax.tree_util.tree_leaves_with_path(state_shardings(state, mesh)))
    many = dict(jax.tree_util.tree_leaves_with_path(state))
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(on_one)):
        assert many[path].sharding.is_equivalent_to(expected[path], many[path].ndim), path
        np.testing.assert_array_equal(np.asarray(many[path]), np.asarray(value), err_msg=str(path))
    assert not on_eight.embed_VxD[...].sharding.is_fully_replicated


def test_a_tokenizer_that_does_not_extend_the_base_is_refused(toks):
    base = load_tokenizer(toks["base"])
    with pytest.raises(VocabularyError, match="does not extend"):
        plan_vocabulary(base, load_tokenizer(toks["other"]), 101, extended_name=str(toks["other"]))
    with pytest.raises(VocabularyError, match="adds no token"):
        plan_vocabulary(base, base, 101)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def source(tmp_path_factory, toks) -> Path:
    """The llama3 golden with the base tokenizer and a tokenizer_config.json naming its special tokens."""
    src = tmp_path_factory.mktemp("vocab_src") / "llama3"
    shutil.copytree(GOLDEN / "llama3", src)
    shutil.copy(toks["base"], src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                                           "chat_template": "kept"}))
    return src


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def extended_run(tmp_path_factory, source, toks) -> Path:
    out = tmp_path_factory.mktemp("vocab_runs") / "extended"
    result = _invoke("import", "hf", str(source), "--tokenizer", str(toks["merged"]), "--output", str(out),
                     "--set", "model.compute_dtype=float32")
    assert result.exit_code == 0, result.output
    assert "90 -> 93 entries" in " ".join(result.output.split())
    return out


def _restored(workdir: Path):
    from indicfm.train.saved_model import restore_model

    return restore_model(workdir, _mesh())


def test_import_hf_with_a_tokenizer_writes_a_run_with_that_tokenizer(extended_run, toks, imported):
    from indicfm.config import load_config
    from indicfm.train.checkpoint import stored_tokenizer

    cfg = load_config(extended_run / "config.yaml")
    assert Path(cfg.tokenizer.model_file) == extended_run / "tokenizer" / "tokenizer.json"
    assert (extended_run / "tokenizer" / "tokenizer.json").read_bytes() == toks["merged"].read_bytes()
    assert json.loads((extended_run / "tokenizer" / "tokenizer_config.json").read_text())["chat_template"] == "kept"
    assert cfg.model.vocab_size == 128
    saved = _restored(extended_run)
    stored = stored_tokenizer(saved.tokenizer)
    assert stored.data == toks["merged"].read_bytes() and saved.meta.tokenizer_sha256 == saved.tokenizer["sha256"]
    assert saved.meta.source["vocabulary"] == 93
    in_memory = extend_vocabulary(imported["llama3"], plan_vocabulary(load_tokenizer(toks["base"]),
                                                                      load_tokenizer(toks["merged"]), 101), _mesh())
    np.testing.assert_array_equal(np.asarray(saved.model.unembed_DxV[...]), np.asarray(in_memory.unembed_DxV[...]))

    from indicfm.inference.generate import generate_ids

    prompt = load_tokenizer(toks["merged"]).encode("the cat हिन्दी")
    (generation,) = generate_ids(saved.model, [prompt], max_new_tokens=8, temperature=1.0, eos_id=2, pad_id=0,
                                 vocab_limit=93)
    assert len(generation.token_ids) and max(generation.token_ids) < 93  # rows 93..127 are never sampled


def test_import_tokenizer_extends_an_imported_run(tmp_path, source, toks):
    plain = tmp_path / "plain"
    assert _invoke("import", "hf", str(source), "--output", str(plain)).exit_code == 0
    out = tmp_path / "extended"
    result = _invoke("import", "tokenizer", "--from", str(plain), "--tokenizer", str(toks["added"]), "--output", str(out))
    assert result.exit_code == 0, result.output
    saved = _restored(out)
    embed, _ = _golden_tables("llama3")
    got = np.asarray(saved.model.embed_VxD[...])
    np.testing.assert_array_equal(got[:BASE_SIZE], embed[:BASE_SIZE])
    ids = _base_ids(toks["base"], ADDED[0])
    np.testing.assert_allclose(got[BASE_SIZE], embed[ids].astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    from indicfm.config import load_config

    assert load_config(out / "config.yaml").data.cache_dir is None  # prepared again with the new tokenizer


def _bad(tmp_path: Path, source: Path, tokenizer: Path) -> str:
    out = tmp_path / "bad"
    result = _invoke("import", "hf", str(source), "--tokenizer", str(tokenizer), "--output", str(out))
    assert result.exit_code == 2, result.output
    assert not (out / "config.yaml").exists() and not (out / "initial").exists()  # nothing `train` would pick up
    return " ".join(result.output.split())


def test_bad_tokenizers_are_named_and_exit_2(tmp_path, source, toks):
    assert "does not extend" in _bad(tmp_path, source, toks["other"]) and "other" in _bad(tmp_path, source, toks["other"])
    assert "adds no token" in _bad(tmp_path, source, toks["base"])
    missing = tmp_path / "missing" / "tokenizer.json"
    assert "cannot read" in _bad(tmp_path, source, missing) and "missing" in _bad(tmp_path, source, missing)
    garbage = tmp_path / "garbage" / "tokenizer.json"
    garbage.parent.mkdir()
    garbage.write_text("{not json")
    assert "garbage" in _bad(tmp_path, source, garbage)
    specials = tmp_path / "specials"
    shutil.copytree(toks["added"].parent, specials)
    (specials / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>", "bos_token": "<s>"}))
    assert "eos token" in _bad(tmp_path, source, specials / "tokenizer.json")


@pytest.mark.slow
def test_the_extended_run_trains_on_data_prepared_with_its_tokenizer_and_generates(extended_run, tmp_path,
                                                                                   sample_train_dir, toks):
    from indicfm.config import load_config
    from indicfm.data.cache import read_metadata, read_rows
    from indicfm.storage import file_sha256

    run = tmp_path / "run"
    shutil.copytree(extended_run, run)  # the module's run stays untrained for the other tests
    (tmp_path / "in").mkdir()
    for lang in ("hin_Deva", "eng_Latn"):  # a few lines: 2 steps of 8 rows need little text
        lines = (sample_train_dir / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:60]
        (tmp_path / "in" / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = [f"data.inputs=[{tmp_path / 'in'}]", "data.seq_len=64", "data.workers=1", "trainer.steps=2",
                "trainer.global_batch_size=8", "optimizer.warmup_steps=1", "logging.progress=false",
                "checkpoint.every_steps=2", "trainer.compilation_cache_dir=null", "mesh.data=-1", "eval.heldout_dir=null"]
    result = _invoke("train", "--workdir", str(run), *[a for s in settings for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    cfg = load_config(run / "config.yaml")
    meta = read_metadata(cfg.data.cache_dir)
    assert meta.metadata["tokenizer_sha256"] == file_sha256(toks["merged"])
    rows = read_rows(cfg.data.cache_dir, "hin_Deva", slice(0, meta.languages["hin_Deva"]["rows"]))
    assert rows.tokens.max() >= BASE_SIZE  # Hindi text uses the new pieces
    assert (run / "checkpoints" / "2").is_dir()
    result = _invoke("generate", "--workdir", str(run), "--prompt", "भारत", "-n", "4", "--json")
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_export_hf_of_the_extended_run_loads_in_transformers(extended_run, toks, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    result = _invoke("export", "hf", "--workdir", str(extended_run), "--output", str(out))
    assert result.exit_code == 0, result.output
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the cat भारत हिन्दी"
    ids = load_tokenizer(toks["merged"]).encode(text)
    assert hf_tok(text, add_special_tokens=False).input_ids == ids and max(ids) >= BASE_SIZE
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == 128
    tokens = np.array([[1, *ids]])
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy().astype(np.float64)
    ours = _logits(_restored(extended_run).model, tokens)
    assert np.max(np.abs(theirs - ours)) / np.max(np.abs(ours)) <= 1e-4


def test_a_sentencepiece_model_base_gives_each_piece_its_own_bytes(tmp_path):
    """A SentencePiece ``.model`` base (Llama-2, Gemma): word-initial pieces are the model's own
    encoding of the word; a word-internal piece is covered by pieces without a leading ``▁``."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    (tmp_path / "text.txt").write_text("\n".join(ENGLISH * 20 + HINDI * 5) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "base"),
                                   vocab_size=60, model_type="bpe", character_coverage=1.0,
                                   normalization_rule_name="identity", minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "base.model").read_bytes())
    new = ["▁हिन्दी", "न्दी", "▁भारत"]
    for piece in new:
        proto.pieces.add(piece=piece, score=-100.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL)
    (tmp_path / "ext.model").write_bytes(proto.SerializeToString())
    base = load_tokenizer(tmp_path / "base.model")
    plan = plan_vocabulary(base, load_tokenizer(tmp_path / "ext.model"), 101)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "base.model"))
    assert list(plan.sources[0]) == sp.encode("हिन्दी") and list(plan.sources[2]) == sp.encode("भारत")
    internal = [sp.id_to_piece(i) for i in plan.sources[1]]
    assert "".join(internal) == "न्दी" and not internal[0].startswith("▁")
