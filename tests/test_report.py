"""`indicfm report` and `indicfm compare` (issue 19): plots that decode and an HTML page that shows
them, equal-FLOP budgeting checked against the FLOP counter, and the speed-up arithmetic against
hand computations on synthetic curves."""

from __future__ import annotations

import html.parser
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from indicfm.config import CONFIG_DIR, ConfigError, load_config
from indicfm.model.flops import train_flops_per_token
from indicfm.report.compare import PlannedRun, bpb_table, budget_steps, check_same_setup, flops_to_reach, plan_run, speedups, summarise, write_outputs
from indicfm.report.runs import GoodputPoint, RunHistory
from indicfm.train.metrics import expert_load_shares, read_metrics

from helpers import tokenizer_and_cache

LANGS = ["hin_Deva", "tam_Taml", "eng_Latn"]
COMPARE_CONFIGS = sorted(p for p in (CONFIG_DIR / "compare").glob("*.yaml") if p.stem != "base")

TINY_MODEL = {
    "vocab_size": 2048, "d_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
    "d_ff": 64, "compute_dtype": "float32", "max_seq_len": 64,
}
SHARED = [
    "tokenizer.vocab_size=2048", "data.seq_len=64", "data.workers=1", "trainer.global_batch_size=8",
    "optimizer.learning_rate=0.01", "optimizer.warmup_steps=1", "logging.progress=false", "logging.tensorboard=false",
    "mesh.data=-1", "trainer.compilation_cache_dir=null", "eval.max_lines_per_language=4", "eval.batch_size=8",
    f"eval.languages=[{','.join(LANGS)}]",
]


# -- speed-up arithmetic ------------------------------------------------------------------------


def test_flops_to_reach_interpolates_the_first_crossing():
    flops = [0.0, 1e12, 2e12, 3e12, 4e12]
    # crosses 2.0 between 2e12 (2.2) and 3e12 (1.9): 2e12 + (2.2 - 2.0) / (2.2 - 1.9) * 1e12
    assert flops_to_reach(flops, [4.0, 2.8, 2.2, 1.9, 1.7], 2.0) == pytest.approx(2e12 + 2e12 / 3)
    assert flops_to_reach(flops, [1.5, 1.4, 1.3, 1.2, 1.1], 2.0) == 0.0  # below the target from the start
    assert flops_to_reach(flops, [4.0, 3.0, 2.5, 2.0, 1.0], 2.0) == pytest.approx(3e12)  # exactly on a point
    assert flops_to_reach(flops, [4.0, 2.0, 2.5, 1.0, 1.0], 2.0) == pytest.approx(1e12)  # the first crossing
    assert flops_to_reach(flops, [4.0, 3.5, 3.0, 2.5, 2.1], 2.0) is None


def test_speedup_is_reference_flops_over_flops_to_the_reference_final_bpb():
    ref_flops = [0.0, 1e12, 2e12, 3e12, 4e12]
    ref_bpb = [4.0, 3.0, 2.5, 2.2, 2.0]
    value, bound = speedups(ref_flops, ref_bpb, ref_flops, [4.0, 2.8, 2.2, 1.9, 1.7])
    assert value == pytest.approx(4e12 / (2e12 + 2e12 / 3))  # = 1.5
    assert value == pytest.approx(1.5) and bound == pytest.approx(1.0)
    # a MoE that stopped at 3.9e12 (one step short of the budget) and never got to 2.0
    value, bound = speedups(ref_flops, ref_bpb, [0.0, 1.3e12, 2.6e12, 3.9e12], [4.0, 3.0, 2.4, 2.1])
    assert value is None and bound == pytest.approx(4.0 / 3.9)
    # the reference against itself: exactly 1
    assert speedups(ref_flops, ref_bpb, ref_flops, ref_bpb)[0] == pytest.approx(1.0)


def _history(name: str, flops_per_step: float, eval_steps: list[int], bpb: dict[str, list[float]]) -> RunHistory:
    steps = np.arange(1, eval_steps[-1] + 1)
    return RunHistory(
        name=name, workdir=Path(name), steps=steps,
        train={"step_seconds": np.full(len(steps), 0.5), "tokens_per_s": np.full(len(steps), 100.0)},
        flops_per_step=flops_per_step, eval_steps=np.array(eval_steps),
        bpb={k: np.array(v) for k, v in bpb.items()},
    )


