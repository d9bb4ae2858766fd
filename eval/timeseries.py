"""`anomaly-agent eval timeseries --data-dir DIR --out FILE.json`: NAB + SMAP/MSL in one run.

``DIR`` is the folder that contains ``nab/`` and ``smap_msl/``. Every detector and
every baseline is run in the same process on the same data with settings fixed in
this file (never tuned on test labels), and all metrics are written to one JSON.
The NAB scorer is checked first against NAB's published windowedGaussian result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detectors.timeseries.base import TimeSeriesDetector
from detectors.timeseries.context import ContextDiscrepancyDetector
from detectors.timeseries.discord import MatrixProfileDetector
from detectors.timeseries.ensemble import TimeSeriesEnsemble
from detectors.timeseries.iforest import WindowIForestDetector
from detectors.timeseries.residual import ResidualDetector
from eval import nab, smap_msl
from eval.results import write_result


def smap_factories(include_slow: bool = True) -> dict[str, Callable[[], TimeSeriesDetector]]:
    """Detectors for SMAP/MSL (settings fixed a priori; baselines prefixed ``baseline:``)."""
    out: dict[str, Callable[[], TimeSeriesDetector]] = {
        "ts-residual": lambda: ResidualDetector(span=10, smooth=30),
        "ts-context": lambda: ContextDiscrepancyDetector(),
        "baseline:ts-iforest": lambda: WindowIForestDetector(n_estimators=50),
    }
    if include_slow:
        out["ts-matrix-profile"] = lambda: MatrixProfileDetector(m=64)
        out["ts-ensemble(residual,matrix-profile)"] = lambda: TimeSeriesEnsemble(
            [ResidualDetector(span=10, smooth=30), MatrixProfileDetector(m=64)])
    return out


def run(data_dir: Path, out: Path | None, echo: Callable[[str], None] = print, *,
        include_slow: bool = True) -> dict[str, Any]:
    """Run the whole time-series evaluation; returns (and writes to ``out``) the JSON document.

    Args:
        data_dir: Folder containing ``nab/`` and ``smap_msl/``.
        out: JSON path to write, or ``None``.
        echo: Progress printer.
        include_slow: Also run the matrix-profile detectors (minutes, numba JIT).
    """
    t0 = time.perf_counter()
    result: dict[str, Any] = {"data_dir": str(data_dir)}
    nab_dir = Path(data_dir) / "nab"
    if nab_dir.exists():
        echo("NAB: checking the scorer on windowedGaussian's published raw outputs")
        check = nab.score_results_dir(nab_dir, nab_dir / "results", "windowedGaussian")
        result["nab_scorer_check"] = {p: round(v["score"], 4) for p, v in check.items() if p != "files"}
        echo(f"  windowedGaussian standard {check['standard']['score']:.2f} (published 39.65)")
        echo("NAB: our detectors and baselines")
        result["nab"] = nab.run_detectors(nab_dir, nab.default_scorers(include_slow), echo=echo)
    sm_dir = Path(data_dir) / "smap_msl"
    if sm_dir.exists():
        echo("SMAP/MSL: per-channel fit on train, score test")
        result["smap_msl"] = smap_msl.run(sm_dir, smap_factories(include_slow), echo=echo)
    from eval.rootcause import root_cause_eval

    result["root_cause"] = root_cause_eval(echo=echo)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_result(result, out, echo)
    return result
