"""Records of the knowledge layer: retrieved passages, stored sources and ingest results.

Frozen pydantic models (the :class:`detectors.records.Record` base), so they validate on
construction, cannot be mutated after a store hands them over, and round-trip through JSON.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from pydantic import Field

from detectors.records import Record

PASSAGE_ID_PREFIX = "P-"


def passage_id(source: str, heading: str, offset: int) -> str:
    """Stable id of a passage: ``P-`` + the first 12 hex digits of ``sha1(source|heading|offset)``.

    The same document ingested again gives the same ids, so ingesting is an upsert and a
    verdict's citation of a passage stays valid while that passage is unchanged.
    """
    digest = hashlib.sha1(f"{source}|{heading}|{offset}".encode("utf-8")).hexdigest()
    return PASSAGE_ID_PREFIX + digest[:12]


class Passage(Record):
    """One chunk of a document (or a rule, or a past case), citable by ``id``.

    Attributes:
        id: Stable id, see :func:`passage_id`.
        source: The document it came from (file name, or ``folder/relative/path``).
        heading: Heading path inside the document (``"Runbook > Disk full"``), ``"page 3"``
            for a PDF, ``""`` when the document has none.
        offset: Character offset of the chunk in the document's text (in the page for a PDF).
        text: The chunk itself.
        score: Similarity to the query (cosine, higher is closer) when it came from a search;
            ``None`` when it was listed or is about to be stored.
        example: True when the document says it is an example written by this project
            (the demo knowledge base), so reports can say so.
    """

    id: str = Field(min_length=3)
    source: str = Field(min_length=1)
    heading: str = ""
    offset: int = Field(ge=0)
    text: str = Field(min_length=1)
    score: float | None = None
    example: bool = False

    @classmethod
    def make(cls, source: str, heading: str, offset: int, text: str, example: bool = False) -> "Passage":
        """A passage with its stable id computed from ``source``, ``heading`` and ``offset``."""
        return cls(id=passage_id(source, heading, offset), source=source, heading=heading, offset=offset,
                   text=text, example=example)


class SourceInfo(Record):
    """One stored document: how many passages it has and a hash of their content."""

    source: str
    passages: int = Field(ge=0)
    content_hash: str
    example: bool = False


class IngestStatus(StrEnum):
    """Outcome of ingesting one file."""

    OK = "ok"
    UNCHANGED = "unchanged"
    ERROR = "error"


class IngestResult(Record):
    """What happened to one file; one bad file never stops the others.

    Attributes:
        path: The file as given (or as found under a given folder).
        source: The source name its passages are stored under ("" when it failed early).
        status: ``ok`` (stored), ``unchanged`` (already stored with the same content) or ``error``.
        passages: Passages stored (or already there, when unchanged).
        removed: Old passages of the same source that were removed (the document shrank or changed).
        truncated: True when the file had more chunks than the cap and only the first were kept.
        reason: Why it failed, or a note (e.g. the cap) when it did not; names the file.
    """

    path: str
    source: str = ""
    status: IngestStatus
    passages: int = Field(default=0, ge=0)
    removed: int = Field(default=0, ge=0)
    truncated: bool = False
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True unless the file failed."""
        return self.status is not IngestStatus.ERROR

    def line(self) -> str:
        """One human-readable line for a CLI."""
        if self.status is IngestStatus.ERROR:
            return f"{'error':<9} {self.reason}"  # reasons name the file
        extra = f" ({self.reason})" if self.reason else ""
        removed = f", {self.removed} old removed" if self.removed else ""
        return f"{self.status.value:<9} {self.path} -> {self.source}: {self.passages} passages{removed}{extra}"
