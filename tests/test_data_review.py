"""`data prepare`'s features file and `indicfm data review`'s server, through HTTP.

References are independent of the code under test: feature values against the scalar filter
functions on the document's own text, re-applied thresholds against a plain per-document loop over
the features file, and an exported YAML against a real second `data prepare`.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import indicfm.data.local_engine as local_engine
from indicfm.data.config import DataConfig
from indicfm.data.features import FEATURES_FILE
from indicfm.data.filters import duplicate_line_fraction, filters_for, non_letter_ratio
from indicfm.data.prepare import prepare
from indicfm.data.review.server import EXPORT_FILE, JUDGEMENTS_FILE, ReviewError, make_server, right_to_left
from indicfm.data.testing import train_tiny_tokenizer
from indicfm.text import script_of_language, script_share

SEQ_LEN = 64
LANGS = ("hin_Deva", "mar_Deva", "urd_Arab", "tam_Taml")
#: A Hindi sentence of six words; a copy of it goes into the Marathi file (a cross-language
#: exact duplicate whose original a stricter Hindi min_words drops).
SIX_WORDS = "यह वाक्य छह शब्दों का है"


def _make_corpus(sample_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for lang in LANGS:
        lines = (sample_dir / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:400]
        out.joinpath(f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "hin_Deva.txt", "a", encoding="utf-8") as f:
        f.write(SIX_WORDS + "\n")
        f.write("नमस्ते दुनिया\n")  # too_short (2 words)
        f.write("नमस्ते दुनिया\n")  # the same: too_short again (duplicates only among passing documents)
        f.write("१२३४ ५६७८ ९०१२ — ३४५६ %% ७८९० ## यह\n")  # too_many_symbols
        f.write("Line one is English\nEnglish line two\n")  # wrong_script
    with open(out / "mar_Deva.txt", "a", encoding="utf-8") as f:
        f.write(SIX_WORDS + "\n")  # exact duplicate of the Hindi line, across languages
    with open(out / "tam_Taml.txt", "a", encoding="utf-8") as f:
        f.write("வணக்கம்\n")  # too_short (1 word)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, sample_train_dir) -> Path:
    return train_tiny_tokenizer(sample_train_dir, tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_train_dir) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    _make_corpus(sample_train_dir, out)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, corpus, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("review") / "cache"
    prepare([corpus], tokenizer, out, seq_len=SEQ_LEN, workers=1, show_progress=False)
    return out


@pytest.fixture()
def server(cache):
    srv = make_server(cache, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def get(base: str, path: str, **params) -> dict:
    if "o" in params:
        params["o"] = json.dumps(params["o"])
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url) as response:
        return json.loads(response.read())


def post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def rows_of(cache: Path) -> list[dict]:
    return pq.read_table(cache / FEATURES_FILE).to_pylist()


def _lines(corpus: Path) -> dict[tuple[str, int], str]:
    out = {}
    for path in corpus.glob("*.txt"):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            out[(path.name, i)] = line
    return out


# -- the features file ----------------------------------------------------------------------------


def test_features_file_has_one_row_per_document_with_the_reports_verdicts(cache):
    rows = rows_of(cache)
    report = json.loads((cache / "report.json").read_text())["languages"]
    assert len(rows) == sum(v["docs_in"] for v in report.values())
    for lang, v in report.items():
        mine = [r for r in rows if r["lang"] == lang]
        assert sum(r["reason"] is None for r in mine) == v["docs_kept"]
        assert Counter(r["reason"] for r in mine if r["reason"]) == Counter(v["dropped"])
        assert sum(r["tokens"] for r in mine if r["reason"] is None) == v["tokens"]
    dropped_tsv = {(Path(s).name, int(n)): reason for s, n, _, reason in
                   (line.split("\t") for line in (cache / "dropped.tsv").read_text().splitlines())}
    assert {(Path(r["source"]).name, r["line"]): r["reason"] for r in rows if r["reason"]} == dropped_tsv


def test_feature_values_equal_the_scalar_filters_on_the_text(cache, corpus):
    import unicodedata

    texts = _lines(corpus)
    rows = rows_of(cache)
    for r in rows[::7]:
        text = unicodedata.normalize("NFC", texts[(Path(r["source"]).name, r["line"])])
        assert r["chars"] == len(text) and r["words"] == len(text.split())
        assert r["non_letter_ratio"] == pytest.approx(non_letter_ratio(text), abs=1e-12)
        assert r["duplicate_line_fraction"] == duplicate_line_fraction(text)
        in_script, letters = script_share(text, script_of_language(r["lang"]))
        assert r["letters"] == letters
        assert r["script_share"] == pytest.approx(in_script / max(letters, 1), abs=1e-12)


def test_duplicates_name_the_kept_document_they_repeat(cache, corpus):
    texts = _lines(corpus)
    rows = rows_of(cache)
    collapsed = [" ".join(texts[(Path(r["source"]).name, r["line"])].split()) for r in rows]
    dups = [i for i, r in enumerate(rows) if r["reason"] in ("exact_duplicate", "near_duplicate")]
    assert dups
    for i in dups:
        target = rows[i]["duplicate_of"]
        assert target is not None and target < i and rows[target]["reason"] is None
        if rows[i]["reason"] == "exact_duplicate":
            assert collapsed[target] == collapsed[i] and rows[i]["similarity"] == 1.0
        else:
            assert 0.7 < rows[i]["similarity"] <= 1.0
    cross = [i for i in dups if collapsed[i] == SIX_WORDS]
    assert len(cross) == 1 and rows[cross[0]]["lang"] == "mar_Deva" and rows[rows[cross[0]]["duplicate_of"]]["lang"] == "hin_Deva"


def test_features_off_writes_no_file_and_changes_no_verdict(tmp_path, corpus, tokenizer, cache):
    """data.features=false (the way to save its cost) leaves the cache itself as it was."""
    off = tmp_path / "off"
    prepare([corpus], tokenizer, off, seq_len=SEQ_LEN, config=DataConfig(features=False), workers=1,
            show_progress=False)
    assert not (off / FEATURES_FILE).exists()
    for name in ("report.json", "dropped.tsv"):
        assert (off / name).read_text() == (cache / name).read_text()
    with pytest.raises(ReviewError, match=r"no features\.parquet.*data\.features=false"):
        make_server(off, port=0)


def test_an_interrupted_prepare_resumes_to_the_same_features(tmp_path, corpus, tokenizer, cache, monkeypatch):
    class Interrupted(Exception):
        pass

    def stop(checkpoints_done):
        if checkpoints_done == 2:
            raise Interrupted

    config = DataConfig(checkpoint_every_docs=300)
    monkeypatch.setattr(local_engine, "_checkpoint_hook", stop)
    with pytest.raises(Interrupted):
        prepare([corpus], tokenizer, tmp_path / "c", seq_len=SEQ_LEN, config=config, workers=1, show_progress=False)
    monkeypatch.undo()
    prepare([corpus], tokenizer, tmp_path / "c", seq_len=SEQ_LEN, config=config, workers=1, show_progress=False)
    assert pq.read_table(tmp_path / "c" / FEATURES_FILE).equals(pq.read_table(cache / FEATURES_FILE))


# -- an independent re-application of thresholds ------------------------------------------------


def reference_verdicts(rows: list[dict], config: DataConfig) -> list[str | None]:
    """Each document's reason under ``config``, one document at a time, from the features alone."""
    out: list[str | None] = []
    kept_keys: set[int] = set()
    lid = config.lid
    for r in rows:
        if r["chars"] is None:  # dropped while reading: no threshold involved
            out.append(r["reason"])
            continue
        f = filters_for(config, r["lang"])
        ngram_values = [(r.get(f"top_ngram_{n}"), limit) for n, limit in f.max_top_ngram_fraction.items()]
        ngram_values += [(r.get(f"dup_ngram_{n}"), limit) for n, limit in f.max_duplicate_ngram_fraction.items()]
        lid_drops = (lid.enabled and r["lang"] not in lid.skip_languages and r["lid_lang"] not in (None, r["lang"])
                     and script_of_language(r["lid_lang"]) == script_of_language(r["lang"])
                     and r["lid_score"] >= lid.min_confidence and r["chars"] >= lid.min_chars)
        if r["chars"] > f.max_chars:
            reason = "too_long"
        elif r["words"] < f.min_words:
            reason = "too_short"
        elif r["non_letter_ratio"] > f.max_non_letter_ratio:
            reason = "too_many_symbols"
        elif r["duplicate_line_fraction"] > f.max_duplicate_line_fraction:
            reason = "repeated_lines"
        elif r["words"] >= f.repetition_min_words and any(v is not None and v > limit for v, limit in ngram_values):
            reason = "repeated_ngrams"
        elif r["script_share"] is not None and (r["letters"] == 0 or r["script_share"] < f.min_script_share):
            reason = "wrong_script"
        elif lid_drops:
            reason = "wrong_language"
        elif r["key64"] in kept_keys:
            reason = "exact_duplicate"
        elif r["reason"] == "near_duplicate" and out[r["duplicate_of"]] in (None, "exact_duplicate"):
            reason = "near_duplicate"
        else:
            reason = None
            kept_keys.add(r["key64"])
        out.append(reason)
    return out


