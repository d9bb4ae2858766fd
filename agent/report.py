"""``anomaly-agent report INPUT... --out report.html``: one self-contained batch report, resumable.

What it does, and why each step is there:

1. **Inputs.** Log files (plain, gzip or JSON lines of log records) go through the same detection
   as ``anomaly-agent detect`` (:class:`detectors.logs.pipeline.LogPipeline`: fitted on ``--train``
   or on the leading ``--train-fraction`` of each input); JSON lines of candidates written by
   ``detect --out`` are read as they are (a bad line is reported with file, line, field and reason
   and skipped; the valid lines are kept).
2. **Run.** The run id is a hash of the inputs' sha256, the detection and explainer settings, the
   model, the prompt version and the rules and knowledge versions (:class:`agent.db.RunSpec`). All
   state lives in the SQLite database (:mod:`agent.db`): the candidates are stored once, in one
   transaction; every verdict is committed as soon as it is made. Rerunning the same command after
   a crash or ``kill -9`` finds the run, skips detection and explains only the candidates that have
   no verdict yet, so the final report is the same as an uninterrupted run's, with no verdict
   duplicated (``UNIQUE(run_id, candidate_id)``) or missing.
3. **Clustering.** Candidates with identical :func:`agent.explain.evidence_signature` (same
   detector, evidence kinds, reasons and templates; not line numbers, ids or scores) form one group.
   The group's representative (highest score) is explained first; the explainer's cache, keyed on
   that signature, then answers the other members without a model call, while each member still
   gets its own verdict from the :class:`agent.explain.Explainer` (its own score and matching
   rules decide its label and severity).
4. **Report.** ``report.html`` (Jinja2, ``agent/templates/report.html.j2``; charts as inline SVG,
   no scripts, fonts, images or styles fetched from anywhere), plus ``report.json`` and
   ``report.csv`` next to it: an executive summary (counts by label, severity and type, top groups,
   model calls per 1,000 candidates), the groups by anomaly type with each member's evidence,
   verdict, citations and severity, and the provenance (model, adapter, prompt, rules and knowledge
   versions, detector settings, input hashes).

Test hook: the environment variable ``ANOMALY_AGENT_REPORT_TEST_DELAY`` (seconds, default 0) makes
the report sleep that long before each verdict, so a test can kill it midway. It is not part of
the run's settings and changes no result.

Wiring (``agent/cli.py`` owns the command)::

    rp = sub.add_parser("report", help="explain everything in one resumable HTML/JSON/CSV report")
    report.add_arguments(rp)
    rp.set_defaults(func=report.run)
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import html
import io
import json
import math
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from agent.db import (
    CandidateRow,
    Conflict,
    Database,
    DBError,
    InputFile,
    Run,
    RunSpec,
    RunStatus,
    VerdictRow,
)
from agent.records import Candidate, Label, Severity
from agent.settings import env_setting as _env

__all__ = [
    "DetectSettings",
    "LineIssue",
    "ReportInputError",
    "ReportOptions",
    "ReportResult",
    "TEST_DELAY_ENV",
    "add_arguments",
    "build_explainer",
    "build_report",
    "finding_of",
    "generate_report",
    "group_key",
    "make_pipeline",
    "main",
    "read_candidates",
    "render_html",
    "run",
    "sniff_kind",
]

REPORT_FORMAT = 1
"""Version of the report JSON layout."""

TEST_DELAY_ENV = "ANOMALY_AGENT_REPORT_TEST_DELAY"
"""Test hook: seconds to sleep before each verdict (lets a test kill a run midway)."""

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_NAME = "report.html.j2"

UNSUPPORTED_SUFFIXES: dict[str, str] = {
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"), "an image"),
    **dict.fromkeys((".mp4", ".avi", ".mov", ".mkv", ".webm"), "a video"),
    **dict.fromkeys((".csv", ".tsv", ".parquet", ".npz", ".npy", ".xlsx"), "a table (time series are not in reports yet)"),
    **dict.fromkeys((".pdf", ".docx", ".html", ".htm", ".md"), "a document (add it with `anomaly-agent knowledge add`)"),
    **dict.fromkeys((".zip", ".tar", ".7z", ".sqlite", ".db"), "an archive or database"),
}
"""File types the report refuses up front, with what they look like (the reason in the error)."""

CANDIDATE_KEYS = frozenset({"id", "source", "modality", "detector", "score", "threshold"})
"""A JSON object with all of these is a candidate (``detect --out``), not a log record."""

SEVERITY_NAMES = {int(s): s.name.lower() for s in Severity}
SEVERITY_COLOURS = {0: "#9aa5b1", 1: "#4c9f70", 2: "#d9a400", 3: "#e8730c", 4: "#c2261f"}
LABEL_COLOURS = {"anomaly": "#c2261f", "uncertain": "#d9a400", "normal": "#4c9f70"}


# ============================================================================ errors and inputs

class ReportInputError(ValueError):
    """A problem with the user's input or settings: one line, exit status 2.

    A ValueError, so the ``anomaly-agent`` entry point reports it the same way when it calls :func:`run`.
    """


@dataclass(frozen=True)
class LineIssue:
    """One line of a candidates file that could not be used.

    Attributes:
        path: The file.
        line: 1-based line number.
        field: The offending field (dotted path), or ``line`` when the line itself is unreadable.
        reason: Why, in words.
    """

    path: str
    line: int
    field: str
    reason: str

    def text(self) -> str:
        """The one-line message, naming file, line, field and reason."""
        return f"{self.path}: line {self.line}: field {self.field!r}: {self.reason}"


def sniff_kind(path: Path) -> str:
    """``"candidates"`` for JSON lines of candidates, ``"log"`` for anything a log reader takes.

    Decided by content (the first non-blank line is a JSON object with the candidate keys), so a
    ``.jsonl`` of log records is still a log.

    Raises:
        ReportInputError: Missing, a directory, empty, or a type the report does not take.
    """
    if not path.exists():
        raise ReportInputError(f"{path}: no such file")
    if path.is_dir():
        raise ReportInputError(f"{path}: is a directory; give log files or candidate JSON lines")
    suffix = path.suffix.lower()
    if suffix == ".gz":
        suffix = Path(path.stem).suffix.lower() or ".gz"
    if suffix in UNSUPPORTED_SUFFIXES:
        raise ReportInputError(f"{path}: unsupported file type {suffix!r} ({UNSUPPORTED_SUFFIXES[suffix]}); the report "
                               "takes log files (text, .gz, JSON lines of log records) or candidate JSON lines "
                               "from `anomaly-agent detect --out`")
    if path.stat().st_size == 0:
        raise ReportInputError(f"{path}: file is empty")
    try:
        with _open_maybe_gzip(path) as fh:
            head = fh.read(1 << 16)
    except (OSError, EOFError) as exc:
        raise ReportInputError(f"{path}: cannot read: {exc}") from None
    for raw in head.splitlines():
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError:
                return "log"  # JSON-ish text, or a line longer than the head: the log reader decides
            if isinstance(obj, dict) and CANDIDATE_KEYS <= obj.keys():
                return "candidates"
        return "log"
    return "log"


def _open_maybe_gzip(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when it starts with the gzip magic (as the log reader decides)."""
    with path.open("rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else path.open("rb")  # type: ignore[return-value]


def read_candidates(path: Path, issues: list[LineIssue]) -> list[Candidate]:
    """Every valid candidate of a JSON-lines file (plain or gzip); each bad line goes to ``issues``.

    Raises:
        ReportInputError: The file cannot be read or has no valid candidate at all (names the
            first problem).
    """
    out: list[Candidate] = []
    first_issue = len(issues)
    try:
        with _open_maybe_gzip(path) as fh:
            for line_no, raw in enumerate(fh, 1):
                if (issue := _candidate_line(path, line_no, raw, out)) is not None:
                    issues.append(issue)
    except (OSError, EOFError) as exc:
        raise ReportInputError(f"{path}: cannot read: {exc}") from None
    if not out:
        mine = issues[first_issue:]
        detail = f"; first problem: {mine[0].text()}" if mine else ""
        raise ReportInputError(f"{path}: no valid candidates in the file{detail}")
    return out


def _candidate_line(path: Path, line_no: int, raw: bytes, out: list[Candidate]) -> LineIssue | None:
    """Parse one line into ``out``; the problem with it, if any."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return LineIssue(str(path), line_no, "line", f"not valid UTF-8 at byte {exc.start}")
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineIssue(str(path), line_no, "line", f"invalid JSON at column {exc.colno}: {exc.msg}")
    try:
        out.append(Candidate.model_validate(obj))
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(x) for x in errors[0].get("loc", ())) or "line"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        return LineIssue(str(path), line_no, where, f"{errors[0].get('msg')}{more}")
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """Hex sha256 and size of a file, read in chunks (large logs stay out of memory)."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


# ============================================================================ settings

@dataclass(frozen=True)
class DetectSettings:
    """How log inputs are turned into candidates (the options of ``anomaly-agent detect``).

    Attributes:
        format: Format string or system name.
        parser: drain3 preset.
        detector: Registry name.
        id_pattern: Session id regex (``group="session"``).
        group: ``session``, ``count`` or ``time``.
        window: Window size (lines or seconds) for count/time grouping.
        step: Window step (``None`` = tumbling).
        max_idle_lines: Sessions idle this long are closed and scored.
        train: A log of normal operation to fit on; ``None`` fits on each input's leading share.
        train_fraction: That share.
    """

    format: str = "hdfs"
    parser: str = "hdfs"
    detector: str = "log-ensemble"
    id_pattern: str = r"blk_-?\d+"
    group: str = "session"
    window: float = 100.0
    step: float | None = None
    max_idle_lines: int = 200_000
    train: Path | None = None
    train_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.group not in ("session", "count", "time"):
            raise ReportInputError(f"--group {self.group!r} is not one of session, count, time")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ReportInputError(f"--train-fraction must be in (0, 1], got {self.train_fraction}")

    def grouping(self) -> dict[str, Any]:
        """The :class:`detectors.logs.sessions.Sessionizer` settings."""
        if self.group == "session":
            return {"mode": "session", "id_pattern": self.id_pattern, "max_idle_lines": self.max_idle_lines}
        return {"mode": self.group, "size": self.window, "step": self.step}

    def as_settings(self, train_sha256: str | None) -> dict[str, Any]:
        """JSON for the run's settings: everything that changes the candidates (the training log by hash)."""
        from detectors.logs.templates import load_preset
        from detectors.registry import make_detector

        return {"format": self.format, "parser": self.parser, "parser_config": load_preset(self.parser).to_dict(),
                "detector": self.detector, "detector_params": _jsonable(make_detector(self.detector).get_params()),
                "grouping": self.grouping(),
                "train": ({"name": self.train.name, "sha256": train_sha256} if self.train is not None
                          else {"leading_fraction": self.train_fraction})}


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings (``"inf"``), other odd values their repr."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


@dataclass(frozen=True)
class ReportOptions:
    """Where things go and how the report looks (none of it changes a verdict).

    Attributes:
        out: The HTML file; ``report.json`` and ``report.csv`` go next to it (same stem).
        db: The SQLite database (:mod:`agent.db`).
        detection: How log inputs are detected.
        html_members: Members listed per group in the HTML (all are in the JSON and CSV).
        quiet: No progress bars or status lines.
    """

    out: Path
    db: Path
    detection: DetectSettings = field(default_factory=DetectSettings)
    html_members: int = 200
    quiet: bool = False


@dataclass(frozen=True)
class ReportResult:
    """What :func:`generate_report` did.

    Attributes:
        run_id: The run.
        paths: ``{"html": ..., "json": ..., "csv": ...}``.
        candidates: Candidates in the run.
        groups: Clusters of identical evidence signature.
        verdicts_found: Verdicts already in the database when this invocation started (resume).
        verdicts_made: Verdicts made by this invocation.
        model_calls: Model calls over the whole run (all invocations), from the database.
        model_calls_per_1000: ``1000 * model_calls / candidates``.
        issues: Skipped lines of candidate files.
        elapsed_s: Wall time of this invocation.
    """

    run_id: str
    paths: dict[str, Path]
    candidates: int
    groups: int
    verdicts_found: int
    verdicts_made: int
    model_calls: int
    model_calls_per_1000: float
    issues: tuple[LineIssue, ...]
    elapsed_s: float


# ============================================================================ detection

def _status(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def make_pipeline(settings: DetectSettings) -> Any:
    """An unfitted :class:`detectors.logs.pipeline.LogPipeline` for ``settings`` (as ``cmd_detect`` builds it)."""
    from detectors.logs.pipeline import LogPipeline
    from detectors.logs.templates import load_preset
    from detectors.registry import make_detector

    return LogPipeline(make_detector(settings.detector), log_format=settings.format,
                       parser=load_preset(settings.parser), grouping=settings.grouping())


def detect_log(path: Path, settings: DetectSettings, source: str, *, fitted: Any | None = None,
               quiet: bool = True) -> tuple[list[Candidate], dict[str, Any]]:
    """Candidates of one log file, as ``anomaly-agent detect`` finds them.

    Without a fitted pipeline the detector is fitted on the leading ``train_fraction`` of this
    file's parsed lines. Unlike ``cmd_detect`` (which holds every record in memory to take its
    first 20%), this counts the records in one streaming pass and then reads only the leading
    share, so memory is bounded by the fitting share and the open sessions.

    Args:
        path: The log.
        settings: Detection settings.
        source: The candidates' ``source`` (the file name, or the path when names clash).
        fitted: A pipeline already fitted on ``--train`` (shared by all inputs), or ``None``.
        quiet: No status lines.

    Returns:
        (candidates, info for the run: ingest report, sequences scored, unseen lines, fit).
    """
    from detectors.logs.ingest import IngestReport, read_log

    pipe = fitted
    fit_info: dict[str, Any]
    if pipe is None:
        pipe = make_pipeline(settings)
        total = sum(1 for _ in read_log(path, settings.format))
        n_fit = max(1, int(total * settings.train_fraction))
        _status(quiet, f"fitting {settings.detector} on the first {n_fit} of {total} parsed lines of {path} "
                       "(assumed mostly normal; pass --train for a log of normal operation)")
        pipe.fit_sequences(list(islice(read_log(path, settings.format, report=IngestReport(source=str(path))), n_fit)))
        fit_info = {"leading_records": n_fit, "of": total}
    else:
        fit_info = {"train": settings.train.name if settings.train else None}
    _status(quiet, f"detecting in {path} ...")
    result = pipe.detect(path, source=source)
    info = {"ingest": result.report.to_dict(), "sequences_scored": result.sequences_scored,
            "lines_without_session": result.lines_without_session, "unseen_lines": result.unseen_lines,
            "fit": fit_info, "candidates": len(result.candidates)}
    _status(quiet, f"{result.report.summary()}; {len(result.candidates)} candidate(s) of "
                   f"{result.sequences_scored} sequences")
    return result.candidates, info


def group_key(candidate: Candidate) -> str:
    """``G-`` + 12 hex digits of sha256 over the candidate's evidence signature (its cluster)."""
    from agent.explain import evidence_signature

    material = json.dumps(evidence_signature(candidate), sort_keys=True, default=str, ensure_ascii=False)
    return "G-" + hashlib.sha256(material.encode("utf-8")).hexdigest()[:12]


def _collect_candidates(inputs: Sequence[tuple[Path, InputFile]], settings: DetectSettings, issues: list[LineIssue],
                        quiet: bool) -> tuple[list[Candidate], dict[str, Any]]:
    """All candidates of all inputs, in input order (each log's highest score first)."""
    logs = [p for p, f in inputs if f.kind == "log"]
    fitted = None
    info: dict[str, Any] = {}
    if logs and settings.train is not None:
        fitted = make_pipeline(settings)
        _status(quiet, f"fitting {settings.detector} on {settings.train} ...")
        info["train"] = fitted.fit(settings.train).to_dict()
    names = Counter(p.name for p in logs)
    out: list[Candidate] = []
    seen: dict[str, str] = {}
    per_input: list[dict[str, Any]] = []
    for path, f in inputs:
        if f.kind == "log":
            source = path.name if names[path.name] == 1 else str(path)
            cands, detail = detect_log(path, settings, source, fitted=fitted, quiet=quiet)
        else:
            before = len(issues)
            cands = read_candidates(path, issues)
            detail = {"candidates": len(cands), "skipped_lines": len(issues) - before}
        for c in cands:
            if c.id in seen:
                raise ReportInputError(f"candidate id {c.id!r} is in both {seen[c.id]} and {path}; "
                                       "ids must be unique within one report (give each input once)")
            seen[c.id] = str(path)
        out.extend(cands)
        per_input.append({"path": f.path, "kind": f.kind, **detail})
    info["inputs"] = per_input
    return out, info


# ============================================================================ run

def explainer_settings(explainer: Any) -> dict[str, Any]:
    """Explainer settings that change verdicts (the model and versions are in the spec itself)."""
    return {"retrieval": explainer.store is not None, "passages": explainer.k_passages,
            "min_passage_score": explainer.min_passage_score, "max_tokens": explainer.max_tokens,
            "weights": _jsonable(asdict(explainer.weights)), "cache": explainer.cache is not None}


def _test_delay() -> float:
    raw = os.environ.get(TEST_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ReportInputError(f"{TEST_DELAY_ENV}={raw!r} is not a number of seconds") from None
    if not value >= 0:
        raise ReportInputError(f"{TEST_DELAY_ENV}={raw!r} must be >= 0 seconds")
    return value


def _plan(rows: Sequence[CandidateRow]) -> tuple[list[CandidateRow], dict[str, list[CandidateRow]]]:
    """Processing order and groups: groups by their first candidate, each representative first.

    The representative of a group is its highest-scoring member (earliest on ties), so the
    explanation the others reuse from the cache is the one for the clearest case.
    """
    groups: dict[str, list[CandidateRow]] = {}
    for row in rows:
        groups.setdefault(row.group_key, []).append(row)
    order: list[CandidateRow] = []
    for members in groups.values():
        rep = min(members, key=lambda r: (-r.score, r.seq))
        members.sort(key=lambda r: (r is not rep, r.seq))
        order.extend(members)
    return order, groups


def generate_report(inputs: Sequence[str | Path], options: ReportOptions, explainer: Any) -> ReportResult:
    """Detect (or load) candidates, explain every one not yet explained, and write the report.

    Args:
        inputs: Log files and/or candidate JSON-lines files.
        options: Output, database and detection settings.
        explainer: An :class:`agent.explain.Explainer` (``model=None`` gives rules-only verdicts).

    Returns:
        What was done; see :class:`ReportResult`.

    Raises:
        ReportInputError: Bad inputs or settings (one line each).
        agent.db.DBError: Database problems (e.g. a database written by a newer version).
    """
    t_start = time.perf_counter()
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ReportInputError("no input files; give log files or candidate JSON lines")
    if len({p.resolve() for p in paths}) != len(paths):
        raise ReportInputError("the same input file is given twice")
    files: list[tuple[Path, InputFile]] = []
    for p in paths:
        kind = sniff_kind(p)
        digest, size = sha256_file(p)
        files.append((p, InputFile(path=str(p), sha256=digest, size=size, kind=kind)))
    det = options.detection
    settings: dict[str, Any] = {"explain": explainer_settings(explainer)}
    if any(f.kind == "log" for _, f in files):
        if det.train is not None:
            if not det.train.is_file():
                raise ReportInputError(f"--train {det.train}: no such file")
            train_sha = sha256_file(det.train)[0]
        else:
            train_sha = None
        settings["detection"] = det.as_settings(train_sha)
    prov = explainer.provenance()
    spec = RunSpec(inputs=tuple(f for _, f in files), settings=settings, model_id=prov.model_id, adapter=prov.adapter,
                   prompt_version=prov.prompt_version, rules_version=prov.rules_version,
                   knowledge_version=prov.knowledge_version)
    issues: list[LineIssue] = []
    with Database(options.db) as db:
        run_row, _ = db.get_or_create_run(spec)
        if run_row.status is RunStatus.CREATED:  # candidates are stored with the move to "explaining"
            cands, info = _collect_candidates(files, det, issues, options.quiet)
            info["skipped_lines"] = [asdict(i) for i in issues[:200]]
            info["skipped_lines_total"] = len(issues)
            db.add_candidates(run_row.id, ((c, group_key(c)) for c in cands), info=info)
        else:
            issues = [LineIssue(**i) for i in run_row.info.get("skipped_lines", [])]
            _status(options.quiet, f"resuming run {run_row.id} ({run_row.status.value}): detection already done")
        for issue in issues:
            _status(options.quiet, f"warning: skipped {issue.text()}")
        rows = db.candidates(run_row.id)
        order, groups = _plan(rows)
        pending_ids = {r.candidate_id for r in db.pending_candidates(run_row.id)}
        found = len(rows) - len(pending_ids)
        if found:
            _status(options.quiet, f"run {run_row.id}: {found} of {len(rows)} verdicts already in {options.db}; "
                                   f"explaining the other {len(pending_ids)}")
        try:
            made = _explain_pending(db, run_row.id, [r for r in order if r.candidate_id in pending_ids], explainer,
                                    total=len(rows), done=found, quiet=options.quiet)
        except Exception as exc:  # recorded for whoever looks at the run; rerunning resumes it
            db.set_run_status(run_row.id, RunStatus.FAILED, info={"error": f"{type(exc).__name__}: {exc}"[:500]})
            raise
        if db.count_verdicts(run_row.id) != len(rows):
            raise DBError(f"run {run_row.id}: {db.count_verdicts(run_row.id)} verdicts for {len(rows)} candidates")
        run_row = db.set_run_status(run_row.id, RunStatus.DONE)
        verdicts = db.verdicts(run_row.id)
    citations = _citations(explainer, verdicts)
    report = build_report(run_row, rows, verdicts, citations=citations)
    elapsed = time.perf_counter() - t_start
    report["timing"] = {"this_invocation": {"elapsed_s": round(elapsed, 3), "verdicts_found": found,
                                            "verdicts_made": made, "explainer_stats": explainer.stats.as_dict()},
                        "explain_s_total": round(sum(v.elapsed_s for v in verdicts), 3)}
    written = write_report(report, options.out, html_members=options.html_members)
    summary = report["summary"]
    return ReportResult(run_id=run_row.id, paths=written, candidates=len(rows), groups=len(groups),
                        verdicts_found=found, verdicts_made=made, model_calls=summary["model_calls"],
                        model_calls_per_1000=summary["model_calls_per_1000"], issues=tuple(issues), elapsed_s=elapsed)


def _explain_pending(db: Database, run_id: str, pending: Sequence[CandidateRow], explainer: Any, *,
                     total: int, done: int, quiet: bool) -> int:
    """Explain ``pending`` in order, committing each verdict at once; returns how many were made."""
    from tqdm import tqdm

    delay = _test_delay()
    stats = explainer.stats
    made = 0
    with tqdm(total=total, initial=done, desc="explaining", unit="cand", file=sys.stderr,
              disable=True if quiet else None, dynamic_ncols=True) as bar:
        for row in pending:
            if delay:
                time.sleep(delay)
            calls, hits = stats.model_calls, stats.cache_hits
            t0 = time.perf_counter()
            verdict = explainer.explain(row.candidate)
            try:
                db.record_verdict(run_id, row.candidate_id, verdict, model_calls=stats.model_calls - calls,
                                  cache_hit=stats.cache_hits > hits, elapsed_s=time.perf_counter() - t0)
                made += 1
            except Conflict:  # another process running the same report got there first: keep its verdict
                pass
            bar.update(1)
    return made


def _citations(explainer: Any, verdicts: Sequence[VerdictRow]) -> dict[str, dict[str, Any]]:
    """Text of every cited passage and rule, so the report can show what a citation says."""
    passage_ids = sorted({p for v in verdicts for p in v.verdict.passage_ids})
    rule_ids = sorted({r for v in verdicts for r in v.verdict.rule_ids})
    passages: dict[str, Any] = {}
    if passage_ids and explainer.store is not None:
        try:
            for p in explainer.store.get(passage_ids):
                passages[p.id] = {"source": p.source, "heading": p.heading, "text": p.text[:600], "example": p.example}
        except Exception as exc:  # the report still renders; the ids stay, without text
            passages = {pid: {"source": "?", "heading": "", "text": f"(not readable: {type(exc).__name__})",
                              "example": False} for pid in passage_ids}
    rules = {r.id: {"text": r.text, "effect": r.effect.value if r.effect else None, "version": r.version}
             for r in explainer.rules if r.id in set(rule_ids)}
    return {"passages": passages, "rules": rules}


# ============================================================================ report data

def _evidence(candidate: Candidate, max_text: int = 5) -> list[dict[str, Any]]:
    out = []
    for ev in candidate.evidence:
        d = ev.data
        text = d.get("text") if isinstance(d.get("text"), list) else []
        lines = d.get("lines") if isinstance(d.get("lines"), list) else []
        out.append({"id": ev.id, "kind": ev.kind.value, "summary": ev.summary, "reason": d.get("reason"),
                    "lines": lines, "text": [str(t)[:400] for t in text[:max_text]],
                    "templates": [str(t) for t in d.get("templates", [])[:max_text]]
                    if isinstance(d.get("templates"), list) else [],
                    "artifact": ev.artifact, "data": d})
    return out


def finding_of(candidate: Candidate) -> str:
    """What the detector found, in words: the most common evidence reason (e.g. ``unseen template``).

    Reports are sectioned by this rather than by the verdict's free-text ``anomaly_type``: it comes
    from the detector, so it is the same for every model and every run, and a small model's odd type
    names ("1", "user") cannot scatter one kind of finding over many sections.
    """
    reasons = Counter(str(ev.data["reason"]) for ev in candidate.evidence if isinstance(ev.data.get("reason"), str))
    if not reasons:
        return f"{candidate.modality.value} finding"
    return reasons.most_common(1)[0][0].replace("_", " ")


def _type_of(v: VerdictRow) -> str:
    t = v.verdict.anomaly_type.strip().lower() if v.final_label is not Label.NORMAL else "none"
    return t or "unspecified"


def build_report(run_row: Run, rows: Sequence[CandidateRow], verdicts: Sequence[VerdictRow], *,
                 citations: Mapping[str, Mapping[str, Any]] | None = None, top_groups: int = 10) -> dict[str, Any]:
    """The report as JSON-ready data (what ``report.json`` holds and the HTML renders).

    Deterministic for a run: the same candidates and verdicts give the same data, whatever
    invocations made them; the only time-dependent values are ``generated``, ``run.created``,
    ``run.updated`` and (added by the caller) ``timing``.
    """
    by_cand = {v.candidate_id: v for v in verdicts}
    missing = [r.candidate_id for r in rows if r.candidate_id not in by_cand]
    if missing:
        raise DBError(f"run {run_row.id}: {len(missing)} candidate(s) without a verdict, e.g. {missing[:3]}")
    _, groups = _plan(rows)
    candidates = []
    for r in rows:
        v = by_cand[r.candidate_id]
        c = r.candidate
        candidates.append({
            "id": c.id, "seq": r.seq, "group": r.group_key, "source": c.source, "modality": c.modality.value,
            "detector": c.detector, "score": c.score, "threshold": c.threshold, "locator": c.locator,
            "evidence": _evidence(c), "verdict": v.verdict.model_dump(mode="json"),
            "finding": finding_of(c), "type": _type_of(v), "final_label": v.final_label.value,
            "final_severity": int(v.final_severity), "review": v.review.value, "model_calls": v.model_calls, "cache_hit": v.cache_hit})
    cand_by_id = {c["id"]: c for c in candidates}
    group_list = []
    for key, members in groups.items():
        rep = members[0]
        rv = by_cand[rep.candidate_id]
        labels = Counter(by_cand[m.candidate_id].final_label.value for m in members)
        sevs = [int(by_cand[m.candidate_id].final_severity) for m in members]
        reasons = sorted({str(e.data.get("reason")) for e in rep.candidate.evidence if e.data.get("reason")})
        group_list.append({
            "key": key, "finding": finding_of(rep.candidate), "type": _type_of(rv), "size": len(members),
            "representative": rep.candidate_id, "members": [m.candidate_id for m in members], "detector": rep.candidate.detector,
            "reasons": reasons, "labels": dict(sorted(labels.items())), "max_severity": max(sevs),
            "summary": rv.verdict.summary, "explained_by": rv.verdict.explained_by.value,
            "model_calls": sum(by_cand[m.candidate_id].model_calls for m in members),
            "score_max": max(m.score for m in members), "score_min": min(m.score for m in members)})
    sections: dict[str, list[str]] = {}
    for g in sorted(group_list, key=lambda g: (-g["max_severity"], -g["size"], g["key"])):
        sections.setdefault(g["finding"], []).append(g["key"])
    n = len(rows)
    model_calls = sum(v.model_calls for v in verdicts)
    top = sorted(group_list, key=lambda g: (-g["max_severity"], -g["size"], -g["score_max"], g["key"]))[:top_groups]
    settings = run_row.settings
    summary = {
        "candidates": n, "groups": len(group_list),
        "by_label": _count(v.final_label.value for v in verdicts),
        "by_severity": {SEVERITY_NAMES[s]: c for s, c in sorted(Counter(int(v.final_severity) for v in verdicts).items())},
        "by_type": dict(Counter(cand_by_id[r.candidate_id]["type"] for r in rows).most_common()),
        "by_finding": dict(Counter(cand_by_id[r.candidate_id]["finding"] for r in rows).most_common()),
        "by_detector": _count(r.detector for r in rows),
        "by_explained_by": _count(v.explained_by.value for v in verdicts),
        "reviewed": sum(v.review.value != "unreviewed" for v in verdicts),
        "model_calls": model_calls,
        "model_calls_per_1000": round(1000.0 * model_calls / n, 1) if n else 0.0,
        "cache_hits": sum(v.cache_hit for v in verdicts),
        "top_groups": [{k: g[k] for k in ("key", "finding", "type", "size", "max_severity", "labels", "representative",
                                          "summary")} for g in top],
    }
    return {
        "format": REPORT_FORMAT,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": {"id": run_row.id, "status": run_row.status.value, "created": run_row.created,
                "updated": run_row.updated, "inputs": [f.to_dict() for f in run_row.inputs], "info": run_row.info},
        "provenance": {"model_id": run_row.model_id, "adapter": run_row.adapter,
                       "prompt_version": run_row.prompt_version, "rules_version": run_row.rules_version,
                       "knowledge_version": run_row.knowledge_version,
                       "detection": settings.get("detection"), "explain": settings.get("explain")},
        "summary": summary,
        "sections": [{"finding": t, "groups": keys} for t, keys in sections.items()],
        "groups": group_list,
        "candidates": candidates,
        "citations": {"passages": dict((citations or {}).get("passages", {})),
                      "rules": dict((citations or {}).get("rules", {}))},
    }


def _count(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


# ============================================================================ rendering

def svg_bars(title: str, items: Sequence[tuple[str, int]], colours: Mapping[str, str] | None = None,
             width: int = 360) -> str:
    """A horizontal bar chart as inline SVG (no plotting library, nothing fetched, escaped labels)."""
    bar_h, gap, label_w = 18, 6, 130
    height = 24 + len(items) * (bar_h + gap)
    peak = max((v for _, v in items), default=0) or 1
    parts = [f'<svg role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>{html.escape(title)}</title>',
             f'<text x="0" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for i, (label, value) in enumerate(items):
        y = 24 + i * (bar_h + gap)
        w = max(1, int((width - label_w - 50) * value / peak))
        colour = (colours or {}).get(label, "#3b6ea8")
        parts.append(f'<text x="0" y="{y + 13}" font-size="12">{html.escape(label[:20])}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w}" height="{bar_h}" fill="{colour}"/>'
                     f'<text x="{label_w + w + 4}" y="{y + 13}" font-size="12">{value}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters in report.json)"


def render_html(report: Mapping[str, Any], *, html_members: int = 200) -> str:
    """The self-contained HTML page for ``report`` (autoescaped: log text is untrusted)."""
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["sevname"] = lambda s: SEVERITY_NAMES.get(int(s), str(s))
    env.filters["tojson_compact"] = lambda v, limit=3000: _clip(json.dumps(v, sort_keys=True, default=str), limit)
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=1, sort_keys=True, default=str)
    s = report["summary"]
    charts = [
        svg_bars("Final label", list(s["by_label"].items()), LABEL_COLOURS),
        svg_bars("Severity", list(s["by_severity"].items()),
                 {SEVERITY_NAMES[k]: c for k, c in SEVERITY_COLOURS.items()}),
        svg_bars("Finding", list(s["by_finding"].items())[:8]),
        svg_bars("Verdict type (top 8)", list(s["by_type"].items())[:8]),
    ]
    cand = {c["id"]: c for c in report["candidates"]}
    groups = {g["key"]: g for g in report["groups"]}
    return env.get_template(TEMPLATE_NAME).render(
        r=report, s=s, charts=[Markup(c) for c in charts], cand=cand, groups=groups, html_members=html_members,
        severity_colours=SEVERITY_COLOURS, label_colours=LABEL_COLOURS)


CSV_COLUMNS = ("candidate_id", "group", "finding", "type", "final_label", "final_severity", "label", "severity", "review",
               "explained_by", "confidence", "score", "threshold", "detector", "source", "sequence", "first_line",
               "last_line", "evidence_ids", "passage_ids", "rule_ids", "model_calls", "cache_hit", "summary")


def render_csv(report: Mapping[str, Any]) -> str:
    """One row per candidate with its verdict (spreadsheet-friendly; ids joined with spaces)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in report["candidates"]:
        v = c["verdict"]
        loc = c["locator"]
        writer.writerow([c["id"], c["group"], c["finding"], c["type"], c["final_label"], c["final_severity"], v["label"],
                         v["severity"], c["review"], v["explained_by"], v["confidence"], c["score"], c["threshold"],
                         c["detector"], c["source"], loc.get("sequence", ""), loc.get("first_line", ""),
                         loc.get("last_line", ""), " ".join(v["evidence_ids"]), " ".join(v["passage_ids"]),
                         " ".join(v["rule_ids"]), c["model_calls"], int(c["cache_hit"]), v["summary"]])
    return buf.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a killed run never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: Mapping[str, Any], out: Path, *, html_members: int = 200) -> dict[str, Path]:
    """Write ``out`` (HTML) and ``<stem>.json``, ``<stem>.csv`` beside it; returns the three paths."""
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportInputError(f"--out {out}: must end in .html (report.json and report.csv are written beside it)")
    paths = {"html": out, "json": out.with_suffix(".json"), "csv": out.with_suffix(".csv")}
    _atomic_write(paths["json"], json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n")
    _atomic_write(paths["csv"], render_csv(report))
    _atomic_write(paths["html"], render_html(report, html_members=html_members))
    return paths


# ============================================================================ command line



def _default_store() -> str:
    return str(_env("store", str(Path(os.environ.get("XDG_DATA_HOME", "~/.local/share")) / "anomaly-agent")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` options to ``parser`` (defaults from ``ANOMALY_AGENT_<OPTION>``)."""
    from agent.options import add_log_options, add_window_options
    from detectors.registry import known_detectors

    log_detectors = [d for d in known_detectors() if d.startswith(("log-", "baseline-loglizer"))]
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="log files (text, .gz, JSON lines of log records) and/or candidate JSON lines "
                             "written by `anomaly-agent detect --out`")
    parser.add_argument("--out", default=_env("report_out", "report.html"),
                        help="the HTML report; report.json and report.csv go next to it (same stem)")
    parser.add_argument("--db", default=_env("db", None),
                        help="SQLite database of runs and verdicts (default: <store>/agent.db); "
                             "rerun the same command to resume an interrupted run")
    parser.add_argument("--model", default=_env("model", "smollm2-135m"),
                        help="smollm2-135m (embedded), qwen2.5-coder-0.5b/1.5b, llama-cpp, openai, or none (rules only)")
    parser.add_argument("--store", default=_default_store(), help="knowledge/rules store directory")
    parser.add_argument("--no-knowledge", action="store_true", help="do not retrieve passages")
    parser.add_argument("--cache-dir", default=_env("cache_dir", None),
                        help="explanation cache (default: <store>/explain-cache)")
    g = parser.add_argument_group("detection (log inputs; as in `anomaly-agent detect`)")
    add_log_options(g, log_detectors)
    add_window_options(g, fraction_of="each log input")
    parser.add_argument("--html-members", type=int, default=_env("html_members", 200),
                        help="members listed per group in the HTML (all are in report.json and report.csv)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")


def build_explainer(args: argparse.Namespace) -> Any:
    """The :class:`agent.explain.Explainer` the options describe (model not loaded until first use)."""
    from agent.explain import Explainer
    from knowledge.rules import RuleBook

    store_dir = Path(args.store).expanduser()
    store = None
    if not args.no_knowledge and store_dir.exists():
        from knowledge.store import KnowledgeStore

        store = KnowledgeStore(store_dir)
    model = None
    if args.model != "none":
        from agent.models import make_model

        model = make_model(args.model)
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else store_dir / "explain-cache"
    return Explainer(model, store=store, rules=RuleBook(store_dir), cache_dir=cache_dir)


def run(args: argparse.Namespace) -> int:
    """Run the report for parsed arguments; raises on user errors (see :func:`main`)."""
    if args.html_members < 1:
        raise ReportInputError(f"--html-members must be >= 1, got {args.html_members}")
    detection = DetectSettings(format=args.format, parser=args.parser, detector=args.detector,
                               id_pattern=args.id_pattern, group=args.group, window=args.window, step=args.step,
                               max_idle_lines=args.max_idle_lines,
                               train=Path(args.train) if args.train else None, train_fraction=args.train_fraction)
    db = Path(args.db).expanduser() if args.db else Path(args.store).expanduser() / "agent.db"
    options = ReportOptions(out=Path(args.out), db=db, detection=detection, html_members=args.html_members,
                            quiet=args.quiet)
    if Path(args.out).suffix.lower() not in (".html", ".htm"):
        raise ReportInputError(f"--out {args.out}: must end in .html (report.json and report.csv are written beside it)")
    for p in args.inputs:  # fail on a bad input before loading a model or a store
        sniff_kind(Path(p))
    explainer = build_explainer(args)
    try:
        result = generate_report(args.inputs, options, explainer)
    except DBError as exc:
        raise ReportInputError(f"database {db}: {exc}") from None
    except sqlite3.DatabaseError as exc:  # not a database, locked for too long, unwritable folder
        raise ReportInputError(f"--db {db}: {exc}") from None
    print(f"run {result.run_id}: {result.candidates} candidates in {result.groups} groups; "
          f"{result.verdicts_made} verdicts made now, {result.verdicts_found} resumed from {db}; "
          f"model calls {result.model_calls} ({result.model_calls_per_1000:g} per 1,000 candidates); "
          f"{result.elapsed_s:.1f} s")
    if result.issues:
        print(f"skipped {len(result.issues)} unreadable candidate line(s); see the report's inputs section")
    print(f"wrote {result.paths['html']}, {result.paths['json'].name}, {result.paths['csv'].name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``anomaly-agent report`` as a standalone entry point; returns the exit status.

    User errors (missing or unsupported input, no valid candidate lines, bad settings, database
    problems, a model that is not installed) print one line and return 2.
    """
    from agent.cli import main as cli_main  # one place turns errors into exit codes

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
