import json
import os
from pathlib import Path

import pydantic
import pytest
import yaml

from mqi_celery.config import Settings, masked
from mqi_celery.config_loading import load_settings
from mqi_celery.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_is_exactly_the_built_in_defaults():
    # conf/default.yaml documents the embedded default; it must not drift from the code.
    assert load_settings(ROOT / "conf" / "default.yaml", environ={}) == load_settings(None, environ={}).model_copy(
        update={"source": str(ROOT / "conf" / "default.yaml")})


def test_production_example_is_valid():
    s = load_settings(ROOT / "conf" / "production.example.yaml", environ={})
    assert s.broker.url.startswith("amqp://") and s.database.url.startswith("postgresql")


def test_misspelt_key_names_key_file_and_suggestion(tmp_path):
    f = tmp_path / "site.yaml"
    f.write_text("scanner:\n  setle_seconds: 3\n")
    with pytest.raises(ConfigError) as err:
        load_settings(f, environ={})
    assert str(f) in str(err.value)
    assert "scanner.setle_seconds: unknown key (did you mean 'settle_seconds'?)" in str(err.value)


def test_a_setting_merged_into_another_says_where_it_is_now(tmp_path):
    f = tmp_path / "site.yaml"
    f.write_text("worker:\n  log_level: DEBUG\n")
    with pytest.raises(ConfigError) as err:
        load_settings(f, environ={})
    assert "worker.log_level: merged into logging.level; set it there" in str(err.value)


def test_unknown_section_and_bad_value(tmp_path):
    f = tmp_path / "site.yaml"
    f.write_text("scaner: {}\nengine:\n  command: moqui\n  timeout_seconds: -1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(f, environ={})
    msg = str(err.value)
    assert "scaner: unknown key (did you mean 'scanner'?)" in msg
    assert "engine.command" in msg and "{input_file}" in msg
    assert "engine.timeout_seconds" in msg


def test_environment_overrides_file_and_config_variable(tmp_path):
    f = tmp_path / "site.yaml"
    f.write_text("scanner:\n  settle_seconds: 30\n")
    s = load_settings(environ={"MQI_CONFIG": str(f), "MQI_SCANNER__SETTLE_SECONDS": "5",
                               "MQI_ENGINE__GPU_IDS": "[0, 1]"})
    assert s.scanner.settle_seconds == 5 and s.engine.gpu_ids == (0, 1)
    assert "MQI_* environment" in s.source


def test_misspelt_environment_override_is_an_error():
    with pytest.raises(ConfigError, match="scanner.settle_secs: unknown key"):
        load_settings(environ={"MQI_SCANNER__SETTLE_SECS": "5"})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("scanner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})


def test_relative_paths_are_anchored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={})
    assert s.paths.inbox == tmp_path / "var" / "inbox"
    assert s.database.url == f"sqlite:///{tmp_path}/var/mqi.db"
    assert s.broker.result_backend == f"db+sqlite:///{tmp_path}/var/celery-results.db"


def test_secrets_are_masked():
    dump = masked({"broker": {"url": "amqp://mqi:s3cret@rabbit:5672/mqi"},
                   "database": {"url": "postgresql://mqi:pw@db/mqi"}, "ssh": {"key_passphrase": "x"}})
    text = json.dumps(dump)
    assert "s3cret" not in text and ":pw@" not in text and '"x"' not in text
    assert "amqp://mqi:***@rabbit:5672/mqi" in text


def test_config_check_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mqi_celery.cli import app

    monkeypatch.setenv("MQI_CONFIG", os.environ.get("MQI_CONFIG", ""))  # --config sets it: undone after the test

    f = tmp_path / "site.yaml"
    (tmp_path / "inbox").mkdir()
    f.write_text(yaml.safe_dump({"database": {"url": "postgresql://mqi:hunter2@db/mqi"},
                                 "paths": {"inbox": str(tmp_path / "inbox"), "results": str(tmp_path / "results")}}))
    result = CliRunner().invoke(app, ["--config", str(f), "config", "check", "--offline", "--show"])
    assert result.exit_code == 0, result.output
    assert "configuration OK" in result.output and "hunter2" not in result.output and "***" in result.output
    f.write_text("database:\n  uri: x\n")
    result = CliRunner().invoke(app, ["--config", str(f), "config", "check"])
    assert result.exit_code == 2 and "database.uri: unknown key (did you mean 'url'?)" in result.output


def test_settings_sections_forbid_extra_keys():
    with pytest.raises(pydantic.ValidationError, match="outbox"):
        Settings.model_validate({"paths": {"inbox": "x", "outbox": "y"}})


def test_engine_command_with_unknown_placeholder_is_refused(tmp_path):
    f = tmp_path / "site.yaml"
    f.write_text("engine:\n  command: moqui {input_file} --gpu {gpu}\n")
    with pytest.raises(ConfigError, match="engine.command"):
        load_settings(f, environ={})
