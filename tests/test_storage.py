"""indicfm.storage: which locations are URLs, the tensorstore store each maps to, and the errors a
user gets for a location indicfm can't use (the bucket round trips are in test_data_prepare_gcs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from indicfm import storage


@pytest.mark.parametrize(("location", "url"), [
    ("gs://bucket/corpus", True),
    ("GS://bucket/x", True),
    ("/data/corpus", False),
    ("corpus/hin_Deva.txt", False),
    ("file:///data/corpus", False),
    (Path("/data/corpus"), False),
    ("C:/data", False),
])
def test_urls_are_told_from_local_paths(location, url):
    assert storage.is_url(location) is url


def test_local_locations_stay_pathlib_paths(tmp_path):
    assert type(storage.as_path(tmp_path)) is type(tmp_path)
    assert storage.as_path(f"file://{tmp_path}") == tmp_path
    assert storage.kvstore(tmp_path / "rows") == {"driver": "file", "path": str(tmp_path / "rows")}


def test_gs_urls_map_to_tensorstores_gcs_store():
    assert storage.kvstore("gs://my-bucket/caches/v1/rows/hin_Deva/tokens") == {
        "driver": "gcs", "bucket": "my-bucket", "path": "caches/v1/rows/hin_Deva/tokens/"}
    pytest.importorskip("upath")
    path = storage.as_path("gs://my-bucket/caches/v1") / "rows" / "hin_Deva"
    assert str(path) == "gs://my-bucket/caches/v1/rows/hin_Deva"
    assert storage.kvstore(path)["path"] == "caches/v1/rows/hin_Deva/"


def test_a_cache_in_an_unsupported_store_is_a_clear_error():
    with pytest.raises(storage.StorageError, match=r"s3://.*gs://"):
        storage.kvstore("s3://bucket/cache")
    with pytest.raises(storage.StorageError, match="no bucket"):
        storage.kvstore("gs:///cache")


def test_a_url_without_the_gcs_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "upath", None)  # `import upath` now raises ImportError
    with pytest.raises(storage.StorageError, match=r"indicfm\[gcs\]"):
        storage.as_path("gs://bucket/corpus")


def test_local_reader_reads_lines_with_a_limit_and_hashes_like_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "hin_Deva.txt"
    path.write_bytes(b"first line\nsecond\n")
    with storage.open_for_reading(path) as stream:
        assert stream.readline(5) == b"first"
        stream.seek(11)
        assert stream.readline(100) == b"second\n"
    assert storage.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert storage.file_identity(path) == [str(path.resolve()), 18, path.stat().st_mtime_ns]


@pytest.mark.parametrize(("location", "root"), [
    ("gs://bucket", True), ("gs://bucket/", True), ("gs://bucket/cache", False), ("gs://bucket/a/b/", False),
    ("/data", False),
])
def test_a_whole_bucket_is_told_from_a_prefix_in_it(location, root):
    assert storage.is_bucket_root(location) is root
