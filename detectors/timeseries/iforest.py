"""Windowed Isolation Forest (scikit-learn): the classic baseline.

Each row ``t`` is described by the window of the last ``window`` rows of every
variable, centred on the window mean, plus the window mean and std (so both shape
and level changes are visible). The forest is fitted on windows of the normal
series; the score of row ``t`` is ``-score_samples`` of its window. Only complete
windows are features (at fit and at scoring alike): the first ``window - 1`` rows of
a series have no complete window of their own, so they take the score of the first
complete window, the earliest one that contains them (padding them with copies of
row 0 would make every series' start a flat, never-seen window). Isolation gives
no per-variable attribution, so the contribution matrix is a stated proxy: the
squared robust z-score of each variable's window mean against training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.ensemble import IsolationForest

from detectors.timeseries.base import Analysis, TimeSeriesDetector, robust_scale
from detectors.timeseries.series import TimeSeries


class WindowIForestDetector(TimeSeriesDetector):
    """Isolation Forest over sliding-window features.

    Args:
        window: Rows per window.
        n_estimators: Trees.
        max_train_windows: Training windows kept (evenly spaced) to bound fit time.
        shape_vars: Variables (first ones) whose full window shape is used; the rest
            contribute only mean and std (keeps 50-variable inputs small).
        random_state: Seed.
        **kw: See :class:`TimeSeriesDetector`.
    """

    name = "ts-iforest"

    def __init__(self, *, window: int = 16, n_estimators: int = 100, max_train_windows: int = 20000,
                 shape_vars: int = 4, random_state: int = 0, merge_gap: int = 5, min_segment: int = 1,
                 dynamic: bool = False, artifact_dir: str | None = None, contamination: float = 0.001,
                 threshold: float | None = None) -> None:
        super().__init__(merge_gap=merge_gap, min_segment=min_segment, dynamic=dynamic, artifact_dir=artifact_dir,
                         contamination=contamination, threshold=threshold)
        self.window = window
        self.n_estimators = n_estimators
        self.max_train_windows = max_train_windows
        self.shape_vars = shape_vars
        self.random_state = random_state

    def required_length(self) -> int:
        return self.window + 1

    def _features(self, x: np.ndarray) -> np.ndarray:
        """``(T - window + 1, F)`` features of the complete windows, the first ending at row ``window - 1``."""
        xs = (x - self.center_) / self.scale_
        win = sliding_window_view(xs, self.window, axis=0)  # (T - w + 1, D, w)
        mean = win.mean(axis=2)
        std = win.std(axis=2)
        shape = (win[:, : self.shape_vars, :] - mean[:, : self.shape_vars, None]).reshape(len(win), -1)
        return np.hstack([shape, mean, std])

    def _fit_series(self, items: Sequence[TimeSeries]) -> None:
        x = np.concatenate([s.values for s in items])
        self.center_ = np.median(x, axis=0)
        self.scale_ = robust_scale(x)
        feats = np.vstack([self._features(s.values) for s in items])
        if len(feats) > self.max_train_windows:
            feats = feats[np.linspace(0, len(feats) - 1, self.max_train_windows).astype(int)]
        self.forest_ = IsolationForest(n_estimators=self.n_estimators, random_state=self.random_state,
                                       n_jobs=1).fit(feats)

    def _window_scores(self, x: np.ndarray) -> np.ndarray:
        """Score of every complete window (the same windows fit learned from)."""
        return -self.forest_.score_samples(self._features(x))

    def _train_point_scores(self, items: Sequence[TimeSeries]) -> np.ndarray:
        # The threshold comes from complete windows only, as the forest was fitted on
        # (the first rows only repeat the first window's score).
        return np.concatenate([self._window_scores(s.values) for s in items])

    def _analyse(self, series: TimeSeries) -> Analysis:
        x = series.values
        w = self._window_scores(x)
        score = np.concatenate([np.full(self.window - 1, w[0]), w])  # first rows: first window containing them
        z = (x - self.center_) / self.scale_
        return Analysis(score, z * z, None)
