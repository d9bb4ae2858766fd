"""SQLite persistence for runs, candidates, verdicts, analyst feedback and chat.

Why a database and not JSON files: a report over a large log takes minutes to hours of model
time, and a crash, a ``kill -9`` or a closed laptop must not throw that work away. Every
verdict is committed the moment it is made, under ``UNIQUE(run_id, candidate_id)``, so a rerun
with the same inputs and settings (same run id, see :meth:`RunSpec.run_id`) continues where
the last one stopped, and no verdict can ever be stored twice. Analysts' feedback on verdicts
and their chat sessions live next to the verdicts they refer to, and confirmed or corrected
verdicts become "past cases" for the knowledge store (:meth:`Database.past_cases`,
:func:`add_past_cases_to_store`).

Storage rules (stdlib :mod:`sqlite3` only):

* WAL journal (readers never block the writer; a report can be watched while it runs),
  ``synchronous=NORMAL`` (a committed transaction survives a killed process; only an OS crash
  or power loss can lose the last few commits), foreign keys on, a 30 s busy timeout.
* Every write runs in one ``BEGIN IMMEDIATE`` transaction (:meth:`Database._tx`), which takes
  the write lock up front: a read-check-write sequence such as applying feedback cannot
  interleave with another writer, in this process or another one.
* The schema is versioned (table ``schema_version``) and upgraded by numbered migrations
  (:data:`MIGRATIONS`), each in its own transaction; a database newer than this code is refused
  rather than guessed at.

Rows come back as frozen dataclasses (:class:`Run`, :class:`CandidateRow`, :class:`VerdictRow`,
:class:`Feedback`, :class:`PastCase`, :class:`ChatSession`, :class:`ChatMessage`); candidates and
verdicts are stored as their canonical JSON (:meth:`detectors.records.Record.to_json`) and
parsed back into the pydantic records.

Example::

    db = Database("out/agent.db")
    run, created = db.get_or_create_run(spec)
    db.add_candidates(run.id, [(cand, group_key)])
    db.record_verdict(run.id, cand.id, explainer.explain(cand))
    row = db.verdict(run.id, cand.id)
    db.add_feedback(row.id, "change_severity", author="ana", severity=3, note="disk was full")
    add_past_cases_to_store(store, db.past_cases())
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from agent.records import Candidate, ExplainedBy, Label, Severity, Verdict
from knowledge.records import Passage

__all__ = [
    "CASES_COLLECTION",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "CandidateRow",
    "ChatMessage",
    "ChatRole",
    "ChatSession",
    "Conflict",
    "DBError",
    "Database",
    "Feedback",
    "FeedbackAction",
    "InputFile",
    "InvalidValue",
    "Migration",
    "NotFound",
    "PastCase",
    "Review",
    "Run",
    "RunSpec",
    "RunStatus",
    "SchemaTooNew",
    "VerdictRow",
    "add_past_cases_to_store",
    "candidate_summary",
]

CASES_COLLECTION = "cases"
"""The knowledge-store collection that holds past cases (:data:`knowledge.store.COLLECTIONS`)."""


# ============================================================================ errors

class DBError(Exception):
    """Base of every error this module raises on purpose."""


class NotFound(DBError, LookupError):
    """No row of ``kind`` has id ``id``.

    Attributes:
        kind: What was looked up: run, candidate, verdict, chat session.
        id: The id that was not found (for a candidate or verdict: ``run_id/candidate_id``).
    """

    def __init__(self, kind: str, id: str, hint: str = "") -> None:  # noqa: A002 - the natural name
        self.kind = kind
        self.id = id
        super().__init__(f"no {kind} {id!r}" + (f"; {hint}" if hint else ""))


class InvalidValue(DBError, ValueError):
    """A value outside what the schema allows.

    Attributes:
        field: The argument or column, e.g. ``action``.
        value: The value given.
        choices: What is allowed, in words or as a list.
    """

    def __init__(self, field: str, value: Any, choices: Sequence[Any] | str) -> None:
        self.field = field
        self.value = value
        self.choices = choices
        allowed = choices if isinstance(choices, str) else ", ".join(str(c) for c in choices)
        super().__init__(f"invalid {field} {value!r}; allowed: {allowed}")


class Conflict(DBError):
    """The write would break an invariant: a second verdict for a candidate, a stale version."""


class SchemaTooNew(DBError):
    """The database was written by a newer version of this program."""


# ============================================================================ enums

class RunStatus(StrEnum):
    """Where a run is: candidates are saved once (``explaining``), then verdicts one by one.

    ``failed`` means explaining stopped on an error (kept in the run's info); like a killed run,
    it resumes from its stored candidates when run again.
    """

    CREATED = "created"
    EXPLAINING = "explaining"
    DONE = "done"
    FAILED = "failed"


class FeedbackAction(StrEnum):
    """What an analyst can do to a verdict."""

    CONFIRM = "confirm"
    REJECT = "reject"
    CHANGE_SEVERITY = "change_severity"
    NOTE = "note"


class Review(StrEnum):
    """A verdict's review state: ``corrected`` when the final label/severity differ from it."""

    UNREVIEWED = "unreviewed"
    CONFIRMED = "confirmed"
    CORRECTED = "corrected"


class ChatRole(StrEnum):
    """Author of a chat message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


def _choice(enum: type[StrEnum], field_name: str, value: Any) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise InvalidValue(field_name, value, [m.value for m in enum]) from None


def _severity(field_name: str, value: Any, lo: int = 0) -> Severity:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= int(value) <= 4:
        raise InvalidValue(field_name, value, [s for s in range(lo, 5)])
    return Severity(int(value))


# ============================================================================ rows

@dataclass(frozen=True)
class InputFile:
    """One input of a run: where it was, what it held (sha256) and how it was read.

    Attributes:
        path: As given on the command line (informational; the run id ignores it, so a moved
            file still resumes its run).
        sha256: Hex digest of the file's bytes.
        size: Bytes.
        kind: How it was read, e.g. ``log`` or ``candidates``.
    """

    path: str
    sha256: str
    size: int
    kind: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "sha256": self.sha256, "size": self.size, "kind": self.kind}


def _canonical_json(value: Any, field_name: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidValue(field_name, f"<{type(value).__name__}>", f"JSON values only ({exc})") from None


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run's results; two equal specs are the same run.

    Attributes:
        inputs: The input files, in the order given.
        settings: Detector and explainer settings as JSON values (no NaN or Infinity).
        model_id: The model (``none`` for rules-only).
        adapter: A LoRA adapter id, if any.
        prompt_version: :data:`prompts.PROMPT_VERSION`.
        rules_version: The rule book's version.
        knowledge_version: The knowledge store's version.
    """

    inputs: tuple[InputFile, ...]
    settings: Mapping[str, Any]
    model_id: str
    adapter: str | None
    prompt_version: str
    rules_version: str
    knowledge_version: str

    @property
    def run_id(self) -> str:
        """``R-`` + 16 hex digits of sha256 over the inputs' hashes and kinds, the settings and versions.

        Paths are left out on purpose: the same bytes under another name are the same work.
        """
        material = {"inputs": [[f.sha256, f.kind] for f in self.inputs],
                    "settings": json.loads(_canonical_json(dict(self.settings), "settings")),
                    "model_id": self.model_id, "adapter": self.adapter, "prompt_version": self.prompt_version,
                    "rules_version": self.rules_version, "knowledge_version": self.knowledge_version}
        digest = hashlib.sha256(_canonical_json(material, "run spec").encode("utf-8")).hexdigest()
        return "R-" + digest[:16]


@dataclass(frozen=True)
class Run:
    """A stored run (see :class:`RunSpec` for the fields it shares).

    Attributes:
        info: Free-form JSON the runner keeps with the run (ingest reports, counts).
    """

    id: str
    created: str
    updated: str
    status: RunStatus
    inputs: tuple[InputFile, ...]
    settings: dict[str, Any]
    model_id: str
    adapter: str | None
    prompt_version: str
    rules_version: str
    knowledge_version: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CandidateRow:
    """A candidate of a run, in the order it was added (``seq``), with its cluster key."""

    run_id: str
    candidate_id: str
    seq: int
    candidate: Candidate
    score: float
    modality: str
    detector: str
    group_key: str


@dataclass(frozen=True)
class VerdictRow:
    """A stored verdict plus how it was made and how analysts reviewed it.

    Attributes:
        id: Row id; feedback refers to it.
        verdict: The explainer's verdict, exactly as made (never changed by feedback).
        model_calls: Model calls spent making it (0 for a cache hit or rules-only).
        cache_hit: Whether the explanation came from the explanation cache.
        elapsed_s: Seconds it took.
        review: Review state; ``final_label``/``final_severity`` are the label and severity after
            feedback (equal to the verdict's until someone corrects them).
        version: Increases with every feedback; pass it back as ``expected_version`` to detect a
            concurrent change.
    """

    id: int
    run_id: str
    candidate_id: str
    verdict: Verdict
    label: Label
    severity: Severity
    explained_by: ExplainedBy
    model_calls: int
    cache_hit: bool
    elapsed_s: float
    created: str
    review: Review
    final_label: Label
    final_severity: Severity
    version: int


@dataclass(frozen=True)
class Feedback:
    """One analyst action on a verdict, with the state it left the verdict in."""

    id: int
    verdict_id: int
    action: FeedbackAction
    severity: Severity | None
    note: str | None
    author: str
    created: str
    label_after: Label
    severity_after: Severity
    version_after: int


@dataclass(frozen=True)
class PastCase:
    """A reviewed verdict, ready for "this looked like ..." retrieval.

    Attributes:
        case_id: Stable passage id (same run and candidate = same id, so re-exporting upserts).
        summary: What the candidate was (detector, score, evidence), one paragraph.
        label, severity: The final (analyst-reviewed) label and severity.
        model_label, model_severity: What the explainer said.
        notes: Analysts' notes, oldest first.
        authors: Everyone who gave feedback, in order of first feedback.
    """

    case_id: str
    run_id: str
    candidate_id: str
    detector: str
    modality: str
    summary: str
    anomaly_type: str
    label: Label
    severity: Severity
    model_label: Label
    model_severity: Severity
    review: Review
    notes: tuple[str, ...]
    authors: tuple[str, ...]
    reviewed: str

    def text(self) -> str:
        """The passage text: what it was, what it turned out to be, and why."""
        parts = [f"Past case ({self.review.value} by {', '.join(self.authors) or 'an analyst'}): {self.summary}",
                 f"Final verdict: {self.label.value}, severity {int(self.severity)} "
                 f"({self.severity.name.lower()}), type {self.anomaly_type}."]
        if (self.label, self.severity) != (self.model_label, self.model_severity):
            parts.append(f"The explainer had said {self.model_label.value}, severity {int(self.model_severity)}.")
        if self.notes:
            parts.append("Analyst notes: " + " | ".join(self.notes))
        return " ".join(parts)

    def to_passage(self) -> Passage:
        """A :class:`knowledge.records.Passage` for the ``cases`` collection."""
        return Passage(id=self.case_id, source=f"cases/{self.run_id}", heading=self.candidate_id, offset=0,
                       text=self.text())


@dataclass(frozen=True)
class ChatSession:
    """An analyst's conversation, optionally about one run."""

    id: str
    run_id: str | None
    title: str
    created: str


@dataclass(frozen=True)
class ChatMessage:
    """One message; ``cited_ids`` are the evidence/passage/rule/candidate ids it cites."""

    id: int
    session_id: str
    role: ChatRole
    content: str
    cited_ids: tuple[str, ...]
    created: str


def candidate_summary(candidate: Candidate, max_evidence: int = 4) -> str:
    """One paragraph saying what a candidate is: detector, score vs threshold, where, evidence.

    Used as the searchable text of a past case, so it leads with the evidence summaries and
    templates (what retrieval queries are built from, see :func:`knowledge.store.candidate_queries`).
    """
    loc = candidate.locator
    where = ", ".join(f"{k} {loc[k]}" for k in ("sequence", "series", "window", "image") if k in loc)
    head = (f"{candidate.modality.value} candidate from {candidate.detector} in {candidate.source}"
            f"{' (' + where + ')' if where else ''}: score {candidate.score:.4g} vs threshold {candidate.threshold:.4g}.")
    bits = []
    for ev in candidate.evidence[:max_evidence]:
        templates = ev.data.get("templates") if isinstance(ev.data.get("templates"), list) else []
        shown = "; ".join(dict.fromkeys(str(t) for t in templates[:3]))
        bits.append(f"[{ev.id}] {ev.summary}" + (f" (templates: {shown})" if shown else ""))
    more = len(candidate.evidence) - max_evidence
    if more > 0:
        bits.append(f"... and {more} more evidence item(s)")
    return " ".join([head, *bits])


# ============================================================================ schema

@dataclass(frozen=True)
class Migration:
    """One schema step; applied once, in order, in its own transaction."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, candidates, verdicts", (
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('created', 'explaining', 'done', 'failed')),
            inputs TEXT NOT NULL,
            settings TEXT NOT NULL,
            model_id TEXT NOT NULL,
            adapter TEXT,
            prompt_version TEXT NOT NULL,
            rules_version TEXT NOT NULL,
            knowledge_version TEXT NOT NULL,
            info TEXT NOT NULL DEFAULT '{}'
        )""",
        """CREATE TABLE candidates (
            run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            candidate_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            json TEXT NOT NULL,
            score REAL NOT NULL,
            modality TEXT NOT NULL,
            detector TEXT NOT NULL,
            group_key TEXT NOT NULL,
            PRIMARY KEY (run_id, candidate_id),
            UNIQUE (run_id, seq)
        )""",
        "CREATE INDEX candidates_by_group ON candidates (run_id, group_key)",
        """CREATE TABLE verdicts (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL,
            candidate_id TEXT NOT NULL,
            json TEXT NOT NULL,
            label TEXT NOT NULL CHECK (label IN ('anomaly', 'normal', 'uncertain')),
            severity INTEGER NOT NULL CHECK (severity BETWEEN 0 AND 4),
            explained_by TEXT NOT NULL CHECK (explained_by IN ('model', 'rules-only')),
            model_calls INTEGER NOT NULL DEFAULT 0,
            cache_hit INTEGER NOT NULL DEFAULT 0,
            elapsed_s REAL NOT NULL DEFAULT 0,
            created TEXT NOT NULL,
            UNIQUE (run_id, candidate_id),
            FOREIGN KEY (run_id, candidate_id) REFERENCES candidates (run_id, candidate_id) ON DELETE CASCADE
        )""",
    )),
    Migration(2, "analyst feedback and review state of verdicts", (
        "ALTER TABLE verdicts ADD COLUMN review TEXT NOT NULL DEFAULT 'unreviewed' "
        "CHECK (review IN ('unreviewed', 'confirmed', 'corrected'))",
        "ALTER TABLE verdicts ADD COLUMN final_label TEXT "
        "CHECK (final_label IS NULL OR final_label IN ('anomaly', 'normal', 'uncertain'))",
        "ALTER TABLE verdicts ADD COLUMN final_severity INTEGER "
        "CHECK (final_severity IS NULL OR final_severity BETWEEN 0 AND 4)",
        "ALTER TABLE verdicts ADD COLUMN version INTEGER NOT NULL DEFAULT 1",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            verdict_id INTEGER NOT NULL REFERENCES verdicts(id) ON DELETE CASCADE,
            action TEXT NOT NULL CHECK (action IN ('confirm', 'reject', 'change_severity', 'note')),
            severity INTEGER CHECK (severity IS NULL OR severity BETWEEN 0 AND 4),
            note TEXT,
            author TEXT NOT NULL CHECK (length(author) > 0),
            created TEXT NOT NULL,
            label_after TEXT NOT NULL,
            severity_after INTEGER NOT NULL,
            version_after INTEGER NOT NULL,
            UNIQUE (verdict_id, version_after)
        )""",
        "CREATE INDEX feedback_by_verdict ON feedback (verdict_id)",
        "CREATE INDEX verdicts_by_review ON verdicts (review)",
    )),
    Migration(3, "chat sessions and messages", (
        """CREATE TABLE chat_sessions (
            id TEXT PRIMARY KEY,
            run_id TEXT REFERENCES runs(id) ON DELETE SET NULL,
            title TEXT NOT NULL,
            created TEXT NOT NULL
        )""",
        """CREATE TABLE chat_messages (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES chat_sessions(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            content TEXT NOT NULL,
            cited_ids TEXT NOT NULL DEFAULT '[]',
            created TEXT NOT NULL
        )""",
        "CREATE INDEX chat_messages_by_session ON chat_messages (session_id, id)",
    )),
)
"""Schema steps, oldest first. Never edit a released step: add a new one."""

SCHEMA_VERSION = MIGRATIONS[-1].version
"""The schema this code reads and writes."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _applied_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema of ``conn`` up to ``target``; returns the version it is at.

    Each step runs in its own ``BEGIN IMMEDIATE`` transaction and re-reads the version inside
    it, so two processes opening a fresh database at once apply every step exactly once.

    Raises:
        SchemaTooNew: The database is at a version this code does not know.
        InvalidValue: ``target`` is not a known version.
    """
    known = [m.version for m in MIGRATIONS]
    if target not in known:
        raise InvalidValue("target", target, known)
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                 "description TEXT NOT NULL, applied TEXT NOT NULL)")
    current = _applied_version(conn)
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(f"database schema version {current} is newer than this program's {SCHEMA_VERSION}; "
                           "upgrade anomaly-agent to open it")
    for step in MIGRATIONS:
        if step.version <= current or step.version > target:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if _applied_version(conn) >= step.version:  # another process got there first
                conn.execute("ROLLBACK")
                continue
            for statement in step.statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, description, applied) VALUES (?, ?, ?)",
                         (step.version, step.description, _now()))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return _applied_version(conn)


def connect(path: str | Path, timeout: float = 30.0) -> sqlite3.Connection:
    """A connection with this module's settings (WAL, foreign keys, busy timeout), schema untouched.

    ``isolation_level=None``: sqlite3 opens no implicit transactions; :meth:`Database._tx` and
    :func:`migrate` open them explicitly.
    """
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal" and str(path) != ":memory:":
        conn.close()
        raise DBError(f"{path}: the file system does not support SQLite's WAL journal (got {mode!r})")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


# ============================================================================ database

class Database:
    """The agent's SQLite database (one file); see the module doc for the guarantees.

    One instance may be shared by threads (an internal lock serialises its connection), and any
    number of instances and processes may open the same file: writes are serialised by SQLite.

    Args:
        path: The database file; its folder is created if missing.
        timeout: Seconds to wait for another writer's lock before failing.
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = connect(self.path, timeout)
        try:
            self.schema_version = migrate(self._conn)
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that holds the write lock from its first statement."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ runs
    _RUN_COLS = ("id, created, updated, status, inputs, settings, model_id, adapter, prompt_version, "
                 "rules_version, knowledge_version, info")

    @staticmethod
    def _run(row: tuple[Any, ...]) -> Run:
        inputs = tuple(InputFile(**item) for item in json.loads(row[4]))
        return Run(id=row[0], created=row[1], updated=row[2], status=RunStatus(row[3]), inputs=inputs,
                   settings=json.loads(row[5]), model_id=row[6], adapter=row[7], prompt_version=row[8],
                   rules_version=row[9], knowledge_version=row[10], info=json.loads(row[11]))

    def get_or_create_run(self, spec: RunSpec) -> tuple[Run, bool]:
        """The run for ``spec``, created (status ``created``) if new; returns ``(run, created)``."""
        if not spec.inputs:
            raise InvalidValue("inputs", [], "at least one input file")
        run_id = spec.run_id
        now = _now()
        with self._tx() as conn:
            row = conn.execute(f"SELECT {self._RUN_COLS} FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is not None:
                return self._run(row), False
            conn.execute(
                f"INSERT INTO runs ({self._RUN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, now, now, RunStatus.CREATED.value, _canonical_json([f.to_dict() for f in spec.inputs], "inputs"),
                 _canonical_json(dict(spec.settings), "settings"), spec.model_id, spec.adapter, spec.prompt_version,
                 spec.rules_version, spec.knowledge_version, "{}"))
        return self.run(run_id), True

    def run(self, run_id: str) -> Run:
        """The run ``run_id``; raises :class:`NotFound`."""
        rows = self._query(f"SELECT {self._RUN_COLS} FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise NotFound("run", run_id, f"runs in {self.path}: {self._some_ids('SELECT id FROM runs')}")
        return self._run(rows[0])

    def runs(self) -> list[Run]:
        """Every run, newest first."""
        return [self._run(r) for r in self._query(f"SELECT {self._RUN_COLS} FROM runs ORDER BY created DESC, id")]

    def set_run_status(self, run_id: str, status: RunStatus | str, *, info: Mapping[str, Any] | None = None) -> Run:
        """Move a run to ``status`` (and merge ``info`` into its info); returns the updated run."""
        status = _choice(RunStatus, "status", status)
        with self._tx() as conn:
            row = conn.execute("SELECT info FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise NotFound("run", run_id)
            merged = {**json.loads(row[0]), **dict(info or {})}
            conn.execute("UPDATE runs SET status = ?, info = ?, updated = ? WHERE id = ?",
                         (status.value, _canonical_json(merged, "info"), _now(), run_id))
        return self.run(run_id)

    def _some_ids(self, sql: str, params: Sequence[Any] = (), limit: int = 5) -> str:
        ids = [str(r[0]) for r in self._query(sql + f" LIMIT {limit + 1}", params)]
        if not ids:
            return "none"
        return ", ".join(ids[:limit]) + (", ..." if len(ids) > limit else "")

    # ------------------------------------------------------------------ candidates
    _CAND_COLS = "run_id, candidate_id, seq, json, score, modality, detector, group_key"

    @staticmethod
    def _cand(row: tuple[Any, ...]) -> CandidateRow:
        return CandidateRow(run_id=row[0], candidate_id=row[1], seq=int(row[2]),
                            candidate=Candidate.model_validate_json(row[3]), score=float(row[4]),
                            modality=row[5], detector=row[6], group_key=row[7])

    def add_candidates(self, run_id: str, items: Iterable[tuple[Candidate, str]], *,
                       info: Mapping[str, Any] | None = None) -> int:
        """Store a run's candidates with their group keys and mark the run ``explaining``, atomically.

        All or nothing: a run killed during detection has no candidates and detects again; a run
        past this point never detects again, so a resumed run explains exactly the same
        candidates. Calling it again for a run that has candidates is a :class:`Conflict`.

        Args:
            run_id: An existing run.
            items: ``(candidate, group_key)`` in report order (``seq`` follows it).
            info: Merged into the run's info (e.g. ingest reports), in the same transaction.

        Returns:
            How many candidates were stored.
        """
        rows = []
        seen: dict[str, int] = {}
        for seq, (cand, key) in enumerate(items):
            if cand.id in seen:
                raise InvalidValue("candidate.id", cand.id, f"ids unique within a run (also at position {seen[cand.id]})")
            if not isinstance(key, str) or not key:
                raise InvalidValue("group_key", key, "a non-empty string")
            if not math.isfinite(cand.score):
                raise InvalidValue("candidate.score", cand.score, "a finite number")
            seen[cand.id] = seq
            rows.append((run_id, cand.id, seq, cand.to_json(), float(cand.score), cand.modality.value,
                         cand.detector, key))
        with self._tx() as conn:
            row = conn.execute("SELECT info FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise NotFound("run", run_id)
            if conn.execute("SELECT 1 FROM candidates WHERE run_id = ? LIMIT 1", (run_id,)).fetchone():
                raise Conflict(f"run {run_id!r} already has its candidates; a run's candidates are stored once")
            conn.executemany(f"INSERT INTO candidates ({self._CAND_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            merged = {**json.loads(row[0]), **dict(info or {})}
            conn.execute("UPDATE runs SET status = ?, info = ?, updated = ? WHERE id = ?",
                         (RunStatus.EXPLAINING.value, _canonical_json(merged, "info"), _now(), run_id))
        return len(rows)

    def candidates(self, run_id: str) -> list[CandidateRow]:
        """A run's candidates in ``seq`` order (raises :class:`NotFound` for an unknown run)."""
        self.run(run_id)
        return [self._cand(r) for r in
                self._query(f"SELECT {self._CAND_COLS} FROM candidates WHERE run_id = ? ORDER BY seq", (run_id,))]

    def candidate(self, run_id: str, candidate_id: str) -> CandidateRow:
        """One candidate; raises :class:`NotFound` naming the run and candidate."""
        rows = self._query(f"SELECT {self._CAND_COLS} FROM candidates WHERE run_id = ? AND candidate_id = ?",
                           (run_id, candidate_id))
        if not rows:
            self.run(run_id)
            some = self._some_ids("SELECT candidate_id FROM candidates WHERE run_id = ? ORDER BY seq", (run_id,))
            raise NotFound("candidate", f"{run_id}/{candidate_id}", f"some of the run's candidates: {some}")
        return self._cand(rows[0])

    def pending_candidates(self, run_id: str) -> list[CandidateRow]:
        """Candidates of the run without a verdict yet, in ``seq`` order."""
        self.run(run_id)
        sql = (f"SELECT {', '.join('c.' + c.strip() for c in self._CAND_COLS.split(','))} FROM candidates c "
               "LEFT JOIN verdicts v ON v.run_id = c.run_id AND v.candidate_id = c.candidate_id "
               "WHERE c.run_id = ? AND v.id IS NULL ORDER BY c.seq")
        return [self._cand(r) for r in self._query(sql, (run_id,))]

    # ------------------------------------------------------------------ verdicts
    _VERDICT_COLS = ("id, run_id, candidate_id, json, label, severity, explained_by, model_calls, cache_hit, "
                     "elapsed_s, created, review, final_label, final_severity, version")

    @staticmethod
    def _verdict(row: tuple[Any, ...]) -> VerdictRow:
        label = Label(row[4])
        severity = Severity(int(row[5]))
        return VerdictRow(id=int(row[0]), run_id=row[1], candidate_id=row[2], verdict=Verdict.model_validate_json(row[3]),
                          label=label, severity=severity, explained_by=ExplainedBy(row[6]), model_calls=int(row[7]),
                          cache_hit=bool(row[8]), elapsed_s=float(row[9]), created=row[10], review=Review(row[11]),
                          final_label=Label(row[12]) if row[12] is not None else label,
                          final_severity=Severity(int(row[13])) if row[13] is not None else severity,
                          version=int(row[14]))

    def record_verdict(self, run_id: str, candidate_id: str, verdict: Verdict, *, model_calls: int = 0,
                       cache_hit: bool = False, elapsed_s: float = 0.0) -> VerdictRow:
        """Commit the verdict for one candidate (its own transaction, so it survives a kill right after).

        Raises:
            NotFound: The run or candidate does not exist.
            InvalidValue: ``verdict.candidate_id`` is not ``candidate_id``, or a count is negative.
            Conflict: The candidate already has a verdict; verdicts are never duplicated or overwritten.
        """
        if verdict.candidate_id != candidate_id:
            raise InvalidValue("verdict.candidate_id", verdict.candidate_id, [candidate_id])
        if model_calls < 0:
            raise InvalidValue("model_calls", model_calls, "an integer >= 0")
        if not elapsed_s >= 0:
            raise InvalidValue("elapsed_s", elapsed_s, "seconds >= 0")
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM candidates WHERE run_id = ? AND candidate_id = ?",
                            (run_id, candidate_id)).fetchone() is None:
                if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                    raise NotFound("run", run_id)
                raise NotFound("candidate", f"{run_id}/{candidate_id}")
            try:
                cur = conn.execute(
                    "INSERT INTO verdicts (run_id, candidate_id, json, label, severity, explained_by, model_calls, "
                    "cache_hit, elapsed_s, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, candidate_id, verdict.to_json(), verdict.label.value, int(verdict.severity),
                     verdict.explained_by.value, int(model_calls), int(bool(cache_hit)), float(elapsed_s), _now()))
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc):
                    raise Conflict(f"run {run_id!r} already has a verdict for candidate {candidate_id!r}; "
                                   "verdicts are never duplicated or overwritten") from None
                raise
            verdict_id = cur.lastrowid
        return self.verdict_by_id(int(verdict_id))  # type: ignore[arg-type]

    def verdict(self, run_id: str, candidate_id: str) -> VerdictRow:
        """The verdict for one candidate; raises :class:`NotFound`."""
        rows = self._query(f"SELECT {self._VERDICT_COLS} FROM verdicts WHERE run_id = ? AND candidate_id = ?",
                           (run_id, candidate_id))
        if not rows:
            self.candidate(run_id, candidate_id)  # names a missing run or candidate precisely
            raise NotFound("verdict", f"{run_id}/{candidate_id}", "the candidate has not been explained yet")
        return self._verdict(rows[0])

    def verdict_by_id(self, verdict_id: int) -> VerdictRow:
        """The verdict with row id ``verdict_id``; raises :class:`NotFound`."""
        rows = self._query(f"SELECT {self._VERDICT_COLS} FROM verdicts WHERE id = ?", (int(verdict_id),))
        if not rows:
            raise NotFound("verdict", str(verdict_id))
        return self._verdict(rows[0])

    def verdicts(self, run_id: str) -> list[VerdictRow]:
        """A run's verdicts in candidate order."""
        self.run(run_id)
        cols = ", ".join("v." + c.strip() for c in self._VERDICT_COLS.split(","))
        return [self._verdict(r) for r in self._query(
            f"SELECT {cols} FROM verdicts v JOIN candidates c ON c.run_id = v.run_id AND c.candidate_id = v.candidate_id "
            "WHERE v.run_id = ? ORDER BY c.seq", (run_id,))]

    def count_verdicts(self, run_id: str) -> int:
        """How many candidates of the run have a verdict."""
        return int(self._query("SELECT count(*) FROM verdicts WHERE run_id = ?", (run_id,))[0][0])

    # ------------------------------------------------------------------ feedback
    _FEEDBACK_COLS = ("id, verdict_id, action, severity, note, author, created, label_after, severity_after, "
                      "version_after")

    @staticmethod
    def _feedback(row: tuple[Any, ...]) -> Feedback:
        return Feedback(id=int(row[0]), verdict_id=int(row[1]), action=FeedbackAction(row[2]),
                        severity=Severity(int(row[3])) if row[3] is not None else None, note=row[4], author=row[5],
                        created=row[6], label_after=Label(row[7]), severity_after=Severity(int(row[8])),
                        version_after=int(row[9]))

    def add_feedback(self, verdict_id: int, action: FeedbackAction | str, *, author: str,
                     severity: int | None = None, note: str | None = None,
                     expected_version: int | None = None) -> Feedback:
        """Apply one analyst action to a verdict, atomically, and record it.

        What each action does to the final label and severity (the stored verdict itself never
        changes):

        * ``confirm``: keeps them; the verdict counts as reviewed.
        * ``reject``: the label was wrong. An anomaly or uncertain verdict becomes normal
          (severity 0); a normal one becomes an anomaly of ``severity`` (required, 1-4).
        * ``change_severity``: sets ``severity`` (required, 0-4); 0 means normal, else anomaly.
        * ``note``: only adds ``note`` (required).

        Every action increases the verdict's ``version``. The read, the check and the writes run
        in one ``BEGIN IMMEDIATE`` transaction, so concurrent feedback (threads or processes) is
        applied one after another, each on the state the previous one left.

        Args:
            verdict_id: :attr:`VerdictRow.id`.
            action: One of :class:`FeedbackAction`.
            author: Who; non-empty.
            severity: New severity, for ``reject`` of a normal verdict and ``change_severity``.
            note: Free text; required for ``note``, optional otherwise.
            expected_version: The version the analyst saw; if the verdict has changed since,
                :class:`Conflict` is raised and nothing is written (optimistic concurrency).

        Raises:
            NotFound: No such verdict.
            InvalidValue: Unknown action, bad severity, empty author or note.
            Conflict: ``expected_version`` is stale.
        """
        act = _choice(FeedbackAction, "action", action)
        if not isinstance(author, str) or not author.strip():
            raise InvalidValue("author", author, "a non-empty name")
        note = note.strip() if isinstance(note, str) else note
        if act is FeedbackAction.NOTE and not note:
            raise InvalidValue("note", note, "non-empty text for action 'note'")
        if act is FeedbackAction.CHANGE_SEVERITY:
            if severity is None:
                raise InvalidValue("severity", None, "0-4 for action 'change_severity'")
            new_sev: Severity | None = _severity("severity", severity)
        elif severity is not None:
            if act is not FeedbackAction.REJECT:
                raise InvalidValue("severity", severity, "only with action 'reject' or 'change_severity'")
            new_sev = _severity("severity", severity, lo=1)
        else:
            new_sev = None
        with self._tx() as conn:
            row = conn.execute(f"SELECT {self._VERDICT_COLS} FROM verdicts WHERE id = ?", (int(verdict_id),)).fetchone()
            if row is None:
                raise NotFound("verdict", str(verdict_id))
            current = self._verdict(row)
            if expected_version is not None and expected_version != current.version:
                raise Conflict(f"verdict {verdict_id} is at version {current.version}, not {expected_version}: "
                               "someone changed it since you read it; reload and try again")
            label, sev = current.final_label, current.final_severity
            if act is FeedbackAction.REJECT:
                if label is Label.NORMAL:
                    if new_sev is None:
                        raise InvalidValue("severity", None, "1-4: rejecting a normal verdict makes it an anomaly")
                    label, sev = Label.ANOMALY, new_sev
                else:
                    label, sev = Label.NORMAL, Severity.NONE
            elif act is FeedbackAction.CHANGE_SEVERITY:
                assert new_sev is not None
                label, sev = (Label.NORMAL, Severity.NONE) if new_sev is Severity.NONE else (Label.ANOMALY, new_sev)
            if act is FeedbackAction.NOTE:
                review = current.review
            else:
                review = Review.CONFIRMED if (label, sev) == (current.label, current.severity) else Review.CORRECTED
            version = current.version + 1
            cur = conn.execute(
                "UPDATE verdicts SET review = ?, final_label = ?, final_severity = ?, version = ? "
                "WHERE id = ? AND version = ?",
                (review.value, label.value, int(sev), version, current.id, current.version))
            if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; kept as a guard
                raise Conflict(f"verdict {verdict_id} changed during feedback")
            cur = conn.execute(
                f"INSERT INTO feedback ({self._FEEDBACK_COLS.split(', ', 1)[1]}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (current.id, act.value, int(new_sev) if new_sev is not None else None, note or None, author.strip(),
                 _now(), label.value, int(sev), version))
            feedback_id = cur.lastrowid
        rows = self._query(f"SELECT {self._FEEDBACK_COLS} FROM feedback WHERE id = ?", (feedback_id,))
        return self._feedback(rows[0])

    def feedback(self, verdict_id: int) -> list[Feedback]:
        """All feedback on a verdict, oldest first; raises :class:`NotFound` for an unknown verdict."""
        self.verdict_by_id(verdict_id)
        return [self._feedback(r) for r in self._query(
            f"SELECT {self._FEEDBACK_COLS} FROM feedback WHERE verdict_id = ? ORDER BY id", (int(verdict_id),))]

    # ------------------------------------------------------------------ past cases
    def past_cases(self, run_id: str | None = None, *, limit: int | None = None) -> list[PastCase]:
        """Confirmed or corrected verdicts as :class:`PastCase` records, most recently reviewed first.

        Args:
            run_id: Only this run (raises :class:`NotFound` if unknown); default all runs.
            limit: At most this many.
        """
        if run_id is not None:
            self.run(run_id)
        if limit is not None and limit < 1:
            raise InvalidValue("limit", limit, "an integer >= 1, or None for all")
        cols = ", ".join("v." + c.strip() for c in self._VERDICT_COLS.split(","))
        sql = (f"SELECT {cols}, c.json, (SELECT max(f.created) FROM feedback f WHERE f.verdict_id = v.id) AS reviewed "
               "FROM verdicts v JOIN candidates c ON c.run_id = v.run_id AND c.candidate_id = v.candidate_id "
               "WHERE v.review IN ('confirmed', 'corrected')" + (" AND v.run_id = ?" if run_id is not None else "")
               + " ORDER BY reviewed DESC, v.id" + (f" LIMIT {int(limit)}" if limit is not None else ""))
        out: list[PastCase] = []
        with self._lock:
            rows = self._conn.execute(sql, (run_id,) if run_id is not None else ()).fetchall()
            feedback: dict[int, list[tuple[Any, ...]]] = {}
            ids = [int(r[0]) for r in rows]
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                for f in self._conn.execute(
                        f"SELECT verdict_id, note, author FROM feedback WHERE verdict_id IN ({','.join('?' * len(chunk))}) "
                        "ORDER BY id", chunk):
                    feedback.setdefault(int(f[0]), []).append(f)
        n = len(self._VERDICT_COLS.split(","))
        for r in rows:
            v = self._verdict(r[:n])
            cand = Candidate.model_validate_json(r[n])
            fb = feedback.get(v.id, [])
            out.append(PastCase(
                case_id=_case_id(v.run_id, v.candidate_id), run_id=v.run_id, candidate_id=v.candidate_id,
                detector=cand.detector, modality=cand.modality.value, summary=candidate_summary(cand),
                anomaly_type=v.verdict.anomaly_type if v.final_label is not Label.NORMAL else "none",
                label=v.final_label, severity=v.final_severity, model_label=v.label, model_severity=v.severity,
                review=v.review, notes=tuple(f[1] for f in fb if f[1]),
                authors=tuple(dict.fromkeys(f[2] for f in fb)), reviewed=r[n + 1] or v.created))
        return out

    # ------------------------------------------------------------------ chat
    def create_chat_session(self, title: str, run_id: str | None = None) -> ChatSession:
        """Start a chat session (optionally about ``run_id``, which must exist)."""
        if not isinstance(title, str) or not title.strip():
            raise InvalidValue("title", title, "non-empty text")
        session = ChatSession(id="S-" + uuid.uuid4().hex[:16], run_id=run_id, title=title.strip(), created=_now())
        with self._tx() as conn:
            if run_id is not None and conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise NotFound("run", run_id)
            conn.execute("INSERT INTO chat_sessions (id, run_id, title, created) VALUES (?, ?, ?, ?)",
                         (session.id, session.run_id, session.title, session.created))
        return session

    def chat_session(self, session_id: str) -> ChatSession:
        """One chat session; raises :class:`NotFound`."""
        rows = self._query("SELECT id, run_id, title, created FROM chat_sessions WHERE id = ?", (session_id,))
        if not rows:
            raise NotFound("chat session", session_id)
        return ChatSession(*rows[0])

    def chat_sessions(self, run_id: str | None = None) -> list[ChatSession]:
        """Chat sessions, oldest first; only those about ``run_id`` when given."""
        if run_id is None:
            rows = self._query("SELECT id, run_id, title, created FROM chat_sessions ORDER BY created, id")
        else:
            rows = self._query("SELECT id, run_id, title, created FROM chat_sessions WHERE run_id = ? "
                               "ORDER BY created, id", (run_id,))
        return [ChatSession(*r) for r in rows]

    def add_chat_message(self, session_id: str, role: ChatRole | str, content: str,
                         cited_ids: Sequence[str] = ()) -> ChatMessage:
        """Append a message to a session; raises :class:`NotFound` / :class:`InvalidValue`."""
        role = _choice(ChatRole, "role", role)
        if not isinstance(content, str) or not content.strip():
            raise InvalidValue("content", content, "non-empty text")
        if isinstance(cited_ids, str) or not all(isinstance(c, str) and c for c in cited_ids):
            raise InvalidValue("cited_ids", cited_ids, "a list of non-empty id strings")
        created = _now()
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM chat_sessions WHERE id = ?", (session_id,)).fetchone() is None:
                raise NotFound("chat session", session_id)
            cur = conn.execute("INSERT INTO chat_messages (session_id, role, content, cited_ids, created) "
                               "VALUES (?, ?, ?, ?, ?)",
                               (session_id, role.value, content, json.dumps(list(cited_ids)), created))
        return ChatMessage(id=int(cur.lastrowid or 0), session_id=session_id, role=role, content=content,
                           cited_ids=tuple(cited_ids), created=created)

    def chat_messages(self, session_id: str) -> list[ChatMessage]:
        """A session's messages in order; raises :class:`NotFound` for an unknown session."""
        self.chat_session(session_id)
        return [ChatMessage(id=int(r[0]), session_id=r[1], role=ChatRole(r[2]), content=r[3],
                            cited_ids=tuple(json.loads(r[4])), created=r[5])
                for r in self._query("SELECT id, session_id, role, content, cited_ids, created FROM chat_messages "
                                     "WHERE session_id = ? ORDER BY id", (session_id,))]


def _case_id(run_id: str, candidate_id: str) -> str:
    """Stable id of a past case: the passage id of ``cases/<run>``, heading ``<candidate>``, offset 0."""
    from knowledge.records import passage_id

    return passage_id(f"cases/{run_id}", candidate_id, 0)


class PassageSink(Protocol):
    """What :func:`add_past_cases_to_store` needs: :meth:`knowledge.store.KnowledgeStore.add_passages`."""

    def add_passages(self, passages: Sequence[Passage], collection: str = ...) -> int: ...


def add_past_cases_to_store(store: PassageSink, cases: Iterable[PastCase]) -> int:
    """Upsert past cases into the store's ``cases`` collection; returns how many were written.

    Ids are stable per run and candidate, so exporting again after more feedback replaces the
    old text of a case instead of adding a second copy.
    """
    passages = [case.to_passage() for case in cases]
    if not passages:
        return 0
    return int(store.add_passages(passages, collection=CASES_COLLECTION))
