"""`data prepare` end to end on the shipped sample, with planted bad documents.

Expected reasons come from how each planted document was built (indicfm.data.testing), expected
line counts from counting newlines, expected token streams from encoding the kept lines directly
with SentencePiece — never from the pipeline's own output.
"""

import json
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import indicfm.data.local_engine as local_engine
import indicfm.data.stages as stages
from indicfm.data.cache import CacheError, read_metadata, read_rows
from indicfm.data.config import DataConfig
from indicfm.data.prepare import PrepareError, prepare
from indicfm.data.report import DROP_LOG
from indicfm.data.testing import make_injected_corpus, train_tiny_tokenizer

SEQ_LEN = 128


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, sample_train_dir) -> Path:
    return train_tiny_tokenizer(sample_train_dir, tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory, sample_train_dir, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("clean") / "cache"
    prepare([sample_train_dir], tokenizer, out, seq_len=SEQ_LEN, workers=1, show_progress=False)
    return out


@pytest.fixture(scope="module")
def injected(tmp_path_factory, sample_train_dir, tokenizer):
    corpus = tmp_path_factory.mktemp("corpus")
    planted = make_injected_corpus(sample_train_dir, corpus)
    out = tmp_path_factory.mktemp("injected") / "cache"
    prepare([corpus], tokenizer, out, seq_len=SEQ_LEN, workers=1, show_progress=False)
    return corpus, planted, out


def _drop_log(cache: Path) -> dict[tuple[str, int], str]:
    """(file name, line) -> reason, from the drop log."""
    out = {}
    for row in (cache / DROP_LOG).read_text(encoding="utf-8").splitlines():
        source, line, _lang, reason = row.split("\t")
        out[(Path(source).name, int(line))] = reason
    return out


def _line_count(path: Path) -> int:
    data = path.read_bytes()
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


def test_every_planted_document_dropped_for_its_reason(injected):
    corpus, planted, out = injected
    dropped = _drop_log(out)
    for p in planted:
        assert dropped.get((p.file, p.line)) == p.reason, p
    assert {p.reason for p in planted} >= {
        "malformed_record", "invalid_utf8", "control_chars", "empty", "too_long", "too_short",
        "too_many_symbols", "repeated_ngrams", "wrong_script", "wrong_language", "exact_duplicate",
        "near_duplicate",
    }


def test_originals_kept_and_counts_add_up(injected, clean_cache, sample_train_dir):
    corpus, planted, out = injected
    report = json.loads((out / "report.json").read_text())["languages"]
    clean = json.loads((clean_cache / "report.json").read_text())["languages"]
    # docs_in is every line of every file (counted here independently), and adds up.
    jsonl_langs = Counter()
    for raw in (corpus / "extra.jsonl").read_text().splitlines():
        try:
            jsonl_langs[json.loads(raw)["lang"]] += 1
        except ValueError:
            jsonl_langs["unknown"] += 1
    for path in sorted(corpus.glob("*.txt")):
        lang = path.name.split(".")[0]
        assert report[lang]["docs_in"] == _line_count(path) + jsonl_langs[lang]
    for lang, v in report.items():
        assert v["docs_in"] == v["docs_kept"] + sum(v["dropped"].values()), lang
    # Planting changes exactly the planted counts: clean counts + one per planted document.
    planted_counts = Counter((p.lang, p.reason) for p in planted)
    for lang in clean:
        for reason in set(clean[lang]["dropped"]) | set(report[lang]["dropped"]):
            expected = clean[lang]["dropped"].get(reason, 0) + planted_counts[(lang, reason)]
            assert report[lang]["dropped"].get(reason, 0) == expected, (lang, reason)
        assert report[lang]["docs_kept"] == clean[lang]["docs_kept"] + (lang == "eng_Latn"), lang
    assert jsonl_langs["unknown"] == 1
    assert report["unknown"] == {"docs_in": 1, "docs_kept": 0, "tokens": 0, "dropped": {"malformed_record": 1}}
    # The same original lines are dropped with and without the planted ones (originals of the
    # planted duplicates included: the first occurrence is kept).
    originals = {(f.name, n) for f in sample_train_dir.glob("*.txt") for n in range(1, _line_count(f) + 1)}
    assert {k: r for k, r in _drop_log(out).items() if k in originals} == _drop_log(clean_cache)
    # Nearly all of the clean sample is kept by the default filters.
    for lang, v in clean.items():
        assert v["docs_kept"] >= 0.85 * v["docs_in"], (lang, v)


def test_report_examples_show_the_dropped_documents_text(injected):
    """A duplicate's example text is read again from its file by the main process (workers send no
    text of passing documents); every example's text is its own line's, NFC, cut at 300 chars."""
    corpus, planted, out = injected
    examples = json.loads((out / "examples.json").read_text(encoding="utf-8"))
    assert examples.get("exact_duplicate") and examples.get("near_duplicate")
    for reason in ("exact_duplicate", "near_duplicate", "wrong_script", "too_short"):
        for example in examples[reason]:
            path = Path(example["source"])
            if path.suffix != ".txt":
                continue
            raw = path.read_bytes().split(b"\n")[example["line"] - 1].decode("utf-8").removesuffix("\r")
            assert example["text"] == unicodedata.normalize("NFC", raw)[:300], (reason, example)


def test_duplicate_examples_from_json_lines_and_parquet(tmp_path, sample_train_dir, tokenizer):
    """The main process re-reads a duplicate's text from any source: a JSON-lines line range and a
    parquet batch (read by the main process itself) alike."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hin = [x for x in (sample_train_dir / "hin_Deva.txt").read_text(encoding="utf-8").splitlines() if len(x) > 150]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = [{"text": hin[0], "lang": "hin_Deva"}, {"text": hin[1], "lang": "hin_Deva"},
               {"text": hin[0], "lang": "hin_Deva"}]  # line 3 repeats line 1
    (corpus / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    pq.write_table(pa.table({"text": [hin[2], hin[1]], "lang": ["hin_Deva", "hin_Deva"]}), corpus / "b.parquet")
    out = tmp_path / "cache"
    prepare([corpus], tokenizer, out, seq_len=SEQ_LEN, workers=1, show_progress=False)
    examples = json.loads((out / "examples.json").read_text(encoding="utf-8"))["exact_duplicate"]
    got = sorted((Path(e["source"]).name, e["line"], e["text"]) for e in examples)
    nfc = lambda text: unicodedata.normalize("NFC", text)[:300]  # noqa: E731
    assert got == [("a.jsonl", 3, nfc(hin[0])), ("b.parquet", 2, nfc(hin[1]))]


def test_which_languages_are_complete_after_a_file(tmp_path):
    """A text file's language is complete after its last line when no later input can hold it: no
    later file of that language, and no later file whose languages are per record."""
    from indicfm.data.local_engine import _languages_complete_after
    from indicfm.data.sources import InputFile

    files = []
    for name, lang, fmt in [("a.txt", "hin_Deva", "text"), ("b.jsonl", None, "jsonl"), ("c.txt", "hin_Deva", "text"),
                            ("d.txt", "tam_Taml", "text"), ("e.txt", "hin_Deva", "text")]:
        (tmp_path / name).write_text("x" * len(name))
        files.append(InputFile(tmp_path / name, lang, fmt))
    complete = _languages_complete_after(files, has_hub=False)
    assert {p.name: v for p, v in complete.items()} == {"d.txt": ("tam_Taml", 5), "e.txt": ("hin_Deva", 5)}
    assert _languages_complete_after(files, has_hub=True) == {}


def _expected_stream(cache: Path, corpus: Path, tokenizer: Path, lang: str) -> list[list[int]]:
    """Token ids (+EOS) of the kept lines of ``lang``, encoded directly with SentencePiece."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    dropped = _drop_log(cache)
    path = corpus / f"{lang}.txt"
    docs = []
    for n, raw in enumerate(path.read_bytes().split(b"\n")[: _line_count(path)], start=1):
        if (path.name, n) in dropped:
            continue
        text = unicodedata.normalize("NFC", raw.decode("utf-8").removesuffix("\r"))
        docs.append([sp.bos_id()] + sp.encode(text) + [sp.eos_id()])
    return docs


@pytest.mark.parametrize("lang", ["hin_Deva", "tam_Taml", "urd_Arab"])
def test_rows_hold_exactly_the_kept_documents(injected, tokenizer, lang):
    corpus, _, out = injected
    docs = _expected_stream(out, corpus, tokenizer, lang)
    info = read_metadata(out)
    rows = read_rows(out, lang, slice(0, info.languages[lang]["rows"]))
    flat_seg = rows.segment_ids.reshape(-1)
    real = flat_seg > 0
    # No token lost or added: the non-padding tokens are the documents end to end.
    assert rows.tokens.reshape(-1)[real].tolist() == [t for d in docs for t in d]
    assert not real[: real.sum()].__invert__().any(), "padding only at the very end"
    # Positions: index inside the document (continuing across row boundaries).
    assert rows.positions.reshape(-1)[real].tolist() == [i for d in docs for i in range(len(d))]
    # Segment ids: documents numbered 1.. within each row, a new number exactly at each document start.
    doc_of_token = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    L = SEQ_LEN
    for r in range(len(rows)):
        ids = doc_of_token[r * L : (r + 1) * L]
        assert rows.segment_ids[r, : len(ids)].tolist() == (ids - ids[0] + 1).tolist()
    assert info.languages[lang]["tokens"] == sum(len(d) for d in docs)
    assert info.seq_len == SEQ_LEN and len(info.tokenizer_sha256) == 64


def test_resume_after_interruption_equals_uninterrupted(tmp_path, sample_train_dir, tokenizer, clean_cache, monkeypatch):
    out = tmp_path / "cache"
    config = DataConfig(checkpoint_every_docs=3000)

    class Interrupted(Exception):
        pass

    # Interrupt a few batches after the 2nd checkpoint, with rows written since then (small
    # PACK_ROWS and WRITE_ROWS): the resumed run must overwrite those, not append after them.
    monkeypatch.setattr(local_engine, "PACK_ROWS", 2)
    monkeypatch.setattr(local_engine, "WRITE_ROWS", 2)
    checkpoints = []
    monkeypatch.setattr(local_engine, "_checkpoint_hook", checkpoints.append)
    original_consume = local_engine._Run.consume
    batches_after = []

    def consume(self, batch, result):
        tokens = original_consume(self, batch, result)
        if len(checkpoints) == 2:
            batches_after.append(1)
            if len(batches_after) == 3:
                raise Interrupted
        return tokens

    monkeypatch.setattr(local_engine._Run, "consume", consume)
    with pytest.raises(Interrupted):
        prepare([sample_train_dir], tokenizer, out, seq_len=SEQ_LEN, config=config, workers=1, show_progress=False)
    with pytest.raises(CacheError, match="incomplete"):
        read_metadata(out)  # a partial run never looks complete
    monkeypatch.setattr(local_engine._Run, "consume", original_consume)
    result = prepare([sample_train_dir], tokenizer, out, seq_len=SEQ_LEN, config=config, workers=1, show_progress=False)
    assert result.resumed and 0 < result.documents < 11191
    a, b = read_metadata(out), read_metadata(clean_cache)
    assert a.languages == b.languages
    assert json.loads((out / "report.json").read_text()) == json.loads((clean_cache / "report.json").read_text())
    assert (out / DROP_LOG).read_text() == (clean_cache / DROP_LOG).read_text()
    for lang, v in b.languages.items():
        ra, rb = read_rows(out, lang, slice(0, v["rows"])), read_rows(clean_cache, lang, slice(0, v["rows"]))
        for name in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(getattr(ra, name), getattr(rb, name))


def test_a_checkpoint_is_on_disk_before_its_state_file_says_so(tmp_path, sample_train_dir, tokenizer, monkeypatch):
    """Power-loss safety: when state.json is renamed into place, every dedup part it counts and the
    drop log were fsynced, and the directory is fsynced right after (so the rename itself lasts)."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "cache"
    prepare([sample_train_dir], tokenizer, out, seq_len=SEQ_LEN, config=DataConfig(checkpoint_every_docs=3000),
            workers=1, show_progress=False)
    state_dir = str((out / ".prepare_state").resolve())
    commits = [i for i, (kind, path) in enumerate(events) if kind == "replace" and path.endswith("state.json")]
    assert len(commits) >= 2
    for n, i in enumerate(commits):
        synced = {path for kind, path in events[:i] if kind == "fsync"}
        for name in ("exact_keys", "fingerprints", "bands"):
            assert f"{state_dir}/{name}.{n:06d}.npy" in synced, (n, name)
        assert str((out / DROP_LOG).resolve()) in synced
        assert events[i + 1] == ("fsync", state_dir)


def test_rerun_on_complete_cache_is_a_no_op_and_mismatch_is_refused(clean_cache, sample_train_dir, tokenizer):
    result = prepare([sample_train_dir], tokenizer, clean_cache, seq_len=SEQ_LEN, workers=1, show_progress=False)
    assert result.documents == 0 and result.resumed
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare([sample_train_dir], tokenizer, clean_cache, seq_len=SEQ_LEN * 2, workers=1, show_progress=False)


def test_main_process_shares_the_work_and_keeps_input_order(tmp_path, sample_train_dir, tokenizer, monkeypatch):
    """With worker processes the main process also processes batches while it waits; whichever
    process did a batch, the cache, report and drop log equal a one-process run's."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("hin_Deva.txt", "tam_Taml.txt", "urd_Arab.txt"):
        lines = (sample_train_dir / name).read_bytes().splitlines(keepends=True)[:700]
        (corpus / name).write_bytes(b"".join(lines + lines[:50]))  # with duplicates to decide in order
    monkeypatch.setattr(stages, "BATCH_DOCS", 64)
    one = prepare([corpus], tokenizer, tmp_path / "one", seq_len=SEQ_LEN, workers=1, show_progress=False)
    local_batches = []
    original_call = stages.DocumentProcessor.__call__
    monkeypatch.setattr(stages.DocumentProcessor, "__call__",
                        lambda self, task: local_batches.append(task) or original_call(self, task))
    several = prepare([corpus], tokenizer, tmp_path / "several", seq_len=SEQ_LEN, workers=3, show_progress=False)
    batches = -(-750 // 64) * 3
    assert 0 < len(local_batches) < batches  # both the main process and the pool did batches
    assert several.report == one.report and several.languages == one.languages
    assert (tmp_path / "several" / DROP_LOG).read_text() == (tmp_path / "one" / DROP_LOG).read_text()
    for lang, v in one.languages.items():
        for name in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(getattr(read_rows(tmp_path / "several", lang, slice(0, v["rows"])), name),
                                          getattr(read_rows(tmp_path / "one", lang, slice(0, v["rows"])), name))


@pytest.mark.slow
def test_worker_processes_give_the_same_cache(tmp_path, sample_train_dir, tokenizer, clean_cache):
    out = tmp_path / "cache"
    prepare([sample_train_dir], tokenizer, out, seq_len=SEQ_LEN, workers=2, show_progress=False)
    assert read_metadata(out).languages == read_metadata(clean_cache).languages
    for lang, v in read_metadata(out).languages.items():
        np.testing.assert_array_equal(
            read_rows(out, lang, slice(0, v["rows"])).tokens, read_rows(clean_cache, lang, slice(0, v["rows"])).tokens
        )


def test_per_language_limits_apply_in_order(tokenizer):
    from indicfm.data.stages import DocumentProcessor

    config = DataConfig.model_validate({"language_filters": {"tam_Taml": {"max_chars": 20}}})
    proc = DocumentProcessor(config, str(tokenizer))
    long_tamil = "இது ஒரு நீண்ட தமிழ் வாக்கியம் ஆகும் என்று சொல்லலாம்"
    assert proc.reasons([("tam_Taml", long_tamil), ("tam_Taml", "x y"), ("hin_Deva", "यह हिंदी का एक लंबा वाक्य है जो ठीक है")])[0] == [
        "too_long", "too_short", None
    ]
    # A short English "Tamil" line is too_long before it is wrong_script: cheap checks first.
    assert proc.reasons([("tam_Taml", "English words in a Tamil file here")])[0] == ["too_long"]


def test_cli_prepare_and_inspect(tmp_path, sample_train_dir, tokenizer):
    from typer.testing import CliRunner

    from indicfm.cli import app

    corpus = tmp_path / "in"
    corpus.mkdir()
    for name in ("hin_Deva.txt", "urd_Arab.txt"):
        (corpus / name).write_bytes((sample_train_dir / name).read_bytes())
    (corpus / "hin_Deva.txt").open("a").write("This English line is in the Hindi file.\n")
    out = tmp_path / "cache"
    runner = CliRunner()
    res = runner.invoke(app, ["data", "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer),
                              "--output", str(out), "--seq-len", "64", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert (out / "metadata.json").is_file() and read_metadata(out).seq_len == 64
    res = runner.invoke(app, ["data", "inspect", str(out), "--reason", "wrong_script"])
    assert res.exit_code == 0 and "This English line is in the Hindi file." in res.output
    res = runner.invoke(app, ["data", "prepare", "--input", str(tmp_path / "missing"), "--tokenizer", str(tokenizer),
                              "--output", str(tmp_path / "c2")])
    assert res.exit_code == 2 and "missing" in res.output
    res = runner.invoke(app, ["data", "inspect", str(out), "--reason", "bogus"])
    assert res.exit_code == 2


def test_overwrite_refuses_to_delete_a_directory_that_is_not_a_cache(tmp_path, sample_train_dir, tokenizer):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(PrepareError, match="not a token cache"):
        prepare([sample_train_dir], tokenizer, precious, seq_len=SEQ_LEN, workers=1, overwrite=True, show_progress=False)
    with pytest.raises(PrepareError, match="empty directory"):
        prepare([sample_train_dir], tokenizer, precious, seq_len=SEQ_LEN, workers=1, show_progress=False)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_a_prepare_interrupted_by_an_older_version_is_not_resumed_with_its_dedup_state(
    tmp_path, sample_train_dir, tokenizer, monkeypatch
):
    out = tmp_path / "cache"
    config = DataConfig(checkpoint_every_docs=2000)

    class Interrupted(Exception):
        pass

    def stop(checkpoints_done):
        raise Interrupted

    monkeypatch.setattr(local_engine, "_checkpoint_hook", stop)
    with pytest.raises(Interrupted):
        prepare([sample_train_dir], tokenizer, out, seq_len=SEQ_LEN, config=config, workers=1, show_progress=False)
    state_file = out / ".prepare_state" / "state.json"
    state = json.loads(state_file.read_text())
    del state["dedup_state_format"]  # as written before the index kept fingerprints
    state_file.write_text(json.dumps(state))
    monkeypatch.undo()
    with pytest.raises(PrepareError, match="another indicfm version"):
        prepare([sample_train_dir], tokenizer, out, seq_len=SEQ_LEN, config=config, workers=1, show_progress=False)


def test_resume_point_inside_a_line_range_skips_exactly_the_done_documents(sample_train_dir, tokenizer):
    """Workers read line ranges; a resume may start inside one (e.g. after a checkpoint written with
    another batch size): the documents read must be exactly the rest of the input, in order."""
    from indicfm.data.local_engine import _tasks
    from indicfm.data.stages import DocumentProcessor
    from indicfm.data.sources import find_input_files, iter_documents

    config = DataConfig()
    files = find_input_files([sample_train_dir])
    processor = DocumentProcessor(config, str(tokenizer))
    every = [(d.source, d.line, d.text, d.drop_reason) for f in files for d in iter_documents(f)]
    for skip in (0, 1, 511, 5003, len(every) - 1):
        got = []
        for task in _tasks(files, config, skip, [0.0]):
            source, lines, docs = processor.read(task)
            got += [(source, line, text, reason) for line, text, reason in zip(lines, docs.texts, docs.reasons)]
        assert got == every[skip:], skip
