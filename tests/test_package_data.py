"""Shipped configs and sample are found from any directory, and ``--config`` takes a shipped name."""

from __future__ import annotations

from pathlib import Path

import pytest

from indicfm.config import ConfigError, find_config_file, load_config
from indicfm.hardware import HARDWARE_YAML
from indicfm.package_data import CONFIG_DIR, SAMPLES_DIR, resolve_path, shipped_config_names

REPO = Path(__file__).resolve().parent.parent
MOE_8B = REPO / "configs" / "model" / "moe-8b.yaml"


def test_checkout_finds_the_repositorys_top_level_folders():
    assert CONFIG_DIR == (REPO / "configs").resolve() and SAMPLES_DIR == (REPO / "samples").resolve()
    assert HARDWARE_YAML == CONFIG_DIR / "hardware.yaml"


@pytest.mark.parametrize("name", ["model/moe-8b", "model/moe-8b.yaml", "configs/model/moe-8b.yaml"])
def test_a_shipped_config_by_name_from_another_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config_file(name).resolve() == MOE_8B.resolve()
    assert load_config(name) == load_config(MOE_8B)


def test_a_file_here_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "moe-8b.yaml").write_text("trainer:\n  steps: 7\n")
    assert find_config_file("model/moe-8b.yaml") == Path("model/moe-8b.yaml")
    assert load_config("model/moe-8b.yaml").trainer.steps == 7
    assert load_config("model/moe-8b").trainer.steps == load_config(MOE_8B).trainer.steps  # no file of that name here


def test_an_unknown_name_lists_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="model/nope") as err:
        load_config("model/nope")
    listed = {p.relative_to(REPO / "configs").with_suffix("").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    listed.discard("hardware")
    assert set(shipped_config_names()) == listed
    assert all(name in str(err.value) for name in listed)


def test_relative_sample_paths_fall_back_to_the_shipped_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("samples/heldout") == (REPO / "samples" / "heldout").resolve()
    assert resolve_path("elsewhere/x.txt") == tmp_path / "elsewhere" / "x.txt"  # not shipped: as given
