"""``anomaly-agent serve``: the HTTP API (FastAPI, OpenAPI schema) and the analyst's web page.

Everything the command line does, over HTTP, for the web page at ``/`` and for scripts:

=============================================  =============================================================
route (all under ``/api``)                     what
=============================================  =============================================================
``GET  /health``                               liveness; the only route without the token
``GET  /openapi.json``                         the OpenAPI schema
``POST /uploads?filename=``                    upload a log (raw body; size limit; safe names; 415 + reason)
``POST /runs``  ``GET /runs``  ``GET /runs/{id}``  create a run from an upload (detect + store candidates); list; get
``GET  /runs/{id}/candidates``                 the queue: sorted by severity (or score, seq), filtered, paged
``GET  /runs/{id}/candidates/{cid}``           one candidate with its evidence, verdict and feedback
``GET  .../{cid}/lines``                       the session's log lines, flagged lines marked
``GET  .../{cid}/verdict``  ``POST .../explain``  the stored verdict; explain on demand (stored)
``POST /explain``                              explain a posted candidate (not stored)
``GET  /verdicts/{vid}``  ``POST|GET .../feedback``  confirm / reject / change severity / note, optimistic version -> 409
``POST /chat/sessions`` ... ``/messages``      chat; ``"stream": true`` (or ``Accept: text/event-stream``) streams SSE
``GET|POST /rules``  ``GET|DELETE /rules/{id}``  the rule book
``GET  /knowledge/search|sources|passages/{id}``  search, list, read a passage; ``POST /knowledge/documents`` adds one
``POST /runs/{id}/report``  ``GET /runs/{id}/report.{html,json,csv}``  batch report (agent/report.py) and download
=============================================  =============================================================

Safety: a bearer token guards every ``/api`` route but ``/health`` (compared in constant time);
the server refuses to listen on a non-loopback address without one, and on loopback without
one it makes a random token and prints it. CORS is off unless origins are named. The static
page holds no data (it asks for the token and keeps it in ``sessionStorage``) and is served with
a strict Content-Security-Policy: no request leaves the server's origin. Errors are JSON
``{"error": "...", "detail": ...}`` with a 4xx status naming the bad value (malformed JSON 400,
unknown id 404, stale version 409, oversized upload 413, unsupported type 415, invalid values
422, model unavailable 503), never a traceback; an unexpected failure is a 500 with a reference
that is in the server log. The database stays consistent because every write goes through
:mod:`agent.db`'s transactions (a run's candidates all or none, one verdict per candidate,
feedback checked against the version inside its write lock).

Reads are served from an exact in-memory cache: a response is reused while SQLite's
``PRAGMA data_version`` (any commit by anyone) and the rule book file are unchanged, and a GET of
a cached URL is answered by the token-checking middleware itself (:class:`_Guard`). Measured with
``anomaly-agent bench api`` (:mod:`eval.api_bench`).

Wiring (``agent/cli.py`` owns the command)::

    from agent import api as api_cmd
    sv = sub.add_parser("serve", help="HTTP API and web interface")
    api_cmd.add_arguments(sv)
    sv.set_defaults(func=api_cmd.serve)   # ValueError (e.g. public host, no token) -> one line, status 2
"""

from __future__ import annotations

import argparse
import gc
import gzip
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, BackgroundTasks, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.db import (
    Conflict,
    Database,
    DBError,
    FeedbackAction,
    InvalidValue,
    NotFound,
    Run,
    SchemaTooNew,
    VerdictRow,
)
from agent.records import Candidate, Verdict
from agent.settings import env_setting as _env
from agent.tools import (
    AgentContext,
    CandidateBrief,
    LineView,
    RunInputs,
    ToolError,
    ToolResult,
    add_rule,
    candidate_briefs,
    create_run,
    explain_candidate,
    filter_briefs,
    remove_rule,
    rule_dict,
    session_lines,
    similar_cases,
    verdict_data,
)

__all__ = [
    "ServerSettings",
    "add_arguments",
    "create_app",
    "serve",
    "serve_main",
]

log = logging.getLogger("agent.api")

API_VERSION = "1"
WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_MAX_UPLOAD_MB = 256
SNIFF_BYTES = 1 << 16
MAX_NAME = 120
TOKEN_ENV = "ANOMALY_AGENT_TOKEN"
DOC_MAX_BYTES = 64 * 1024 * 1024

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


# ============================================================================ settings

@dataclass(frozen=True)
class ServerSettings:
    """What one server serves and how.

    Attributes:
        db: The SQLite database (:mod:`agent.db`).
        store: The knowledge store folder (documents, rules, past cases).
        token: The bearer token every ``/api`` route but ``/health`` requires.
        model: The explainer model name (:func:`agent.models.make_model`), or ``none``.
        uploads: Where uploads are kept (default ``<store>/uploads``).
        reports: Where reports are written (default ``<store>/reports``).
        max_upload_bytes: Uploads larger than this are refused with 413.
        cors_origins: Origins allowed to call the API from a browser (empty: CORS off).
        use_knowledge: False serves without a knowledge store.
        chat_mode: ``auto``, ``routed`` or ``native`` (see :mod:`agent.chat`).
        chat_wording: ``model`` lets the model word chat answers; ``tools`` keeps the tools' text.
    """

    db: Path
    store: Path
    token: str
    model: str = "none"
    uploads: Path | None = None
    reports: Path | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    cors_origins: tuple[str, ...] = ()
    use_knowledge: bool = True
    chat_mode: str = "auto"
    chat_wording: str = "model"

    def __post_init__(self) -> None:
        if not self.token or len(self.token) < 8:
            raise ValueError("the API token must be at least 8 characters")
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be >= 1, got {self.max_upload_bytes}")
        if self.chat_mode not in ("auto", "routed", "native"):
            raise ValueError(f"chat mode {self.chat_mode!r} is not one of auto, routed, native")
        if self.chat_wording not in ("model", "tools"):
            raise ValueError(f"chat wording {self.chat_wording!r} is not one of model, tools")


# ============================================================================ schemas

class ErrorBody(BaseModel):
    """Every error response: what went wrong, in words, and structured detail when there is some."""

    error: str
    detail: Any = None


class Health(BaseModel):
    """``GET /api/health``."""

    status: Literal["ok"] = "ok"
    api_version: str = API_VERSION
    schema_version: int


class UploadInfo(BaseModel):
    """A stored upload; ``id`` is what ``POST /api/runs`` takes."""

    id: str
    filename: str
    size: int
    sha256: str
    kind: Literal["log", "candidates", "document"]
    created: bool


