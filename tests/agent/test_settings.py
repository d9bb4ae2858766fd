"""The one ANOMALY_AGENT_* reader: types follow the default, empty means unset, bad text is named."""

from __future__ import annotations

import pytest

from agent.settings import SettingError, env_name, env_setting


def test_names_and_types(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name("max-upload-mb") == "ANOMALY_AGENT_MAX_UPLOAD_MB"
    monkeypatch.setenv("ANOMALY_AGENT_MAX_UPLOAD_MB", "12")
    assert env_setting("max-upload-mb", 5) == 12
    monkeypatch.setenv("ANOMALY_AGENT_MODEL_TIMEOUT", "2.5")
    assert env_setting("model_timeout", 60.0) == 2.5
    monkeypatch.setenv("ANOMALY_AGENT_FLAG", "off")
    assert env_setting("flag", True) is False
    monkeypatch.setenv("ANOMALY_AGENT_FLAG", "Yes")
    assert env_setting("flag", False) is True
    monkeypatch.setenv("ANOMALY_AGENT_MODEL", "qwen2.5-coder-1.5b")
    assert env_setting("model", "smollm2-135m") == "qwen2.5-coder-1.5b"


def test_unset_or_empty_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANOMALY_AGENT_PORT", raising=False)
    assert env_setting("port", 8000) == 8000
    monkeypatch.setenv("ANOMALY_AGENT_PORT", "")
    assert env_setting("port", 8000) == 8000
    assert env_setting("out", None) is None


@pytest.mark.parametrize(("value", "default", "kind"), [("eighty", 8000, "an integer"), ("1.5x", 60.0, "a number"),
                                                         ("maybe", False, r"yes/no \(1, true")])
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, value: str, default: object, kind: str) -> None:
    monkeypatch.setenv("ANOMALY_AGENT_SETTING", value)
    with pytest.raises(SettingError, match=rf"ANOMALY_AGENT_SETTING='{value}' is not {kind}"):
        env_setting("setting", default)


def test_the_command_line_names_a_bad_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    monkeypatch.setenv("ANOMALY_AGENT_TOP", "abc")
    assert main(["detect", "--help"]) == 2
    assert "ANOMALY_AGENT_TOP='abc' is not an integer" in capsys.readouterr().err
    monkeypatch.delenv("ANOMALY_AGENT_TOP")
    monkeypatch.setenv("ANOMALY_AGENT_PORT", "x")
    assert main(["serve", "--help"]) == 2
    assert "ANOMALY_AGENT_PORT='x' is not an integer" in capsys.readouterr().err