def test_summary_per_language_mean_and_geometric_mean_on_synthetic_curves(tmp_path):
    dense = _history("dense", 1e10, [0, 100, 200], {"hin": [4.0, 3.0, 2.0], "tam": [5.0, 4.0, 3.0], "mean": [4.5, 3.5, 2.5]})
    # MoE reaches hin 2.0 at step 150 (halfway from 2.5 to 1.5) and tam 3.0 at step 100
    moe = _history("moe", 1e10, [0, 100, 200], {"hin": [4.0, 2.5, 1.5], "tam": [5.0, 3.0, 2.0], "mean": [4.5, 2.75, 1.75]})
    slow = _history("slow", 1e10, [0, 100, 200], {"hin": [4.0, 3.5, 3.0], "tam": [5.0, 4.5, 4.0], "mean": [4.5, 4.0, 3.5]})
    planned = [
        PlannedRun(name, f"{name}.yaml", 200, 1e10, 1e7, 1000, 10**6, 10**6, 4 * 10**6, 12 * 10**6, name == "dense", 100)
        for name in ("dense", "moe", "slow")
    ]
    result = summarise(planned, [dense, moe, slow], "dense", 2e12, {})
    assert result.speedup["moe"]["hin"] == pytest.approx(200 / 150)
    assert result.speedup["moe"]["tam"] == pytest.approx(200 / 100)
    # mean curve 2.75 → 1.75 crosses 2.5 a quarter of the way: step 125
    assert result.speedup["moe"]["mean"] == pytest.approx(200 / 125)
    assert result.geomean_speedup["moe"] == pytest.approx(math.sqrt((200 / 150) * 2.0))
    assert result.speedup["slow"]["hin"] is None and result.geomean_speedup["slow"] is None
    assert result.final_bpb["moe"]["tam"] == 2.0
    assert result.train_seconds["dense"] == pytest.approx(100.0)
    header, rows = bpb_table(result)
    geomean = dict(zip(header, rows[-1]))
    assert geomean["speed-up moe"] == f"{math.sqrt((200 / 150) * 2.0):.2f}x"
    assert geomean["speed-up slow"] == "– (2 of 2 not reached)"
    hin = dict(zip(header, rows[0]))
    assert hin["language"] == "hin" and hin["speed-up moe"] == "1.33x" and hin["speed-up slow"].startswith("< 1.00x")
    write_outputs(result, [dense, moe, slow], tmp_path)
    assert "speedup.png" in _check_page(tmp_path)


def test_compare_times_configs_by_the_median_step_not_the_fastest_tenth():
    """The step times of the issue's quickstart: a read that waited gave one step two steps' time
    and its neighbour almost none.  The fastest tenth picked the near-zero steps; the median does not."""
    times = [0.25] * 10 + [0.518, 0.011] + [0.25] * 6 + [0.527, 0.0023]
    dense = _history("dense", 1e10, [0, 10, 20], {"hin": [4.0, 3.0, 2.0], "mean": [4.0, 3.0, 2.0]})
    dense.train["step_seconds"] = np.array(times)
    dense.goodput = [GoodputPoint("s", 20, 10.0, {"productive": 5.0, "compile": 4.0, "other": 1.0})]
    moe = _history("moe", 1e10, [0, 10, 20], {"hin": [4.0, 2.5, 1.5], "mean": [4.0, 2.5, 1.5]})  # an old log
    moe.train["step_seconds"] = np.array([30.0] + [0.4] * 19)  # its first step compiled
    planned = [PlannedRun(n, f"{n}.yaml", 20, 1e10, 1e7, 1000, 10**6, 10**6, 4 * 10**6, 12 * 10**6, n == "dense", 10) for n in ("dense", "moe")]
    result = summarise(planned, [dense, moe], "dense", 2e11, {})
    assert result.median_step_seconds == {"dense": pytest.approx(0.25), "moe": pytest.approx(0.4)}
    assert result.productive_share["dense"] == pytest.approx(0.5) and math.isnan(result.productive_share["moe"])
    from indicfm.report.compare import compute_table

    header, rows = compute_table(result)
    assert "p10 step s" not in header
    assert [dict(zip(header, row))["median step s"] for row in rows] == ["0.250", "0.400"]
    assert dict(zip(header, rows[0]))["productive"] == "50%"


