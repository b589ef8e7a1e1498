"""lm-evaluation-harness on indicfm models (indicfm/evaluation/): packed scores equal an unpacked
float32 forward pass per request; the real harness gives accuracy 1.0 to a model that prefers the
gold answers and the byte-normalised accuracy a hand computation gives; task names resolve.

Tiny random float32 models (8 fake CPU devices, data parallel) and a 300-entry byte-level BPE.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from indicfm.config import MeshConfig
from indicfm.evaluation.harness import (
    DownstreamScores,
    TaskFileError,
    UnknownTaskError,
    evaluate_model,
    language_of_task,
    resolve_tasks,
)
from indicfm.evaluation.lm_adapter import IndicfmLM
from indicfm.evaluation.packing import pack_requests
from indicfm.evaluation.scorer import Scorer
from indicfm.inference.decode import inference_config
from indicfm.model.config import ModelConfig
from indicfm.sharding import make_mesh

from downstream_helpers import (
    TINY_MODEL,
    ReferenceScorer,
    hindi_lines,
    tiny_tokenizer,
    tiny_tokenizer_json,
    write_choice_task,
)
from helpers import random_model


@pytest.fixture(scope="module")
def tokenizer(sample_train_dir):
    return tiny_tokenizer(sample_train_dir)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return inference_config(ModelConfig(**TINY_MODEL))


@pytest.fixture(scope="module")
def model(cfg):
    return random_model(cfg, seed=3)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=-1))  # 8 devices


@pytest.fixture(scope="module")
def reference(model, tokenizer, sample_train_dir):
    return ReferenceScorer(model, tiny_tokenizer_json(sample_train_dir), tokenizer.start_id)


@pytest.fixture(scope="module")
def pairs(sample_train_dir) -> list[tuple[str, str]]:
    """(context, continuation) text pairs of varied lengths (some share rows, one fills a row)."""
    lines = hindi_lines(sample_train_dir, 12)
    out = []
    for i, line in enumerate(lines):
        cut = 4 + 3 * i  # about one token per character with this tokenizer
        out.append((line[:cut] + (" " if i % 3 == 0 else ""), line[cut : cut + 3 + 3 * (i % 4)]))
    out.append(("", lines[0][:20]))  # empty context: the start token alone predicts the first token
    return out


def test_packing_puts_requests_apart_with_their_own_positions():
    requests = [([1, 2, 3], [4, 5]), ([6], [7]), ([8, 9], [10, 11, 12])]
    packed = pack_requests(requests, row_len=6)
    # inputs are all but the last token: 4 + 1 + 4 slots; longest first, two rows of 6
    assert packed.tokens.shape == (2, 6)
    for span, (context, continuation) in zip(packed.spans, requests):
        row = packed.targets[span.row]
        assert list(row[span.first : span.first + span.count]) == continuation
        segment = packed.segment_ids[span.row, span.first]
        cells = packed.segment_ids[span.row] == segment
        sequence = context + continuation
        assert list(packed.tokens[span.row][cells]) == sequence[:-1]
        assert list(packed.targets[span.row][cells]) == sequence[1:]
        assert list(packed.positions[span.row][cells]) == list(range(len(sequence) - 1))
    (_, batch), = list(packed.batches(4))  # one batch, padded with empty rows
    assert batch["tokens"].shape == (4, 6) and not batch["segment_ids"][2:].any()


def test_a_request_longer_than_a_row_keeps_its_end():
    # like lm-eval's hf backend: the last row_len + 1 tokens, all but the last as inputs
    packed = pack_requests([(list(range(1, 11)), [20, 21])], row_len=6)
    assert packed.truncated == 1 and list(packed.tokens[0]) == [6, 7, 8, 9, 10, 20]
    assert list(packed.targets[0]) == [7, 8, 9, 10, 20, 21] and packed.spans[0].count == 2


@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_packed_loglikelihoods_equal_a_per_request_forward(scan_layers, cfg, model, tokenizer, mesh, pairs,
                                                            reference):
    from indicfm.model.layout import with_layout

    layout_model = with_layout(model, scan_layers) if scan_layers else model
    lm = IndicfmLM(Scorer(layout_model, mesh, rows=8, row_len=64), tokenizer)
    got = lm.score_pairs([lm.encode_pair(c, x) for c, x in pairs])
    want = [reference.score(c, x) for c, x in pairs]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=0, atol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    # a packed row really holds several requests (else the test would not test packing)
    packed = pack_requests([lm.encode_pair(c, x) for c, x in pairs], 64)
    assert len(packed.tokens) < len(pairs)


def test_rolling_loglikelihood_covers_every_token_once(model, tokenizer, mesh, sample_train_dir, reference):
    lm = IndicfmLM(Scorer(model, mesh, rows=8, row_len=64), tokenizer)
    text = " ".join(hindi_lines(sample_train_dir, 2))[:150]

    class Request:
        args = (text,)

    (got,) = lm.loglikelihood_rolling([Request()])
    ids = reference.encode(text)
    assert len(ids) > 2 * 64  # three windows
    # reference: windows of 64 inputs, each predicting the next 64 tokens from what precedes them
    want, start = 0.0, 0
    while start < len(ids):
        piece = ids[start : start + 64]
        context = [tokenizer.start_id] if start == 0 else ids[max(0, start + len(piece) - 65) : start]
        want += reference.score_ids(context, piece)[0]
        start += len(piece)
    assert math.isclose(got, want, abs_tol=1e-4)


@pytest.fixture(scope="module")
def preferred_task(tmp_path_factory, sample_train_dir, reference):
    """A local task whose gold answer is, per document, the choice the model scores highest (by
    the reference); also the hand-computed byte-normalised accuracy."""
    lines = hindi_lines(sample_train_dir, 6, skip=200)
    docs, hits_bytes, hits_norm = [], [], []
    for i, line in enumerate(lines):
        prompt = line[:25]
        choices = [line[25 + 3 * k : 33 + 6 * k] for k in range(3)]
        lls = [reference.score(prompt, " " + c)[0] for c in choices]  # lm-eval's target delimiter " "
        gold = int(np.argmax(lls))
        per_byte = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)]
        per_char = [ll / len(c) for ll, c in zip(lls, choices)]
        hits_bytes.append(float(np.argmax(per_byte) == gold))
        hits_norm.append(float(np.argmax(per_char) == gold))
        docs.append({"prompt": prompt, "choices": choices, "gold": gold})
    directory = write_choice_task(tmp_path_factory.mktemp("tasks"), "toy_prefer_hin_Deva", docs)
    return directory, float(np.mean(hits_bytes)), float(np.mean(hits_norm))


def test_the_real_harness_scores_a_model_that_prefers_the_gold_answer(cfg, model, tokenizer, mesh, preferred_task):
    directory, acc_bytes, acc_norm = preferred_task
    names = resolve_tasks(["toy_prefer_hin_Deva"], None, directory)
    scores = evaluate_model(model, cfg, tokenizer, mesh, tasks=names, include_path=directory, rows=4)
    flat = scores.flat()
    assert flat["downstream/toy_prefer_hin_Deva/acc"] == 1.0
    assert flat["downstream/toy_prefer_hin_Deva/acc_bytes"] == pytest.approx(acc_bytes)
    assert flat["downstream/toy_prefer_hin_Deva/acc_norm"] == pytest.approx(acc_norm)
    assert scores.samples_per_task == {"toy_prefer_hin_Deva": 6} and scores.requests == 18
    assert set(flat) == {f"downstream/toy_prefer_hin_Deva/{m}" for m in ("acc", "acc_norm", "acc_bytes")}
    assert "hin_Deva" in scores.table() and "acc_bytes" in scores.table()
    assert [r[:3] for r in scores.rows()][0] == ("toy_prefer_hin_Deva", "hin_Deva", "acc")


@pytest.mark.slow  # compiling generation's while loop takes ~10 s here
def test_generate_until_continues_with_the_kv_cache_and_stops_at_until(model, tokenizer, mesh, sample_train_dir):
    from indicfm.inference.generate import generate_ids

    lm = IndicfmLM(Scorer(model, mesh, rows=8, row_len=64, generate=generate_ids), tokenizer)
    prompts = [l[:20] for l in hindi_lines(sample_train_dir, 3)]

    class Request:
        def __init__(self, text, until):
            self.args = (text, {"until": until, "max_gen_toks": 8})

    free = lm.generate_until([Request(p, []) for p in prompts])
    # the same greedy continuation as indicfm's generation called directly
    direct = generate_ids(model, [[tokenizer.start_id] + tokenizer.encode(p) for p in prompts], max_new_tokens=8,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.padding_id, vocab_limit=tokenizer.vocab_size)
    from indicfm.inference.generate import continuation_text

    assert free == [continuation_text(tokenizer, g) for g in direct]
    stop = free[0][2:4]
    cut = lm.generate_until([Request(p, [stop]) for p in prompts])  # same shapes: no new compilation
    assert stop and cut[0] == free[0][: free[0].index(stop)]


def test_the_eval_path_imports_no_torch():
    # the eval extra needs no torch: lm-eval's core and indicfm's adapter leave it alone
    code = ("import sys, lm_eval, lm_eval.evaluator, lm_eval.tasks; import indicfm.evaluation.harness, "
            "indicfm.evaluation.lm_adapter, indicfm.cli.eval_cmd; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_flat_keys_drop_stderr_aliases_and_name_filters():
    scores = DownstreamScores({"t_hin_Deva": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                              "exact_match,strict": 1.0, "gold_bpb,none": 2.0,
                                              "gold_bpb_stderr,none": "N/A"}}, {"t_hin_Deva": 2}, 1.0)
    assert scores.flat() == {"downstream/t_hin_Deva/acc": 0.5, "downstream/t_hin_Deva/exact_match/strict": 1.0,
                             "downstream/t_hin_Deva/gold_bpb": 2.0}
    assert ("t_hin_Deva", "hin_Deva", "acc", 0.5, 0.1) in scores.rows()
    assert language_of_task("indic_xnli_urd_Arab") == "urd_Arab" and language_of_task("hellaswag") == ""


@pytest.mark.slow
def test_an_unknown_task_is_looked_for_in_lm_evals_own_tasks_too():
    # indexing lm-eval's ~15k task files takes seconds: only a name the shipped tasks lack pays it
    with pytest.raises(UnknownTaskError, match="'no_such_task_xyz'.*indicfm/evaluation/tasks.*lm-eval's own"):
        resolve_tasks(["no_such_task_xyz"], None, None)
    assert resolve_tasks(["xnli_hi"], None, None) == ["xnli_hi"]


def test_unknown_suites_and_broken_task_files_are_named(tmp_path):
    with pytest.raises(UnknownTaskError, match="suite 'no-such-suite'"):
        resolve_tasks(None, "no-such-suite", None)
    (tmp_path / "bad.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    with pytest.raises(TaskFileError, match=r"bad\.yaml: not a valid task file.*line 2"):
        resolve_tasks(["broken"], None, tmp_path)
    suite = resolve_tasks(None, "indic-core", None)
    assert "indic_belebele_hin_Deva" in suite and "indic_xcopa_tam_Taml" in suite
    assert all(language_of_task(t) for t in suite)
