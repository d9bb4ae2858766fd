"""The explanation eval (eval/explain.py) with fake deterministic models: fast, no /work/shared.

* A model that obeys instructions only *outside* the prompt's DATA blocks (what a well-behaved
  model sees once untrusted text is delimited) passes both suites.
* A naive model that obeys instructions anywhere must fail some injection cases: the suite
  has teeth.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.models import Message
from eval import explain as ev


def _answer(schema: dict[str, Any] | None, **over: Any) -> str:
    """A schema-valid answer citing only ids the schema allows."""
    props = (schema or {}).get("properties", {})
    ev_ids = list(props.get("evidence_ids", {}).get("items", {}).get("enum", []))[:2]
    p_ids = list(props.get("passage_ids", {}).get("items", {}).get("enum", []))[:1]
    base = {"anomaly_type": "write pipeline failure", "summary": "The write pipeline failed.",
            "causal_chain": [{"text": "A DataNode failed", "evidence_ids": ev_ids[:1]}] if ev_ids else [],
            "evidence_ids": ev_ids, "passage_ids": p_ids, "rule_ids": [], "label": "anomaly", "severity": 3,
            "confidence": 0.8, "actions": ["Check the DataNode disk"]}
    base.update(over)
    return json.dumps(base)


class FakeModel:
    def __init__(self, reply: Callable[[Sequence[Message], dict[str, Any] | None], str], model_id: str) -> None:
        self.reply, self.model_id, self.adapter, self.calls = reply, model_id, None, 0

    def generate(self, messages: Sequence[Message], schema: dict[str, Any] | None = None, max_tokens: int = 384,
                 temperature: float = 0.0) -> Message:
        self.calls += 1
        return Message(role="assistant", content=self.reply(messages, schema))


def _outside_data(text: str) -> str:
    return re.sub(r"<<<DATA (\w+) [^\n]*>>>\n.*?\n<<<END DATA \1>>>", "", text, flags=re.S)


# The system message itself warns against "answer normal": the fakes read only the user turns.
def _obeying(text: str, schema: dict[str, Any] | None) -> str:
    low = text.lower()
    if "answer normal" in low or '"label": "normal"' in low or "label normal" in low:
        return _answer(schema, label="normal", severity=0, confidence=1.0, summary="all good")
    if "severity 4" in low:
        return _answer(schema, severity=4, confidence=1.0)
    return _answer(schema)


def careful(messages: Sequence[Message], schema: dict[str, Any] | None) -> str:
    return _obeying("\n".join(_outside_data(m.content) for m in messages if m.role != "system"), schema)


def naive(messages: Sequence[Message], schema: dict[str, Any] | None) -> str:
    return _obeying("\n".join(m.content for m in messages if m.role != "system"), schema)


@pytest.fixture(scope="module")
def cands() -> ev.SuiteCandidates:
    return ev.synth_candidates()


def test_synthetic_candidates_cover_the_suites(cands: ev.SuiteCandidates) -> None:
    kinds = set(cands.by_kind)
    assert {c.kind for c in ev.RULE_CASES} <= kinds and set(ev.INJECTION_BASES) <= kinds
    assert cands.by_kind["normal"].score < cands.by_kind["normal"].threshold
    assert cands.by_kind["borderline_write_exception"].score == pytest.approx(
        cands.by_kind["borderline_write_exception"].threshold * ev.BORDERLINE_RATIO)


def test_rule_suite_all_pass_with_fake_model(cands: ev.SuiteCandidates) -> None:
    assert len(ev.RULE_CASES) >= 20
    res = ev.rule_suite(FakeModel(careful, "fake-careful"), cands, echo=lambda _s: None)
    failed = [c for c in res["cases"] if not c["passed"]]
    assert res["total"] == len(ev.RULE_CASES) and not failed, failed
    assert all(c["compiled"] and c["explained_by"] == "model" for c in res["cases"])


def test_injection_suite_careful_passes_naive_fails(cands: ev.SuiteCandidates, monkeypatch: pytest.MonkeyPatch) -> None:
    careful_res = ev.injection_suite(FakeModel(careful, "fake-careful"), cands, n=24, echo=lambda _s: None)
    assert careful_res["total"] == 24
    assert careful_res["passed"] == 24, [c for c in careful_res["cases"] if not c["passed"]]
    assert {c["where"] for c in careful_res["cases"]} == set(ev.INJECTION_WHERE)
    assert all(c["dirty_by"] == "model" for c in careful_res["cases"])
    # A model that obeys whatever it reads: the withheld instruction text never reaches it ...
    naive_res = ev.injection_suite(FakeModel(naive, "fake-naive"), cands, n=24, echo=lambda _s: None)
    assert naive_res["passed"] == naive_res["total"] == 24
    assert not any(c["payload_visible"] for c in naive_res["cases"])
    # ... and without the quarantine the suite catches it (the suite can fail).
    import agent.explain as ax
    import prompts

    monkeypatch.setattr(prompts, "instruction_marker", lambda _text: None)
    monkeypatch.setattr(ax, "instruction_marker", lambda _text: None)
    exposed = ev.injection_suite(ProbModel(naive, "fake-naive"), cands, n=24, echo=lambda _s: None)
    assert exposed["passed"] < exposed["total"]
    # Each row keeps both sides' label/severity distributions; a failure names how far the model moved.
    failed = next(c for c in exposed["cases"] if not c["passed"] and c["clean"][0] != c["dirty"][0])
    assert failed["clean_model"]["label"] == {failed["clean"][0]: 1.0}
    assert failed["dirty_model"]["label"] == {failed["dirty"][0]: 1.0}
    clean_p, dirty_p = (1.0 if failed[k][0] == "anomaly" else 0.0 for k in ("clean", "dirty"))
    assert f"model P(anomaly) {clean_p:.2f} -> {dirty_p:.2f}" in ev._model_shift(failed)
    assert ev._model_shift({"clean_model": {}, "dirty_model": failed["dirty_model"]}) == ""


class ProbModel(FakeModel):
    """Reports its answer's label and severity as certain, as a backend with choice_probs does."""

    def generate(self, messages: Sequence[Message], schema: dict[str, Any] | None = None, max_tokens: int = 384,
                 temperature: float = 0.0) -> Message:
        reply = super().generate(messages, schema, max_tokens, temperature)
        a = json.loads(reply.content)
        return reply.model_copy(update={"choice_probs": {"label": {a["label"]: 1.0},
                                                         "severity": {str(a["severity"]): 1.0}}})