def test_goodput_of_a_run_sums_its_sessions_and_plots(tmp_path):
    """Two sessions (a crash, then a resume): the run's breakdown is each session's latest point summed."""
    from indicfm.report import plots
    from indicfm.report.html import summary_rows

    run = _history("run", 1e10, [0, 4], {"mean": [4.0, 3.0]})
    run.goodput = [
        GoodputPoint("a", 1, 3.0, {"startup": 1.0, "compile": 1.5, "productive": 0.5}),
        GoodputPoint("a", 2, 3.5, {"startup": 1.0, "compile": 1.5, "productive": 1.0}),
        GoodputPoint("b", 3, 2.5, {"restore": 1.0, "compile": 1.0, "recomputed": 0.5}),
        GoodputPoint("b", 4, 3.0, {"restore": 1.0, "compile": 1.0, "recomputed": 0.5, "productive": 0.5}),
    ]
    totals = run.goodput_totals()
    assert {c: v for c, v in totals.items() if v} == {"startup": 1.0, "compile": 2.5, "productive": 1.5, "restore": 1.0, "recomputed": 0.5}
    assert run.goodput_wall() == pytest.approx(6.5) == pytest.approx(sum(totals.values()))
    wall, series = run.goodput_over_time()
    assert wall.tolist() == [3.0, 3.5, 6.0, 6.5]  # session b after session a's 3.5 s
    assert series["productive"].tolist() == [0.5, 1.0, 1.0, 1.5]
    assert series["compile"].tolist() == [1.5, 1.5, 2.5, 2.5]
    assert plots.plot_goodput([run, _history("old", 1e10, [0, 4], {"mean": [4.0, 3.0]})], tmp_path / "goodput.png")
    assert plots.plot_goodput([_history("old", 1e10, [0, 4], {"mean": [4.0, 3.0]})], tmp_path / "none.png") is None
    row = summary_rows([run])[0]
    assert row["wall clock (s)"] == "6" and row["productive"] == "23.1%" and row["median step (s)"] == "0.5000"


# -- equal-FLOP budgeting -------------------------------------------------------------------------


def test_budget_steps_stay_within_one_step_of_the_budget():
    assert budget_steps(3.0, 10.0) == 3
    assert budget_steps(2.5, 10.0) == 4
    with pytest.raises(ValueError, match="less than one step"):
        budget_steps(11.0, 10.0)


@pytest.mark.parametrize("config_file", COMPARE_CONFIGS, ids=lambda p: p.stem)
def test_shipped_compare_configs_stop_within_one_step_of_the_budget(config_file):
    """Each shipped config's planned steps, checked against the FLOP counter of indicfm.model.flops."""
    cfg = load_config(config_file)
    seq_len, budget = cfg.data.seq_len, 6e12
    per_step = train_flops_per_token(cfg.model, seq_len) * seq_len * cfg.trainer.global_batch_size
    run = plan_run(config_file.stem, str(config_file), cfg, seq_len, budget, evals=8)
    assert run.steps * per_step <= budget < (run.steps + 1) * per_step
    # parameter memory: float32 parameters (4 bytes), plus AdamW's two float32 moments (8 more)
    from indicfm.model.flops import count_params

    assert cfg.model.param_dtype == "float32"
    assert (run.param_bytes, run.train_state_bytes) == (4 * count_params(cfg.model), 12 * count_params(cfg.model))


