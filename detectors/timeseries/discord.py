"""Subsequence discords with the matrix profile (stumpy): collective anomalies.

A subsequence of length ``m`` is a discord when its z-normalised distance to its
nearest neighbour is large. Two modes, both computed by :func:`stumpy.stump`:

* ``"ab"`` (default): nearest neighbour among the *training* subsequences (an
  AB-join), so "unusual" means "unlike anything seen in normal data";
* ``"left"``: nearest neighbour among earlier subsequences of the same series
  (train prepended), which is causal and suits streaming benchmarks like NAB.

A row's score is the largest distance of the subsequences covering it, divided by
``sqrt(2m)`` so scores are comparable across ``m``. Cost is quadratic, so use it
where offline batch cost is acceptable (about 1.7k points/s on a long self-join
here); every variable is scored separately and contributes its squared distance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from detectors.timeseries.base import Analysis, TimeSeriesDetector
from detectors.timeseries.series import TimeSeries


def _znorm_windows(x: np.ndarray, m: int) -> np.ndarray:
    w = sliding_window_view(x, m)
    mu = w.mean(axis=1, keepdims=True)
    sd = w.std(axis=1, keepdims=True)
    return (w - mu) / np.where(sd > 1e-8, sd, 1.0)


def left_profile(x: np.ndarray, m: int) -> np.ndarray:
    """Distance of each subsequence to its nearest *earlier* subsequence (``inf`` if none)."""
    import stumpy

    mp = stumpy.stump(x, m)
    left = mp[:, 2].astype(np.int64)
    z = _znorm_windows(x, m)
    out = np.full(len(z), np.inf)
    ok = left >= 0
    out[ok] = np.sqrt(np.maximum(((z[ok] - z[left[ok]]) ** 2).sum(axis=1), 0.0))
    return out


class MatrixProfileDetector(TimeSeriesDetector):
    """Discord distance per row from stumpy's matrix profile.

    Args:
        m: Subsequence length.
        mode: ``"ab"`` (join against training) or ``"left"`` (causal self-join).
        max_vars: Score only the first ``max_vars`` variables (cost is per variable).
        **kw: See :class:`TimeSeriesDetector`.
    """

    name = "ts-matrix-profile"

    def __init__(self, *, m: int = 64, mode: str = "ab", max_vars: int = 8, merge_gap: int = 5,
                 min_segment: int = 1, dynamic: bool = False, artifact_dir: str | None = None,
                 contamination: float = 0.001, threshold: float | None = None) -> None:
        super().__init__(merge_gap=merge_gap, min_segment=min_segment, dynamic=dynamic, artifact_dir=artifact_dir,
                         contamination=contamination, threshold=threshold)
        if mode not in ("ab", "left"):
            raise ValueError(f"mode must be 'ab' or 'left', got {mode!r}")
        if m < 4:
            raise ValueError(f"m must be >= 4, got {m!r}")
        self.m = m
        self.mode = mode
        self.max_vars = max_vars

    def required_length(self) -> int:
        return self.m + 1

    def _fit_series(self, items: Sequence[TimeSeries]) -> None:
        self.train_ = [s.values[:, : self.max_vars].copy() for s in items]

    def _profile(self, x: np.ndarray, j: int, exclude_self: bool = False) -> np.ndarray:
        import warnings

        import stumpy

        warnings.filterwarnings("ignore", message=".*(self-join|smaller than 1e-06).*", category=UserWarning)
        m = self.m
        if exclude_self:
            prof = stumpy.stump(x, m)[:, 0].astype(float)
        elif self.mode == "left":
            ref = np.concatenate([t[:, j] for t in self.train_])
            full = np.concatenate([ref, x])
            prof = left_profile(full, m)[len(ref):]
        else:
            prof = np.full(len(x) - m + 1, np.inf)
            for t in self.train_:
                if len(t) >= m:
                    prof = np.minimum(prof, stumpy.stump(x, m, T_B=t[:, j], ignore_trivial=False)[:, 0].astype(float))
        prof = np.where(np.isfinite(prof), prof, 0.0) / np.sqrt(2 * m)
        # row score = max over subsequences covering it; subsequence i covers rows i..i+m-1
        padded = np.concatenate([np.zeros(m - 1), prof, np.zeros(m - 1)])
        return sliding_window_view(padded, m).max(axis=1)

    def _analyse_impl(self, series: TimeSeries, exclude_self: bool = False) -> Analysis:
        x = series.values
        d = min(x.shape[1], self.max_vars)
        contrib = np.zeros((len(x), x.shape[1]))
        for j in range(d):
            contrib[:, j] = self._profile(x[:, j], j, exclude_self) ** 2
        return Analysis(np.sqrt(contrib.max(axis=1)), contrib, None)

    def _analyse(self, series: TimeSeries) -> Analysis:
        return self._analyse_impl(series)

    def _train_point_scores(self, items: Sequence[TimeSeries]) -> np.ndarray:
        # In-sample distances are zero (each training subsequence matches itself): use self-joins.
        return np.concatenate([self._analyse_impl(s, exclude_self=True).scores for s in items])
