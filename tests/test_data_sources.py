"""The shared document reader: every line is a document, broken ones carry the right reason."""

import json
import tracemalloc
import unicodedata
from pathlib import Path

import pytest

from indicfm.data.sources import Document, InputError, find_input_files, iter_documents


def _read(path: Path, **kw) -> list[Document]:
    (f,) = find_input_files([path], **kw)
    return list(iter_documents(f))


def test_sample_files_found_sorted_with_language(sample_train_dir):
    files = find_input_files([sample_train_dir])
    names = [f.path.name for f in files]
    assert names == sorted(p.name for p in sample_train_dir.glob("*.txt"))
    assert all(f.format == "text" and f.lang == f.path.name.split(".")[0] for f in files)


def test_sample_lines_all_documents_and_nfc(sample_train_dir):
    path = sample_train_dir / "hin_Deva.txt"
    raw_lines = path.read_bytes().decode("utf-8").split("\n")
    if raw_lines[-1] == "":
        raw_lines.pop()  # the final newline ends the last line; it does not start a new one
    docs = _read(path)
    assert len(docs) == len(raw_lines)
    assert [d.line for d in docs] == list(range(1, len(raw_lines) + 1))
    for doc, raw in zip(docs, raw_lines):
        if raw.strip():
            assert doc.drop_reason is None
            assert doc.text == unicodedata.normalize("NFC", raw)
            assert doc.lang == "hin_Deva"


def test_missing_path_and_unknown_language_name_the_path(tmp_path):
    with pytest.raises(InputError, match="nope.txt"):
        find_input_files([tmp_path / "nope.txt"])
    bad = tmp_path / "corpus.txt"
    bad.write_text("hello\n")
    with pytest.raises(InputError, match="corpus.txt"):
        find_input_files([bad])
    (f,) = find_input_files([bad], allow_unknown=True)
    assert f.lang == "unknown"
    with pytest.raises(InputError, match="data.csv"):
        (tmp_path / "data.csv").write_text("x")
        find_input_files([tmp_path / "data.csv"])


def test_directory_scan_is_recursive_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tam_Taml.txt").write_text("x\n")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_dir" / "hin_Deva.txt").write_text("x\n")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / "x.jsonl").write_text("")
    files = find_input_files([tmp_path, tmp_path / "x.jsonl"])
    assert [f.path.relative_to(tmp_path).as_posix() for f in files] == ["a_dir/hin_Deva.txt", "b/tam_Taml.txt", "x.jsonl"]
    assert files[2].lang is None and files[2].format == "jsonl"


def test_read_time_reasons_in_text_file(tmp_path):
    good = "नमस्ते दुनिया"
    lines = [
        good.encode(),
        b"",  # empty line
        b"   \t ",  # whitespace only
        "ab\u0000cd".encode(),  # NUL
        "x\u0085y".encode(),  # C1 control (NEL)
        b"bad \xff\xfe bytes",
        b"\xff\x00",  # invalid utf8 wins over control chars
        ("a" * 101).encode(),  # too long for max_chars=100
        ("अ" * 100).encode(),  # exactly 100 characters (300 bytes): kept
        "tab\tinside".encode(),
        "crlf line\r".encode(),  # \r\n line ending is not part of the text
    ]
    path = tmp_path / "hin_Deva.txt"
    path.write_bytes(b"\n".join(lines))  # no final newline: the last line still counts
    (f,) = find_input_files([path])
    docs = list(iter_documents(f, max_chars=100))
    reasons = [d.drop_reason for d in docs]
    assert reasons == [None, "empty", "empty", "control_chars", "control_chars", "invalid_utf8",
                       "invalid_utf8", "too_long", None, None, None]
    assert docs[0].text == good and docs[-1].text == "crlf line" and docs[9].text == "tab\tinside"
    assert all(d.text is None and d.preview != "" or d.drop_reason == "empty" for d in docs if d.drop_reason)
    assert "\\x00" in docs[3].preview  # controls shown escaped, never raw


