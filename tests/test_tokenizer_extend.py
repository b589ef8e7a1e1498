"""`tokenizer extend` (issue 28): tokenizers made here — a byte-level BPE trained with `tokenizers`
on English (Llama-3 style and GPT-2 style pre-tokenizers) and a SentencePiece BPE base trained on
English and Hindi — extended with a tiny indicfm model.  References are the libraries called
directly: the base through `tokenizers`/`sentencepiece`, never the extension code.  The real
Llama-3/Gemma-3 files are used when present (slow)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from benchmarks.common import anchor_tokenizer
from indicfm.cli import app
from indicfm.text import normalize
from indicfm.tokenizer.config import TokenizerConfig
from indicfm.tokenizer.evaluate import evaluate_tokenizers
from indicfm.tokenizer.extend import ExtendError, extend_tokenizer
from indicfm.tokenizer.extend_sentencepiece import sentencepiece_to_tokenizer_json
from indicfm.tokenizer.load import load_tokenizer
from indicfm.tokenizer.piece_selection import has_indic_character
from indicfm.tokenizer.train import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Held-out lines per language: enough for every script's common aksharas, few enough to stay fast.
LINES = 80
#: Spellings that need ZWJ/ZWNJ: Malayalam chillu (ന്‍), Bengali ya-phala after ra (র‍্য), Hindi half forms.
JOINER_LINES = [
    "അവന്\u200d വന്നു, അവള്\u200d പോയി.",
    "র\u200d্যাব এবং র\u200d্যাপিড টেস্ট",
    "क्\u200dष और क्\u200cष अलग लिखे जाते हैं",
]


def _heldout(sample_heldout_dir: Path) -> dict[str, list[str]]:
    texts = {p.name.split(".")[0]: [normalize(line) for line in p.read_text(encoding="utf-8").splitlines()[:LINES]]
             for p in sorted(sample_heldout_dir.glob("*.dev"))}  # fmt: skip
    texts["joiners"] = JOINER_LINES
    return texts


def _english(sample_train_dir: Path) -> list[str]:
    lines = (REPO / "samples" / "heldout" / "eng_Latn.dev").read_text(encoding="utf-8").splitlines()
    lines += (sample_train_dir / "eng_Latn.txt").read_text(encoding="utf-8").splitlines()[:300]
    code = Path(__file__).read_text(encoding="utf-8") + (REPO / "tokenizer" / "train.py").read_text(encoding="utf-8")
    lines += [p for p in code.split("\n\n") if not has_indic_character(p)]  # code, with its newlines and indents
    lines += ["emoji 👨\u200d👩\u200d👧 joined by ZWJ", "ZWNJ in Persian: می\u200cخواهم"]
    return lines


@pytest.fixture(scope="module")
def indic_model(sample_train_dir, tmp_path_factory) -> Path:
    # SentencePiece's own BPE trainer (a few seconds) rather than the akshara trainer (several
    # times slower); both write SentencePiece BPE models, which is all --add needs
    out = tmp_path_factory.mktemp("indic") / "indic"
    return train_tokenizer([sample_train_dir], out, TokenizerConfig(vocab_size=3000, num_threads=1, whole_aksharas=False)).model_file


def _byte_level_base(sample_train_dir: Path, path: Path, style: str) -> Path:
    """A byte-level BPE: Llama-3's pre-tokenizer (Split + ByteLevel) or GPT-2's (ByteLevel splitting
    by itself) trained on English, or one whose words include marks (like GPT-4o's o200k) trained
    on English and Hindi, a script it then knows (the new merges for it go after the base's);
    special tokens after the model vocabulary, as Llama-3 has them."""
    tok = Tokenizer(models.BPE(ignore_merges=False))
    if style in ("llama3", "o200k"):
        split = LLAMA3_SPLIT if style == "llama3" else LLAMA3_SPLIT.replace(r"\p{L}+", r"[\p{L}\p{M}]+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = ["eng_Latn", "hin_Deva"] if style == "o200k" else ["eng_Latn"]
    tok.train([str(sample_train_dir / f"{lang}.txt") for lang in files], trainer)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tok.save(str(path))
    return path


def _sentencepiece_base(sample_train_dir: Path, path: Path) -> Path:
    lines = [line for lang in ("eng_Latn", "hin_Deva") for line in (sample_train_dir / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=1200, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2)  # fmt: skip
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def bases(sample_train_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    sp_model = _sentencepiece_base(sample_train_dir, root / "sp.model")
    (root / "spjson").mkdir()
    sp_json = root / "spjson" / "tokenizer.json"
    sp_json.write_text(json.dumps(sentencepiece_to_tokenizer_json(sp_model.read_bytes()), ensure_ascii=False), encoding="utf-8")
    return {
        "llama3-style": _byte_level_base(sample_train_dir, root / "bl_llama3.json", "llama3"),
        "gpt2-style": _byte_level_base(sample_train_dir, root / "bl_gpt2.json", "gpt2"),
        "o200k-style": _byte_level_base(sample_train_dir, root / "bl_o200k.json", "o200k"),
        "sp-model": sp_model,
        "sp-json": sp_json,
    }


@pytest.fixture(scope="module")
def extended(bases, indic_model, tmp_path_factory) -> dict[str, Path]:
    """Each base extended with every Indic piece of the tiny model: kind -> output directory."""
    root = tmp_path_factory.mktemp("extended")
    return {kind: extend_tokenizer(base, indic_model, root / kind).output_dir for kind, base in bases.items()}


KINDS = ["llama3-style", "gpt2-style", "o200k-style", "sp-model", "sp-json"]


def _encoders(kind: str, base: Path, out: Path):
    """(base ids, extended ids) functions, each through its library directly."""
    if kind == "sp-model":
        b, e = spm.SentencePieceProcessor(model_file=str(base)), spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        return b.encode, e.encode
    b, e = Tokenizer.from_file(str(base)), Tokenizer.from_file(str(out / "tokenizer.json"))
    return (lambda lines: [x.ids for x in b.encode_batch(lines, add_special_tokens=False)],
            lambda lines: [x.ids for x in e.encode_batch(lines, add_special_tokens=False)])  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_english_and_code_ids_identical(kind, bases, extended, sample_train_dir):
    base_ids, ext_ids = _encoders(kind, bases[kind], extended[kind])
    lines = _english(sample_train_dir)
    before, after = base_ids(lines), ext_ids(lines)
    assert [i for i, (a, b) in enumerate(zip(before, after)) if a != b] == []


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_every_language_with_joiners(kind, extended, sample_heldout_dir):
    tok = load_tokenizer(extended[kind] / ("tokenizer.model" if kind == "sp-model" else "tokenizer.json"))
    for lang, lines in _heldout(sample_heldout_dir).items():
        ids = tok.encode_batch(lines)
        bad = [line for line, x in zip(lines, ids) if tok.decode(x) != line]
        assert bad == [], (lang, bad[:2])


@pytest.mark.parametrize("kind", KINDS)
def test_indic_fertility_drops(kind, bases, extended, sample_heldout_dir):
    base_ids, ext_ids = _encoders(kind, bases[kind], extended[kind])
    totals = [0, 0]
    for lang, lines in _heldout(sample_heldout_dir).items():
        if lang.split("_")[-1] in ("Latn", "Arab") or lang == "joiners":
            continue
        before, after = sum(map(len, base_ids(lines))), sum(map(len, ext_ids(lines)))
        # where the base knows the script (Hindi, for the bases trained on it) its merges run
        # first and the new ones only join its tokens: never more tokens
        assert after <= before, lang
        totals[0] += before
        totals[1] += after
    assert totals[1] < 0.6 * totals[0]


@pytest.mark.parametrize("kind", KINDS)
def test_base_ids_kept_and_new_ids_appended(kind, bases, extended):
    out = extended[kind]
    manifest = json.loads((out / "extension.json").read_text(encoding="utf-8"))
    ext = Tokenizer.from_file(str(out / "tokenizer.json"))
    if kind == "sp-model":
        base = spm.SentencePieceProcessor(model_file=str(bases[kind]))
        ext_model = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        size = base.get_piece_size()
        assert [ext_model.id_to_piece(i) for i in range(size)] == [base.id_to_piece(i) for i in range(size)]
        base_tokens = [base.id_to_piece(i) for i in range(size)]
    else:
        base = Tokenizer.from_file(str(bases[kind]))
        size = base.get_vocab_size(with_added_tokens=True)
        base_tokens = [base.id_to_token(i) for i in range(size)]
    assert manifest["base"]["vocab_size"] == size
    assert [ext.id_to_token(i) for i in range(size)] == base_tokens
    added = manifest["added"]
    assert [a["id"] for a in added] == list(range(size, size + len(added))) and added
    assert [ext.id_to_token(a["id"]) for a in added] == [a["token"] for a in added]
    assert manifest["vocab_size"] == size + len(added) == ext.get_vocab_size(with_added_tokens=True)
    assert manifest["padded_vocab_size"] % 128 == 0 and 0 <= manifest["padded_vocab_size"] - manifest["vocab_size"] < 128
    before = load_tokenizer(bases[kind]).special
    after = load_tokenizer(out / "tokenizer.json").special
    assert (after.bos_id if hasattr(after, "bos_id") else after.start_id, after.eos.id) == (before.start_id, before.eos.id)
    assert load_tokenizer(out / "tokenizer.json").normalizer_warnings() == load_tokenizer(bases[kind]).normalizer_warnings()


@pytest.mark.parametrize("kind", ["llama3-style", "sp-json"])
def test_every_added_piece_is_reached_by_merges(kind, extended):
    """The test bases do not take a word found whole in the vocabulary (ignore_merges off), so a
    piece's own text encodes to its id only if merges build it."""
    out = extended[kind]
    ext = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert not json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["ignore_merges"]
    added = json.loads((out / "extension.json").read_text(encoding="utf-8"))["added"]
    # the BPE model alone on the token's own string (no normaliser: SentencePiece-style adds a ▁)
    missed = [a["token"] for a in added if [t.id for t in ext.model.tokenize(a["token"])] != [a["id"]]]
    assert missed == []


def test_model_and_tokenizer_json_agree(bases, extended, sample_heldout_dir):
    """The tokenizer.json written beside an extended .model encodes as SentencePiece does (and the
    same conversion of the base as the base)."""
    for model_file, json_file in ((bases["sp-model"], bases["sp-json"]),
                                  (extended["sp-model"] / "tokenizer.model", extended["sp-model"] / "tokenizer.json")):  # fmt: skip
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        tok = Tokenizer.from_file(str(json_file))
        for lang, lines in _heldout(sample_heldout_dir).items():
            assert sp.encode(lines) == [x.ids for x in tok.encode_batch(lines, add_special_tokens=False)], lang


def test_max_new_and_ranking_by_text(bases, indic_model, sample_train_dir, tmp_path):
    small = extend_tokenizer(bases["llama3-style"], indic_model, tmp_path / "small", max_new=60)
    ranked = extend_tokenizer(bases["llama3-style"], indic_model, tmp_path / "ranked", max_new=60, text_dir=sample_train_dir)
    assert 0 < len(small.added) <= 60 and 0 < len(ranked.added) <= 60
    assert {a["token"] for a in small.added} != {a["token"] for a in ranked.added}
    manifest = json.loads(ranked.manifest_file.read_text(encoding="utf-8"))
    assert "balanced" in manifest["selection"]["method"] and "hin_Deva" in manifest["selection"]["languages"]
    # closure: every added piece is still built by merges within the limit
    ext = Tokenizer.from_file(str(small.tokenizer_file))
    assert all([t.id for t in ext.model.tokenize(a["token"])] == [a["id"]] for a in small.added)


@pytest.fixture(scope="module")
def small_parallel(sample_heldout_dir, tmp_path_factory) -> Path:
    """A few parallel languages, a few lines each: what the report needs, at test speed."""
    root = tmp_path_factory.mktemp("parallel")
    for lang in ("eng_Latn", "hin_Deva", "mal_Mlym", "ory_Orya"):
        lines = (sample_heldout_dir / f"{lang}.dev").read_text(encoding="utf-8").splitlines()[:40]
        (root / f"{lang}.dev").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_fairness_report_counts_equal_tokenizers(extended, small_parallel):
    (report,) = evaluate_tokenizers([f"ext={extended['llama3-style'] / 'tokenizer.json'}"], small_parallel).tokenizers
    tok = Tokenizer.from_file(str(extended["llama3-style"] / "tokenizer.json"))
    for path in sorted(small_parallel.glob("*.dev")):
        lines = path.read_text(encoding="utf-8").splitlines()
        expected = sum(len(e.ids) for e in tok.encode_batch(lines, add_special_tokens=False))
        assert report.languages[path.name.split(".")[0]].tokens == expected, path.name


def test_cli_extend_and_compare(bases, indic_model, small_parallel, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["tokenizer", "extend", "--base", str(bases["llama3-style"]), "--add", str(indic_model),
                                      "--max-new", "200", "--output", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "padded to a multiple of 128" in result.output and (out / "extension.json").is_file()
    result = CliRunner().invoke(app, ["tokenizer", "eval", "--model", str(indic_model), "--parallel", str(small_parallel),
                                      "--compare", f"base={bases['llama3-style']}", "--compare", f"ext={out / 'tokenizer.json'}"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "base:" in result.output and "ext:" in result.output


def _wordpiece(path: Path) -> Path:
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.save(str(path))
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("wordpiece", "a WordPiece tokenizer"),
        ("corrupt-json", "not a valid tokenizer.json"),
        ("missing", "cannot read the base"),
        ("garbage-model", "neither a tokenizer.json nor a SentencePiece model"),
        ("add-not-sentencepiece", "not a SentencePiece model"),
        ("add-unigram", "UNIGRAM model"),
    ],
)
def test_bad_input_exits_2_naming_the_file(case, expected, bases, indic_model, tmp_path, sample_train_dir):
    base, add = bases["llama3-style"], indic_model
    named = None
    if case == "wordpiece":
        base = named = _wordpiece(tmp_path / "wp.json")
    elif case == "corrupt-json":
        base = named = tmp_path / "broken.json"
        base.write_text('{"model": {"type": "BPE", ', encoding="utf-8")
    elif case == "missing":
        base = named = tmp_path / "nowhere.json"
    elif case == "garbage-model":
        base = named = tmp_path / "garbage.model"
        base.write_bytes(b"\xff\xfe not a protobuf \x00\x01" * 10)
    elif case == "add-not-sentencepiece":
        add = named = sample_train_dir / "eng_Latn.txt"
    elif case == "add-unigram":
        model = io.BytesIO()
        lines = (sample_train_dir / "hin_Deva.txt").read_text(encoding="utf-8").splitlines()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=300, model_type="unigram", minloglevel=2)
        add = named = tmp_path / "uni.model"
        add.write_bytes(model.getvalue())
    result = CliRunner().invoke(app, ["tokenizer", "extend", "--base", str(base), "--add", str(add), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert expected in flat and named.name in flat, flat
    with pytest.raises(ExtendError):
        extend_tokenizer(base, add, tmp_path / "out2")


# --- the real open tokenizers (slow; skipped without them) ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3", "gemma3"])
def test_anchor_tokenizer_extension(name, indic_model, tmp_path, sample_train_dir):
    base = anchor_tokenizer(name)
    flores = REPO.parent / "shared" / "data" / "flores200" / "dev"
    if base is None or not flores.is_dir():
        pytest.skip(f"needs the {name} tokenizer.json (set INDICFM_ANCHOR_TOKENIZERS) and {flores}")
    result = extend_tokenizer(base, indic_model, tmp_path / name)
    before, after = Tokenizer.from_file(str(base)), Tokenizer.from_file(str(result.tokenizer_file))

    def ids(tok, lines):
        return [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]

    english = (flores / "eng_Latn.dev").read_text(encoding="utf-8").splitlines() + _english(sample_train_dir)
    assert ids(before, english) == ids(after, english)
    for lang in ("hin_Deva", "tam_Taml", "mal_Mlym", "ory_Orya"):
        lines = (flores / f"{lang}.dev").read_text(encoding="utf-8").splitlines()
        encoded = ids(after, lines)
        assert [after.decode(x) for x in encoded] == lines, lang
    ory = (flores / "ory_Orya.dev").read_text(encoding="utf-8").splitlines()
    ory_before, ory_after = sum(map(len, ids(before, ory))), sum(map(len, ids(after, ory)))
    # Llama-3 spends 16.7 tokens per Odia word, Gemma-3 4.8: even the tiny model's pieces help both
    assert ory_after < (0.5 if name == "llama3" else 0.95) * ory_before, (ory_after, ory_before)
    # every base id keeps its string, special tokens included
    size = result.base_size
    assert [after.id_to_token(i) for i in range(size)] == [before.id_to_token(i) for i in range(size)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama3-style", "sp-model"])
def test_transformers_autotokenizer_loads_output(kind, extended, sample_heldout_dir):
    transformers = pytest.importorskip("transformers")
    out = extended[kind]
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for path in sorted(sample_heldout_dir.glob("*.dev"))[:4]:
        lines = [normalize(x) for x in path.read_text(encoding="utf-8").splitlines()[:50]]
        assert [auto.encode(x, add_special_tokens=False) for x in lines] == [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]
    assert len(auto) == json.loads((out / "extension.json").read_text(encoding="utf-8"))["vocab_size"]
