"""Versioned Jinja2 prompt templates and the verdict JSON schema (package data: ``*.j2``, ``*.json``).

* :func:`verdict_schema` -- the JSON schema the model must answer with, narrowed to one
  candidate: the cited-id arrays become enums of the ids actually shown, so constrained
  decoding cannot cite an id that does not exist.
* :func:`render_explain` -- the system and user messages for one candidate, with every piece of
  untrusted text (log lines, templates, file names, locators, documents, rule text) cut to size,
  neutralised (:func:`neutralise`) and put inside DATA blocks whose markers carry a nonce.
* :data:`PROMPT_VERSION` -- ``explain/<n>+<hash of the template>``; goes into provenance and the
  explanation cache key.

Nothing here imports :mod:`agent` or :mod:`knowledge`: passages and rules are read by attribute.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2

from detectors.records import Candidate
from prompts.injection import instruction_marker, withheld

__all__ = [
    "PROMPT_VERSION",
    "RenderedPrompt",
    "load_schema",
    "load_template",
    "neutralise",
    "render_explain",
    "render_retry",
    "verdict_schema",
]

TEMPLATE = "explain.j2"
SCHEMA = "verdict.schema.json"

# Size limits of what goes into a prompt (characters), so a prompt for SmolLM2 stays ~1-2k tokens.
MAX_LINES_PER_EVIDENCE = 2
MAX_LINE_CHARS = 110
MAX_SUMMARY_CHARS = 150
MAX_PASSAGE_CHARS = 280
MAX_RULE_CHARS = 240
MAX_FIELD_CHARS = 120
MAX_LOCATOR_KEYS = 8
MAX_EVIDENCE = 8

_DELIM_OPEN = re.compile(r"<{2,}|«")
_DELIM_CLOSE = re.compile(r">{2,}|»")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def neutralise(text: Any) -> str:
    """Make untrusted text unable to look like our markup; idempotent.

    Runs of ``<``/``>`` (our DATA markers are ``<<<...>>>``) become single angle quotes,
    chat-template token brackets ``<|``/``|>`` (``<|im_end|>``...) are broken apart, and control
    characters, bidi overrides and zero-width characters are removed. Newlines are kept here
    (templates use them); untrusted values are flattened to one line by :func:`_flat` first.
    """
    s = str(text)
    s = _CONTROL.sub("", s)
    s = _DELIM_OPEN.sub("‹", s)
    s = _DELIM_CLOSE.sub("›", s)
    s = s.replace("<|", "‹|").replace("|>", "|›")
    return s


def _flat(value: Any, limit: int) -> str:
    """One neutralised line of at most ``limit`` characters."""
    s = neutralise(" ".join(str(value).split()))
    return s if len(s) <= limit else s[: max(0, limit - 1)] + "…"


def _data(value: Any, limit: int) -> str:
    """Untrusted text (log lines, templates, file names, passages) as :func:`_flat`, or
    ``[withheld: <marker>]`` when it reads as an instruction (:mod:`prompts.injection`)."""
    marker = instruction_marker(value)
    return withheld(marker) if marker else _flat(value, limit)


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_resource),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        # Belt and braces: every printed variable is neutralised again at output time.
        finalize=lambda v: neutralise(v) if isinstance(v, str) else v,
    )


def _load_resource(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def load_template() -> jinja2.Template:
    """The compiled ``explain.j2``."""
    return _environment().get_template(TEMPLATE)


def _prompt_version() -> str:
    text = _load_resource(TEMPLATE)
    base = load_template().make_module({"nonce": ""}).PROMPT_VERSION
    return f"{base}+{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


PROMPT_VERSION: str = _prompt_version()
"""``explain/<n>+<first 8 hex of sha256(template)>``."""


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return _load_resource(SCHEMA)


def load_schema() -> dict[str, Any]:
    """The generic verdict schema (a fresh copy; ids not narrowed)."""
    return json.loads(_schema_text())


def _id_array(base: Mapping[str, Any], ids: Sequence[str]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    ids = list(dict.fromkeys(ids))
    if ids:
        out["items"] = {"type": "string", "enum": ids}
        out["maxItems"] = min(int(out.get("maxItems", len(ids))), len(ids))
    else:
        out["items"] = {"type": "string"}
        out["maxItems"] = 0
    out["minItems"] = 0
    return out


def verdict_schema(evidence_ids: Sequence[str], passage_ids: Sequence[str] = (),
                   rule_ids: Sequence[str] = ()) -> dict[str, Any]:
    """The model's answer schema for one candidate: cited ids are enums of the ids shown.

    Args:
        evidence_ids: The candidate's evidence ids (at least one is needed for a causal chain).
        passage_ids: Ids of the passages in the prompt.
        rule_ids: Ids of the rules in the prompt.
    """
    schema = load_schema()
    props = schema["properties"]
    for key in ("$schema", "$id", "description", "x-schema-version", "title"):
        schema.pop(key, None)
    schema["title"] = "ModelVerdict"
    props["passage_ids"] = _id_array(props["passage_ids"], passage_ids)
    props["rule_ids"] = _id_array(props["rule_ids"], rule_ids)
    step = props["causal_chain"]["items"]["properties"]
    if evidence_ids:
        step["evidence_ids"] = _id_array(step["evidence_ids"], evidence_ids)
        step["evidence_ids"]["minItems"] = 1
    else:
        props["causal_chain"]["maxItems"] = 0
    return schema


# ------------------------------------------------------------------------------ rendering

@dataclass(frozen=True)
class RenderedPrompt:
    """The messages for one candidate, and what they showed (for validation)."""

    system: str
    user: str
    version: str
    nonce: str
    evidence_ids: tuple[str, ...]
    passage_ids: tuple[str, ...]
    rule_ids: tuple[str, ...]
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Shown id -> real id, for the evidence (``E1``..) and passage (``P1``..) aliases."""

    def real_id(self, shown: str) -> str:
        """The real id behind a shown one (an unknown id is returned as is, to fail validation)."""
        return self.aliases.get(shown, shown)

    def unalias(self, answer: Mapping[str, Any]) -> dict[str, Any]:
        """The model's answer (a JSON object) with every cited alias replaced by the real id."""
        out = dict(answer)
        for key in ("evidence_ids", "passage_ids"):
            if isinstance(out.get(key), list):
                out[key] = [self.real_id(x) if isinstance(x, str) else x for x in out[key]]
        if isinstance(out.get("causal_chain"), list):
            out["causal_chain"] = [
                {**step, "evidence_ids": [self.real_id(x) if isinstance(x, str) else x for x in step["evidence_ids"]]}
                if isinstance(step, Mapping) and isinstance(step.get("evidence_ids"), list) else step
                for step in out["causal_chain"]]
        return out


