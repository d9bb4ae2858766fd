"""The NAB scorer reproduces NAB's published per-file windowedGaussian scores.

Uses three small windowedGaussian result files shipped under NAB's MIT licence in
tests/data/nab/ (see the README and LICENSE there).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eval.nab import PROFILES, prepare_file, probationary_length, scaled_sigmoid, score_corpus, sweep, window_indices

DATA = Path(__file__).resolve().parents[1] / "data" / "nab"


def _files() -> dict[str, tuple[pd.DataFrame, list]]:
    wins = json.loads((DATA / "combined_windows_subset.json").read_text())
    out = {}
    for key, w in wins.items():
        cat, name = key.split("/")
        out[key] = (pd.read_csv(DATA / "windowedGaussian" / cat / f"windowedGaussian_{name}"), w)
    return out


@pytest.mark.parametrize("profile", ["reward_low_FP_rate", "reward_low_FN_rate"])
def test_per_file_scores_match_published(profile: str) -> None:
    ref = pd.read_csv(DATA / "windowedGaussian_scores_subset.csv")
    ref = ref[ref.Profile == profile]
    files = _files()
    assert len(ref) == 3
    for row in ref.itertuples():
        df, w = files[row.File]
        f = prepare_file(df.anomaly_score.to_numpy(float), window_indices(pd.to_datetime(df.timestamp).to_numpy(), w))
        got = score_corpus([f], PROFILES[profile], row.Threshold)["raw"]
        assert got == pytest.approx(row.Score, abs=1e-6), row.File


def test_sigmoid_and_sweep_basics() -> None:
    assert scaled_sigmoid(np.array([-1.0]))[0] == pytest.approx(0.98661, abs=1e-5)
    assert scaled_sigmoid(np.array([3.5]))[0] == -1.0
    # 100 rows, probation 15; one window [50, 59]; detection at row 50 = perfect
    s = np.zeros(100)
    s[50] = 1.0
    f = prepare_file(s, [(50, 59)])
    r = score_corpus([f], PROFILES["standard"])
    assert r["score"] == pytest.approx(100.0)
    th, tot = sweep([f], PROFILES["standard"])
    assert tot[0] == -1.0  # nothing flagged: one missed window