OVERRIDES = {
    "language_filters": {"hin_Deva": {"min_words": 7}, "tam_Taml": {"min_words": 1},
                         "urd_Arab": {"max_non_letter_ratio": 0.08}},
    "lid": {"min_confidence": 0.5},
}


def _config_with(base: DataConfig, overrides: dict) -> DataConfig:
    data = base.model_dump()
    data["language_filters"] = {lang: dict(values) for lang, values in overrides["language_filters"].items()}
    data["lid"]["min_confidence"] = overrides["lid"]["min_confidence"]
    return DataConfig.model_validate(data)


def test_summary_counts_are_the_reports(server, cache):
    summary = get(server, "/api/summary")
    report = json.loads((cache / "report.json").read_text())["languages"]
    assert [x["lang"] for x in summary["languages"]] == sorted(LANGS)
    for x in summary["languages"]:
        r = report[x["lang"]]
        assert (x["docs_in"], x["docs_kept"], x["tokens"], x["dropped"]) == (r["docs_in"], r["docs_kept"], r["tokens"], r["dropped"])
        assert x["with_thresholds"] == {"docs_in": r["docs_in"], "docs_kept": r["docs_kept"], "dropped": r["dropped"]}
        assert {"min_words", "max_non_letter_ratio", "min_script_share"} <= {rule["name"] for rule in x["rules"]}


