"""Rules: the predicate language (validation and interpreter), the compiler, the model hook and the RuleBook.

No model and no Chroma here: rules must work (and be fast) without the embedder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from detectors.records import Candidate, Evidence
from knowledge.rules import (
    MAX_DEPTH,
    MAX_NODES,
    Effect,
    PredicateError,
    Rule,
    RuleBook,
    RuleNotFound,
    apply_rules,
    compile_rule,
    evaluate,
    matches,
    parse_predicate,
    predicate_json,
    resolve,
    severity_value,
)


def log_candidate(reason: str = "unseen_template", events: int = 12, detector: str = "counts",
                  templates: tuple[str, ...] = ("Receiving block <*> src: <*> dest: <*>",),
                  source: str = "data/hdfs.log") -> Candidate:
    return Candidate(
        id=f"hdfs.log:blk_{events}", source=source, modality="logs",
        locator={"sequence": f"blk_{events}", "first_line": 1, "last_line": 40, "events": events},
        score=2.5, threshold=1.0, detector=detector,
        evidence=(
            Evidence(id="E1", kind="log_lines", summary="lines with templates never seen",
                     data={"reason": reason, "lines": [3, 4], "templates": list(templates)}),
            Evidence(id="E2", kind="log_lines", summary="count deviation", data={"reason": "count_deviation"}),
        ),
    )


def ts_candidate(series: str = "P-1", top: str = "P-1") -> Candidate:
    return Candidate(
        id=f"smap:{series}:100-160", source="smap", modality="timeseries",
        locator={"series": series, "t0": "100", "t1": "160", "severity": "high", "top_variable": top},
        score=0.8, threshold=0.5, detector="residual",
        evidence=(Evidence(id="E1", kind="segment", summary="level shift",
                           data={"top_variables": [{"name": top, "share": 0.9}], "severity": "high"}),),
    )


# ------------------------------------------------------------------------- predicate language

def test_example_predicate_from_the_issue_validates_and_evaluates() -> None:
    node = parse_predicate('{"all": [{"field": "evidence.reason", "op": "eq", "value": "unseen_template"},'
                           ' {"field": "locator.events", "op": "gt", "value": 10}]}')
    assert evaluate(node, log_candidate(events=12))
    assert not evaluate(node, log_candidate(events=8))
    assert not evaluate(node, log_candidate(reason="other"))
    assert parse_predicate(predicate_json(node)) == node  # JSON round trip


@pytest.mark.parametrize("raw, why", [
    ({"field": "foo", "op": "eq", "value": 1}, "unknown field"),
    ({"field": "score.x", "op": "eq", "value": 1}, "no sub-fields"),
    ({"field": "locator", "op": "eq", "value": 1}, "needs a key"),
    ({"field": "evidence.summary.x", "op": "eq", "value": 1}, "no sub-fields"),
    ({"field": "score", "op": "eval", "value": 1}, "Input should be"),
    ({"field": "score", "op": "gt", "value": "high"}, "needs a number"),
    ({"field": "score", "op": "gt", "value": True}, "needs a number"),
    ({"field": "detector", "op": "in", "value": "counts"}, "needs a list"),
    ({"field": "detector", "op": "eq", "value": ["a"]}, "single value"),
    ({"field": "evidence.summary", "op": "matches", "value": "(a+)+$"}, "nested quantifier"),
    ({"field": "evidence.summary", "op": "matches", "value": "x" * 201}, "regex of 1..200"),
    ({"field": "evidence.summary", "op": "matches", "value": "("}, "invalid regex"),
    ({"field": "modality", "op": "eq", "value": "audio"}, "modality is one of"),
    ({"field": "evidence.kind", "op": "in", "value": ["log_lines", "smell"]}, "evidence.kind is one of"),
    ({"field": "score", "op": "gt", "value": 1, "extra": 2}, "expected"),
    ({"all": []}, "non-empty list"),
    ({"any": {"field": "score"}}, "non-empty list"),
    ({"not": [1]}, "expected an object"),
    ({"all": [{"field": "score", "op": "gt", "value": 1}], "any": []}, "expected"),
    ([{"field": "score", "op": "gt", "value": 1}], "expected an object"),
    ("{not json", "not JSON"),
])
def test_invalid_predicates_are_rejected_with_a_reason(raw: Any, why: str) -> None:
    with pytest.raises(PredicateError, match=why.replace("(", r"\(").replace(".", r"\.")):
        parse_predicate(raw if isinstance(raw, str) else json.dumps(raw))


def test_depth_and_size_are_capped() -> None:
    leaf: dict[str, Any] = {"field": "score", "op": "gt", "value": 0}
    deep = leaf
    for _ in range(MAX_DEPTH):
        deep = {"not": deep}
    with pytest.raises(PredicateError, match="deeper"):
        parse_predicate(deep)
    wide = {"any": [{"all": [leaf] * 30} for _ in range(3)]}
    assert 3 * 30 > MAX_NODES
    with pytest.raises(PredicateError, match="more than"):
        parse_predicate(wide)


def test_values_are_data_never_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    node = parse_predicate({"any": [{"field": "detector", "op": "eq", "value": payload},
                                    {"field": "evidence.summary", "op": "contains", "value": payload},
                                    {"field": "source", "op": "matches", "value": "__import__"}]})
    assert not evaluate(node, log_candidate())
    assert not marker.exists()


def test_interpreter_semantics() -> None:
    c = log_candidate(templates=("Receiving block <*> src: <*> dest: <*>", "PacketResponder <*> terminating"))
    ok = lambda raw: evaluate(parse_predicate(raw), c)  # noqa: E731
    # any evidence item may satisfy a condition; list values are searched element by element
    assert ok({"field": "evidence.reason", "op": "eq", "value": "count_deviation"})
    assert ok({"field": "evidence.data.reason", "op": "in", "value": ["x", "unseen_template"]})
    assert ok({"field": "evidence.templates", "op": "contains", "value": "packetresponder"})  # case-insensitive
    assert ok({"field": "evidence.templates", "op": "eq", "value": "PacketResponder <*> terminating"})
    assert ok({"field": "evidence.kind", "op": "eq", "value": "log_lines"})
    assert ok({"field": "evidence.lines", "op": "eq", "value": 4})
    assert ok({"field": "evidence_count", "op": "eq", "value": 2})
    assert ok({"field": "score_ratio", "op": "ge", "value": 2.5})
    assert ok({"field": "modality", "op": "eq", "value": "logs"})
    assert ok({"field": "source", "op": "matches", "value": r"hdfs\.log$"})
    assert ok({"field": "locator.events", "op": "le", "value": 12.0})
    # ne is "not eq"; a missing field satisfies nothing but ne
    assert not ok({"field": "evidence.reason", "op": "ne", "value": "unseen_template"})
    assert ok({"field": "locator.nope", "op": "ne", "value": 1})
    assert not ok({"field": "locator.nope", "op": "eq", "value": 1})
    assert not ok({"field": "locator.nope", "op": "gt", "value": 1})
    # numbers only compare with numbers
    assert not ok({"field": "detector", "op": "gt", "value": 1})
    assert ok({"not": {"field": "detector", "op": "eq", "value": "iforest"}})
    assert ok({"any": [{"field": "score", "op": "lt", "value": 0}, {"field": "score", "op": "gt", "value": 2}]})
    assert not ok({"all": [{"field": "score", "op": "lt", "value": 0}, {"field": "score", "op": "gt", "value": 2}]})
    # nested paths through lists of dicts
    t = ts_candidate(top="T-3")
    assert evaluate(parse_predicate({"field": "evidence.top_variables.name", "op": "eq", "value": "T-3"}), t)
    assert resolve("evidence.top_variables.share", t) == [0.9]


# ------------------------------------------------------------------------- compiler

@pytest.mark.parametrize("text, effect, severity, hit, miss", [
    ("Unseen templates are at least high severity", Effect.RAISE_SEVERITY, 3,
     log_candidate(), log_candidate(reason="count_deviation")),
    ("Anomalies in channel P-1 are normal.", Effect.SET_NORMAL, 0, ts_candidate("P-1"), ts_candidate("T-1", "T-1")),
    ("Sessions with more than 50 events are at least medium", Effect.RAISE_SEVERITY, 2,
     log_candidate(events=51), log_candidate(events=50)),
    ("Template 'Receiving block <*> src: <*> dest: <*>' is expected behaviour", Effect.SET_NORMAL, 0,
     log_candidate(), log_candidate(templates=("Deleting block <*> file <*>",))),
    ("Lower the severity of anomalies from the iforest detector to low", Effect.LOWER_SEVERITY, 1,
     log_candidate(detector="iforest"), log_candidate()),
    ("Log anomalies with a score above 2 are an anomaly of high severity", Effect.DEFINE_ANOMALY, 3,
     log_candidate(), ts_candidate()),
    ("Raise time series anomalies on variable T-1 to critical", Effect.RAISE_SEVERITY, 4,
     ts_candidate("T-1", "T-1"), log_candidate()),
    ("Anomalies from detector counts are at most low", Effect.LOWER_SEVERITY, 1,
     log_candidate(), log_candidate(detector="deeplog")),
    # "log" inside a name is part of the name, not the logs modality
    ("Anomalies from the log-ensemble detector are at most low", Effect.LOWER_SEVERITY, 1,
     log_candidate(detector="log-ensemble"), log_candidate()),
    ("Candidates in file synth.log are expected", Effect.SET_NORMAL, 0,
     log_candidate(source="synth.log"), log_candidate()),
])
def test_common_phrasings_compile(text: str, effect: Effect, severity: int, hit: Candidate, miss: Candidate) -> None:
    compiled = compile_rule(text)
    assert compiled.method == "pattern", compiled.note
    assert (compiled.effect, compiled.severity) == (effect, severity)
    assert compiled.predicate is not None
    assert evaluate(compiled.predicate, hit)
    assert not evaluate(compiled.predicate, miss)


@pytest.mark.parametrize("text, effect", [
    # a condition with words the patterns do not know must not be compiled into a broader one
    ("Unseen templates during the nightly backup window are normal", Effect.SET_NORMAL),
    ("If the DataNode was being decommissioned, replication warnings are expected", Effect.SET_NORMAL),
    ("Power channels drop during eclipse; that is fine unless the drop exceeds 20 percent", None),
])
def test_rules_the_patterns_do_not_understand_stay_text(text: str, effect: Effect | None) -> None:
    compiled = compile_rule(text)
    assert compiled.predicate is None and compiled.method == "text"
    assert compiled.effect == effect
    assert "not compiled" in compiled.note


def test_empty_rule_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        compile_rule("  . ")


def test_model_hook_is_validated() -> None:
    text = "Replication warnings while a DataNode is decommissioned are normal"
    prompts: list[str] = []

    def good(prompt: str) -> str:
        prompts.append(prompt)
        return ('Sure:\n```json\n{"effect": "set_normal", "severity": 0, "predicate": '
                '{"field": "evidence.summary", "op": "contains", "value": "decommission"}}\n```')

    compiled = compile_rule(text, propose=good)
    assert compiled.method == "model" and compiled.effect is Effect.SET_NORMAL
    assert prompts and text in prompts[0] and "evidence.reason" in prompts[0]

    bad_answers = [
        "no idea",
        '{"effect": "set_normal", "predicate": {"field": "os.system", "op": "eq", "value": "rm"}}',
        '{"effect": "explode", "predicate": null}',
        '{"effect": "set_normal", "predicate": {"field": "score", "op": "gt", "value": 1}, "code": "x"}',
    ]
    for answer in bad_answers:
        compiled = compile_rule(text, propose=lambda _p, a=answer: a)
        assert compiled.predicate is None and compiled.method == "text", answer
        assert "rejected" in compiled.note, compiled.note

    def broken(_prompt: str) -> str:
        raise TimeoutError("model down")

    compiled = compile_rule(text, propose=broken)
    assert compiled.predicate is None and "model down" in compiled.note

    called: list[str] = []
    compile_rule("Unseen templates are at least high severity", propose=lambda p: called.append(p) or "{}")
    assert not called, "the model is only asked when the patterns fail"


def test_severity_names() -> None:
    assert [severity_value(x) for x in ("none", "LOW", "medium", "High", "critical", 2, "3")] == [0, 1, 2, 3, 4, 2, 3]
    for bad in ("severe", 5, -1, True):
        with pytest.raises(ValueError):
            severity_value(bad)


# ------------------------------------------------------------------------- rule book

def test_rulebook_ids_versions_persistence(tmp_path: Path) -> None:
    book = RuleBook(tmp_path / "kb")
    assert book.rules_version == "none" and book.list() == []
    r1 = book.add("Unseen templates are at least high severity")
    r2 = book.add("Anomalies in channel P-1 are normal")
    r3 = book.add("Replication warnings during decommissioning are normal")
    assert [r.id for r in book.list()] == ["R-001", "R-002", "R-003"]
    assert (r1.version, r1.effect, r1.severity, r1.compiled) == (1, Effect.RAISE_SEVERITY, 3, True)
    assert not r3.compiled and book.text_rules() == [r3]
    assert book.add("Unseen  templates are at least high severity") == r1  # same text: same rule
    v3 = book.rules_version

    again = RuleBook(tmp_path / "kb" / "rules.json")
    assert again.list() == book.list() and again.rules_version == v3

    r1b = book.update("R-001", text="Unseen templates are at least critical")
    assert (r1b.id, r1b.version, r1b.severity, r1b.created) == ("R-001", 2, 4, r1.created)
    assert book.rules_version != v3 and book.history[-1] == r1

    removed = book.remove(r2.id)
    assert removed == r2 and [r.id for r in book.list()] == ["R-001", "R-003"]
    with pytest.raises(RuleNotFound):
        book.remove(r2.id)
    r4 = book.add("Anomalies in channel P-1 are normal")
    assert r4.id == "R-004", "ids are never reused"

    raw = json.loads((tmp_path / "kb" / "rules.json").read_text())
    assert raw["format"] == 1 and raw["rules_version"] == book.rules_version
    assert [r["id"] for r in raw["rules"]] == ["R-001", "R-003", "R-004"]
    assert {(r["id"], r["version"]) for r in raw["history"]} == {("R-001", 1), ("R-002", 1)}
    assert RuleBook(tmp_path / "kb").list() == book.list()


def test_rulebook_overrides_and_manual_predicates(tmp_path: Path) -> None:
    book = RuleBook(tmp_path)
    manual = book.add("Blocks of the benchmark job are normal",
                      predicate={"field": "source", "op": "contains", "value": "benchmark"})
    assert manual.method == "manual" and manual.effect is Effect.SET_NORMAL and manual.compiled
    forced = book.add("Watch for anything odd on the gateway", effect="define_anomaly", severity="high")
    assert (forced.effect, forced.severity, forced.compiled) == (Effect.DEFINE_ANOMALY, 3, False)
    with pytest.raises(PredicateError):
        book.add("bad", predicate={"field": "nope", "op": "eq", "value": 1})
    with pytest.raises(ValueError):
        book.add("x" * 1001)
    with pytest.raises(ValueError):
        Rule(id="R-1", version=1, text="t", created="c", updated="u")  # id format
    assert len(book) == 2


def test_changing_rules_changes_decisions_without_retraining(tmp_path: Path) -> None:
    book = RuleBook(tmp_path)
    c = log_candidate(events=30)
    assert apply_rules(book.list(), c, 2).label == "unchanged"

    general = book.add("Unseen templates are at least high severity")
    d = apply_rules(book.list(), c, 2)
    assert (d.label, d.severity, d.rule_ids) == ("unchanged", 3, (general.id,))

    exception = book.add("Sessions with more than 20 events are normal")
    d = apply_rules(book.list(), c, 2)
    assert (d.label, d.severity, d.rule_ids) == ("normal", 0, (general.id, exception.id))
    assert book.matching(c) == [general, exception]
    assert not matches(exception, log_candidate(events=5))

    book.remove(exception.id)
    book.add("Anomalies from detector counts are at most low")
    d = apply_rules(book.list(), c, 2)
    assert (d.label, d.severity) == ("unchanged", 1)

    book.add("Treat cracks as critical severity anomalies")  # compiled, but does not match a log candidate
    assert apply_rules(book.list(), c, 2).severity == 1
    text_only = book.add("Replication warnings during decommissioning are normal")
    assert text_only.id not in apply_rules(book.list(), c, 2).rule_ids
