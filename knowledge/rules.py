"""Natural-language anomaly rules, compiled where possible into a small validated predicate language.

A rule is an open-world definition written by a person ("unseen templates are at least high
severity", "anomalies in channel P-1 during calibration are normal"). Rules change verdicts
without retraining anything:

* ``raise_severity``: the verdict's severity is at least ``severity``;
* ``lower_severity``: the verdict's severity is at most ``severity``;
* ``set_normal``: the matched behaviour is expected: label normal, severity 0;
* ``define_anomaly``: the matched behaviour is an anomaly (at least ``severity``), even if
  no detector thought it was bad enough.

**Compilation.** :func:`compile_rule` first tries a handful of deterministic patterns for
common phrasings. It compiles only when it understood every content word of the condition,
so "unseen templates during the nightly backup are normal" is *not* compiled into the much
broader "unseen templates are normal". If the patterns fail and a ``propose`` callable is
given (the explainer plugs a model in), the model's JSON is parsed and validated exactly like
hand-written JSON. A rule that cannot be compiled keeps ``predicate=None`` and is given to the
model as text. Nothing is ever ``eval``-ed: predicates are data, read by a tiny interpreter.

**Predicate language** (JSON)::

    {"all": [{"field": "evidence.reason", "op": "eq", "value": "unseen_template"},
             {"field": "locator.events", "op": "gt", "value": 10}]}

Nodes: ``{"all": [...]}``, ``{"any": [...]}``, ``{"not": {...}}`` and conditions
``{"field", "op", "value"}`` with ops ``eq ne gt ge lt le contains in matches``. Fields are
paths over :class:`detectors.records.Candidate`: ``id source modality score threshold
detector score_ratio`` (score / threshold), ``evidence_count``, ``locator.<key>[.<key>]``, and
``evidence.<name>`` where name is ``id kind summary artifact`` or a key of the evidence
``data`` (``evidence.reason``, ``evidence.templates``, ``evidence.top_variables.name``...);
``evidence.data.<key>`` is accepted too. A path can resolve to several values (several
evidence items, list values): a condition holds when *any* value satisfies it, except ``ne``,
which is ``not eq``. A missing field satisfies nothing (but ``ne``). ``contains`` is a
case-insensitive substring test on strings (membership for non-strings); ``matches`` is a
Python regex (pattern at most 200 characters, no nested quantifiers) searched in the first
2,000 characters of the value.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from detectors.records import Candidate, EvidenceKind, Modality, Record

RULEBOOK_FILE = "rules.json"
RULE_ID_RE = re.compile(r"^R-\d{3,}$")
MAX_RULE_CHARS = 1000
MAX_DEPTH = 6
MAX_NODES = 64
MAX_PATTERN_CHARS = 200
MAX_MATCH_INPUT = 2000
MAX_IN_VALUES = 100
SEVERITY_NAMES: tuple[str, ...] = ("none", "low", "medium", "high", "critical")
"""Severity levels by value, as ``agent.records.Severity`` (0 none .. 4 critical)."""


class Effect(StrEnum):
    """What a rule does to a verdict when it matches."""

    RAISE_SEVERITY = "raise_severity"
    LOWER_SEVERITY = "lower_severity"
    SET_NORMAL = "set_normal"
    DEFINE_ANOMALY = "define_anomaly"


DEFAULT_SEVERITY: dict[Effect, int] = {
    Effect.RAISE_SEVERITY: 3,
    Effect.LOWER_SEVERITY: 1,
    Effect.SET_NORMAL: 0,
    Effect.DEFINE_ANOMALY: 2,
}


def severity_value(value: int | str) -> int:
    """0..4 from an int or a name (``"high"`` -> 3)."""
    if isinstance(value, bool):
        raise ValueError("severity must be 0..4 or a name, not a bool")
    if isinstance(value, int):
        if not 0 <= value <= 4:
            raise ValueError(f"severity must be 0..4, got {value}")
        return value
    name = str(value).strip().lower()
    if name.isdigit():
        return severity_value(int(name))
    if name not in SEVERITY_NAMES:
        raise ValueError(f"unknown severity {value!r}; one of {', '.join(SEVERITY_NAMES)} or 0..4")
    return SEVERITY_NAMES.index(name)


# =============================================================================== fields

TOP_FIELDS: dict[str, str] = {
    "id": "str", "source": "str", "modality": "str", "detector": "str",
    "score": "number", "threshold": "number", "score_ratio": "number", "evidence_count": "number",
}
EVIDENCE_ATTRS = ("id", "kind", "summary", "artifact")
_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
MAX_PATH_PARTS = 5


def check_field(path: str) -> str:
    """Validate a field path against the candidate's shape; returns it or raises ValueError."""
    if not isinstance(path, str) or not path:
        raise ValueError("field must be a non-empty string")
    parts = path.split(".")
    if len(parts) > MAX_PATH_PARTS or not all(_SEGMENT.match(p) for p in parts):
        raise ValueError(f"field {path!r} is not a path of at most {MAX_PATH_PARTS} names (letters, digits, _ -)")
    root = parts[0]
    if root in TOP_FIELDS:
        if len(parts) > 1:
            raise ValueError(f"field {root!r} has no sub-fields")
        return path
    if root == "locator":
        if len(parts) < 2:
            raise ValueError("field 'locator' needs a key, e.g. locator.events")
        return path
    if root == "evidence":
        if len(parts) < 2:
            raise ValueError("field 'evidence' needs a name, e.g. evidence.reason or evidence.kind")
        if parts[1] == "data" and len(parts) < 3:
            raise ValueError("field 'evidence.data' needs a key, e.g. evidence.data.reason")
        if parts[1] in EVIDENCE_ATTRS and len(parts) > 2:
            raise ValueError(f"field 'evidence.{parts[1]}' has no sub-fields")
        return path
    known = ", ".join([*TOP_FIELDS, "locator.<key>", "evidence.<name>"])
    raise ValueError(f"unknown field {path!r}; known: {known}")