def test_threshold_effect_equals_an_independent_computation(server, cache):
    rows = rows_of(cache)
    expected = reference_verdicts(rows, _config_with(DataConfig(), OVERRIDES))
    assert reference_verdicts(rows, DataConfig()) == [r["reason"] for r in rows]  # the reference is right as is
    for lang in LANGS:
        mine = [i for i, r in enumerate(rows) if r["lang"] == lang]
        effect = get(server, "/api/effect", lang=lang, o=OVERRIDES, size=100)
        assert effect["then"]["docs_kept"] == sum(expected[i] is None for i in mine)
        assert effect["then"]["dropped"] == dict(Counter(expected[i] for i in mine if expected[i]))
        changed = [i for i in mine if expected[i] != rows[i]["reason"]]
        assert effect["changes"]["total"] == len(changed)
        assert [d["id"] for d in effect["changes"]["documents"]] == changed[:100]
        assert all(d["new_reason"] == expected[d["id"]] for d in effect["changes"]["documents"])
        # kept → dropped, dropped → kept, and dropped either way but first by another rule
        assert effect["newly_dropped"] == sum(rows[i]["reason"] is None and expected[i] is not None for i in mine)
        assert effect["newly_kept"] == sum(rows[i]["reason"] is not None and expected[i] is None for i in mine)
        assert effect["other_reason"] == sum(None not in (rows[i]["reason"], expected[i]) for i in changed)
        listed = get(server, "/api/effect", lang=lang, o=OVERRIDES, size=100, which="dropped")["changes"]
        assert all(rows[d["id"]]["reason"] is None and d["new_reason"] for d in listed["documents"])
    hin = get(server, "/api/effect", lang="hin_Deva", o=OVERRIDES, size=5)
    assert hin["newly_dropped"] > 0 and hin["changes"]["documents"][0]["text"]
    mar = get(server, "/api/effect", lang="mar_Deva", o=OVERRIDES)
    assert mar["newly_kept"] >= 1  # the copy of the six-word Hindi line, whose original is now too short


