"""The synthetic HDFS generator: deterministic, fast, in HDFS format, and truthful about its anomalies."""

from __future__ import annotations

import csv
import re
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from detectors.logs.ingest import KNOWN_FORMATS, LogFormat
from eval.synth import (
    ALL_KINDS,
    INJECTION_TEXT,
    NORMAL_SIZE,
    PROMPT_INJECTION,
    SynthLog,
    generate_hdfs_log,
    write_sample,
)

LINE = re.compile(r"^(\d{6}) (\d{6}) (\d+) (INFO|WARN|ERROR) (dfs\.[\w$]+): (.+)$")
BLOCK = re.compile(r"blk_-?\d+")


@pytest.fixture(scope="module")
def log() -> SynthLog:
    return generate_hdfs_log(500, anomaly_rate=0.1, seed=3, prompt_injections=1)


def _by_block(log: SynthLog) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for line in log.lines:
        for block in dict.fromkeys(BLOCK.findall(line)):
            out[block].append(line)
    return out


def test_deterministic() -> None:
    a = generate_hdfs_log(200, anomaly_rate=0.1, seed=9, prompt_injections=1)
    b = generate_hdfs_log(200, anomaly_rate=0.1, seed=9, prompt_injections=1)
    assert a == b
    assert generate_hdfs_log(200, anomaly_rate=0.1, seed=10).lines != a.lines


def test_block_count_and_size() -> None:
    big = generate_hdfs_log(1000, anomaly_rate=0.05, seed=1)
    assert len(big.labels) == 1000 and len(big.lines) > 10_000


def test_lines_are_hdfs_format_in_time_order(log: SynthLog) -> None:
    fmt = LogFormat(KNOWN_FORMATS["hdfs"])
    stamps = []
    for line in log.lines:
        assert LINE.match(line), line
        fields, content = fmt.parse(line)  # type: ignore[misc]
        assert content and BLOCK.search(content)
        stamps.append(datetime.strptime(f"{fields['Date']} {fields['Time']}", "%y%m%d %H%M%S"))
    assert stamps == sorted(stamps)
    assert stamps[0] == datetime(2008, 11, 9, 20, 35, 18)


def test_blocks_are_interleaved(log: SynthLog) -> None:
    first_block = BLOCK.search(log.lines[0]).group()  # type: ignore[union-attr]
    positions = [i for i, line in enumerate(log.lines) if first_block in line]
    assert positions[-1] - positions[0] > len(positions)  # other blocks' lines in between


def test_truth_matches_the_log(log: SynthLog) -> None:
    blocks = _by_block(log)
    assert set(blocks) == set(log.labels)
    assert {b for b, bad in log.labels.items() if bad} == set(log.kinds)
    assert len(log.kinds) == 50
    assert Counter(log.kinds.values()) == {k: 10 for k in ALL_KINDS}
    assert len(log.injected) == 1 and not log.labels[next(iter(log.injected))]
    assert not set(log.injected) & set(log.kinds)


def test_normal_block_follows_the_write_pipeline(log: SynthLog) -> None:
    for block, lines in _by_block(log).items():
        if log.labels[block] or not any("allocateBlock" in line for line in lines):
            continue  # anomalous, or written before the log started
        count = Counter(next(k for k in ("allocateBlock", "Receiving block", "terminating", "Received block",
                                         "blockMap updated", "invalidSet", "Deleting block", "Verification")
                             if k in line) for line in lines)
        assert count["allocateBlock"] == 1
        assert count["Receiving block"] == count["terminating"] == count["Received block"] == 3
        assert count["blockMap updated"] == 3
        assert count["invalidSet"] == count["Deleting block"] in (0, 3)
        assert all(" INFO " in line for line in lines)
        sizes = {int(s) for s in re.findall(r"size (\d+)", " ".join(lines))}
        assert len(sizes) == 1 and NORMAL_SIZE[0] <= sizes.pop() <= NORMAL_SIZE[1]


def test_each_kind_is_what_it_says(log: SynthLog) -> None:
    blocks = _by_block(log)
    for kind in ALL_KINDS:
        for block in log.blocks_of(kind):
            text = "\n".join(blocks[block])
            if kind == "incomplete_pipeline":
                assert text.count("Receiving block") >= 1
                assert "Received block" not in text and "terminating" not in text and "blockMap" not in text
            elif kind == "write_exception":
                assert " WARN " in text and "writeBlock" in text and "Exception in receiveBlock" in text
                assert text.count("Received block") == 2
            elif kind == "redundant_add":
                assert "Redundant addStoredBlock request received for " + block in text
            elif kind == "size_out_of_range":
                sizes = [int(s) for s in re.findall(r"of size (\d+)", text)]
                assert max(sizes) == 1000 * min(sizes) and min(sizes) >= NORMAL_SIZE[0]
            elif kind == "error_burst":
                assert text.count(" ERROR ") >= 3


def test_injection_sits_in_a_normal_shaped_block(log: SynthLog) -> None:
    block = next(iter(log.injected))
    lines = _by_block(log)[block]
    assert sum(INJECTION_TEXT in line for line in lines) == 1
    assert sum("Received block" in line for line in lines) == 3
    assert PROMPT_INJECTION not in ALL_KINDS


def test_kinds_subset_and_bad_arguments() -> None:
    only = generate_hdfs_log(100, anomaly_rate=0.1, seed=1, kinds=("error_burst",))
    assert set(only.kinds.values()) == {"error_burst"}
    assert generate_hdfs_log(50, anomaly_rate=0.0).kinds == {}
    for kwargs in ({"n_blocks": 0}, {"n_blocks": 10, "anomaly_rate": 1.5},
                   {"n_blocks": 10, "kinds": ("nope",)}, {"n_blocks": 2, "anomaly_rate": 1.0, "prompt_injections": 1}):
        with pytest.raises(ValueError):
            generate_hdfs_log(**kwargs)  # type: ignore[arg-type]


def test_write_sample(tmp_path: Path) -> None:
    paths = write_sample(tmp_path / "demo", n_train_blocks=100, n_test_blocks=120, seed=2)
    assert set(paths) == {"train", "test", "labels"}
    train = paths["train"].read_text().splitlines()
    test = paths["test"].read_text().splitlines()
    assert " WARN " not in "\n".join(train) and " ERROR " not in "\n".join(train)
    assert INJECTION_TEXT not in "\n".join(train) and INJECTION_TEXT in "\n".join(test)
    assert train[-1][:13] < test[0][:13]  # the test day follows the training day
    with paths["labels"].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["BlockId", "Label", "Kind"]
    assert {r["Label"] for r in rows} == {"Normal", "Anomaly"}
    assert all((r["Label"] == "Anomaly") == (r["Kind"] in ALL_KINDS) for r in rows)
    assert sum(r["Kind"] == PROMPT_INJECTION for r in rows) == 1
    assert {r["BlockId"] for r in rows} == set(BLOCK.findall("\n".join(test)))
    assert not set(BLOCK.findall("\n".join(train))) & {r["BlockId"] for r in rows}