def _flatten(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(v)
        else:
            out.append(v)
    return out


def _walk(values: list[Any], keys: Sequence[str]) -> list[Any]:
    for key in keys:
        nxt: list[Any] = []
        for v in _flatten(values):
            if isinstance(v, dict) and key in v:
                nxt.append(v[key])
        values = nxt
    return values


def resolve(path: str, candidate: Candidate) -> list[Any]:
    """Every value ``path`` names in ``candidate`` (lists flattened one level); [] when absent."""
    parts = path.split(".")
    root = parts[0]
    if root in TOP_FIELDS:
        if root == "score_ratio":
            return [candidate.score / candidate.threshold] if candidate.threshold > 0 else []
        if root == "evidence_count":
            return [len(candidate.evidence)]
        value = getattr(candidate, root)
        return [value.value if isinstance(value, StrEnum) else value]
    if root == "locator":
        return _flatten(_walk([candidate.locator], parts[1:]))
    # evidence
    name = parts[1]
    if name in EVIDENCE_ATTRS:
        vals = [getattr(ev, name) for ev in candidate.evidence]
        return [v.value if isinstance(v, StrEnum) else v for v in vals if v is not None]
    keys = parts[2:] if name == "data" else parts[1:]
    return _flatten(_walk([ev.data for ev in candidate.evidence], keys))


# =============================================================================== predicates

Op = Literal["eq", "ne", "gt", "ge", "lt", "le", "contains", "in", "matches"]
Scalar = Union[bool, int, float, str, None]
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)\s*[+*{]")


class _Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Cond(_Node):
    """``{"field": ..., "op": ..., "value": ...}``."""

    field: str
    op: Op
    value: Scalar | list[Scalar]

    @field_validator("field")
    @classmethod
    def _field(cls, v: str) -> str:
        return check_field(v)

    @model_validator(mode="after")
    def _value_fits_op(self) -> "Cond":
        v = self.value
        if self.op in ("gt", "ge", "lt", "le"):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"op {self.op!r} needs a number, got {v!r}")
        elif self.op == "in":
            if not isinstance(v, list) or not v or len(v) > MAX_IN_VALUES:
                raise ValueError(f"op 'in' needs a list of 1..{MAX_IN_VALUES} values")
        elif isinstance(v, list):
            raise ValueError(f"op {self.op!r} needs a single value, not a list")
        if self.op == "matches":
            if not isinstance(v, str) or not v or len(v) > MAX_PATTERN_CHARS:
                raise ValueError(f"op 'matches' needs a regex of 1..{MAX_PATTERN_CHARS} characters")
            if _NESTED_QUANTIFIER.search(v):
                raise ValueError(f"regex {v!r} has a nested quantifier (catastrophic backtracking risk)")
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regex {v!r}: {exc}") from None
        if self.op == "contains" and (v is None or v == ""):
            raise ValueError("op 'contains' needs a non-empty value")
        # Values that can never match a known enumeration are mistakes, not rules.
        allowed = {"modality": {m.value for m in Modality}, "evidence.kind": {k.value for k in EvidenceKind}}.get(self.field)
        if allowed and self.op in ("eq", "ne", "in"):
            for item in (v if isinstance(v, list) else [v]):
                if item not in allowed:
                    raise ValueError(f"{self.field} is one of {sorted(allowed)}, not {item!r}")
        return self


class All(_Node):
    """``{"all": [...]}``: every child holds."""

    all: list["Predicate"] = Field(min_length=1, max_length=32)


class AnyOf(_Node):
    """``{"any": [...]}``: some child holds."""

    any: list["Predicate"] = Field(min_length=1, max_length=32)


