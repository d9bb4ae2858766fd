"""Online (streaming) anomaly scorers for NAB-style data: they keep learning at every row.

Why a separate module: the detectors in :mod:`.residual` / :mod:`.context` learn
their noise scale from a training part once; on NAB's drifting series that makes
them fire continuously. Everything here updates its state after scoring each row,
so row ``t``'s score uses rows ``< t`` only and the model follows drift.

Pieces (all causal, O(T)):

* :func:`context_surprise` -- a contextual detector in the spirit of CAD-OSE
  (Smirnov, NAB 2016): values are discretised into open-ended bins whose width
  comes from the probationary range (a value far outside it simply lands in a new
  bin), and for each context order ``k = 1..K`` we remember which bin followed the
  last ``k`` bins. The raw score is the share of orders whose (context, next bin)
  transition was never seen -- "how much of the present was unpredictable from
  the recent past".
* :func:`ew_surprise` -- a multi-scale adaptive z-score: exponentially decaying mean
  and variance at several spans; the raw score is the largest tail probability
  over the spans, so both sharp spikes (short span) and slow shifts (long span)
  register, and the scale keeps adapting.
* :func:`nab_likelihood` -- NAB/HTM's anomaly likelihood: a short moving average of
  raw scores compared, by a Gaussian tail, with the mean and spread of those
  averages over a long past window re-estimated every ``reestimate`` rows, then
  NAB's filter that keeps only the first "red" row of a run, and the log scale.
* :func:`spatial_novelty` -- HTM's NAB entry flags values beyond the range seen so
  far by more than a tolerance; we keep that rule (with the running range).
* :func:`suppress` -- CAD-OSE's rest period: after an alarm-level score the output is
  silenced for ``rest`` rows, because NAB rewards only the first detection in a
  window and charges every further one outside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numba import njit

from detectors.timeseries.base import Analysis, TimeSeriesDetector
from detectors.timeseries.series import TimeSeries

_LOG_FLOOR = math.log(1.0000000001 - 0.9999999999)


def _check(x: np.ndarray, probation: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"online scorers take a 1-D series, got shape {arr.shape}")
    if probation < 1:
        raise ValueError(f"probation must be >= 1 row, got {probation!r}")
    if not np.isfinite(arr).all():
        raise ValueError(f"series has {int((~np.isfinite(arr)).sum())} NaN/inf values; repair it first")
    return arr


def bin_width(x: np.ndarray, probation: int, n_bins: int) -> float:
    """Bin width = probationary range / ``n_bins`` (a tiny positive floor for flat starts)."""
    head = x[: max(probation, 2)]
    rng = float(head.max() - head.min())
    if rng <= 0:
        rng = max(abs(float(head[0])) * 0.1, 1e-6)
    return rng / n_bins


def context_bins(x: np.ndarray, probation: int, n_bins: int, offset: float = 0.0, *,
                 origin: float | None = None, width: float | None = None) -> list[int]:
    """Open-ended integer bins of ``x``: width from the probationary range, origin its minimum.

    ``origin`` / ``width`` given = a grid learned earlier (e.g. on training data).
    """
    head = x[: max(probation, 2)]
    w = bin_width(x, probation, n_bins) if width is None else width
    lo = float(head.min()) if origin is None else origin
    return np.floor((x - lo) / w + offset).astype(np.int64).tolist()


def surprise_of_bins(bins: Sequence[int], seen: set[tuple[int, ...]], *, max_order: int = 6,
                     phase: Sequence[int] | None = None, starts: Sequence[int] = (0,)) -> np.ndarray:
    """The core of :func:`context_surprise` on given bins; learns into ``seen`` (mutated).

    ``starts`` are rows where a new series begins: no context reaches back across
    one (the rows before it belong to another series, so "what followed them" is
    no transition of this one); a start row itself scores 0.
    """
    ph = [0] * len(bins) if phase is None else list(phase)
    if len(ph) != len(bins):
        raise ValueError(f"phase has {len(ph)} rows, series has {len(bins)}")
    begin = np.zeros(len(bins), dtype=np.int64)
    for r in sorted(set(int(r) for r in starts if 0 <= r < len(bins))):
        begin[r:] = r
    out = np.zeros(len(bins))
    for t in range(1, len(bins)):
        b = bins[t]
        new = 0
        orders = min(max_order, t - int(begin[t]))
        for k in range(1, orders + 1):
            key = (k, ph[t], b, *bins[t - k : t])
            if key not in seen:
                new += 1
                seen.add(key)
        out[t] = new / max_order
    return out


def context_surprise(x: np.ndarray, probation: int, *, n_bins: int = 8, max_order: int = 6,
                     diff: bool = False, phase: np.ndarray | None = None, offset: float = 0.0,
                     starts: Sequence[int] = (0,)) -> np.ndarray:
    """Share of context orders ``1..max_order`` whose transition to the current bin is new.

    Args:
        x: ``(T,)`` values.
        probation: Rows whose range sets the bin width (learning still goes on after).
        n_bins: Bins across the probationary range; bins are open-ended integers.
        max_order: Longest context (in rows).
        diff: Discretise first differences instead of values (sees shape, not level).
        offset: Shift of the bin grid in bins (``0.5`` = edges where another grid
            has centres; an ensemble of shifted grids is robust to values
            hovering at a bin edge).
        phase: Optional ``(T,)`` integer calendar phase (e.g. hour of day); when given,
            every context also carries the phase, so a value normal for the series
            but new for this time of day is a surprise (HTM's NAB entry encodes the
            time of day for the same reason).
        starts: Rows where a new series begins (``x`` is several series one after
            the other); contexts never span a start. Default: one series.

    Returns:
        ``(T,)`` raw scores in ``[0, 1]`` (0 for the first row).
    """
    x = _check(x, probation)
    z = np.diff(x, prepend=x[0]) if diff else x
    bins = context_bins(z, probation, n_bins, offset)
    ph = None if phase is None else np.asarray(phase, dtype=np.int64).tolist()
    return surprise_of_bins(bins, set(), max_order=max_order, phase=ph, starts=starts)


@njit(cache=True)
def _ew_tail(x: np.ndarray, alphas: np.ndarray, warm: int) -> np.ndarray:
    n = x.shape[0]
    k = alphas.shape[0]
    m = np.full(k, x[0])
    v = np.zeros(k)
    out = np.zeros(n)
    scale0 = 0.0
    for t in range(1, n):
        if t < warm:  # typical step size so far: floor for the variances
            scale0 += abs(x[t] - x[t - 1])
        floor = (scale0 / min(t, warm)) ** 2 * 1e-2 + 1e-12
        best = 0.0
        for j in range(k):
            d = x[t] - m[j]
            z = abs(d) / math.sqrt(v[j] + floor)
            if z > best:
                best = z
            a = alphas[j]
            m[j] += a * d
            v[j] = (1.0 - a) * (v[j] + a * d * d)
        out[t] = best
    return out


def ew_surprise(x: np.ndarray, probation: int, *, spans: Sequence[float] = (8.0, 64.0, 512.0)) -> np.ndarray:
    """Largest |z| over exponentially weighted (mean, variance) at several spans, before updating.

    Returns:
        ``(T,)`` raw scores ``>= 0`` (unbounded; feed them to :func:`nab_likelihood`).
    """
    x = _check(x, probation)
    if any(s < 1 for s in spans):
        raise ValueError(f"spans must be >= 1, got {list(spans)!r}")
    alphas = np.array([2.0 / (s + 1.0) for s in spans])
    return _ew_tail(x, alphas, max(probation, 2))


@njit(cache=True)
def _likelihood(raw: np.ndarray, short: int, long: int, skip: int, learning: int, reestimate: int,
                two_sided: bool) -> np.ndarray:
    n = raw.shape[0]
    avg = np.zeros(n)
    acc = 0.0
    for t in range(n):
        acc += raw[t]
        if t >= short:
            acc -= raw[t - short]
        avg[t] = acc / min(t + 1, short)
    out = np.full(n, 0.5)
    mu = 0.0
    sd = 1.0
    last = -1
    for t in range(n):
        if t < learning:
            continue
        if last < 0 or t - last >= reestimate:
            lo = max(skip, t - long)
            s1 = 0.0
            s2 = 0.0
            for i in range(lo, t):
                s1 += avg[i]
                s2 += avg[i] * avg[i]
            c = max(t - lo, 1)
            mu = s1 / c
            var = s2 / c - mu * mu
            if mu < 0.03:  # NAB's lower bounds on the fitted Gaussian
                mu = 0.03
            if var < 0.0003:
                var = 0.0003
            sd = math.sqrt(var)
            last = t
        zz = (avg[t] - mu) / sd
        if two_sided:
            zz = abs(zz)
        out[t] = 1.0 - 0.5 * math.erfc(zz / math.sqrt(2.0))  # 1 - Q(z): 1 = very unusual
    return out


def nab_likelihood(raw: np.ndarray, probation: int, *, short: int = 10, long: int = 8640,
                   reestimate: int = 100, red: float = 0.99999, yellow: float = 0.999,
                   log_scale: bool = True, two_sided: bool = True) -> np.ndarray:
    """NAB's anomaly likelihood of raw scores, filtered and (optionally) on NAB's log scale.

    Args:
        raw: ``(T,)`` raw anomaly scores.
        probation: Rows before the first estimate (they get 0.5); as in NAB's HTM
            entry, the first half of them is left out of the estimate because the
            model is still learning there and its scores say little about normal.
        short: Moving-average length of the raw scores.
        long: Past rows whose averaged scores set the Gaussian.
        reestimate: Rows between re-estimates of that Gaussian.
        red, yellow: NAB's filter: of consecutive likelihoods ``>= red`` only the
            first stays, the rest become ``yellow`` (repeat alarms are not news).
        log_scale: Return NAB's ``log(1.0000000001 - L) / log(1e-10)`` (monotone).
        two_sided: NAB's tail probability reflects averages below the mean, so an
            unusually *quiet* stretch is unusual too.

    Returns:
        ``(T,)`` scores in ``[0, 1]``.
    """
    r = np.nan_to_num(np.asarray(raw, dtype=np.float64))
    if short < 1 or long < 1 or reestimate < 1:
        raise ValueError(f"short, long and reestimate must be >= 1, got {short!r}, {long!r}, {reestimate!r}")
    p = max(probation, 2)
    lik = _likelihood(r, short, long, p // 2, p, reestimate, two_sided)
    red_now = lik >= red
    prev_red = np.concatenate(([False], red_now[:-1]))
    lik = np.where(red_now & prev_red, yellow, lik)
    if log_scale:
        lik = np.log(1.0000000001 - lik) / _LOG_FLOOR
    return lik


def spatial_novelty(x: np.ndarray, probation: int, tolerance: float = 0.05) -> np.ndarray:
    """1 where a value leaves the running [min, max] by more than ``tolerance`` * range, else 0."""
    x = _check(x, probation)
    hi = np.maximum.accumulate(x)
    lo = np.minimum.accumulate(x)
    phi = np.concatenate(([x[0]], hi[:-1]))
    plo = np.concatenate(([x[0]], lo[:-1]))
    rng = phi - plo
    out = ((x > phi + tolerance * rng) | (x < plo - tolerance * rng)) & (rng > 0)
    out[: max(probation, 2)] = False
    return out.astype(float)


@njit(cache=True)
def _suppress(s: np.ndarray, trigger: np.ndarray, level: float, rest: int) -> np.ndarray:
    out = s.copy()
    quiet_until = -1
    for t in range(s.shape[0]):
        if t <= quiet_until:
            out[t] = 0.0
        elif trigger[t] >= level:
            quiet_until = t + rest
    return out


def suppress(scores: np.ndarray, level: float, rest: int, trigger: np.ndarray | None = None) -> np.ndarray:
    """Zero the ``rest`` rows after any row whose ``trigger`` (default: the score) reaches ``level``.

    CAD-OSE's rest period: NAB credits only the first detection in a window and
    charges every further one outside it, so once an alarm is raised the next
    ``rest`` rows are silenced.
    """
    if rest < 0:
        raise ValueError(f"rest must be >= 0 rows, got {rest!r}")
    s = np.asarray(scores, dtype=np.float64)
    trig = s if trigger is None else np.asarray(trigger, dtype=np.float64)
    if trig.shape != s.shape:
        raise ValueError(f"trigger shape {trig.shape} differs from scores shape {s.shape}")
    return _suppress(s, trig, float(level), int(rest))


def online_context_score(x: np.ndarray, probation: int, *, n_grids: int = 3, n_bins: int = 8, max_order: int = 6,
                         rest_fraction: float = 0.2, red_level: float = 0.5) -> np.ndarray:
    """The NAB entry ``ts-online-context``: shifted-grid context ensemble -> likelihood -> novelty -> rest.

    ``n_grids`` context models see the same values through bin grids shifted by
    ``1 / n_grids`` of a bin; their raw surprises are averaged, so a value that only
    crosses an edge of one grid is not news, while a truly new transition is new in
    all of them. Then NAB's likelihood (log scale), HTM's spatial-novelty rule and
    CAD-OSE's rest period of ``rest_fraction * probation`` rows after any score at
    ``red_level`` (0.5 on NAB's log scale = likelihood 0.99999, NAB's "red").

    Returns:
        ``(T,)`` scores in ``[0, 1]``, causal.
    """
    x = _check(x, probation)
    if n_grids < 1:
        raise ValueError(f"n_grids must be >= 1, got {n_grids!r}")
    raw = np.mean([context_surprise(x, probation, n_bins=n_bins, max_order=max_order, offset=g / n_grids)
                   for g in range(n_grids)], axis=0)
    s = np.maximum(nab_likelihood(raw, probation), spatial_novelty(x, probation))
    return suppress(s, red_level, int(rest_fraction * probation))


def online_ensemble_score(x: np.ndarray, probation: int, *, rest_fraction: float = 0.2,
                          red_level: float = 0.5) -> np.ndarray:
    """Max over members of NAB likelihoods: shifted-grid context surprise and multi-scale EW z.

    The two members see different things (unpredictable transitions vs. values far
    from a decaying mean at 3 time scales); the max keeps either's alarm.
    """
    x = _check(x, probation)
    ctx = np.mean([context_surprise(x, probation, offset=g / 3) for g in range(3)], axis=0)
    lik = np.maximum(nab_likelihood(ctx, probation), nab_likelihood(ew_surprise(x, probation), probation))
    s = np.maximum(lik, spatial_novelty(x, probation))
    return suppress(s, red_level, int(rest_fraction * probation))


class OnlineContextDetector(TimeSeriesDetector):
    """:func:`online_context_score` under the detector contract (per column, max over columns).

    ``fit`` keeps the last ``memory`` training rows and replays them once as the
    probationary period: the bin grid comes from their range, the context model
    learns their transitions and the likelihood its Gaussian. Scoring goes on from
    that learned state (a copy: scoring learns nothing that outlives the call) and
    keeps learning on the scored series.

    A scored series is a *new* series, not the continuation of the training data:
    its contexts start fresh at its first row (as they do at every boundary between
    training series). Replaying the history and the series as one stream would
    make the jump from the last training row to the first scored row, and the
    contexts spanning it, look like never-seen transitions: every series, and
    every window of one, would peak at its start.

    Args:
        n_grids, n_bins, max_order: See :func:`online_context_score`.
        memory: Training rows kept and replayed.
        rest_fraction, red_level: See :func:`online_context_score` (the rest period
            is ``rest_fraction`` of the replayed history).
        **kw: See :class:`TimeSeriesDetector`.
    """

    name = "ts-online-context"

    def __init__(self, *, n_grids: int = 3, n_bins: int = 8, max_order: int = 6, memory: int = 5000,
                 rest_fraction: float = 0.2, red_level: float = 0.5,
                 merge_gap: int = 5, min_segment: int = 1, dynamic: bool = False, artifact_dir: str | None = None,
                 contamination: float = 0.001, threshold: float | None = None) -> None:
        super().__init__(merge_gap=merge_gap, min_segment=min_segment, dynamic=dynamic, artifact_dir=artifact_dir,
                         contamination=contamination, threshold=threshold)
        if n_grids < 1 or n_bins < 1 or max_order < 1 or memory < 20:
            raise ValueError(f"need n_grids, n_bins, max_order >= 1 and memory >= 20, got "
                             f"{n_grids!r}, {n_bins!r}, {max_order!r}, {memory!r}")
        if not 0.0 <= rest_fraction <= 1.0:
            raise ValueError(f"rest_fraction must be in [0, 1], got {rest_fraction!r}")
        self.n_grids = n_grids
        self.n_bins = n_bins
        self.max_order = max_order
        self.memory = memory
        self.rest_fraction = rest_fraction
        self.red_level = red_level

    def required_length(self) -> int:
        return 20

    def _replay(self, h: np.ndarray, starts: Sequence[int], probation: int
                ) -> tuple[np.ndarray, list[dict[str, float]], list[list[set[tuple[int, ...]]]]]:
        """Learn on ``h`` from scratch: raw surprises ``(T, D)``, bin grids and context memories."""
        raws, grids, memories = [], [], []
        for j in range(h.shape[1]):
            col = h[:, j]
            grid = {"origin": float(col[: max(probation, 2)].min()), "width": bin_width(col, probation, self.n_bins)}
            sets: list[set[tuple[int, ...]]] = []
            raw = np.zeros(len(col))
            for g in range(self.n_grids):
                seen: set[tuple[int, ...]] = set()
                bins = context_bins(col, probation, self.n_bins, g / self.n_grids, **grid)
                raw += surprise_of_bins(bins, seen, max_order=self.max_order, starts=starts)
                sets.append(seen)
            raws.append(raw / self.n_grids)
            grids.append(grid)
            memories.append(sets)
        return np.column_stack(raws), grids, memories

    def _post(self, x: np.ndarray, raw: np.ndarray, probation: int) -> np.ndarray:
        """Likelihood, spatial novelty and the rest period of one column (as :func:`online_context_score`)."""
        s = np.maximum(nab_likelihood(raw, probation), spatial_novelty(x, probation))
        return suppress(s, self.red_level, int(self.rest_fraction * probation))

    def _fit_series(self, items: Sequence[TimeSeries]) -> None:
        h = np.concatenate([s.values for s in items])
        ends = np.cumsum([len(s) for s in items])
        cut = max(len(h) - self.memory, 0)
        self.history_ = h[cut:]
        self.history_starts_ = tuple(int(e - cut) for e in [0, *ends[:-1]] if e - cut >= 0) or (0,)
        if 0 not in self.history_starts_:
            self.history_starts_ = (0, *self.history_starts_)
        raw, grids, memories = self._replay(self.history_, self.history_starts_, len(self.history_))
        self.history_raw_ = raw
        self.grids_ = grids
        self.memory_ = [[frozenset(s) for s in sets] for sets in memories]

    def _train_point_scores(self, items: Sequence[TimeSeries]) -> np.ndarray:
        # In-sample scores of the replay say nothing (the model learns as it goes):
        # learn on the first half of the history, score the second half as new data.
        h = self.history_
        half = max(len(h) // 2, 10)
        raw, _, _ = self._replay(h, self.history_starts_, half)
        cols = [self._post(h[:, j], raw[:, j], half)[half:] for j in range(h.shape[1])]
        return np.column_stack(cols).max(axis=1)

    def _analyse(self, series: TimeSeries) -> Analysis:
        h, x = self.history_, series.values
        n_h = len(h)
        cols = []
        for j in range(x.shape[1]):
            raw = np.zeros(len(x))
            for g in range(self.n_grids):
                bins = context_bins(x[:, j], n_h, self.n_bins, g / self.n_grids, **self.grids_[j])
                raw += surprise_of_bins(bins, set(self.memory_[j][g]), max_order=self.max_order, starts=(0,))
            full_raw = np.concatenate([self.history_raw_[:, j], raw / self.n_grids])
            cols.append(self._post(np.concatenate([h[:, j], x[:, j]]), full_raw, n_h)[n_h:])
        contrib = np.column_stack(cols)
        return Analysis(contrib.max(axis=1), contrib, None)
