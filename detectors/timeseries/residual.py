"""Seasonal / forecasting residual with robust thresholds (point and contextual anomalies).

The forecast of row ``t`` uses only rows before it (causal, so it also runs
online): an EWMA level plus, when the training data is seasonal, the average
deviation from the level at the same phase in the last ``n_cycles`` periods. A
value that is normal globally but wrong for its phase (a contextual anomaly) thus
leaves a large residual. Residuals are divided by a robust per-variable scale (MAD
of training residuals), so the score is a robust z-score and ``z_d**2`` is each
variable's additive contribution (root cause).

Warm-up: during the first period of a series there is no past cycle yet, so the
forecast is the lagging level alone; during the second only one past cycle is
averaged (and the level's own start-up rows, see ``settle_rows``, are no cycle to
copy). A scale pooled over all training rows would make every fresh series (or
window of one) peak there. So the scale is learned *per seasonal depth* (how many
past cycles the forecast of a row could average: ``0 .. n_cycles``) from the
training residuals at that depth: the warm-up rows get the wider band that the
same forecast really had on normal data, and a series' start does not decide its
score. Without a seasonal term there is a single depth and a single scale.

Everything is a handful of vectorised passes (``lfilter`` for the EWMA, shifted
arrays for the seasonal term), which is why it scores millions of points/s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detectors.timeseries.base import Analysis, TimeSeriesDetector, robust_scale
from detectors.timeseries.series import TimeSeries
from detectors.timeseries.threshold import ewma

_MIN_DEPTH_ROWS = 20
"""Training residuals needed to learn the scale of one seasonal depth."""


def detect_period(x: np.ndarray, max_period: int, min_acf: float = 0.3) -> int | None:
    """Dominant period (lag of the highest ACF peak) of the columns of ``x``, or ``None``.

    The ACF is computed with an FFT on the de-meaned series and averaged over
    columns; a lag counts only if it is a local maximum above ``min_acf``.
    """
    T = x.shape[0]
    max_period = min(max_period, T // 3)
    if max_period < 4:
        return None
    z = x - x.mean(axis=0)
    var = (z ** 2).sum(axis=0)
    ok = var > 1e-12
    if not ok.any():
        return None
    n = 1 << int(np.ceil(np.log2(2 * T)))
    f = np.fft.rfft(z[:, ok], n=n, axis=0)
    acf = np.fft.irfft(f * np.conj(f), n=n, axis=0)[: max_period + 1] / var[ok]
    a = acf.mean(axis=1)
    lags = np.arange(2, max_period)
    peak = (a[lags] > a[lags - 1]) & (a[lags] >= a[lags + 1]) & (a[lags] > min_acf)
    if not peak.any():
        return None
    cand = lags[peak]
    return int(cand[np.argmax(a[cand])])


class ResidualDetector(TimeSeriesDetector):
    """Robust z-score of a causal seasonal forecast residual.

    Args:
        span: EWMA span of the level (rows).
        period: Seasonal period in rows; ``"auto"`` detects it from training data
            (ACF), ``None`` disables the seasonal term.
        max_period: Longest period considered by ``"auto"``.
        n_cycles: Past periods averaged for the seasonal term.
        smooth: EWMA span applied to squared z-scores (1 = none); smoothing trades
            point anomalies for sustained/collective ones (telemanom smooths errors).
        **kw: See :class:`TimeSeriesDetector`.
    """

    name = "ts-residual"

    def __init__(self, *, span: float = 10.0, period: int | str | None = "auto", max_period: int = 500,
                 n_cycles: int = 3, smooth: float = 1.0, merge_gap: int = 5, min_segment: int = 1,
                 dynamic: bool = False, artifact_dir: str | None = None, contamination: float = 0.001,
                 threshold: float | None = None) -> None:
        super().__init__(merge_gap=merge_gap, min_segment=min_segment, dynamic=dynamic, artifact_dir=artifact_dir,
                         contamination=contamination, threshold=threshold)
        if span < 1:
            raise ValueError(f"span must be >= 1, got {span!r}")
        if not (period is None or period == "auto" or (isinstance(period, int) and period >= 2)):
            raise ValueError(f"period must be 'auto', None or an int >= 2, got {period!r}")
        self.span = span
        self.period = period
        self.max_period = max_period
        self.n_cycles = n_cycles
        self.smooth = smooth

    def required_length(self) -> int:
        return 3

    @property
    def settle_rows(self) -> int:
        """Rows before the EWMA level has forgotten its start (its start-up error < 2%).

        The level starts at row 0's value, so its deviations in these rows are a
        start-up transient, not the seasonal shape: past cycles are used for the
        seasonal term only from this row on.
        """
        if self.span <= 1:
            return 1
        alpha = 2.0 / (self.span + 1.0)
        return max(1, int(np.ceil(np.log(0.02) / np.log(1.0 - alpha))))

    def _forecast(self, x: np.ndarray) -> np.ndarray:
        level = ewma(x, self.span)
        prev = np.empty_like(level)
        prev[0] = x[0]
        prev[1:] = level[:-1]
        p, w0, n = self.period_, self.settle_rows, x.shape[0]
        if p is None or n <= p + w0:
            return prev
        dev = x - prev
        seas = np.zeros_like(x)
        cnt = np.zeros((n, 1))
        for k in range(1, self.n_cycles + 1):
            lag = k * p
            if lag + w0 >= n:
                break
            seas[lag + w0 :] += dev[w0 : n - lag]  # row t uses row t - lag once that row had settled
            cnt[lag + w0 :] += 1.0
        return prev + seas / np.maximum(cnt, 1.0)

    def _depth(self, n: int) -> np.ndarray:
        """``(n,)`` past cycles averaged by the forecast of each row (0 = warm-up, no seasonal term)."""
        p, w0 = self.period_, self.settle_rows
        if p is None or n <= p + w0:
            return np.zeros(n, dtype=np.int64)
        return np.clip((np.arange(n) - w0) // p, 0, self.n_cycles)

    def _scale_rows(self, n: int) -> np.ndarray:
        """``(n, D)`` robust residual scale of each row, by its seasonal depth."""
        return self.scales_[self._depth(n)]

    def _fit_series(self, items: Sequence[TimeSeries]) -> None:
        longest = max(items, key=len)
        if self.period == "auto":
            self.period_ = detect_period(longest.values, self.max_period)
        else:
            self.period_ = self.period  # type: ignore[assignment]
        res = np.concatenate([s.values - self._forecast(s.values) for s in items])
        depth = np.concatenate([self._depth(len(s)) for s in items])
        n_depths = 1 if self.period_ is None else self.n_cycles + 1
        scales = np.empty((n_depths, res.shape[1]))
        for k in range(n_depths):
            rows = res[depth == k]
            if len(rows) >= _MIN_DEPTH_ROWS or k == 0:
                scales[k] = robust_scale(rows) if len(rows) else robust_scale(res)
            else:  # too little training data this deep: keep the (wider) band of the depth before
                scales[k] = scales[k - 1]
        self.scales_ = scales
        self.scale_ = scales[-1]  # the steady-state scale (full seasonal depth)

    def _analyse(self, series: TimeSeries) -> Analysis:
        x = series.values
        expected = self._forecast(x)
        z = (x - expected) / self._scale_rows(len(x))
        contrib = z * z
        if self.smooth > 1:
            contrib = ewma(contrib, self.smooth)
        score = np.sqrt(contrib.max(axis=1)) if contrib.shape[1] > 1 else np.sqrt(contrib[:, 0])
        return Analysis(score, contrib, expected)

    def fast_scores(self, x: np.ndarray) -> np.ndarray:
        """Point scores of a 1-D array with no per-variable outputs (the benchmark's hot path)."""
        x = np.asarray(x, dtype=np.float64)
        level = ewma(x, self.span)
        e = np.empty_like(x)
        e[0] = 0.0
        np.subtract(x[1:], level[:-1], out=e[1:])
        p, w0, n = self.period_, self.settle_rows, len(x)
        if p is not None and n > p + w0:
            seas = np.zeros_like(x)
            cnt = np.zeros_like(x)
            for k in range(1, self.n_cycles + 1):
                lag = k * p
                if lag + w0 >= n:
                    break
                seas[lag + w0 :] += e[w0 : n - lag]
                cnt[lag + w0 :] += 1.0
            e -= seas / np.maximum(cnt, 1.0)
        np.abs(e, out=e)
        if len(self.scales_) == 1:
            e /= float(self.scales_[0, 0])
        else:
            e /= self.scales_[self._depth(n), 0]
        if self.smooth > 1:
            e = np.sqrt(ewma(e * e, self.smooth))
        return e
