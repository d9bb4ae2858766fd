"""agent.db: schema and migrations, run identity, no duplicate verdicts, consistent concurrent feedback,
past cases into the knowledge store, chat. Every verdict here is a real rules-only verdict."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from agent.db import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Conflict,
    Database,
    FeedbackAction,
    InputFile,
    InvalidValue,
    NotFound,
    Review,
    RunSpec,
    RunStatus,
    SchemaTooNew,
    add_past_cases_to_store,
    connect,
    migrate,
)
from agent.explain import Explainer
from agent.records import Candidate, Evidence, EvidenceKind, Label, Modality, Severity


def _candidate(i: int, score: float = 5.0, threshold: float = 1.0,
               template: str = "Exception in receiveBlock <*>") -> Candidate:
    return Candidate(
        id=f"t.log:blk_{i}", source="t.log", modality=Modality.LOGS,
        locator={"sequence": f"blk_{i}", "first_line": 10 * i, "last_line": 10 * i + 5},
        score=score, threshold=threshold, detector="log-ensemble",
        evidence=(Evidence(id="E1", kind=EvidenceKind.LOG_LINES, summary=f"unseen line at {10 * i + 2}",
                           data={"reason": "unseen_template", "lines": [10 * i + 2], "templates": [template]}),))


def _spec(sha: str = "a" * 64, path: str = "in.log", settings: dict | None = None, model: str = "none") -> RunSpec:
    return RunSpec(inputs=(InputFile(path=path, sha256=sha, size=10, kind="log"),),
                   settings=settings if settings is not None else {"detector": "log-ensemble", "k": 2},
                   model_id=model, adapter=None, prompt_version="explain/2+x", rules_version="none",
                   knowledge_version="none")


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "agent.db")
    yield database
    database.close()


@pytest.fixture
def explained(db: Database) -> tuple[str, list[Candidate]]:
    """A run with 4 candidates (one of them below its threshold), all with rules-only verdicts."""
    run, _ = db.get_or_create_run(_spec())
    cands = [_candidate(1, 9.0), _candidate(2, 3.0), _candidate(3, 1.5), _candidate(4, 0.5)]
    db.add_candidates(run.id, [(c, "G-1") for c in cands])
    explainer = Explainer(None)
    for c in cands:
        db.record_verdict(run.id, c.id, explainer.explain(c))
    return run.id, cands


# ------------------------------------------------------------------ schema

def test_wal_foreign_keys_and_schema_version(db: Database) -> None:
    conn = sqlite3.connect(db.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == [m.version for m in MIGRATIONS] and db.schema_version == SCHEMA_VERSION
    own = connect(db.path)
    assert own.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with pytest.raises(sqlite3.IntegrityError):  # a candidate of a run that does not exist
        own.execute("INSERT INTO candidates VALUES ('R-x', 'c', 0, '{}', 1.0, 'logs', 'd', 'G')")


def test_migration_from_version_1_keeps_rows_and_adds_review_state(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = connect(path)
    assert migrate(conn, target=1) == 1
    cand = _candidate(7)
    verdict = Explainer(None).explain(cand)
    conn.execute("INSERT INTO runs VALUES ('R-old', 't', 't', 'explaining', '[]', '{}', 'none', NULL, 'p', 'r', 'k', '{}')")
    conn.execute("INSERT INTO candidates VALUES ('R-old', ?, 0, ?, 5.0, 'logs', 'log-ensemble', 'G-1')",
                 (cand.id, cand.to_json()))
    conn.execute("INSERT INTO verdicts (run_id, candidate_id, json, label, severity, explained_by, created) "
                 "VALUES ('R-old', ?, ?, ?, ?, ?, 't')",
                 (cand.id, verdict.to_json(), verdict.label.value, int(verdict.severity), verdict.explained_by.value))
    conn.close()

    with Database(path) as db:
        assert db.schema_version == SCHEMA_VERSION
        row = db.verdict("R-old", cand.id)
        assert row.verdict == verdict and row.review is Review.UNREVIEWED and row.version == 1
        assert (row.final_label, row.final_severity) == (verdict.label, verdict.severity)
        fb = db.add_feedback(row.id, "confirm", author="ana")
        assert fb.version_after == 2 and db.verdict_by_id(row.id).review is Review.CONFIRMED


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version VALUES (99, 'from the future', 't')")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew, match=f"99 is newer than this program's {SCHEMA_VERSION}"):
        Database(path)
    with pytest.raises(InvalidValue, match="target 42"):
        migrate(connect(tmp_path / "x.db"), target=42)


# ------------------------------------------------------------------ runs, candidates, verdicts

def test_run_id_depends_on_content_and_settings_not_on_paths(db: Database) -> None:
    base = _spec()
    assert _spec(path="/elsewhere/renamed.log").run_id == base.run_id
    assert len({base.run_id, _spec(sha="b" * 64).run_id, _spec(settings={"detector": "log-pca", "k": 2}).run_id,
                _spec(model="llama.cpp:smollm2-135m").run_id}) == 4
    run, created = db.get_or_create_run(base)
    again, created_again = db.get_or_create_run(_spec(path="moved.log"))
    assert created and not created_again and again.id == run.id and run.status is RunStatus.CREATED
    assert run.settings == {"detector": "log-ensemble", "k": 2} and run.inputs[0].sha256 == "a" * 64
    with pytest.raises(InvalidValue, match="settings"):
        db.get_or_create_run(_spec(settings={"x": float("nan")}))


def test_candidates_round_trip_and_verdicts_are_never_duplicated(db: Database) -> None:
    run, _ = db.get_or_create_run(_spec())
    cands = [_candidate(i, score=10.0 - i) for i in range(5)]
    assert db.add_candidates(run.id, [(c, f"G-{i % 2}") for i, c in enumerate(cands)], info={"lines": 50}) == 5
    assert db.run(run.id).status is RunStatus.EXPLAINING and db.run(run.id).info == {"lines": 50}
    rows = db.candidates(run.id)
    assert [r.candidate for r in rows] == cands and [r.group_key for r in rows] == ["G-0", "G-1"] * 2 + ["G-0"]
    with pytest.raises(Conflict, match="already has its candidates"):
        db.add_candidates(run.id, [(cands[0], "G-0")])

    explainer = Explainer(None)
    first = db.record_verdict(run.id, cands[1].id, explainer.explain(cands[1]), model_calls=2, cache_hit=True,
                              elapsed_s=0.5)
    assert (first.model_calls, first.cache_hit, first.label) == (2, True, Label.ANOMALY)
    assert [r.candidate_id for r in db.pending_candidates(run.id)] == [c.id for c in cands if c is not cands[1]]
    with pytest.raises(Conflict, match="never duplicated"):
        db.record_verdict(run.id, cands[1].id, explainer.explain(cands[1]))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # the schema itself refuses, not only the API
        raw = connect(db.path)
        raw.execute("INSERT INTO verdicts (run_id, candidate_id, json, label, severity, explained_by, created) "
                    "SELECT run_id, candidate_id, json, label, severity, explained_by, created FROM verdicts")
    assert db.count_verdicts(run.id) == 1
    with pytest.raises(InvalidValue, match=r"verdict.candidate_id .*allowed: t.log:blk_0"):
        db.record_verdict(run.id, cands[0].id, explainer.explain(cands[2]))


def test_unknown_ids_raise_not_found_naming_kind_and_id(db: Database) -> None:
    run, _ = db.get_or_create_run(_spec())
    db.add_candidates(run.id, [(_candidate(1), "G")])
    cases = [
        (lambda: db.run("R-missing"), "run", "R-missing"),
        (lambda: db.candidate(run.id, "nope"), "candidate", f"{run.id}/nope"),
        (lambda: db.verdict(run.id, "t.log:blk_1"), "verdict", f"{run.id}/t.log:blk_1"),
        (lambda: db.verdict_by_id(12345), "verdict", "12345"),
        (lambda: db.record_verdict("R-missing", "t.log:blk_1", Explainer(None).explain(_candidate(1))), "run", "R-missing"),
        (lambda: db.add_feedback(999, "confirm", author="a"), "verdict", "999"),
        (lambda: db.chat_messages("S-none"), "chat session", "S-none"),
        (lambda: db.create_chat_session("t", run_id="R-missing"), "run", "R-missing"),
    ]
    for call, kind, ident in cases:
        with pytest.raises(NotFound) as info:
            call()
        assert (info.value.kind, info.value.id) == (kind, ident)
        assert f"no {kind} {ident!r}" in str(info.value)


# ------------------------------------------------------------------ feedback

def test_feedback_actions_and_their_effect(db: Database, explained: tuple[str, list[Candidate]]) -> None:
    run_id, cands = explained
    anomaly = db.verdict(run_id, cands[0].id)
    normal = db.verdict(run_id, cands[3].id)
    assert anomaly.label is Label.ANOMALY and normal.label is Label.NORMAL

    fb = db.add_feedback(anomaly.id, "reject", author="ana", note="planned maintenance")
    assert (fb.label_after, fb.severity_after, fb.version_after) == (Label.NORMAL, Severity.NONE, 2)
    row = db.verdict_by_id(anomaly.id)
    assert row.review is Review.CORRECTED and row.verdict == anomaly.verdict  # the explainer's verdict is kept

    with pytest.raises(InvalidValue, match="rejecting a normal verdict"):
        db.add_feedback(normal.id, "reject", author="bo")
    fb = db.add_feedback(normal.id, FeedbackAction.REJECT, author="bo", severity=3)
    assert (fb.label_after, fb.severity_after) == (Label.ANOMALY, Severity.HIGH)

    mid = db.verdict(run_id, cands[1].id)
    db.add_feedback(mid.id, "change_severity", author="cy", severity=int(mid.severity))
    assert db.verdict_by_id(mid.id).review is Review.CONFIRMED  # same as the explainer said
    db.add_feedback(mid.id, "note", author="cy", note="seen last week too")
    assert db.verdict_by_id(mid.id).review is Review.CONFIRMED and db.verdict_by_id(mid.id).version == 3
    assert [f.action for f in db.feedback(mid.id)] == [FeedbackAction.CHANGE_SEVERITY, FeedbackAction.NOTE]

    bad = [
        (dict(action="escalate", author="a"), "action", "confirm, reject, change_severity, note"),
        (dict(action="change_severity", author="a", severity=7), "severity", "0, 1, 2, 3, 4"),
        (dict(action="change_severity", author="a"), "severity", "0-4"),
        (dict(action="confirm", author="a", severity=2), "severity", "only with action"),
        (dict(action="note", author="a", note="  "), "note", "non-empty"),
        (dict(action="confirm", author=" "), "author", "non-empty"),
    ]
    for kwargs, field_name, allowed in bad:
        with pytest.raises(InvalidValue) as info:
            db.add_feedback(mid.id, **kwargs)
        assert info.value.field == field_name and allowed in str(info.value)
    assert db.verdict_by_id(mid.id).version == 3  # nothing was written by the failures


def test_concurrent_feedback_from_threads_is_applied_one_after_another(tmp_path: Path,
                                                                       explained: tuple[str, list[Candidate]],
                                                                       db: Database) -> None:
    run_id, cands = explained
    target = db.verdict(run_id, cands[0].id)
    n_threads, per_thread = 6, 5
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            with Database(db.path) as own:  # one connection per thread, like separate processes
                barrier.wait()
                for i in range(per_thread):
                    own.add_feedback(target.id, "change_severity", author=f"analyst{t}", severity=(t + i) % 5,
                                     note=f"t{t} i{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    history = db.feedback(target.id)
    assert len(history) == n_threads * per_thread
    # Versions form one unbroken chain: no two writers read the same state.
    assert [f.version_after for f in history] == list(range(2, 2 + n_threads * per_thread))
    final = db.verdict_by_id(target.id)
    assert final.version == 1 + n_threads * per_thread
    assert (final.final_label, final.final_severity) == (history[-1].label_after, history[-1].severity_after)
    for f in history:
        assert f.severity_after == f.severity and f.label_after is (Label.NORMAL if f.severity == 0 else Label.ANOMALY)


def test_optimistic_version_check_lets_exactly_one_stale_writer_win(db: Database,
                                                                   explained: tuple[str, list[Candidate]]) -> None:
    run_id, cands = explained
    target = db.verdict(run_id, cands[1].id)
    seen_version = target.version
    barrier = threading.Barrier(5)
    outcomes: list[str] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        with Database(db.path) as own:
            barrier.wait()
            try:
                own.add_feedback(target.id, "change_severity", author=f"a{t}", severity=t % 4 + 1,
                                 expected_version=seen_version)
                result = "ok"
            except Conflict as exc:
                assert f"not {seen_version}" in str(exc)
                result = "conflict"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(outcomes) == ["conflict"] * 4 + ["ok"]
    assert len(db.feedback(target.id)) == 1 and db.verdict_by_id(target.id).version == seen_version + 1


# ------------------------------------------------------------------ past cases

def test_past_cases_are_the_reviewed_verdicts_and_go_into_the_cases_collection(
        tmp_path: Path, db: Database, explained: tuple[str, list[Candidate]]) -> None:
    run_id, cands = explained
    v0, v1, v2 = (db.verdict(run_id, c.id) for c in cands[:3])
    db.add_feedback(v0.id, "confirm", author="ana", note="disk failure on the DataNode")
    db.add_feedback(v1.id, "reject", author="bo", note="benchmark job, expected")
    db.add_feedback(v2.id, "note", author="cy", note="not sure yet")  # a note alone is not a review
    cases = db.past_cases()
    assert {c.candidate_id for c in cases} == {cands[0].id, cands[1].id}
    by_id = {c.candidate_id: c for c in cases}
    rejected = by_id[cands[1].id]
    assert (rejected.label, rejected.severity, rejected.model_label) == (Label.NORMAL, Severity.NONE, Label.ANOMALY)
    assert rejected.notes == ("benchmark job, expected",) and rejected.authors == ("bo",)
    assert rejected.anomaly_type == "none" and "unseen line" in rejected.summary
    text = rejected.to_passage().text
    assert "benchmark job, expected" in text and "explainer had said anomaly" in text and "Exception in receiveBlock" in text
    assert db.past_cases(run_id, limit=1)[0].candidate_id == cands[1].id  # most recently reviewed first
    with pytest.raises(InvalidValue, match="limit"):
        db.past_cases(limit=0)

    from knowledge.embedder import MiniLMEmbedding
    from knowledge.store import KnowledgeStore

    store = KnowledgeStore(tmp_path / "kb", embedder=MiniLMEmbedding(threads=1))
    assert add_past_cases_to_store(store, cases) == 2
    db.add_feedback(v1.id, "note", author="bo", note="confirmed with the job owner")
    assert add_past_cases_to_store(store, db.past_cases()) == 2
    assert store.count("cases") == 2  # same ids: the corrected text replaced the old one
    hit = store.search("benchmark job expected receiveBlock exception", k=1, collection="cases")[0]
    assert hit.id == rejected.case_id and "confirmed with the job owner" in hit.text


# ------------------------------------------------------------------ chat

def test_chat_sessions_and_messages(db: Database, explained: tuple[str, list[Candidate]]) -> None:
    run_id, cands = explained
    session = db.create_chat_session("why is blk_1 critical?", run_id=run_id)
    db.add_chat_message(session.id, "user", "why?", cited_ids=[cands[0].id])
    db.add_chat_message(session.id, "assistant", "Because of E1.", cited_ids=["E1", "P-abc"])
    messages = db.chat_messages(session.id)
    assert [(m.role.value, m.cited_ids) for m in messages] == [("user", (cands[0].id,)), ("assistant", ("E1", "P-abc"))]
    assert db.chat_sessions(run_id) == [session] and db.chat_session(session.id) == session
    with pytest.raises(InvalidValue, match="role 'robot'.*system, user, assistant, tool"):
        db.add_chat_message(session.id, "robot", "hi")
    with pytest.raises(InvalidValue, match="cited_ids"):
        db.add_chat_message(session.id, "user", "hi", cited_ids="E1")
    raw = json.loads(connect(db.path).execute("SELECT cited_ids FROM chat_messages ORDER BY id DESC").fetchone()[0])
    assert raw == ["E1", "P-abc"]
