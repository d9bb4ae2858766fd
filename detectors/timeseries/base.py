"""The time-series wrapper around the detector contract: point scores -> segments -> candidates.

A detector family implements :meth:`TimeSeriesDetector._fit_series` and
:meth:`TimeSeriesDetector._analyse` (per-point score, expected values and the
per-variable contribution matrix of one series). This class then gives it:

* the contract (``score(items)`` = largest point score per item, see the package
  docstring for why items are whole series or windows of one);
* a point-level threshold learned from *training* point scores (the
  ``1 - contamination`` quantile), or telemanom's label-free dynamic threshold when
  ``dynamic=True``;
* merged segments ``[t0, t1]``, severity, root-cause shares, ``segment`` evidence
  and an optional PNG per segment (``artifact_dir``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from detectors.base import Detector
from detectors.records import Candidate, Evidence, EvidenceKind, Modality
from detectors.timeseries.rootcause import top_contributors
from detectors.timeseries.segments import Segment, runs, segments
from detectors.timeseries.series import TimeSeries, TimeSeriesInputError
from detectors.timeseries.severity import severity
from detectors.timeseries.threshold import dynamic_threshold


@dataclass(frozen=True)
class Analysis:
    """Per-point output of a detector on one series.

    Attributes:
        scores: ``(T,)`` point scores, higher = more anomalous, finite.
        contrib: ``(T, D)`` non-negative per-variable contribution to the score.
        expected: ``(T, D)`` what the model expected to observe (``None`` if the
            family has no notion of an expected value, e.g. isolation).
    """

    scores: np.ndarray
    contrib: np.ndarray
    expected: np.ndarray | None = None


class TimeSeriesDetector(Detector[TimeSeries]):
    """Base of every time-series detector (items are :class:`TimeSeries`).

    Args:
        merge_gap: Segments separated by at most this many rows are merged.
        min_segment: Segments shorter than this are dropped unless their peak is at
            least twice the threshold.
        dynamic: Use telemanom's dynamic threshold on each scored series (label-free)
            instead of the threshold learned at fit.
        artifact_dir: When set, ``detect`` writes one PNG per segment there.
        contamination: Share of training *points* above the learned threshold.
        threshold: Explicit point-score threshold.
    """

    modality: ClassVar[Modality] = Modality.TIMESERIES

    def __init__(self, *, merge_gap: int = 5, min_segment: int = 1, dynamic: bool = False,
                 artifact_dir: str | None = None, contamination: float = 0.001,
                 threshold: float | None = None) -> None:
        super().__init__(contamination=contamination, threshold=threshold)
        self.merge_gap = merge_gap
        self.min_segment = min_segment
        self.dynamic = dynamic
        self.artifact_dir = artifact_dir

    # -- what a family implements -------------------------------------------------------
    def required_length(self) -> int:
        """Fewest rows a series needs (its window/context)."""
        return 2

    def _fit_series(self, items: Sequence[TimeSeries]) -> None:
        raise NotImplementedError

    def _analyse(self, series: TimeSeries) -> Analysis:
        raise NotImplementedError

    def _train_point_scores(self, items: Sequence[TimeSeries]) -> np.ndarray:
        """Point scores of the training data used for the threshold (override when in-sample is optimistic)."""
        return np.concatenate([self._analyse(s).scores for s in items])

    # -- the contract ---------------------------------------------------------------------
    def _check_series(self, s: TimeSeries) -> None:
        if not isinstance(s, TimeSeries):
            raise TimeSeriesInputError(f"{type(self).__name__} takes TimeSeries items, got {type(s).__name__}")
        s.require_length(self.required_length(), f"{self.name}")
        if hasattr(self, "columns_") and s.n_vars != len(self.columns_):
            raise TimeSeriesInputError(
                f"series {s.id!r} has {s.n_vars} columns {list(s.columns)[:5]}; {self.name} was fitted on "
                f"{len(self.columns_)} columns {list(self.columns_)[:5]}; rule: same variables at fit and score")
        if not np.isfinite(s.values).all():
            bad = int(np.flatnonzero(~np.isfinite(s.values).all(axis=0))[0])
            raise TimeSeriesInputError(
                f"series {s.id!r} column {s.columns[bad]!r} has NaN/inf; rule: repair with detectors.timeseries.ingest first")

    def _fit(self, items: Sequence[TimeSeries]) -> None:
        for s in items:
            self._check_series(s)
        widths = {s.n_vars for s in items}
        if len(widths) != 1:
            raise TimeSeriesInputError(f"training series have different numbers of columns {sorted(widths)}")
        self.columns_ = tuple(items[0].columns)
        pooled = np.concatenate([s.values for s in items])
        self.normal_range_ = np.quantile(pooled, [0.001, 0.999], axis=0)
        self._fit_series(items)

    def _learned_threshold(self) -> float | None:
        scores = self._train_point_scores(self._fit_items) if hasattr(self, "_fit_items") else self.train_scores_
        self.train_point_scores_summary_ = {
            "n": int(len(scores)), "p50": float(np.median(scores)), "p99": float(np.quantile(scores, 0.99)),
            "max": float(np.max(scores))}
        if self.contamination == 0.0:
            return float(np.max(scores))
        return float(np.quantile(scores, 1.0 - self.contamination))

    def fit(self, normal: Sequence[TimeSeries]) -> "TimeSeriesDetector":
        """Learn normal behaviour and the point threshold from normal series (see the contract)."""
        self._fit_items = list(normal) if normal is not None else []
        try:
            return super().fit(normal)
        finally:
            del self._fit_items

    def analyse(self, series: TimeSeries) -> Analysis:
        """Per-point scores, contributions and expected values of one series (pure)."""
        self._check_fitted()
        self._check_series(series)
        return self._analyse(series)

    def point_scores(self, series: TimeSeries) -> np.ndarray:
        """``(T,)`` point scores of one series (pure)."""
        return self.analyse(series).scores

    def _score(self, items: Sequence[TimeSeries]) -> np.ndarray:
        out = np.empty(len(items))
        for i, s in enumerate(items):
            self._check_series(s)
            out[i] = float(np.max(self._analyse(s).scores))
        return out

    # -- segments and candidates ----------------------------------------------------------
    def point_threshold(self, scores: np.ndarray) -> tuple[float, np.ndarray]:
        """Threshold and anomaly mask for one series' point scores."""
        if self.dynamic:
            dt = dynamic_threshold(scores)
            return (dt.epsilon if np.isfinite(dt.epsilon) else self.threshold_), dt.mask
        return self.threshold_, scores > self.threshold_

    def segments(self, series: TimeSeries, analysis: Analysis | None = None) -> list[Segment]:
        """Merged anomalous segments of one series."""
        a = analysis or self.analyse(series)
        thr, mask = self.point_threshold(a.scores)
        if self.dynamic:
            spans = runs(mask)
            out = []
            for i0, i1 in spans:
                k = int(i0 + np.argmax(a.scores[i0 : i1 + 1]))
                out.append(Segment(int(i0), int(i1), k, float(a.scores[k])))
            return out
        return segments(a.scores, thr, merge_gap=self.merge_gap, min_length=self.min_segment)

    def detect(self, items: Sequence[TimeSeries], source: str) -> list[Candidate]:
        """One candidate per merged segment of every item, most anomalous first."""
        self._check_fitted()
        out: list[Candidate] = []
        for s in self._check_items(items, "detect"):
            out.extend(self.detect_series(s, source))
        out.sort(key=lambda c: c.score, reverse=True)
        return out

    def detect_series(self, series: TimeSeries, source: str, *, artifact_dir: str | Path | None = None) -> list[Candidate]:
        """Candidates (with segment evidence and optional plots) for one series."""
        a = self.analyse(series)
        thr, _ = self.point_threshold(a.scores)
        art = artifact_dir if artifact_dir is not None else self.artifact_dir
        return [self.segment_candidate(series, a, seg, source, thr, art) for seg in self.segments(series, a)]

    def segment_candidate(self, series: TimeSeries, a: Analysis, seg: Segment, source: str, thr: float,
                          artifact_dir: str | Path | None = None) -> Candidate:
        """Build the candidate of one segment: locator, severity, evidence, plot."""
        i0, i1, pk = seg.i0, seg.i1, seg.peak
        top = top_contributors(a.contrib, i0, i1, series.columns)
        lo, hi = self.normal_range_
        obs = series.values[i0 : i1 + 1]
        out_vars = np.flatnonzero(((obs < lo) | (obs > hi)).any(axis=0))
        sev = severity(seg.peak_score, thr, seg.length, out_of_range=len(out_vars) > 0,
                       n_vars_out_of_range=len(out_vars))
        variables: list[dict[str, Any]] = []
        for c in top:
            j = c.index
            exp = a.expected[i0 : i1 + 1, j] if a.expected is not None else None
            variables.append({
                "name": c.name, "share": c.share,
                "observed_mean": _r(obs[:, j].mean()), "expected_mean": _r(exp.mean()) if exp is not None else None,
                "observed_at_peak": _r(series.values[pk, j]),
                "expected_at_peak": _r(a.expected[pk, j]) if a.expected is not None else None,
                "normal_range": [_r(lo[j]), _r(hi[j])],
            })
        t0, t1, tp = series.label(i0), series.label(i1), series.label(pk)
        v0 = variables[0]
        expected_txt = f" vs expected {v0['expected_at_peak']:.4g}" if v0["expected_at_peak"] is not None else ""
        summary = (f"{t0} .. {t1} ({seg.length} points), peak score {seg.peak_score:.3g} (threshold {thr:.3g}) at {tp}; "
                   f"top variable {v0['name']} ({v0['share']:.0%}) observed {v0['observed_at_peak']:.4g}{expected_txt}, "
                   f"normal range [{v0['normal_range'][0]:.4g}, {v0['normal_range'][1]:.4g}]; severity {sev.level}")
        artifact = None
        if artifact_dir is not None:
            from detectors.timeseries.plot import plot_segment  # matplotlib only when plots are asked for

            fname = f"{_safe(source)}_{_safe(series.id)}_{series.offset + i0}_{series.offset + i1}_{self.name}.png"
            artifact = str(plot_segment(Path(artifact_dir) / fname, series.values, a.expected, series.columns,
                                        [c.index for c in top], i0, i1, normal_range=self.normal_range_,
                                        title=f"{series.id} {t0}..{t1} [{self.name}]", scores=a.scores,
                                        threshold=thr, x_labels=series.timestamps))
        data: dict[str, Any] = {
            "t0": t0, "t1": t1, "i0": series.offset + i0, "i1": series.offset + i1, "length": seg.length,
            "peak_at": tp, "peak_score": _r(seg.peak_score), "threshold": _r(thr),
            "variables": variables,
            "top_variables": [{"name": c.name, "share": c.share} for c in top],
            "normal_range": {c.name: [_r(lo[c.index]), _r(hi[c.index])] for c in top},
            "variables_out_of_range": [series.columns[j] for j in out_vars[:10]],
            "severity": sev.level, "severity_score": sev.score, "severity_rules": list(sev.rules),
            "detector": self.name,
        }
        ev = Evidence(id="E1", kind=EvidenceKind.SEGMENT, summary=summary, data=data, artifact=artifact)
        return Candidate(
            id=f"{source}:{series.id}:{series.offset + i0}-{series.offset + i1}", source=source,
            modality=self.modality,
            locator={"series": series.id, "t0": t0, "t1": t1, "i0": series.offset + i0, "i1": series.offset + i1,
                     "severity": sev.level, "top_variable": v0["name"]},
            score=float(seg.peak_score), threshold=float(thr), detector=self.name, evidence=(ev,))

    # -- item-level (contract) helpers ----------------------------------------------------
    def item_id(self, item: TimeSeries) -> str:
        return item.id

    def locator(self, item: TimeSeries) -> dict[str, Any]:
        return {"series": item.id, "t0": item.label(0), "t1": item.label(len(item) - 1),
                "i0": item.offset, "i1": item.offset + len(item) - 1}

    def evidence(self, item: TimeSeries, score: float) -> tuple[Evidence, ...]:
        """Item-level evidence = the evidence of the item's strongest segment (if any)."""
        a = self._analyse(item)
        k = int(np.argmax(a.scores))
        segs = [s for s in self.segments(item, a) if s.i0 <= k <= s.i1] or [Segment(k, k, k, float(a.scores[k]))]
        return self.segment_candidate(item, a, segs[0], item.source or "item", self.threshold_).evidence


def _r(x: float) -> float:
    return round(float(x), 6)


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))[-60:]


def robust_scale(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """1.4826 * MAD per column, falling back to the std, then to a tiny positive floor."""
    med = np.median(x, axis=axis, keepdims=True)
    mad = 1.4826 * np.median(np.abs(x - med), axis=axis)
    sd = np.std(x, axis=axis)
    out = np.where(mad > 1e-12, mad, sd)
    return np.where(out > 1e-12, out, 1e-6)
