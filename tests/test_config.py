"""Config schema: YAML + --set overrides, and errors that name the bad key."""

import subprocess
import sys

import pytest

from indicfm.config import Config, ConfigError, load_config, save_config


def test_defaults_and_override():
    cfg = load_config(None, ["trainer.steps=7", "optimizer.learning_rate=0.01"])
    assert cfg.trainer.steps == 7
    assert cfg.optimizer.learning_rate == pytest.approx(0.01)
    assert Config().trainer.steps != 7


def test_yaml_include_and_precedence(tmp_path):
    (tmp_path / "base.yaml").write_text("trainer:\n  steps: 3\n  seed: 9\n")
    (tmp_path / "run.yaml").write_text("include: [base.yaml]\ntrainer:\n  steps: 4\n")
    cfg = load_config(tmp_path / "run.yaml", ["trainer.seed=1"])
    assert (cfg.trainer.steps, cfg.trainer.seed) == (4, 1)


def test_unknown_key_names_key_and_suggests(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "trainer.stpes" in msg and "trainer.steps" in msg and str(path) in msg


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="trainer.steps"):
        load_config(None, ["trainer.steps=lots"])


def test_error_says_whether_the_file_or_set_is_wrong(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["trainer.stepz=1"])
    assert str(err.value).startswith("--set: unknown config key 'trainer.stepz'")
    path.write_text("trainer:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["trainer.steps=1"])
    assert str(err.value).startswith(f"{path}: unknown config key 'trainer.stepz'")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_save_roundtrip(tmp_path):
    cfg = load_config(None, ["trainer.steps=11"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_shipped_configs_load():
    from indicfm.config import CONFIG_DIR

    files = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.name != "hardware.yaml")
    for path in files:
        load_config(path)


def test_cli_config_error_exit_code_2():
    import typer
    from typer.testing import CliRunner

    from indicfm.cli.common import ConfigOption, SetOption, load_config_or_exit

    app = typer.Typer()

    @app.command()
    def run(config: ConfigOption = None, set_: SetOption = None) -> None:
        load_config_or_exit(config, set_)

    result = CliRunner().invoke(app, ["--set", "trainer.stepz=1"])
    assert result.exit_code == 2
    assert "trainer.stepz" in result.output and "Traceback" not in result.output
