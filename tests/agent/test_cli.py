"""The command line: the demo job end to end, and bad input as one clear line + exit 2."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from agent.cli import main
from eval.synth import write_sample


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("demo")
    write_sample(directory, n_train_blocks=300, n_test_blocks=200, seed=3, anomaly_rate=0.1)
    return directory


def test_demo_finds_the_labelled_anomalies(sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cands.jsonl"
    assert main(["demo", "--sample", str(sample), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "anomalous blocks found" in text
    cands = [json.loads(line) for line in out.read_text().splitlines()]
    labels = {}
    for line in (sample / "test_labels.csv").read_text().splitlines()[1:]:
        block, label, _kind = line.split(",")
        labels[block] = label == "Anomaly"
    flagged = {c["locator"]["sequence"] for c in cands}
    found = sum(labels[b] for b in flagged)
    assert found >= 0.9 * sum(labels.values())
    assert found >= 0.9 * len(flagged)
    # Every candidate points at lines of its own block.
    test_lines = (sample / "test.log").read_text().splitlines()
    for cand in cands:
        for ev in cand["evidence"]:
            for n in ev["data"]["lines"]:
                assert cand["locator"]["sequence"] in test_lines[n - 1]


def test_detect_writes_candidates(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.jsonl"
    code = main(["detect", str(sample / "test.log"), "--train", str(sample / "train.log"), "--out", str(out),
                 "--detector", "log-pca"])
    assert code == 0
    assert out.read_text().strip()


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [("missing.log", None, "no such file"), ("empty.log", b"", "file is empty"),
     ("bin.log", b"\x00\x01\x02" * 1000, "binary")],
)
def test_detect_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                                            content: bytes | None, fragment: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert main(["detect", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(path.name) in err
    assert "Traceback" not in err


def test_format_matching_nothing_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "other.log.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("this line has no header\nneither has this\n")
    assert main(["detect", str(path), "--format", "<Date> <Time> <Level>: <Content>"]) == 2
    err = capsys.readouterr().err
    assert "other.log.gz" in err and "line 1" in err


def test_unknown_detector_and_bad_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["detect", "x.log", "--detector", "nope"])
    assert main(["eval", "logs", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