def _num(x: float) -> str:
    return f"{x:.4g}"


def _evidence_rows(data: Mapping[str, Any], seen: dict[str, str], eid: str,
                   sequence: str | None = None) -> tuple[str, str, list[str]]:
    """(reason, where, rows) for one evidence item's data, all untrusted values flattened.

    Lines already shown under an earlier evidence item (``seen``: line text -> its id) are
    referred to, not repeated: detectors of an ensemble often cite the same lines. The
    candidate's own sequence id (an HDFS block id is ~12 tokens) is written ``<seq>`` in lines;
    the candidate block shows it once.
    """
    reason = _flat(data["reason"], 40) if isinstance(data.get("reason"), str) else ""
    where = ""
    rows: list[str] = []
    lines = data.get("lines")
    texts = data.get("text")
    templates = data.get("templates")
    if isinstance(lines, list) and lines:
        total = data.get("total_lines", len(lines))
        shown = ", ".join(str(n) for n in lines[:MAX_LINES_PER_EVIDENCE] if isinstance(n, int))
        where = f"lines {shown}" + (f" ({total} total)" if isinstance(total, int) and total > len(lines[:MAX_LINES_PER_EVIDENCE]) else "")
    if isinstance(templates, list) and templates:
        for t in list(dict.fromkeys(str(t) for t in templates if str(t) != "<unseen>"))[:MAX_LINES_PER_EVIDENCE]:
            rows.append("template: " + _data(t, MAX_LINE_CHARS))
    if isinstance(texts, list) and texts:
        nums = lines if isinstance(lines, list) else []
        tpls = templates if isinstance(templates, list) else []
        repeated: list[str] = []
        for i, text in enumerate(texts[:MAX_LINES_PER_EVIDENCE]):
            if i < len(tpls) and str(tpls[i]) != "<unseen>":
                continue  # its template is shown above; raw text only for lines no template explains
            label = f"line {nums[i]}" if i < len(nums) and isinstance(nums[i], int) else "line"
            key = f"{label}: {text}"
            if key in seen:
                repeated.append(seen[key])
                continue
            seen[key] = eid
            text = str(text)
            if sequence and len(sequence) >= 6:
                text = text.replace(sequence, "<seq>")
            rows.append(f"{label}: " + _data(text, MAX_LINE_CHARS))
        if repeated:
            where += f" (shown under {', '.join(dict.fromkeys(repeated))})"
    for key in ("t0", "t1"):
        if key in data:
            rows.append(f"{key}: {_flat(data[key], 40)}")
    for key in ("top_variables", "variables"):
        items = data.get(key)
        if isinstance(items, list):
            for v in items[:4]:
                if isinstance(v, Mapping):
                    rows.append("variable: " + _data(", ".join(f"{k}={v[k]}" for k in list(v)[:5]), MAX_LINE_CHARS))
            break
    for key in ("bbox", "frames", "defect", "channel"):  # counts and ranges are in the summary already
        if key in data and len(rows) < 2 * MAX_LINES_PER_EVIDENCE:
            rows.append(f"{key}: " + _flat(json.dumps(data[key], default=str), MAX_FIELD_CHARS))
    return reason, where, rows


