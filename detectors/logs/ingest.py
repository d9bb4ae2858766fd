"""Streaming log ingestion: raw text with a loghub-style format string, JSON lines, gzip.

Lines are read one at a time (bounded memory), keep their 1-based line number, and
every line that cannot be decoded or parsed is counted and reported with its line
number and reason in an :class:`IngestReport` -- never dropped silently. A truncated
gzip stream ends the read with a recorded error; everything read before it is kept.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MAX_LINE_CHARS = 64_000
"""Longer lines are truncated (and counted): a 1 MB line is almost always a dump."""

_FIELD = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")
ERROR_LEVELS = frozenset({"ERROR", "FATAL", "SEVERE", "CRITICAL", "CRIT", "EMERG", "ALERT", "FAILURE", "FAILED"})
WARN_LEVELS = frozenset({"WARN", "WARNING"})


class LogInputError(ValueError):
    """The input as a whole cannot be read (missing, empty, binary, nothing parsed)."""


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One parsed log line.

    Attributes:
        line_no: 1-based line number in the source file.
        content: The free-text message (the ``<Content>`` field).
        fields: Header fields from the format string (Date, Level, ...).
        raw: The line as read (without the newline), for evidence display.
    """

    line_no: int
    content: str
    fields: dict[str, str]
    raw: str

    @property
    def level(self) -> str:
        """Upper-cased level field if present, else ``""``."""
        for key in ("Level", "level", "Type", "severity", "Severity"):
            if key in self.fields:
                return self.fields[key].upper()
        return ""


@dataclass
class LineProblem:
    """Why one line was not (fully) used."""

    line_no: int
    reason: str


