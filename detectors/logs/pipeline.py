"""Raw log file -> ranked candidates: ingest, template matching, grouping, detection.

``LogPipeline.fit`` learns templates and the detector from normal data; ``detect``
streams a file through the same steps using only pure matching and scoring, so
memory is bounded by the open sessions and the candidates kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detectors.base import Detector
from detectors.logs.ingest import IngestReport, LogRecord, read_log
from detectors.logs.sessions import UNSEEN, LogEvent, LogSequence, Sessionizer, parse_timestamp
from detectors.logs.templates import ParserConfig, TemplateMiner
from detectors.records import Candidate


class LogParser:
    """Turns records into :class:`LogEvent` s: learns templates (fit) or matches them."""

    def __init__(self, config: ParserConfig | None = None, *, timestamps: bool = True) -> None:
        self.miner = TemplateMiner(config or ParserConfig())
        self.timestamps = timestamps
        self._template_text: dict[int, str] = {}
        self._ts_cache: dict[tuple[str | None, ...], float | None] = {}

    def learn(self, records: Iterable[LogRecord]) -> int:
        """Learn templates from normal records; returns how many records were used."""
        n = 0
        for record in records:
            self.miner.learn(record.content)
            n += 1
        self._template_text = self.miner.templates()
        return n

    def event(self, record: LogRecord) -> LogEvent:
        """Match one record against the learned templates (pure)."""
        tid = self.miner.match(record.content)
        if tid is None:
            tid, text = UNSEEN, "<unseen>"
        else:
            text = self._template_text.get(tid) or self.miner.template(tid)
        ts = self._timestamp(record.fields) if self.timestamps and record.fields else None
        return LogEvent(record.line_no, tid, text, record.level, record.content, ts)

    def _timestamp(self, fields: dict[str, str]) -> float | None:
        # Consecutive lines share their header time: a dict hit instead of a parse.
        key = (fields.get("Date"), fields.get("Time"), fields.get("Timestamp"))
        cache = self._ts_cache
        if key in cache:
            return cache[key]
        if len(cache) > 50_000:
            cache.clear()
        value = cache[key] = parse_timestamp(fields)
        return value

    def events(self, records: Iterable[LogRecord]) -> Iterator[LogEvent]:
        """Match many records."""
        for record in records:
            yield self.event(record)


@dataclass
class DetectionResult:
    """Candidates of one file plus what happened to its lines."""

    source: str
    candidates: list[Candidate]
    report: IngestReport
    sequences_scored: int = 0
    lines_without_session: int = 0
    unseen_lines: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


class LogPipeline:
    """Everything between a log file and its candidates.

    Args:
        detector: Any fitted-or-not log detector (see :mod:`detectors.registry`).
        log_format: Format string or known system name (``hdfs``); ``None`` = whole line.
        parser: drain3 settings.
        grouping: A configured :class:`Sessionizer` template (mode, id pattern, sizes).
        batch_size: Sequences scored per batch while streaming.
    """

    def __init__(self, detector: Detector[LogSequence], *, log_format: str | None = None,
                 parser: ParserConfig | None = None, grouping: dict[str, Any] | None = None,
                 batch_size: int = 2048) -> None:
        self.detector = detector
        self.log_format = log_format
        self.parser = LogParser(parser)
        self.grouping = dict(grouping or {"mode": "session"})
        self.batch_size = batch_size
        Sessionizer(**self.grouping)  # validate early, with the sessionizer's own errors

    def sessionizer(self) -> Sessionizer:
        """A fresh sessionizer with this pipeline's grouping."""
        return Sessionizer(**self.grouping)

    def sequences(self, path: str | Path, report: IngestReport) -> list[LogSequence]:
        """All sequences of a file, matched against learned templates (evaluation, fitting)."""
        records = read_log(path, self.log_format, report=report)
        return self.sessionizer().group(self.parser.events(records))

    def fit(self, path: str | Path, *, keep: set[str] | None = None) -> IngestReport:
        """Learn templates and the detector from a file of normal behaviour.

        Args:
            path: Log file of (mostly) normal operation.
            keep: If given, only sequences with these ids train the detector (e.g.
                the normal sessions of a labelled training split).
        """
        report = IngestReport(source=str(path))
        self.parser.learn(read_log(path, self.log_format, report=report))
        seqs = self.sequences(path, IngestReport(source=str(path)))
        if keep is not None:
            seqs = [s for s in seqs if s.id in keep]
        self.detector.fit(seqs)
        return report

    def fit_sequences(self, records: list[LogRecord], keep: set[str] | None = None) -> None:
        """Fit from records already in memory (tests, evaluation splits)."""
        self.parser.learn(records)
        seqs = self.sessionizer().group(self.parser.events(records))
        if keep is not None:
            seqs = [s for s in seqs if s.id in keep]
        self.detector.fit(seqs)

    def detect(self, path: str | Path, *, source: str | None = None,
               line_range: tuple[int, int] | None = None) -> DetectionResult:
        """Stream a file and return its candidates, highest score first."""
        report = IngestReport(source=str(path))
        src = source or Path(path).name
        grouper = self.sessionizer()
        candidates: list[Candidate] = []
        batch: list[LogSequence] = []
        scored = unseen = 0

        def flush() -> None:
            nonlocal scored
            if batch:
                candidates.extend(self.detector.detect(batch, src))
                scored += len(batch)
                batch.clear()

        for record in read_log(path, self.log_format, report=report):
            if line_range and not line_range[0] <= record.line_no <= line_range[1]:
                continue
            event = self.parser.event(record)
            unseen += event.template_id == UNSEEN
            for seq in grouper.add(event):
                batch.append(seq)
                if len(batch) >= self.batch_size:
                    flush()
        batch.extend(grouper.flush())
        flush()
        candidates.sort(key=lambda c: c.score, reverse=True)
        return DetectionResult(
            source=src, candidates=candidates, report=report, sequences_scored=scored,
            lines_without_session=grouper.without_id, unseen_lines=unseen,
            settings={"detector": self.detector.name, "params": self.detector.get_params(),
                      "format": self.log_format, "grouping": self.grouping,
                      "parser": self.parser.miner.config.to_dict()},
        )