@pytest.mark.parametrize("config_file", COMPARE_CONFIGS, ids=lambda p: p.stem)
def test_compute_stated_in_each_config_comment_matches_the_flop_counter(config_file):
    """The "Compute:" comment users read (GFLOP per step, MFLOP per token, parameters) is the counter's."""
    import re

    from indicfm.model.flops import count_active_params, count_params

    comment = " ".join(line.lstrip("# ") for line in config_file.read_text(encoding="utf-8").splitlines() if line.startswith("#"))
    found = re.search(
        r"Compute: ([\d.]+) GFLOP per training step \(([\d.]+) MFLOP per token; ([\d.]+)M parameters, ([\d.]+)M active", comment
    )
    assert found, f"{config_file.name} states no compute"
    cfg = load_config(config_file)
    per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    per_step = per_token * cfg.data.seq_len * cfg.trainer.global_batch_size
    stated = [float(v) for v in found.groups()]
    actual = [per_step / 1e9, per_token / 1e6, count_params(cfg.model) / 1e6, count_active_params(cfg.model) / 1e6]
    assert stated == pytest.approx(actual, abs=0.006)


def test_compare_dry_run_prints_each_configs_budgeted_compute():
    from typer.testing import CliRunner

    from indicfm.cli import app

    args = ["compare", "--budget-flops", "6e12", "--dry-run"]
    for path in COMPARE_CONFIGS:
        args += ["--config", str(path)]
    printed = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert printed.exit_code == 0, printed.output
    for path in COMPARE_CONFIGS:
        cfg = load_config(path)
        per_step = train_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.data.seq_len * cfg.trainer.global_batch_size
        steps = math.floor(6e12 / per_step)
        assert f"{path.stem}: " in printed.output
        assert f"→ {steps} steps = {steps * per_step:.3e} FLOPs" in printed.output
    one = CliRunner().invoke(app, ["compare", "--budget-flops", "6e12", "--dry-run", "--config", str(COMPARE_CONFIGS[0])])
    assert one.exit_code == 2 and "at least two" in one.output


def test_shipped_compare_configs_share_the_setup_and_the_active_parameters():
    from indicfm.model.flops import count_active_params

    configs = {p.stem: load_config(p) for p in COMPARE_CONFIGS}
    assert "dense" in configs and len(configs) >= 3
    check_same_setup(configs)  # raises if data, tokenizer, schedule, ... differ
    active = [count_active_params(cfg.model) for cfg in configs.values()]
    assert max(active) / min(active) < 1.02  # "equal active parameters per token"
    assert sum(cfg.model.num_moe_layers == 0 for cfg in configs.values()) == 1


def test_check_same_setup_names_the_differing_key():
    a = load_config(None, ["trainer.seed=0"])
    b = load_config(None, ["trainer.seed=1", "model.num_experts=4", "optimizer.learning_rate=0.01"])
    with pytest.raises(ConfigError, match="trainer.seed"):
        check_same_setup({"a": a, "b": b})
    notes = check_same_setup({"a": a, "b": load_config(None, ["model.num_experts=4", "optimizer.learning_rate=0.01"])})
    assert any("learning_rate" in note for note in notes)


def test_expert_load_shares_hand_values():
    shares = expert_load_shares(np.array([[1, 1, 2, 0], [0, 0, 0, 0]], np.float32))
    assert shares == [[0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert expert_load_shares(np.zeros((0, 4))) == []


# -- a tiny comparison end to end: runs, plots, HTML ------------------------------------------------


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _check_page(directory: Path) -> list[str]:
    """Every PNG decodes to a non-empty image and is shown by index.html, which shows nothing else."""
    from PIL import Image

    parser = _Images()
    parser.feed((directory / "index.html").read_text(encoding="utf-8"))
    pngs = sorted(p.name for p in directory.glob("*.png"))
    assert pngs and sorted(parser.sources) == pngs
    for name in pngs:
        with Image.open(directory / name) as image:
            image.load()
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            assert np.asarray(image.convert("L")).std() > 0  # not a blank canvas
    return pngs


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory, sample_train_dir):
    from indicfm.report.compare import run_compare

    root = tmp_path_factory.mktemp("compare")
    (root / "inputs").mkdir()
    inputs = tokenizer_and_cache(root / "inputs", sample_train_dir, LANGS, SHARED)
    dense = root / "dense.yaml"
    moe = root / "moe.yaml"
    dense.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "first_dense_layers": 2}}))
    moe.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "first_dense_layers": 1, "num_experts": 4, "top_k": 2, "d_expert": 32}}))
    cfg = load_config(dense, SHARED)
    per_step = train_flops_per_token(cfg.model, 64) * 64 * 8
    budget = 4.5 * per_step  # 4 dense steps; the MoE's steps cost a little more (its router)
    overrides = SHARED + inputs + [f"eval.heldout_dir={Path(__file__).parent.parent / 'samples' / 'heldout'}"]
    result = run_compare([dense, moe], budget, root / "out", overrides=overrides, evals=2)
    return root / "out", result, budget


