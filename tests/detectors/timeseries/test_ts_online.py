"""Online (streaming) scorers: causal, keep learning, and catch new behaviour once."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.timeseries import online
from detectors.timeseries.series import TimeSeries


def _periodic(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sin(2 * np.pi * np.arange(n) / 50) + 0.05 * rng.normal(size=n)


def test_context_surprise_learns_and_flags_new_transitions() -> None:
    x = np.tile([0.0, 1.0, 2.0, 3.0], 100)
    s = online.context_surprise(x, 40, n_bins=4)
    assert s[0] == 0.0 and s[1:8].max() > 0  # everything is new at first
    assert s[50:].max() == 0.0  # the cycle has been learned
    y = x.copy()
    y[302] = 0.0  # 1 -> 0 instead of 1 -> 2: a transition never seen
    assert online.context_surprise(y, 40, n_bins=4)[302] > 0.5


def test_online_scores_are_causal() -> None:
    x = _periodic(2000)
    y = x.copy()
    y[1500:] += 5.0
    for fn in (online.online_context_score, online.online_ensemble_score,
               lambda v, p: online.ew_surprise(v, p)):
        a, b = fn(x, 300), fn(y, 300)
        assert np.array_equal(a[:1500], b[:1500])


def test_online_context_flags_a_level_shift_once() -> None:
    x = _periodic(3000, 1)
    x[2000:] += 3.0  # leaves the range seen so far
    s = online.online_context_score(x, 450)
    assert 2000 <= int(np.argmax(s)) <= 2010 and s.max() >= 0.5
    # rest period: nothing at alarm level within the next 0.2 * probation rows
    assert (s[int(np.argmax(s)) + 1 : int(np.argmax(s)) + 90] < 0.5).all()
    assert s[450:2000].max() < 0.5  # the learned periodic part raises no alarm


def test_likelihood_filter_and_suppress() -> None:
    raw = np.concatenate([np.random.default_rng(3).uniform(0, 0.2, 1000), np.ones(20)])
    lik = online.nab_likelihood(raw, 200, log_scale=False)
    assert np.all((lik >= 0) & (lik <= 1)) and (lik[:200] == 0.5).all()
    red = lik >= 0.99999
    assert red.sum() >= 1 and not (red[1:] & red[:-1]).any()  # only the first red of a run stays
    s = online.suppress(np.array([0.1, 0.9, 0.9, 0.2, 0.9]), 0.5, 2)
    assert s.tolist() == [0.1, 0.9, 0.0, 0.0, 0.9]


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="1-D"):
        online.context_surprise(np.zeros((3, 2)), 2)
    with pytest.raises(ValueError, match="NaN"):
        online.ew_surprise(np.array([1.0, np.nan, 2.0]), 2)
    with pytest.raises(ValueError, match="-1"):
        online.suppress(np.zeros(3), 0.5, -1)
    with pytest.raises(ValueError, match="n_grids"):
        online.online_context_score(np.zeros(30), 10, n_grids=0)


def test_online_context_detector_contract() -> None:
    train = TimeSeries.from_array(_periodic(1500, 4), ["v"])
    x = _periodic(1000, 5)
    x[600:620] += 4.0
    normal_item = TimeSeries.from_array(_periodic(1000, 6), ["v"])
    det = online.OnlineContextDetector().fit([train])
    s = det.point_scores(TimeSeries.from_array(x, ["v"]))
    assert 600 <= int(np.argmax(s)) <= 605
    scores = det.score([normal_item, TimeSeries.from_array(x, ["v"])])
    assert scores[1] > scores[0]
    cands = det.detect([TimeSeries.from_array(x, ["v"], id="x")], "synthetic")
    assert cands and cands[0].locator["i0"] <= 605


def test_context_starts_restart_the_contexts() -> None:
    x = np.tile([0.0, 1.0, 2.0, 3.0], 50)
    y = np.concatenate([x, x[2:]])  # a second series that starts mid-cycle: 3 -> 2 was never seen
    joined = online.context_surprise(y, 40, n_bins=4)
    split = online.context_surprise(y, 40, n_bins=4, starts=(0, len(x)))
    assert joined[len(x)] > 0  # the seam looks like a new transition
    assert split[len(x) : len(x) + 8].max() == 0.0  # the same values, learned, seen as a new series
    assert np.array_equal(online.context_surprise(x, 40, n_bins=4, starts=(0,)), online.context_surprise(x, 40, n_bins=4))


def test_online_context_detector_no_seam_at_series_start() -> None:
    det = online.OnlineContextDetector().fit([TimeSeries.from_array(_periodic(1500, 7), ["v"])])
    state = (det.history_raw_.copy(), [[len(s) for s in sets] for sets in det.memory_])
    peaks = []
    for seed in range(8):
        x = _periodic(437, seed + 20)[37:]  # another phase than the end of training
        peaks.append(int(np.argmax(det.point_scores(TimeSeries.from_array(x, ["v"])))))
    assert sum(p < 60 for p in peaks) <= 4, peaks
    # scoring learned nothing that outlives the call
    assert np.array_equal(state[0], det.history_raw_)
    assert state[1] == [[len(s) for s in sets] for sets in det.memory_]
