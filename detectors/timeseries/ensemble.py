"""Point-level ensemble of time-series detectors (max of threshold-normalised scores).

:class:`detectors.ensemble.MaxNormEnsemble` combines per-*item* scores; segments
need the same rule per *point*: each member's point scores are divided by its own
training threshold (1.0 = edge of normal for every member), and the ensemble point
score is their maximum (or mean). Contributions are the members' contribution
shares weighted by their normalised score, so root-cause shares stay meaningful;
``expected`` comes from the first member that has one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detectors.timeseries.base import Analysis, TimeSeriesDetector
from detectors.timeseries.series import TimeSeries


class TimeSeriesEnsemble(TimeSeriesDetector):
    """Max (or mean) of member point scores, each divided by the member's threshold.

    Args:
        members: Unfitted time-series detectors (registry names are resolved by
            :func:`detectors.registry.make_detector` for named ensembles).
        combine: ``"max"`` or ``"mean"``.
        **kw: See :class:`TimeSeriesDetector`.
    """

    name = "ts-ensemble"

    def __init__(self, members: Sequence[TimeSeriesDetector] = (), *, combine: str = "max", merge_gap: int = 5,
                 min_segment: int = 1, dynamic: bool = False, artifact_dir: str | None = None,
                 contamination: float = 0.001, threshold: float | None = None) -> None:
        super().__init__(merge_gap=merge_gap, min_segment=min_segment, dynamic=dynamic, artifact_dir=artifact_dir,
                         contamination=contamination, threshold=threshold)
        if not members:
            from detectors.timeseries.context import ContextDiscrepancyDetector
            from detectors.timeseries.residual import ResidualDetector

            members = (ResidualDetector(), ContextDiscrepancyDetector())
        if combine not in ("max", "mean"):
            raise ValueError(f"combine must be 'max' or 'mean', got {combine!r}")
        self.members = list(members)
        self.combine = combine

    def required_length(self) -> int:
        return max(m.required_length() for m in self.members)

    def _fit_series(self, items: Sequence[TimeSeries]) -> None:
        for m in self.members:
            m.fit(items)

    def _analyse(self, series: TimeSeries) -> Analysis:
        parts = [m._analyse(series) for m in self.members]
        norm = np.vstack([p.scores / (m.threshold_ if m.threshold_ > 0 else 1.0) for p, m in zip(parts, self.members)])
        score = norm.max(axis=0) if self.combine == "max" else norm.mean(axis=0)
        contrib = np.zeros_like(parts[0].contrib)
        for p, w in zip(parts, norm):
            tot = p.contrib.sum(axis=1, keepdims=True)
            contrib += np.where(tot > 0, p.contrib / np.where(tot > 0, tot, 1.0), 0.0) * np.maximum(w, 0)[:, None]
        expected = next((p.expected for p in parts if p.expected is not None), None)
        return Analysis(score, contrib, expected)

    def get_params(self) -> dict:
        return {"members": [{"name": m.name, **m.get_params()} for m in self.members], "combine": self.combine,
                "contamination": self.contamination, "threshold": self.threshold}
