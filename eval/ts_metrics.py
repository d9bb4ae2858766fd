"""Time-series anomaly metrics that survive the known traps (no point adjustment).

* :func:`point_prf` -- point-wise precision/recall/F1 **without** point adjustment
  (point adjustment makes random scores look state of the art: Kim et al., AAAI 2022).
* :func:`event_prf` -- telemanom's event-level counting (Hundman et al., KDD 2018):
  a true sequence is a TP if any predicted sequence overlaps it; a predicted
  sequence overlapping no true one is a FP; F-beta with beta = 0.5.
* :func:`vus_pr` -- Volume Under the PR Surface (Paparrizos et al., VLDB 2022):
  range-PR AUC with soft buffer labels ``sqrt(1 - dist / l)`` around each event,
  recall = min(TP / ((|y| + |y_l|) / 2), 1) x existence ratio, averaged over buffer
  lengths ``l`` in ``[0, max_buffer]``. Threshold-free.
* :func:`affiliation_prf` -- affiliation precision/recall (Huet et al., KDD 2022),
  discrete-time version: each point's distance to the nearest truth/prediction in
  its affiliation zone, turned into the probability that a random point of the
  zone would be at least as far.
* :func:`pate` -- proximity-aware AUC-PR in the spirit of PATE (Ghorbani et al.,
  2024): points in a pre-buffer (early warning) and post-buffer (delay) earn linearly
  decaying credit, and the AUC-PR is averaged over buffer sizes. This is our
  implementation of the idea, not the reference package; numbers are comparable
  within this project, not necessarily with the paper's tables.

All threshold sweeps are vectorised (sort once, cumulative sums), so a 400k-point
SMAP channel set is scored in well under a second per detector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from detectors.timeseries.segments import runs


def spans(y: np.ndarray) -> np.ndarray:
    """Inclusive ``(n, 2)`` spans of the True runs of a label vector."""
    return runs(np.asarray(y, dtype=bool))


def point_prf(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Point-wise precision, recall, F1 (no point adjustment)."""
    y, p = np.asarray(y, bool), np.asarray(pred, bool)
    tp = int((y & p).sum())
    prec = tp / p.sum() if p.sum() else 0.0
    rec = tp / y.sum() if y.sum() else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": float(prec), "recall": float(rec), "f1": float(f1)}


def best_point_f1(y: np.ndarray, scores: np.ndarray) -> float:
    """Best point-wise F1 over all thresholds (an *oracle* upper bound; label it so)."""
    y = np.asarray(y, bool)
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    tp = np.cumsum(y[order])
    k = np.arange(1, len(y) + 1)
    f1 = 2 * tp / (k + y.sum())
    return float(f1.max()) if y.any() else 0.0


def event_prf(true_spans: np.ndarray, pred_spans: np.ndarray, beta: float = 0.5) -> dict[str, float]:
    """telemanom event-level counts and precision/recall/F-beta.

    Args:
        true_spans, pred_spans: Inclusive ``(n, 2)`` index spans.
    """
    t = np.asarray(true_spans, dtype=np.int64).reshape(-1, 2)
    p = np.asarray(pred_spans, dtype=np.int64).reshape(-1, 2)
    if len(t) and len(p):
        overlap = (p[:, None, 0] <= t[None, :, 1]) & (p[:, None, 1] >= t[None, :, 0])
        tp = int(overlap.any(axis=0).sum())
        fp = int((~overlap.any(axis=1)).sum())
    else:
        tp, fp = 0, len(p)
    fn = len(t) - tp
    return {"tp": tp, "fp": fp, "fn": fn, **prf_from_counts(tp, fp, fn, beta)}


def prf_from_counts(tp: int, fp: int, fn: int, beta: float = 0.5) -> dict[str, float]:
    """Precision, recall, F-beta from counts (0 when undefined)."""
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    b2 = beta * beta
    f = (1 + b2) * prec * rec / (b2 * prec + rec) if prec + rec else 0.0
    return {"precision": float(prec), "recall": float(rec), f"f{beta:g}": float(f)}


