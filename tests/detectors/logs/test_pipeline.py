"""LogPipeline end to end on the bundled-style synthetic sample: files in, candidates out."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from detectors.logs.pipeline import DetectionResult, LogPipeline
from detectors.logs.templates import load_preset
from detectors.records import EvidenceKind
from detectors.registry import make_detector
from eval.synth import PROMPT_INJECTION, write_sample

STRUCTURAL = ("incomplete_pipeline", "write_exception", "redundant_add", "error_burst")
_BLOCK = re.compile(r"blk_-?\d+")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sample(tmp_path_factory.mktemp("sample"), n_train_blocks=300, n_test_blocks=400, seed=5,
                        anomaly_rate=0.1)


@pytest.fixture(scope="module")
def truth(sample: dict[str, Path]) -> dict[str, tuple[bool, str]]:
    with sample["labels"].open(newline="") as fh:
        return {row["BlockId"]: (row["Label"] == "Anomaly", row["Kind"]) for row in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def fitted_pipeline(sample: dict[str, Path]) -> tuple[LogPipeline, object]:
    pipeline = LogPipeline(make_detector("log-ensemble"), log_format="hdfs", parser=load_preset("hdfs"))
    report = pipeline.fit(sample["train"])
    return pipeline, report


@pytest.fixture(scope="module")
def result(fitted_pipeline: tuple[LogPipeline, object], sample: dict[str, Path]) -> DetectionResult:
    return fitted_pipeline[0].detect(sample["test"])


def test_fit_reads_every_training_line(fitted_pipeline: tuple[LogPipeline, object], sample: dict[str, Path]) -> None:
    _, report = fitted_pipeline
    n_lines = len(sample["train"].read_text().splitlines())
    assert report.parsed == report.lines_read == n_lines  # type: ignore[attr-defined]
    assert report.unparseable == 0  # type: ignore[attr-defined]


def test_detect_scores_every_block(result: DetectionResult, truth: dict[str, tuple[bool, str]],
                                   sample: dict[str, Path]) -> None:
    assert result.source == "test.log"
    assert result.sequences_scored == len(truth)
    assert result.lines_without_session == 0
    assert result.report.parsed == len(sample["test"].read_text().splitlines())
    assert result.settings["format"] == "hdfs" and result.settings["detector"] == "log-ensemble"


def test_most_structural_anomalies_are_found(result: DetectionResult, truth: dict[str, tuple[bool, str]]) -> None:
    flagged = {c.locator["sequence"] for c in result.candidates}
    for kind in STRUCTURAL:
        blocks = [b for b, (_, k) in truth.items() if k == kind]
        assert len(blocks) >= 5
        recall = sum(b in flagged for b in blocks) / len(blocks)
        assert recall >= 0.9, f"{kind}: recall {recall:.2f}"
    normal = [b for b, (anomalous, k) in truth.items() if not anomalous and k != PROMPT_INJECTION]
    false_alarms = sum(b in flagged for b in normal)
    assert false_alarms <= 0.02 * len(normal), f"{false_alarms} of {len(normal)} normal blocks flagged"


def test_candidates_are_ranked_and_point_at_their_block(result: DetectionResult, sample: dict[str, Path],
                                                        fitted_pipeline: tuple[LogPipeline, object]) -> None:
    lines = sample["test"].read_text().splitlines()
    members = getattr(fitted_pipeline[0].detector, "members", [])
    noisy = any(0 < m.threshold_ < 1e-9 for m in members)  # a known bug: PCA threshold at float noise
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    assert len({c.id for c in result.candidates}) == len(result.candidates)
    for cand in result.candidates:
        block = cand.locator["sequence"]
        assert cand.id == f"test.log:{block}" and cand.source == "test.log"
        assert block in lines[cand.locator["first_line"] - 1] and block in lines[cand.locator["last_line"] - 1]
        if not noisy:  # else: see test_contract.test_threshold_is_not_numerical_noise
            assert cand.evidence, f"{cand.id} has no evidence"
        for ev in cand.evidence:
            if ev.kind is not EvidenceKind.LOG_LINES:
                continue
            for pos, line_no in enumerate(ev.data["lines"]):
                text = lines[line_no - 1]
                assert block in _BLOCK.findall(text), f"{cand.id} {ev.id} cites line {line_no}: {text}"
                assert text.endswith(ev.data["text"][pos])  # the excerpt is that line's message


def test_anomalous_candidates_have_evidence(result: DetectionResult, truth: dict[str, tuple[bool, str]]) -> None:
    found = [c for c in result.candidates if truth[c.locator["sequence"]][0]]
    assert found
    for cand in found:
        assert cand.evidence, f"{cand.id} ({truth[cand.locator['sequence']][1]}) has no evidence"
        assert all(ev.data.get("lines") for ev in cand.evidence if ev.kind is EvidenceKind.LOG_LINES)


def test_injected_text_stays_inside_evidence(result: DetectionResult, truth: dict[str, tuple[bool, str]]) -> None:
    # The injected block has a never-seen line shape, so it is flagged; its text reaches the
    # evidence only as data (excerpt), and summaries stay single-line.
    injected = [b for b, (_, k) in truth.items() if k == PROMPT_INJECTION]
    assert len(injected) == 1 and truth[injected[0]][0] is False
    cands = [c for c in result.candidates if c.locator["sequence"] == injected[0]]
    assert cands, "the injected block should reach the explainer as a candidate"
    texts = [t for ev in cands[0].evidence for t in ev.data.get("text", [])]
    assert any("IGNORE PREVIOUS INSTRUCTIONS" in t for t in texts)
    assert all("\n" not in ev.summary for ev in cands[0].evidence)


def test_line_range_limits_detection(fitted_pipeline: tuple[LogPipeline, object], sample: dict[str, Path]) -> None:
    pipeline, _ = fitted_pipeline
    part = pipeline.detect(sample["test"], line_range=(1, 200), source="part")
    assert part.candidates or part.sequences_scored
    for cand in part.candidates:
        assert cand.locator["last_line"] <= 200
        for ev in cand.evidence:
            assert all(1 <= n <= 200 for n in ev.data.get("lines", []))