class RunCreate(RunInputs):
    """``POST /api/runs``: an uploaded input, an optional uploaded training log, and detection options."""

    upload_id: str = Field(min_length=16, max_length=16, pattern=r"^[0-9a-f]{16}$")
    train_upload_id: str | None = Field(default=None, min_length=16, max_length=16, pattern=r"^[0-9a-f]{16}$")


class InputOut(BaseModel):
    """One input of a run (by name; server paths are not shown)."""

    name: str
    sha256: str
    size: int
    kind: str


class RunOut(BaseModel):
    """A run with its counts."""

    id: str
    status: str
    created: str
    updated: str
    inputs: list[InputOut]
    model_id: str
    prompt_version: str
    rules_version: str
    knowledge_version: str
    detector: str | None
    candidates: int
    verdicts: int
    reviewed: int


class CandidateList(BaseModel):
    """One page of a run's queue."""

    run_id: str
    sort: str
    total: int
    matching: int
    offset: int
    limit: int
    items: list[CandidateBrief]


class VerdictOut(BaseModel):
    """A stored verdict with its review state; ``version`` goes back as ``expected_version``."""

    verdict_id: int
    run_id: str
    candidate_id: str
    verdict: Verdict
    review: str
    final_label: str
    final_severity: int
    version: int
    model_calls: int
    cache_hit: bool
    elapsed_s: float
    created: str


class FeedbackOut(BaseModel):
    """One analyst action on a verdict and the state it left."""

    id: int
    verdict_id: int
    action: str
    severity: int | None
    note: str | None
    author: str
    created: str
    label_after: str
    severity_after: int
    version_after: int


class CandidateDetail(BaseModel):
    """A candidate, its queue row, its verdict (if explained) and the feedback on it."""

    brief: CandidateBrief
    candidate: Candidate
    verdict: VerdictOut | None
    feedback: list[FeedbackOut]


class ExplainOut(BaseModel):
    """``POST .../explain``: the verdict and whether this call made it."""

    created: bool
    verdict: VerdictOut


class ExplainRequest(BaseModel):
    """``POST /api/explain``: any candidate (not stored)."""

    model_config = ConfigDict(extra="forbid")
    candidate: Candidate


class FeedbackIn(BaseModel):
    """``POST /api/verdicts/{id}/feedback``."""

    model_config = ConfigDict(extra="forbid")
    action: FeedbackAction
    author: str = Field(min_length=1, max_length=100)
    severity: int | None = Field(default=None, ge=0, le=4)
    note: str | None = Field(default=None, max_length=4000)
    expected_version: int | None = Field(default=None, ge=1, description="the version you saw; 409 if it changed")


class FeedbackResult(BaseModel):
    """The recorded feedback and the verdict after it."""

    feedback: FeedbackOut
    verdict: VerdictOut


class ChatSessionIn(BaseModel):
    """``POST /api/chat/sessions``."""

    model_config = ConfigDict(extra="forbid")
    title: str = Field(default="chat", min_length=1, max_length=200)
    run_id: str | None = None


class ChatSessionOut(BaseModel):
    """A chat session."""

    id: str
    run_id: str | None
    title: str
    created: str


class ChatMessageIn(BaseModel):
    """``POST /api/chat/sessions/{id}/messages``: the message and what the analyst has open."""

    model_config = ConfigDict(extra="forbid")
    content: str = Field(min_length=1, max_length=4000)
    run_id: str | None = None
    candidate_id: str | None = None
    stream: bool = False


class ChatMessageOut(BaseModel):
    """A stored chat message."""

    id: int
    role: str
    content: str
    cited_ids: list[str]
    created: str


class RuleIn(BaseModel):
    """``POST /api/rules``."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=1000)
    effect: Literal["raise_severity", "lower_severity", "set_normal", "define_anomaly"] | None = None
    severity: int | None = Field(default=None, ge=0, le=4)


class RuleOut(BaseModel):
    """A rule as stored (``predicate`` is the compiled condition, None for text-only rules)."""

    id: str
    version: int
    text: str
    predicate: dict[str, Any] | None
    effect: str | None
    severity: int | None
    method: str
    note: str
    compiled: bool
    created: str
    updated: str


class RuleList(BaseModel):
    """The active rules and the rule book's version."""

    rules_version: str
    rules: list[RuleOut]


class PassageOut(BaseModel):
    """A stored passage (document chunk, rule text or past case)."""

    id: str
    source: str
    heading: str
    offset: int
    text: str
    score: float | None = None
    example: bool = False
    collection: str


class SearchOut(BaseModel):
    """Search results, best first."""

    query: str
    collection: str
    passages: list[PassageOut]


class ToolOut(BaseModel):
    """A tool result (used for similar cases)."""

    text: str
    found: bool
    cited_ids: list[str]
    data: dict[str, Any]


class ReportOut(BaseModel):
    """A generated report: where to download it and what it covered."""

    run_id: str
    candidates: int
    verdicts_made: int
    files: dict[str, str]
    elapsed_s: float


# ============================================================================ state