# ----------------------------------------------------------------------- range PR AUC
def _range_pr_auc(y: np.ndarray, scores: np.ndarray, soft: np.ndarray, ext: np.ndarray,
                  n_thresholds: int = 200) -> float:
    """AUC-PR where TP = soft-label mass of detected points and recall has an existence term.

    ``soft`` is the soft label (1 in events, decaying in buffers), ``ext`` the
    extended events (where any detection counts for existence).
    """
    n = len(y)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    s_sorted = scores[order]
    # cut points: top-k sets at (distinct) quantile thresholds
    qs = np.unique(np.quantile(scores, np.linspace(0, 1, n_thresholds)))[::-1]
    ks = np.searchsorted(-s_sorted, -qs, side="right")  # rows with score >= q
    ks = np.unique(ks[ks > 0])
    tp = np.concatenate(([0.0], np.cumsum(soft[order])))[ks]
    prec = tp / ks
    p_new = (y.sum() + soft.sum()) / 2.0
    rec = np.minimum(tp / p_new, 1.0) if p_new > 0 else np.zeros(len(ks))
    ev = spans(ext)
    if len(ev):
        first = np.array([rank[a : b + 1].min() for a, b in ev])  # first detection rank per event
        exist = (first[None, :] < ks[:, None]).mean(axis=1)
    else:
        exist = np.zeros(len(ks))
    rec = rec * exist
    rec = np.concatenate(([0.0], rec))
    prec = np.concatenate(([1.0], prec))
    return float(np.sum(np.diff(rec) * (prec[1:] + prec[:-1]) / 2.0))


