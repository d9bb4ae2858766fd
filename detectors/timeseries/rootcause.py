"""Root-cause variables: each variable's share of a segment's anomaly score.

Every detector reports a per-point, per-variable contribution matrix ``C`` (T, D),
non-negative (e.g. squared robust z-score of the residual of that variable). As
OracleAD pinpoints root-cause variables from per-variable deviations, the share of
variable ``d`` in a segment is ``sum_t C[t, d] / sum_t sum_d C[t, d]`` over the
segment: it is additive, so shares sum to 1, and a variable that is off for the
whole segment outweighs one that only spikes once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Contributor:
    """One variable and its share of the segment's score."""

    name: str
    index: int
    share: float


def shares(contrib: np.ndarray, i0: int, i1: int) -> np.ndarray:
    """``(D,)`` shares of each variable over rows ``[i0, i1]`` (sum to 1)."""
    c = np.asarray(contrib[i0 : i1 + 1], dtype=float)
    tot = np.nansum(c, axis=0)
    s = float(tot.sum())
    if not np.isfinite(s) or s <= 0:
        return np.full(c.shape[1], 1.0 / c.shape[1])
    return tot / s


def top_contributors(contrib: np.ndarray, i0: int, i1: int, columns: tuple[str, ...], k: int = 5,
                     min_share: float = 0.01) -> list[Contributor]:
    """The ``k`` largest contributors over ``[i0, i1]`` (at least the first, whatever its share)."""
    sh = shares(contrib, i0, i1)
    order = np.argsort(-sh, kind="stable")[:k]
    out = [Contributor(columns[j], int(j), round(float(sh[j]), 4)) for j in order if sh[j] >= min_share]
    return out or [Contributor(columns[int(order[0])], int(order[0]), round(float(sh[order[0]]), 4))]
