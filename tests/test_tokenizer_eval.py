"""`tokenizer eval`: metric functions against hand-computed values, the SentencePiece and Hugging Face
adapters against independent counts, and (when the files are present) the anchor figures."""

import json
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm
from typer.testing import CliRunner

from benchmarks.common import anchor_tokenizer
from helpers import akshara_splits
from indicfm.cli import app
from indicfm.tokenizer.config import TokenizerConfig
from indicfm.tokenizer.evaluate import (
    Tokenized,
    evaluate_tokenizers,
    measure_lines,
    split_clusters,
    write_report,
    zero_width_kept,
)
from indicfm.tokenizer.train import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def model_file(sample_train_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaltok") / "tok"
    return train_tokenizer([sample_train_dir], out, TokenizerConfig(vocab_size=3000, num_threads=2, whole_aksharas=False)).model_file


# --- metric functions on tiny strings, values worked out by hand -------------------------------


def test_split_clusters_counts_boundaries_inside_aksharas():
    # किताब = कि | ता | ब (3 clusters; कि is 2 code points, ता 2, ब 1)
    assert split_clusters("किताब", []) == (3, 0)
    assert split_clusters("किताब", [2]) == (3, 0)  # between कि and ता
    assert split_clusters("किताब", [1]) == (3, 1)  # between क and its vowel sign
    assert split_clusters("किताब", [1, 3]) == (3, 2)
    # क्षमा = क्ष | मा : a boundary after the virama splits the conjunct
    assert split_clusters("क्षमा", [2]) == (2, 1)
    # Malayalam chillu written with ZWJ (ന ് ZWJ) is one cluster
    assert split_clusters("ന്\u200d", [2]) == (1, 1)


def test_zero_width_kept_counts_each_joiner_once():
    assert zero_width_kept("a\u200db\u200cc\u200d", "a\u200dbc") == (3, 1)
    assert zero_width_kept("abc", "abc") == (0, 0)


class CharTokenizer:
    """Every character a token; decoding forgets ZWJ. Simple enough to work the metrics out by hand."""

    name, kind, vocab_size, has_byte_fallback = "chars", "test", 0, True

    def prepare(self, raw):
        return raw

    def tokenize(self, lines):
        return [
            Tokenized(text=t, tokens=len(t), byte_tokens=0, boundaries=list(range(1, len(t))), decoded=t.replace("\u200d", ""))
            for t in lines
        ]


def test_measure_lines_hand_computed():
    m = measure_lines(CharTokenizer(), ["ab c", "d\u200de"])
    # tokens 4 + 3 = 7, words 2 + 1 = 3, characters 7
    assert (m.tokens, m.words, m.characters) == (7, 3, 7)
    assert m.fertility == pytest.approx(7 / 3)
    assert m.chars_per_token == pytest.approx(1.0)
    # clusters: a, b, ' ', c | d+ZWJ, e  -> 6; only d+ZWJ has a boundary inside
    assert (m.clusters, m.split_clusters) == (6, 1)
    assert m.akshara_split_rate == pytest.approx(1 / 6)
    assert m.round_trip_rate == pytest.approx(0.5)
    assert (m.zero_width, m.zero_width_kept) == (1, 0)
    assert m.byte_fallback_rate == 0.0


# --- SentencePiece adapter vs plain sentencepiece ------------------------------------------------


def _independent_split_rate(sp, lines):
    """Token spans from the piece strings (▁ → space, dummy prefix dropped), clusters from regex."""
    clusters = split = 0
    for raw in lines:
        text = unicodedata.normalize("NFC", raw)
        ids = sp.encode(text)
        surfaces = [sp.id_to_piece(i).replace("\u2581", " ") for i in ids]
        if not text.startswith(" ") and surfaces[0].startswith(" "):
            surfaces[0] = surfaces[0][1:]
        assert "".join(surfaces) == text
        line_clusters, line_split = akshara_splits(text, surfaces)
        clusters += line_clusters
        split += line_split
    return clusters, split


def test_sentencepiece_metrics_match_independent_counts(model_file, sample_heldout_dir):
    report = evaluate_tokenizers([model_file], sample_heldout_dir)
    (tok,) = report.tokenizers
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    eng_lines = (sample_heldout_dir / "eng_Latn.dev").read_text(encoding="utf-8").splitlines()
    eng_tokens = sum(len(sp.encode(unicodedata.normalize("NFC", x))) for x in eng_lines)
    for lang in ("hin_Deva", "mal_Mlym", "tam_Taml", "ben_Beng"):
        lines = (sample_heldout_dir / f"{lang}.dev").read_text(encoding="utf-8").splitlines()
        tokens = sum(len(sp.encode(unicodedata.normalize("NFC", x))) for x in lines)
        words = sum(len(x.split()) for x in lines)
        m = tok.languages[lang]
        assert m.tokens == tokens and m.words == words
        assert m.fertility == pytest.approx(tokens / words)
        assert m.parity == pytest.approx(tokens / eng_tokens)
        assert m.round_trip_rate == 1.0
        assert m.byte_tokens == 0  # every letter of these scripts is in the vocabulary
        assert _independent_split_rate(sp, lines) == (m.clusters, m.split_clusters)
    assert tok.summary()["zero_width_kept"] == tok.summary()["zero_width_total"] > 0


# --- Hugging Face adapter -----------------------------------------------------------------------


def test_huggingface_tokenizer_json_gets_raw_text(tmp_path, sample_train_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(
        (sample_train_dir / "hin_Deva.txt").read_text(encoding="utf-8").splitlines(),
        trainers.BpeTrainer(vocab_size=500, special_tokens=["[UNK]"], show_progress=False),
    )
    hf_path = tmp_path / "toy" / "tokenizer.json"
    hf_path.parent.mkdir()
    hf.save(str(hf_path))
    parallel = tmp_path / "par"
    parallel.mkdir()
    lines = ["क़िला देखो", "नमस्ते दुनिया"]  # first line decomposed (NFC composes/decomposes differently)
    raw = [unicodedata.normalize("NFD", lines[0]), lines[1]]
    (parallel / "hin_Deva.dev").write_text("\n".join(raw) + "\n", encoding="utf-8")
    (parallel / "eng_Latn.dev").write_text("the fort\nhello world\n", encoding="utf-8")
    report = evaluate_tokenizers([f"toy={hf_path}"], parallel)
    (tok,) = report.tokenizers
    assert tok.name == "toy" and tok.kind == "huggingface"
    hin = tok.languages["hin_Deva"]
    assert hin.tokens == sum(len(hf.encode(x, add_special_tokens=False).ids) for x in raw)
    assert hin.characters == sum(len(x) for x in raw)  # raw text, not re-normalised
    assert hin.byte_fallback_rate is None  # no <0xNN> pieces in this vocabulary
    eng = tok.languages["eng_Latn"]
    assert hin.parity == pytest.approx(hin.tokens / eng.tokens)


# --- CLI and report files -----------------------------------------------------------------------


def test_cli_eval_writes_json_and_markdown(model_file, sample_heldout_dir, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["tokenizer", "eval", "--model", str(model_file), "--parallel", str(sample_heldout_dir), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert set(data["tokenizers"][0]["languages"]) == {p.name.split(".")[0] for p in sample_heldout_dir.glob("*.dev")}
    assert "| mal_Mlym |" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_cli_eval_missing_model_is_an_error_naming_it(sample_heldout_dir, tmp_path):
    result = CliRunner().invoke(
        app, ["tokenizer", "eval", "--model", str(tmp_path / "nope.model"), "--parallel", str(sample_heldout_dir)]
    )
    assert result.exit_code == 2
    assert "nope.model" in result.output.replace("\n", "")  # rich wraps long lines


def test_write_report_replaces_suffix(model_file, sample_heldout_dir, tmp_path):
    report = evaluate_tokenizers([model_file], sample_heldout_dir)
    json_path, md_path = write_report(report, tmp_path / "r.json")
    assert json_path.name == "r.json" and md_path.name == "r.md" and md_path.is_file()


# --- anchor figures from independent code (needs files not shipped with the repository) -----------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3", "gpt4o", "llama3"])
def test_reproduces_anchor_fertility_exactly(name, tmp_path):
    anchor_file = SHARED_DATA / "anchor_fertility_dev.json"
    path = anchor_tokenizer(name)
    if not anchor_file.is_file() or path is None:
        pytest.skip(f"needs {anchor_file} and the {name} tokenizer.json (set INDICFM_ANCHOR_TOKENIZERS)")
    anchor = json.loads(anchor_file.read_text())[name]
    parallel = tmp_path / "dev"
    parallel.mkdir()
    for lang in anchor:
        (parallel / f"{lang}.dev").symlink_to(SHARED_DATA / "flores200" / "dev" / f"{lang}.dev")
    (tok,) = evaluate_tokenizers([f"{name}={path}"], parallel).tokenizers
    for lang, expected in anchor.items():
        m = tok.languages[lang]
        assert (m.tokens, m.words) == (expected["tokens"], expected["words"]), lang
        assert round(m.fertility, 4) == pytest.approx(expected["fertility"], abs=1e-4)