def test_huge_line_is_streamed_not_loaded(tmp_path):
    path = tmp_path / "eng_Latn.txt"
    with open(path, "wb") as out:
        out.write(b"first line\n")
        out.write(b"y" * (8 << 20) + b"\n")  # an 8 MB line
        out.write(b" " * (3 << 20) + b"\n")  # a 3 MB whitespace-only line: empty, not too_long
        out.write(b"z" * (3 << 20) + b"\x00\n")  # a long line with a NUL: control_chars
        out.write(b"last line\n")
    (f,) = find_input_files([path])
    tracemalloc.start()
    docs = list(iter_documents(f, max_chars=1000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [d.drop_reason for d in docs] == [None, "too_long", "empty", "control_chars", None]
    assert [d.line for d in docs] == [1, 2, 3, 4, 5]
    assert docs[-1].text == "last line"
    assert peak < 3 << 20, f"reader held {peak} bytes for an 8 MB line"


def test_jsonl_records(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        json.dumps({"text": "hello world", "lang": "eng_Latn"}).encode(),
        b"{not json",
        json.dumps({"lang": "hin_Deva"}).encode(),  # no text
        json.dumps({"text": 5, "lang": "hin_Deva"}).encode(),  # text not a string
        json.dumps({"text": "x", "lang": "xx_Yyyy"}).encode(),  # unknown language
        json.dumps({"text": "no lang"}).encode(),  # no language and none in the file name
        b'{"text": "bad \xff byte", "lang": "hin_Deva"}',
        json.dumps({"text": "nul\u0000", "lang": "hin_Deva"}).encode(),
        json.dumps({"text": "  ", "lang": "tam_Taml"}).encode(),
        json.dumps({"text": "two\nlines", "lang": "tam_Taml"}).encode(),
        b"",
        json.dumps([1, 2]).encode(),
    ]
    path.write_bytes(b"\n".join(rows) + b"\n")
    docs = _read(path)
    assert [(d.drop_reason, d.lang) for d in docs] == [
        (None, "eng_Latn"),
        ("malformed_record", "unknown"),
        ("malformed_record", "unknown"),
        ("malformed_record", "unknown"),
        ("malformed_record", "unknown"),
        ("malformed_record", "unknown"),
        ("invalid_utf8", "hin_Deva"),
        ("control_chars", "hin_Deva"),
        ("empty", "tam_Taml"),
        (None, "tam_Taml"),
        ("malformed_record", "unknown"),
        ("malformed_record", "unknown"),
    ]
    assert docs[9].text == "two\nlines"


def test_jsonl_language_from_file_name(tmp_path):
    path = tmp_path / "hin_Deva.jsonl"
    path.write_text(json.dumps({"text": "नमस्ते"}) + "\n", encoding="utf-8")
    (doc,) = _read(path)
    assert doc.lang == "hin_Deva" and doc.text == "नमस्ते"


def test_parquet_through_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"text": ["नमस्ते", None, "  "], "lang": ["hin_Deva", "hin_Deva", "hin_Deva"]}), path)
    docs = _read(path)
    assert [(d.drop_reason, d.lang, d.line) for d in docs] == [
        (None, "hin_Deva", 1), ("malformed_record", "unknown", 2), ("empty", "hin_Deva", 3)
    ]


def test_line_ranges_read_in_parallel_equal_the_whole_file(tmp_path, sample_train_dir):
    """Workers read a file in line ranges (bulk decoding when the range is clean): the documents,
    line numbers and reasons must be exactly those of reading the file line by line."""
    import random

    from indicfm.data.sources import DocumentColumns, line_ranges, read_line_range

    rng = random.Random(7)
    real = (sample_train_dir / "hin_Deva.txt").read_bytes().splitlines()[:40]
    pieces = real + [b"", b"   ", b"x\r", b"\xff\xfe bad bytes", b"nul\x00here", "क\u093c".encode(), b"y" * 3000]
    for trial in range(30):
        lines = [rng.choice(pieces) for _ in range(rng.randint(0, 50))]
        data = (b"\xef\xbb\xbf" if trial % 4 == 0 else b"") + b"\n".join(lines) + (b"\n" if trial % 2 else b"")
        path = tmp_path / "hin_Deva.txt"
        path.write_bytes(data)
        (f,) = find_input_files([path])
        for max_chars in (100, 100_000):
            expected = list(iter_documents(f, max_chars=max_chars))
            ranges = list(line_ranges(path, max_lines=rng.randint(1, 9), max_bytes=rng.choice([50, 1 << 20])))
            assert [r.first_line for r in ranges] == [1 + sum(r.lines for r in ranges[:i]) for i in range(len(ranges))]
            assert sum(r.lines for r in ranges) == len(expected)
            got = DocumentColumns([], [], [], [])
            for r in ranges:
                part = read_line_range(f, r, max_chars=max_chars)
                for name in ("langs", "texts", "reasons", "previews"):
                    getattr(got, name).extend(getattr(part, name))
            assert got == DocumentColumns.from_documents(expected), (trial, max_chars)
