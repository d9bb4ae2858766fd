"""Per-point flags -> merged segments ``[i0, i1]`` (both ends inclusive)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Local row span ``[i0, i1]`` (inclusive) and where its peak is."""

    i0: int
    i1: int
    peak: int
    peak_score: float

    @property
    def length(self) -> int:
        """Rows in the segment."""
        return self.i1 - self.i0 + 1


def runs(mask: np.ndarray) -> np.ndarray:
    """``(n, 2)`` inclusive start/end of every run of True in ``mask``."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.zeros((0, 2), dtype=np.int64)
    d = np.diff(np.concatenate(([0], m.view(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1) - 1
    return np.column_stack([starts, ends]).astype(np.int64)


def merge_runs(spans: np.ndarray, gap: int) -> np.ndarray:
    """Merge spans separated by at most ``gap`` rows (so one event is one segment)."""
    if len(spans) == 0 or gap <= 0:
        return spans
    keep = np.concatenate(([True], spans[1:, 0] - spans[:-1, 1] - 1 > gap))
    group = np.cumsum(keep) - 1
    out = np.zeros((int(group[-1]) + 1, 2), dtype=np.int64)
    out[:, 0] = spans[keep, 0]
    np.maximum.at(out[:, 1], group, spans[:, 1])
    return out


def segments(scores: np.ndarray, threshold: float | np.ndarray, *, merge_gap: int = 0,
             min_length: int = 1, pad: int = 0) -> list[Segment]:
    """Segments where ``scores > threshold``, merged across short gaps.

    Args:
        scores: ``(T,)`` point scores.
        threshold: Scalar or per-point threshold.
        merge_gap: Spans separated by at most this many rows become one.
        min_length: Shorter merged spans are dropped, unless the peak is at least
            twice the threshold (a sharp one-point spike is still an anomaly).
        pad: Rows added on both sides (clipped to the series).
    """
    s = np.nan_to_num(np.asarray(scores, dtype=float), nan=-np.inf)
    thr = np.broadcast_to(np.asarray(threshold, dtype=float), s.shape)
    spans = merge_runs(runs(s > thr), merge_gap)
    out: list[Segment] = []
    for i0, i1 in spans:
        seg = s[i0 : i1 + 1]
        k = int(np.argmax(seg))
        peak = float(seg[k])
        t = float(thr[i0 + k])
        if i1 - i0 + 1 < min_length and not peak >= 2 * t:
            continue
        out.append(Segment(max(0, int(i0) - pad), min(len(s) - 1, int(i1) + pad), int(i0) + k, peak))
    return out
