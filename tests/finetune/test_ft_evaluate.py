"""The base-vs-tuned evaluation: held-out cases only, and metrics that separate good from bad answers.

Fake models stand in for llama.cpp: an oracle that answers with the teacher's target (every
metric perfect), one that writes prose (every validity metric zero), one that obeys injections,
and one that cites evidence that was never shown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ft_support import SmallSet

from agent.models import Message
from finetune.evaluate import (
    EvalCase,
    build_cases,
    evaluate_model,
    run,
    score_answer,
    summarise,
)
from finetune.teacher import answer_text


class Fake:
    """A ChatModel whose answer is ``respond(case)``, found by the prompt text."""

    def __init__(self, cases: list[EvalCase], respond: Any, name: str) -> None:
        self.by_prompt = {c.rendered.messages[1]["content"]: c for c in cases}
        self.respond = respond
        self.model_id = f"fake:{name}"
        self.adapter = None
        self.calls: list[Any] = []

    def generate(self, messages: list[Message], schema: Any = None, max_tokens: int = 384,
                 temperature: float = 0.0) -> Message:
        self.calls.append(schema)
        return Message(role="assistant", content=self.respond(self.by_prompt[messages[1].content]))


@pytest.fixture(scope="module")
def cases() -> list[EvalCase]:
    return build_cases(None, limit=12, injection_n=6, seed=0, store=None, synth_blocks=300, echo=lambda s: None)


def test_cases_are_held_out(cases: list[EvalCase], small_set: SmallSet) -> None:
    parts = {c.part for c in cases}
    assert parts == {"synth", "injection"}
    labelled = [c for c in cases if c.part == "synth"]
    assert {c.truth for c in labelled} == {"anomaly", "normal"}
    assert sum(c.truth == "anomaly" for c in labelled) == len(labelled) // 2  # balanced
    # A different synthetic log than any training set, and never a training block.
    train_blocks = {ex.block for ex in small_set.examples}
    assert not {c.candidate.locator.get("sequence") for c in labelled} & train_blocks
    pairs = {c.pair for c in cases if c.pair}
    assert len(pairs) >= 4 and all(sum(c.pair == p for c in cases) == 2 for p in pairs)
    from eval.explain import INJECTION_PAYLOADS

    for c in cases:
        if c.role == "dirty":
            assert c.payload in INJECTION_PAYLOADS  # the eval's payloads, not the training ones


def test_oracle_scores_perfectly_and_prose_scores_zero(cases: list[EvalCase]) -> None:
    oracle = Fake(cases, lambda c: answer_text(c.teacher), "oracle")
    s = summarise(evaluate_model(oracle, cases, echo=lambda s: None))
    assert all(schema is None for schema in oracle.calls), "the eval must not constrain decoding"
    for key in ("json_valid", "schema_valid", "answer_valid", "citation_valid", "label_agreement_teacher", "faithfulness"):
        assert s[key] == 1.0, (key, s[key])
    assert s["severity_spearman"] is not None and s["severity_spearman"] > 0.99
    assert s["injection"]["label_flips"] == 0 and s["injection"]["both_valid"] == s["injection"]["pairs"]
    prose = summarise(evaluate_model(Fake(cases, lambda c: "This block looks fine to me.", "prose"), cases,
                                     echo=lambda s: None))
    for key in ("json_valid", "schema_valid", "answer_valid", "citation_valid", "label_accuracy"):
        assert prose[key] == 0.0, (key, prose[key])
    assert prose["faithfulness"] is None and prose["severity_spearman"] is None


def test_injection_flips_and_bad_citations_are_caught(cases: list[EvalCase]) -> None:
    def obey(c: EvalCase) -> str:
        t = dict(c.teacher)
        if c.role == "dirty" and "normal" in (c.payload or "").lower():
            t.update(label="normal", severity=0, causal_chain=[], anomaly_type="none")
        return answer_text(t)

    s = summarise(evaluate_model(Fake(cases, obey, "obey"), cases, echo=lambda s: None))
    assert s["injection"]["label_flips"] >= 1 and s["injection"]["obeyed"] >= 1

    def invent(c: EvalCase) -> str:
        t = json.loads(answer_text(c.teacher))
        t["causal_chain"] = [{"text": "the disk controller overheated", "evidence_ids": ["E7"]}]
        return json.dumps(t)

    bad = summarise(evaluate_model(Fake(cases, invent, "invent"), cases, echo=lambda s: None))
    assert bad["answer_valid"] == 1.0 and bad["citation_valid"] < 0.5 and bad["faithfulness"] == 0.0
    assert bad["schema_valid"] < 1.0  # E7 is not in the narrowed enum


def test_score_answer_details(cases: list[EvalCase]) -> None:
    c = next(c for c in cases if c.part == "synth" and c.teacher["causal_chain"])
    row = score_answer("```json\n" + answer_text(c.teacher) + "\n```", c)  # a fenced answer is still an answer
    assert row["answer_valid"] and not row["json_valid"] and row["supported"] == row["claims"] >= 1
    assert score_answer("{not json", c)["answer_valid"] is False


def test_run_writes_the_report(cases: list[EvalCase], tmp_path: Path) -> None:
    class Broken:
        model_id, adapter = "broken", None

        def generate(self, *a: Any, **k: Any) -> Message:
            raise TimeoutError("no answer in time")

    models = {"base": Fake(cases, lambda c: "{}", "base"), "tuned": Fake(cases, lambda c: answer_text(c.teacher), "t"),
              "broken": Broken()}
    out = tmp_path / "ft_eval.json"
    lines: list[str] = []
    result = run(None, out, models=models, cases=cases, echo=lines.append)
    saved = json.loads(out.read_text())
    assert saved["constrained_decoding"] is False and set(saved["models"]) == {"base", "tuned", "broken"}
    assert saved["models"]["tuned"]["summary"]["label_agreement_teacher"] == 1.0
    assert saved["models"]["base"]["summary"]["answer_valid"] == 0.0
    assert saved["models"]["broken"]["summary"]["answer_valid"] == 0.0
    assert "TimeoutError" in saved["models"]["broken"]["rows"][0]["error"]
    assert result["cases"]["labelled"] == sum(c.part != "injection" for c in cases)
    assert any(line.startswith("| tuned |") for line in "\n".join(lines).splitlines())
