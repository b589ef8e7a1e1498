"""``data prepare --engine ray`` builds the local engine's cache (the reference: an independent,
sequential implementation of the same rules), on a local Ray instance of 2 CPUs; the pieces of its
design against plain references; and its error without Ray.  The real two-node cluster is in
test_data_prepare_ray_cluster.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import indicfm.data.local_engine as local_engine
import indicfm.data.ray_engine as ray_engine
import indicfm.data.stages as stages
from indicfm.data.config import DataConfig
from indicfm.data.pack import Packer
from indicfm.data.prepare import PrepareError, prepare
from indicfm.data.testing import train_tiny_tokenizer
from prepare_checks import assert_same_cache, drop_reasons, make_crossing_corpus

SEQ_LEN = 64
#: Small batches and shards, so the corpus spans many shards and duplicates cross them.
SMALL_BATCH, SMALL_SHARD = 96, 2


# -- the pieces, without Ray -----------------------------------------------------------------------


def _greedy_reference(edges: list[tuple[int, int]]) -> set[int]:
    """One document at a time, in order: dropped iff joined to an earlier kept one."""
    earlier: dict[int, set[int]] = {}
    for a, b in edges:
        earlier.setdefault(b, set()).add(a)
        earlier.setdefault(a, set())
    kept, dropped = set(), set()
    for node in sorted(earlier):
        (dropped if earlier[node] & kept else kept).add(node)
    return dropped


@pytest.mark.parametrize("seed", range(5))
def test_first_wins_equals_going_through_documents_in_order(seed):
    rng = np.random.default_rng(seed)
    nodes = np.sort(rng.choice(10_000, size=300, replace=False))
    pairs = rng.integers(0, len(nodes), size=(600, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    edges = np.sort(nodes[pairs], axis=1)
    chain = np.stack([nodes[:-1:3], nodes[1::3][: len(nodes[:-1:3])]], axis=1)  # long waiting chains
    edges = np.concatenate([edges, chain])
    got = ray_engine.first_wins(edges)
    assert set(got.tolist()) == _greedy_reference([tuple(e) for e in edges.tolist()])


def test_blocks_of_rows_equal_the_packer():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 150, size=400)
    ids = rng.integers(4, 1000, size=int(lengths.sum())).astype(np.int32)
    seq_len = 32
    packer = Packer(seq_len, pad_id=0)
    packer.add_many(ids, lengths)
    expected = packer.finish()
    # three "shards" of whole documents; blocks of 7 rows (any size works: the real one is 4096)
    cuts = [0, 120, 300, 400]
    doc_start = np.concatenate([[0], np.cumsum(lengths)])
    pieces = [(ids[doc_start[a] : doc_start[b]], lengths[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    begins = [int(doc_start[a]) for a in cuts[:-1]]
    ends = [int(doc_start[b]) for b in cuts[1:]]
    total, block = int(lengths.sum()), 7
    rows, split = [], 0
    for first_row in range(0, len(expected), block):
        start, stop = first_row * seq_len, min((first_row + block) * seq_len, total)
        cover = [k for k in range(3) if begins[k] < stop and ends[k] > start]
        got, s = ray_engine.rows_of_block([pieces[k] for k in cover], begins[cover[0]], start, stop, seq_len, 0)
        rows.append(got)
        split += s
    for name in ("tokens", "segment_ids", "positions"):
        assert np.array_equal(np.concatenate([getattr(r, name) for r in rows]), getattr(expected, name)), name
    assert split == packer.split_documents


def test_engine_ray_without_ray_says_how_to_install_it(tmp_path, sample_train_dir, monkeypatch):
    from typer.testing import CliRunner

    from indicfm.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"not used")
    result = CliRunner().invoke(app, ["data", "prepare", "-i", str(sample_train_dir), "-t", str(tok),
                                      "-o", str(tmp_path / "out"), "--engine", "ray"])
    assert result.exit_code == 2, result.output
    assert "indicfm[ray]" in result.output
    assert not (tmp_path / "out").exists()


# -- the engine on a local Ray instance -------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_and_reference(tmp_path_factory, sample_train_dir):
    tmp = tmp_path_factory.mktemp("ray_corpus")
    copies = make_crossing_corpus(sample_train_dir, tmp / "corpus")
    tokenizer = train_tiny_tokenizer(sample_train_dir, tmp / "tok")
    reference = tmp / "local"
    prepare([tmp / "corpus"], tokenizer, reference, seq_len=SEQ_LEN, workers=1, show_progress=False)
    return tmp / "corpus", tokenizer, reference, copies


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 << 20, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(stages, "BATCH_DOCS", SMALL_BATCH)
    monkeypatch.setattr(ray_engine, "SHARD_RANGES", SMALL_SHARD)


@pytest.mark.timeout(240)
def test_ray_engine_builds_the_local_engines_cache(local_ray, corpus_and_reference, small_shards, tmp_path):
    corpus, tokenizer, reference, copies = corpus_and_reference
    out = tmp_path / "ray"
    result = prepare([corpus], tokenizer, out, seq_len=SEQ_LEN, engine="ray", show_progress=False)
    assert_same_cache(reference, out)
    assert result.documents == sum(v["docs_in"] for v in result.report["languages"].values())
    assert {"scan", "process", "buckets", "decide", "finalize", "write"} <= set(result.stage_seconds)
    # the exact copies in the last file are found, their originals (other files, other shards) kept
    reasons = drop_reasons(out)
    for copy, original in copies:
        assert reasons[copy] == "exact_duplicate" and original not in reasons
    assert "near_duplicate" in {reasons[k] for k in reasons if k[0] == "zz_copies.jsonl"}


@pytest.mark.timeout(240)
def test_a_killed_worker_is_retried_and_the_cache_is_the_same(local_ray, corpus_and_reference, small_shards,
                                                              tmp_path, monkeypatch):
    corpus, tokenizer, reference, _ = corpus_and_reference
    marker = tmp_path / "killed"
    monkeypatch.setenv(ray_engine.KILL_ONCE_ENV, str(marker))
    prepare([corpus], tokenizer, tmp_path / "ray", seq_len=SEQ_LEN, engine="ray", show_progress=False)
    assert marker.exists(), "no worker was killed"
    assert_same_cache(reference, tmp_path / "ray")


@pytest.mark.timeout(240)
def test_an_interrupted_ray_prepare_starts_again_and_gives_the_same_cache(
        local_ray, corpus_and_reference, small_shards, tmp_path, monkeypatch):
    corpus, tokenizer, reference, _ = corpus_and_reference
    out = tmp_path / "ray"

    def interrupted(*args):
        raise KeyboardInterrupt  # the driver stops while writing rows

    real = ray_engine.create_language_arrays
    monkeypatch.setattr(ray_engine, "create_language_arrays", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus], tokenizer, out, seq_len=SEQ_LEN, engine="ray", show_progress=False)
    assert (out / ".prepare_state").is_dir() and not (out / "metadata.json").exists()
    monkeypatch.setattr(ray_engine, "create_language_arrays", real)
    prepare([corpus], tokenizer, out, seq_len=SEQ_LEN, engine="ray", show_progress=False)
    assert_same_cache(reference, out)
    # a complete cache of either engine is taken as it is by the other
    again = prepare([corpus], tokenizer, reference, seq_len=SEQ_LEN, engine="ray", show_progress=False)
    assert again.resumed and again.documents == 0


def test_ray_engine_refuses_to_take_over_an_interrupted_local_prepare(corpus_and_reference, tmp_path, monkeypatch):
    corpus, tokenizer, _, _ = corpus_and_reference
    pytest.importorskip("ray")
    out = tmp_path / "local"

    class Interrupted(Exception):
        pass

    def stop(done):
        raise Interrupted

    monkeypatch.setattr(local_engine, "_checkpoint_hook", stop)
    with pytest.raises(Interrupted):
        prepare([corpus], tokenizer, out, seq_len=SEQ_LEN, workers=1, show_progress=False,
                config=DataConfig(checkpoint_every_docs=2000))
    with pytest.raises(PrepareError, match="--engine local"):
        prepare([corpus], tokenizer, out, seq_len=SEQ_LEN, engine="ray", show_progress=False)
    assert (out / ".prepare_state" / "state.json").is_file()


@pytest.mark.timeout(240)
def test_ray_progress_shows_rates_per_stage_as_the_local_engine_does(local_ray, corpus_and_reference, small_shards,
                                                                     tmp_path):
    import io

    from rich.console import Console

    corpus, tokenizer, reference, _ = corpus_and_reference
    shown = {}
    for engine in ("local", "ray"):
        console = Console(file=io.StringIO(), force_terminal=True, width=250)
        prepare([corpus], tokenizer, tmp_path / engine, seq_len=SEQ_LEN, engine=engine, workers=1, console=console)
        shown[engine] = console.file.getvalue()
    assert "docs/s" in shown["local"] and "tokens/s" in shown["local"]
    lines = shown["ray"].splitlines()
    for stage, rates in (("read · clean · tokenize", ("docs/s", "tokens/s")), ("report · drop log", ("docs/s",)),
                         ("write rows", ("tokens/s",))):
        finished = [line for line in lines if stage + ":" in line]
        assert finished, f"no progress line for {stage}"
        assert all(rate in finished[-1] for rate in rates), finished[-1]
    # the per-reason table printed after the run is the same
    title = "data prepare: documents per language"
    assert shown["ray"][shown["ray"].index(title):] == shown["local"][shown["local"].index(title):]
    assert "exact duplicate" in shown["ray"] and "near duplicate" in shown["ray"]


@pytest.mark.timeout(240)
def test_a_task_that_keeps_failing_is_a_clear_error_and_no_cache(local_ray, corpus_and_reference, tmp_path,
                                                                  monkeypatch):
    corpus, tokenizer, _, _ = corpus_and_reference

    def broken(*args):  # a closure: Ray ships it by value, so the workers run this one
        raise ValueError("bad shard")

    monkeypatch.setattr(ray_engine, "process_shard", broken)
    with pytest.raises(ray_engine.RayRunError, match="run the same command again") as failed:
        prepare([corpus], tokenizer, tmp_path / "ray", seq_len=SEQ_LEN, engine="ray", show_progress=False)
    assert "bad shard" in str(failed.value)
    assert not (tmp_path / "ray" / "metadata.json").exists()