def test_histogram_counts_every_document_with_a_value(server, cache):
    rows = [r for r in rows_of(cache) if r["lang"] == "hin_Deva"]
    h = get(server, "/api/histogram", lang="hin_Deva", rule="min_words", o=OVERRIDES)
    assert h["threshold"] == 7
    total = sum(h["kept"]) + sum(h["dropped_by_rule"]) + sum(h["dropped_other"])
    assert total == h["with_value"] == sum(r["words"] is not None for r in rows)
    expected = reference_verdicts(rows_of(cache), _config_with(DataConfig(), OVERRIDES))
    all_rows = rows_of(cache)
    assert sum(h["dropped_by_rule"]) == sum(1 for i, r in enumerate(all_rows)
                                           if r["lang"] == "hin_Deva" and expected[i] == "too_short")
    edges = h["edges"]
    first_bin = sum(1 for r in rows if r["words"] is not None and r["words"] < edges[1])
    assert h["kept"][0] + h["dropped_by_rule"][0] + h["dropped_other"][0] == first_bin


def test_examples_show_dropped_texts_beside_kept_ones_near_the_threshold(server, cache):
    x = get(server, "/api/examples", lang="hin_Deva", reason="too_short", size=10)
    assert [d["text"] for d in x["dropped"]["documents"]] == ["नमस्ते दुनिया", "नमस्ते दुनिया"]
    near = x["near"]["kept"]["documents"]
    assert near and all(d["reason"] is None for d in near)
    distances = [abs(d["values"]["words"] - 3) for d in near]
    assert distances == sorted(distances)
    kept_words = [r["words"] for r in rows_of(cache) if r["lang"] == "hin_Deva" and r["reason"] is None]
    assert distances[0] == min(abs(w - 3) for w in kept_words)
    urdu = get(server, "/api/examples", lang="urd_Arab", reason="near_duplicate", size=3)
    assert all(d["rtl"] for d in urdu["dropped"]["documents"])
    assert get(server, "/api/examples", lang="hin_Deva", reason="too_short", size=1000)["dropped"]["size"] == 100
    # the kept documents near the threshold page on their own (there are more of them than drops)
    second = get(server, "/api/examples", lang="hin_Deva", reason="too_short", size=10, near_page=1)
    assert second["dropped"]["documents"] == x["dropped"]["documents"]
    assert second["near"]["kept"]["page"] == 1
    assert [d["id"] for d in second["near"]["kept"]["documents"]] not in ([], [d["id"] for d in near])


@pytest.mark.parametrize("lang, rtl", [("urd_Arab", True), ("kas_Arab", True), ("snd_Arab", True),
                                       ("kas_Deva", False), ("snd_Deva", False), ("hin_Deva", False), ("xyz_Zzzz", False)])
def test_perso_arabic_languages_are_shown_right_to_left(lang, rtl):
    assert right_to_left(lang) is rtl


def test_duplicate_clusters(server, cache):
    rows = rows_of(cache)
    d = get(server, "/api/duplicates", lang="hin_Deva", size=50)
    heads = Counter(r["duplicate_of"] for r in rows if r["duplicate_of"] is not None and rows[r["duplicate_of"]]["lang"] == "hin_Deva")
    assert d["total"] == len(heads)
    for cluster in d["clusters"]:
        assert cluster["kept"]["reason"] is None and cluster["size"] == heads[cluster["kept"]["id"]]
        assert all(x["duplicate_of"] == cluster["kept"]["id"] for x in cluster["duplicates"])
    six = [c for c in d["clusters"] if c["kept"]["text"] == SIX_WORDS]
    assert six and six[0]["duplicates"][0]["lang"] == "mar_Deva"


