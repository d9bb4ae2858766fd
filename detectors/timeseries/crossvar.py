"""Multivariate root-cause attribution: each variable predicted from all the others.

For correlated telemetry, most of a variable's movement is shared with its
neighbours (same load, same cycle), so a per-variable forecast residual is noisy
and a fault of a few sensor-noise units hides in it. Regressing each variable on
all others at the same instant removes the shared part and leaves roughly the
sensor's own noise. With the (ridge-regularised) precision matrix ``Theta`` of the
training data, all ``D`` regressions come in one matrix product:
``residual = (x - mu) @ Theta / diag(Theta)``.

Why the top contributor is the faulty variable: a fault ``f`` in variable ``k``
gives robust z-scores ``z_k ~ f * sqrt(Theta_kk)`` and ``z_j ~ f * Theta_kj /
sqrt(Theta_jj)`` for the others, whose ratio to ``z_k`` is a partial correlation,
below 1 in absolute value. Shares are ``z_d**2`` summed over the segment (as
OracleAD attributes its score to the variables whose deviation causes it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detectors.timeseries.base import Analysis, TimeSeriesDetector, robust_scale
from detectors.timeseries.series import TimeSeries, TimeSeriesInputError
from detectors.timeseries.threshold import ewma


class CrossVariableDetector(TimeSeriesDetector):
    """Robust z-score of each variable's residual given all the other variables.

    Args:
        ridge: Ridge added to the covariance diagonal, as a share of the mean variance.
        smooth: EWMA span on squared z-scores (1 = none).
        **kw: See :class:`TimeSeriesDetector`.
    """

    name = "ts-crossvar"

    def __init__(self, *, ridge: float = 1e-3, smooth: float = 1.0, merge_gap: int = 5, min_segment: int = 1,
                 dynamic: bool = False, artifact_dir: str | None = None, contamination: float = 0.001,
                 threshold: float | None = None) -> None:
        super().__init__(merge_gap=merge_gap, min_segment=min_segment, dynamic=dynamic, artifact_dir=artifact_dir,
                         contamination=contamination, threshold=threshold)
        self.ridge = ridge
        self.smooth = smooth

    def _fit_series(self, items: Sequence[TimeSeries]) -> None:
        x = np.concatenate([s.values for s in items])
        if x.shape[1] < 2:
            raise TimeSeriesInputError(
                f"{self.name} needs at least 2 variables, series {items[0].id!r} has 1 ({items[0].columns[0]!r})")
        self.mean_ = x.mean(axis=0)
        sd = x.std(axis=0)
        self.sd_ = np.where(sd > 1e-12, sd, 1.0)
        xs = (x - self.mean_) / self.sd_
        cov = np.cov(xs, rowvar=False) + self.ridge * np.eye(x.shape[1])
        theta = np.linalg.inv(cov)
        self.coef_ = theta / np.diag(theta)[None, :]  # column d: residual weights for variable d
        res = xs @ self.coef_
        self.scale_ = robust_scale(res)

    def _analyse(self, series: TimeSeries) -> Analysis:
        xs = (series.values - self.mean_) / self.sd_
        res = xs @ self.coef_
        expected = series.values - res * self.sd_
        z = res / self.scale_
        contrib = z * z
        if self.smooth > 1:
            contrib = ewma(contrib, self.smooth)
        return Analysis(np.sqrt(contrib.max(axis=1)), contrib, expected)
