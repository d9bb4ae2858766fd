"""The entry points the CLI wires in: ``main(argv) -> int``, bad input -> 2 and one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune import dataset, evaluate, export, train


def test_dataset_main_builds_from_a_synthetic_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ft.jsonl"
    code = dataset.main(["--synth", "200", "--no-knowledge", "--out", str(out), "--anomalies", "4", "--normal-flagged",
                         "1", "--normal-quiet", "3", "--uncertain", "1", "--rule-cases", "2", "--injection-cases", "3"])
    assert code == 0
    manifest = json.loads((tmp_path / "ft.manifest.json").read_text())
    assert manifest["examples"] == len(out.read_text().splitlines()) >= 10 and manifest["origins"] == {"synth": manifest["examples"]}
    examples, _ = dataset.load_dataset(out)
    assert {e.case for e in examples} >= {"anomaly", "normal", "uncertain", "injection"}
    assert dataset.main(["--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert dataset.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.jsonl"), "--no-knowledge"]) == 2
    assert "not found" in capsys.readouterr().err


def test_train_main_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nbase: {hf_dir: /nonexistent/model}\n", encoding="utf-8")
    assert train.main(["--config", str(cfg), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "d.jsonl" in err  # the data set is checked first
    assert train.main(["--config", "no-such-config", "--data", "d", "--out", "o"]) == 2
    assert "bundled configs" in capsys.readouterr().err


def test_export_main_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "base.gguf"
    fake.write_bytes(b"GGUF")
    assert export.main([str(tmp_path), "--out", str(tmp_path / "a.gguf"), "--base-gguf", str(fake)]) == 2
    assert "not a peft adapter folder" in capsys.readouterr().err
    assert pytest.raises(export.ExportError, export.base_info, fake).match("cannot read it as a GGUF")


def test_evaluate_main_reports_a_missing_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = evaluate.main(["--adapter", str(tmp_path / "missing"), "--limit", "2", "--injection-cases", "0",
                          "--no-knowledge", "--out", str(tmp_path / "e.json")])
    assert code == 2 and "adapter not found" in capsys.readouterr().err
    # --skip-base with no adapter would evaluate nothing: refused before any work.
    assert evaluate.main(["--skip-base", "--limit", "2", "--injection-cases", "0", "--no-knowledge",
                          "--out", str(tmp_path / "e.json")]) == 2
    assert "--skip-base needs --adapter" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_train_main_overrides_reach_the_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, object] = {}

    def fake_train(cfg: object, data: object, out: object) -> object:
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # stop before any work; main reports how to resume

    monkeypatch.setattr(train, "train", fake_train)
    assert train.main(["--config", "smollm2-135m", "--data", "d.jsonl", "--out", "run", "--seed", "7", "--steps", "30"]) == 130
    cfg = seen["cfg"]
    assert cfg.train.seed == 7 and cfg.train.steps == 30  # type: ignore[attr-defined]
    assert "resume" in capsys.readouterr().err
    default = train.load_config("smollm2-135m")
    assert default.train.seed == 0 and default.digest() != cfg.digest()  # type: ignore[attr-defined]
