"""The explicit detector registry: name -> class, and a factory with clear errors."""

from __future__ import annotations

import inspect
from typing import Any

from detectors.base import Detector
from detectors.ensemble import MaxNormEnsemble
from detectors.logs.counts import IsolationForestCountDetector, LoglizerPCABaseline, PCACountDetector
from detectors.logs.point import (
    CooccurrenceDetector,
    ErrorBurstDetector,
    ParameterRangeDetector,
    RareTemplateDetector,
)
from detectors.logs.sequence import LSTMSequenceDetector
from detectors.timeseries.context import ContextDiscrepancyDetector
from detectors.timeseries.crossvar import CrossVariableDetector
from detectors.timeseries.discord import MatrixProfileDetector
from detectors.timeseries.ensemble import TimeSeriesEnsemble
from detectors.timeseries.iforest import WindowIForestDetector
from detectors.timeseries.online import OnlineContextDetector
from detectors.timeseries.residual import ResidualDetector

DETECTORS: dict[str, type[Detector[Any]]] = {
    cls.name: cls
    for cls in (
        RareTemplateDetector,
        CooccurrenceDetector,
        ParameterRangeDetector,
        ErrorBurstDetector,
        PCACountDetector,
        IsolationForestCountDetector,
        LSTMSequenceDetector,
        LoglizerPCABaseline,
        ResidualDetector,
        CrossVariableDetector,
        ContextDiscrepancyDetector,
        MatrixProfileDetector,
        WindowIForestDetector,
        OnlineContextDetector,
        TimeSeriesEnsemble,
    )
}

# Named ensembles: what `--detector log-ensemble` builds.
ENSEMBLES: dict[str, tuple[str, ...]] = {
    # Fast default: workflow invariants (counts and co-occurrence), never-seen lines,
    # numbers out of range, error bursts.
    "log-ensemble": ("log-pca", "log-cooccurrence", "log-rare-template", "log-param-range", "log-error-burst"),
    # The same plus the LSTM's order model (slower to fit).
    "log-ensemble-seq": ("log-pca", "log-cooccurrence", "log-rare-template", "log-param-range",
                         "log-error-burst", "log-lstm"),
}


def known_detectors() -> list[str]:
    """Every name :func:`make_detector` accepts."""
    return sorted([*DETECTORS, *ENSEMBLES])


def make_detector(name: str, **params: Any) -> Detector[Any]:
    """Build a detector by registry name.

    Raises:
        ValueError: Unknown name, or a parameter the detector does not take.
    """
    if name in ENSEMBLES:
        member_params = params.pop("member_params", {}) or {}
        stray = set(member_params) - set(ENSEMBLES[name])
        if stray:
            raise ValueError(f"member_params for {sorted(stray)}, which are not members of {name!r}: "
                             f"{list(ENSEMBLES[name])}")
        bad = set(params) - {"contamination", "threshold"}
        if bad:
            raise ValueError(f"ensemble {name!r} takes no parameter(s) {sorted(bad)}; accepted: "
                             "['contamination', 'member_params', 'threshold']")
        members = [make_detector(m, **member_params.get(m, {})) for m in ENSEMBLES[name]]
        ens = MaxNormEnsemble(members, **params)
        ens.name = name  # type: ignore[misc]
        return ens
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {known_detectors()}")
    cls = DETECTORS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    bad = set(params) - accepted
    if bad:
        raise ValueError(f"detector {name!r} takes no parameter(s) {sorted(bad)}; accepted: {sorted(accepted)}")
    return cls(**params)