class Not(_Node):
    """``{"not": {...}}``: the child does not hold."""

    not_: "Predicate" = Field(alias="not")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


Predicate = Union[Cond, All, AnyOf, Not]
All.model_rebuild()
AnyOf.model_rebuild()
Not.model_rebuild()


class PredicateError(ValueError):
    """A predicate that does not validate; the message says where and why."""


def _children(node: Predicate) -> list[Predicate]:
    if isinstance(node, All):
        return list(node.all)
    if isinstance(node, AnyOf):
        return list(node.any)
    if isinstance(node, Not):
        return [node.not_]
    return []


def _check_size(node: Predicate) -> None:
    count, stack = 0, [(node, 1)]
    while stack:
        cur, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise PredicateError(f"predicate nested deeper than {MAX_DEPTH}")
        if count > MAX_NODES:
            raise PredicateError(f"predicate has more than {MAX_NODES} nodes")
        stack.extend((c, depth + 1) for c in _children(cur))


def _parse_node(raw: Any, where: str = "$", depth: int = 1) -> Predicate:
    if depth > MAX_DEPTH:
        raise PredicateError(f"predicate nested deeper than {MAX_DEPTH}")
    if not isinstance(raw, dict):
        raise PredicateError(f"{where}: expected an object, got {type(raw).__name__}")
    keys = set(raw)
    try:
        if keys == {"all"} or keys == {"any"}:
            key = next(iter(keys))
            items = raw[key]
            if not isinstance(items, list) or not items:
                raise PredicateError(f"{where}.{key}: expected a non-empty list")
            children = [_parse_node(c, f"{where}.{key}[{i}]", depth + 1) for i, c in enumerate(items)]
            return All(all=children) if key == "all" else AnyOf(any=children)
        if keys == {"not"}:
            return Not(not_=_parse_node(raw["not"], f"{where}.not", depth + 1))
        if keys == {"field", "op", "value"}:
            return Cond.model_validate(raw)
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise PredicateError(f"{where}: {msgs}") from None
    raise PredicateError(f"{where}: expected {{all|any: [...]}}, {{not: {{...}}}} or "
                         f"{{field, op, value}}, got keys {sorted(keys)}")


def parse_predicate(raw: str | dict[str, Any] | Predicate) -> Predicate:
    """Validate a predicate given as JSON text, a dict, or an already-built node."""
    if isinstance(raw, (Cond, All, AnyOf, Not)):
        _check_size(raw)
        return raw
    if isinstance(raw, (str, bytes)):
        if len(raw) > 20_000:
            raise PredicateError("predicate JSON longer than 20,000 characters")
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PredicateError(f"not JSON: {exc}") from None
    node = _parse_node(raw)
    _check_size(node)
    return node


def predicate_json(node: Predicate) -> dict[str, Any]:
    """The JSON form of a predicate (what :func:`parse_predicate` reads)."""
    return node.model_dump(by_alias=True)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _eq(a: Any, b: Any) -> bool:
    na, nb = _num(a), _num(b)
    if na is not None and nb is not None:
        return na == nb
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _test(op: str, actual: Any, expected: Any) -> bool:
    if op == "eq":
        return _eq(actual, expected)
    if op in ("gt", "ge", "lt", "le"):
        a = _num(actual)
        if a is None:
            return False
        e = float(expected)
        return {"gt": a > e, "ge": a >= e, "lt": a < e, "le": a <= e}[op]
    if op == "in":
        return any(_eq(actual, e) for e in expected)
    if op == "contains":
        if isinstance(actual, str):
            return str(expected).lower() in actual.lower()
        return _eq(actual, expected)
    if op == "matches":
        if actual is None:
            return False
        return re.search(expected, str(actual)[:MAX_MATCH_INPUT]) is not None
    raise ValueError(f"unknown op {op!r}")  # pragma: no cover - validated before


def evaluate(node: Predicate, candidate: Candidate) -> bool:
    """Does ``candidate`` satisfy ``node``? A tiny interpreter: no code is ever evaluated."""
    if isinstance(node, All):
        return all(evaluate(c, candidate) for c in node.all)
    if isinstance(node, AnyOf):
        return any(evaluate(c, candidate) for c in node.any)
    if isinstance(node, Not):
        return not evaluate(node.not_, candidate)
    values = resolve(node.field, candidate)
    if node.op == "ne":
        return not any(_test("eq", v, node.value) for v in values)
    return any(_test(node.op, v, node.value) for v in values)


# =============================================================================== compiler

