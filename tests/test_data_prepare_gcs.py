"""``data prepare`` with gs:// inputs, tokenizer and output, against a local GCS emulator
(tests/gcs_emulator.py).  The reference is always the same prepare on local files: the bucket must
change nothing but where bytes live (and the ``source`` paths the report and drop log name)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gcs_emulator  # noqa: F401  (first: it sets what gcsfs reads when imported)
from indicfm.data.cache import read_metadata, read_rows
from indicfm.data.prepare import prepare
from indicfm.data.testing import train_tiny_tokenizer
from prepare_checks import assert_same_cache, make_crossing_corpus

pytest.importorskip("gcsfs")
pytest.importorskip("upath")
pytest.importorskip("gcp_storage_emulator")

from gcs_emulator import BUCKET, download_tree, running_emulator, upload_tree  # noqa: E402

SEQ_LEN = 64


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, sample_train_dir):
    """The emulator, holding a corpus whose duplicates cross files (and its tokenizer), and the
    local engine's cache of the same files read from local disk."""
    tmp = tmp_path_factory.mktemp("gcs")
    make_crossing_corpus(sample_train_dir, tmp / "corpus")
    tokenizer = train_tiny_tokenizer(sample_train_dir, tmp / "tok")
    local_cache = tmp / "local_cache"
    # 2 workers: this starts the process's fork server *before* the emulator's variables are set,
    # as any earlier prepare would; workers forked from it later must still see them
    prepare([tmp / "corpus"], tokenizer, local_cache, seq_len=SEQ_LEN, workers=2, show_progress=False)
    with running_emulator():
        upload_tree(tmp / "corpus", f"gs://{BUCKET}/corpus")
        upload_tree(tokenizer.parent, f"gs://{BUCKET}/tok")
        yield {"corpus": f"gs://{BUCKET}/corpus", "tokenizer": f"gs://{BUCKET}/tok/{tokenizer.name}",
               "local_corpus": tmp / "corpus", "local_cache": local_cache}


@pytest.fixture(scope="module")
def from_bucket_inputs(bucket, tmp_path_factory):
    """The local engine reading the corpus and tokenizer from the bucket into a local cache (2
    worker processes: they read the bucket too)."""
    out = tmp_path_factory.mktemp("gcs_in") / "cache"
    prepare([bucket["corpus"]], bucket["tokenizer"], out, seq_len=SEQ_LEN, workers=2, show_progress=False)
    return out


def _drop_log(cache, prefix: str) -> list[str]:
    return [line.removeprefix(prefix) for line in (cache / "dropped.tsv").read_text(encoding="utf-8").splitlines()]


def test_inputs_and_tokenizer_in_a_bucket_give_the_local_files_cache(bucket, from_bucket_inputs):
    local, remote = bucket["local_cache"], from_bucket_inputs
    info = read_metadata(local)
    assert read_metadata(remote).languages == info.languages
    for lang, v in info.languages.items():
        a, b = read_rows(local, lang, slice(None)), read_rows(remote, lang, slice(None))
        for name in ("tokens", "segment_ids", "positions"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), f"{lang} {name}"
    # the same documents dropped for the same reasons; only the source names differ
    assert _drop_log(remote, bucket["corpus"]) == _drop_log(local, str(bucket["local_corpus"].resolve()))
    report = json.loads((remote / "report.json").read_text(encoding="utf-8"))
    assert report["languages"] == json.loads((local / "report.json").read_text(encoding="utf-8"))["languages"]
    assert read_metadata(remote).metadata["tokenizer"] == bucket["tokenizer"]


def test_local_engine_builds_a_bucket_cache_in_staging_then_uploads_it(bucket, from_bucket_inputs, tmp_path):
    out = f"gs://{BUCKET}/cache-local"
    stage = tmp_path / "stage"
    result = prepare([bucket["corpus"]], bucket["tokenizer"], out, seq_len=SEQ_LEN, workers=1,
                     show_progress=False, staging_dir=stage)
    assert str(result.output) == out
    assert not stage.exists(), "the staging directory is removed once uploaded"
    assert_same_cache(from_bucket_inputs, download_tree(out, tmp_path / "copy"))
    # read in place: metadata, rows and the CLI's inspect
    assert read_metadata(out).languages == read_metadata(from_bucket_inputs).languages
    lang = sorted(read_metadata(out).languages)[0]
    assert np.array_equal(read_rows(out, lang, slice(0, 3)).tokens,
                          read_rows(from_bucket_inputs, lang, slice(0, 3)).tokens)
    again = prepare([bucket["corpus"]], bucket["tokenizer"], out, seq_len=SEQ_LEN, workers=1, show_progress=False)
    assert again.resumed and again.documents == 0, "a complete bucket cache is found complete"


