"""The analyst's tools: read and act on runs, candidates, verdicts, knowledge, rules and past cases.

One :class:`AgentContext` holds what every tool needs (the database, the knowledge store folder,
the explainer's model, the upload folder) and the locks that keep concurrent callers apart. The
tools are plain functions ``tool(ctx, ...) -> ToolResult`` so the HTTP API, the chat agent and
tests call exactly the same code; :func:`make_tools` wraps them as LangChain ``StructuredTool``
objects (pydantic argument schemas) for the chat agent's native tool calling.

Why every result is a :class:`ToolResult` with ``text`` and ``cited_ids``: the chat agent may have
no model at all (answers are then the tools' own deterministic text), or a small model that only
rewords the results. Either way an answer can only cite ids a tool returned, and a tool that
found nothing says so (``found=False``), which is what makes "I don't know" possible instead of
a guess.

Tools:

================== ==========================================================================
list_candidates    a run's candidates sorted by severity (verdict, else the detector's), filtered
show_evidence      one candidate's evidence items (lines, templates, reasons) and its verdict
search_knowledge   passages of runbooks/documents (``P-...``) for a query or a candidate
list_rules         the analyst rules (``R-...``)
add_rule           add a natural-language rule (compiled where possible)
similar_cases      reviewed past verdicts that look like a candidate (``cases`` collection)
explain_candidate  the :class:`agent.explain.Explainer` verdict, stored in the database
detect_lines       re-run a run's detection on a line range of its input
================== ==========================================================================
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.db import (
    CandidateRow,
    Conflict,
    Database,
    InputFile,
    NotFound,
    Run,
    RunStatus,
    VerdictRow,
)
from agent.records import Candidate, Label

__all__ = [
    "TOOL_NAMES",
    "AgentContext",
    "CandidateBrief",
    "LineView",
    "RunInputs",
    "SessionLine",
    "ToolError",
    "ToolResult",
    "add_rule",
    "candidate_briefs",
    "create_run",
    "detect_lines",
    "explain_candidate",
    "list_candidates",
    "list_rules",
    "make_tools",
    "remove_rule",
    "rule_dict",
    "search_knowledge",
    "session_lines",
    "show_evidence",
    "similar_cases",
]

log = logging.getLogger(__name__)

SEVERITY_WORDS = ("none", "low", "medium", "high", "critical")
MIN_PASSAGE_SCORE = 0.35
"""Passages less similar than this are not relevant (same cut as the explainer's)."""
MIN_CASE_SCORE = 0.5
"""Past cases less similar than this do not "look like" the candidate."""
MAX_SESSION_LINES = 400
MAX_TEXT = 300


class ToolError(ValueError):
    """A tool could not run with these arguments; the message names the bad value and the choices."""


# ============================================================================ records

class ToolResult(BaseModel):
    """What one tool call returned.

    Attributes:
        tool: The tool's name.
        args: The arguments it ran with (after defaults were filled in).
        ok: False when the call failed (``error`` says why; nothing was changed).
        found: False when the call worked but found nothing relevant (an empty search, no case).
        text: A deterministic rendering for the analyst, every fact next to its bracketed id.
        cited_ids: Every id ``text`` cites, in order (candidate, evidence, passage, rule ids).
        data: The structured result (JSON values) for the web view and model wording.
        error: Why it failed.
    """

    model_config = ConfigDict(frozen=True)

    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    ok: bool = True
    found: bool = True
    text: str
    cited_ids: tuple[str, ...] = ()
    data: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class CandidateBrief(BaseModel):
    """One row of the candidate queue (also the API's list item).

    Attributes:
        severity: The verdict's final severity when there is a verdict, else the detector's
            (score vs threshold plus the compiled rules, :func:`agent.explain.decide`);
            ``severity_source`` says which.
        label: Same rule as ``severity``.
        reasons: The evidence reasons (``unseen_template``...), most common first.
        verdict_id, version, review: The stored verdict's row id, version (for feedback) and
            review state; None/``unexplained`` before a verdict.
    """

    run_id: str
    id: str
    seq: int
    source: str
    modality: str
    detector: str
    score: float
    threshold: float
    severity: int = Field(ge=0, le=4)
    severity_name: str
    label: str
    severity_source: Literal["verdict", "detector"]
    reasons: list[str]
    evidence_ids: list[str]
    locator: dict[str, Any]
    group_key: str
    verdict_id: int | None = None
    version: int | None = None
    review: str = "unexplained"


class SessionLine(BaseModel):
    """One line of a candidate's session, flagged when evidence points at it."""

    line_no: int
    text: str
    flagged: bool
    evidence_ids: list[str] = Field(default_factory=list)


class LineView(BaseModel):
    """The lines behind a log candidate: its session (or window) with the flagged lines marked.

    Attributes:
        available: False when the input file is no longer where the run recorded it.
        note: Why lines are missing or cut.
    """

    run_id: str
    candidate_id: str
    source: str
    first_line: int | None
    last_line: int | None
    lines: list[SessionLine]
    truncated: bool = False
    available: bool = True
    note: str = ""


# ============================================================================ context

@dataclass
class _Fitted:
    pipeline: Any
    fitted_at: float


class AgentContext:
    """Everything the tools share, with the locks that make concurrent use safe.

    Args:
        db: The agent database (:class:`agent.db.Database`; thread-safe).
        store_dir: The knowledge store folder (Chroma files and ``rules.json``).
        model: The explainer's chat model, or None for rules-only verdicts. The chat agent may
            use the same object to word answers: one lock serialises both uses.
        uploads_dir: Where uploaded inputs are kept (``<sha256[:16]>/<name>``); re-detection
            looks there for a run's input when its recorded path is gone.
        use_knowledge: False runs without a knowledge store (no passages, no past cases).
        cache_dir: The explanation cache (default ``<store_dir>/explain-cache``).
    """

    def __init__(self, db: Database, store_dir: str | Path, *, model: Any = None,
                 uploads_dir: str | Path | None = None, use_knowledge: bool = True,
                 cache_dir: str | Path | None = None) -> None:
        self.db = db
        self.store_dir = Path(store_dir).expanduser()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.uploads_dir = Path(uploads_dir).expanduser() if uploads_dir else self.store_dir / "uploads"
        self.use_knowledge = use_knowledge
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.store_dir / "explain-cache"
        self.model_lock = threading.RLock()
        """Held around every model use (explaining and wording): one generation at a time."""
        self.store_lock = threading.RLock()
        """Held around knowledge-store writes and rule-book changes."""
        self._store: Any = None
        self._explainer: Any = None
        self._init_lock = threading.RLock()
        self._fitted: OrderedDict[tuple[str, str], _Fitted] = OrderedDict()
        self._fit_lock = threading.Lock()
        self._synced_cases: dict[str, str] = {}
        self._severity_cache: dict[tuple[str, str], dict[str, tuple[int, str]]] = {}
        self._rows_cache: dict[str, list[CandidateRow]] = {}

    # ------------------------------------------------------------------ shared objects
    @property
    def store(self) -> Any:
        """The :class:`knowledge.store.KnowledgeStore` (opened on first use; None without knowledge)."""
        if not self.use_knowledge:
            return None
        if self._store is None:
            with self._init_lock:
                if self._store is None:
                    from knowledge.store import KnowledgeStore

                    self._store = KnowledgeStore(self.store_dir)
        return self._store

    def rulebook(self) -> Any:
        """A fresh :class:`knowledge.rules.RuleBook` (re-read, so changes by the CLI are seen)."""
        from knowledge.rules import RuleBook

        return RuleBook(self.store_dir)

    def explainer(self) -> Any:
        """The shared :class:`agent.explain.Explainer` (built on first use)."""
        if self._explainer is None:
            with self._init_lock:
                if self._explainer is None:
                    from agent.explain import Explainer

                    self._explainer = Explainer(self.model, store=self.store, rules=self.rulebook(),
                                                cache_dir=self.cache_dir)
        return self._explainer

    def rules_changed(self) -> None:
        """Re-read rules everywhere after a change (explainer, severity cache, rules collection)."""
        self._severity_cache.clear()
        if self._explainer is not None:
            with self.model_lock:
                self._explainer.refresh()
        store = self.store
        if store is not None:
            with self.store_lock:
                try:
                    store.sync_rules(self.rulebook().list())
                except Exception as exc:  # retrieval of rule text is a help, not a requirement
                    log.warning("could not mirror rules into the store: %s", exc)

    # ------------------------------------------------------------------ runs and candidates
    def resolve_run(self, run_id: str | None) -> Run:
        """``run_id``'s run, or the newest run that has candidates when None."""
        if run_id:
            return self.db.run(run_id)
        for run in self.db.runs():
            if run.status is not RunStatus.CREATED:
                return run
        raise ToolError("there is no run with candidates yet; create one from a log file first")

    def candidate_rows(self, run_id: str) -> list[CandidateRow]:
        """A run's candidates (parsed once per run: they never change after they are stored)."""
        rows = self._rows_cache.get(run_id)
        if rows is None:
            run = self.db.run(run_id)
            rows = self.db.candidates(run_id)
            if run.status is not RunStatus.CREATED:
                self._rows_cache[run_id] = rows
        return rows

    def detector_view(self, run_id: str, rows: Sequence[CandidateRow]) -> dict[str, tuple[int, str]]:
        """Candidate id -> (severity, label) from the detector and compiled rules alone."""
        from agent.explain import decide

        book = self.rulebook()
        key = (run_id, book.rules_version)
        cached = self._severity_cache.get(key)
        if cached is None or len(cached) != len(rows):
            rules = book.list()
            cached = {}
            for r in rows:
                d = decide(r.candidate, rules, None)
                cached[r.candidate_id] = (int(d.severity), d.label.value)
            if len(self._severity_cache) > 64:  # one entry per run and rule-book version; old versions go
                self._severity_cache.clear()
            self._severity_cache[key] = cached
        return cached

    # ------------------------------------------------------------------ inputs and detection
    def locate_input(self, run: Run, source: str | None = None) -> tuple[Path, InputFile]:
        """The file of one log input of ``run`` (by candidate ``source`` name, else the first log).

        Only files the run recorded are ever read: its recorded path when the file there still
        has the recorded size, else the upload folder's copy with the recorded hash.

        Raises:
            ToolError: The run has no such input, or the file is gone.
        """
        logs = [f for f in run.inputs if f.kind == "log"]
        if not logs:
            raise ToolError(f"run {run.id} has no log input (its inputs are candidate files), so it has no lines")
        if source is not None:
            match = [f for f in logs if f.path == source or Path(f.path).name == source]
            if not match:
                raise ToolError(f"run {run.id} has no log input named {source!r}; its logs: "
                                f"{', '.join(Path(f.path).name for f in logs)}")
            logs = match
        f = logs[0]
        p = Path(f.path)
        if p.is_file() and p.stat().st_size == f.size:
            return p, f
        folder = self.uploads_dir / f.sha256[:16]
        if folder.is_dir():
            for cand in sorted(folder.iterdir()):
                if cand.is_file() and cand.stat().st_size == f.size:
                    return cand, f
        raise ToolError(f"the input {f.path} of run {run.id} (sha256 {f.sha256[:12]}...) is no longer on this server; "
                        "upload it again")

    def find_upload(self, sha256: str) -> Path | None:
        """The stored upload with this content hash, if any."""
        folder = self.uploads_dir / sha256[:16]
        if folder.is_dir():
            for cand in sorted(folder.iterdir()):
                if cand.is_file():
                    return cand
        return None

    def fitted_pipeline(self, run: Run, path: Path, f: InputFile) -> Any:
        """The run's detection pipeline fitted as the run was (cached: fitting takes seconds)."""
        from agent.report import DetectSettings, make_pipeline
        from detectors.logs.ingest import IngestReport, read_log

        key = (run.id, f.sha256)
        with self._fit_lock:
            hit = self._fitted.get(key)
            if hit is not None:
                self._fitted.move_to_end(key)
                return hit.pipeline
            det = run.settings.get("detection")
            if not isinstance(det, dict):
                raise ToolError(f"run {run.id} has no detection settings (it was made from candidate files)")
            grouping = dict(det.get("grouping") or {"mode": "session"})
            mode = grouping.get("mode", "session")
            settings = DetectSettings(
                format=det.get("format", "hdfs"), parser=det.get("parser", "hdfs"), detector=det.get("detector", "log-ensemble"),
                id_pattern=grouping.get("id_pattern", r"blk_-?\d+"), group=mode,
                window=float(grouping.get("size", 100.0)), step=grouping.get("step"),
                max_idle_lines=int(grouping.get("max_idle_lines", 200_000)),
                train_fraction=float((det.get("train") or {}).get("leading_fraction", 0.2)))
            pipe = make_pipeline(settings)
            train = det.get("train") or {}
            if "sha256" in train:
                train_path = self.find_upload(str(train["sha256"]))
                if train_path is None:
                    raise ToolError(f"run {run.id} was fitted on {train.get('name')!r} (sha256 {str(train['sha256'])[:12]}...), "
                                    "which is not on this server; upload it again")
                pipe.fit(train_path)
            else:
                total = sum(1 for _ in read_log(path, settings.format))
                n_fit = max(1, int(total * settings.train_fraction))
                pipe.fit_sequences(list(islice(read_log(path, settings.format, report=IngestReport(source=str(path))),
                                               n_fit)))
            self._fitted[key] = _Fitted(pipe, time.time())
            while len(self._fitted) > 2:
                self._fitted.popitem(last=False)
            return pipe

    def sync_cases(self) -> int:
        """Put reviewed verdicts not yet in the store into its ``cases`` collection; returns how many."""
        from agent.db import add_past_cases_to_store

        store = self.store
        if store is None:
            return 0
        cases = self.db.past_cases()
        fresh = [c for c in cases if self._synced_cases.get(c.case_id) != _case_stamp(c)]
        if not fresh:
            return 0
        with self.store_lock:
            n = add_past_cases_to_store(store, fresh)
        for c in fresh:
            self._synced_cases[c.case_id] = _case_stamp(c)
        return n


def _case_stamp(case: Any) -> str:
    return hashlib.sha1(case.text().encode("utf-8")).hexdigest()


# ============================================================================ helpers

def _sev_name(sev: int) -> str:
    return SEVERITY_WORDS[int(sev)] if 0 <= int(sev) <= 4 else str(sev)


def _reasons(candidate: Candidate) -> list[str]:
    counts: dict[str, int] = {}
    for ev in candidate.evidence:
        reason = ev.data.get("reason")
        if isinstance(reason, str):
            counts[reason] = counts.get(reason, 0) + 1
    return [r for r, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _clip(text: Any, limit: int = MAX_TEXT) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def candidate_briefs(ctx: AgentContext, run_id: str, *, sort: str = "severity") -> list[CandidateBrief]:
    """Every candidate of a run as a queue row, sorted (``severity``, ``score`` or ``seq``).

    ``severity`` sorts by severity, then score relative to the detector's threshold, so the
    clearest cases of the worst kind come first; ties keep the run's order.
    """
    if sort not in ("severity", "score", "seq"):
        raise ToolError(f"sort {sort!r} is not one of severity, score, seq")
    rows = ctx.candidate_rows(run_id)
    verdicts = {v.candidate_id: v for v in ctx.db.verdicts(run_id)}
    predicted = ctx.detector_view(run_id, rows)
    out: list[CandidateBrief] = []
    for r in rows:
        c = r.candidate
        v = verdicts.get(r.candidate_id)
        if v is not None:
            sev, label, src = int(v.final_severity), v.final_label.value, "verdict"
        else:
            sev, label = predicted.get(r.candidate_id, (0, "uncertain"))
            src = "detector"
        out.append(CandidateBrief(
            run_id=run_id, id=c.id, seq=r.seq, source=c.source, modality=c.modality.value, detector=c.detector,
            score=c.score, threshold=c.threshold, severity=sev, severity_name=_sev_name(sev), label=label,
            severity_source=src, reasons=_reasons(c), evidence_ids=[e.id for e in c.evidence],
            locator=dict(c.locator), group_key=r.group_key, verdict_id=v.id if v else None,
            version=v.version if v else None, review=v.review.value if v else "unexplained"))
    if sort == "severity":
        out.sort(key=lambda b: (-b.severity, -_ratio(b.score, b.threshold), b.seq))
    elif sort == "score":
        out.sort(key=lambda b: (-b.score, b.seq))
    return out


def filter_briefs(rows: Sequence[CandidateBrief], *, detector: str | None = None, reason: str | None = None,
                  label: str | None = None, min_severity: int | None = None, review: str | None = None,
                  q: str | None = None) -> list[CandidateBrief]:
    """The queue rows that pass every given filter: the one definition the chat tools and the API share.

    ``reason`` matches evidence reasons by substring (spaces read as underscores, any case);
    ``q`` matches the candidate id by substring.
    """
    out = list(rows)
    if detector:
        out = [b for b in out if b.detector == detector]
    if reason:
        needle = reason.lower().replace(" ", "_")
        out = [b for b in out if any(needle in r.lower() for r in b.reasons)]
    if label:
        out = [b for b in out if b.label == label]
    if min_severity is not None:
        out = [b for b in out if b.severity >= int(min_severity)]
    if review:
        out = [b for b in out if b.review == review]
    if q:
        out = [b for b in out if q.lower() in b.id.lower()]
    return out


def _ratio(score: float, threshold: float) -> float:
    return score / threshold if threshold > 0 and score > 0 else score - threshold


def _brief_line(b: CandidateBrief) -> str:
    reasons = ", ".join(r.replace("_", " ") for r in b.reasons[:3]) or "no reason recorded"
    return (f"[{b.id}] severity {b.severity} ({b.severity_name}, from the {b.severity_source}), {b.label}; "
            f"{b.detector} score {b.score:.4g} vs threshold {b.threshold:.4g}; {reasons}")


# ============================================================================ tools

def list_candidates(ctx: AgentContext, run_id: str | None = None, *, detector: str | None = None,
                    reason: str | None = None, label: str | None = None, min_severity: int | None = None,
                    review: str | None = None, limit: int = 10, sort: str = "severity") -> ToolResult:
    """A run's candidates, most severe first, filtered.

    Args:
        run_id: The run (default: the newest run with candidates).
        detector: Only this detector's candidates (exact name).
        reason: Only candidates with an evidence reason containing this (``unseen``, ``range``...).
        label: Only this label (anomaly, normal, uncertain): the verdict's, else the detector's.
        min_severity: Only severity >= this (0-4).
        review: Only this review state (unexplained, unreviewed, confirmed, corrected).
        limit: At most this many rows (1-200).
        sort: ``severity`` (default), ``score`` or ``seq``.
    """
    run = ctx.resolve_run(run_id)
    if not 1 <= int(limit) <= 200:
        raise ToolError(f"limit {limit} is not in 1-200")
    if label is not None and label not in {l.value for l in Label}:
        raise ToolError(f"label {label!r} is not one of {', '.join(l.value for l in Label)}")
    if min_severity is not None and not 0 <= int(min_severity) <= 4:
        raise ToolError(f"min_severity {min_severity} is not in 0-4")
    reviews = ("unexplained", "unreviewed", "confirmed", "corrected")
    if review is not None and review not in reviews:
        raise ToolError(f"review {review!r} is not one of {', '.join(reviews)}")
    rows = candidate_briefs(ctx, run.id, sort=sort)
    total = len(rows)
    if detector:
        known = sorted({b.detector for b in rows})
        if detector not in known:
            raise ToolError(f"detector {detector!r} has no candidates in run {run.id}; detectors there: {', '.join(known)}")
    rows = filter_briefs(rows, detector=detector, reason=reason, label=label, min_severity=min_severity,
                         review=review)
    shown = rows[: int(limit)]
    args = {"run_id": run.id, "detector": detector, "reason": reason, "label": label, "min_severity": min_severity,
            "review": review, "limit": limit, "sort": sort}
    filters = ", ".join(f"{k} {v}" for k, v in args.items() if k not in ("run_id", "limit", "sort") and v is not None)
    if not shown:
        return ToolResult(tool="list_candidates", args=args, found=False, data={"run_id": run.id, "total": total, "matching": 0,
                                                                              "candidates": []},
                          text=f"No candidate of run {run.id} matches ({filters or 'no filter'}; {total} candidates in all).")
    head = (f"{len(shown)} of {len(rows)} matching candidate(s) of run {run.id} ({total} in all"
            f"{'; ' + filters if filters else ''}), sorted by {sort}:")
    lines = [f"{i}. {_brief_line(b)}" for i, b in enumerate(shown, 1)]
    return ToolResult(tool="list_candidates", args=args, text="\n".join([head, *lines]),
                      cited_ids=tuple(b.id for b in shown),
                      data={"run_id": run.id, "total": total, "matching": len(rows),
                            "candidates": [b.model_dump(mode="json") for b in shown]})


def _verdict_text(v: VerdictRow) -> tuple[str, list[str]]:
    vd = v.verdict
    cited: list[str] = [v.candidate_id, *vd.evidence_ids, *vd.passage_ids, *vd.rule_ids]
    parts = [f"Verdict for [{v.candidate_id}]: {v.final_label.value}, severity {int(v.final_severity)} "
             f"({_sev_name(int(v.final_severity))}), confidence {vd.confidence:.2f}, explained by {vd.explained_by.value}"
             + (f"; review {v.review.value} (version {v.version})" if v.review.value != "unreviewed" else
                f" (version {v.version})") + "."]
    if (v.final_label, v.final_severity) != (v.label, v.severity):
        parts.append(f"The explainer had said {v.label.value}, severity {int(v.severity)}; an analyst corrected it.")
    parts.append(f"Type: {vd.anomaly_type}. {vd.summary}")
    for step in vd.causal_chain:
        parts.append(f"- {step.text} " + " ".join(f"[{e}]" for e in step.evidence_ids))
    if vd.evidence_ids:
        parts.append("Evidence: " + " ".join(f"[{e}]" for e in vd.evidence_ids))
    if vd.passage_ids:
        parts.append("Passages: " + " ".join(f"[{p}]" for p in vd.passage_ids))
    if vd.rule_ids:
        parts.append("Rules: " + " ".join(f"[{r}]" for r in vd.rule_ids))
    if vd.actions:
        parts.append("Actions: " + "; ".join(vd.actions))
    return "\n".join(parts), list(dict.fromkeys(cited))


def verdict_data(v: VerdictRow) -> dict[str, Any]:
    """A stored verdict as JSON (the verdict itself plus review state and version)."""
    return {"verdict_id": v.id, "run_id": v.run_id, "candidate_id": v.candidate_id,
            "verdict": v.verdict.model_dump(mode="json"), "review": v.review.value,
            "final_label": v.final_label.value, "final_severity": int(v.final_severity), "version": v.version,
            "model_calls": v.model_calls, "cache_hit": v.cache_hit, "elapsed_s": v.elapsed_s, "created": v.created}


def show_evidence(ctx: AgentContext, run_id: str | None, candidate_id: str) -> ToolResult:
    """One candidate: where it is, its score, every evidence item with its lines, and its verdict."""
    run = ctx.resolve_run(run_id)
    row = ctx.db.candidate(run.id, candidate_id)
    c = row.candidate
    loc = ", ".join(f"{k} {v}" for k, v in c.locator.items())
    lines = [(f"[{c.id}] {c.modality.value} candidate from {c.detector} in {c.source} ({loc}): "
              f"score {c.score:.4g} vs threshold {c.threshold:.4g}; {len(c.evidence)} evidence item(s).")]
    evidence = []
    for ev in c.evidence:
        d = ev.data
        where = d.get("lines") if isinstance(d.get("lines"), list) else []
        lines.append(f"- [{ev.id}] {ev.kind.value}: {ev.summary}" + (f" (lines {', '.join(map(str, where[:8]))})" if where else ""))
        texts = d.get("text") if isinstance(d.get("text"), list) else []
        for ln, t in zip(where, texts[:3]):
            lines.append(f"    line {ln}: {_clip(t, 200)}")
        evidence.append({"id": ev.id, "kind": ev.kind.value, "summary": ev.summary, "data": d, "artifact": ev.artifact})
    cited = [c.id, *(ev.id for ev in c.evidence)]
    verdict = None
    try:
        v = ctx.db.verdict(run.id, c.id)
    except NotFound:
        lines.append("Not explained yet.")
    else:
        vt, vc = _verdict_text(v)
        lines.append(vt)
        cited.extend(vc)
        verdict = verdict_data(v)
    return ToolResult(tool="show_evidence", args={"run_id": run.id, "candidate_id": c.id}, text="\n".join(lines),
                      cited_ids=tuple(dict.fromkeys(cited)),
                      data={"candidate": c.model_dump(mode="json"), "evidence": evidence, "verdict": verdict,
                            "group_key": row.group_key})


def _passage_dict(p: Any, collection: str) -> dict[str, Any]:
    return {"id": p.id, "source": p.source, "heading": p.heading, "offset": p.offset, "text": p.text,
            "score": p.score, "example": p.example, "collection": collection}


def search_knowledge(ctx: AgentContext, query: str | None = None, *, run_id: str | None = None,
                     candidate_id: str | None = None, k: int = 3, collection: str = "documents",
                     min_score: float = MIN_PASSAGE_SCORE) -> ToolResult:
    """Passages for a free-text query, or for a candidate's evidence; only those similar enough.

    Args:
        query: What to look for; or leave it out and give ``candidate_id``.
        run_id, candidate_id: Search with the candidate's evidence (as the explainer does).
        k: At most this many passages (1-20).
        collection: documents, rules or cases.
        min_score: Passages below this cosine similarity are not relevant and are left out.
    """
    from knowledge.store import COLLECTIONS

    if collection not in COLLECTIONS:
        raise ToolError(f"collection {collection!r} is not one of {', '.join(COLLECTIONS)}")
    if not 1 <= int(k) <= 20:
        raise ToolError(f"k {k} is not in 1-20")
    args: dict[str, Any] = {"query": query, "run_id": run_id, "candidate_id": candidate_id, "k": k, "collection": collection}
    store = ctx.store
    if store is None:
        return ToolResult(tool="search_knowledge", args=args, found=False, text="There is no knowledge store on this server.")
    if query and query.strip():
        found = store.search(query, k=k, collection=collection)
        what = f"'{_clip(query, 120)}'"
    elif candidate_id:
        run = ctx.resolve_run(run_id)
        cand = ctx.db.candidate(run.id, candidate_id).candidate
        args["run_id"] = run.id
        found = store.search_for(cand, k=k, collection=collection)
        what = f"the evidence of [{cand.id}]"
    else:
        raise ToolError("search_knowledge needs a query or a candidate_id")
    relevant = [p for p in found if (p.score or 0.0) >= min_score]
    data = {"passages": [_passage_dict(p, collection) for p in relevant],
            "best_score": max((p.score or 0.0 for p in found), default=None), "min_score": min_score}
    if not relevant:
        best = f"best similarity {data['best_score']:.2f}" if data["best_score"] is not None else f"the {collection} collection is empty"
        return ToolResult(tool="search_knowledge", args=args, found=False, data=data,
                          text=f"No {collection} passage is relevant to {what} ({best}, below {min_score:.2f}).")
    lines = [f"{len(relevant)} relevant passage(s) for {what}:"]
    for p in relevant:
        lines.append(f"- [{p.id}] {p.source}{' > ' + p.heading if p.heading else ''} (similarity {p.score:.2f}"
                     f"{', example document' if p.example else ''}): {_clip(p.text, 400)}")
    cited = ([candidate_id] if candidate_id and not query else []) + [p.id for p in relevant]
    return ToolResult(tool="search_knowledge", args=args, text="\n".join(lines), cited_ids=tuple(cited), data=data)


def rule_dict(r: Any) -> dict[str, Any]:
    """A rule as JSON (what the API returns)."""
    return {"id": r.id, "version": r.version, "text": r.text, "predicate": r.predicate,
            "effect": r.effect.value if r.effect else None, "severity": r.severity, "method": r.method,
            "note": r.note, "compiled": r.compiled, "created": r.created, "updated": r.updated}


def _rule_line(r: Any) -> str:
    effect = r.effect.value if r.effect else "guidance"
    sev = f" {_sev_name(r.severity)}" if r.severity is not None and r.effect is not None else ""
    how = "compiled" if r.compiled else "text only, given to the model"
    return f"[{r.id}] v{r.version} {effect}{sev} ({how}): {r.text}"


def list_rules(ctx: AgentContext) -> ToolResult:
    """The active analyst rules, in id order."""
    book = ctx.rulebook()
    rules = book.list()
    data = {"rules_version": book.rules_version, "rules": [rule_dict(r) for r in rules]}
    if not rules:
        return ToolResult(tool="list_rules", found=False, data=data, text="There are no rules yet.")
    return ToolResult(tool="list_rules", text="\n".join([f"{len(rules)} rule(s), version {book.rules_version}:",
                                                         *(_rule_line(r) for r in rules)]),
                      cited_ids=tuple(r.id for r in rules), data=data)


def add_rule(ctx: AgentContext, text: str, effect: str | None = None, severity: int | str | None = None) -> ToolResult:
    """Add a natural-language rule; it is compiled into a predicate where the wording allows.

    Args:
        text: The rule, e.g. "unseen templates are at least high severity".
        effect: Override the effect (raise_severity, lower_severity, set_normal, define_anomaly).
        severity: Override the severity (0-4 or none/low/medium/high/critical).
    """
    from knowledge.rules import Effect

    if effect is not None and effect not in {e.value for e in Effect}:
        raise ToolError(f"effect {effect!r} is not one of {', '.join(e.value for e in Effect)}")
    if not isinstance(text, str) or not text.strip():
        raise ToolError("the rule text is empty; write the rule in plain language")
    with ctx.store_lock:
        book = ctx.rulebook()
        before = {r.id for r in book.list()}
        rule = book.add(text, effect=effect, severity=severity)
    ctx.rules_changed()
    new = rule.id not in before
    head = "Added" if new else "Already there, unchanged:"
    extra = "" if rule.compiled else f" Not compiled ({rule.note or 'no pattern matched'}); the model reads it as text."
    return ToolResult(tool="add_rule", args={"text": text, "effect": effect, "severity": severity},
                      text=f"{head} {_rule_line(rule)}.{extra}", cited_ids=(rule.id,),
                      data={"rule": rule_dict(rule), "created": new})


def remove_rule(ctx: AgentContext, rule_id: str) -> ToolResult:
    """Deactivate a rule (kept in the rule book's history; its id is never reused)."""
    from knowledge.rules import RuleNotFound

    with ctx.store_lock:
        try:
            rule = ctx.rulebook().remove(rule_id)
        except RuleNotFound as exc:
            raise NotFound("rule", rule_id, str(exc.args[0]) if exc.args else "") from None
    ctx.rules_changed()
    return ToolResult(tool="remove_rule", args={"rule_id": rule_id}, text=f"Removed {_rule_line(rule)}.",
                      cited_ids=(rule.id,), data={"rule": rule_dict(rule)})


def similar_cases(ctx: AgentContext, run_id: str | None = None, candidate_id: str | None = None,
                  query: str | None = None, *, k: int = 3, min_score: float = MIN_CASE_SCORE) -> ToolResult:
    """Reviewed past verdicts that look like a candidate (or a description), with what they turned out to be.

    Reviewed verdicts (confirmed or corrected by an analyst) are put into the store's ``cases``
    collection first (only new or changed ones), so feedback given a minute ago already counts.
    """
    if not 1 <= int(k) <= 20:
        raise ToolError(f"k {k} is not in 1-20")
    args: dict[str, Any] = {"run_id": run_id, "candidate_id": candidate_id, "query": query, "k": k}
    store = ctx.store
    if store is None:
        return ToolResult(tool="similar_cases", args=args, found=False, text="There is no knowledge store on this server.")
    ctx.sync_cases()
    own_case = None
    if candidate_id:
        from knowledge.records import passage_id

        run = ctx.resolve_run(run_id)
        cand = ctx.db.candidate(run.id, candidate_id).candidate
        args["run_id"] = run.id
        own_case = passage_id(f"cases/{run.id}", cand.id, 0)  # a past case's id (agent.db.PastCase.case_id)
        found = store.search_for(cand, k=k + 1, collection="cases")
        what = f"[{cand.id}]"
    elif query and query.strip():
        found = store.search(query, k=k, collection="cases")
        what = f"'{_clip(query, 120)}'"
    else:
        raise ToolError("similar_cases needs a candidate_id or a query")
    found = [p for p in found if p.id != own_case]
    relevant = [p for p in found if (p.score or 0.0) >= min_score][:k]
    data = {"cases": [{**_passage_dict(p, "cases"), "run_id": p.source.removeprefix("cases/"),
                       "candidate_id": p.heading} for p in relevant],
            "best_score": max((p.score or 0.0 for p in found), default=None), "min_score": min_score}
    if not relevant:
        n = store.count("cases")
        best = f"best similarity {data['best_score']:.2f}" if data["best_score"] is not None else "none to compare"
        return ToolResult(tool="similar_cases", args=args, found=False, data=data,
                          text=f"No reviewed past case looks like {what} ({n} past case(s) stored; {best}, "
                               f"below {min_score:.2f}).")
    lines = [f"{len(relevant)} past case(s) like {what}:"]
    cited: list[str] = [candidate_id] if candidate_id else []
    for p in relevant:
        lines.append(f"- [{p.id}] (similarity {p.score:.2f}; candidate [{p.heading}] of run {p.source.removeprefix('cases/')}): "
                     f"{_clip(p.text, 500)}")
        cited.extend([p.id, p.heading])
    return ToolResult(tool="similar_cases", args=args, text="\n".join(lines), cited_ids=tuple(dict.fromkeys(cited)), data=data)


def explain_candidate(ctx: AgentContext, run_id: str | None, candidate_id: str) -> ToolResult:
    """The explainer's verdict for a candidate, stored in the database (an existing one is reused).

    A verdict is never made twice: the database refuses a second verdict for a candidate, so a
    concurrent explain of the same candidate returns the first one.
    """
    run = ctx.resolve_run(run_id)
    row = ctx.db.candidate(run.id, candidate_id)
    created = False
    try:
        v = ctx.db.verdict(run.id, row.candidate_id)
    except NotFound:
        with ctx.model_lock:
            try:
                v = ctx.db.verdict(run.id, row.candidate_id)  # made by another caller while we waited
            except NotFound:
                explainer = ctx.explainer()
                explainer.refresh()
                stats = explainer.stats
                calls, hits = stats.model_calls, stats.cache_hits
                t0 = time.perf_counter()
                verdict = explainer.explain(row.candidate)
                try:
                    v = ctx.db.record_verdict(run.id, row.candidate_id, verdict, model_calls=stats.model_calls - calls,
                                              cache_hit=stats.cache_hits > hits, elapsed_s=time.perf_counter() - t0)
                    created = True
                except Conflict:  # another process explained it first: keep its verdict
                    v = ctx.db.verdict(run.id, row.candidate_id)
    text, cited = _verdict_text(v)
    return ToolResult(tool="explain_candidate", args={"run_id": run.id, "candidate_id": row.candidate_id},
                      text=("New verdict. " if created else "Stored verdict. ") + text, cited_ids=tuple(cited),
                      data={**verdict_data(v), "created": created})


def detect_lines(ctx: AgentContext, run_id: str | None, first_line: int, last_line: int,
                 source: str | None = None, limit: int = 10) -> ToolResult:
    """Run the run's detector again over lines ``first_line..last_line`` of its input (nothing stored).

    The pipeline is fitted as the run's was (its training log, or the leading share of the
    input), so the scores are comparable with the run's own candidates; sessions are cut at the
    range's edges, so a session straddling them is scored on its part inside.
    """
    run = ctx.resolve_run(run_id)
    lo, hi = int(first_line), int(last_line)
    if lo < 1 or hi < lo:
        raise ToolError(f"line range {first_line}-{last_line} is not a range of 1-based lines (first <= last)")
    path, f = ctx.locate_input(run, source)
    pipe = ctx.fitted_pipeline(run, path, f)
    src = Path(f.path).name
    result = pipe.detect(path, source=src, line_range=(lo, hi))
    cands = result.candidates
    args = {"run_id": run.id, "first_line": lo, "last_line": hi, "source": src}
    head = (f"Detection with {run.settings.get('detection', {}).get('detector', '?')} on lines {lo}-{hi} of {src}: "
            f"{len(cands)} candidate(s) among {result.sequences_scored} sequence(s) in the range "
            "(sessions are cut at its edges, so partial sessions can look incomplete).")
    if not cands:
        return ToolResult(tool="detect_lines", args=args, found=False, text=head + " Nothing anomalous there.",
                          data={"candidates": [], "sequences_scored": result.sequences_scored})
    lines = [head]
    for c in cands[:limit]:
        evs = "; ".join(f"[{e.id}] {_clip(e.summary, 160)}" for e in c.evidence[:3])
        lines.append(f"- [{c.id}] score {c.score:.4g} vs threshold {c.threshold:.4g}: {evs}")
    cited = [x for c in cands[:limit] for x in (c.id, *(e.id for e in c.evidence[:3]))]
    return ToolResult(tool="detect_lines", args=args, text="\n".join(lines), cited_ids=tuple(dict.fromkeys(cited)),
                      data={"candidates": [c.model_dump(mode="json") for c in cands[:limit]],
                            "sequences_scored": result.sequences_scored, "total": len(cands)})


# ============================================================================ creating runs

class RunInputs(BaseModel):
    """How to turn an input file into a run (the options of ``anomaly-agent detect``/``report``).

    Attributes:
        format: Log format string or system name.
        parser: drain3 preset (``detectors/logs/parsers.toml``).
        detector: Log detector registry name.
        id_pattern: Regex naming a line's session.
        group: ``session``, ``count`` or ``time``.
        window: Window size (lines or seconds) for count/time grouping.
        train_fraction: Without a training log, fit on this leading share of the input.
    """

    model_config = ConfigDict(extra="forbid")

    format: str = Field(default="hdfs", min_length=1, max_length=500)
    parser: str = Field(default="hdfs", min_length=1, max_length=64)
    detector: str = Field(default="log-ensemble", min_length=1, max_length=64)
    id_pattern: str = Field(default=r"blk_-?\d+", min_length=1, max_length=200)
    group: Literal["session", "count", "time"] = "session"
    window: float = Field(default=100.0, gt=0)
    train_fraction: float = Field(default=0.2, gt=0, le=1)


def create_run(ctx: AgentContext, input_path: Path, *, train_path: Path | None = None,
               options: RunInputs | None = None) -> tuple[Run, bool]:
    """Detect candidates in one input and store them as a run; the same input and settings give the same run.

    The run id is computed exactly as ``anomaly-agent report`` computes it (inputs' hashes,
    detection and explainer settings, model, prompt, rules and knowledge versions), so a report
    over the same file with the same settings resumes this run. Candidates are stored in one
    transaction; if two callers create the same run at once, the second gets the first's.

    Returns:
        ``(run, created)``: ``created`` is False when the run already had its candidates.

    Raises:
        ToolError: Unknown detector or parser, an unreadable input.
    """
    from agent.db import RunSpec
    from agent.report import (
        DetectSettings,
        LineIssue,
        ReportInputError,
        explainer_settings,
        detect_log,
        group_key,
        make_pipeline,
        read_candidates,
        sha256_file,
        sniff_kind,
    )
    from detectors.registry import known_detectors

    opts = options or RunInputs()
    if opts.detector not in known_detectors():
        logs = [d for d in known_detectors() if d.startswith(("log-", "baseline-loglizer"))]
        raise ToolError(f"detector {opts.detector!r} is not a log detector; choices: {', '.join(logs)}")
    try:
        det = DetectSettings(format=opts.format, parser=opts.parser, detector=opts.detector, id_pattern=opts.id_pattern,
                             group=opts.group, window=opts.window, train=train_path, train_fraction=opts.train_fraction)
        kind = sniff_kind(input_path)
        digest, size = sha256_file(input_path)
        files = [InputFile(path=str(input_path), sha256=digest, size=size, kind=kind)]
        explainer = ctx.explainer()
        settings: dict[str, Any] = {"explain": explainer_settings(explainer)}
        if kind == "log":
            settings["detection"] = det.as_settings(sha256_file(train_path)[0] if train_path is not None else None)
    except (ReportInputError, KeyError) as exc:
        raise ToolError(str(exc.args[0]) if exc.args else str(exc)) from None
    prov = explainer.provenance()
    spec = RunSpec(inputs=tuple(files), settings=settings, model_id=prov.model_id, adapter=prov.adapter,
                   prompt_version=prov.prompt_version, rules_version=prov.rules_version,
                   knowledge_version=prov.knowledge_version)
    run, _ = ctx.db.get_or_create_run(spec)
    if run.status is not RunStatus.CREATED:
        return run, False
    try:
        if kind == "log":
            fitted = None
            info: dict[str, Any] = {}
            if train_path is not None:
                fitted = make_pipeline(det)
                info["train"] = fitted.fit(train_path).to_dict()
            cands, detail = detect_log(input_path, det, input_path.name, fitted=fitted, quiet=True)
            if fitted is not None:
                with ctx._fit_lock:
                    ctx._fitted[(run.id, digest)] = _Fitted(fitted, time.time())
        else:
            issues: list[LineIssue] = []
            cands = read_candidates(input_path, issues)
            detail = {"candidates": len(cands), "skipped_lines": len(issues)}
            info = {"skipped_lines": [i.__dict__ for i in issues[:200]], "skipped_lines_total": len(issues)}
    except ReportInputError as exc:
        raise ToolError(str(exc)) from None
    info["inputs"] = [{"path": files[0].path, "kind": kind, **detail}]
    try:
        ctx.db.add_candidates(run.id, ((c, group_key(c)) for c in cands), info=info)
    except Conflict:  # another caller stored them first: the same candidates, by construction
        return ctx.db.run(run.id), False
    return ctx.db.run(run.id), True


# ============================================================================ lines of a candidate

def _open_text(path: Path) -> IO[bytes]:
    with path.open("rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else path.open("rb")  # type: ignore[return-value]


def _iter_lines(path: Path, lo: int, hi: int) -> Iterator[tuple[int, str]]:
    with _open_text(path) as fh:
        for no, raw in enumerate(fh, 1):
            if no < lo:
                continue
            if no > hi:
                break
            yield no, raw.decode("utf-8", errors="replace").rstrip("\r\n")


def session_lines(ctx: AgentContext, run_id: str, candidate_id: str, *, max_lines: int = MAX_SESSION_LINES) -> LineView:
    """The lines of a log candidate's session between its first and last line, flagged lines marked.

    A session's lines are the lines in its span that name its id (the id as a whole token); a
    window's are all lines in its span. Flagged lines (cited by evidence) are always included.
    Only files recorded as the run's inputs are read (see :meth:`AgentContext.locate_input`).
    """
    run = ctx.db.run(run_id)
    c = ctx.db.candidate(run_id, candidate_id).candidate
    loc = c.locator
    flagged: dict[int, list[str]] = {}
    for ev in c.evidence:
        lines = ev.data.get("lines")
        if isinstance(lines, list):
            for ln in lines:
                if isinstance(ln, int):
                    flagged.setdefault(ln, []).append(ev.id)
    first = loc.get("first_line") if isinstance(loc.get("first_line"), int) else (min(flagged) if flagged else None)
    last = loc.get("last_line") if isinstance(loc.get("last_line"), int) else (max(flagged) if flagged else None)
    view = LineView(run_id=run_id, candidate_id=c.id, source=c.source, first_line=first, last_line=last, lines=[])
    if c.modality.value != "logs" or first is None or last is None:
        return view.model_copy(update={"available": False, "note": f"a {c.modality.value} candidate has no log lines"})
    try:
        path, _ = ctx.locate_input(run, c.source)
    except ToolError as exc:
        return view.model_copy(update={"available": False, "note": str(exc)})
    seq = loc.get("sequence")
    is_session = isinstance(seq, str) and seq and not seq.startswith("lines ")
    token = re.compile(re.escape(seq) + r"(?![\w-])") if is_session else None
    out: list[SessionLine] = []
    kept = 0
    truncated = False
    for no, text in _iter_lines(path, first, last):
        hit = no in flagged
        if token is not None and not hit and not token.search(text):
            continue
        if kept >= max_lines and not hit:
            truncated = True
            continue
        out.append(SessionLine(line_no=no, text=text[:2000], flagged=hit, evidence_ids=flagged.get(no, [])))
        kept += 1
    note = f"showing the first {max_lines} lines of the session plus every flagged line" if truncated else ""
    return view.model_copy(update={"lines": out, "truncated": truncated, "note": note})


# ============================================================================ LangChain tools

class _RunArg(BaseModel):
    run_id: str | None = Field(default=None, description="run id (R-...); default: the newest run")


class ListCandidatesArgs(_RunArg):
    """Arguments of list_candidates."""

    detector: str | None = Field(default=None, description="only this detector's candidates")
    reason: str | None = Field(default=None, description="evidence reason contains this, e.g. unseen, range, burst")
    label: Literal["anomaly", "normal", "uncertain"] | None = None
    min_severity: int | None = Field(default=None, ge=0, le=4, description="0 none .. 4 critical")
    review: Literal["unexplained", "unreviewed", "confirmed", "corrected"] | None = None
    limit: int = Field(default=10, ge=1, le=200)
    sort: Literal["severity", "score", "seq"] = "severity"


class CandidateArgs(_RunArg):
    """A candidate of a run."""

    candidate_id: str = Field(description="the candidate id, e.g. test.log:blk_-123")


class SearchArgs(_RunArg):
    """Arguments of search_knowledge."""

    query: str | None = Field(default=None, description="what to look for in runbooks and documents")
    candidate_id: str | None = Field(default=None, description="search with this candidate's evidence instead")
    k: int = Field(default=3, ge=1, le=20)
    collection: Literal["documents", "rules", "cases"] = "documents"


class AddRuleArgs(BaseModel):
    """Arguments of add_rule."""

    text: str = Field(min_length=1, max_length=1000, description="the rule in plain language")
    effect: Literal["raise_severity", "lower_severity", "set_normal", "define_anomaly"] | None = None
    severity: int | None = Field(default=None, ge=0, le=4)


class SimilarArgs(_RunArg):
    """Arguments of similar_cases."""

    candidate_id: str | None = None
    query: str | None = None
    k: int = Field(default=3, ge=1, le=20)


class DetectLinesArgs(_RunArg):
    """Arguments of detect_lines."""

    first_line: int = Field(ge=1)
    last_line: int = Field(ge=1)
    source: str | None = Field(default=None, description="which log input of the run (file name)")


class _NoArgs(BaseModel):
    """No arguments."""


ToolFn = Callable[..., ToolResult]

_SPECS: tuple[tuple[str, type[BaseModel], str], ...] = (
    ("list_candidates", ListCandidatesArgs, "List a run's anomaly candidates, most severe first, with filters."),
    ("show_evidence", CandidateArgs, "Show one candidate's evidence (log lines, reasons, templates) and its verdict."),
    ("search_knowledge", SearchArgs, "Search runbooks and documents for passages (P-...) about a query or a candidate."),
    ("list_rules", _NoArgs, "List the analyst rules (R-...)."),
    ("add_rule", AddRuleArgs, "Add a natural-language anomaly rule."),
    ("similar_cases", SimilarArgs, "Find reviewed past cases that look like a candidate."),
    ("explain_candidate", CandidateArgs, "Explain a candidate: label, severity, cited evidence, passages, rules."),
    ("detect_lines", DetectLinesArgs, "Re-run detection on a line range of a run's input log."),
)
TOOL_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _SPECS)


def call_tool(ctx: AgentContext, name: str, args: dict[str, Any]) -> ToolResult:
    """Run tool ``name`` with validated ``args``; failures come back as ``ok=False`` results, never raised.

    Why not raise: a chat turn or a model's tool call with a bad argument (an unknown candidate
    id, a typo in a detector name) should tell the analyst what was wrong and go on.
    """
    spec = {n: (schema, desc) for n, schema, desc in _SPECS}
    if name not in spec:
        return ToolResult(tool=name, args=dict(args), ok=False, found=False,
                          text=f"Unknown tool {name!r}; tools: {', '.join(TOOL_NAMES)}.",
                          error=f"unknown tool {name!r}")
    schema, _ = spec[name]
    from pydantic import ValidationError

    try:
        parsed = schema.model_validate(args or {}).model_dump()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}" for e in exc.errors()[:4])
        return ToolResult(tool=name, args=dict(args or {}), ok=False, found=False,
                          text=f"Bad arguments for {name}: {problems}.", error=problems)
    fn = _FUNCTIONS[name]
    try:
        return fn(ctx, **parsed)
    except (ToolError, NotFound, ValueError, KeyError) as exc:
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        return ToolResult(tool=name, args=parsed, ok=False, found=False, text=f"{name} failed: {msg}", error=msg)


def _list_candidates(ctx: AgentContext, run_id: str | None = None, **kw: Any) -> ToolResult:
    return list_candidates(ctx, run_id, **kw)


def _search(ctx: AgentContext, run_id: str | None = None, query: str | None = None, candidate_id: str | None = None,
            k: int = 3, collection: str = "documents") -> ToolResult:
    return search_knowledge(ctx, query, run_id=run_id, candidate_id=candidate_id, k=k, collection=collection)


def _similar(ctx: AgentContext, run_id: str | None = None, candidate_id: str | None = None, query: str | None = None,
             k: int = 3) -> ToolResult:
    return similar_cases(ctx, run_id, candidate_id, query, k=k)


_FUNCTIONS: dict[str, ToolFn] = {
    "list_candidates": _list_candidates,
    "show_evidence": lambda ctx, run_id=None, candidate_id="": show_evidence(ctx, run_id, candidate_id),
    "search_knowledge": _search,
    "list_rules": lambda ctx: list_rules(ctx),
    "add_rule": lambda ctx, text, effect=None, severity=None: add_rule(ctx, text, effect, severity),
    "similar_cases": _similar,
    "explain_candidate": lambda ctx, run_id=None, candidate_id="": explain_candidate(ctx, run_id, candidate_id),
    "detect_lines": lambda ctx, run_id=None, first_line=1, last_line=1, source=None: detect_lines(
        ctx, run_id, first_line, last_line, source),
}


def make_tools(ctx: AgentContext) -> list[Any]:
    """The tools as LangChain ``StructuredTool`` objects bound to ``ctx``.

    Each returns the :class:`ToolResult` as JSON text (what a model reads back), and its
    ``args_schema`` is the pydantic model above, which is what ``bind_tools`` /
    :func:`langchain_core.utils.function_calling.convert_to_openai_tool` turn into the JSON
    schemas a tool-calling endpoint receives.
    """
    from langchain_core.tools import StructuredTool

    def runner(name: str) -> Callable[..., str]:
        def run(**kwargs: Any) -> str:
            return call_tool(ctx, name, kwargs).model_dump_json()
        return run

    return [StructuredTool.from_function(func=runner(name), name=name, description=description, args_schema=schema)
            for name, schema, description in _SPECS]
