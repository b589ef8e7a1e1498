"""Any tokenizer an open model comes with: a Hugging Face ``tokenizer.json`` through data prepare,
training with its bits-per-byte eval, generate, export hf, tokenizer eval and import hf.

The tokenizer is a byte-level BPE trained here with the ``tokenizers`` library on the shipped sample,
its special tokens added after the vocabulary, as Llama-3 has them (``<|begin_of_text|>`` = 1000,
``<|end_of_text|>`` = 1001: eos is not indicfm's fixed 3) and with no pad or unk.  Expected ids come
from calling ``tokenizers`` directly on the NFC-normalised documents, never from indicfm's output.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from indicfm.cli import app
from indicfm.data.cache import read_metadata, read_rows
from indicfm.text import ZWJ, ZWNJ
from indicfm.tokenizer.load import load_tokenizer

from prepare_checks import drop_reasons

VOCAB = 1000
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
BOS_ID, EOS_ID = VOCAB, VOCAB + 1
LANGS = ["hin_Deva", "mal_Mlym", "tam_Taml", "urd_Arab", "eng_Latn"]
SEQ_LEN = 64
TINY_RUN = [
    "model.vocab_size=1024", "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.head_dim=16", "model.d_ff=64", "model.num_experts=1", "model.top_k=1", "model.first_dense_layers=2",
    "model.compute_dtype=float32", "model.max_seq_len=64", "data.seq_len=64",
    "data.workers=1", "trainer.global_batch_size=8", "trainer.steps=2", "checkpoint.every_steps=2",
    "optimizer.warmup_steps=1", "logging.progress=false", "mesh.data=-1", "trainer.compilation_cache_dir=null",
    "eval.every_steps=2", "eval.heldout_dir=samples/heldout", "eval.max_lines_per_language=4",
    "eval.languages=[hin_Deva,mal_Mlym]",
]


def _nfc_lines(files) -> list[str]:
    return [unicodedata.normalize("NFC", line) for f in files for line in f.read_text(encoding="utf-8").splitlines()]


def _reference(path: Path):
    """``tokenizers`` itself, as indicfm promises to use it: special tokens' text in a document is
    text (``encode_special_tokens``), none added (``add_special_tokens=False``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


def _flat(output: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(output.split())


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, sample_train_dir) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_nfc_lines(sorted(sample_train_dir.glob("*.txt"))), trainer)
    assert tok.get_vocab_size() == VOCAB
    tok.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    path = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_train_dir) -> Path:
    out = tmp_path_factory.mktemp("hf_corpus")
    for lang in LANGS:
        shutil.copy(sample_train_dir / f"{lang}.txt", out)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus, tokenizer_json):
    out = tmp_path_factory.mktemp("hf_cache") / "cache"
    result = CliRunner().invoke(app, ["data", "prepare", "-i", str(corpus), "-t", str(tokenizer_json), "-o", str(out),
                                      "--seq-len", str(SEQ_LEN), "--workers", "1"])
    assert result.exit_code == 0, result.output
    return out, _flat(result.output)


def _documents_in_cache(cache: Path, lang: str) -> list[list[int]]:
    """The cache's documents of ``lang``: its rows' real tokens cut where a position is 0."""
    rows = read_rows(cache, lang, slice(0, read_metadata(cache).languages[lang]["rows"]))
    real = rows.segment_ids.reshape(-1) > 0
    tokens, positions = rows.tokens.reshape(-1)[real], rows.positions.reshape(-1)[real]
    return [part.tolist() for part in np.split(tokens, np.flatnonzero(positions == 0)[1:])]


@pytest.mark.parametrize("lang", LANGS)
def test_cache_equals_tokenizers_called_directly(prepared, corpus, tokenizer_json, lang):
    cache, _ = prepared
    reference = _reference(tokenizer_json)
    dropped = drop_reasons(cache)
    path = corpus / f"{lang}.txt"
    expected = [
        [BOS_ID] + reference.encode(unicodedata.normalize("NFC", line), add_special_tokens=False).ids + [EOS_ID]
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1)
        if (path.name, n) not in dropped and line
    ]
    assert len(expected) > 100
    assert _documents_in_cache(cache, lang) == expected
    rows = read_rows(cache, lang, slice(None))
    padding = rows.tokens[rows.segment_ids == 0]
    assert len(padding) and set(padding.tolist()) == {EOS_ID}  # no pad token: rows are padded with eos


