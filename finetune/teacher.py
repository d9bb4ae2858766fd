"""The deterministic teacher: a target answer for one rendered prompt, from labels and evidence.

Why a teacher and not hand-written answers: the fine-tuning set has hundreds of cases and the
answers must be *consistent* (the same evidence always gets the same kind of answer) and
*checkable* (every claim cites evidence that was shown and says something that evidence holds).
A rule-based teacher gives both, and can be re-run when the prompt or schema changes.

What the teacher writes (the fields of ``prompts/verdict.schema.json``, with the prompt's short
aliases ``E1..``/``P1..``, exactly what the model must learn to produce):

* **label** -- from the case's truth (the block label) and what the prompt shows:
  ``anomaly`` for a labelled-anomalous block with evidence; ``normal`` for a normal block
  (flagged or not); ``uncertain`` when the detector fired (score above its threshold) but no
  evidence item is shown ("too little evidence": the model must not invent a cause). Matched
  compiled rules then override, as :func:`agent.explain.decide` does
  (:func:`knowledge.rules.apply_rules`).
* **anomaly_type** -- the category of the most severe evidence item (:func:`categorise`):
  ``exception``, ``error burst``, ``missing workflow events``, ``value out of range``...
* **severity** -- the category's base severity (:data:`CATEGORY_SEVERITY`), +1 when two or more
  categories agree (independent detectors), capped at 4; 0 for normal; then the rules.
* **causal_chain** -- at most two steps, one per leading category, each citing the aliases
  that carry it and stating one fact copied from that evidence (a line, a count, a value);
  for a flagged normal block the facts that were flagged.
* **passage_ids** -- shown passages whose heading shares a word with the evidence or the
  category (:func:`relevant_passages`).
* **rule_ids** -- the matched compiled rules.
* **summary**, **actions** -- built from the cited facts; no free invention.

Injected text never reaches a target: the dataset builder computes the target on the clean
candidate and reuses it for the dirty copy (see :mod:`finetune.dataset`).

:func:`claim_supported` is the mechanical faithfulness check used for the teacher's own output
(tests) and for model answers in :mod:`finetune.evaluate`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agent.explain import parse_answer
from agent.records import Candidate, Evidence
from knowledge.rules import Effect, Rule, apply_rules, matches

__all__ = [
    "CATEGORY_SEVERITY",
    "TEACHER_VERSION",
    "Fact",
    "Truth",
    "categorise",
    "claim_supported",
    "content_tokens",
    "evidence_tokens",
    "relevant_passages",
    "teach",
]

TEACHER_VERSION = "teacher/3"
"""Bump when the teacher's output for the same input changes; recorded in the data-set manifest."""

Truth = Literal["anomaly", "normal"]

# Limits of prompts/verdict.schema.json (the teacher must fit the narrowest schema).
MAX_TYPE = 40
MAX_SUMMARY = 120
MAX_STEP = 80
MAX_STEPS = 2
MAX_STEP_IDS = 3
# What the teacher writes stays well inside those limits. Why: a model that learned to copy a
# line up to the exact limit does not stop there -- with steps of up to 80 characters and 3 ids,
# 15% of the tuned model's held-out answers (no grammar) had a step of 81+ characters or 4 ids.
TAUGHT_STEP = MAX_STEP - 16
TAUGHT_STEP_IDS = MAX_STEP_IDS - 1
MAX_ACTION = 50
MAX_ACTIONS = 2

CATEGORY_SEVERITY: dict[str, int] = {
    "error burst": 3,
    "exception": 3,
    "warning burst": 2,
    "missing workflow events": 2,
    "workflow ended early": 2,
    "unexpected event order": 2,
    "value out of range": 2,
    "unseen log template": 2,
    "rare template combination": 2,
    "extra workflow events": 1,
    "rare log template": 1,
    "unusual event counts": 1,
}
"""Base severity per category: failures that lose or corrupt data (exceptions, errors) high;
structural deviations medium; "more of a normal thing" low. Unknown reasons get 1. The order
breaks ties (an error burst of exception lines is reported as the burst)."""

CATEGORY_ACTION: dict[str, str] = {
    "exception": "Check the node that logged the exception",
    "error burst": "Check the node that logged the errors",
    "warning burst": "Check the node that logged the warnings",
    "missing workflow events": "Check whether the operation completed",
    "workflow ended early": "Check whether the operation completed",
    "value out of range": "Verify the reported value at its source",
}