def test_compare_trains_to_the_budget_and_writes_the_report(tiny_comparison):
    out, result, budget = tiny_comparison
    assert result.reference == "dense"
    for run in result.runs:
        records = [r for r in read_metrics(out / "runs" / run.name / "metrics.jsonl") if "loss" in r]
        last = records[-1]
        flops_per_step = last["model_flops_per_step"]  # what the training loop counted
        cfg = load_config(out / "runs" / run.name / "config.yaml")
        assert flops_per_step == pytest.approx(train_flops_per_token(cfg.model, 64) * 64 * 8)
        assert last["step"] == run.steps
        assert last["step"] * flops_per_step <= budget < (last["step"] + 1) * flops_per_step
        evals = sorted(r["step"] for r in read_metrics(out / "runs" / run.name / "metrics.jsonl") if "bpb/mean" in r)
        assert evals[0] == 0 and evals[-1] == run.steps and len(evals) >= 3
    moe_records = [r for r in read_metrics(out / "runs" / "moe" / "metrics.jsonl") if "loss" in r]
    shares = np.array(moe_records[-1]["expert_load"])
    assert shares.shape == (1, 4) and shares.sum() == pytest.approx(1.0, abs=1e-4)
    assert set(result.final_bpb["moe"]) == set(LANGS) | {"mean"}
    from indicfm.report.runs import load_run

    for run in result.runs:  # each run's wall clock accounted, and timed by its steps on the devices
        history = load_run(out / "runs" / run.name, run.name)
        assert history.goodput_wall() == pytest.approx(sum(history.goodput_totals().values()))
        assert history.goodput_wall() <= result.run_seconds[run.name]
        assert result.median_step_seconds[run.name] == pytest.approx(float(np.median(history.train["step_seconds"])))
        assert 0 < result.productive_share[run.name] < 1
    pngs = _check_page(out)
    assert {"bpb_vs_flops.png", "bpb_vs_wall.png", "loss.png", "speedup.png", "expert_load_1_moe.png", "goodput.png"} <= set(pngs)
    assert "speed-up moe" in (out / "compare.md").read_text(encoding="utf-8")


def test_report_command_overlays_workdirs(tiny_comparison, tmp_path):
    from typer.testing import CliRunner

    from indicfm.cli import app

    out, _, _ = tiny_comparison
    single = CliRunner().invoke(app, ["report", str(out / "runs" / "moe"), "--output", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    pngs = _check_page(tmp_path / "one")
    assert {"loss.png", "lr.png", "grad_norm.png", "throughput.png", "moe_balance.png", "bpb.png", "goodput.png"} <= set(pngs)
    both = CliRunner().invoke(app, ["report", str(out / "runs" / "dense"), str(out / "runs" / "moe"), "-o", str(tmp_path / "two")])
    assert both.exit_code == 0, both.output
    page = (tmp_path / "two" / "index.html").read_text(encoding="utf-8")
    assert "dense" in page and "moe" in page
    _check_page(tmp_path / "two")
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "metrics.jsonl" in missing.output


def test_quality_benchmark_runs_every_shipped_compare_config_on_existing_data():
    from benchmarks.quality import CONFIGS, default_inputs

    assert sorted(CONFIGS) == [p.stem for p in COMPARE_CONFIGS]
    corpus, heldout = default_inputs()
    assert any(corpus.glob("*.txt")) and any(heldout.glob("*.dev"))
