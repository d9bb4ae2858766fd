"""agent.api: auth, uploads, runs, queue, verdicts, feedback conflicts, chat (JSON and SSE), rules,
knowledge, reports, errors with reasons, the read cache's freshness, CORS and the serve command.

The app runs in-process (FastAPI's TestClient) over a real temporary database and Chroma store,
seeded through the API from a generated HDFS-like log (:mod:`eval.synth`); verdicts come from
the real explainer in rules-only mode (``--model none``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from agent.api import ServerSettings, create_app, is_loopback, safe_filename, serve_main
from eval.synth import write_sample

pytestmark = pytest.mark.timeout(300)

TOKEN = "test-token-0123456789"
H = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 1_000_000


class Api:
    """A seeded server: client, run id, queue."""

    def __init__(self, root: Path, client: TestClient) -> None:
        self.root = root
        self.c = client
        self.paths = write_sample(root / "sample", n_train_blocks=150, n_test_blocks=100, seed=9, anomaly_rate=0.15,
                                  prompt_injections=1)
        self.test_id = self.upload(self.paths["test"]).json()["id"]
        self.train_id = self.upload(self.paths["train"]).json()["id"]
        r = self.c.post("/api/runs", json={"upload_id": self.test_id, "train_upload_id": self.train_id}, headers=H)
        assert r.status_code == 201, r.text
        self.run = r.json()
        self.queue = self.c.get(f"/api/runs/{self.run['id']}/candidates", headers=H).json()["items"]

    def upload(self, path: Path, name: str | None = None, data: bytes | None = None) -> Any:
        return self.c.post("/api/uploads", params={"filename": name or path.name},
                           content=data if data is not None else path.read_bytes(),
                           headers={**H, "Content-Type": "application/octet-stream"})

    def cand(self, cid: str, suffix: str = "") -> str:
        return f"/api/runs/{self.run['id']}/candidates/{quote(cid, safe='')}{suffix}"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("api")
    settings = ServerSettings(db=root / "agent.db", store=root / "store", token=TOKEN, model="none",
                              max_upload_bytes=LIMIT)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Api(root, client)


# ------------------------------------------------------------------------------ auth and basics

def test_every_api_route_needs_the_token_but_health(api: Api) -> None:
    c = api.c
    assert c.get("/api/health").status_code == 200
    schema = c.get("/api/openapi.json", headers=H).json()
    assert "bearer" in schema["components"]["securitySchemes"]
    checked = 0
    for path, ops in schema["paths"].items():
        url = (path.replace("{run_id}", api.run["id"]).replace("{candidate_id}", quote(api.queue[0]["id"], safe=""))
               .replace("{verdict_id}", "1").replace("{session_id}", "S-x").replace("{rule_id}", "R-001")
               .replace("{passage_id}", "P-x").replace("{fmt}", "html"))
        for method in ops:
            for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
                r = c.request(method.upper(), url, headers=headers)
                expected = 200 if path == "/api/health" else 401
                assert r.status_code == expected, (method, path, headers, r.status_code)
                if expected == 401:
                    assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]
            checked += 1
    assert checked >= 25
    assert c.get("/api/no-such-route").status_code == 401  # no route discovery without the token
    assert c.get("/api/no-such-route", headers=H).status_code == 404


def test_page_is_served_with_a_strict_policy_and_no_cors_by_default(api: Api) -> None:
    r = api.c.get("/")
    assert r.status_code == 200 and "<script src=\"app.js\"></script>" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    for asset in ("/app.js", "/app.css"):
        assert api.c.get(asset).status_code == 200
    pre = api.c.options("/api/runs", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in pre.headers
    page = (Path(__file__).resolve().parents[2] / "agent" / "web")
    for f in page.iterdir():  # nothing in the page points outside the server (the SVG namespace is a name, not a URL)
        text = f.read_text().replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_cors_only_for_named_origins(tmp_path: Path) -> None:
    settings = ServerSettings(db=tmp_path / "a.db", store=tmp_path / "s", token=TOKEN, model="none",
                              use_knowledge=False, cors_origins=("http://ui.local",))
    with TestClient(create_app(settings)) as c:
        ok = c.options("/api/runs", headers={"Origin": "http://ui.local", "Access-Control-Request-Method": "GET"})
        assert ok.headers["access-control-allow-origin"] == "http://ui.local"
        bad = c.options("/api/runs", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in bad.headers


# ------------------------------------------------------------------------------ uploads

def test_uploads_are_named_safely_and_refused_with_reasons(api: Api) -> None:
    r = api.upload(api.paths["test"], name="../../etc/x y.log", data=b"081109 203518 143 INFO dfs.DataNode: hello blk_1\n")
    assert r.status_code == 201 and r.json()["filename"] == "x_y.log"
    stored = list((api.root / "store" / "uploads" / r.json()["id"]).iterdir())
    assert [p.name for p in stored] == ["x_y.log"]
    assert api.upload(api.paths["test"]).status_code == 200  # the same bytes again: the same upload
    png = api.upload(api.paths["test"], name="shot.png", data=b"\x89PNG\r\n")
    assert png.status_code == 415 and "'.png'" in png.json()["error"] and "image" in png.json()["error"]
    binary = api.upload(api.paths["test"], name="bin.log", data=b"ab\x00cd" * 10)
    assert binary.status_code == 415 and "NUL" in binary.json()["error"]
    fake_gz = api.upload(api.paths["test"], name="x.log.gz", data=b"not gzip at all")
    assert fake_gz.status_code == 415
    big = api.upload(api.paths["test"], name="big.log", data=b"x" * (LIMIT + 1))
    assert big.status_code == 413 and str(LIMIT) in big.json()["error"]
    assert api.upload(api.paths["test"], name="empty.log", data=b"").status_code == 400
    multi = api.c.post("/api/uploads", params={"filename": "a.log"}, files={"f": ("a.log", b"x")}, headers=H)
    assert multi.status_code == 415 and "raw" in multi.json()["error"] or "request body" in multi.json()["error"]
    assert not list((api.root / "store" / "uploads" / ".incoming").iterdir())  # no partial file left
    assert safe_filename("..") == "upload.log" and safe_filename("C:\\logs\\a.log") == "a.log"


# ------------------------------------------------------------------------------ runs and candidates

def test_runs_are_created_once_and_listed(api: Api) -> None:
    again = api.c.post("/api/runs", json={"upload_id": api.test_id, "train_upload_id": api.train_id}, headers=H)
    assert again.status_code == 200 and again.json()["id"] == api.run["id"]
    runs = api.c.get("/api/runs", headers=H).json()
    assert [r["id"] for r in runs] == [api.run["id"]]
    assert runs[0]["candidates"] == len(api.queue) > 0 and runs[0]["inputs"][0]["name"] == "test.log"
    unknown = api.c.post("/api/runs", json={"upload_id": "0" * 16}, headers=H)
    assert unknown.status_code == 404 and "upload" in unknown.json()["error"]
    bad = api.c.post("/api/runs", json={"upload_id": api.test_id, "detector": "nope"}, headers=H)
    assert bad.status_code == 422 and "log-ensemble" in bad.json()["error"]
    extra = api.c.post("/api/runs", json={"upload_id": api.test_id, "colour": "red"}, headers=H)
    assert extra.status_code == 422 and "colour" in extra.json()["error"]
    missing = api.c.get("/api/runs/R-0000000000000000", headers=H)
    assert missing.status_code == 404 and api.run["id"] in missing.json()["error"]
    assert str(api.root) not in missing.json()["error"]  # no server paths in errors


def test_queue_is_sorted_by_severity_and_filters(api: Api) -> None:
    items = api.queue
    assert [i["severity"] for i in items] == sorted((i["severity"] for i in items), reverse=True)
    base = f"/api/runs/{api.run['id']}/candidates"
    page = api.c.get(base, params={"limit": 2, "offset": 1}, headers=H).json()
    assert [i["id"] for i in page["items"]] == [i["id"] for i in items[1:3]] and page["total"] == len(items)
    unseen = api.c.get(base, params={"reason": "unseen"}, headers=H).json()["items"]
    assert unseen and all(any("unseen" in r for r in i["reasons"]) for i in unseen)
    by_score = api.c.get(base, params={"sort": "score"}, headers=H).json()["items"]
    assert [i["score"] for i in by_score] == sorted((i["score"] for i in by_score), reverse=True)
    assert api.c.get(base, params={"min_severity": 7}, headers=H).status_code == 422
    assert api.c.get(base, params={"sort": "colour"}, headers=H).status_code == 422


def test_candidate_detail_lines_and_unknown_ids(api: Api) -> None:
    top = api.queue[0]
    d = api.c.get(api.cand(top["id"]), headers=H).json()
    assert d["candidate"]["id"] == top["id"] and d["brief"]["severity"] == top["severity"]
    assert d["candidate"]["evidence"] and d["verdict"] is None
    lines = api.c.get(api.cand(top["id"], "/lines"), headers=H).json()
    flagged = {ln for ev in d["candidate"]["evidence"] for ln in ev["data"].get("lines", [])}
    assert lines["available"] and {ln["line_no"] for ln in lines["lines"] if ln["flagged"]} == flagged
    seq = d["candidate"]["locator"]["sequence"]
    assert all(seq in ln["text"] for ln in lines["lines"])
    text = api.paths["test"].read_text().splitlines()
    assert all(text[ln["line_no"] - 1] == ln["text"] for ln in lines["lines"])
    r = api.c.get(api.cand("test.log:blk_0"), headers=H)
    assert r.status_code == 404 and "blk_0" in r.json()["error"] and top["id"].split(":")[0] in r.json()["error"]


# ------------------------------------------------------------------------------ verdicts and feedback

def test_explain_then_feedback_with_versions(api: Api) -> None:
    cid = api.queue[1]["id"]
    assert api.c.get(api.cand(cid, "/verdict"), headers=H).status_code == 404
    first = api.c.post(api.cand(cid, "/explain"), headers=H)
    assert first.status_code == 201 and first.json()["created"] is True
    v = first.json()["verdict"]
    assert v["verdict"]["candidate_id"] == cid and v["version"] == 1
    assert set(v["verdict"]["evidence_ids"]) <= {e["id"] for e in api.c.get(api.cand(cid), headers=H).json()["candidate"]["evidence"]}
    second = api.c.post(api.cand(cid, "/explain"), headers=H)
    assert second.status_code == 200 and second.json()["verdict"]["verdict_id"] == v["verdict_id"]
    vid = v["verdict_id"]
    fb = f"/api/verdicts/{vid}/feedback"
    ok = api.c.post(fb, json={"action": "change_severity", "severity": 1, "author": "ana", "expected_version": 1}, headers=H)
    assert ok.status_code == 201 and ok.json()["verdict"]["final_severity"] == 1 and ok.json()["verdict"]["version"] == 2
    # the cached queue and candidate reflect it at once
    assert api.c.get(api.cand(cid), headers=H).json()["verdict"]["final_severity"] == 1
    row = next(i for i in api.c.get(f"/api/runs/{api.run['id']}/candidates", headers=H).json()["items"] if i["id"] == cid)
    assert row["severity"] == 1 and row["review"] == "corrected" and row["severity_source"] == "verdict"
    stale = api.c.post(fb, json={"action": "confirm", "author": "bob", "expected_version": 1}, headers=H)
    assert stale.status_code == 409 and "version 2" in stale.json()["error"]
    assert len(api.c.get(fb, headers=H).json()) == 1  # nothing written
    malformed = api.c.post(fb, content=b'{"action": "confirm", "author":', headers={**H, "Content-Type": "application/json"})
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]
    bad_action = api.c.post(fb, json={"action": "approve", "author": "bob"}, headers=H)
    assert bad_action.status_code == 422 and "confirm" in bad_action.json()["error"]
    bad_sev = api.c.post(fb, json={"action": "change_severity", "severity": 9, "author": "bob"}, headers=H)
    assert bad_sev.status_code == 422
    no_note = api.c.post(fb, json={"action": "note", "author": "bob"}, headers=H)
    assert no_note.status_code == 422 and "note" in no_note.json()["error"]
    assert api.c.post("/api/verdicts/99999/feedback", json={"action": "confirm", "author": "x"}, headers=H).status_code == 404


def test_concurrent_feedback_one_wins_the_other_gets_409(api: Api) -> None:
    cid = api.queue[2]["id"]
    vid = api.c.post(api.cand(cid, "/explain"), headers=H).json()["verdict"]["verdict_id"]
    statuses: list[int] = []
    barrier = threading.Barrier(4)

    def send(author: str) -> None:
        barrier.wait()
        r = api.c.post(f"/api/verdicts/{vid}/feedback", json={"action": "confirm", "author": author,
                                                               "expected_version": 1}, headers=H)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=send, args=(f"analyst{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201, 409, 409, 409]
    history = api.c.get(f"/api/verdicts/{vid}/feedback", headers=H).json()
    assert len(history) == 1 and history[0]["version_after"] == 2
    assert api.c.get(f"/api/verdicts/{vid}", headers=H).json()["version"] == 2


def test_explain_a_posted_candidate_without_storing(api: Api) -> None:
    cand = api.c.get(api.cand(api.queue[3]["id"]), headers=H).json()["candidate"]
    r = api.c.post("/api/explain", json={"candidate": cand}, headers=H)
    assert r.status_code == 200 and r.json()["candidate_id"] == cand["id"]
    assert api.c.get(api.cand(cand["id"], "/verdict"), headers=H).status_code == 404
    bad = api.c.post("/api/explain", json={"candidate": {**cand, "score": "high"}}, headers=H)
    assert bad.status_code == 422 and "score" in bad.json()["error"]


# ------------------------------------------------------------------------------ chat

def _sse(text: str) -> list[tuple[str, Any]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_chat_json_and_streamed(api: Api) -> None:
    s = api.c.post("/api/chat/sessions", json={"title": "t", "run_id": api.run["id"]}, headers=H)
    assert s.status_code == 201
    sid = s.json()["id"]
    url = f"/api/chat/sessions/{sid}/messages"
    top = api.queue[0]["id"]
    r = api.c.post(url, json={"content": "why is this candidate anomalous?", "candidate_id": top}, headers=H)
    answer = r.json()
    assert r.status_code == 200 and top in answer["cited_ids"] and answer["tool_calls"][0]["name"] == "explain_candidate"
    queue = api.c.get(f"/api/runs/{api.run['id']}/candidates", headers=H).json()["items"]
    with api.c.stream("POST", url, json={"content": "list the top 2 candidates", "stream": True}, headers=H) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _sse(resp.read().decode())
    kinds = [k for k, _ in events]
    assert kinds[0] == "tool" and kinds[-1] == "answer" and "delta" in kinds
    assert events[-1][1]["cited_ids"] == [i["id"] for i in queue[:2]]
    history = api.c.get(url, headers=H).json()
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert len(api.c.get(url, params={"include_tools": True}, headers=H).json()) > 4
    assert api.c.post("/api/chat/sessions/S-nope/messages", json={"content": "hi", "stream": True}, headers=H).status_code == 404
    assert api.c.post(url, json={"content": ""}, headers=H).status_code == 422
    assert api.c.post(url, json={"content": "x" * 5000}, headers=H).status_code == 422


# ------------------------------------------------------------------------------ rules and knowledge

def test_rules_add_list_remove(api: Api) -> None:
    before = {i["id"]: i["severity"] for i in api.c.get(f"/api/runs/{api.run['id']}/candidates", headers=H).json()["items"]}
    r = api.c.post("/api/rules", json={"text": "unseen templates are normal"}, headers=H)
    assert r.status_code == 201, r.text
    rule = r.json()
    assert rule["compiled"] and rule["effect"] == "set_normal"
    assert api.c.post("/api/rules", json={"text": "unseen templates are normal"}, headers=H).status_code == 200
    assert [x["id"] for x in api.c.get("/api/rules", headers=H).json()["rules"]] == [rule["id"]]
    assert api.c.get(f"/api/rules/{rule['id']}", headers=H).json()["text"] == "unseen templates are normal"
    # the queue's detector-side severities follow the new rule at once (the read cache sees the rule book change)
    after = {i["id"]: i for i in api.c.get(f"/api/runs/{api.run['id']}/candidates", headers=H).json()["items"]}
    changed = [cid for cid, sev in before.items() if after[cid]["severity_source"] == "detector" and after[cid]["severity"] != sev]
    assert changed and all(after[c]["label"] == "normal" for c in changed)
    assert api.c.post("/api/rules", json={"text": "x", "effect": "explode"}, headers=H).status_code == 422
    assert api.c.delete(f"/api/rules/{rule['id']}", headers=H).json()["id"] == rule["id"]
    gone = api.c.delete(f"/api/rules/{rule['id']}", headers=H)
    assert gone.status_code == 404 and rule["id"] in gone.json()["error"]


def test_knowledge_documents_search_and_passages(api: Api) -> None:
    doc = b"# Runbook\n\n## Disk full\n\nWhen a DataNode disk is full, writes fail with IOException; free space first.\n"
    r = api.c.post("/api/knowledge/documents", params={"filename": "disk.md"}, content=doc, headers=H)
    assert r.status_code == 201 and r.json()["passages"] >= 1
    res = api.c.get("/api/knowledge/search", params={"q": "DataNode disk full", "k": 2}, headers=H).json()
    top = res["passages"][0]
    assert top["source"] == "disk.md" and top["score"] > 0.4
    assert api.c.get(f"/api/knowledge/passages/{top['id']}", headers=H).json()["text"] == top["text"]
    assert api.c.get("/api/knowledge/passages/P-000000000000", headers=H).status_code == 404
    assert [s["source"] for s in api.c.get("/api/knowledge/sources", headers=H).json()] == ["disk.md"]
    docx = api.c.post("/api/knowledge/documents", params={"filename": "a.docx"}, content=b"PK..", headers=H)
    assert docx.status_code == 415 and ".md" in docx.json()["error"]


# ------------------------------------------------------------------------------ reports

def test_report_generate_and_download(api: Api) -> None:
    run = api.run["id"]
    assert api.c.get(f"/api/runs/{run}/report.html", headers=H).status_code == 404
    r = api.c.post(f"/api/runs/{run}/report", headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["candidates"] == len(api.queue)
    data = api.c.get(f"/api/runs/{run}/report.json", headers=H).json()
    assert data["run"]["id"] == run and len(data["candidates"]) == len(api.queue)
    assert data["summary"]["reviewed"] >= 2  # the feedback given above is in the report
    html = api.c.get(f"/api/runs/{run}/report.html", headers=H)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    csv = api.c.get(f"/api/runs/{run}/report.csv", headers=H).text
    assert csv.splitlines()[0].startswith("candidate_id,") and len(csv.splitlines()) == len(api.queue) + 1
    assert api.c.get(f"/api/runs/{run}", headers=H).json()["verdicts"] == len(api.queue)


# ------------------------------------------------------------------------------ the command

def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANOMALY_AGENT_TOKEN", raising=False)
    status = serve_main(["--host", "0.0.0.0", "--store", str(tmp_path), "--model", "none"])
    err = capsys.readouterr().err
    assert status == 2 and "0.0.0.0" in err and "--token" in err and "Traceback" not in err
    assert serve_main(["--port", "70000", "--store", str(tmp_path), "--model", "none"]) == 2
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


def test_a_generated_token_can_be_passed_back_on_the_command_line(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from agent.api import add_arguments, settings_from_args

    monkeypatch.delenv("ANOMALY_AGENT_TOKEN", raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    tokens = set()
    for _ in range(200):  # a token_urlsafe one started with "-" about 3 times in 200
        settings, generated = settings_from_args(parser.parse_args(["--store", str(tmp_path), "--model", "none"]))
        assert generated and len(settings.token) >= 32
        again = parser.parse_args(["--token", settings.token, "--store", str(tmp_path), "--model", "none"])
        assert again.token == settings.token
        tokens.add(settings.token)
    assert len(tokens) == 200