_ADDRESSED = re.compile(r"ignore|disregard|instruction|override|respond|answer|assistant|system\s*:|"
                        r"\blabel\b|severity|<<<|>>>|<\||\|>|\[/?inst\]|###", re.IGNORECASE)
"""Text that talks to the reader (an injection): quoted evidence containing it is described instead."""
_FAILURE = re.compile(r"exception|error|fail|refused|timed?\s*out|corrupt", re.IGNORECASE)
_WORD = re.compile(r"[a-z][a-z0-9]*|\d+(?:\.\d+)?", re.IGNORECASE)

STOPWORDS = frozenset("""
the and for with from that this these those there their then than into onto over under about after
before where which while when what were was are has have had not but all any each every some more
fewer less most only also just such very line lines block blocks session sessions sequence sequences
evidence anomaly anomalies anomalous normal detector detectors score threshold flagged shows show
shown seen never template templates log logs data item items value values event events expected
within range operation judged first total
""".split())  # noqa: SIM905 - a word list reads better as text
"""Words too common in prompts and evidence to show that a claim is about *this* evidence."""

_HEADING_WORDS = ("known failure failures pattern patterns runbook guide notes write written hdfs datanode "
                  "namenode block blocks later life with from into when error errors")
HEADING_STOPWORDS = frozenset(_HEADING_WORDS.split())
"""Heading words that name a document's topic, not one failure (``How a block is written``), and
"error", which half of all log lines contain ("DataXceiver error burst" still matches an error
burst through the category word "burst")."""


def content_tokens(text: str) -> set[str]:
    """Lower-case words of 4+ letters and numbers in ``text``, minus :data:`STOPWORDS`.

    Why: the faithfulness check asks whether a claim *mentions something present* in its
    evidence; short words and prompt boilerplate ("the evidence shows an anomaly") would match
    anything, so only distinctive words and numbers count. Numbers are normalised (``2.30`` and
    ``2.3`` are the same value).
    """
    out: set[str] = set()
    for tok in _WORD.findall(str(text)):
        low = tok.lower()
        if low[0].isdigit():
            # Single digits (a count of 3, step 1, R-001) match almost anything: not distinctive.
            norm = f"{float(low):g}"
            if len(norm.replace(".", "")) >= 2:
                out.add(norm)
        elif len(low) >= 4 and low not in STOPWORDS:
            out.add(low)
    return out


def evidence_tokens(ev: Evidence) -> set[str]:
    """Everything one evidence item holds, as :func:`content_tokens`: summary, reason, line
    numbers and texts, templates, and the numeric facts (observed, expected, normal range)."""
    d = ev.data
    parts: list[str] = [ev.summary, str(d.get("reason", "")).replace("_", " ")]
    for key in ("text", "templates", "lines"):
        if isinstance(d.get(key), list):
            parts.extend(str(x) for x in d[key])
    for key in ("template", "observed", "expected", "normal_min", "normal_max", "position",
                "normal_sequences_with_pair", "normal_sequences", "normal_sequences_with_template"):
        if key in d:
            parts.append(str(d[key]))
    for key in ("top_variables", "variables"):
        if isinstance(d.get(key), list):
            parts.extend(json.dumps(v, default=str) for v in d[key])
    cat = categorise(ev)
    if cat:
        parts.append(cat)
    return content_tokens(" ".join(parts))


def claim_supported(text: str, cited: Sequence[str], evidence: Mapping[str, Evidence],
                    rule_ids: Sequence[str] = ()) -> bool:
    """The mechanical faithfulness check of one causal-chain claim.

    A claim is supported when (1) it cites at least one id and every cited id names an
    evidence item that was shown (``evidence``: shown alias or real id -> item), and (2) its
    text shares at least one content token (:func:`content_tokens`: a distinctive word of 4+
    letters or a number) with the union of the cited items' content (:func:`evidence_tokens`).
    A claim that names a shown rule id (``rule_ids``, e.g. "R-003 declares this expected") is a
    claim about that rule and is supported by naming it (the schema makes every step cite
    evidence, so a rule step cites the evidence the rule matched).

    It cannot tell a true claim from a false one that reuses the evidence's words; it does
    catch claims about evidence that does not exist and claims that say nothing the cited
    evidence holds (generic filler, invented causes in new words).
    """
    if not cited or any(c not in evidence for c in cited):
        return False
    if any(re.search(rf"(?<![\w-]){re.escape(r)}(?![\w-])", text) for r in rule_ids):
        return True
    pool: set[str] = set()
    for c in cited:
        pool |= evidence_tokens(evidence[c])
    return bool(content_tokens(text) & pool)