def test_special_ids_come_from_the_tokenizer_and_are_stated(prepared):
    cache, output = prepared
    meta = read_metadata(cache).metadata
    assert meta["tokenizer_kind"] == "hf"
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (VOCAB + 2, BOS_ID, EOS_ID, EOS_ID)
    special = meta["special_tokens"]
    assert special["bos"]["token"] == BOS and special["eos"]["token"] == EOS
    assert special["pad"] is None and special["unk"] is None
    assert f"eos {EOS} = {EOS_ID}" in output and f"pad: none in the tokenizer; rows are padded with eos id {EOS_ID}" in output
    assert "warning" not in output


def test_a_tokenizer_config_beside_it_names_the_special_tokens(tmp_path, corpus, tokenizer_json):
    """Qwen-style: tokenizer_config.json says there is no bos; documents then begin with the eos,
    and the resume fingerprint changes with the config (its sha256 does not)."""
    from indicfm.data.prepare import prepare

    folder = tmp_path / "qwen_like"
    folder.mkdir()
    shutil.copy(tokenizer_json, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": EOS, "pad_token": None}))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "hin_Deva.txt").write_text((corpus / "hin_Deva.txt").read_text(encoding="utf-8")[:20_000])
    prepare([tmp_path / "in"], folder / "tokenizer.json", tmp_path / "cache", seq_len=SEQ_LEN, workers=1,
            show_progress=False)
    meta = read_metadata(tmp_path / "cache").metadata
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (EOS_ID, EOS_ID, EOS_ID)
    assert meta["special_tokens"]["bos"] is None and meta["special_tokens"]["eos"]["source"] == "tokenizer_config.json"
    assert any(n.startswith("bos: none") for n in meta["special_tokens"]["notes"])
    docs = _documents_in_cache(tmp_path / "cache", "hin_Deva")
    assert docs and all(d[0] == EOS_ID and d[-1] == EOS_ID for d in docs)


def test_decode_encode_round_trips_nfc_text_in_every_language(tokenizer_json, sample_heldout_dir):
    tok = load_tokenizer(tokenizer_json)
    files = sorted(sample_heldout_dir.glob("*.dev"))
    assert len(files) == 16
    lines = _nfc_lines(files) + [f"നന്{ZWJ} ക്{ZWJ}", f"क्{ZWNJ}ष क्{ZWJ}ष", f"র{ZWNJ}্য", "two  spaces\tand a tab "]
    assert sum(line.count(ZWJ) + line.count(ZWNJ) for line in lines) > 10
    failed = [line for line in lines if tok.decode(tok.encode(line)) != line]
    assert failed == []
    assert tok.encode_batch(lines[:50]) == [tok.encode(line) for line in lines[:50]]


def _with_normalizer(tokenizer_json: Path, folder: Path, normalizer) -> Path:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.normalizer = normalizer
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_a_normaliser_that_changes_indic_text_is_reported(tmp_path, corpus, tokenizer_json, sample_heldout_dir):
    from tokenizers import normalizers

    nfkc = _with_normalizer(tokenizer_json, tmp_path / "nfkc", normalizers.NFKC())
    zwj = _with_normalizer(tokenizer_json, tmp_path / "zwj", normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(ZWJ, "")]))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "mal_Mlym.txt").write_text((corpus / "mal_Mlym.txt").read_text(encoding="utf-8")[:5_000])
    for path, expected in ((nfkc, "NFKC"), (zwj, "ZERO WIDTH JOINER")):
        result = CliRunner().invoke(app, ["data", "prepare", "-i", str(tmp_path / "in"), "-t", str(path),
                                          "-o", str(path.parent / "cache"), "--seq-len", "64", "--workers", "1"])
        assert result.exit_code == 0, result.output
        assert "warning" in _flat(result.output) and expected in _flat(result.output)

    parallel = tmp_path / "parallel"
    parallel.mkdir()
    for lang in ("mal_Mlym", "eng_Latn"):
        shutil.copy(sample_heldout_dir / f"{lang}.dev", parallel)
    result = CliRunner().invoke(app, ["tokenizer", "eval", "--model", str(tokenizer_json), "--parallel", str(parallel),
                                      "--compare", f"nfkc={nfkc}", "--compare", f"zwj={zwj}",
                                      "--output", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert [t["normalizer"] for t in report["tokenizers"]] == ["NFC-safe", "NFKC", "drops ZWJ/ZWNJ"]
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| normaliser |" in markdown and "| drops ZWJ/ZWNJ |" in markdown
    assert "normaliser" in result.output


def test_a_sentencepiece_model_with_its_default_normaliser_is_reported(tmp_path, sample_train_dir):
    """SentencePiece's default rule (nmt_nfkc) folds compatibility characters and drops ZWJ;
    indicfm's own models (identity) change nothing."""
    import io

    import sentencepiece as spm

    from indicfm.data.testing import train_tiny_tokenizer

    model = io.BytesIO()
    lines = (sample_train_dir / "mal_Mlym.txt").read_text(encoding="utf-8").splitlines()[:300]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=300,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    (tmp_path / "nfkc.model").write_bytes(model.getvalue())
    warnings = load_tokenizer(tmp_path / "nfkc.model").normalizer_warnings()
    assert [w.short for w in warnings] == ["NFKC", "drops ZWJ/ZWNJ"] and "nmt_nfkc" in warnings[0].detail
    assert load_tokenizer(train_tiny_tokenizer(sample_train_dir, tmp_path / "own")).normalizer_warnings() == []


# -- a run with the tokenizer.json: train (with its bits-per-byte eval), generate, export -----------


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepared, tokenizer_json) -> Path:
    cache, _ = prepared
    workdir = tmp_path_factory.mktemp("hf_run") / "run"
    result = CliRunner().invoke(app, ["train", "--workdir", str(workdir), *[x for s in TINY_RUN + [
        f"tokenizer.model_file={tokenizer_json}", f"data.cache_dir={cache}"] for x in ("--set", s)]])
    assert result.exit_code == 0, result.output
    return workdir


def test_training_runs_and_its_bits_per_byte_eval_uses_the_tokenizer(run, tokenizer_json, sample_heldout_dir):
    from indicfm.train.evaluate import load_heldout

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == 2
    bpb = next(r for r in records if "bpb/mean" in r)
    assert all(np.isfinite(bpb[f"bpb/{lang}"]) and bpb[f"bpb/{lang}"] > 0 for lang in ("hin_Deva", "mal_Mlym"))
    # the held-out rows: [bos] + the tokenizer's ids of the NFC line
    reference = _reference(tokenizer_json)
    sets = {s.lang: s for s in load_heldout(sample_heldout_dir, tokenizer_json, SEQ_LEN, 4, ["mal_Mlym"])}
    line = unicodedata.normalize("NFC", (sample_heldout_dir / "mal_Mlym.dev").read_text(encoding="utf-8").splitlines()[0])
    ids = reference.encode(line, add_special_tokens=False).ids
    row = sets["mal_Mlym"].tokens[0]
    assert row[: min(len(ids) + 1, SEQ_LEN)].tolist() == ([BOS_ID] + ids)[:SEQ_LEN]


def test_generate_uses_the_checkpoints_tokenizer(run, tokenizer_json):
    from indicfm.inference.generate import generate_text
    from indicfm.inference.load import load_for_inference

    loaded = load_for_inference(run)
    tok = loaded.tokenizer()
    assert tok.kind == "hf" and tok.file.data == tokenizer_json.read_bytes()
    reference = _reference(tokenizer_json)
    prompt = "भारत की राजधानी"
    [g] = generate_text(loaded.model, tok, [prompt], max_new_tokens=3, temperature=0.0)
    assert g.prompt_ids == [BOS_ID] + reference.encode(prompt, add_special_tokens=False).ids
    assert all(0 <= t < VOCAB + 2 for t in g.token_ids)
    full = reference.decode(g.prompt_ids + g.token_ids, skip_special_tokens=True)
    assert prompt + g.text == full
    result = CliRunner().invoke(app, ["generate", "-w", str(run), "--prompt", prompt, "--max-new-tokens", "3",
                                      "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert record["prompt"] == prompt and record["tokens"] <= 3


def _export(run: Path, out: Path) -> None:
    result = CliRunner().invoke(app, ["export", "hf", "-w", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output


def test_export_ships_the_tokenizer_json_and_its_special_tokens(run, tokenizer_json, tmp_path):
    out = tmp_path / "hf"
    _export(run, out)
    assert (out / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS_ID, EOS_ID, None)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"]) == (BOS, EOS) and "pad_token" not in tok_config
    assert "NFC" in (out / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow  # needs transformers (the export extra), which the fast suite does not install
def test_transformers_loads_the_exported_tokenizer_json(run, tokenizer_json, tmp_path, sample_heldout_dir):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    _export(run, out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (hf.bos_token_id, hf.eos_token_id) == (BOS_ID, EOS_ID)
    reference = _reference(tokenizer_json)
    for line in _nfc_lines([sample_heldout_dir / "mal_Mlym.dev", sample_heldout_dir / "hin_Deva.dev"])[:20]:
        assert hf(line, add_special_tokens=False).input_ids == reference.encode(line, add_special_tokens=False).ids


# -- import hf: the source's tokenizer.json becomes the run's ---------------------------------------


def test_import_hf_makes_the_source_tokenizer_json_the_runs(tmp_path, sample_train_dir):
    """A continued run prepares its data with its source model's tokenizer.json, and its checkpoint
    carries the special tokens the source's tokenizer_config.json names (names no heuristic knows)."""
    from tokenizers import Tokenizer, models

    import jax

    from indicfm.config import MeshConfig, load_config
    from indicfm.sharding import make_mesh
    from indicfm.train.checkpoint import stored_tokenizer
    from indicfm.train.inputs import ensure_tokenizer_and_cache
    from indicfm.train.saved_model import restore_model

    src = tmp_path / "src"
    shutil.copytree(Path(__file__).resolve().parent / "golden" / "hf" / "llama3", src)
    vocab = {"<unk>": 0, "<|start|>": 1, "<|stop|>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    assert max(vocab.values()) < 101  # the golden model's embedding rows
    Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|start|>", "eos_token": "<|stop|>", "unk_token": "<unk>", "chat_template": "..."}))
    (tmp_path / "in").mkdir()
    shutil.copy(sample_train_dir / "eng_Latn.txt", tmp_path / "in")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["import", "hf", str(src), "--output", str(out), "--set",
                                      "model.compute_dtype=float32", "--set", f"data.inputs=[{tmp_path / 'in'}]",
                                      "--set", "data.seq_len=64", "--set", "data.workers=1"])
    assert result.exit_code == 0, result.output
    cfg = load_config(out / "config.yaml")
    assert Path(cfg.tokenizer.model_file) == out / "tokenizer" / "tokenizer.json"
    saved = restore_model(out, make_mesh(MeshConfig(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1]))
    stored = stored_tokenizer(saved.tokenizer)
    assert stored.data == (src / "tokenizer.json").read_bytes() and stored.declared["eos"] == "<|stop|>"
    assert (stored.load().start_id, stored.load().eos_id) == (1, 2)

    cfg = ensure_tokenizer_and_cache(cfg, out, progress=False)
    meta = read_metadata(cfg.data.cache_dir).metadata
    assert Path(meta["tokenizer"]) == out / "tokenizer" / "tokenizer.json"
    assert (meta["bos_id"], meta["eos_id"], meta["special_tokens"]["eos"]["source"]) == (1, 2, "tokenizer_config.json")
    dropped = drop_reasons(Path(cfg.data.cache_dir))
    lines = (sample_train_dir / "eng_Latn.txt").read_text(encoding="utf-8").splitlines()
    kept = [unicodedata.normalize("NFC", line) for n, line in enumerate(lines, start=1)
            if ("eng_Latn.txt", n) not in dropped]
    expected = [[1] + [vocab.get(ch, 0) for ch in line] + [2] for line in kept]
    assert _documents_in_cache(Path(cfg.data.cache_dir), "eng_Latn") == expected


# -- the Ray engine runs the same tokenize stage ------------------------------------------------------


@pytest.mark.timeout(300)
def test_ray_engine_builds_the_local_engines_cache_with_a_tokenizer_json(tmp_path, corpus, tokenizer_json):
    ray = pytest.importorskip("ray")
    from prepare_checks import assert_same_cache

    from indicfm.data.prepare import prepare

    (tmp_path / "in").mkdir()
    for lang in ("hin_Deva", "mal_Mlym"):
        shutil.copy(corpus / f"{lang}.txt", tmp_path / "in")
    prepare([tmp_path / "in"], tokenizer_json, tmp_path / "local", seq_len=SEQ_LEN, workers=1, show_progress=False)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 << 20, log_to_driver=False,
             configure_logging=False)
    try:
        prepare([tmp_path / "in"], tokenizer_json, tmp_path / "ray", seq_len=SEQ_LEN, engine="ray", show_progress=False)
    finally:
        ray.shutdown()
    assert_same_cache(tmp_path / "local", tmp_path / "ray")
    assert read_metadata(tmp_path / "ray").metadata["eos_id"] == EOS_ID