class _ReadStats:
    """Cheap counts and change stamps read over a second SQLite connection (read-only queries).

    Why a second connection: listing runs with counts, and knowing whether a run's verdicts
    changed since the queue was last built, must not parse every stored JSON row on every
    request; WAL lets this connection read while the main one writes.
    """

    def __init__(self, path: Path) -> None:
        from agent.db import connect

        self._conn = connect(path)
        self._lock = threading.Lock()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def counts(self) -> dict[str, tuple[int, int, int]]:
        """run id -> (candidates, verdicts, reviewed verdicts)."""
        out: dict[str, list[int]] = {}
        for run_id, n in self.query("SELECT run_id, count(*) FROM candidates GROUP BY run_id"):
            out.setdefault(run_id, [0, 0, 0])[0] = int(n)
        for run_id, n, r in self.query("SELECT run_id, count(*), sum(review != 'unreviewed') FROM verdicts GROUP BY run_id"):
            row = out.setdefault(run_id, [0, 0, 0])
            row[1], row[2] = int(n), int(r or 0)
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: changes whenever any other connection commits.

        This connection never writes, so every commit (this server's, the CLI's, another
        server's) changes it: an exact, microsecond-cheap stamp for the read cache.
        """
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


CACHE_ENTRIES = 2048


@dataclass
class _State:
    settings: ServerSettings
    ctx: AgentContext
    chat: Any
    stats: _ReadStats
    uploads: Path
    reports: Path
    cache: OrderedDict[str, tuple[tuple[int, int, int], bytes]] = field(default_factory=OrderedDict)
    cache_lock: threading.Lock = field(default_factory=threading.Lock)
    by_url: dict[bytes, str] = field(default_factory=dict)
    """Raw ``path?query`` of a GET -> its cache key, for :meth:`fast_hit`."""

    def stamp(self) -> tuple[int, int, int]:
        """What cached reads depend on: the database's data version and the rule book file."""
        try:
            st = (self.ctx.store_dir / "rules.json").stat()
            rules = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            rules = (0, 0)
        return (self.stats.data_version(), *rules)

    def queue(self, run_id: str, sort: str) -> list[CandidateBrief]:
        """The run's queue rows (computed; callers cache the serialised response)."""
        return candidate_briefs(self.ctx, run_id, sort=sort)

    def fast_hit(self, raw_url: bytes) -> bytes | None:
        """The cached body for a GET of exactly this URL, if it is still fresh (see :class:`_Guard`)."""
        key = self.by_url.get(raw_url)
        if key is None:
            return None
        hit = self.cache.get(key)
        if hit is None or hit[0] != self.stamp():
            return None
        return hit[1]

    async def cached(self, request: Request, key: str, build: Callable[[], Any], adapter: Any = None) -> Response:
        """A JSON response served from memory while nothing it depends on has changed.

        Why: the analyst's page and scripts re-read the same runs, queue and candidates all the
        time, and a read served from memory costs no thread hop, no SQL beyond one ``PRAGMA``,
        no JSON parsing of stored rows and no re-serialisation. The stamp is taken *before* the
        value is built, so a write that lands during the build leaves a stale stamp on the entry
        and the next read rebuilds it: an entry is never newer-stamped than its content.
        Misses are built in the thread pool (the database lock may be held by a writer).
        """
        from starlette.concurrency import run_in_threadpool

        stamp = self.stamp()
        hit = self.cache.get(key)
        if hit is not None and hit[0] == stamp:
            return Response(hit[1], media_type="application/json")
        value = await run_in_threadpool(build)
        if adapter is not None:
            body = adapter.dump_json(value)
        elif isinstance(value, BaseModel):
            body = value.model_dump_json().encode("utf-8")
        else:
            body = json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
        with self.cache_lock:
            self.cache[key] = (stamp, body)
            self.cache.move_to_end(key)
            while len(self.cache) > CACHE_ENTRIES:
                self.cache.popitem(last=False)
            if len(self.by_url) < 4 * CACHE_ENTRIES:
                self.by_url[_raw_url(request.scope) + b"?" + (request.scope.get("query_string") or b"")] = key
        return Response(body, media_type="application/json")


def _raw_url(scope: dict[str, Any]) -> bytes:
    """The request's path as sent (percent-encoding kept)."""
    return scope.get("raw_path") or scope.get("path", "").encode("utf-8")


class _Guard:
    """Pure ASGI middleware: the bearer-token check for ``/api``, the security headers, and the
    fast path for cached reads.

    Why not a FastAPI dependency or ``@app.middleware``: both cost more per request than the
    read routes themselves at 50 concurrent clients, and one check in front of everything also
    covers unknown ``/api`` paths (no route discovery without the token). A GET of a URL whose
    response is cached and still fresh (same database data version and rule book) is answered
    here, after the token check, without routing or parameter parsing: the same URL always
    reaches the same handler with the same parameters, so the bytes are exactly what it would
    return.
    """

    def __init__(self, app: Any, token: str, state: Any = None) -> None:
        self.app = app
        self.token = token.encode("utf-8")
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        is_api = path == "/api" or path.startswith("/api/")
        if is_api and path != "/api/health":
            auth = b""
            for name, value in scope.get("headers") or ():
                if name == b"authorization":
                    auth = value
                    break
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                reason = "missing bearer token: send Authorization: Bearer TOKEN" if not auth else "invalid bearer token"
                body = json.dumps({"error": reason, "detail": None}).encode("utf-8")
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode()), *_BASE_HEADERS,
                                        (b"cache-control", b"no-store")]})
                await send({"type": "http.response.body", "body": body})
                return
        extra = [*_BASE_HEADERS, *(((b"cache-control", b"no-store"),) if is_api else _PAGE_HEADERS)]
        if is_api and scope.get("method") == "GET" and self.state is not None:
            body = self.state.fast_hit(_raw_url(scope) + b"?" + (scope.get("query_string") or b""))
            if body is not None:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()), *extra]})
                await send({"type": "http.response.body", "body": body})
                return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers") or ()}
                message = {**message, "headers": [*(message.get("headers") or ()),
                                                  *((k, v) for k, v in extra if k not in have)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_BASE_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))
_PAGE_HEADERS = ((b"content-security-policy", CSP.encode("ascii")), (b"cache-control", b"no-cache"),
                 (b"x-frame-options", b"DENY"))


_RUNS = TypeAdapter(list[RunOut])


def _state(request: Request) -> _State:
    return request.app.state.aa


# ============================================================================ helpers

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, default: str = "upload.log") -> str:
    """A file name safe to store: the last path part, odd characters replaced, no leading dots, bounded.

    ``../../etc/passwd`` -> ``passwd``; ``C:\\logs\\a b.log`` -> ``a_b.log``; ``..`` -> ``upload.log``.
    """
    base = re.split(r"[\\/]", name or "")[-1]
    base = _SAFE.sub("_", base).lstrip(".-_")
    if len(base) > MAX_NAME:
        stem, dot, suffix = base.rpartition(".")
        base = (stem[: MAX_NAME - len(suffix) - 1] + "." + suffix) if dot and len(suffix) <= 10 else base[:MAX_NAME]
    return base or default


def _suffix(name: str) -> str:
    p = Path(name.lower())
    if p.suffix == ".gz":
        return Path(p.stem).suffix or ".gz"
    return p.suffix


def _http(status: int, message: str, detail: Any = None) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": message, "detail": detail})


def _run_out(run: Run, counts: dict[str, tuple[int, int, int]]) -> RunOut:
    c = counts.get(run.id, (0, 0, 0))
    det = run.settings.get("detection") if isinstance(run.settings.get("detection"), dict) else None
    return RunOut(id=run.id, status=run.status.value, created=run.created, updated=run.updated,
                  inputs=[InputOut(name=Path(f.path).name, sha256=f.sha256, size=f.size, kind=f.kind) for f in run.inputs],
                  model_id=run.model_id, prompt_version=run.prompt_version, rules_version=run.rules_version,
                  knowledge_version=run.knowledge_version, detector=det.get("detector") if det else None,
                  candidates=c[0], verdicts=c[1], reviewed=c[2])


def _verdict_out(v: VerdictRow) -> VerdictOut:
    return VerdictOut.model_validate(verdict_data(v))


def _feedback_out(f: Any) -> FeedbackOut:
    return FeedbackOut(id=f.id, verdict_id=f.verdict_id, action=f.action.value,
                       severity=int(f.severity) if f.severity is not None else None, note=f.note, author=f.author,
                       created=f.created, label_after=f.label_after.value, severity_after=int(f.severity_after),
                       version_after=f.version_after)