# ================================================================================ evidence facts

def categorise(ev: Evidence) -> str | None:
    """The anomaly category an evidence item stands for, or None when it carries none
    (``context`` lines, items without a reason)."""
    d = ev.data
    reason = d.get("reason")
    if not isinstance(reason, str) or reason in ("context", ""):
        return None
    if reason in ("error_burst", "warning_burst"):
        return reason.replace("_", " ")
    if reason in ("unseen_template", "rare_template"):
        texts = [str(t) for t in d.get("text") or []] + [str(t) for t in d.get("templates") or []]
        if any(_FAILURE.search(t) for t in texts):
            return "exception"
        return "unseen log template" if reason == "unseen_template" else "rare log template"
    if reason == "out_of_range_parameter":
        return "value out of range"
    if reason == "count_deviation":
        obs, exp = d.get("observed"), d.get("expected")
        if isinstance(obs, (int, float)) and isinstance(exp, (int, float)):
            return "missing workflow events" if obs < exp else "extra workflow events"
        return "unusual event counts"
    if reason == "rare_cooccurrence":
        return "rare template combination"
    if reason == "isolated_count_profile":
        return "unusual event counts"
    if reason == "premature_end":
        return "workflow ended early"
    if reason == "unexpected_next_event":
        return "unexpected event order"
    return reason.replace("_", " ")[:MAX_TYPE]


