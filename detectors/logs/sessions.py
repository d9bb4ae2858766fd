"""From parsed lines to the items log detectors score: sessions and windows of events.

A :class:`LogSequence` is one session (all lines that mention an id such as an HDFS
block id) or one window (by line count or by time). Grouping is streaming: a
:class:`Sessionizer` emits a sequence as soon as it is complete (window full, or the
session idle for ``max_idle_lines``), so memory stays bounded on long inputs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from datetime import datetime
from functools import lru_cache

UNSEEN = 0
"""Template id of a line that matches no template learned on normal data."""


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One line as the detectors see it.

    Attributes:
        line_no: 1-based line number in the source.
        template_id: Learned template, or :data:`UNSEEN`.
        template: Template text (``"<unseen>"`` for unseen lines).
        level: Upper-cased level field (``""`` if the format has none).
        content: The message text (kept for evidence and parameter checks).
        timestamp: Seconds since the epoch when the header has a parseable time.
    """

    line_no: int
    template_id: int
    template: str
    level: str
    content: str
    timestamp: float | None = None


@dataclass(frozen=True, slots=True)
class LogSequence:
    """A session or window: the unit that log detectors score.

    Attributes:
        id: Session id (``blk_...``) or window id (``lines 1-100``).
        events: Events in file order.
    """

    id: str
    events: tuple[LogEvent, ...]

    @property
    def templates(self) -> tuple[int, ...]:
        """Template ids in order."""
        return tuple(e.template_id for e in self.events)

    @property
    def first_line(self) -> int:
        """Line number of the first event."""
        return self.events[0].line_no if self.events else 0

    @property
    def last_line(self) -> int:
        """Line number of the last event."""
        return self.events[-1].line_no if self.events else 0


_TIME_FORMATS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Date", "Time"), "%y%m%d %H%M%S"),          # HDFS 081109 203530
    (("Date", "Time"), "%Y-%m-%d %H:%M:%S,%f"),   # Hadoop/Zookeeper
    (("Date", "Time"), "%Y-%m-%d %H:%M:%S.%f"),   # OpenStack
    (("Date", "Time"), "%Y-%m-%d %H:%M:%S"),
    (("Date", "Time"), "%y/%m/%d %H:%M:%S"),      # Spark
    (("Timestamp",), "%s"),
)


def parse_timestamp(fields: dict[str, str]) -> float | None:
    """Best-effort epoch seconds from common header fields; ``None`` if none parse."""
    for keys, fmt in _TIME_FORMATS:
        if all(k in fields for k in keys):
            value = _parse_time_text(" ".join(fields[k] for k in keys), fmt)
            if value is not None:
                return value
    return None


_HMS = re.compile(r"(\d{1,2}):?(\d{2}):?(\d{2})(?:[.,](\d+))?$")


@lru_cache(maxsize=4096)
def _day_start(text: str, fmt: str) -> float | None:
    try:
        return datetime.strptime(text, fmt).timestamp()
    except ValueError:
        return None


def _parse_time_text(text: str, fmt: str) -> float | None:
    # strptime per line dominated ingest time; days repeat, so parse the date part
    # once (cached) and add the clock time read with a small regex.
    if fmt == "%s":
        try:
            return float(text)
        except ValueError:
            return None
    date_part, _, clock = text.partition(" ")
    date_fmt, _, clock_fmt = fmt.partition(" ")
    day = _day_start(date_part, date_fmt)
    match = _HMS.match(clock)
    if day is None or match is None:
        return None
    h, m, sec, frac = match.groups()
    value = day + int(h) * 3600 + int(m) * 60 + int(sec)
    if frac and "%f" in clock_fmt:
        value += float("0." + frac)
    return value


_NONE: list[LogSequence] = []  # shared empty result; callers only iterate it


