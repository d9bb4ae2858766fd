"""`anomaly-agent bench timeseries`: scoring speed and peak memory on synthetic series.

Measures points/s for the univariate residual detector on a 1,000,000-point series
(both the lean ``fast_scores`` path and the full ``point_scores`` path with
per-variable outputs), the same detectors on a 50-variable series, and peak memory
as the process's peak RSS plus tracemalloc's peak for the scoring call.
"""

from __future__ import annotations

import resource
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from detectors.timeseries.context import ContextDiscrepancyDetector
from detectors.timeseries.crossvar import CrossVariableDetector
from detectors.timeseries.residual import ResidualDetector
from detectors.timeseries.series import TimeSeries


def _timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, int]:
    """Best wall time of ``repeat`` runs and tracemalloc peak bytes of one run."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return best, peak


def bench_timeseries(echo: Callable[[str], None] = print, *, n_points: int = 1_000_000, n_vars: int = 50,
                     n_multi: int = 100_000) -> dict[str, Any]:
    """Run the benchmark; returns the numbers (points/s, peak MB)."""
    rng = np.random.default_rng(0)
    t = np.arange(n_points)
    x = np.sin(2 * np.pi * t / 288) + 0.1 * rng.normal(size=n_points)
    train = TimeSeries.from_array(x[:20_000], ["value"])
    series = TimeSeries.from_array(x, ["value"])
    out: dict[str, Any] = {}
    det = ResidualDetector().fit([train])
    sec, peak = _timed(lambda: det.fast_scores(x))
    out["residual_univariate_fast"] = {"points": n_points, "points_per_s": round(n_points / sec), "peak_mb": round(peak / 2**20, 1)}
    sec, peak = _timed(lambda: det.point_scores(series))
    out["residual_univariate_full"] = {"points": n_points, "points_per_s": round(n_points / sec), "peak_mb": round(peak / 2**20, 1)}
    ctx = ContextDiscrepancyDetector().fit([train])
    sec, peak = _timed(lambda: ctx.point_scores(series))
    out["context_univariate"] = {"points": n_points, "points_per_s": round(n_points / sec), "peak_mb": round(peak / 2**20, 1)}
    mix = rng.normal(size=(3, n_vars))
    xm = np.column_stack([np.sin(2 * np.pi * np.arange(n_multi) / 288), rng.normal(size=n_multi).cumsum() * 0.01,
                          rng.normal(size=n_multi)]) @ mix + 0.1 * rng.normal(size=(n_multi, n_vars))
    mtrain = TimeSeries.from_array(xm[:20_000])
    mseries = TimeSeries.from_array(xm)
    for name, d in (("residual_50var", ResidualDetector()), ("crossvar_50var", CrossVariableDetector())):
        d.fit([mtrain])
        sec, peak = _timed(lambda d=d: d.point_scores(mseries))
        out[name] = {"rows": n_multi, "variables": n_vars, "rows_per_s": round(n_multi / sec),
                     "values_per_s": round(n_multi * n_vars / sec), "peak_mb": round(peak / 2**20, 1)}
    out["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    for k, v in out.items():
        echo(f"  {k}: {v}")
    return out
