"""Seasonal / forecasting residual with robust thresholds (point and contextual anomalies).

The forecast of row ``t`` uses only rows before it (causal, so it also runs
online): an EWMA level plus, when the training data is seasonal, the median
deviation from the level at the same phase in the last ``n_cycles`` periods. A
value that is normal globally but wrong for its phase (a contextual anomaly) thus
leaves a large residual. Residuals are divided by a robust per-variable scale (MAD
of training residuals), so the score is a robust z-score and ``z_d**2`` is each
variable's additive contribution (root cause).

Warm-up: during the first period of a series there is no past cycle yet, so the
forecast is the lagging level alone; during the second only one past cycle is
used (and the level's own start-up rows, see ``settle_rows``, are no cycle to
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
    """Robust z-score of a causal seasonal forecast residual (median of past cycles, per-depth scale).

    Args:
        span: EWMA span of the level (rows).
        period: Seasonal period in rows; ``"auto"`` detects it from training data
            (ACF), ``None`` disables the seasonal term.
        max_period: Longest period considered by ``"auto"``.
        n_cycles: Past periods whose median is the seasonal term.
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

    def _seasonal(self, dev: np.ndarray) -> np.ndarray:
        """Seasonal term of every row: the median deviation at the same phase in the past cycles.

        Row ``t`` at depth ``k`` (see :meth:`_depth`) takes the median of ``dev[t - j * p]``
        for ``j = 1..k``; with three cycles one anomalous cycle is outvoted instead of
        echoing one and two periods later. Rows at depth 0 get 0.
        """
        n = dev.shape[0]
        seas = np.zeros_like(dev)
        p, w0 = self.period_, self.settle_rows
        if p is None:
            return seas
        for k in range(1, self.n_cycles + 1):
            a = w0 + k * p
            if a >= n:
                break
            b = n if k == self.n_cycles else min(n, a + p)
            past = [dev[a - j * p : b - j * p] for j in range(1, k + 1)]
            seas[a:b] = past[0] if k == 1 else np.median(np.stack(past), axis=0)
        return seas

    def _forecast(self, x: np.ndarray) -> np.ndarray:
        level = ewma(x, self.span)
        prev = np.empty_like(level)
        prev[0] = x[0]
        prev[1:] = level[:-1]
        return prev + self._seasonal(x - prev)

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
        # Fewer past cycles never make the forecast more precise: a shallower depth's band is
        # at least as wide as every deeper one's (a quiet first period of the training data
        # must not make the warm-up of every scored series hypersensitive).
        self.scales_ = np.maximum.accumulate(scales[::-1], axis=0)[::-1].copy()
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
        e -= self._seasonal(e)
        np.abs(e, out=e)
        if len(self.scales_) == 1:
            e /= float(self.scales_[0, 0])
        else:
            e /= self.scales_[self._depth(len(x)), 0]
        if self.smooth > 1:
            e = np.sqrt(ewma(e * e, self.smooth))
        return e
