"""Ensembles: combine detectors of one modality by their own thresholds.

Each member's score is divided by its threshold, so 1.0 means "at the edge of
normal" for every member whatever its scale; the ensemble score is the largest
normalised score and its threshold is 1.0. A candidate's evidence is the union of
the evidence of the members that flag it, each id prefixed with the member name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic

import numpy as np

from detectors.base import Detector, X
from detectors.records import Evidence


class MaxNormEnsemble(Detector[X], Generic[X]):
    """Largest threshold-normalised score over member detectors."""

    name = "ensemble"

    def __init__(self, members: Sequence[Detector[X]], *, contamination: float = 0.001,
                 threshold: float | None = None) -> None:
        super().__init__(contamination=contamination, threshold=threshold)
        if not members:
            raise ValueError("an ensemble needs at least one member detector")
        modalities = {m.modality for m in members}
        if len(modalities) != 1:
            raise ValueError(f"ensemble members must share one modality, got {sorted(modalities)}")
        self.members = list(members)
        self.modality = members[0].modality  # type: ignore[misc]

    def _fit(self, items: Sequence[X]) -> None:
        for member in self.members:
            member.fit(items)

    def _learned_threshold(self) -> float | None:
        return 1.0

    def _normalised(self, items: Sequence[X]) -> np.ndarray:
        cols = []
        for member in self.members:
            scale = member.threshold_ if member.threshold_ > 0 else 1.0
            cols.append(member.score(items) / scale)
        return np.vstack(cols)

    def _score(self, items: Sequence[X]) -> np.ndarray:
        return self._normalised(items).max(axis=0)

    def item_id(self, item: X) -> str:
        return self.members[0].item_id(item)

    def locator(self, item: X) -> dict[str, Any]:
        return self.members[0].locator(item)

    def evidence(self, item: X, score: float) -> tuple[Evidence, ...]:
        out: list[Evidence] = []
        for member, value in zip(self.members, self._normalised([item])[:, 0]):
            if value > 1.0:
                for ev in member.evidence(item, float(value * member.threshold_)):
                    out.append(Evidence(id=f"{member.name}.{ev.id}", kind=ev.kind, summary=ev.summary,
                                        data={**ev.data, "detector": member.name,
                                              "normalised_score": round(float(value), 4)},
                                        artifact=ev.artifact))
        return tuple(out)

    def get_params(self) -> dict[str, Any]:
        return {"members": [{"name": m.name, **m.get_params()} for m in self.members],
                "contamination": self.contamination, "threshold": self.threshold}
