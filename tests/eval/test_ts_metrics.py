"""Each time-series metric on tiny hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from eval.ts_metrics import affiliation_prf, best_point_f1, event_prf, pate, point_prf, spans, vus_pr


def test_point_prf_no_adjustment() -> None:
    y = np.array([0, 1, 1, 1, 0, 0], bool)
    p = np.array([0, 1, 0, 0, 0, 1], bool)
    r = point_prf(y, p)
    assert r["precision"] == 0.5 and r["recall"] == pytest.approx(1 / 3) and r["f1"] == pytest.approx(0.4)
    assert best_point_f1(y, np.array([0, 3, 2, 1, 0, 0.0])) == 1.0


def test_event_level_telemanom() -> None:
    true = np.array([[10, 20], [50, 60], [90, 95]])
    pred = np.array([[15, 16], [18, 30], [70, 75]])
    r = event_prf(true, pred)
    # two predictions hit the first event (1 TP, no FP), one hits nothing (FP); 2 misses
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 2)
    assert r["precision"] == 0.5 and r["recall"] == pytest.approx(1 / 3)
    assert r["f0.5"] == pytest.approx(1.25 * 0.5 * (1 / 3) / (0.25 * 0.5 + 1 / 3))


def test_affiliation_hand_checked() -> None:
    y = np.zeros(10, bool)
    y[4] = True
    assert affiliation_prf(y, y) == {"precision": 1.0, "recall": 1.0}
    p = np.zeros(10, bool)
    p[6] = True
    # zone is the whole line [0, 9]; the prediction is 2 away from the event: points at distance >= 2
    # from row 4 are rows 0-2 and 6-9 -> 7 of 10
    r = affiliation_prf(y, p)
    assert r["precision"] == pytest.approx(0.7) and r["recall"] == pytest.approx(0.7)
    assert affiliation_prf(y, np.zeros(10, bool))["recall"] == 0.0


def test_vus_and_pate_order() -> None:
    rng = np.random.default_rng(0)
    y = np.zeros(2000, bool)
    y[300:340] = True
    y[1200:1210] = True
    good = y + 0.1 * rng.random(2000)
    near = np.roll(y, 15) + 0.1 * rng.random(2000)
    rand = rng.random(2000)
    for metric in (vus_pr, pate):
        assert metric(y, good) > metric(y, near) > metric(y, rand)
    # with no buffer, a perfect ranking is a perfect range-PR
    assert vus_pr(y, y.astype(float), max_buffer=0, n_buffers=1) == pytest.approx(1.0)


def test_spans() -> None:
    assert spans(np.array([1, 1, 0, 1], bool)).tolist() == [[0, 1], [3, 3]]
