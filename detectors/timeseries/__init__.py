"""Time-series modality: point, contextual and collective anomalies with root-cause variables.

What an *item* is
-----------------
An item is a :class:`~detectors.timeseries.series.TimeSeries`: a ``(T, D)`` float
array with timestamps (or a plain index) and column names. A window of a series is
itself a ``TimeSeries`` (it keeps its ``offset`` into the source), so the generic
contract stays meaningful at both scales:

* ``fit(normal_series)`` learns what normal looks like (levels, seasonality, noise
  scale per variable, the normal range of each variable, the score threshold);
* ``score(items)`` returns **one score per item** = the largest per-point score
  inside it, so "does this window/series contain an anomaly?" is ranked by it;
* ``point_scores(series)`` exposes the per-point scores (the native granularity),
  and ``detect(items, source)`` turns them into merged segments ``[t0, t1]``, one
  :class:`~detectors.records.Candidate` per segment, with ``segment`` evidence
  (observed vs expected per variable, top contributing variables with their share,
  the normal range learned at fit) and an optional PNG plot artifact.

Why whole series rather than fixed windows as items: most detectors here need
context (a forecast needs history; a discord needs its neighbourhood), and cutting
the series into independent windows would throw that away or duplicate it. Any
caller who wants window items just passes ``series.windows(w, step)``.

Modules: :mod:`.series` (item, errors), :mod:`.ingest` (CSV/Parquet), :mod:`.base`
(the wrapper: segments, evidence, severity, plot), one module per detector family
(:mod:`.residual`, :mod:`.discord`, :mod:`.iforest`, :mod:`.context`,
:mod:`.ensemble`, :mod:`.online` = streaming detectors that keep
learning, used for NAB), :mod:`.rootcause`, :mod:`.severity`, :mod:`.threshold`
(telemanom dynamic threshold, anomaly likelihood), :mod:`.plot`.
"""

from detectors.timeseries.series import SeriesTooShortError, TimeSeries, TimeSeriesInputError

__all__ = ["SeriesTooShortError", "TimeSeries", "TimeSeriesInputError"]
