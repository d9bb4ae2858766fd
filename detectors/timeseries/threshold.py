"""Label-free thresholds and score transforms shared by the time-series detectors.

* :func:`ewma` -- causal exponentially weighted mean via ``scipy.signal.lfilter``
  (O(T), vectorised; the building block of the fast residual detector).
* :func:`dynamic_threshold` -- telemanom's non-parametric dynamic threshold
  (Hundman et al., KDD 2018): choose ``eps = mean + z * std`` of the smoothed errors
  that best separates them, then prune sequences whose peak is not clearly above the
  next one. It uses only the scores, never labels.
* :func:`anomaly_likelihood` -- NAB/HTM's anomaly likelihood: how unusual the recent
  average score is given the scores of a long past window (causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter
from scipy.special import ndtr

from detectors.timeseries.segments import runs


def ewma(x: np.ndarray, span: float, *, axis: int = 0, init: np.ndarray | float | None = None) -> np.ndarray:
    """Causal EWMA with ``alpha = 2 / (span + 1)``; ``init`` is the state before row 0."""
    x = np.asarray(x, dtype=np.float64)
    if span <= 1:
        return x.copy()
    alpha = 2.0 / (span + 1.0)
    first = np.take(x, [0], axis=axis) if init is None else np.broadcast_to(
        np.asarray(init, dtype=float), np.take(x, [0], axis=axis).shape)
    zi = (1 - alpha) * first
    y, _ = lfilter([alpha], [1.0, -(1.0 - alpha)], x, axis=axis, zi=zi)
    return y


@dataclass(frozen=True)
class DynamicThreshold:
    """Result of telemanom's threshold search on one error series."""

    epsilon: float
    z: float
    mask: np.ndarray  # (T,) bool: points inside kept anomalous sequences (with buffer)
    n_sequences: int


def dynamic_threshold(errors: np.ndarray, *, z_range: tuple[float, float] = (2.5, 12.0), z_step: float = 0.5,
                      buffer: int = 100, max_sequences: int = 5, prune: float = 0.13,
                      min_error: float = 0.0) -> DynamicThreshold:
    """telemanom's dynamic threshold on smoothed errors ``errors`` (higher = worse).

    Args:
        errors: ``(T,)`` smoothed non-negative errors/scores.
        z_range, z_step: Candidate ``z`` for ``eps = mean + z * std``.
        buffer: Rows added around each exceedance before grouping (telemanom: 100).
        max_sequences: Guardrail: a cut producing more sequences is not chosen.
        prune: Minimum relative drop between successive sequence peaks (``p``).
        min_error: If no error exceeds this, nothing is flagged (telemanom skips
            channels whose errors are tiny).

    Returns:
        The chosen ``epsilon`` and the mask of points in the kept sequences.
    """
    e = np.nan_to_num(np.asarray(errors, dtype=float))
    T = len(e)
    mu, sd = float(e.mean()), float(e.std())
    empty = DynamicThreshold(float("inf"), float("nan"), np.zeros(T, dtype=bool), 0)
    if T == 0 or sd <= 0 or e.max() <= min_error:
        return empty
    best, best_z = -np.inf, None
    kernel = np.ones(2 * buffer + 1) if buffer > 0 else None
    for z in np.arange(z_range[0], z_range[1], z_step):
        eps = mu + z * sd
        above = e >= eps
        if not above.any():
            continue
        below = e[~above]
        if len(below) == 0:
            continue
        buf = np.convolve(above, kernel, mode="same") > 0 if kernel is not None else above
        n_anom = int(buf.sum())
        spans = runs(buf)
        n_seq = int(((spans[:, 1] - spans[:, 0]) > 0).sum())
        score = ((mu - below.mean()) / mu + (sd - below.std()) / sd) / (n_seq ** 2 + n_anom) if mu > 0 else 0.0
        if score >= best and n_seq <= max_sequences and n_anom < 0.5 * T:
            best, best_z = score, float(z)
    if best_z is None:
        return empty
    eps = mu + best_z * sd
    above = e >= eps
    buf = np.convolve(above, kernel, mode="same") > 0 if kernel is not None else above
    spans = runs(buf)
    peaks = np.array([e[a : b + 1].max() for a, b in spans])
    rest = e[~buf]
    non_anom_max = float(rest.max()) if len(rest) else 0.0
    order = np.argsort(-peaks, kind="stable")
    sorted_peaks = np.append(peaks[order], non_anom_max)
    keep_n = 0
    for i in range(len(peaks)):
        drop = (sorted_peaks[i] - sorted_peaks[i + 1]) / sorted_peaks[i] if sorted_peaks[i] > 0 else 0.0
        if drop >= prune:
            keep_n = i + 1  # everything up to the last clear drop is kept
    mask = np.zeros(T, dtype=bool)
    for k in order[:keep_n]:
        a, b = spans[k]
        mask[a : b + 1] = True
    return DynamicThreshold(float(eps), best_z, mask, int(keep_n))


def _rolling_sum(x: np.ndarray, w: int) -> np.ndarray:
    """Sum of the last ``w`` values (fewer at the start), causal, via cumsum."""
    c = np.concatenate(([0.0], np.cumsum(x)))
    idx = np.arange(1, len(x) + 1)
    return c[idx] - c[np.maximum(idx - w, 0)]


def anomaly_likelihood(scores: np.ndarray, *, short_window: int = 10, long_window: int = 8640,
                       learning: int = 300, min_std: float = 1e-4) -> np.ndarray:
    """NAB-style anomaly likelihood in [0, 1], causal.

    ``L_t = Phi((m_t - mu_t) / sigma_t)`` where ``m_t`` is the mean of the last
    ``short_window`` raw scores and ``mu_t, sigma_t`` the mean and std of the raw
    scores over the ``long_window`` before it. The first ``learning`` points get 0.5.
    """
    s = np.nan_to_num(np.asarray(scores, dtype=float))
    n = len(s)
    m = _rolling_sum(s, short_window) / np.minimum(np.arange(1, n + 1), short_window)
    # long-window stats over rows before t (exclusive), so a spike does not mask itself
    prev = np.concatenate(([0.0], s[:-1]))
    cnt = np.minimum(np.arange(n), long_window).astype(float)
    cnt[0] = 1.0
    s1 = _rolling_sum(prev, long_window)
    s2 = _rolling_sum(prev ** 2, long_window)
    mu = s1 / cnt
    var = np.maximum(s2 / cnt - mu ** 2, 0.0)
    sd = np.maximum(np.sqrt(var), min_std)
    out = ndtr((m - mu) / sd)
    out[: min(learning, n)] = 0.5
    return out