@dataclass
class IngestReport:
    """What happened to every line: parsed, repaired, or rejected (with line numbers).

    Only the first ``keep`` problems of each kind are kept verbatim; the counts are exact.
    """

    source: str
    lines_read: int = 0
    parsed: int = 0
    unparseable: int = 0
    undecodable: int = 0
    truncated: int = 0
    blank: int = 0
    fatal: str | None = None
    problems: list[LineProblem] = field(default_factory=list)
    keep: int = 20

    def add(self, line_no: int, reason: str) -> None:
        """Record a problem line (kept up to ``keep`` examples)."""
        if len(self.problems) < self.keep:
            self.problems.append(LineProblem(line_no, reason))

    def summary(self) -> str:
        """One human line, e.g. for the CLI footer."""
        parts = [f"{self.source}: {self.lines_read} lines read, {self.parsed} parsed"]
        for name in ("unparseable", "undecodable", "truncated", "blank"):
            count = getattr(self, name)
            if count:
                parts.append(f"{count} {name}")
        if self.fatal:
            parts.append(f"stopped early: {self.fatal}")
        text = ", ".join(parts)
        if self.problems:
            shown = "; ".join(f"line {p.line_no}: {p.reason}" for p in self.problems[:5])
            text += f" (e.g. {shown})"
        return text

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form for reports."""
        return {
            "source": self.source,
            "lines_read": self.lines_read,
            "parsed": self.parsed,
            "unparseable": self.unparseable,
            "undecodable": self.undecodable,
            "truncated": self.truncated,
            "blank": self.blank,
            "fatal": self.fatal,
            "problems": [{"line": p.line_no, "reason": p.reason} for p in self.problems],
        }


class LogFormat:
    """A loghub-style format string such as ``<Date> <Time> <Pid> <Level> <Component>: <Content>``.

    Compiled once to a regex (as in logparser). Whitespace in the format matches one
    or more spaces; the last field absorbs the rest of the line. A fast path splits
    on whitespace when the format allows it, because regex matching is a large part
    of ingest time on big files.
    """

    def __init__(self, spec: str) -> None:
        names = _FIELD.findall(spec)
        if not names:
            raise ValueError(f"format {spec!r} has no <Field> placeholders, e.g. '<Date> <Time> <Level> <Content>'")
        if "Content" not in names:
            raise ValueError(f"format {spec!r} must contain <Content>; fields found: {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"format {spec!r} repeats a field name: {names}")
        self.spec = spec
        self.names = tuple(names)
        pieces = _FIELD.split(spec)
        regex = ""
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                # loghub/logparser treat the text between fields as regex (their formats
                # write \[ and (\[<PID>\])?). A piece with a backslash or a group is
                # taken as regex like theirs; any other piece is literal text, so a
                # user's "[<Time>]" works without escaping.
                fragment = piece if ("\\" in piece or "(" in piece or ")" in piece) else re.escape(piece)
                regex += re.sub(r"(?:\\ |\s)+", r"\\s+", fragment)
            else:
                regex += f"(?P<{piece}>.*?)" if piece != "Content" else f"(?P<{piece}>.*)"
        self.regex = re.compile("^" + regex + "$")
        self._fast = self._fast_plan(pieces)

    @staticmethod
    def _fast_plan(pieces: list[str]) -> tuple[list[str], str] | None:
        # Fast path only for "<A> <B> ... <Z>: <Content>"-like formats: single-space
        # separators, with at most a literal suffix on the last header field.
        seps = pieces[2:-1:2]
        names = pieces[1::2]
        if pieces[0] or pieces[-1] or names[-1] != "Content":
            return None
        if any("\\" in s or "(" in s or ")" in s for s in seps):
            return None
        if any(s != " " for s in seps[:-1]):
            return None
        last = seps[-1] if seps else ""
        if not last.endswith(" ") or last.strip(" ") != last.rstrip(" ") or " " in last.strip():
            return None
        return names[:-1], last.rstrip(" ")

    def parse(self, line: str) -> tuple[dict[str, str], str] | None:
        """Split a line into (header fields, content), or ``None`` if it does not match."""
        if self._fast is not None:
            header_names, suffix = self._fast
            parts = line.split(" ", len(header_names))
            if len(parts) == len(header_names) + 1 and all(parts[:-1]):
                last = parts[-2]
                if not suffix or last.endswith(suffix):
                    if suffix:
                        parts[-2] = last[: -len(suffix)]
                    # The regex path's \s+ before <Content> eats extra spaces; match it.
                    return dict(zip(header_names, parts[:-1])), parts[-1].lstrip(" ")
        match = self.regex.match(line)
        if match is None:
            return None
        groups = {k: v or "" for k, v in match.groupdict().items()}
        content = groups.pop("Content")
        return groups, content


# Formats of the 16 loghub systems (from the loghub / logparser benchmark settings),
# so users can write ``--format hdfs`` instead of the full string.
KNOWN_FORMATS: dict[str, str] = {
    "hdfs": "<Date> <Time> <Pid> <Level> <Component>: <Content>",
    "hadoop": r"<Date> <Time> <Level> \[<Process>\] <Component>: <Content>",
    "spark": "<Date> <Time> <Level> <Component>: <Content>",
    "zookeeper": "<Date> <Time> - <Level>  \\[<Node>:<Component>@<Id>\\] - <Content>",
    "bgl": "<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> <Level> <Content>",
    "hpc": "<LogId> <Node> <Component> <State> <Time> <Flag> <Content>",
    "thunderbird": "<Label> <Timestamp> <Date> <User> <Month> <Day> <Time> <Location> <Component>(\\[<PID>\\])?: <Content>",
    "windows": "<Date> <Time>, <Level>                  <Component>    <Content>",
    "linux": "<Month> <Date> <Time> <Level> <Component>(\\[<PID>\\])?: <Content>",
    "android": "<Date> <Time>  <Pid>  <Tid> <Level> <Component>: <Content>",
    "healthapp": "<Time>\\|<Component>\\|<Pid>\\|<Content>",
    "apache": "\\[<Time>\\] \\[<Level>\\] <Content>",
    "proxifier": "\\[<Time>\\] <Program> - <Content>",
    "openssh": "<Date> <Day> <Time> <Component> sshd\\[<Pid>\\]: <Content>",
    "openstack": "<Logrecord> <Date> <Time> <Pid> <Level> <Component> \\[<ADDR>\\] <Content>",
    "mac": "<Month>  <Date> <Time> <User> <Component>\\[<PID>\\]( \\(<Address>\\))?: <Content>",
}


def resolve_format(spec: str) -> str:
    """Accept a known system name (``hdfs``) or a literal format string."""
    if "<" in spec:
        return spec
    key = spec.lower()
    if key not in KNOWN_FORMATS:
        raise ValueError(f"unknown log format {spec!r}; give a format string like "
                         f"'<Date> <Time> <Level> <Content>' or one of {sorted(KNOWN_FORMATS)}")
    return KNOWN_FORMATS[key]


def _open_binary(path: Path) -> io.BufferedIOBase:
    with path.open("rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _looks_binary(path: Path) -> bool:
    try:
        with _open_binary(path) as fh:
            head = fh.read(8192)
    except (OSError, EOFError, zlib.error):
        return False
    if not head:
        return False
    if b"\x00" in head:
        return True
    printable = sum(32 <= b < 127 or b in (9, 10, 13) or b >= 128 for b in head)
    return printable / len(head) < 0.85


def iter_lines(path: Path, report: IngestReport) -> Iterator[tuple[int, str]]:
    """Yield ``(line_no, text)``; decode UTF-8, fall back to Latin-1 per line (counted).

    Stops cleanly (recording ``report.fatal``) on a truncated or corrupt gzip stream.
    """
    with _open_binary(path) as fh:
        line_no = 0
        while True:
            try:
                raw = fh.readline(MAX_LINE_CHARS * 4 + 1)
            except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
                report.fatal = f"line {line_no + 1}: compressed stream is damaged ({exc}); kept the {line_no} lines before it"
                return
            if not raw:
                return
            cut = not raw.endswith(b"\n") and len(raw) > MAX_LINE_CHARS * 4
            if cut:
                # Over-long line: keep its head, skip the rest of it.
                try:
                    while True:
                        rest = fh.readline(1 << 20)
                        if not rest or rest.endswith(b"\n"):
                            break
                except (EOFError, zlib.error, OSError):
                    pass
            line_no += 1
            report.lines_read += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if cut and exc.start >= len(raw) - 3:
                    # The cut split a multi-byte character: drop its partial bytes.
                    text = raw[: exc.start].decode("utf-8", errors="replace")
                else:
                    text = raw.decode("latin-1")
                    report.undecodable += 1
                    report.add(line_no, f"not valid UTF-8 at byte {exc.start}; read as Latin-1")
            text = text.rstrip("\r\n")
            if cut or len(text) > MAX_LINE_CHARS:
                text = text[:MAX_LINE_CHARS]
                report.truncated += 1
                report.add(line_no, f"line longer than {MAX_LINE_CHARS} characters: truncated")
            yield line_no, text


def read_log(
    path: str | Path,
    log_format: str | None = None,
    *,
    json_content_key: str = "message",
    report: IngestReport | None = None,
) -> Iterator[LogRecord]:
    """Stream :class:`LogRecord` s from a text, gzip or JSON-lines log.

    Args:
        path: The log file (``.gz`` detected by magic bytes, not by name).
        log_format: Format string or known system name. ``None`` with a ``.jsonl``/
            ``.ndjson`` file (or a file whose first line is a JSON object) reads JSON
            lines; ``None`` otherwise treats each whole line as content.
        json_content_key: Key holding the message in JSON lines.
        report: Filled in as lines are read; pass one to see what was rejected.

    Raises:
        LogInputError: Missing, empty or binary file, or nothing matched the format.
    """
    path = Path(path)
    rep = report if report is not None else IngestReport(source=str(path))
    if not path.exists():
        raise LogInputError(f"{path}: no such file")
    if path.is_dir():
        raise LogInputError(f"{path}: is a directory, expected a log file")
    if path.stat().st_size == 0:
        raise LogInputError(f"{path}: file is empty")
    if _looks_binary(path):
        raise LogInputError(f"{path}: looks binary (NUL bytes or mostly non-text), not a log file")

    fmt = LogFormat(resolve_format(log_format)) if log_format else None
    json_mode = fmt is None and (path.suffix in (".jsonl", ".ndjson") or path.name.endswith((".jsonl.gz", ".ndjson.gz")))
    first = True
    for line_no, text in iter_lines(path, rep):
        if not text.strip():
            rep.blank += 1
            continue
        if fmt is None and first and not json_mode and text.lstrip().startswith("{"):
            json_mode = _is_json_object(text)
        first = False
        if json_mode:
            record = _parse_json_line(line_no, text, json_content_key, rep)
        elif fmt is not None:
            parsed = fmt.parse(text)
            if parsed is None:
                rep.unparseable += 1
                rep.add(line_no, f"does not match format {fmt.spec!r}")
                record = None
            else:
                record = LogRecord(line_no, parsed[1], parsed[0], text)
        else:
            record = LogRecord(line_no, text, {}, text)
        if record is not None:
            rep.parsed += 1
            yield record
    if rep.parsed == 0 and rep.lines_read > 0 and rep.fatal is None:
        what = f"format {fmt.spec!r}" if fmt else "JSON lines" if json_mode else "the reader"
        example = f"; first problem: line {rep.problems[0].line_no}: {rep.problems[0].reason}" if rep.problems else ""
        raise LogInputError(f"{path}: none of {rep.lines_read} lines could be parsed with {what}{example}")


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _parse_json_line(line_no: int, text: str, key: str, rep: IngestReport) -> LogRecord | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        rep.unparseable += 1
        rep.add(line_no, f"invalid JSON at column {exc.colno}: {exc.msg}")
        return None
    if not isinstance(obj, dict):
        rep.unparseable += 1
        rep.add(line_no, f"JSON value is a {type(obj).__name__}, expected an object")
        return None
    if key not in obj:
        rep.unparseable += 1
        rep.add(line_no, f"field {key!r} missing; keys: {sorted(obj)[:10]}")
        return None
    fields = {str(k): str(v) for k, v in obj.items() if k != key and isinstance(v, (str, int, float, bool))}
    return LogRecord(line_no, str(obj[key]), fields, text)