async def _receive_file(request: Request, dest_dir: Path, filename: str, limit: int) -> tuple[Path, str, int]:
    """Stream the request body to ``dest_dir/.incoming``, refusing it past ``limit`` bytes (413).

    Returns:
        (temporary path, sha256, size). The caller moves or removes the file.
    """
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/"):
        raise _http(415, "multipart form uploads are not accepted: send the file itself as the request body "
                         "(Content-Type: application/octet-stream) with ?filename=NAME")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise _http(400, f"Content-Length {declared!r} is not a number") from None
        if n > limit:
            raise _http(413, f"{filename}: {n} bytes is over the upload limit of {limit} bytes")
    incoming = dest_dir / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = incoming / f"{uuid.uuid4().hex}.part"
    h = hashlib.sha256()
    size = 0
    try:
        with tmp.open("wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _http(413, f"{filename}: more than the upload limit of {limit} bytes")
                h.update(chunk)
                fh.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if size == 0:
        tmp.unlink(missing_ok=True)
        raise _http(400, f"{filename}: the upload is empty")
    return tmp, h.hexdigest(), size


def _sniff_text(path: Path, filename: str) -> None:
    """Refuse (415) content that is not text: NUL bytes, or a .gz that is not gzip."""
    try:
        with path.open("rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rb") as fh:  # type: ignore[operator]
            head = fh.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as exc:
        raise _http(415, f"{filename}: not readable as text or gzip ({exc})") from None
    if b"\x00" in head:
        raise _http(415, f"{filename}: binary content (NUL bytes in the first {SNIFF_BYTES // 1024} KiB) is not a log; "
                         "upload text logs, .gz of text, or JSON lines")
    if filename.lower().endswith(".gz") and not gz:
        raise _http(415, f"{filename}: named .gz but not gzip data")


def _store_upload(tmp: Path, folder: Path, name: str) -> tuple[Path, bool]:
    """Move a received file to ``folder/name`` (an existing identical upload is kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = [p for p in folder.iterdir() if p.is_file()]
    if existing:
        tmp.unlink(missing_ok=True)
        return existing[0], False
    final = folder / name
    os.replace(tmp, final)
    return final, True


def _find_upload(state: _State, upload_id: str, what: str) -> Path:
    folder = state.uploads / upload_id
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if not files:
        raise NotFound("upload", upload_id, f"{what}: upload the file first (POST /api/uploads?filename=...)")
    return files[0]


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, default=str)}\n\n"


# ============================================================================ app

def create_app(settings: ServerSettings, *, model: Any = "from-settings") -> FastAPI:
    """The FastAPI application for ``settings`` (the web page is served at ``/``).

    Args:
        settings: What to serve.
        model: A ready :class:`agent.models.ChatModel` (or None) instead of building
            ``settings.model``; for embedding the app in tests or other processes.
    """
    from agent.chat import ChatAgent

    if model == "from-settings":
        model = None
        if settings.model != "none":
            from agent.models import make_model

            model = make_model(settings.model)
    db = Database(settings.db)
    uploads = (settings.uploads or settings.store / "uploads").expanduser()
    reports = (settings.reports or settings.store / "reports").expanduser()
    uploads.mkdir(parents=True, exist_ok=True)
    reports.mkdir(parents=True, exist_ok=True)
    ctx = AgentContext(db, settings.store, model=model, uploads_dir=uploads, use_knowledge=settings.use_knowledge)
    chat = ChatAgent(ctx, mode=settings.chat_mode, word_with_model=settings.chat_wording == "model")
    state = _State(settings=settings, ctx=ctx, chat=chat, stats=_ReadStats(db.path), uploads=uploads, reports=reports)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.stats.close()
        db.close()

    app = FastAPI(title="anomaly-agent", version=API_VERSION,
                  description="Detect, explain and review anomalies; every answer cites its evidence.",
                  docs_url=None, redoc_url=None, openapi_url=None,  # the docs UIs load scripts from a CDN
                  lifespan=lifespan)
    app.state.aa = state
    _install_errors(app)
    app.add_middleware(_Guard, token=settings.token, state=state)
    if settings.cors_origins:  # added last = outermost: a browser's preflight carries no token
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])

    @app.get("/api/health", response_model=Health, tags=["health"])
    async def health() -> Health:
        """Liveness; needs no token (load balancers and the web page's first check)."""
        return Health(schema_version=db.schema_version)

    api = APIRouter(prefix="/api", responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody},
                                              422: {"model": ErrorBody}})
    _routes(api, app)
    app.include_router(api)

    if WEB_DIR.is_dir():
        from starlette.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=str(WEB_DIR), html=True), name="web")
    return app


def _install_errors(app: FastAPI) -> None:
    """JSON errors with reasons for every failure; no traceback ever reaches the client."""

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        bad_json = [e for e in errors if e.get("type") == "json_invalid"]
        if bad_json:
            ctx = bad_json[0].get("ctx") or {}
            where = bad_json[0].get("loc", ("body", "?"))
            pos = where[1] if len(where) > 1 else "?"
            return JSONResponse(status_code=400, content={
                "error": f"malformed JSON in the request body at position {pos}: {ctx.get('error', 'cannot parse')}"})
        simple = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
                   "problem": e.get("msg"), "value": e.get("input") if not isinstance(e.get("input"), (dict, list)) else None}
                  for e in errors[:20]]
        text = "; ".join(f"{s['field']}: {s['problem']}" for s in simple[:5])
        return JSONResponse(status_code=422, content={"error": f"invalid request: {text}", "detail": jsonable(simple)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if isinstance(detail, dict) and "error" in detail:
            body = {"error": detail["error"], "detail": detail.get("detail")}
        elif exc.status_code == 404:
            body = {"error": f"no route {request.method} {request.url.path}"}
        elif exc.status_code == 405:
            body = {"error": f"method {request.method} is not allowed on {request.url.path}"}
        else:
            body = {"error": str(detail)}
        return JSONResponse(status_code=exc.status_code, content=body, headers=getattr(exc, "headers", None))

    def handler(status: int) -> Any:
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse(status_code=status, content={"error": str(exc)})
        return handle

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        # the database's messages name its file; a client needs the ids, not the server's paths
        db_path = _state(request).ctx.db.path
        return JSONResponse(status_code=404, content={"error": str(exc).replace(str(db_path), db_path.name)})

    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(InvalidValue, handler(422))
    app.add_exception_handler(ToolError, handler(422))
    app.add_exception_handler(Conflict, handler(409))
    app.add_exception_handler(SchemaTooNew, handler(500))

    from agent.models import ModelError

    async def model_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=503, content={"error": f"the model is not available: {exc}"})

    app.add_exception_handler(ModelError, model_error)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:8]
        log.error("request %s %s failed (ref %s)", request.method, request.url.path, ref, exc_info=exc)
        kind = "database" if isinstance(exc, (DBError, sqlite3.Error)) else "internal"
        return JSONResponse(status_code=500, content={"error": f"{kind} error; the server log has the details (ref {ref})"})

    app.add_exception_handler(Exception, unexpected)