class CompiledRule(BaseModel):
    """What :func:`compile_rule` made of a text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    predicate: Predicate | None = None
    effect: Effect | None = None
    severity: int | None = Field(default=None, ge=0, le=4)
    method: Literal["pattern", "model", "text"] = "text"
    note: str = ""


_SEV = r"(none|low|medium|high|critical|[0-4])"
_EFFECTS: list[tuple[re.Pattern[str], Effect | None]] = [
    # "X is/are (expected|normal|benign|not an anomaly)", "X is expected behaviour"
    (re.compile(r"^(?P<cond>.+?)\s+(?:is|are|should\s+be|counts?\s+as)\s+(?:considered\s+)?(?:expected(?:\s+behaviou?r)?|"
                r"normal(?:\s+behaviou?r)?|benign|harmless|not\s+(?:an?\s+)?anomal(?:y|ies|ous))$", re.I), Effect.SET_NORMAL),
    (re.compile(r"^(?:ignore|treat\s+as\s+normal)\s+(?P<cond>.+)$", re.I), Effect.SET_NORMAL),
    # "X is at least high (severity)"
    (re.compile(rf"^(?P<cond>.+?)\s+(?:is|are|should\s+be|must\s+be)\s+(?:at\s+least|no\s+less\s+than|minimum)\s+"
                rf"(?:of\s+)?{_SEV}(?:\s+severity)?$", re.I), Effect.RAISE_SEVERITY),
    (re.compile(rf"^(?:raise|escalate)\s+(?:the\s+)?(?:severity\s+of\s+)?(?P<cond>.+?)\s+to\s+(?:at\s+least\s+)?{_SEV}"
                rf"(?:\s+severity)?$", re.I), Effect.RAISE_SEVERITY),
    (re.compile(rf"^(?P<cond>.+?)\s+(?:is|are|should\s+be|must\s+be)\s+(?:at\s+most|no\s+more\s+than|only)\s+"
                rf"{_SEV}(?:\s+severity)?$", re.I), Effect.LOWER_SEVERITY),
    (re.compile(rf"^(?:lower|reduce|downgrade)\s+(?:the\s+)?(?:severity\s+of\s+)?(?P<cond>.+?)\s+to\s+(?:at\s+most\s+)?"
                rf"{_SEV}(?:\s+severity)?$", re.I), Effect.LOWER_SEVERITY),
    # "X is/are (always) (an) anomaly/anomalies/anomalous (of high severity)"
    (re.compile(rf"^(?P<cond>.+?)\s+(?:is|are|should\s+be)\s+(?:always\s+)?(?:an?\s+)?(?:{_SEV}\s+severity\s+)?"
                rf"(?:anomal(?:y|ies|ous)|abnormal|faults?|defects?)(?:\s+(?:of|with)\s+{_SEV}\s+severity)?$", re.I),
     Effect.DEFINE_ANOMALY),
    (re.compile(rf"^(?:treat|flag|report|consider)\s+(?P<cond>.+?)\s+as\s+(?:an?\s+)?(?:{_SEV}\s+severity\s+)?"
                rf"(?:anomal(?:y|ies|ous)|abnormal|faults?|defects?)(?:\s+(?:of|with)\s+{_SEV}\s+severity)?$", re.I),
     Effect.DEFINE_ANOMALY),
]

_Q = r"[\"'`“”‘’]"
_CONDITIONS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], dict[str, Any]]]] = [
    (re.compile(rf"\btemplates?\s+{_Q}(?P<t>[^\"'`“”‘’]{{1,200}}){_Q}", re.I),
     lambda m: {"field": "evidence.templates", "op": "contains", "value": m["t"].strip()}),
    (re.compile(r"\btemplates?\s+(?:id\s+)?#?(?P<t>[A-Za-z0-9_]*\d[A-Za-z0-9_]*)\b", re.I),
     lambda m: {"field": "evidence.templates", "op": "contains", "value": m["t"]}),
    (re.compile(r"\b(?:unseen|new|unknown|never[- ]seen)\s+(?:log\s+)?templates?\b|\btemplates?\s+(?:never|not)\s+seen"
                r"(?:\s+(?:before|in\s+training))?", re.I),
     lambda m: {"field": "evidence.reason", "op": "eq", "value": "unseen_template"}),
    (re.compile(rf"\b(?:channel|series|variable|signal|sensor)\s+(?!(?:anomal\w*|is|are|with|and|in|of|on|the|that)\b){_Q}?(?P<v>[A-Za-z0-9][A-Za-z0-9_.:\-]{{0,63}}){_Q}?", re.I),
     lambda m: {"any": [{"field": "locator.series", "op": "eq", "value": m["v"]},
                        {"field": "locator.top_variable", "op": "eq", "value": m["v"]},
                        {"field": "evidence.top_variables.name", "op": "eq", "value": m["v"]}]}),
    (re.compile(rf"\b(?:from|by)\s+(?:the\s+)?(?:detector\s+{_Q}?(?P<d1>[A-Za-z0-9_.\-]+){_Q}?|{_Q}?(?P<d2>[A-Za-z0-9_.\-]+){_Q}?\s+detector)", re.I),
     lambda m: {"field": "detector", "op": "eq", "value": m["d1"] or m["d2"]}),
    (re.compile(r"\b(?:with\s+)?(?P<cmp>more\s+than|over|at\s+least|fewer\s+than|less\s+than|at\s+most)\s+"
                r"(?P<n>\d+)\s+(?:log\s+)?(?:events|lines|log\s+lines)\b", re.I),
     lambda m: {"field": "locator.events", "op": _CMP[" ".join(m["cmp"].lower().split())], "value": int(m["n"])}),
    (re.compile(r"\b(?:with\s+)?(?:a\s+|an\s+)?(?:anomaly\s+)?score\s+(?P<cmp>above|over|greater\s+than|more\s+than|at\s+least|"
                r"below|under|less\s+than|at\s+most)\s+(?P<n>\d+(?:\.\d+)?)", re.I),
     lambda m: {"field": "score", "op": _CMP[" ".join(m["cmp"].lower().split())], "value": float(m["n"])}),
    (re.compile(r"\b(?:in|from)\s+(?:source|file)\s+" + _Q + r"?(?P<s>[A-Za-z0-9_./\-]+?)" + _Q + r"?(?=\s|$)", re.I),
     lambda m: {"field": "source", "op": "contains", "value": m["s"]}),
    (re.compile(r"\b(?P<d>blowhole|break|crack|fray|uneven)s?\b", re.I),
     lambda m: {"any": [{"field": "evidence.defect", "op": "eq", "value": m["d"].capitalize()},
                        {"field": "evidence.label", "op": "eq", "value": m["d"].capitalize()}]}),
    # Last, after detector, source and template names have been consumed, and only as a word on
    # its own: the "log" in "log-ensemble" or "synth.log" is part of a name, not the modality.
    (re.compile(r"(?<![\w.\-/])(?P<m>logs?|time[- ]?series|telemetry|images?|video)(?![\w.\-/])", re.I),
     lambda m: {"field": "modality", "op": "eq", "value": _MODALITY_WORDS[m["m"].lower().replace("-", "").replace(" ", "")]}),
]
_MODALITY_WORDS = {"log": "logs", "logs": "logs", "timeseries": "timeseries", "telemetry": "timeseries",
                   "image": "image", "images": "image", "video": "video"}
_CMP = {"more than": "gt", "over": "gt", "above": "gt", "greater than": "gt", "at least": "ge",
        "fewer than": "lt", "less than": "lt", "below": "lt", "under": "lt", "at most": "le"}
_FILLER = frozenset("""
a an the any all every each of in on at to for from with and by that which who whose where when is are be been
was were it its this these those there their candidate candidates anomaly anomalies anomalous alert alerts alarm
alarms event events sessions session block blocks window windows line lines log logs message messages entry
entries detected flagged reported containing contain contains having has have show shows showing only always
any thing things case cases behaviour behavior pattern patterns data item items value values reading readings
""".split())


def _condition(text: str) -> tuple[Predicate | None, str]:
    """Compile a condition phrase, or (None, why) when some content word is not understood."""
    parts: list[dict[str, Any]] = []
    rest = text
    for pattern, build in _CONDITIONS:
        for m in list(pattern.finditer(rest)):
            parts.append(build(m))
        rest = pattern.sub(" ", rest)
    leftover = [w for w in re.findall(r"[A-Za-z0-9_]+", rest.lower()) if w not in _FILLER]
    if leftover:
        return None, f"not compiled: did not understand {' '.join(dict.fromkeys(leftover))!r}"
    if not parts:
        return None, "not compiled: no condition found"
    raw = parts[0] if len(parts) == 1 else {"all": parts}
    try:
        return parse_predicate(raw), ""
    except PredicateError as exc:  # pragma: no cover - patterns build valid predicates
        return None, f"not compiled: {exc}"


def _effect(text: str) -> tuple[Effect | None, int | None, str]:
    for pattern, effect in _EFFECTS:
        m = pattern.match(text)
        if m:
            sevs = [g for g in m.groups()[1:] if g]
            severity = severity_value(sevs[0]) if sevs else DEFAULT_SEVERITY[effect]
            return effect, severity, m["cond"]
    return None, None, text


PROPOSAL_INSTRUCTIONS = """Turn this anomaly rule into JSON, or say it cannot be.
Answer with one JSON object only: {"effect": E, "severity": S, "predicate": P}
E: one of raise_severity, lower_severity, set_normal, define_anomaly.
S: 0 none, 1 low, 2 medium, 3 high, 4 critical (set_normal: 0).
P: null if the rule cannot be checked on these fields, else a predicate:
  {"all": [P, ...]} | {"any": [P, ...]} | {"not": P} | {"field": F, "op": O, "value": V}
