"""Every shipped task file (indicfm/evaluation/tasks/indic_core/) loads through lm-eval's
``TaskManager`` and runs through the real harness on a tiny local copy of its data.

The hub is not reachable here, so each task is built with its dataset swapped for local JSON
lines holding the same fields as the hub dataset (an inline override of ``dataset_path: json``
and ``dataset_kwargs.data_files``, what a user with local copies would write): the prompts,
choices, gold indices and metrics are the shipped file's own.  The metrics are checked against a
hand computation from the per-request log-likelihoods lm-eval logged.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from indicfm.config import MeshConfig
from indicfm.evaluation.harness import SHIPPED_TASKS, evaluate_model, resolve_tasks, task_manager
from indicfm.inference.decode import inference_config
from indicfm.model.config import ModelConfig
from indicfm.sharding import make_mesh

from downstream_helpers import TINY_MODEL, tiny_tokenizer
from helpers import random_model

S = "कल बारिश हुई"  # short text: a tiny model and a 64-token row


def _rows(dataset_path: str) -> list[dict]:
    """Two documents with the hub dataset's fields."""
    if dataset_path == "facebook/belebele":
        return [{"flores_passage": S, "question": "क्या?", "mc_answer1": "हाँ", "mc_answer2": "नहीं",
                 "mc_answer3": "शायद", "mc_answer4": "कभी", "correct_answer_num": str(k)} for k in (1, 3)]
    if dataset_path == "juletxara/xstory_cloze":
        return [{**{f"input_sentence_{i}": "वह आया।" for i in range(1, 5)}, "sentence_quiz1": "वह गया।",
                 "sentence_quiz2": "वह रुका।", "answer_right_ending": k} for k in (1, 2)]
    if dataset_path == "cambridgeltl/xcopa":
        return [{"premise": "மழை பெய்தது.", "choice1": "நான் நனைந்தேன்", "choice2": "நான் சிரித்தேன்",
                 "question": q, "label": k} for q, k in (("effect", 0), ("cause", 1))]
    if dataset_path in ("facebook/xnli", "Divyanshu/indicxnli"):
        return [{"premise": S, "hypothesis": "धूप थी", "label": k} for k in (0, 2)]
    if dataset_path == "mrlbenchmarks/global-piqa-nonparallel":
        return [{"prompt": S, "solution0": "छाता लो", "solution1": "धूप लो", "label": k} for k in (0, 1)]
    raise AssertionError(f"no local rows for {dataset_path}: add them here")


@pytest.fixture(scope="module")
def shipped() -> dict[str, dict]:
    """task name -> its indexed config, for every shipped indic-core task."""
    manager = task_manager(None, False)
    names = resolve_tasks(None, "indic-core", None)
    return {name: manager.task_index[name].cfg for name in names}


def test_the_suite_covers_the_issues_datasets_and_every_task_has_a_language(shipped):
    files = sorted(p.stem for p in (SHIPPED_TASKS / "indic_core").glob("*.yaml"))
    assert sorted(shipped) == files
    families = {}
    for name, cfg in shipped.items():
        families.setdefault(cfg["dataset_path"], []).append(name.rsplit("_", 2)[-2] + "_" + name.rsplit("_", 1)[-1])
    assert len(families["facebook/belebele"]) >= 20
    assert {"hin_Deva", "tel_Telu"} <= set(families["juletxara/xstory_cloze"])
    assert families["cambridgeltl/xcopa"] == ["tam_Taml"]
    assert set(families["facebook/xnli"]) == {"hin_Deva", "urd_Arab"}
    assert len(families["Divyanshu/indicxnli"]) == 11 and len(families["mrlbenchmarks/global-piqa-nonparallel"]) >= 13


def _split_of(cfg: dict) -> str:
    return cfg.get("test_split") or cfg.get("validation_split")


@pytest.fixture(scope="module")
def local_run(shipped, tmp_path_factory, sample_train_dir):
    """Every shipped task on local rows, one harness run, with the per-request samples."""
    root = tmp_path_factory.mktemp("local")
    overrides = {}
    for name, cfg in shipped.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows(cfg["dataset_path"])),
                        encoding="utf-8")
        # every split the task names points at the same rows (few-shot sources too)
        splits = {cfg[k]: str(path) for k in ("training_split", "validation_split", "test_split", "fewshot_split")
                  if cfg.get(k)}
        overrides[name] = {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": splits}}
    cfg = inference_config(ModelConfig(**{**TINY_MODEL, "max_seq_len": 128}))
    model = random_model(cfg, seed=5)
    scores = evaluate_model(model, cfg, tiny_tokenizer(sample_train_dir), make_mesh(MeshConfig(data=-1)),
                            tasks=sorted(shipped), overrides=overrides, log_samples=True, rows=8)
    return scores


def test_every_shipped_task_runs_on_local_data_with_its_metrics(shipped, local_run):
    assert sorted(local_run.results) == sorted(shipped)
    for name in shipped:
        assert local_run.samples_per_task[name] == 2
        metrics = {k.split(",")[0] for k in local_run.results[name]}
        assert {"acc", "acc_norm", "acc_bytes", "gold_bpb"} <= metrics, name


def test_metrics_match_a_hand_computation_from_the_logged_loglikelihoods(shipped, local_run):
    from indicfm.text import normalize

    for name in shipped:
        hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
        nll = nbytes = 0.0
        for sample in local_run.samples[name]:
            lls = np.array([float(r[0][0]) for r in sample["resps"]])
            choices = [a[1] for a in sample["arguments"]]  # (context, " " + choice)
            texts = [c[1:] if c.startswith(" ") else c for c in choices]
            gold = int(sample["target"]) if not isinstance(sample["target"], str) else texts.index(sample["target"])
            hits["acc"].append(np.argmax(lls) == gold)
            hits["acc_norm"].append(np.argmax(lls / [len(t) for t in texts]) == gold)
            per_byte = lls / [len(normalize(t).encode("utf-8")) for t in texts]
            hits["acc_bytes"].append(np.argmax(per_byte) == gold)
            nll -= lls[gold]
            nbytes += len(normalize(texts[gold]).encode("utf-8"))
        for metric, values in hits.items():
            assert local_run.results[name][f"{metric},none"] == pytest.approx(np.mean(values)), (name, metric)
        assert local_run.results[name]["gold_bpb,none"] == pytest.approx(nll / math.log(2) / nbytes), name
