"""Relative context discrepancy: each window compared with its neighbouring windows.

The idea behind TimeRCD: whether a stretch is anomalous depends on its context, so
instead of comparing a window to a global model, compare it with the windows just
before it. For window ``W_t = [t - w + 1, t]`` and context ``C_t`` = the ``k * w``
rows before it, the discrepancy per variable is

``|mean(W) - mean(C)| / s  +  |log(std(W) + s0) - log(std(C) + s0)|``

with ``s = max(std(C), s0)`` and ``s0`` a floor from the training noise scale, so a
flat context does not turn every wiggle into an alarm. It catches level shifts,
variance changes and collective anomalies that are normal in value range but
abnormal relative to their neighbourhood. Causal (only past rows), O(T) via cumsums.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detectors.timeseries.base import Analysis, TimeSeriesDetector, robust_scale
from detectors.timeseries.series import TimeSeries


def _window_stats(x: np.ndarray, w: int, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of rows ``[t - lag - w + 1, t - lag]`` for every ``t`` (clipped at 0)."""
    T = x.shape[0]
    c1 = np.vstack([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])
    c2 = np.vstack([np.zeros((1, x.shape[1])), np.cumsum(x * x, axis=0)])
    end = np.clip(np.arange(T) - lag + 1, 0, T)
    start = np.clip(end - w, 0, T)
    n = np.maximum(end - start, 1)[:, None]
    m = (c1[end] - c1[start]) / n
    v = np.maximum((c2[end] - c2[start]) / n - m * m, 0.0)
    return m, np.sqrt(v)


class ContextDiscrepancyDetector(TimeSeriesDetector):
    """Discrepancy of the latest window from the windows just before it.

    Args:
        window: Rows per window ``w``.
        n_context: Context length in windows ``k``.
        **kw: See :class:`TimeSeriesDetector`.
    """

    name = "ts-context"

    def __init__(self, *, window: int = 16, n_context: int = 8, merge_gap: int = 5, min_segment: int = 1,
                 dynamic: bool = False, artifact_dir: str | None = None, contamination: float = 0.001,
                 threshold: float | None = None) -> None:
        super().__init__(merge_gap=merge_gap, min_segment=min_segment, dynamic=dynamic, artifact_dir=artifact_dir,
                         contamination=contamination, threshold=threshold)
        if window < 2 or n_context < 1:
            raise ValueError(f"window must be >= 2 and n_context >= 1, got {window!r}, {n_context!r}")
        self.window = window
        self.n_context = n_context

    def required_length(self) -> int:
        return self.window * (self.n_context + 1)

    def _fit_series(self, items: Sequence[TimeSeries]) -> None:
        diffs = np.concatenate([np.diff(s.values, axis=0) for s in items])
        self.floor_ = robust_scale(diffs) / np.sqrt(2.0)  # noise std, from first differences

    def _analyse(self, series: TimeSeries) -> Analysis:
        x = series.values
        w = self.window
        mw, sw = _window_stats(x, w, 0)
        mc, sc = _window_stats(x, w * self.n_context, w)
        s0 = self.floor_
        s = np.maximum(sc, s0)
        d = np.abs(mw - mc) / s + np.abs(np.log(sw + s0) - np.log(sc + s0))
        d[: min(len(x), w * (self.n_context + 1) - 1)] = 0.0  # not enough context yet
        contrib = d * d
        return Analysis(np.sqrt(contrib.max(axis=1)), contrib, mc)