def _nonce(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "replace"))
        h.update(b"\x00")
    return h.hexdigest()[:10]


def render_explain(candidate: Candidate, passages: Iterable[Any] = (), rules: Iterable[Any] = (),
                   matched_rule_ids: Iterable[str] = ()) -> RenderedPrompt:
    """System and user messages explaining ``candidate``.

    Args:
        candidate: The candidate; its evidence ids are the citable evidence.
        passages: Retrieved :class:`knowledge.records.Passage` (``id source heading text``).
        rules: Rules to show (``id text effect severity``): the compiled ones that matched and
            the text-only ones.
        matched_rule_ids: Which of ``rules`` matched the candidate (marked in the prompt).
    """
    passages = list(passages)
    rules = list(rules)
    matched = set(matched_rule_ids)
    evidence = list(candidate.evidence[:MAX_EVIDENCE])
    # Short aliases: "log-pca.E1" or "P-dcb60efb19bb" cost 5-8 tokens each time they are shown or
    # cited; "E1" and "P1" cost 2. The explainer maps them back (RenderedPrompt.unalias).
    ev_alias = [f"E{i}" for i in range(1, len(evidence) + 1)]
    p_alias = [f"P{i}" for i in range(1, len(passages) + 1)]
    ev_ctx = []
    seen: dict[str, str] = {}
    for alias, ev in zip(ev_alias, evidence):
        seq = candidate.locator.get("sequence")
        reason, where, rows = _evidence_rows(ev.data, seen, alias, seq if isinstance(seq, str) else None)
        ev_ctx.append({"id": alias, "kind": ev.kind.value, "reason": reason, "where": where,
                       "summary": _data(ev.summary, MAX_SUMMARY_CHARS), "rows": rows})
    loc = [(_flat(k, 40), _data(json.dumps(v, default=str) if not isinstance(v, str) else v, MAX_FIELD_CHARS))
           for k, v in list(candidate.locator.items())[:MAX_LOCATOR_KEYS]]
    ratio = _num(candidate.score / candidate.threshold) if candidate.threshold else "n/a"
    cand_ctx = {
        # The id names a file and a session: untrusted, so only a neutral reference is printed
        # outside a DATA block; the full id is in the candidate block.
        "id_ref": "C",
        "modality": candidate.modality.value,
        "detector": _flat(candidate.detector, 60),
        "score": _num(candidate.score),
        "threshold": _num(candidate.threshold),
        "ratio": ratio,
        "source": _data(candidate.source, MAX_FIELD_CHARS),
        "locator": loc or [("candidate id", _data(candidate.id, MAX_FIELD_CHARS))],
    }
    p_ctx = [{"id": alias, "source": _data(p.source, 80), "heading": _data(p.heading.split(" > ")[-1], 60),
              "text": _data(p.text, MAX_PASSAGE_CHARS)} for alias, p in zip(p_alias, passages)]
    r_ctx = []
    for r in rules:
        eff = getattr(r, "effect", None)
        sev = getattr(r, "severity", None)
        effect = "guidance" if eff is None else str(getattr(eff, "value", eff))
        if eff is not None and sev is not None:
            effect += f" (severity {int(sev)})"
        r_ctx.append({"id": _flat(r.id, 16), "effect": effect, "matched": r.id in matched,
                      "text": _flat(r.text, MAX_RULE_CHARS)})
    untrusted = json.dumps([cand_ctx, ev_ctx, p_ctx, r_ctx], sort_keys=True, ensure_ascii=False)
    nonce = _nonce(untrusted)
    context = {"nonce": nonce, "candidate": cand_ctx, "evidence": ev_ctx, "passages": p_ctx, "rules": r_ctx,
               "evidence_ids": [e["id"] for e in ev_ctx]}
    module = load_template().make_module(context)
    return RenderedPrompt(
        system=str(module.system()).strip(),
        user=_tidy(str(module.user())),
        version=PROMPT_VERSION,
        nonce=nonce,
        evidence_ids=tuple(ev_alias),
        passage_ids=tuple(p_alias),
        rule_ids=tuple(r.id for r in rules),
        aliases={**dict(zip(ev_alias, (ev.id for ev in evidence))), **dict(zip(p_alias, (p.id for p in passages)))},
    )


def render_retry(prompt: RenderedPrompt, error: str) -> str:
    """The user message asking for a corrected answer after ``error`` (neutralised, cut)."""
    module = load_template().make_module({"nonce": prompt.nonce, "error": _flat(error, 400)})
    return str(module.retry()).strip()


def _tidy(text: str) -> str:
    # Collapse runs of blank lines left by template control flow.
    return re.sub(r"\n{3,}", "\n\n", text).strip()
