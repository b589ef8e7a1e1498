"""Where indicfm reads and writes data: local paths, or object-store URLs such as ``gs://bucket/dir``.

A corpus of hundreds of gigabytes lives in a bucket, and the nodes of a Ray cluster share no disk, so
``data prepare`` reads its inputs and tokenizer from ``gs://`` and writes a token cache there.  This module is the one place that tells the two kinds of location apart:

* a local path stays a :class:`pathlib.Path` (nothing about local runs changes);
* a URL becomes a :class:`upath.UPath` (universal-pathlib, the fsspec project's pathlib API over
  fsspec filesystems; ``gs://`` through gcsfs), so the code above keeps ``/``, ``open``,
  ``exists``, ``iterdir`` and ``rglob``;
* tensorstore is given the matching key-value store (``file`` or ``gcs``), so cache arrays are
  written and read in place, shard by shard (the Ray engine's tasks write them straight to the bucket;
  the token loader reads them from there).

Credentials are the ones gcsfs and tensorstore find themselves (Application Default Credentials:
``gcloud auth application-default login``, a service account, or the VM's metadata server).
Both honour a storage emulator for tests: ``STORAGE_EMULATOR_HOST`` (gcsfs) and
``TENSORSTORE_GCS_HTTP_URL`` (tensorstore).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

#: ``scheme://``: what marks a location as a URL rather than a local path.
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
#: URL schemes tensorstore can write cache arrays to, mapped to its kvstore driver.
_KVSTORE_DRIVERS = {"gs": "gcs", "gcs": "gcs"}
#: Read-ahead for remote files: every read is an HTTP request, so read in large blocks.
_REMOTE_BUFFER_BYTES = 8 << 20

GCS_EXTRA_HINT = 'gs:// locations need gcsfs and universal-pathlib: pip install "indicfm[gcs]"'


class StorageError(ValueError):
    """A location indicfm cannot use (an unsupported URL scheme, a missing extra)."""


def is_url(location: str | Path) -> bool:
    """Whether ``location`` is a URL (``gs://...``) rather than a local path.

    A :class:`pathlib.Path` is always local: ``Path("gs://b/x")`` has already collapsed ``//``.
    """
    if isinstance(location, Path) and not _is_upath(location):
        return False
    return bool(_URL.match(str(location))) and not str(location).startswith("file://")


def _is_upath(location: object) -> bool:
    return type(location).__module__.startswith("upath")


def scheme(location: str | Path) -> str | None:
    """The URL scheme (``gs``), or None for a local path."""
    match = _URL.match(str(location))
    return match.group("scheme").lower() if match and is_url(location) else None


def as_path(location: str | Path) -> Path:
    """A path object for ``location``: :class:`pathlib.Path` when local, :class:`upath.UPath` for a
    URL (same methods; ``str()`` gives the URL back)."""
    if _is_upath(location):
        return location  # type: ignore[return-value]
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if not is_url(text):
        return Path(location)
    try:
        from upath import UPath
    except ImportError as err:
        raise StorageError(f"{text}: {GCS_EXTRA_HINT}") from err
    try:
        return UPath(text)
    except (ImportError, ValueError) as err:  # no fsspec implementation for the scheme
        raise StorageError(f"{text}: cannot open {scheme(text)}:// locations ({err}); {GCS_EXTRA_HINT}") from err


def fresh(path: Path) -> Path:
    """``path`` with its filesystem's listing cache dropped: another process (a Ray task, another
    run) may have written objects since this one listed the bucket."""
    if _is_upath(path):
        path.fs.invalidate_cache()
    return path


def open_for_reading(location: str | Path) -> BinaryIO:
    """A seekable binary reader whose ``readline(limit)`` works for local files and URLs alike
    (fsspec's remote files take no limit; a buffered reader over them adds it, and reads ahead)."""
    path = as_path(location)
    if not is_url(path):
        return open(path, "rb")
    return io.BufferedReader(path.open("rb"), buffer_size=_REMOTE_BUFFER_BYTES)


def read_bytes(location: str | Path) -> bytes:
    with open_for_reading(location) as stream:
        return stream.read()


def file_sha256(location: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks: the identity of a tokenizer or input file.

    A token cache and a checkpoint record their tokenizer's hash so a run can refuse to mix tokens
    of one tokenizer with a model trained on another.
    """
    with open_for_reading(location) as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def file_identity(path: Path) -> list:
    """``[location, size, version]`` of an input file: what a resume checks is unchanged.  Locally
    the version is the modification time in ns; in a bucket, the object's generation (or its
    update time where the store has no generations)."""
    if not is_url(path):
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    info = path.fs.info(path.path)
    version = info.get("generation") or info.get("updated") or info.get("mtime") or info.get("ETag")
    return [str(path), int(info["size"]), str(version)]


def _bucket_and_key(url: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` → ``("bucket", "a/b")``."""
    bucket, _, key = url.split("://", 1)[1].partition("/")
    return bucket, key


def is_bucket_root(path: str | Path) -> bool:
    """Whether a URL names a whole bucket (``gs://bucket`` or ``gs://bucket/``), no prefix in it."""
    if not is_url(path):
        return False
    bucket, key = _bucket_and_key(str(path))
    return not bucket or not key.strip("/")


def remove_tree(path: Path, *, missing_ok: bool = True) -> None:
    """Delete a directory (or bucket prefix) and everything under it.  Never a whole bucket:
    gcsfs would delete every object in it and then the bucket itself."""
    if is_bucket_root(path):
        raise StorageError(f"{path}: refusing to delete a whole bucket")
    if not is_url(path):
        if path.exists() or not missing_ok:
            shutil.rmtree(path)
        return
    fresh(path)
    if path.exists():
        path.fs.rm(path.path, recursive=True)
    elif not missing_ok:
        raise FileNotFoundError(str(path))
    fresh(path)


def is_empty_or_missing(path: Path) -> bool:
    """True when nothing exists at or under ``path``."""
    fresh(path)
    if not path.exists():
        return True
    return path.is_dir() and not any(True for _ in path.iterdir())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Readers see the old contents or the new, never half: locally a temporary file, fsync and
    rename (and the directory fsynced); one object upload is already all-or-nothing."""
    if is_url(path):
        path.write_bytes(data)
        fresh(path)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)  # the rename itself, and every file created there before it


def fsync_directory(path: str | Path) -> None:
    """Make the names created or renamed in a local directory durable (POSIX: a rename is only
    durable once its directory is fsynced).  Object stores need nothing of the kind."""
    if is_url(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` locally; nothing in an object store, where a prefix exists once it holds an
    object."""
    if not is_url(path):
        path.mkdir(parents=True, exist_ok=True)


def kvstore(location: str | Path) -> dict:
    """The tensorstore key-value store of a directory: ``file`` locally, ``gcs`` for ``gs://``."""
    if not is_url(location):
        return {"driver": "file", "path": str(location)}
    text = str(location)
    name = scheme(text)
    driver = _KVSTORE_DRIVERS.get(name or "")
    if driver is None:
        supported = ", ".join(f"{s}://" for s in sorted(_KVSTORE_DRIVERS))
        raise StorageError(f"{text}: token caches can be written to local paths or {supported}, not {name}://")
    bucket, prefix = _bucket_and_key(text)
    if not bucket:
        raise StorageError(f"{text}: no bucket name")
    return {"driver": driver, "bucket": bucket, "path": prefix.rstrip("/") + "/"}