def _cut(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters, cut at a word boundary with an ellipsis."""
    s = " ".join(str(text).split())
    if len(s) <= limit:
        return s
    cut = s[: limit - 1]
    if " " in cut[limit // 2:]:
        cut = cut[: cut.rfind(" ")]
    return cut.rstrip(" ,;:") + "…"


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _mask(text: str, sequence: str | None) -> str:
    # The prompt prints the candidate's own sequence id as <seq> (prompts._evidence_rows).
    if sequence and len(sequence) >= 6:
        text = text.replace(sequence, "<seq>")
    return text


@dataclass(frozen=True)
class Fact:
    """One evidence item as the teacher reads it."""

    alias: str
    category: str | None
    text: str
    """One factual sentence (at most :data:`TAUGHT_STEP` characters) copied from the evidence."""
    first_line: int | None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _visible(fact: Fact, ev: Evidence, prompt: Any, sequence: str | None) -> Fact:
    """``fact``, or the start of the evidence's summary when the fact quotes a number the prompt
    does not show (a line or count cut off by the prompt's limits): a target must only state
    what the model can read."""
    shown = str(getattr(prompt, "user", ""))
    if all(n in shown for n in _NUMBER.findall(fact.text)):
        return fact
    return Fact(fact.alias, fact.category, _cut(_mask(ev.summary, sequence), TAUGHT_STEP), fact.first_line)


def fact_of(alias: str, ev: Evidence, sequence: str | None = None) -> Fact:
    """The sentence a causal step states about ``ev``: a line, a count, a value -- copied, not invented."""
    d = ev.data
    lines = [n for n in d.get("lines") or [] if isinstance(n, int)]
    texts = [str(t) for t in d.get("text") or []]
    templates = [str(t) for t in d.get("templates") or []]
    first = lines[0] if lines else None
    reason = d.get("reason")
    cat = categorise(ev)
    where = f"line {first}" if first is not None else "a line"
    if reason in ("unseen_template", "rare_template", "context") and (texts or templates):
        # The prompt shows a line's text only when no template explains it, else the template.
        if texts and (not templates or templates[0] == "<unseen>"):
            shown = texts[0]
        else:
            shown = templates[0] if templates else texts[0]
        text = f"{where}: {_mask(shown, sequence)}"
        if _ADDRESSED.search(shown):
            # Never copy an instruction into an answer, even one that sits in the evidence.
            what = {"unseen_template": "unseen", "rare_template": "rare"}.get(str(reason), "context")
            text = f"{where}: {what} line, text not quoted (it addresses the reader)"
    elif reason == "count_deviation" and "observed" in d:
        tpl = str(d.get("template") or (templates[0] if templates else "template"))
        if isinstance(d.get("expected"), (int, float)):
            # As the detector's summary prints it ({exp:.1f}): the number the model can see.
            tail = f"' vs {float(d['expected']):.1f} expected"
        else:
            tail = "' is off the normal counts"
        head = f"{d['observed']} x '"
        text = head + _cut(tpl, TAUGHT_STEP - len(head) - len(tail)) + tail
    elif reason == "out_of_range_parameter" and "observed" in d:
        text = f"value {_num(d['observed'])} at {where} outside [{_num(d.get('normal_min'))}, {_num(d.get('normal_max'))}]"
    elif reason in ("error_burst", "warning_burst") and "observed" in d:
        kind = "error" if reason == "error_burst" else "warning"
        exp = d.get("expected")
        text = f"{d['observed']} {kind}-level lines vs {float(exp):.2g} expected, from {where}" if isinstance(
            exp, (int, float)) else f"{d['observed']} {kind}-level lines from {where}"
    elif reason == "rare_cooccurrence" and len(dict.fromkeys(templates)) >= 2:
        # The two templates (both shown as "template:" rows; the summary names the line). The
        # partner's line and the "0 of 8881" count sit past the prompt's cut of the summary:
        # teacher/2 quoted them, teaching the model to write numbers it cannot see.
        a, b = list(dict.fromkeys(templates))[:2]
        room = (TAUGHT_STEP - len("'' with ''")) // 2
        text = f"'{_cut(a, room)}' with '{_cut(b, room)}'"
    else:
        text = _mask(ev.summary, sequence)
    return Fact(alias=alias, category=cat, text=_cut(text, TAUGHT_STEP), first_line=first)


CATEGORY_WORDS: dict[str, frozenset[str]] = {
    "exception": frozenset({"exception", "exceptions"}),
    "error burst": frozenset({"error", "errors", "burst"}),
    "warning burst": frozenset({"warning", "warnings", "burst"}),
    "missing workflow events": frozenset({"incomplete", "missing"}),
    "workflow ended early": frozenset({"incomplete", "missing"}),
    "value out of range": frozenset({"size", "range", "value", "number"}),
    "extra workflow events": frozenset({"redundant", "duplicate", "extra"}),
}
"""Words a passage heading about a category uses, beyond what the evidence itself says."""


def heading_tokens(heading: str) -> set[str]:
    """Distinctive words of a passage heading (as the prompt shows it: its last part)."""
    last = str(heading or "").split(" > ")[-1]
    return {w.lower() for w in _WORD.findall(last) if len(w) >= 4 and not w[0].isdigit()} - HEADING_STOPWORDS


def relevant_passages(passages: Sequence[tuple[str, Any]], category: str | None, lead: Sequence[Fact],
                      limit: int = 2) -> list[str]:
    """Aliases of shown passages about the leading finding: the heading shares a word with the
    leading category's words (:data:`CATEGORY_WORDS`) or with the leading facts' text.

    Why only the heading and only the leading finding: a heading says what a passage is about
    ("Write exception on one replica"); bodies and secondary findings mention many components
    in passing, and matching them made unrelated runbook sections (a normal ``addStoredBlock``
    line matching "Redundant addStoredBlock") look relevant.
    """
    words: set[str] = set(CATEGORY_WORDS.get(category or "", frozenset()))
    for f in lead:
        words |= {w.lower() for w in _WORD.findall(f.text) if len(w) >= 4}
    out = []
    for alias, p in passages:
        if heading_tokens(str(getattr(p, "heading", ""))) & words:
            out.append(alias)
        if len(out) >= limit:
            break
    return out


# ================================================================================ teacher

@dataclass(frozen=True)
class _Base:
    label: str
    severity: int
    confidence: float
    anomaly_type: str
    facts: tuple[Fact, ...]
    groups: tuple[tuple[Fact, ...], ...]


def _groups(facts: Sequence[Fact]) -> list[tuple[Fact, ...]]:
    """Facts grouped by category, most severe category first (ties: first shown)."""
    by_cat: dict[str, list[Fact]] = {}
    for f in facts:
        if f.category is not None:
            by_cat.setdefault(f.category, []).append(f)
    rank = {c: i for i, c in enumerate(CATEGORY_SEVERITY)}  # ties: the more specific finding first
    order = sorted(by_cat, key=lambda c: (-CATEGORY_SEVERITY.get(c, 1), rank.get(c, len(rank)),
                                          min(facts.index(f) for f in by_cat[c])))
    return [tuple(by_cat[c]) for c in order]


def _base(candidate: Candidate, facts: Sequence[Fact], truth: Truth) -> _Base:
    groups = _groups(facts)
    ratio = candidate.score / candidate.threshold if candidate.threshold > 0 else float("inf")
    if truth == "normal":
        return _Base("normal", 0, 0.9 if ratio <= 1 else 0.6, "none", tuple(facts), tuple(groups))
    if not groups:
        # The detector fired (or the block is labelled anomalous) but nothing is shown that
        # says why: too little evidence to call it either way.
        return _Base("uncertain", 1 if ratio > 1 else 0, 0.5, "insufficient evidence", tuple(facts), ())
    cats = [g[0].category or "" for g in groups]
    sev = min(4, CATEGORY_SEVERITY.get(cats[0], 1) + (1 if len(cats) >= 2 else 0))
    conf = 0.9 if (len(cats) >= 2 or ratio >= 3) else (0.6 if ratio < 1.25 else 0.8)
    return _Base("anomaly", sev, conf, cats[0][:MAX_TYPE], tuple(facts), tuple(groups))


def _with_rules(base: _Base, rules: Sequence[Rule], candidate: Candidate) -> tuple[str, int, float, list[Rule]]:
    """Label, severity and confidence after the matched compiled rules (as agent.explain.decide)."""
    matched = [r for r in rules if r.effect is not None and matches(r, candidate)]
    if not matched:
        return base.label, base.severity, base.confidence, []
    rd = apply_rules(matched, candidate, base.severity)
    label, sev = base.label, rd.severity
    if rd.label == "normal":
        label, sev = "normal", 0
    elif rd.label == "anomaly":
        label, sev = "anomaly", max(1, rd.severity)
    elif label != "anomaly":
        if rd.severity > base.severity:  # "at least high": the rule says it is an anomaly
            label = "anomaly"
        else:
            sev = base.severity
    elif sev == 0:  # "at most none": expected behaviour
        label = "normal"
    used = [r for r in matched if r.id in rd.rule_ids]
    return label, sev, 0.9, used


def _rule_step(rule: Rule, label: str, sev: int) -> str:
    eff = rule.effect
    if eff is Effect.SET_NORMAL or label == "normal":
        what = "declares this expected: normal"
    elif eff is Effect.LOWER_SEVERITY:
        what = f"caps the severity at {sev}"
    elif eff is Effect.RAISE_SEVERITY:
        what = f"raises the severity to {sev}"
    else:
        what = f"defines this as an anomaly, severity {sev}"
    return _cut(f"{rule.id} matches and {what}", TAUGHT_STEP)


def teach(candidate: Candidate, prompt: Any, truth: Truth, *, passages: Sequence[Any] = (),
          rules: Sequence[Rule] = (), exclude_passages: Sequence[str] = ()) -> dict[str, Any]:
    """The target answer (a JSON-ready dict, prompt aliases) for ``candidate`` as ``prompt`` shows it.

    Args:
        candidate: The candidate the prompt was rendered from.
        prompt: Its :class:`prompts.RenderedPrompt` (aliases, shown ids).
        truth: The block's label.
        passages: The passages shown, in prompt order (``P1``, ``P2``...).
        rules: The rules the explainer had (matched compiled ones change the verdict).
        exclude_passages: Passage aliases never to cite (one that carries injected text).

    Returns:
        The answer, valid for the prompt's schema (checked by :func:`check_target`).
    """
    if truth not in ("anomaly", "normal"):
        raise ValueError(f"truth must be 'anomaly' or 'normal', got {truth!r}")
    sequence = candidate.locator.get("sequence")
    seq = sequence if isinstance(sequence, str) else None
    by_id = {ev.id: ev for ev in candidate.evidence}
    shown = [(alias, by_id[prompt.real_id(alias)]) for alias in prompt.evidence_ids]
    facts = [_visible(fact_of(alias, ev, seq), ev, prompt, seq) for alias, ev in shown]
    base = _base(candidate, facts, truth)
    label, sev, conf, used = _with_rules(base, rules, candidate)

    # Causal chain: one step per leading category; a flagged normal block cites what was flagged.
    groups = list(base.groups)
    if label == "normal" and not groups:
        groups = [(f,) for f in facts[:1]]  # e.g. a context line: say what it is
    steps: list[dict[str, Any]] = []
    for g in groups[:MAX_STEPS]:
        ids = list(dict.fromkeys(f.alias for f in g))[:TAUGHT_STEP_IDS]
        steps.append({"text": g[0].text, "evidence_ids": ids})
    if used and steps:
        rule_text = _rule_step(used[-1], label, sev)
        if len(steps) >= MAX_STEPS:
            steps = steps[: MAX_STEPS - 1]
        steps.append({"text": rule_text, "evidence_ids": list(steps[0]["evidence_ids"])})

    shown_passages = [(a, p) for a, p in zip(prompt.passage_ids, passages) if a not in set(exclude_passages)]
    p_ids = relevant_passages(shown_passages, groups[0][0].category, groups[0]) if groups else []

    ratio = candidate.score / candidate.threshold if candidate.threshold > 0 else float("inf")
    rtxt = f"x{ratio:.3g}" if ratio != float("inf") else "above"
    # The summary names the finding and where it is, not the step text again: every answer token
    # costs generation time, and the causal chain already quotes the evidence.
    cats = [g[0].category for g in groups[:MAX_STEPS] if g[0].category]
    at = f" at line {groups[0][0].first_line}" if groups and groups[0][0].first_line is not None else ""
    also = f"; also {cats[1]}" if len(cats) > 1 else ""
    rule_note = f"; {used[-1].id} applies" if used else ""
    if label == "anomaly":
        atype = base.anomaly_type if base.label == "anomaly" else (cats[0] if cats else "rule-defined anomaly")
        summary = (f"{atype[:1].upper()}{atype[1:]} ({rtxt}){at}{also}{rule_note}" if cats else
                   f"Rule-defined anomaly ({rtxt}){rule_note}; no evidence item was flagged")
    elif label == "normal":
        atype = "none"
        if used:
            summary = f"{used[-1].id} declares this expected ({rtxt})" + (f"; {cats[0]}{at}" if cats else "")
        elif cats:
            summary = f"{cats[0][:1].upper()}{cats[0][1:]} flagged ({rtxt}){at}, judged within normal operation"
        elif facts:
            summary = f"Score {rtxt} of the threshold; only context lines, nothing flagged"
        else:
            summary = f"Score {rtxt} of the threshold; no evidence item was flagged"
    else:
        atype = "insufficient evidence"
        summary = f"Score {rtxt} of the threshold but no evidence item says why; cannot decide"
    summary = _cut(summary, MAX_SUMMARY)

    actions: list[str] = []
    if label != "normal":
        if cats and cats[0] in CATEGORY_ACTION:
            actions.append(CATEGORY_ACTION[cats[0]])
        first, last = candidate.locator.get("first_line"), candidate.locator.get("last_line")
        if isinstance(first, int) and isinstance(last, int):
            actions.append(_cut(f"Review lines {first}-{last}", MAX_ACTION))
        else:
            actions.append("Review the session's log lines")
    answer = {
        "anomaly_type": _cut(atype, MAX_TYPE),
        "summary": summary,
        "causal_chain": steps,
        "passage_ids": p_ids,
        "rule_ids": [r.id for r in used if r.id in prompt.rule_ids],
        "label": label,
        "severity": int(sev),
        "confidence": round(float(conf), 1),
        "actions": actions[:MAX_ACTIONS],
    }
    return answer


def answer_text(answer: Mapping[str, Any]) -> str:
    """The exact text the model is trained to write: compact JSON in schema property order.

    Compact separators because every generated token costs time on a CPU; the order is the
    schema's (evidence and reasoning before the label).
    """
    return json.dumps(dict(answer), ensure_ascii=False, separators=(",", ":"))


def check_target(answer: Mapping[str, Any], prompt: Any, schema: Mapping[str, Any]) -> None:
    """Raise ValueError when a target does not fit the prompt's schema or cites an unshown id."""
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema comes with chromadb
        jsonschema = None  # type: ignore[assignment]
    if jsonschema is not None:
        try:
            jsonschema.validate(dict(answer), dict(schema))
        except jsonschema.ValidationError as exc:
            raise ValueError(f"teacher target does not match the schema: {exc.message}") from None
    parse_answer(answer_text(answer), prompt.unalias)
    for step in answer.get("causal_chain", []):
        bad = [e for e in step["evidence_ids"] if e not in prompt.evidence_ids]
        if bad:
            raise ValueError(f"teacher cites evidence {bad} not shown (shown: {list(prompt.evidence_ids)})")