def test_an_upload_cut_short_is_uploaded_again_by_the_same_command(bucket, from_bucket_inputs, tmp_path, monkeypatch):
    import indicfm.data.prepare as prepare_mod

    out = f"gs://{BUCKET}/cache-cut"
    real, sent = prepare_mod._upload_file, []

    def cut_after_three(path, target):
        if len(sent) == 3:
            raise KeyboardInterrupt  # the upload stops halfway
        sent.append(path)
        real(path, target)

    monkeypatch.setattr(prepare_mod, "_upload_file", cut_after_three)
    args = ([bucket["corpus"]], bucket["tokenizer"], out)
    kwargs = dict(seq_len=SEQ_LEN, workers=1, show_progress=False, staging_dir=tmp_path / "stage")
    with pytest.raises(KeyboardInterrupt):
        prepare(*args, **kwargs)
    with pytest.raises(Exception, match="not a token cache|incomplete"):
        read_metadata(out)  # three files in the bucket, but no cache
    monkeypatch.setattr(prepare_mod, "_upload_file", real)
    prepare(*args, **kwargs)  # the staged cache is complete: only the upload runs again
    assert_same_cache(from_bucket_inputs, download_tree(out, tmp_path / "copy"))


def test_a_bucket_root_is_never_an_output(bucket, tmp_path):
    from indicfm.data.prepare import PrepareError
    from indicfm.storage import StorageError, as_path, remove_tree

    with pytest.raises(PrepareError, match="prefix inside the bucket"):
        prepare([bucket["corpus"]], bucket["tokenizer"], f"gs://{BUCKET}", seq_len=SEQ_LEN, workers=1,
                show_progress=False, overwrite=True)
    with pytest.raises(StorageError, match="whole bucket"):
        remove_tree(as_path(f"gs://{BUCKET}/"))
    assert as_path(bucket["tokenizer"]).is_file(), "nothing in the bucket was deleted"


def test_staging_dir_naming_a_users_local_cache_uploads_it_and_keeps_it(bucket, from_bucket_inputs, tmp_path):
    import shutil

    mine = tmp_path / "my_cache"
    shutil.copytree(from_bucket_inputs, mine)
    out = f"gs://{BUCKET}/cache-mine"
    prepare([bucket["corpus"]], bucket["tokenizer"], out, seq_len=SEQ_LEN, workers=1, show_progress=False,
            staging_dir=mine)
    assert_same_cache(from_bucket_inputs, mine)  # still there, untouched
    assert_same_cache(from_bucket_inputs, download_tree(out, tmp_path / "copy"))


def test_token_loader_reads_a_bucket_cache(bucket, from_bucket_inputs, tmp_path):
    from indicfm.data.loader import TokenLoader

    out = f"gs://{BUCKET}/cache-loader"
    prepare([bucket["corpus"]], bucket["tokenizer"], out, seq_len=SEQ_LEN, workers=1, show_progress=False,
            staging_dir=tmp_path / "stage")
    remote = TokenLoader(out, global_batch_size=4, seed=0, process_index=0, process_count=1)
    local = TokenLoader(from_bucket_inputs, global_batch_size=4, seed=0, process_index=0, process_count=1)
    for step in range(3):
        a, b = remote.batch(step), local.batch(step)
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), key


def test_inspect_cli_reads_a_bucket_cache(bucket, tmp_path):
    from typer.testing import CliRunner

    from indicfm.cli import app

    out = f"gs://{BUCKET}/cache-cli"
    result = CliRunner().invoke(app, ["data", "prepare", "-i", bucket["corpus"], "-t", bucket["tokenizer"], "-o", out,
                                      "--seq-len", str(SEQ_LEN), "--workers", "1",
                                      "--staging-dir", str(tmp_path / "stage")])
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(app, ["data", "inspect", out, "--reason", "exact_duplicate", "--rows", "1"],
                               env={"COLUMNS": "400"})  # a long URL is not wrapped
    assert shown.exit_code == 0, shown.output
    assert bucket["corpus"] in shown.output  # the duplicate's source, a gs:// URL