def jsonable(value: Any) -> Any:
    """JSON-safe copy of error detail (pydantic puts exceptions and bytes in there)."""
    return json.loads(json.dumps(value, default=str))


# ============================================================================ routes

def _routes(api: APIRouter, app: FastAPI) -> None:
    # ------------------------------------------------------------------ schema
    @api.get("/openapi.json", tags=["health"], include_in_schema=False)
    def openapi() -> JSONResponse:
        """The OpenAPI schema of this API."""
        from fastapi.openapi.utils import get_openapi

        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "the server's API token"}}
            for path, ops in schema.get("paths", {}).items():
                if path != "/api/health":
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return JSONResponse(app.openapi_schema)

    # ------------------------------------------------------------------ uploads
    @api.post("/uploads", status_code=201, response_model=UploadInfo, tags=["uploads"],
              responses={413: {"model": ErrorBody}, 415: {"model": ErrorBody}})
    async def upload(request: Request, filename: str = Query(min_length=1, max_length=255,
                                                             description="the file's name (its type is read from it)")) -> Response:
        """Upload a log (text, .gz, JSON lines of log records) or candidates JSON lines, as the raw body."""
        from agent.report import UNSUPPORTED_SUFFIXES

        state = _state(request)
        name = safe_filename(filename)
        suffix = _suffix(name)
        if suffix in UNSUPPORTED_SUFFIXES:
            raise _http(415, f"{name}: unsupported file type {suffix!r} ({UNSUPPORTED_SUFFIXES[suffix]}); upload log "
                             "files (text, .gz, JSON lines of log records) or candidate JSON lines")
        tmp, digest, size = await _receive_file(request, state.uploads, name, state.settings.max_upload_bytes)
        try:
            _sniff_text(tmp, name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        final, created = _store_upload(tmp, state.uploads / digest[:16], name)
        from agent.report import ReportInputError, sniff_kind

        try:
            kind = sniff_kind(final)
        except ReportInputError as exc:
            raise _http(415, str(exc)) from None
        info = UploadInfo(id=digest[:16], filename=final.name, size=size, sha256=digest, kind=kind, created=created)  # type: ignore[arg-type]
        return JSONResponse(status_code=201 if created else 200, content=info.model_dump(mode="json"))

    # ------------------------------------------------------------------ runs
    @api.post("/runs", status_code=201, response_model=RunOut, tags=["runs"], responses={409: {"model": ErrorBody}})
    def make_run(body: RunCreate, request: Request) -> Response:
        """Detect candidates in an uploaded log and store them as a run (the same file and options = the same run)."""
        state = _state(request)
        path = _find_upload(state, body.upload_id, "upload_id")
        train = _find_upload(state, body.train_upload_id, "train_upload_id") if body.train_upload_id else None
        opts = RunInputs.model_validate(body.model_dump(exclude={"upload_id", "train_upload_id"}))
        run, created = create_run(state.ctx, path, train_path=train, options=opts)
        out = _run_out(run, state.stats.counts())
        return JSONResponse(status_code=201 if created else 200, content=out.model_dump(mode="json"))

    @api.get("/runs", response_model=list[RunOut], tags=["runs"])
    async def list_runs(request: Request) -> Response:
        """Every run, newest first, with candidate, verdict and review counts."""
        state = _state(request)

        def build() -> list[RunOut]:
            counts = state.stats.counts()
            return [_run_out(r, counts) for r in state.ctx.db.runs()]

        return await state.cached(request, "runs", build, _RUNS)

    @api.get("/runs/{run_id}", response_model=RunOut, tags=["runs"])
    async def get_run(run_id: str, request: Request) -> Response:
        """One run with its counts."""
        state = _state(request)
        return await state.cached(request, f"run|{run_id}", lambda: _run_out(state.ctx.db.run(run_id), state.stats.counts()))

    # ------------------------------------------------------------------ candidates
    @api.get("/runs/{run_id}/candidates", response_model=CandidateList, tags=["candidates"])
    async def list_candidates(run_id: str, request: Request,
                              sort: Literal["severity", "score", "seq"] = "severity",
                              detector: str | None = Query(default=None, max_length=100),
                              reason: str | None = Query(default=None, max_length=100),
                              label: Literal["anomaly", "normal", "uncertain"] | None = None,
                              min_severity: int | None = Query(default=None, ge=0, le=4),
                              review: Literal["unexplained", "unreviewed", "confirmed", "corrected"] | None = None,
                              q: str | None = Query(default=None, max_length=200, description="candidate id contains"),
                              limit: int = Query(default=100, ge=1, le=1000),
                              offset: int = Query(default=0, ge=0)) -> Response:
        """The run's candidate queue: most severe first (verdict severity, else the detector's), filtered, paged."""
        state = _state(request)

        def build() -> CandidateList:
            state.ctx.db.run(run_id)
            rows = state.queue(run_id, sort)
            total = len(rows)
            rows = filter_briefs(rows, detector=detector, reason=reason, label=label, min_severity=min_severity,
                                 review=review, q=q)
            return CandidateList(run_id=run_id, sort=sort, total=total, matching=len(rows), offset=offset, limit=limit,
                                 items=rows[offset: offset + limit])

        key = json.dumps(["queue", run_id, sort, detector, reason, label, min_severity, review, q, limit, offset])
        return await state.cached(request, key, build)

    @api.get("/runs/{run_id}/candidates/{candidate_id:path}/lines", response_model=LineView, tags=["candidates"])
    async def candidate_lines(run_id: str, candidate_id: str, request: Request,
                              max_lines: int = Query(default=400, ge=1, le=5000)) -> Response:
        """The candidate's session lines (lines that name its id, within its span), flagged lines marked."""
        state = _state(request)
        return await state.cached(request, json.dumps(["lines", run_id, candidate_id, max_lines]),
                                  lambda: session_lines(state.ctx, run_id, candidate_id, max_lines=max_lines))

    @api.get("/runs/{run_id}/candidates/{candidate_id:path}/verdict", response_model=VerdictOut, tags=["verdicts"])
    async def get_verdict(run_id: str, candidate_id: str, request: Request) -> Response:
        """The stored verdict (404 until explained: POST .../explain)."""
        state = _state(request)
        return await state.cached(request, json.dumps(["verdict", run_id, candidate_id]),
                                  lambda: _verdict_out(state.ctx.db.verdict(run_id, candidate_id)))

    @api.post("/runs/{run_id}/candidates/{candidate_id:path}/explain", response_model=ExplainOut, tags=["verdicts"],
              responses={201: {"model": ExplainOut}, 503: {"model": ErrorBody}})
    def explain_stored(run_id: str, candidate_id: str, request: Request) -> Response:
        """Explain a candidate now and store the verdict (201), or return the stored one (200)."""
        state = _state(request)
        result = explain_candidate(state.ctx, run_id, candidate_id)
        out = ExplainOut(created=bool(result.data["created"]),
                         verdict=_verdict_out(state.ctx.db.verdict(run_id, result.args["candidate_id"])))
        return JSONResponse(status_code=201 if out.created else 200, content=out.model_dump(mode="json"))

    @api.get("/runs/{run_id}/candidates/{candidate_id:path}/similar", response_model=ToolOut, tags=["candidates"])
    def similar(run_id: str, candidate_id: str, request: Request, k: int = Query(default=3, ge=1, le=20)) -> ToolOut:
        """Reviewed past cases that look like this candidate."""
        r = similar_cases(_state(request).ctx, run_id, candidate_id, k=k)
        return ToolOut(text=r.text, found=r.found, cited_ids=list(r.cited_ids), data=r.data)

    @api.get("/runs/{run_id}/candidates/{candidate_id:path}", response_model=CandidateDetail, tags=["candidates"])
    async def get_candidate(run_id: str, candidate_id: str, request: Request) -> Response:
        """One candidate with its evidence, queue row, verdict and feedback."""
        state = _state(request)

        def build() -> CandidateDetail:
            row = state.ctx.db.candidate(run_id, candidate_id)
            brief = next(b for b in state.queue(run_id, "severity") if b.id == row.candidate_id)
            verdict = None
            feedback: list[FeedbackOut] = []
            try:
                v = state.ctx.db.verdict(run_id, row.candidate_id)
            except NotFound:
                pass
            else:
                verdict = _verdict_out(v)
                feedback = [_feedback_out(f) for f in state.ctx.db.feedback(v.id)]
            return CandidateDetail(brief=brief, candidate=row.candidate, verdict=verdict, feedback=feedback)

        return await state.cached(request, json.dumps(["candidate", run_id, candidate_id]), build)

    # ------------------------------------------------------------------ verdicts and feedback
    @api.post("/explain", response_model=Verdict, tags=["verdicts"], responses={503: {"model": ErrorBody}})
    def explain_posted(body: ExplainRequest, request: Request) -> Verdict:
        """Explain any candidate (e.g. one from ``detect --out``); nothing is stored."""
        ctx = _state(request).ctx
        with ctx.model_lock:
            explainer = ctx.explainer()
            explainer.refresh()
            return explainer.explain(body.candidate)

    @api.get("/verdicts/{verdict_id}", response_model=VerdictOut, tags=["verdicts"])
    async def get_verdict_by_id(verdict_id: int, request: Request) -> Response:
        """A verdict by its row id."""
        state = _state(request)
        return await state.cached(request, f"verdict-id|{verdict_id}", lambda: _verdict_out(state.ctx.db.verdict_by_id(verdict_id)))

    @api.post("/verdicts/{verdict_id}/feedback", status_code=201, response_model=FeedbackResult, tags=["feedback"],
              responses={409: {"model": ErrorBody}})
    def add_feedback(verdict_id: int, body: FeedbackIn, request: Request, background: BackgroundTasks) -> FeedbackResult:
        """Confirm, reject, change the severity of, or note on a verdict. Send ``expected_version`` (the
        version you saw): if someone changed the verdict since, nothing is written and the answer is 409."""
        state = _state(request)
        fb = state.ctx.db.add_feedback(verdict_id, body.action, author=body.author, severity=body.severity,
                                       note=body.note, expected_version=body.expected_version)
        v = state.ctx.db.verdict_by_id(verdict_id)
        if body.action is not FeedbackAction.NOTE or v.review.value != "unreviewed":
            background.add_task(_sync_cases, state.ctx)  # reviewed verdicts become searchable past cases
        return FeedbackResult(feedback=_feedback_out(fb), verdict=_verdict_out(v))

    @api.get("/verdicts/{verdict_id}/feedback", response_model=list[FeedbackOut], tags=["feedback"])
    def list_feedback(verdict_id: int, request: Request) -> list[FeedbackOut]:
        """All feedback on a verdict, oldest first."""
        return [_feedback_out(f) for f in _state(request).ctx.db.feedback(verdict_id)]

    # ------------------------------------------------------------------ chat
    @api.post("/chat/sessions", status_code=201, response_model=ChatSessionOut, tags=["chat"])
    def new_session(body: ChatSessionIn, request: Request) -> ChatSessionOut:
        """Start a chat session (optionally about one run)."""
        s = _state(request).ctx.db.create_chat_session(body.title, body.run_id)
        return ChatSessionOut(id=s.id, run_id=s.run_id, title=s.title, created=s.created)

    @api.get("/chat/sessions", response_model=list[ChatSessionOut], tags=["chat"])
    def sessions(request: Request, run_id: str | None = None) -> list[ChatSessionOut]:
        """Chat sessions, oldest first (only those about ``run_id`` when given)."""
        return [ChatSessionOut(id=s.id, run_id=s.run_id, title=s.title, created=s.created)
                for s in _state(request).ctx.db.chat_sessions(run_id)]

    @api.get("/chat/sessions/{session_id}/messages", response_model=list[ChatMessageOut], tags=["chat"])
    def messages(session_id: str, request: Request,
                 include_tools: bool = Query(default=False, description="also the stored tool calls")) -> list[ChatMessageOut]:
        """The conversation so far."""
        return [ChatMessageOut(id=m.id, role=m.role.value, content=m.content, cited_ids=list(m.cited_ids),
                               created=m.created)
                for m in _state(request).ctx.db.chat_messages(session_id)
                if include_tools or m.role.value in ("user", "assistant")]

    @api.post("/chat/sessions/{session_id}/messages", tags=["chat"],
              responses={200: {"description": "a ChatAnswer (JSON), or an SSE stream of tool/delta/answer events",
                               "content": {"text/event-stream": {}}}})
    def post_message(session_id: str, body: ChatMessageIn, request: Request) -> Response:
        """Ask a question. With ``"stream": true`` or ``Accept: text/event-stream`` the answer streams as
        server-sent events: ``tool`` (each tool call), ``delta`` (answer text), ``answer`` (the whole answer)."""
        state = _state(request)
        state.ctx.db.chat_session(session_id)  # 404 before any stream starts
        if body.run_id:
            state.ctx.db.run(body.run_id)
        wants_stream = body.stream or "text/event-stream" in request.headers.get("accept", "")
        events = state.chat.stream(session_id, body.content, run_id=body.run_id, candidate_id=body.candidate_id)
        if not wants_stream:
            answer = None
            for event in events:
                if event.type == "answer":
                    answer = event.data
            return JSONResponse(answer)

        def sse() -> Iterator[str]:
            try:
                for event in events:
                    yield _sse(event.type, event.data)
            except (NotFound, InvalidValue, ToolError) as exc:
                yield _sse("error", {"error": str(exc)})
            except Exception as exc:  # the stream has started: report in-band, log with a reference
                ref = uuid.uuid4().hex[:8]
                log.error("chat stream failed (ref %s)", ref, exc_info=exc)
                yield _sse("error", {"error": f"internal error; the server log has the details (ref {ref})"})

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ rules
    @api.get("/rules", response_model=RuleList, tags=["rules"])
    async def rules(request: Request) -> Response:
        """The active rules."""
        state = _state(request)

        def build() -> RuleList:
            book = state.ctx.rulebook()
            return RuleList(rules_version=book.rules_version, rules=[RuleOut.model_validate(rule_dict(r)) for r in book.list()])

        return await state.cached(request, "rules", build)

    @api.get("/rules/{rule_id}", response_model=RuleOut, tags=["rules"])
    def rule(rule_id: str, request: Request) -> RuleOut:
        """One active rule."""
        from knowledge.rules import RuleNotFound

        try:
            return RuleOut.model_validate(rule_dict(_state(request).ctx.rulebook().get(rule_id)))
        except RuleNotFound as exc:
            raise NotFound("rule", rule_id, str(exc.args[0]) if exc.args else "") from None

    @api.post("/rules", status_code=201, response_model=RuleOut, tags=["rules"])
    def new_rule(body: RuleIn, request: Request) -> Response:
        """Add a natural-language rule (compiled where the wording allows); the same text returns the existing rule (200)."""
        try:
            r: ToolResult = add_rule(_state(request).ctx, body.text, body.effect, body.severity)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
        out = RuleOut.model_validate(r.data["rule"])
        return JSONResponse(status_code=201 if r.data["created"] else 200, content=out.model_dump(mode="json"))

    @api.delete("/rules/{rule_id}", response_model=RuleOut, tags=["rules"])
    def delete_rule(rule_id: str, request: Request) -> RuleOut:
        """Deactivate a rule (kept in history; its id is never reused)."""
        return RuleOut.model_validate(remove_rule(_state(request).ctx, rule_id).data["rule"])

    # ------------------------------------------------------------------ knowledge
    def _store(request: Request) -> Any:
        store = _state(request).ctx.store
        if store is None:
            raise _http(409, "this server runs without a knowledge store (--no-knowledge)")
        return store

    @api.get("/knowledge/search", response_model=SearchOut, tags=["knowledge"])
    def search(request: Request, q: str = Query(min_length=1, max_length=1200), k: int = Query(default=5, ge=1, le=50),
               collection: Literal["documents", "rules", "cases"] = "documents",
               min_score: float = Query(default=0.0, ge=-1.0, le=1.0)) -> SearchOut:
        """Passages closest to ``q`` (cosine similarity in ``score``), best first."""
        found = _store(request).search(q, k=k, collection=collection)
        return SearchOut(query=q, collection=collection,
                         passages=[PassageOut(**p.model_dump(), collection=collection) for p in found
                                   if (p.score or 0.0) >= min_score])

    @api.get("/knowledge/sources", tags=["knowledge"])
    def sources(request: Request, collection: Literal["documents", "rules", "cases"] = "documents") -> list[dict[str, Any]]:
        """Stored documents with their passage counts."""
        return [s.model_dump(mode="json") for s in _store(request).list_sources(collection)]

    @api.get("/knowledge/passages/{passage_id}", response_model=PassageOut, tags=["knowledge"])
    def passage(passage_id: str, request: Request) -> PassageOut:
        """A passage by id (documents, then past cases, then rule text)."""
        store = _store(request)
        for collection in ("documents", "cases", "rules"):
            got = store.get([passage_id], collection=collection)
            if got:
                return PassageOut(**got[0].model_dump(), collection=collection)
        raise NotFound("passage", passage_id)

    @api.post("/knowledge/documents", status_code=201, tags=["knowledge"],
              responses={413: {"model": ErrorBody}, 415: {"model": ErrorBody}})
    async def add_document(request: Request, filename: str = Query(min_length=1, max_length=255)) -> Response:
        """Add a document (Markdown, text or PDF, raw body) to the knowledge store; the same name replaces it."""
        from starlette.concurrency import run_in_threadpool

        from knowledge.ingest import SUPPORTED_SUFFIXES, ingest_file

        state = _state(request)
        store = _store(request)
        name = safe_filename(filename, default="document.md")
        suffix = Path(name).suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            raise _http(415, f"{name}: unsupported document type {suffix or '(no extension)'!r}; "
                             f"supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}")
        docs = state.uploads / "documents"
        tmp, digest, _ = await _receive_file(request, docs, name, min(state.settings.max_upload_bytes, DOC_MAX_BYTES))
        final, _ = _store_upload(tmp, docs / digest[:16], name)

        def ingest() -> Any:
            with state.ctx.store_lock:
                return ingest_file(store, final, source=name)

        result = await run_in_threadpool(ingest)
        if not result.ok:
            raise _http(422, result.reason or f"{name}: could not be ingested")
        return JSONResponse(status_code=201, content=result.model_dump(mode="json"))

    # ------------------------------------------------------------------ reports
    @api.post("/runs/{run_id}/report", response_model=ReportOut, tags=["reports"])
    def report(run_id: str, request: Request) -> ReportOut:
        """Explain every candidate not explained yet (each verdict stored at once) and write the run's
        report (HTML, JSON, CSV, as ``anomaly-agent report`` writes them)."""
        return _generate_report(_state(request), run_id)

    @api.get("/runs/{run_id}/report.{fmt}", tags=["reports"], response_class=FileResponse)
    def download_report(run_id: str, fmt: Literal["html", "json", "csv"], request: Request) -> FileResponse:
        """Download a generated report."""
        state = _state(request)
        state.ctx.db.run(run_id)
        path = state.reports / run_id / f"report.{fmt}"
        if not path.is_file():
            raise NotFound("report", run_id, "generate it first: POST /api/runs/{run_id}/report")
        media = {"html": "text/html; charset=utf-8", "json": "application/json", "csv": "text/csv; charset=utf-8"}[fmt]
        return FileResponse(path, media_type=media, filename=f"{run_id}-report.{fmt}")


def _sync_cases(ctx: AgentContext) -> None:
    try:
        ctx.sync_cases()
    except Exception as exc:  # retrieval of past cases is a help; feedback itself is already stored
        log.warning("could not add past cases to the store: %s", exc)


def _generate_report(state: _State, run_id: str) -> ReportOut:
    """Explain the run's pending candidates, then render it with :mod:`agent.report`'s builders."""
    from agent.db import RunStatus
    from agent.report import build_report, write_report

    t0 = time.perf_counter()
    ctx = state.ctx
    db = ctx.db
    run = db.run(run_id)
    if run.status.value == "created":
        raise ToolError(f"run {run_id} has no candidates yet (detection did not finish); create it again")
    made = 0
    for row in db.pending_candidates(run_id):
        result = explain_candidate(ctx, run_id, row.candidate_id)
        made += bool(result.data.get("created"))
    run = db.set_run_status(run_id, RunStatus.DONE)
    rows = db.candidates(run_id)
    verdicts = db.verdicts(run_id)
    passage_ids = sorted({p for v in verdicts for p in v.verdict.passage_ids})
    rule_ids = {r for v in verdicts for r in v.verdict.rule_ids}
    passages: dict[str, Any] = {}
    if passage_ids and ctx.store is not None:
        for p in ctx.store.get(passage_ids):
            passages[p.id] = {"source": p.source, "heading": p.heading, "text": p.text[:600], "example": p.example}
    book = ctx.rulebook()
    rules = {r.id: {"text": r.text, "effect": r.effect.value if r.effect else None, "version": r.version}
             for r in [*book.list(), *book.history] if r.id in rule_ids}
    data = build_report(run, rows, verdicts, citations={"passages": passages, "rules": rules})
    out = state.reports / run_id / "report.html"
    write_report(data, out)
    files = {fmt: f"/api/runs/{run_id}/report.{fmt}" for fmt in ("html", "json", "csv")}
    return ReportOut(run_id=run_id, candidates=len(rows), verdicts_made=made, files=files,
                     elapsed_s=round(time.perf_counter() - t0, 3))


# ============================================================================ command line



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options to ``parser`` (defaults from ``ANOMALY_AGENT_<OPTION>``)."""
    default_store = _env("store", str(Path(os.environ.get("XDG_DATA_HOME", "~/.local/share")) / "anomaly-agent"))
    parser.add_argument("--host", default=_env("host", "127.0.0.1"),
                        help="address to listen on (a non-loopback address needs --token)")
    parser.add_argument("--port", type=int, default=_env("port", 8000))
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                        help=f"bearer token for every /api route but /api/health (${TOKEN_ENV}); on loopback "
                             "without one a random token is made and printed")
    parser.add_argument("--store", default=default_store, help="knowledge/rules store directory")
    parser.add_argument("--db", default=_env("db", None), help="SQLite database (default: <store>/agent.db)")
    parser.add_argument("--model", default=_env("model", "smollm2-135m"),
                        help="explainer model: smollm2-135m (embedded), qwen2.5-coder-0.5b/1.5b, llama-cpp, openai, or none")
    parser.add_argument("--chat-mode", choices=["auto", "routed", "native"], default=_env("chat_mode", "auto"),
                        help="routed: patterns pick the tools; native: the model calls them (OpenAI-compatible endpoint)")
    parser.add_argument("--chat-wording", choices=["model", "tools"], default=_env("chat_wording", "model"),
                        help="model: the model words chat answers from the tool results; tools: the tools' own text")
    parser.add_argument("--uploads", default=_env("uploads", None), help="upload folder (default: <store>/uploads)")
    parser.add_argument("--reports", default=_env("reports", None), help="report folder (default: <store>/reports)")
    parser.add_argument("--max-upload-mb", type=int, default=_env("max_upload_mb", DEFAULT_MAX_UPLOAD_MB))
    parser.add_argument("--cors-origin", action="append", default=[],
                        help="allow browser calls from this origin (repeatable; default: CORS off)")
    parser.add_argument("--no-knowledge", action="store_true", help="serve without the knowledge store")
    parser.add_argument("--log-level", default=_env("log_level", "warning"),
                        choices=["critical", "error", "warning", "info", "debug"])


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def settings_from_args(args: argparse.Namespace) -> tuple[ServerSettings, bool]:
    """The server settings the options describe; True when the token was generated here.

    Raises:
        ValueError: A non-loopback address without a token, a short token, bad sizes.
    """
    token = args.token
    generated = False
    if not token:
        if not is_loopback(args.host):
            raise ValueError(f"refusing to listen on {args.host} (not a loopback address) without a token: "
                             f"pass --token or set {TOKEN_ENV}")
        token = secrets.token_hex(24)  # hex: never starts with "-", so it can be pasted after --token
        generated = True
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not in 1-65535")
    if args.max_upload_mb < 1:
        raise ValueError(f"--max-upload-mb must be >= 1, got {args.max_upload_mb}")
    store = Path(args.store).expanduser()
    settings = ServerSettings(
        db=Path(args.db).expanduser() if args.db else store / "agent.db", store=store, token=token, model=args.model,
        uploads=Path(args.uploads).expanduser() if args.uploads else None,
        reports=Path(args.reports).expanduser() if args.reports else None,
        max_upload_bytes=args.max_upload_mb * 1024 * 1024, cors_origins=tuple(args.cors_origin),
        use_knowledge=not args.no_knowledge, chat_mode=args.chat_mode, chat_wording=args.chat_wording)
    return settings, generated


def serve(args: argparse.Namespace) -> int:
    """Run the server for parsed options until interrupted; returns the exit status."""
    import uvicorn

    settings, generated = settings_from_args(args)
    app = create_app(settings)
    shown = settings.token if generated else "(the one you gave)"
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"anomaly-agent serve: http://{url_host}:{args.port}/  database {settings.db}  store {settings.store}  "
          f"model {settings.model}", file=sys.stderr)
    print(f"token: {shown}", file=sys.stderr, flush=True)
    # Everything loaded so far (models, detectors, torch, chromadb) lives as long as the server:
    # moving it out of the collector's view keeps full collections -- and the latency spikes
    # they cause under load -- short.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            server_header=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """``anomaly-agent serve`` as a standalone entry point; one line and status 2 on a user error."""
    parser = argparse.ArgumentParser(prog="anomaly-agent serve", description="HTTP API and web interface")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except (ValueError, DBError, OSError) as exc:
        print(f"anomaly-agent serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(serve_main())
