"""A local Google Cloud Storage for tests: gcp-storage-emulator (GCS's JSON API, in memory) in a
subprocess of the test, with gcsfs and tensorstore pointed at it through their emulator variables.

Nothing leaves the machine: no credentials, no network.  Import as ``from gcs_emulator import ...``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from helpers import free_port

BUCKET = "indicfm-test"

# Read when gcsfs is imported, so set before: otherwise gcsfs first asks the (absent) gRPC endpoint
# whether each bucket is zonal, which fails after a minute of retries against the emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def emulator_env(url: str) -> dict[str, str]:
    """What gcsfs and tensorstore read to use the emulator at ``url`` without credentials."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs kvstore
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",  # tensorstore: skip credential discovery
        "FSSPEC_GS_TOKEN": "anon",  # gcsfs: anonymous (fsspec's per-protocol defaults)
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # for child processes (see above)
    }


@contextlib.contextmanager
def running_emulator() -> Iterator[str]:
    """Start the emulator with bucket :data:`BUCKET`, set the variables (also for child processes:
    workers, Ray), yield its URL; stop it (by its own process id) and restore the variables."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, __file__, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
         "--default-bucket", BUCKET],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in emulator_env(url)}
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gcp-storage-emulator did not start")
            time.sleep(0.1)
        os.environ.update(emulator_env(url))
        yield url
    finally:
        for key, value in saved.items():  # first: later tests must not reach a stopped emulator
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _forget_filesystems()
        proc.terminate()
        proc.wait(timeout=10)


def _forget_filesystems() -> None:
    """fsspec keeps filesystem instances (and their settings) per process: drop the gs ones."""
    with contextlib.suppress(ImportError):
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()


def upload_tree(local: Path, url: str) -> None:
    """Copy a local directory's files under ``url`` (gs://bucket/prefix), keeping relative paths."""
    import fsspec

    fs = fsspec.filesystem("gs")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{url.removeprefix('gs://')}/{path.relative_to(local).as_posix()}")
    fs.invalidate_cache()


def download_tree(url: str, local: Path) -> Path:
    """Copy every object under ``url`` into ``local`` (created), keeping relative paths."""
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    root = url.removeprefix("gs://").rstrip("/")
    for name in fs.find(root):
        target = local / name[len(root) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(name, str(target))
    return local


def _serve_with_suffix_ranges(args: list[str]) -> None:
    """Run the emulator with three things of GCS that tensorstore relies on and the emulator lacks:
    ``Range: bytes=-N`` (the last N bytes: a zarr shard's index at the end of its file), the
    ``x-goog-generation`` header of a download (the version tensorstore's cache checks), and the
    ``startOffset``/``endOffset`` of a listing (without them tensorstore's ``delete_existing`` of
    one array's prefix would delete every object the listing returns).  The handlers are wrapped
    before the server module binds them."""
    import json
    import re

    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download(request, response, storage, *rest, **kwargs):
        suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", "") or "")
        if suffix:
            try:
                size = len(storage.get_file(request.params["bucket_name"], request.params["object_id"]))
            except Exception:  # missing object: the original handler answers 404
                size = 0
            request._request_handler.headers.replace_header("range", f"bytes={max(size - int(suffix[1]), 0)}-")
        original(request, response, storage, *rest, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", 1))

    original_ls = objects.ls

    def ls(request, response, storage, *rest, **kwargs):
        original_ls(request, response, storage, *rest, **kwargs)
        start = (request.query.get("startOffset") or [""])[0]
        end = (request.query.get("endOffset") or [None])[0]
        if (start or end) and response._content:
            listing = json.loads(response._content)
            listing["items"] = [item for item in listing.get("items") or []
                                if item["name"] >= start and (end is None or item["name"] < end)]
            response.json(listing)

    objects.download = download
    objects.ls = ls
    from gcp_storage_emulator.__main__ import main

    main(args)


if __name__ == "__main__":
    _serve_with_suffix_ranges(sys.argv[1:])
