"""Records that detectors emit: what was flagged, where, and the evidence for it.

These live in ``detectors`` (not ``agent`` as the design sketch had it) because
imports point one way, detectors -> knowledge -> agent: the detectors must be able
to build their own output without importing the agent. ``agent.records`` re-exports
them next to ``Verdict``.

Every record is a frozen pydantic model, so it validates on construction, cannot
be mutated after a detector hands it over, and round-trips through JSON exactly.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Modality(StrEnum):
    """What kind of raw data a candidate came from."""

    LOGS = "logs"
    TIMESERIES = "timeseries"
    IMAGE = "image"
    VIDEO = "video"


class EvidenceKind(StrEnum):
    """Native granularity of a piece of evidence.

    The kind tells a renderer (report, web view, prompt) how to read ``data``:
    ``log_lines`` carries ``lines`` (1-based line numbers) and ``templates``;
    ``segment`` carries ``t0``/``t1`` and per-variable observed vs expected;
    ``region`` carries ``bbox`` and/or a mask artifact; ``frames`` carries a frame
    span; ``feature`` is a scalar feature with its normal range.
    """

    LOG_LINES = "log_lines"
    SEGMENT = "segment"
    REGION = "region"
    FRAMES = "frames"
    FEATURE = "feature"


class Record(BaseModel):
    """Base for all records: frozen, strict about unknown fields, JSON round-trip."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> str:
        """Serialise to a JSON string (the canonical on-disk form)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> "Record":
        """Parse and validate a JSON string produced by :meth:`to_json`."""
        return cls.model_validate_json(text)


class Evidence(Record):
    """One checkable fact behind a candidate, citable by ``id``.

    Attributes:
        id: Stable within its candidate, e.g. ``"E1"``; verdicts cite it.
        kind: Granularity of ``data``; see :class:`EvidenceKind`.
        summary: One line a human can read without opening ``data``.
        data: Payload at native granularity (line numbers, time range, bbox...).
            Values must be JSON types so the record round-trips.
        artifact: Optional path to a file (plot, mask, keyframe) that shows it.
    """

    id: str = Field(min_length=1, max_length=64)
    kind: EvidenceKind
    summary: str = Field(min_length=1)
    data: dict[str, Any] = Field(default_factory=dict)
    artifact: str | None = None

    @field_validator("summary")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # A summary is rendered inline in prompts and tables; newlines there would
        # let untrusted log text break out of its delimited block.
        return " ".join(value.split())


class Candidate(Record):
    """Something a detector thinks may be anomalous; higher ``score`` = more anomalous.

    Attributes:
        id: Unique within a run, e.g. ``"hdfs.log:blk_-123"``.
        source: File or stream the data came from.
        modality: Which kind of data.
        locator: Where in the source: session id, window, time range, image, frames.
        score: Detector score; comparable only within one detector.
        threshold: The detector's threshold; ``score > threshold`` made it a candidate.
        detector: Registry name of the detector.
        evidence: Why; each item is citable by its id.
    """

    id: str = Field(min_length=1)
    source: str
    modality: Modality
    locator: dict[str, Any] = Field(default_factory=dict)
    score: float
    threshold: float
    detector: str
    evidence: tuple[Evidence, ...] = ()

    @field_validator("evidence")
    @classmethod
    def _unique_evidence_ids(cls, value: tuple[Evidence, ...]) -> tuple[Evidence, ...]:
        seen: set[str] = set()
        for item in value:
            if item.id in seen:
                raise ValueError(f"duplicate evidence id {item.id!r} in candidate")
            seen.add(item.id)
        return value

    @property
    def evidence_ids(self) -> frozenset[str]:
        """Ids a verdict may cite from this candidate."""
        return frozenset(item.id for item in self.evidence)
