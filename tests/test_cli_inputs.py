"""`tokenizer train` and `data prepare` take several inputs after one flag, as positional arguments,
or one per flag, and hand them all, in order, to the library call."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from indicfm.cli import app

FORMS = {
    "several after one flag": ["--input", "a.txt", "b.jsonl", "c"],
    "one per flag": ["--input", "a.txt", "-i", "b.jsonl", "--input", "c"],
    "positional": ["a.txt", "b.jsonl", "c"],
    "flag then positional": ["-i", "a.txt", "b.jsonl", "c"],
}
NAMES = ["a.txt", "b.jsonl", "c"]


def _expected() -> list[str]:
    return [str(Path(name).resolve()) for name in NAMES]  # relative to where the command runs


def _record(seen: list, error: type[Exception]):
    """A stand-in for the library call: note the inputs, then fail as a bad input would (exit 2)."""

    def fake(inputs, *args, **kwargs):
        seen.append([str(p) for p in inputs])
        raise error("stopped by the test after parsing")

    return fake


@pytest.mark.parametrize("form", FORMS)
def test_tokenizer_train_inputs(form, monkeypatch, tmp_path):
    import indicfm.tokenizer.train

    seen: list = []
    monkeypatch.setattr(indicfm.tokenizer.train, "train_tokenizer", _record(seen, FileNotFoundError))
    argv = ["tokenizer", "train", *FORMS[form], "--output-prefix", str(tmp_path / "tok"), "--vocab-size", "1000"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and "stopped by the test" in result.output, result.output
    assert seen == [_expected()]


@pytest.mark.parametrize("form", FORMS)
def test_data_prepare_inputs(form, monkeypatch, tmp_path):
    import indicfm.data.prepare

    seen: list = []
    monkeypatch.setattr(indicfm.data.prepare, "prepare", _record(seen, indicfm.data.prepare.PrepareError))
    argv = ["data", "prepare", *FORMS[form], "-t", str(tmp_path / "t.model"), "-o", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and "stopped by the test" in result.output, result.output
    assert seen == [_expected()]


def test_tokenizer_train_without_inputs_says_what_to_give(tmp_path):
    result = CliRunner().invoke(app, ["tokenizer", "train", "--output-prefix", str(tmp_path / "tok")])
    assert result.exit_code == 2 and "no input" in result.output


def test_data_prepare_without_inputs_takes_the_configs_even_from_another_directory(monkeypatch, tmp_path):
    """``-c data/sample`` names the shipped config; its ``samples/train`` is the shipped sample."""
    import indicfm.data.prepare
    from indicfm.package_data import SAMPLES_DIR

    seen: list = []
    monkeypatch.setattr(indicfm.data.prepare, "prepare", _record(seen, indicfm.data.prepare.PrepareError))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["data", "prepare", "-c", "data/sample", "-t", "t.model", "-o", "cache"])
    assert result.exit_code == 2, result.output
    assert seen == [[str(SAMPLES_DIR / "train")]]


def test_a_relative_samples_path_not_found_here_is_the_shipped_sample(monkeypatch, tmp_path):
    import indicfm.tokenizer.train
    from indicfm.package_data import SAMPLES_DIR

    seen: list = []
    monkeypatch.setattr(indicfm.tokenizer.train, "train_tokenizer", _record(seen, FileNotFoundError))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "mine.txt").write_text("a user's own samples/ folder wins\n")
    CliRunner().invoke(app, ["tokenizer", "train", "--input", "samples/heldout", "samples/mine.txt", "-o", "tok"])
    assert seen == [[str(SAMPLES_DIR / "heldout"), str(tmp_path / "samples" / "mine.txt")]]
