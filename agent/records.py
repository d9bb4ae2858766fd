"""The explainer's output record, ``Verdict``, and the check that its citations resolve.

``Evidence`` and ``Candidate`` are defined in :mod:`detectors.records` (detectors
must not import the agent) and re-exported here so agent code has one import.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from pydantic import Field, model_validator

from detectors.records import Candidate, Evidence, EvidenceKind, Modality, Record

__all__ = [
    "Candidate",
    "CausalStep",
    "Evidence",
    "EvidenceKind",
    "ExplainedBy",
    "Label",
    "Modality",
    "Provenance",
    "Severity",
    "UnresolvedCitation",
    "Verdict",
    "check_citations",
]


class Label(StrEnum):
    """Is it really an anomaly?"""

    ANOMALY = "anomaly"
    NORMAL = "normal"
    UNCERTAIN = "uncertain"


class Severity(IntEnum):
    """How bad: 0 none .. 4 critical."""

    NONE = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4


class ExplainedBy(StrEnum):
    """Who wrote the explanation; a rules-only fallback says so."""

    MODEL = "model"
    RULES_ONLY = "rules-only"


class CausalStep(Record):
    """One step of a causal chain; it must cite at least one evidence id."""

    text: str = Field(min_length=1, max_length=400)
    evidence_ids: tuple[str, ...] = Field(min_length=1)


class Provenance(Record):
    """What produced a verdict, so it can be reproduced and cached."""

    model_id: str
    adapter: str | None = None
    prompt_version: str
    rules_version: str = "none"
    knowledge_version: str = "none"


class Verdict(Record):
    """The answer to: is it an anomaly, how bad, why, and what to do.

    A verdict is only shown after :func:`check_citations` accepts it against the
    candidate, passages and rules it was built from.
    """

    candidate_id: str
    label: Label
    severity: Severity
    anomaly_type: str = Field(max_length=80)
    summary: str = Field(min_length=1, max_length=600)
    causal_chain: tuple[CausalStep, ...] = ()
    evidence_ids: tuple[str, ...] = ()
    passage_ids: tuple[str, ...] = ()
    rule_ids: tuple[str, ...] = ()
    confidence: float = Field(ge=0.0, le=1.0)
    actions: tuple[str, ...] = ()
    provenance: Provenance
    explained_by: ExplainedBy

    @model_validator(mode="after")
    def _consistent(self) -> "Verdict":
        if self.label is Label.NORMAL and self.severity is not Severity.NONE:
            raise ValueError(f"a normal verdict must have severity 0, got {int(self.severity)}")
        if self.label is Label.ANOMALY and self.severity is Severity.NONE:
            raise ValueError("an anomaly verdict needs severity >= 1")
        return self


class UnresolvedCitation(ValueError):
    """A verdict cites an id that does not exist; such a verdict is never shown."""


def check_citations(
    verdict: Verdict,
    candidate: Candidate,
    passage_ids: frozenset[str] | set[str] = frozenset(),
    rule_ids: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Raise :class:`UnresolvedCitation` naming every id that does not resolve.

    Args:
        verdict: The verdict to check.
        candidate: The candidate it explains; its evidence ids are citable.
        passage_ids: Ids of the knowledge passages shown to the model.
        rule_ids: Ids of the rules shown to the model.
    """
    problems: list[str] = []
    if verdict.candidate_id != candidate.id:
        problems.append(f"candidate_id {verdict.candidate_id!r} != {candidate.id!r}")
    known_evidence = candidate.evidence_ids
    cited = set(verdict.evidence_ids)
    for step in verdict.causal_chain:
        cited.update(step.evidence_ids)
    for eid in sorted(cited - known_evidence):
        problems.append(f"evidence id {eid!r} not in {sorted(known_evidence)}")
    for pid in sorted(set(verdict.passage_ids) - set(passage_ids)):
        problems.append(f"passage id {pid!r} not among retrieved passages")
    for rid in sorted(set(verdict.rule_ids) - set(rule_ids)):
        problems.append(f"rule id {rid!r} not among active rules")
    if problems:
        raise UnresolvedCitation("; ".join(problems))
