"""The detector contract: fit on normal data, score purely, threshold, explain with evidence.

Modelled on PyOD / scikit-learn: ``__init__`` only stores parameters, ``fit`` learns
and sets trailing-underscore attributes, ``score`` is pure (it learns nothing, as
Drain3's ``match`` vs ``add_log_message``), and the base class turns scores into
:class:`~detectors.records.Candidate` s with the threshold learned at fit time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np

from detectors.records import Candidate, Evidence, Modality

X = TypeVar("X")


class NotFittedError(RuntimeError):
    """``score``/``detect`` called before ``fit``."""


class EmptyInputError(ValueError):
    """``fit`` or ``score`` called with no items."""


class Detector(ABC, Generic[X]):
    """Base class of every detector.

    Subclasses implement ``_fit`` and ``_score`` (and usually ``evidence``); the base
    class validates input, learns the threshold from the training scores and builds
    candidates. Higher score means more anomalous, for every detector.

    Args:
        contamination: Expected share of anomalies in the *training* data; the
            threshold is the ``1 - contamination`` quantile of training scores.
            Use ``0`` to put the threshold at the largest training score.
        threshold: Explicit threshold; overrides ``contamination`` when given.
    """

    name: ClassVar[str]
    modality: ClassVar[Modality]

    def __init__(self, *, contamination: float = 0.001, threshold: float | None = None) -> None:
        if not 0.0 <= contamination < 0.5:
            raise ValueError(f"contamination must be in [0, 0.5), got {contamination!r}")
        self.contamination = contamination
        self.threshold = threshold

    # -- the contract -----------------------------------------------------------------
    def fit(self, normal: Sequence[X]) -> Self:
        """Learn normal behaviour from ``normal`` and the score threshold; returns ``self``."""
        items = self._check_items(normal, "fit")
        self._fit(items)
        train_scores = np.asarray(self._score(items), dtype=float)
        self.train_scores_ = train_scores
        learned = self._learned_threshold()
        if self.threshold is not None:
            self.threshold_ = float(self.threshold)
        elif learned is not None:
            self.threshold_ = learned
        else:
            # contamination 0 -> quantile 1.0, the largest training score.
            self.threshold_ = float(np.quantile(train_scores, 1.0 - self.contamination))
            floor = self._threshold_floor()
            if floor is not None:
                self.threshold_ = max(self.threshold_, floor)
        self.fitted_ = True
        return self

    def score(self, items: Sequence[X]) -> np.ndarray:
        """One anomaly score per item (higher = more anomalous); learns nothing."""
        self._check_fitted()
        checked = self._check_items(items, "score")
        scores = np.asarray(self._score(checked), dtype=float)
        if scores.shape != (len(checked),):
            raise RuntimeError(f"{type(self).__name__}._score returned shape {scores.shape}, expected ({len(checked)},)")
        return scores

    def calibrate(self, items: Sequence[X], labels: Sequence[bool]) -> Self:
        """Move the threshold to the best-F1 cut on labelled *validation* items.

        For when some labelled history exists (never the test data): the model
        stays fitted on normal data only; only the cut-off learns from labels.
        The cut is placed midway between the two scores it separates.
        """
        y = np.asarray(labels, dtype=bool)
        if len(y) != len(items):
            raise ValueError(f"calibrate got {len(items)} items but {len(y)} labels")
        if not y.any():
            raise ValueError("calibrate needs at least one anomalous validation item")
        scores = self.score(items)
        order = np.argsort(-scores, kind="stable")
        s_sorted, y_sorted = scores[order], y[order]
        tp = np.cumsum(y_sorted)
        fp = np.cumsum(~y_sorted)
        f1 = 2 * tp / (tp + fp + y.sum())
        # Only cut between distinct scores.
        valid = np.append(s_sorted[1:] < s_sorted[:-1], True)
        best = int(np.argmax(np.where(valid, f1, -1.0)))
        below = s_sorted[best + 1] if best + 1 < len(s_sorted) else s_sorted[best] - 1.0
        self.threshold_ = float((s_sorted[best] + below) / 2.0)
        self.calibrated_f1_ = float(f1[best])
        return self

    def evidence(self, item: X, score: float) -> tuple[Evidence, ...]:
        """Why ``item`` scored ``score``; override to give native-granularity evidence."""
        return ()

    def detect(self, items: Sequence[X], source: str) -> list[Candidate]:
        """Score ``items`` and return a candidate (with evidence) for each above threshold."""
        scores = self.score(items)
        out: list[Candidate] = []
        for item, value in zip(items, scores):
            if value > self.threshold_:
                out.append(self.candidate(item, float(value), source))
        out.sort(key=lambda c: c.score, reverse=True)
        return out

    def candidate(self, item: X, score: float, source: str) -> Candidate:
        """Build the candidate for one item; subclasses of a modality set the locator."""
        return Candidate(
            id=f"{source}:{self.item_id(item)}",
            source=source,
            modality=self.modality,
            locator=self.locator(item),
            score=score,
            threshold=self.threshold_,
            detector=self.name,
            evidence=self.evidence(item, score),
        )

    def item_id(self, item: X) -> str:
        """Stable id of an item within its source."""
        return str(getattr(item, "id", id(item)))

    def locator(self, item: X) -> dict[str, Any]:
        """Where the item is in its source."""
        return {"id": self.item_id(item)}

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (for provenance and reports)."""
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}

    # -- for subclasses -----------------------------------------------------------------
    @abstractmethod
    def _fit(self, items: Sequence[X]) -> None: ...

    @abstractmethod
    def _score(self, items: Sequence[X]) -> np.ndarray: ...

    def _learned_threshold(self) -> float | None:
        """A threshold the method itself defines (e.g. a Q-statistic); ``None`` = use contamination."""
        return None

    def _threshold_floor(self) -> float | None:
        """Smallest meaningful learned threshold, for scores whose normal values are a point mass at 0."""
        return None

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit(normal_items) first")

    def _check_items(self, items: Sequence[X], what: str) -> Sequence[X]:
        if items is None or len(items) == 0:
            raise EmptyInputError(f"{type(self).__name__}.{what}() got no items; it needs at least one")
        return items