class Sessionizer:
    """Streams events into sequences by session id, by line count, or by time.

    Args:
        mode: ``"session"`` (group by ``id_pattern``), ``"count"`` or ``"time"``.
        id_pattern: Regex whose matches in the content name the session(s) of a line;
            a line naming two ids belongs to both sessions.
        size: Window size (lines for ``count``, seconds for ``time``).
        step: Window step; ``None`` means tumbling windows (step = size).
        max_idle_lines: A session with no new line for this many input lines is
            complete. This bounds memory on long inputs.
    """

    MODES = ("session", "count", "time")

    def __init__(
        self,
        mode: str = "session",
        *,
        id_pattern: str = r"blk_-?\d+",
        size: float = 100,
        step: float | None = None,
        max_idle_lines: int = 200_000,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown grouping {mode!r}; choices: {list(self.MODES)}")
        if size <= 0:
            raise ValueError(f"window size must be > 0, got {size!r}")
        if step is not None and not 0 < step <= size:
            raise ValueError(f"window step must be in (0, size={size}], got {step!r}")
        self.mode = mode
        self.id_regex = re.compile(id_pattern)
        self.size = size
        self.step = step if step is not None else size
        self.max_idle_lines = max_idle_lines
        self.without_id = 0
        self.without_time = 0
        self._open: dict[str, list[Any]] = {}  # id -> [last line, events]
        self._next_sweep = self.max_idle_lines // 8 or 1
        self._window: list[LogEvent] = []
        self._window_start: float | None = None

    def add(self, event: LogEvent) -> list[LogSequence]:
        """Add one event; returns the sequences it completes (usually none)."""
        if self.mode == "session":
            return self._add_session(event)
        if self.mode == "count":
            return list(self._add_count(event))
        return list(self._add_time(event))

    def flush(self) -> Iterator[LogSequence]:
        """End of input: emit everything still open."""
        for sid, (_, events) in sorted(self._open.items(), key=lambda kv: kv[1][1][0].line_no):
            yield LogSequence(sid, tuple(events))
        self._open.clear()
        if self._window:
            yield self._window_seq(self._window)
            self._window = []

    def group(self, events: Iterable[LogEvent]) -> list[LogSequence]:
        """Group a whole iterable (tests and evaluation)."""
        out: list[LogSequence] = []
        for event in events:
            out.extend(self.add(event))
        out.extend(self.flush())
        return out

    # -- modes -------------------------------------------------------------------------
    def _add_session(self, event: LogEvent) -> list[LogSequence]:
        ids = self.id_regex.findall(event.content)
        if not ids:
            self.without_id += 1
        line = event.line_no
        for sid in ids if len(ids) == 1 else dict.fromkeys(ids):
            entry = self._open.get(sid)
            if entry is None:
                self._open[sid] = [line, [event]]
            else:
                entry[0] = line
                entry[1].append(event)
        if line < self._next_sweep:
            return _NONE
        # Sweep for idle sessions now and then rather than keeping an LRU order per
        # line: a session closes between max_idle_lines and 1.125x that after its
        # last line, and the per-line cost stays a dict lookup.
        self._next_sweep = line + (self.max_idle_lines // 8 or 1)
        cutoff = line - self.max_idle_lines
        idle = sorted((sid for sid, (last, _) in self._open.items() if last <= cutoff),
                      key=lambda sid: self._open[sid][0])
        return [LogSequence(sid, tuple(self._open.pop(sid)[1])) for sid in idle]

    def _window_seq(self, events: list[LogEvent]) -> LogSequence:
        if self.mode == "time" and events[0].timestamp is not None:
            start = datetime.fromtimestamp(self._window_start or events[0].timestamp).isoformat()
            return LogSequence(f"time {start} +{self.size:g}s", tuple(events))
        return LogSequence(f"lines {events[0].line_no}-{events[-1].line_no}", tuple(events))

    def _add_count(self, event: LogEvent) -> Iterator[LogSequence]:
        self._window.append(event)
        if len(self._window) >= self.size:
            yield self._window_seq(self._window)
            self._window = self._window[int(self.step):]

    def _add_time(self, event: LogEvent) -> Iterator[LogSequence]:
        if event.timestamp is None:
            self.without_time += 1
            return
        if self._window_start is None:
            self._window_start = event.timestamp
        while event.timestamp >= self._window_start + self.size:
            if self._window:
                yield self._window_seq(self._window)
            self._window_start += self.step
            self._window = [e for e in self._window if e.timestamp is not None and e.timestamp >= self._window_start]
            if not self._window and event.timestamp >= self._window_start + self.size:
                # Jump over a long silence instead of stepping through empty windows.
                skipped = (event.timestamp - self._window_start) // self.step
                self._window_start += skipped * self.step
        self._window.append(event)