def test_a_judgement_is_saved_as_a_json_line(server, cache):
    rows = rows_of(cache)
    doc = next(i for i, r in enumerate(rows) if r["reason"] == "too_short")
    saved = post(server, "/api/judgements", {"id": doc, "label": "wrongly_dropped", "who": "tester"})
    line = json.loads((cache / JUDGEMENTS_FILE).read_text(encoding="utf-8").splitlines()[-1])
    assert saved["saved"] == line
    assert (line["id"], line["source"], line["line"], line["reason"], line["label"], line["who"]) == (
        doc, rows[doc]["source"], rows[doc]["line"], "too_short", "wrongly_dropped", "tester")
    assert line["when"].endswith("+00:00")
    with pytest.raises(urllib.error.HTTPError) as err:
        post(server, "/api/judgements", {"id": doc, "label": "maybe"})
    assert err.value.code == 400 and "label" in json.loads(err.value.read())["error"]


def test_bad_requests_say_what_is_wrong(server):
    for path, params, words in [("/api/effect", {"lang": "xxx_Xxxx"}, "unknown language"),
                                ("/api/histogram", {"lang": "hin_Deva", "rule": "nope"}, "unknown rule"),
                                ("/api/effect", {"lang": "hin_Deva", "o": {"language_filters": {"hin_Deva": {"min_wrds": 3}}}},
                                 "min_wrds")]:
        with pytest.raises(urllib.error.HTTPError) as err:
            get(server, path, **params)
        assert err.value.code == 400 and words in json.loads(err.value.read())["error"]


def test_exported_yaml_is_accepted_by_prepare_and_gives_the_predicted_counts(server, cache, corpus, tokenizer, tmp_path):
    from typer.testing import CliRunner

    from indicfm.cli import app

    exported = post(server, "/api/export", {"o": OVERRIDES})
    path = Path(exported["file"])
    assert path == cache / EXPORT_FILE and path.read_text(encoding="utf-8") == exported["yaml"]
    predicted = {x["lang"]: x["with_thresholds"] for x in get(server, "/api/summary", o=OVERRIDES)["languages"]}
    out = tmp_path / "again"
    result = CliRunner().invoke(app, ["data", "prepare", "-c", str(path), "--input", str(corpus), "--tokenizer",
                                      str(tokenizer), "--output", str(out), "--seq-len", str(SEQ_LEN), "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())["languages"]
    for lang, counts in predicted.items():
        assert (report[lang]["docs_kept"], report[lang]["dropped"]) == (counts["docs_kept"], counts["dropped"]), lang
    assert predicted["hin_Deva"]["docs_kept"] < json.loads((cache / "report.json").read_text())["languages"]["hin_Deva"]["docs_kept"]


# -- bad input -----------------------------------------------------------------------------------


def test_a_directory_that_is_not_a_cache_says_what_to_run(tmp_path):
    from typer.testing import CliRunner

    from indicfm.cli import app

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReviewError, match="not a token cache.*indicfm data prepare"):
        make_server(tmp_path, port=0)
    with pytest.raises(ReviewError, match="no such directory"):
        make_server(tmp_path / "missing", port=0)
    result = CliRunner().invoke(app, ["data", "review", str(tmp_path), "--port", "0"])
    assert result.exit_code == 2 and "not a token cache" in " ".join(result.output.split())


def test_an_older_cache_without_features_says_to_rerun_prepare(tmp_path, cache):
    old = tmp_path / "old"
    shutil.copytree(cache, old)
    (old / FEATURES_FILE).unlink()
    with pytest.raises(ReviewError, match=r"no features\.parquet.*--overwrite"):
        make_server(old, port=0)


def test_a_port_in_use_is_reported(cache):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ReviewError, match=f"port {port}.*already in use"):
            make_server(cache, port=port)


def test_the_page_is_served(server):
    with urllib.request.urlopen(server + "/") as response:
        html = response.read().decode()
    assert "indicfm data review" in html and "/api/summary" in html