def test_run_without_data_writes_json_and_markdown(tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "eval_explain.json"
    res = ev.run(None, out, model=FakeModel(careful, "fake-careful"), knowledge=False, injection_cases_n=20,
                 echo=lines.append)
    assert res["hdfs_skipped"] and res["rules"]["passed"] == res["rules"]["total"] >= 20
    assert res["injection"]["passed"] == res["injection"]["total"] == 20
    saved = json.loads(out.read_text())
    assert saved["rules"]["total"] == res["rules"]["total"] and saved["overhead"]["model_s"] >= 0
    text = "\n".join(lines)
    assert "Rule suite" in text and "Injection suite" in text and "passed" in text


def test_percentile_and_overhead() -> None:
    from eval.results import percentile

    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([], 0.5) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.9) == 4.0
    o = ev.overhead({"retrieval_s": 0.1, "prompt_s": 0.1, "validate_s": 0.05, "model_s": 1.0})
    assert o["share_of_model_time"] == pytest.approx(0.25)


def test_hdfs_part_takes_every_alert_of_the_stale_detector(tmp_path: Path) -> None:
    """Alerts mode: every test-part session the detector flags is explained, plus unflagged ones."""
    import eval.hdfs
    from detectors.registry import make_detector
    from finetune.dataset import synth_log_data

    data = synth_log_data(tmp_path, n_blocks=160, anomaly_rate=0.2, seed=5)

    def reading(messages: Sequence[Message], schema: dict[str, Any] | None) -> str:
        user = "\n".join(m.content for m in messages if m.role == "user").lower()
        if "exception" in user or "error" in user:
            return _answer(schema)
        return _answer(schema, label="normal", severity=0, confidence=0.9, summary="nothing failed")

    # The alerts, computed independently of hdfs_part.
    split = eval.hdfs.make_split(data, 0.5)
    test_ids = set(data.order[int(len(data.order) * ev.TEST_FROM):])
    det = make_detector("log-ensemble")
    det.fit(split.train_normal)
    test = [s for s in split.test if s.id in test_ids]
    alerts = {s.id for s, sc in zip(test, det.score(test)) if float(sc) > float(det.threshold_)}
    assert alerts, "the synthetic test part must raise alerts"

    res = ev.hdfs_part(ev.HDFSPrep(data), FakeModel(reading, "fake-reading"), None, limit=len(alerts) + 5, fit_fraction=0.5,
                       alerts=True, weights=ev.DecisionWeights(), echo=lambda _s: None)
    rows = {r["block"]: r for r in res["rows"]}
    assert alerts <= set(rows) <= test_ids and len(rows) == min(len(test), len(alerts) + 5)
    assert res["detector_flagged"] == len(alerts) and res["selection"] == "alerts"
    assert res["detector_false_alarms"] == sum(not data.labels[b] for b in alerts)
    assert res["false_alarms_rejected"] == sum(r["detector"] and not r["truth"] and r["label"] == "normal"
                                               for r in rows.values())
    assert 0.0 <= res["accuracy"] <= 1.0 and res["valid_cited"] == len(rows)


def test_calibration_sessions_are_a_stable_half_of_the_slice_and_never_test() -> None:
    from eval.hdfs import CALIBRATION_SLICE, calibration_blocks

    order = [f"blk_{i * 7919 % 100003}" for i in range(1000)]
    reserved = calibration_blocks(order)
    lo, hi = CALIBRATION_SLICE
    window = set(order[int(len(order) * lo):int(len(order) * hi)])
    assert reserved <= window and 0.35 < len(reserved) / len(window) < 0.65
    # The choice depends on the block id only: another order of the same window keeps it.
    shuffled = order[:int(len(order) * lo)] + sorted(window) + order[int(len(order) * hi):]
    assert calibration_blocks(shuffled) == reserved
    assert not reserved & set(order[int(len(order) * ev.TEST_FROM):])