def _buffered(y: np.ndarray, before: int, after: int, weight: Callable[[np.ndarray, int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Soft labels with buffers ``before``/``after`` each event, weight(dist, size) in them."""
    n = len(y)
    soft = y.astype(float)
    ext = y.copy()
    for a, b in spans(y):
        if before > 0:
            lo = max(0, a - before)
            d = a - np.arange(lo, a)
            soft[lo:a] = np.maximum(soft[lo:a], weight(d, before))
            ext[lo:a] = True
        if after > 0:
            hi = min(n, b + 1 + after)
            d = np.arange(b + 1, hi) - b
            soft[b + 1 : hi] = np.maximum(soft[b + 1 : hi], weight(d, after))
            ext[b + 1 : hi] = True
    return soft, ext


def _mean_range_auc(y: np.ndarray, scores: np.ndarray,
                    buffers: Callable[[np.ndarray], Iterator[tuple[np.ndarray, np.ndarray]]],
                    n_thresholds: int) -> float:
    """Range-AUC-PR averaged over the (soft labels, extended mask) pairs ``buffers`` yields; NaN without anomalies."""
    y = np.asarray(y, bool)
    if not y.any():
        return float("nan")
    s = np.nan_to_num(np.asarray(scores, float))
    return float(np.mean([_range_pr_auc(y, s, soft, ext, n_thresholds) for soft, ext in buffers(y)]))


def vus_pr(y: np.ndarray, scores: np.ndarray, max_buffer: int = 100, n_buffers: int = 11,
           n_thresholds: int = 200) -> float:
    """VUS-PR: range-AUC-PR averaged over buffer lengths ``0..max_buffer``."""
    def buffers(y: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for l in np.linspace(0, max_buffer, n_buffers).astype(int):
            yield _buffered(y, l, l, lambda d, size: np.sqrt(np.clip(1 - d / (size + 1), 0, 1)))

    return _mean_range_auc(y, scores, buffers, n_thresholds)


def pate(y: np.ndarray, scores: np.ndarray, early: int = 50, delay: int = 50, n_buffers: int = 6,
         n_thresholds: int = 200) -> float:
    """Proximity-aware AUC-PR (PATE idea): linear credit in early/delay buffers, averaged over sizes."""
    def buffers(y: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for frac in np.linspace(0, 1, n_buffers):
            e, d = int(round(early * frac)), int(round(delay * frac))
            soft, ext = _buffered(y, e, 0, lambda dist, size: 1 - dist / (size + 1))
            soft2, ext2 = _buffered(y, 0, d, lambda dist, size: 1 - dist / (size + 1))
            yield np.maximum(soft, soft2), ext | ext2

    return _mean_range_auc(y, scores, buffers, n_thresholds)


# ----------------------------------------------------------------------- affiliation
def affiliation_prf(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Affiliation precision and recall (Huet et al. 2022), discrete time.

    Zones: the timeline is split at midpoints between consecutive true events; each
    zone is affiliated with its event. Precision = mean over zones holding
    predictions of the mean survival probability of their predicted points' distance
    to the event; recall = mean over zones of the mean survival probability of the
    event points' distance to the nearest prediction in the zone (0 if none).
    """
    y, p = np.asarray(y, bool), np.asarray(pred, bool)
    n = len(y)
    ev = spans(y)
    if len(ev) == 0:
        return {"precision": float("nan"), "recall": float("nan")}
    cuts = [0] + [int((ev[i, 1] + ev[i + 1, 0]) // 2) + 1 for i in range(len(ev) - 1)] + [n]
    precs, recs = [], []
    for j, (a, b) in enumerate(ev):
        z0, z1 = cuts[j], cuts[j + 1] - 1
        size = z1 - z0 + 1
        pidx = np.flatnonzero(p[z0 : z1 + 1]) + z0
        # precision: distance of each prediction to [a, b]; survival over the zone
        if len(pidx):
            d = np.maximum(np.maximum(a - pidx, pidx - b), 0)
            lo = np.maximum(z0, a - d + 1)
            hi = np.minimum(z1, b + d - 1)
            closer = np.where(d > 0, np.maximum(hi - lo + 1, 0), 0)
            precs.append(float(np.mean((size - closer) / size)))
            # recall: each event point's distance to the nearest prediction in the zone
            pts = np.arange(a, b + 1)
            pos = np.searchsorted(pidx, pts)
            left = pidx[np.clip(pos - 1, 0, len(pidx) - 1)]
            right = pidx[np.clip(pos, 0, len(pidx) - 1)]
            dist = np.minimum(np.abs(pts - left), np.abs(pts - right))
            lo = np.maximum(z0, pts - dist + 1)
            hi = np.minimum(z1, pts + dist - 1)
            closer = np.where(dist > 0, np.maximum(hi - lo + 1, 0), 0)
            recs.append(float(np.mean((size - closer) / size)))
        else:
            recs.append(0.0)
    return {"precision": float(np.mean(precs)) if precs else 0.0, "recall": float(np.mean(recs))}


def all_metrics(y: np.ndarray, scores: np.ndarray, pred: np.ndarray, *, max_buffer: int = 100,
                beta: float = 0.5) -> dict[str, float]:
    """Every metric of one (labels, scores, binary predictions) triple."""
    y = np.asarray(y, bool)
    pt = point_prf(y, pred)
    aff = affiliation_prf(y, pred)
    ev = event_prf(spans(y), spans(pred), beta)
    return {
        "point_precision": round(pt["precision"], 4), "point_recall": round(pt["recall"], 4),
        "point_f1": round(pt["f1"], 4),
        "event_precision": round(ev["precision"], 4), "event_recall": round(ev["recall"], 4),
        f"event_f{beta:g}": round(ev[f"f{beta:g}"], 4),
        "affiliation_precision": round(aff["precision"], 4), "affiliation_recall": round(aff["recall"], 4),
        "vus_pr": round(vus_pr(y, scores, max_buffer), 4), "pate": round(pate(y, scores), 4),
    }