@pytest.mark.timeout(300)
def test_ray_engine_writes_the_bucket_cache_in_place(bucket, from_bucket_inputs, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    import indicfm.data.ray_engine as ray_engine
    import indicfm.data.stages as stages

    monkeypatch.setattr(stages, "BATCH_DOCS", 96)  # many shards, so duplicates cross them
    monkeypatch.setattr(ray_engine, "SHARD_RANGES", 2)
    # started here, after the emulator's variables are set, so every Ray worker inherits them
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 << 20, log_to_driver=False,
             configure_logging=False)
    try:
        out = f"gs://{BUCKET}/cache-ray"
        prepare([bucket["corpus"]], bucket["tokenizer"], out, seq_len=SEQ_LEN, engine="ray", show_progress=False)
    finally:
        ray.shutdown()
    assert_same_cache(from_bucket_inputs, download_tree(out, tmp_path / "copy"))


@pytest.mark.slow  # two short training runs (the loader test covers reading a bucket cache)
@pytest.mark.timeout(600)
def test_training_from_a_bucket_cache_and_tokenizer_equals_training_from_local_copies(bucket, tmp_path):
    """`indicfm train` with data.cache_dir and tokenizer.model_file in the bucket: the same losses,
    bit for bit, as from local copies of both (and the bucket cache is used as it is, not rebuilt)."""
    from helpers import read_losses
    from indicfm.config import load_config
    from indicfm.train.loop import train
    from test_train_loop import TINY_SETTINGS

    out = f"gs://{BUCKET}/cache-train"
    prepare([bucket["corpus"]], bucket["tokenizer"], out, seq_len=SEQ_LEN, workers=1, show_progress=False,
            staging_dir=tmp_path / "stage")
    local_cache = download_tree(out, tmp_path / "local_cache")
    local_tok = download_tree(bucket["tokenizer"].rsplit("/", 1)[0], tmp_path / "tok") / bucket["tokenizer"].rsplit("/", 1)[1]
    steps = ["trainer.steps=3", "checkpoint.every_steps=3"]
    remote = train(load_config(None, TINY_SETTINGS + steps + [f"tokenizer.model_file={bucket['tokenizer']}",
                                                              f"data.cache_dir={out}"]), tmp_path / "remote")
    local = train(load_config(None, TINY_SETTINGS + steps + [f"tokenizer.model_file={local_tok}",
                                                             f"data.cache_dir={local_cache}"]), tmp_path / "local")
    assert remote.final_step == local.final_step == 3
    assert read_losses(tmp_path / "remote") == read_losses(tmp_path / "local")


@pytest.mark.slow  # starts a two-node Ray cluster
@pytest.mark.timeout(420)
def test_two_node_ray_cluster_prepares_from_and_into_the_bucket(bucket, from_bucket_inputs, tmp_path):
    """Nodes that share no directory: inputs, tokenizer and cache only in the bucket.  The driver is
    a process of its own, as a user's would be (this one may have run a local Ray instance)."""
    import subprocess
    import sys

    from test_data_prepare_ray_cluster import _env, _two_node_cluster

    out = f"gs://{BUCKET}/cache-cluster"
    with _two_node_cluster() as (address, _):  # its nodes inherit the emulator's variables
        driver = (
            "import json, sys\n"
            "import indicfm.data.prepare as p, indicfm.data.ray_engine as r, indicfm.data.stages as s\n"
            "s.BATCH_DOCS, r.SHARD_RANGES = 96, 2  # many shards, spread over both nodes\n"
            "a = sys.argv[1:]\n"
            "done = p.prepare([a[0]], a[1], a[2], seq_len=int(a[3]), engine='ray', ray_address=a[4],\n"
            "                 show_progress=False)\n"
            "print(json.dumps(done.nodes))\n"
        )
        run = subprocess.run([sys.executable, "-c", driver, bucket["corpus"], bucket["tokenizer"], out, str(SEQ_LEN),
                              address], env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(json.loads(run.stdout.strip().splitlines()[-1])) == 2, "the shards did not run on both nodes"
    assert_same_cache(from_bucket_inputs, download_tree(out, tmp_path / "copy"))
