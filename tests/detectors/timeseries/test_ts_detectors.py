"""Every time-series detector under the contract; segments, evidence, plots, root cause."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from detectors.base import NotFittedError
from detectors.records import Candidate, EvidenceKind, Modality
from detectors.registry import make_detector
from detectors.timeseries.segments import merge_runs, runs, segments
from detectors.timeseries.series import TimeSeries
from detectors.timeseries.severity import severity
from detectors.timeseries.threshold import anomaly_likelihood, dynamic_threshold, ewma
from eval.rootcause import attribute
from eval.synth_ts import contract_items, make_case

FAST = ("ts-residual", "ts-crossvar", "ts-context", "ts-iforest", "ts-ensemble")


@pytest.fixture(scope="module")
def items() -> tuple[list[TimeSeries], list[TimeSeries], list[bool]]:
    return contract_items(0)


@pytest.mark.parametrize("name", FAST)
def test_contract(name: str, items: tuple) -> None:
    normal, test, labels = items
    det = make_detector(name)
    with pytest.raises(NotFittedError):
        det.score(test)
    assert det.fit(normal) is det
    s1 = det.score(test)
    assert s1.shape == (len(test),) and np.isfinite(s1).all()
    assert np.array_equal(s1, det.score(test))  # pure
    if name not in ("ts-iforest", "ts-context"):  # baseline / level-change detector: see test_context_level_shift
        assert roc_auc_score(labels, s1) >= 0.8, name
    cands = det.detect(test, "synthetic")
    assert all(isinstance(c, Candidate) and c.modality == Modality.TIMESERIES for c in cands)
    for c in cands[:3]:
        ev = c.evidence[0]
        assert ev.kind == EvidenceKind.SEGMENT
        assert {"t0", "t1", "top_variables", "normal_range", "variables", "severity"} <= set(ev.data)
        assert abs(sum(v["share"] for v in ev.data["top_variables"]) - 1.0) <= 0.2
        assert Candidate.from_json(c.to_json()) == c


def test_context_level_shift() -> None:
    rng = np.random.default_rng(2)
    train = TimeSeries.from_array(rng.normal(0, 1, 1000), ["v"])
    x = rng.normal(0, 1, 800)
    x[400:460] += 3.0  # inside the global range of a wider series, but a jump vs its context
    det = make_detector("ts-context").fit([train])
    s = det.point_scores(TimeSeries.from_array(x, ["v"]))
    assert 400 <= int(np.argmax(s)) <= 430 and s.max() > det.threshold_


@pytest.mark.skipif(not os.environ.get("RUN_SLOW_TS"), reason="numba JIT of stumpy takes ~60 s on 2 cores; set RUN_SLOW_TS=1")
def test_matrix_profile_small() -> None:
    rng = np.random.default_rng(1)
    t = np.arange(600)
    train = TimeSeries.from_array(np.sin(2 * np.pi * t / 50) + 0.05 * rng.normal(size=600), ["v"])
    x = np.sin(2 * np.pi * t[:400] / 50) + 0.05 * rng.normal(size=400)
    x[200:230] = 0.3  # a flat stretch: a discord, within the normal value range
    det = make_detector("ts-matrix-profile", m=25).fit([train])
    s = det.point_scores(TimeSeries.from_array(x, ["v"]))
    assert 195 <= int(np.argmax(s)) <= 235
    assert s[200:230].max() > det.threshold_


def test_residual_finds_spike_and_contextual() -> None:
    t = np.arange(2000)
    rng = np.random.default_rng(0)
    base = 10 * np.sin(2 * np.pi * t / 100) + rng.normal(0, 0.2, 2000)
    train = TimeSeries.from_array(base[:1000], ["cpu"])
    x = base[1000:].copy()
    x[300] += 5          # point anomaly
    x[625:630] = 10.0 * np.sin(2 * np.pi * np.arange(650, 655) / 100) * -1  # wrong phase, normal range
    det = make_detector("ts-residual").fit([train])
    assert det.period_ == 100
    segs = det.segments(TimeSeries.from_array(x, ["cpu"]))
    assert any(s.i0 <= 300 <= s.i1 for s in segs)
    assert any(s.i0 <= 627 <= s.i1 + 2 for s in segs)
    # The first period has no seasonal term yet: it must not be flagged (it was, at ~12 against a
    # threshold inflated to ~12 by the same warm-up residuals of the training series). With the
    # honest threshold (~3.3 = the 0.999 quantile of 1000 training points) a few single noise points
    # may cross it, but only just, far below the two real anomalies (~17 and ~40).
    assert all(s.i0 >= 100 for s in segs)
    real = [s for s in segs if s.i0 <= 300 <= s.i1 or s.i0 <= 627 <= s.i1 + 2]
    others = [s for s in segs if s not in real]
    assert len(others) <= 3 and all(s.peak_score < 1.5 * det.threshold_ < min(r.peak_score for r in real)
                                    for s in others)


def test_plot_artifact_and_root_cause(tmp_path: Path) -> None:
    case = make_case(3, n_vars=20, n_faults=6)
    det = make_detector("ts-crossvar", artifact_dir=str(tmp_path)).fit([case.train])
    cands = det.detect([case.test], "synthetic.csv")
    assert cands and all(c.evidence[0].artifact for c in cands)
    png = Path(cands[0].evidence[0].artifact)
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    found = [ok for _, ok in attribute(cands, case) if ok is not None]
    assert len(found) >= 5 and sum(found) / len(found) >= 0.9


def test_root_cause_top1_over_seeds() -> None:
    """>= 90% top-1 on 20+ correlated variables with faults in known variables."""
    found: list[bool] = []
    for seed in range(3):
        case = make_case(seed, n_vars=24)
        det = make_detector("ts-crossvar").fit([case.train])
        found += [ok for _, ok in attribute(det.detect([case.test], "s"), case) if ok is not None]
    assert len(found) >= 30 and sum(found) / len(found) >= 0.9


def test_segments_and_helpers() -> None:
    assert runs(np.array([0, 1, 1, 0, 1], bool)).tolist() == [[1, 2], [4, 4]]
    assert merge_runs(np.array([[1, 2], [4, 4], [10, 11]]), 1).tolist() == [[1, 4], [10, 11]]
    s = np.array([0, 5, 0, 0, 3, 3, 3, 0, 0, 0, 9.0])
    segs = segments(s, 2.0, merge_gap=0, min_length=2)
    assert [(g.i0, g.i1) for g in segs] == [(1, 1), (4, 6), (10, 10)]  # 1-point peaks >= 2x threshold kept
    segs = segments(s, 4.0, merge_gap=0, min_length=2)
    assert [(g.i0, g.i1) for g in segs] == [(10, 10)]
    assert np.allclose(ewma(np.ones(5), 3), 1.0)
    e = np.abs(np.random.default_rng(0).normal(size=3000)) * 0.1
    e[1500:1520] += 5
    dt = dynamic_threshold(e, buffer=10)
    assert dt.mask[1500:1520].all() and dt.mask.sum() < 60
    lk = anomaly_likelihood(np.r_[np.zeros(500) + 0.1 * np.random.default_rng(1).random(500), np.ones(10)], learning=100)
    assert lk[-1] > 0.99 and lk[200] < 0.99
    assert severity(10, 1, 100, out_of_range=True).level == "critical"
    assert severity(1.1, 1, 1).level == "low"


def test_get_params_json() -> None:
    det = make_detector("ts-ensemble")
    json.dumps(det.get_params())


def test_iforest_scores_only_complete_windows() -> None:
    rng = np.random.default_rng(3)
    t = np.arange(1500)
    train = TimeSeries.from_array(np.sin(2 * np.pi * t / 50) + 0.1 * rng.normal(size=1500), ["v"])
    det = make_detector("ts-iforest", n_estimators=30).fit([train])
    x = TimeSeries.from_array(np.sin(2 * np.pi * (t[:300] + 17) / 50) + 0.1 * rng.normal(size=300), ["v"])
    s = det.point_scores(x)
    assert s.shape == (300,)
    assert np.all(s[: det.window - 1] == s[det.window - 1])  # first rows: the first complete window
    assert det.train_point_scores_summary_["n"] == 1500 - det.window + 1  # threshold from complete windows


def test_residual_warmup_band_is_wider_and_windows_do_not_peak_at_start() -> None:
    rng = np.random.default_rng(4)
    t = np.arange(3000)
    x = 5 * np.sin(2 * np.pi * t / 60) + 0.2 * rng.normal(size=3000)
    det = make_detector("ts-residual").fit([TimeSeries.from_array(x[:1500], ["v"])])
    assert det.period_ == 60
    assert np.all(np.diff(det.scales_[:, 0]) <= 0)  # fewer past cycles, wider band
    wins = TimeSeries.from_array(x[1500:], ["v"]).windows(300, 150)
    at_start = [int(np.argmax(det.point_scores(w))) < 80 for w in wins]
    assert np.mean(at_start) <= 0.5, at_start
    assert det.fast_scores(x[1500:]) == pytest.approx(det.point_scores(TimeSeries.from_array(x[1500:], ["v"])))
