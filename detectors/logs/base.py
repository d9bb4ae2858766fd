"""What every log detector shares: the item type, the locator, and line evidence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from detectors.base import Detector
from detectors.logs.sessions import LogEvent, LogSequence
from detectors.records import Evidence, EvidenceKind, Modality

MAX_EVIDENCE_LINES = 8
MAX_EXCERPT_CHARS = 300


class LogDetector(Detector[LogSequence]):
    """A detector over sessions/windows of log events."""

    modality: ClassVar[Modality] = Modality.LOGS

    def item_id(self, item: LogSequence) -> str:
        return item.id

    def locator(self, item: LogSequence) -> dict[str, Any]:
        return {
            "sequence": item.id,
            "first_line": item.first_line,
            "last_line": item.last_line,
            "events": len(item.events),
        }


def line_evidence(
    eid: str,
    summary: str,
    events: Sequence[LogEvent],
    reason: str,
    **extra: Any,
) -> Evidence:
    """Evidence pointing at exact lines, with short excerpts so a reader can check it.

    Args:
        eid: Evidence id within the candidate.
        summary: One line for humans.
        events: The lines that drive the score (the first few are kept).
        reason: Machine-readable why (``unseen_template``, ``count_deviation``...).
        **extra: More JSON-ready data (expected counts, ranges...).
    """
    shown = list(events)[:MAX_EVIDENCE_LINES]
    data: dict[str, Any] = {
        "reason": reason,
        "lines": [e.line_no for e in shown],
        "total_lines": len(events),
        "templates": [e.template for e in shown],
        "text": [e.content[:MAX_EXCERPT_CHARS] for e in shown],
    }
    data.update(extra)
    return Evidence(id=eid, kind=EvidenceKind.LOG_LINES, summary=summary, data=data)


def vocabulary(items: Sequence[LogSequence]) -> dict[int, int]:
    """Column index per template id seen in ``items``; column 0 is 'not seen in training'."""
    ids = sorted({e.template_id for seq in items for e in seq.events} - {0})
    return {tid: i + 1 for i, tid in enumerate(ids)}