O: eq ne gt ge lt le contains in matches (in: a list; matches: a short regex).
F: id source modality(logs|timeseries|image|video) detector score threshold score_ratio evidence_count
   locator.<key> (e.g. locator.events, locator.series, locator.top_variable)
   evidence.id evidence.kind(log_lines|segment|region|frames|feature) evidence.summary
   evidence.<data key> (e.g. evidence.reason: unseen_template|count_deviation|..., evidence.templates,
   evidence.top_variables.name, evidence.defect)
Rule: """


def proposal_prompt(text: str) -> str:
    """The prompt a model gets to propose JSON for ``text`` (see :func:`compile_rule`)."""
    return PROPOSAL_INSTRUCTIONS + text.strip()


def _json_object(answer: str) -> dict[str, Any]:
    answer = answer.strip()
    fence = re.search(r"```(?:json)?\s*(\{.*\})\s*```", answer, re.S)
    if fence:
        answer = fence.group(1)
    elif not answer.startswith("{"):
        start, end = answer.find("{"), answer.rfind("}")
        if start < 0 or end < start:
            raise PredicateError("the proposal has no JSON object")
        answer = answer[start:end + 1]
    try:
        obj = json.loads(answer)
    except json.JSONDecodeError as exc:
        raise PredicateError(f"the proposal is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PredicateError("the proposal is not a JSON object")
    return obj


def _from_proposal(answer: str) -> CompiledRule:
    obj = _json_object(answer)
    unknown = set(obj) - {"effect", "severity", "predicate"}
    if unknown:
        raise PredicateError(f"unexpected keys in proposal: {sorted(unknown)}")
    try:
        effect = Effect(obj.get("effect")) if obj.get("effect") is not None else None
    except ValueError:
        raise PredicateError(f"unknown effect {obj.get('effect')!r}") from None
    try:
        severity = severity_value(obj["severity"]) if obj.get("severity") is not None else None
    except ValueError as exc:
        raise PredicateError(str(exc)) from None
    if effect is Effect.SET_NORMAL:
        severity = 0
    elif effect is not None and severity is None:
        severity = DEFAULT_SEVERITY[effect]
    predicate = parse_predicate(obj["predicate"]) if obj.get("predicate") is not None else None
    return CompiledRule(predicate=predicate, effect=effect, severity=severity,
                        method="model" if predicate is not None else "text",
                        note="" if predicate is not None else "the model found no checkable condition")


def compile_rule(text: str, propose: Callable[[str], str] | None = None) -> CompiledRule:
    """Compile a natural-language rule into a predicate and an effect, where possible.

    Args:
        text: The rule, e.g. ``"unseen templates are at least high severity"``.
        propose: Optional ``prompt -> answer`` callable (a model); used only when the patterns
            cannot compile the rule. Its answer must be the JSON described in
            :data:`PROPOSAL_INSTRUCTIONS`; it is validated like any predicate, and an invalid
            answer leaves the rule as text (the reason is in ``note``).

    Returns:
        A :class:`CompiledRule`; ``predicate`` is None for text-only rules.
    """
    clean = " ".join(text.split()).rstrip(".!;: ")
    if not clean:
        raise ValueError("empty rule")
    effect, severity, cond = _effect(clean)
    note = "not compiled: no effect phrase recognised (normal / at least|at most <severity> / anomaly)"
    if effect is not None:
        predicate, note = _condition(cond)
        if predicate is not None:
            return CompiledRule(predicate=predicate, effect=effect, severity=severity, method="pattern")
    if propose is not None:
        try:
            proposed = _from_proposal(propose(proposal_prompt(clean)))
        except PredicateError as exc:
            note = f"{note}; model proposal rejected: {exc}"
        except Exception as exc:  # a failing model must not lose the rule
            note = f"{note}; model proposal failed: {type(exc).__name__}: {exc}"
        else:
            if proposed.predicate is not None or effect is None:
                return proposed if proposed.effect is not None or effect is None else \
                    proposed.model_copy(update={"effect": effect, "severity": severity})
            note = f"{note}; {proposed.note}"
    return CompiledRule(predicate=None, effect=effect, severity=severity, method="text", note=note)


# =============================================================================== rules

class Rule(Record):
    """One rule, as stored.

    Attributes:
        id: ``R-001``...; never reused, also after removal.
        version: 1 when added, +1 on every update of the text or effect.
        text: The rule as written.
        predicate: The compiled condition (JSON form), or None: then the rule is given to the
            model as text and :func:`matches` is False.
        effect: What the rule does when it matches; None when not recognised (guidance text).
        severity: 0..4 for the effect (0 for set_normal).
        method: How it was compiled: pattern, model, or text (not compiled).
        note: Why it was not compiled, if it was not.
        created: When the first version was added (UTC, ISO 8601).
        updated: When this version was made.
    """

    id: str = Field(pattern=RULE_ID_RE.pattern)
    version: int = Field(ge=1)
    text: str = Field(min_length=1, max_length=MAX_RULE_CHARS)
    predicate: dict[str, Any] | None = None
    effect: Effect | None = None
    severity: int | None = Field(default=None, ge=0, le=4)
    method: Literal["pattern", "model", "text", "manual"] = "text"
    note: str = ""
    created: str
    updated: str

    @field_validator("predicate")
    @classmethod
    def _valid_predicate(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        return predicate_json(parse_predicate(value))

    @property
    def compiled(self) -> bool:
        """True when the rule can be checked by :func:`matches`."""
        return self.predicate is not None

    def node(self) -> Predicate | None:
        """The validated predicate tree."""
        return parse_predicate(self.predicate) if self.predicate is not None else None

    def describe(self) -> str:
        """One line for a CLI or a prompt."""
        eff = self.effect.value if self.effect else "guidance"
        sev = f" {SEVERITY_NAMES[self.severity]}" if self.severity is not None and self.effect else ""
        how = "compiled" if self.compiled else "text"
        return f"{self.id} v{self.version} [{eff}{sev}, {how}] {self.text}"


def matches(rule: Rule, candidate: Candidate) -> bool:
    """Does the compiled rule apply to ``candidate``? False for text-only rules."""
    node = rule.node()
    return node is not None and evaluate(node, candidate)


class RuleDecision(BaseModel):
    """The combined effect of the compiled rules that matched one candidate."""

    model_config = ConfigDict(frozen=True)

    label: Literal["anomaly", "normal", "unchanged"]
    severity: int = Field(ge=0, le=4)
    rule_ids: tuple[str, ...] = ()


def apply_rules(rules: Iterable[Rule], candidate: Candidate, severity: int) -> RuleDecision:
    """Apply matching compiled rules, in id order, to a proposed ``severity`` (0..4).

    raise_severity and define_anomaly lift the severity to at least the rule's value (and
    define_anomaly makes it an anomaly); lower_severity caps it; set_normal makes it normal with
    severity 0. A later rule overrides an earlier one where they disagree (set_normal vs
    define_anomaly), so a specific exception can be added after a general rule.
    """
    label: Literal["anomaly", "normal", "unchanged"] = "unchanged"
    sev = severity_value(severity)
    used: list[str] = []
    for rule in sorted(rules, key=_rule_order):
        if rule.effect is None or not matches(rule, candidate):
            continue
        used.append(rule.id)
        value = rule.severity if rule.severity is not None else DEFAULT_SEVERITY[rule.effect]
        if rule.effect is Effect.SET_NORMAL:
            label, sev = "normal", 0
        elif rule.effect is Effect.DEFINE_ANOMALY:
            label, sev = "anomaly", max(sev, value, 1)
        elif rule.effect is Effect.RAISE_SEVERITY:
            sev = max(sev, value)
            if label == "normal" and sev > 0:
                label = "anomaly"
        elif rule.effect is Effect.LOWER_SEVERITY:
            sev = min(sev, value)
    return RuleDecision(label=label, severity=sev, rule_ids=tuple(used))


def _rule_order(rule: Rule) -> int:
    return int(rule.id.split("-", 1)[1])


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


class RuleNotFound(KeyError):
    """No active rule has that id."""


class RuleBook:
    """Rules persisted as JSON (``rules.json`` in the store folder).

    Every change is written at once (atomically: a temp file then a rename). Removed rules and
    old versions stay in ``history``, so ids are never reused and a verdict's provenance can be
    traced to the exact rule text.

    Args:
        path: The JSON file, or a folder (then ``<folder>/rules.json``).
    """

    FORMAT = 1

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / RULEBOOK_FILE if path.is_dir() or not path.suffix else path
        self._rules: dict[str, Rule] = {}
        self._history: list[Rule] = []
        self._next = 1
        if self.path.exists():
            self._load()

    # ----------------------------------------------------------------- persistence
    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read rule book {self.path}: {exc}") from None
        if raw.get("format") != self.FORMAT:
            raise ValueError(f"rule book {self.path} has format {raw.get('format')!r}, expected {self.FORMAT}")
        self._rules = {r["id"]: Rule.model_validate(r) for r in raw.get("rules", [])}
        self._history = [Rule.model_validate(r) for r in raw.get("history", [])]
        self._next = int(raw.get("next_id", 1))

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": self.FORMAT,
            "next_id": self._next,
            "rules_version": self.rules_version,
            "rules": [r.model_dump(mode="json") for r in self.list()],
            "history": [r.model_dump(mode="json") for r in self._history],
        }
        fd, tmp = tempfile.mkstemp(prefix=".rules.", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=2, ensure_ascii=False)
                fh.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ----------------------------------------------------------------- reading
    def list(self) -> list[Rule]:
        """Active rules in id order."""
        return sorted(self._rules.values(), key=_rule_order)

    def get(self, rule_id: str) -> Rule:
        """The active rule ``rule_id``; raises :class:`RuleNotFound`."""
        try:
            return self._rules[rule_id]
        except KeyError:
            raise RuleNotFound(f"no rule {rule_id!r}; active: {', '.join(self._rules) or 'none'}") from None

    @property
    def history(self) -> list[Rule]:
        """Superseded versions and removed rules, oldest first."""
        return list(self._history)

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.list())

    @property
    def rules_version(self) -> str:
        """Hash of the active rules (ids, versions, text, compiled form, effect); ``"none"`` if empty."""
        if not self._rules:
            return "none"
        rows = [json.dumps({"id": r.id, "version": r.version, "text": r.text, "predicate": r.predicate,
                            "effect": r.effect.value if r.effect else None, "severity": r.severity},
                           sort_keys=True) for r in self.list()]
        return hashlib.sha1("\n".join(rows).encode("utf-8")).hexdigest()[:12]

    def matching(self, candidate: Candidate) -> list[Rule]:
        """Active compiled rules that match ``candidate``."""
        return [r for r in self.list() if matches(r, candidate)]

    def text_rules(self) -> list[Rule]:
        """Active rules that could not be compiled: give them to the model as text."""
        return [r for r in self.list() if not r.compiled]

    # ----------------------------------------------------------------- writing
    def _build(self, rule_id: str, version: int, text: str, created: str, effect: Effect | str | None,
               severity: int | str | None, predicate: str | dict[str, Any] | None,
               propose: Callable[[str], str] | None) -> Rule:
        text = " ".join(text.split())
        if not text:
            raise ValueError("empty rule text")
        if len(text) > MAX_RULE_CHARS:
            raise ValueError(f"rule text longer than {MAX_RULE_CHARS} characters")
        if predicate is not None:
            node = parse_predicate(predicate)
            compiled = CompiledRule(predicate=node, method="text")
            method = "manual"
            guessed = compile_rule(text)
            compiled = compiled.model_copy(update={"effect": guessed.effect, "severity": guessed.severity})
        else:
            compiled = compile_rule(text, propose=propose)
            method = compiled.method
        eff = Effect(effect) if effect is not None else compiled.effect
        sev = severity_value(severity) if severity is not None else (
            compiled.severity if effect is None or Effect(effect) == compiled.effect else None)
        if eff is not None and sev is None:
            sev = DEFAULT_SEVERITY[eff]
        if eff is Effect.SET_NORMAL:
            sev = 0
        return Rule(id=rule_id, version=version, text=text,
                    predicate=predicate_json(compiled.predicate) if compiled.predicate is not None else None,
                    effect=eff, severity=sev, method=method, note=compiled.note, created=created, updated=_now())

    def add(self, text: str, effect: Effect | str | None = None, severity: int | str | None = None,
            predicate: str | dict[str, Any] | None = None,
            propose: Callable[[str], str] | None = None) -> Rule:
        """Add a rule; the same text as an active rule returns that rule unchanged.

        Args:
            text: The rule in plain language.
            effect: Override the effect the compiler found.
            severity: Override the severity (0..4 or a name).
            predicate: A hand-written predicate (JSON text or dict) instead of compiling the text.
            propose: Optional model hook for :func:`compile_rule`.
        """
        norm = " ".join(text.split())
        for rule in self._rules.values():
            if rule.text == norm and predicate is None and effect is None and severity is None:
                return rule
        rule_id = f"R-{self._next:03d}"
        now = _now()
        rule = self._build(rule_id, 1, norm, now, effect, severity, predicate, propose)
        self._rules[rule_id] = rule
        self._next += 1
        self._save()
        return rule

    def update(self, rule_id: str, text: str | None = None, effect: Effect | str | None = None,
               severity: int | str | None = None, predicate: str | dict[str, Any] | None = None,
               propose: Callable[[str], str] | None = None) -> Rule:
        """New version of a rule (same id, version + 1); the old version goes to history."""
        old = self.get(rule_id)
        rule = self._build(rule_id, old.version + 1, text if text is not None else old.text, old.created,
                           effect, severity, predicate, propose)
        self._history.append(old)
        self._rules[rule_id] = rule
        self._save()
        return rule

    def remove(self, rule_id: str) -> Rule:
        """Deactivate a rule (kept in history; its id is never reused)."""
        rule = self.get(rule_id)
        del self._rules[rule_id]
        self._history.append(rule)
        self._save()
        return rule
