"""The web interface in a real headless Chromium, against a real server process.

The server (``python -m agent.api``) runs on a free loopback port with a token, over a fresh
database and knowledge store seeded through the API from a generated HDFS-like log
(:mod:`eval.synth`) and a generated runbook. The browser enters the token, opens the most
severe candidate, checks that its session lines are shown with the flagged line highlighted,
asks for an explanation, follows a citation, asks a question in the chat and gets a cited
answer, confirms the verdict, adds a rule, renders the time-series / image / video evidence
views from evidence data, and saves a screenshot to ``out/ci-artifacts/web.png``. No request may
leave the server's origin.

Needs Debian's ``chromium`` and the ``playwright`` Python package (its bundled driver; it never
downloads a browser here):

    apt-get install -y chromium
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 pip install playwright==1.65.2
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from eval.api_bench import seed, start_server

REPO = Path(__file__).resolve().parents[2]
ARTIFACT = REPO / "out" / "ci-artifacts" / "web.png"
CHROMIUM = os.environ.get("ANOMALY_AGENT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the browser test needs the playwright package: PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 pip install playwright==1.65.2")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"the browser test needs Chromium at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)

pytestmark = pytest.mark.timeout(300)

RUNBOOK = (REPO / "tests" / "data" / "hdfs_runbook.md").read_text(encoding="utf-8")


def test_analyst_flow_in_chromium(tmp_path: Path) -> None:
    with start_server(tmp_path / "server", model="none", knowledge=True) as server:
        seeded = seed(server, tmp_path / "sample", n_test_blocks=80, explain=0)
        r = httpx.post(f"{server.url}/api/knowledge/documents", params={"filename": "runbook.md"},
                       content=RUNBOOK.encode(), headers=server.headers, timeout=120)
        assert r.status_code == 201, r.text
        outside: list[str] = []
        with sync_api.sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                user_data_dir=str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
                viewport={"width": 1500, "height": 950})
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(60_000)
                page.on("request", lambda req: outside.append(req.url)
                        if not req.url.startswith((server.url, "data:", "blob:")) else None)
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(server.url + "/")

                # the token is asked for once and kept in sessionStorage
                page.wait_for_selector("#token-dialog:not([hidden])")
                page.fill("#token-input", server.token)
                page.click("#token-form button[type=submit]")
                page.wait_for_selector("#queue li")
                assert page.evaluate("sessionStorage.getItem('anomaly-agent-token')") == server.token
                assert page.input_value("#run-select") == seeded["run_id"]

                # the queue is sorted by severity, most severe first
                sevs = page.eval_on_selector_all("#queue li .badge", "els => els.map(e => parseInt(e.textContent))")
                assert len(sevs) == seeded["candidates"]
                assert sevs == sorted(sevs, reverse=True)

                # open the most severe candidate: its session's lines, flagged ones highlighted
                first_id = page.get_attribute("#queue li:first-child", "data-id")
                page.click("#queue li:first-child button")
                page.wait_for_selector(".log-line.flagged")
                assert page.text_content("#cand-title") == first_id
                flagged = page.eval_on_selector_all(".log-line.flagged", "els => els.map(e => e.textContent)")
                seq = first_id.split(":", 1)[1]
                assert flagged and all(seq in text for text in flagged)
                assert page.locator(".log-line").count() >= len(flagged)

                # explain on demand; the verdict card's citations open the cited evidence
                page.click("#explain-btn")
                page.wait_for_selector("#verdict-head")
                cites = page.eval_on_selector_all("#verdict-card .citations .cite", "els => els.map(e => e.dataset.cite)")
                assert cites, "the verdict cites nothing"
                page.click(f"#verdict-card .citations .cite[data-cite='{cites[0]}']")
                page.wait_for_selector(".evidence-item.flash, .log-line.flash")

                # chat: a question about the open candidate gets an answer that cites its ids
                page.click(".tabs button[data-tab=chat]")
                page.fill("#chat-input", "Why is this candidate anomalous?")
                page.click("#chat-send")
                page.wait_for_selector(".msg.assistant.answer")
                answer = page.locator(".msg.assistant.answer").last
                cited = (answer.get_attribute("data-cited") or "").split()
                assert first_id in cited and any(c in cites for c in cited), cited
                assert answer.locator(".cite").count() >= 2
                # a citation in the chat answer opens what it cites
                answer.locator(f".cite[data-cite='{cites[0]}']").first.click()
                page.wait_for_selector(".evidence-item.flash, .log-line.flash")

                # a question the tools cannot answer: "I don't know", no guess
                page.fill("#chat-input", "What is the capital of France?")
                page.click("#chat-send")
                page.locator(".msg.assistant.answer").nth(1).wait_for()  # (wait_for_function would need unsafe-eval)
                assert page.locator(".msg.assistant.answer").last.text_content().startswith("I don't know")

                # feedback: confirm with the version the page saw
                page.fill("#fb-author", "browser-test")
                page.click("#fb-confirm")
                page.locator("#verdict-review", has_text="confirmed").wait_for()
                assert "v2" in page.text_content("#verdict-review")
                assert "browser-test" in page.text_content("#fb-history")

                # rule editor
                page.click(".tabs button[data-tab=rules]")
                page.fill("#rule-text", "unseen templates are at least high severity")
                page.click("#rule-form button[type=submit]")
                page.wait_for_selector("#rules li[data-rule='R-001']")
                assert "compiled" in page.text_content("#rules li[data-rule='R-001']")

                # evidence views of the other modalities render from evidence data (the registry)
                kinds = page.evaluate("""() => {
                    const cand = {id: 'x', modality: 'timeseries', locator: {}, evidence: []};
                    const seg = {id: 'E1', kind: 'segment', summary: 'segment', data: {i0: 40, i1: 60, t0: 40, t1: 60,
                        variables: [{name: 'load', share: 0.7, observed_at_peak: 5, expected_at_peak: 1, normal_range: [0, 2]}]}};
                    const reg = {id: 'E2', kind: 'region', summary: 'crack', data: {width: 200, height: 100,
                        bbox: [20, 10, 50, 40], heatmap: [[0, 1], [2, 3]]}};
                    const frm = {id: 'E3', kind: 'frames', summary: 'frames', data: {frames: [10, 30]}};
                    return [seg, reg, frm].map(ev => {
                        const node = window.AA.renderEvidenceItem(ev, cand);
                        document.getElementById('evidence').appendChild(node);
                        return [ev.kind, node.querySelectorAll('svg').length, node.querySelectorAll('.flagged-segment, .bbox').length];
                    });
                }""")
                assert kinds == [["segment", 1, 1], ["region", 1, 1], ["frames", 1, 0]], kinds

                page.click(".tabs button[data-tab=chat]")
                page.click(f"#queue li[data-id='{first_id}'] button")
                page.wait_for_selector(".log-line.flagged")
                ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACT), full_page=False)
                assert not errors, errors
            finally:
                context.close()
        assert not outside, f"requests left the server's origin: {outside[:5]}"

        # what the page did is in the database, through the API
        r = httpx.get(f"{server.url}/api/runs/{seeded['run_id']}", headers=server.headers)
        assert r.json()["reviewed"] == 1
    assert ARTIFACT.stat().st_size > 10_000
