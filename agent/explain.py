"""Explain one candidate: retrieve knowledge, apply rules, ask the model, validate, decide.

``Explainer(model, store, rules).explain(candidate) -> Verdict``:

1. **Retrieve** passages for the candidate's evidence (``store.search_for``), and find the
   compiled rules that match it (plus the text-only rules, shown to the model as text).
2. **Ask** the model with the versioned prompt (``prompts/explain.j2``) and a JSON schema built
   for this candidate: cited ids are enums of the ids actually shown.
3. **Validate** the answer with pydantic (:class:`ModelAnswer`), drop causal steps whose
   evidence ids do not resolve, build the :class:`Verdict` and run :func:`check_citations`. On
   failure, retry once with the error fed back; then fall back to a rules-only verdict
   (``explained_by="rules-only"``) built deterministically. A verdict is never returned
   unvalidated. Model timeouts and crashes fall back too; a missing or refused model
   (:class:`ModelNotInstalled`, :class:`ModelIntegrityError`) raises, with the reason.
4. **Decide** label and severity (:func:`decide`) -- the model explains, it does not dictate.

The decision
------------
Three voices, each with a configurable weight (:class:`DecisionWeights`):

* detector: ``p_det = sigmoid(sharpness * m)`` with ``m = ln(score / threshold)`` when both are
  positive, else ``(score - threshold) / |threshold|``: 0.5 at the threshold, ~0.9 at twice it
  (sharpness 3);
* model: ``p_model = confidence`` for "anomaly", ``1 - confidence`` for "normal", 0.5 for
  "uncertain".

  Detector and model weights are each voice's *measured* accuracy as log-odds
  (:meth:`DecisionWeights.from_accuracy`), read from ``agent/weights.json`` for the model id
  and adapter; ``anomaly-agent eval explain --save-weights`` measures them on a calibration
  slice of HDFS that is disjoint from the reported test sessions. A model no better than
  chance gets weight 0: it still explains, but does not vote. Unmeasured models get detector
  1.0 and model 0.25;
* rules: with the default weight ``inf`` the matched compiled rules override
  (:func:`knowledge.rules.apply_rules`: set_normal, define_anomaly, raise/lower severity); with
  a finite weight each matched rule votes 1 (define_anomaly, raise_severity) or 0 (set_normal)
  in the average and severity effects apply only to anomalies.

``p = sum(w * p_voice) / sum(w)``; label anomaly if ``p > 0.5 + band``, normal if
``p < 0.5 - band``, else uncertain (band 0 by default: without a model the label is exactly
the detector's "score > threshold"). Severity: the detector's from ``p_det`` (<=0.65 low,
<=0.8 medium, <=0.93 high, else critical), averaged with the model's severity by weight;
then the rules. Confidence: ``p`` (anomaly), ``1 - p`` (normal), 0.5 (uncertain); at least 0.9
when a rule decided the label.

Explanation cache
-----------------
Keyed by the evidence signature (modality, detector, evidence ids, kinds, reasons, templates,
variable names -- not line numbers, block ids or scores), the retrieved passage ids, the rules
version, the knowledge version, the model id and adapter, and the prompt version. It stores the
validated *model answer* as JSON (``<cache_dir>/<k[:2]>/<k>.json``; never pickle); the
decision is recomputed for every candidate from its own score and rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import prompts
from agent.models import (
    ChatModel,
    Message,
    ModelError,
    ModelIntegrityError,
    ModelNotInstalled,
)
from agent.records import (
    Candidate,
    CausalStep,
    ExplainedBy,
    Label,
    Provenance,
    Severity,
    UnresolvedCitation,
    Verdict,
    check_citations,
)
from knowledge.rules import Effect, Rule, RuleBook, apply_rules, matches
from prompts.injection import instruction_marker

__all__ = [
    "Decision",
    "DecisionWeights",
    "Explainer",
    "ModelAnswer",
    "decide",
    "detector_probability",
    "evidence_signature",
    "parse_answer",
]

log = logging.getLogger(__name__)

MAX_RULES_SHOWN = 8
DEFAULT_PASSAGES = 2
MIN_PASSAGE_SCORE = 0.35
MIN_CASE_SCORE = 0.6
"""Past cases must be closer than documents to be shown: a case asserts a verdict."""
"""Cosine similarity below which a retrieved passage is not shown: an off-topic passage (the
spacecraft guide for an HDFS block) costs prompt time and invites the model to cite noise."""
CACHE_FORMAT = 1


# ================================================================================ answer

class ModelAnswer(BaseModel):
    """What the model writes (``prompts/verdict.schema.json``); validated before use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    class Step(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        text: str = Field(min_length=1, max_length=400)
        evidence_ids: tuple[str, ...] = Field(min_length=1, max_length=8)

    anomaly_type: str = Field(min_length=1, max_length=80)
    summary: str = Field(min_length=1, max_length=600)
    causal_chain: tuple[Step, ...] = Field(default=(), max_length=6)
    evidence_ids: tuple[str, ...] = Field(default=(), max_length=16)
    passage_ids: tuple[str, ...] = Field(default=(), max_length=10)
    rule_ids: tuple[str, ...] = Field(default=(), max_length=16)
    label: Label
    severity: Severity
    confidence: float = Field(ge=0.0, le=1.0)
    actions: tuple[str, ...] = Field(default=(), max_length=4)


class AnswerError(ValueError):
    """The model's output is not a valid answer; the message is fed back on retry."""


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def parse_answer(text: str, unalias: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> ModelAnswer:
    """Parse and validate the model's JSON (a surrounding code fence is tolerated).

    ``unalias`` maps the prompt's short ids back to real ones before validation
    (:meth:`prompts.RenderedPrompt.unalias`).
    """
    raw = text.strip()
    if m := _FENCE.match(raw):
        raw = m.group(1)
    try:
        obj = json.loads(raw, strict=False)  # a raw newline inside a string is not worth a retry
    except ValueError as exc:
        raise AnswerError(f"the answer is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(obj, dict):
        raise AnswerError(f"the answer must be a JSON object, got {type(obj).__name__}")
    if unalias is not None:
        obj = unalias(obj)
    try:
        return ModelAnswer.model_validate(obj)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}" for e in exc.errors()[:6]]
        raise AnswerError("the answer does not match the schema: " + "; ".join(problems)) from None


# ================================================================================ decision

WEIGHTS_FILE = Path(__file__).with_name("weights.json")
"""Measured detector and model accuracies per model id (+ adapter), written by
``anomaly-agent eval explain --save-weights`` from a calibration slice disjoint from the
reported test sessions; :meth:`DecisionWeights.from_env` turns them into weights."""


def weights_key(model_id: str, adapter: str | None = None) -> str:
    """The ``weights.json`` key of a model: its id, plus ``+adapter`` when one is loaded."""
    return model_id + (f"+{adapter}" if adapter else "")


def measured_weights(path: str | Path | None = None) -> dict[str, Any]:
    """The measured-accuracy table (empty when the file is missing or unreadable)."""
    p = Path(path) if path is not None else WEIGHTS_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", p, exc)
        return {}
    return data if isinstance(data, dict) else {}


def save_measured_weights(model_id: str, adapter: str | None, entry: dict[str, Any],
                          path: str | Path | None = None) -> Path:
    """Record one model's measured accuracies (atomic rewrite of the table)."""
    p = Path(path) if path is not None else WEIGHTS_FILE
    table = measured_weights(p)
    table[weights_key(model_id, adapter)] = entry
    fd, tmp = tempfile.mkstemp(prefix=".weights.", suffix=".json", dir=p.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, p)
    return p


@dataclass(frozen=True)
class DecisionWeights:
    """Weights of the detector, the model and the rules in the label decision (see module doc)."""

    detector: float = 1.0
    model: float = 0.25
    rules: float = math.inf
    sharpness: float = 3.0
    uncertain_band: float = 0.0

    def __post_init__(self) -> None:
        for name in ("detector", "model", "rules"):
            v = getattr(self, name)
            if not (v >= 0):
                raise ValueError(f"decision weight {name} must be >= 0, got {v}")
        if self.detector + self.model == 0 and self.rules == 0:
            raise ValueError("at least one decision weight must be > 0")
        if not 0 <= self.uncertain_band < 0.5:
            raise ValueError(f"uncertain_band must be in [0, 0.5), got {self.uncertain_band}")
        if self.sharpness <= 0:
            raise ValueError(f"sharpness must be > 0, got {self.sharpness}")

    @classmethod
    def from_accuracy(cls, detector_accuracy: float, model_accuracy: float) -> "DecisionWeights":
        """Weights from measured accuracies: the log-odds ``ln(p / (1 - p))`` of each voice.

        That is the optimal weighting of independent voters (Nitzan and Paroush, 1982); a voice
        no better than chance (p <= 0.5) gets weight 0, and p is capped at 0.99 so a voice that
        was right on every case of a small calibration sample does not get infinite weight.
        """
        def log_odds(p: float) -> float:
            p = min(0.99, max(0.5, float(p)))
            return round(math.log(p / (1.0 - p)), 4)

        return cls(detector=log_odds(detector_accuracy), model=log_odds(model_accuracy))

    @classmethod
    def measured(cls, model_id: str, adapter: str | None = None, path: str | Path | None = None) -> "DecisionWeights | None":
        """The weights measured for this model and adapter (``agent/weights.json``), if any."""
        entry = measured_weights(path).get(weights_key(model_id, adapter))
        if not isinstance(entry, dict):
            return None
        try:
            return cls.from_accuracy(float(entry["detector_accuracy"]), float(entry["model_accuracy"]))
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring malformed weights entry for %s", weights_key(model_id, adapter))
            return None

    @classmethod
    def from_env(cls, model_id: str | None = None, adapter: str | None = None, **overrides: float) -> "DecisionWeights":
        """Measured weights for ``model_id`` (else defaults), then
        ``ANOMALY_AGENT_WEIGHT_{DETECTOR,MODEL,RULES}``, then ``overrides``."""
        base = cls.measured(model_id, adapter) if model_id else None
        values: dict[str, float] = {"detector": base.detector, "model": base.model} if base else {}
        for name in ("detector", "model", "rules"):
            env = os.environ.get(f"ANOMALY_AGENT_WEIGHT_{name.upper()}")
            if env:
                values[name] = float(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def detector_probability(candidate: Candidate, sharpness: float = 3.0) -> float:
    """The detector's score mapped to [0, 1]: 0.5 at the threshold (see module doc)."""
    s, t = candidate.score, candidate.threshold
    if s > 0 and t > 0:
        m = math.log(s / t)
    else:
        m = (s - t) / max(abs(t), 1e-9)
    z = max(-50.0, min(50.0, sharpness * m))
    return 1.0 / (1.0 + math.exp(-z))


def _severity_from_p(p: float) -> int:
    if p <= 0.5:
        return 0
    for cut, sev in ((0.65, 1), (0.8, 2), (0.93, 3)):
        if p <= cut:
            return sev
    return 4


@dataclass(frozen=True)
class Decision:
    """The label, severity and confidence, and how they came about."""

    label: Label
    severity: Severity
    confidence: float
    p_anomaly: float
    p_detector: float
    rule_ids: tuple[str, ...]
    by_rule: bool
    note: str


def decide(candidate: Candidate, rules: Sequence[Rule], answer: ModelAnswer | None,
           weights: DecisionWeights = DecisionWeights()) -> Decision:
    """Combine detector, model and matched rules into the verdict's label and severity."""
    p_det = detector_probability(candidate, weights.sharpness)
    num, den = weights.detector * p_det, weights.detector
    w_model = weights.model if answer is not None else 0.0
    if answer is not None and w_model > 0:
        p_model = {Label.ANOMALY: answer.confidence, Label.NORMAL: 1.0 - answer.confidence}.get(answer.label, 0.5)
        num += w_model * p_model
        den += w_model
    matched = [r for r in sorted(rules, key=lambda r: int(r.id.split("-", 1)[1]))
               if r.effect is not None and matches(r, candidate)]
    if math.isfinite(weights.rules) and weights.rules > 0:
        for r in matched:
            vote = {Effect.SET_NORMAL: 0.0, Effect.DEFINE_ANOMALY: 1.0, Effect.RAISE_SEVERITY: 1.0}.get(r.effect)
            if vote is not None:
                num += weights.rules * vote
                den += weights.rules
    p = num / den if den > 0 else 0.5
    band = weights.uncertain_band
    label = Label.ANOMALY if p > 0.5 + band else Label.NORMAL if p < 0.5 - band else Label.UNCERTAIN

    sev_det = max(1, _severity_from_p(p_det))
    if answer is not None and w_model > 0:
        sev = (weights.detector * sev_det + w_model * int(answer.severity)) / (weights.detector + w_model) \
            if weights.detector + w_model > 0 else sev_det
        sev_i = int(math.floor(sev + 0.5))
    else:
        sev_i = sev_det
    if label is Label.ANOMALY:
        sev_i = max(1, sev_i)
    elif label is Label.NORMAL:
        sev_i = 0
    else:
        sev_i = 1 if p >= 0.5 else 0
    confidence = p if label is Label.ANOMALY else (1.0 - p) if label is Label.NORMAL else 0.5
    note = f"detector p={p_det:.2f}" + (f", model {answer.label.value} ({answer.confidence:.1f})"
                                        if answer is not None and w_model > 0 else "") + f" -> p={p:.2f}"

    used: tuple[str, ...] = ()
    by_rule = False
    if matched:
        rd = apply_rules(matched, candidate, sev_i)
        used = rd.rule_ids
        if math.isinf(weights.rules) or label is Label.ANOMALY:
            before = (label, sev_i)
            if rd.label == "normal" and math.isinf(weights.rules):
                label, sev_i = Label.NORMAL, 0
            elif rd.label == "anomaly" and math.isinf(weights.rules):
                label, sev_i = Label.ANOMALY, max(1, rd.severity)
            else:
                if rd.severity > sev_i and label is not Label.ANOMALY and math.isinf(weights.rules):
                    label = Label.ANOMALY  # "at least high": the rule says it is an anomaly
                if label is Label.ANOMALY:
                    sev_i = rd.severity
                    if sev_i == 0:  # "at most none": expected behaviour
                        label = Label.NORMAL
            if (label, sev_i) != before:
                by_rule = True
                note += f"; rules {', '.join(used)} -> {label.value}/{sev_i}"
    if by_rule:
        confidence = max(confidence, 0.9)
    return Decision(label=label, severity=Severity(sev_i), confidence=round(min(1.0, max(0.0, confidence)), 3),
                    p_anomaly=round(p, 4), p_detector=round(p_det, 4), rule_ids=used, by_rule=by_rule, note=note)


# ================================================================================ cache

_MASK = re.compile(r"\S*\d\S*")


def evidence_signature(candidate: Candidate) -> dict[str, Any]:
    """What makes two candidates "the same" for the model: kinds, reasons, templates, names.

    Line numbers, excerpts (they carry block ids and values), scores and the candidate id are
    left out, so identical patterns in different sessions share one explanation.
    """
    items = []
    for ev in candidate.evidence:
        d = ev.data
        templates = list(d.get("templates")) if isinstance(d.get("templates"), list) else []
        texts = d.get("text") if isinstance(d.get("text"), list) else []
        for i, t in enumerate(templates):
            # A line that matched no template carries its meaning in its text: use the text with
            # every token holding a digit masked (block ids, hosts, sizes), like a template.
            if str(t).strip().lower() == "<unseen>" and i < len(texts):
                templates[i] = "<unseen> " + _MASK.sub("<*>", " ".join(str(texts[i]).split()))[:300]
        variables = []
        for key in ("top_variables", "variables"):
            if isinstance(d.get(key), list):
                variables = [str(v.get("name")) for v in d[key] if isinstance(v, dict)]
                break
        items.append({"id": ev.id, "kind": ev.kind.value, "reason": d.get("reason"),
                      "templates": list(dict.fromkeys(str(t) for t in templates)), "variables": variables,
                      **{k: d[k] for k in ("defect", "channel", "subsystem") if isinstance(d.get(k), str)}})
    return {"modality": candidate.modality.value, "detector": candidate.detector, "evidence": items}


class ExplanationCache:
    """Validated model answers as JSON files under one folder (plus an in-memory copy)."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else None
        self._mem: dict[str, ModelAnswer] = {}

    def _path(self, key: str) -> Path:
        if self.folder is None:
            raise ValueError("cache has no folder")
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> ModelAnswer | None:
        if key in self._mem:
            return self._mem[key]
        if self.folder is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != CACHE_FORMAT or raw.get("key") != key:
                return None
            answer = ModelAnswer.model_validate(raw["answer"])
        except (OSError, ValueError, KeyError, ValidationError) as exc:
            log.warning("ignoring unreadable cache entry %s: %s", path, exc)
            return None
        self._mem[key] = answer
        return answer

    def put(self, key: str, answer: ModelAnswer, material: dict[str, Any]) -> None:
        self._mem[key] = answer
        if self.folder is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": CACHE_FORMAT, "key": key, "material": material,
                   "answer": answer.model_dump(mode="json"), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        fd, tmp = tempfile.mkstemp(prefix=".cache.", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, ensure_ascii=False, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ================================================================================ explainer

@dataclass
class ExplainStats:
    """Counters and timings of one explainer (for benches and the CLI's closing line)."""

    candidates: int = 0
    cache_hits: int = 0
    retrieval_memo_hits: int = 0
    quarantined_passages: int = 0
    model_calls: int = 0
    model_valid_first: int = 0
    model_valid_retry: int = 0
    fallbacks: int = 0
    errors: Counter = field(default_factory=Counter)
    retrieval_s: float = 0.0
    prompt_s: float = 0.0
    model_s: float = 0.0
    validate_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("candidates", "cache_hits", "retrieval_memo_hits", "quarantined_passages", "model_calls", "model_valid_first",
                                            "model_valid_retry", "fallbacks")}
        d["errors"] = dict(self.errors)
        d.update({k: round(getattr(self, k), 4) for k in ("retrieval_s", "prompt_s", "model_s", "validate_s")})
        return d


class Explainer:
    """Turns candidates into validated, cited verdicts.

    Args:
        model: Any :class:`agent.models.ChatModel`; ``None`` gives rules-only verdicts.
        store: A :class:`knowledge.store.KnowledgeStore` (passages, and its rule book when
            ``rules`` is not given); ``None`` for no retrieval.
        rules: A :class:`RuleBook` or a list of :class:`Rule`; default the store's rule book.
        cache_dir: Folder of the explanation cache (JSON); ``None`` keeps it in memory only.
        weights: The decision weights (default :meth:`DecisionWeights.from_env`).
        passages: Passages retrieved per candidate (at most).
        min_passage_score: Passages less similar than this are not shown.
        past_cases: Analyst-reviewed past cases shown (closest first, if close enough).
        max_tokens: Generation limit per call.
        use_cache: Turn the cache off (benchmarks).
    """

    def __init__(self, model: ChatModel | None, store: Any = None, rules: RuleBook | Sequence[Rule] | None = None,
                 cache_dir: str | Path | None = None, *, weights: DecisionWeights | None = None,
                 passages: int = DEFAULT_PASSAGES, min_passage_score: float = MIN_PASSAGE_SCORE, past_cases: int = 1,
                 max_tokens: int = 512, use_cache: bool = True) -> None:
        self.model = model
        self.store = store
        if rules is None and store is not None and hasattr(store, "rulebook"):
            rules = store.rulebook()
        self._rulebook = rules if isinstance(rules, RuleBook) else None
        self.rules: list[Rule] = list(rules.list() if isinstance(rules, RuleBook) else (rules or []))
        self.weights = weights or DecisionWeights.from_env(
            model.model_id if model is not None else None, getattr(model, "adapter", None) if model is not None else None)
        if passages < 0:
            raise ValueError(f"passages must be >= 0, got {passages}")
        self.k_passages = passages
        self.min_passage_score = min_passage_score
        self.past_cases = past_cases
        self.max_tokens = max_tokens
        self.cache = ExplanationCache(cache_dir) if use_cache else None
        self.stats = ExplainStats()
        self._retrieved: dict[tuple[Any, ...], list[Any]] = {}
        self.last_answer: ModelAnswer | None = None
        """The validated model answer behind the last verdict (None for rules-only ones): the
        model's own label, before the decision, for measuring its accuracy."""
        self.last_choice_probs: dict[str, dict[str, float]] = {}
        """Of the last fresh model answer: the model's label and severity distributions where it
        chose them (``Message.choice_probs``; empty on a cache hit or when the backend cannot
        tell). For diagnosis -- did the model's belief move, or only a near-tie tip? -- not used
        in the decision: voting with them was measured and not adopted (README, fine-tuning)."""
        self._knowledge_version: str | None = None

    # ------------------------------------------------------------------ versions
    @property
    def rules_version(self) -> str:
        if self._rulebook is not None:
            return self._rulebook.rules_version
        if not self.rules:
            return "none"
        rows = [json.dumps({"id": r.id, "version": r.version, "text": r.text, "predicate": r.predicate,
                            "effect": r.effect.value if r.effect else None, "severity": r.severity}, sort_keys=True)
                for r in sorted(self.rules, key=lambda r: r.id)]
        return hashlib.sha1("\n".join(rows).encode("utf-8")).hexdigest()[:12]

    @property
    def knowledge_version(self) -> str:
        if self.store is None:
            return "none"
        if self._knowledge_version is None:
            self._knowledge_version = str(self.store.version)
        return self._knowledge_version

    def refresh(self) -> None:
        """Re-read the rule book and the knowledge version (after rules or documents change)."""
        if self._rulebook is not None:
            self._rulebook = RuleBook(self._rulebook.path)
            self.rules = self._rulebook.list()
        self._knowledge_version = None
        self._retrieved.clear()

    def provenance(self) -> Provenance:
        return Provenance(model_id=self.model.model_id if self.model is not None else "none",
                          adapter=getattr(self.model, "adapter", None) if self.model is not None else None,
                          prompt_version=prompts.PROMPT_VERSION, rules_version=self.rules_version,
                          knowledge_version=self.knowledge_version)

    # ------------------------------------------------------------------ steps
    def retrieve(self, candidate: Candidate) -> list[Any]:
        """Passages for the candidate; a failing store gives none (logged), never an error.

        Memoised on the candidate's queries and the knowledge version: retrieval comes before the
        cache lookup (passage ids are part of the key) and embedding the queries costs 0.5-1 s on
        a busy 2-core machine -- more than a cache hit saves -- while candidates with the same
        evidence content (a group in a report) have the same queries.
        """
        if self.store is None or self.k_passages == 0:
            return []
        from knowledge.store import candidate_queries

        try:
            key = (tuple(candidate_queries(candidate)), self.k_passages, self.knowledge_version)
            if key in self._retrieved:
                self.stats.retrieval_memo_hits += 1
                return list(self._retrieved[key])
            found = self.store.search_for(candidate, k=self.k_passages)
            kept = [p for p in found if getattr(p, "score", None) is None or p.score >= self.min_passage_score]
            kept += self._past_cases(candidate)
            kept = [p for p in kept if not self._quarantined(p)]
            if len(self._retrieved) >= 4096:
                self._retrieved.pop(next(iter(self._retrieved)))
            self._retrieved[key] = kept
            return list(kept)
        except Exception as exc:  # retrieval is a help, not a requirement
            log.warning("retrieval failed for %s: %s", candidate.id, exc)
            self.stats.errors[f"retrieval: {type(exc).__name__}"] += 1
            return []

    def _quarantined(self, passage: Any) -> bool:
        """A passage whose text reads as an instruction to the model is not knowledge: it is not
        shown (:mod:`prompts.injection`; documents in the store are untrusted text too)."""
        marker = instruction_marker(" ".join(str(getattr(passage, f, "")) for f in ("source", "heading", "text")))
        if marker is None:
            return False
        self.stats.quarantined_passages += 1
        log.warning("passage %s not shown: %s", getattr(passage, "id", "?"), marker)
        return True

    def _past_cases(self, candidate: Candidate) -> list[Any]:
        """The closest analyst-reviewed past case (``cases`` collection), if it is close enough.

        Shown like a passage (cited by id): "the analyst confirmed a case like this as ..." is
        the most useful context a small model can get. Only when the store has cases, so a
        store without any pays no extra embedding.
        """
        if self.past_cases <= 0 or not hasattr(self.store, "count"):
            return []
        if self.store.count("cases") == 0:
            return []
        found = self.store.search_for(candidate, k=self.past_cases, collection="cases")
        return [p for p in found if getattr(p, "score", None) is not None and p.score >= MIN_CASE_SCORE]

    def shown_rules(self, candidate: Candidate) -> tuple[list[Rule], list[str]]:
        """Rules for the prompt (matched compiled ones, then text-only ones) and the matched ids."""
        matched = [r for r in self.rules if matches(r, candidate)]
        text_only = [r for r in self.rules if not r.compiled]
        shown = (matched + text_only)[:MAX_RULES_SHOWN]
        return shown, [r.id for r in matched]

    def cache_key(self, candidate: Candidate, passage_ids: Sequence[str]) -> tuple[str, dict[str, Any]]:
        material = {"signature": evidence_signature(candidate), "passages": sorted(passage_ids),
                    "rules_version": self.rules_version, "knowledge_version": self.knowledge_version,
                    "model": self.model.model_id if self.model is not None else "none",
                    "adapter": getattr(self.model, "adapter", None), "prompt_version": prompts.PROMPT_VERSION,
                    "max_tokens": self.max_tokens}
        key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode("utf-8")).hexdigest()
        return key, material

    def render(self, candidate: Candidate, passages: Sequence[Any], shown: Sequence[Rule],
               matched_ids: Sequence[str]) -> tuple[prompts.RenderedPrompt, dict[str, Any], list[Message]]:
        """The prompt, the answer schema and the chat messages for one candidate."""
        prompt = prompts.render_explain(candidate, passages, shown, matched_ids)
        schema = prompts.verdict_schema(prompt.evidence_ids, prompt.passage_ids, prompt.rule_ids)
        messages = [Message(role="system", content=prompt.system), Message(role="user", content=prompt.user)]
        return prompt, schema, messages

    def build_prompt(self, candidate: Candidate) -> tuple[prompts.RenderedPrompt, dict[str, Any], list[Message]]:
        """Exactly what :meth:`explain` would send the model for ``candidate`` (retrieval and
        rules included), without calling it: for fine-tuning data and benchmarks."""
        passages = self.retrieve(candidate)
        shown, matched_ids = self.shown_rules(candidate)
        return self.render(candidate, passages, shown, matched_ids)

    # ------------------------------------------------------------------ main
    def explain(self, candidate: Candidate) -> Verdict:
        """A validated verdict for ``candidate`` (model-explained, or rules-only on failure)."""
        self.stats.candidates += 1
        self.last_answer = None
        self.last_choice_probs = {}
        t0 = time.perf_counter()
        passages = self.retrieve(candidate)
        shown, matched_ids = self.shown_rules(candidate)
        self.stats.retrieval_s += time.perf_counter() - t0
        passage_ids = [p.id for p in passages]
        rule_ids = [r.id for r in shown]
        if self.model is None:
            return self.rules_only(candidate, "no model configured")

        key, material = self.cache_key(candidate, passage_ids)
        if self.cache is not None and (cached := self.cache.get(key)) is not None:
            try:
                verdict = self._verdict(candidate, cached, passage_ids, rule_ids)
            except (AnswerError, ValidationError, UnresolvedCitation, ValueError) as exc:
                log.warning("cached answer no longer valid for %s: %s", candidate.id, exc)
            else:
                self.stats.cache_hits += 1
                self.last_answer = cached
                return verdict

        t1 = time.perf_counter()
        prompt, schema, messages = self.render(candidate, passages, shown, matched_ids)
        self.stats.prompt_s += time.perf_counter() - t1
        last_error = ""
        for attempt in range(2):
            t2 = time.perf_counter()
            try:
                self.stats.model_calls += 1
                reply = self.model.generate(messages, schema=schema, max_tokens=self.max_tokens, temperature=0.0)
            except (ModelNotInstalled, ModelIntegrityError):
                raise
            except ModelError as exc:
                self.stats.errors[type(exc).__name__] += 1
                self.stats.model_s += time.perf_counter() - t2
                return self.rules_only(candidate, f"model failed: {type(exc).__name__}", passages)
            except Exception as exc:  # a crashing backend must not take the run down
                self.stats.errors[f"crash: {type(exc).__name__}"] += 1
                self.stats.model_s += time.perf_counter() - t2
                return self.rules_only(candidate, f"model crashed: {type(exc).__name__}", passages)
            self.stats.model_s += time.perf_counter() - t2
            t3 = time.perf_counter()
            try:
                answer = parse_answer(reply.content, prompt.unalias)
                verdict = self._verdict(candidate, answer, passage_ids, rule_ids)
            except (AnswerError, ValidationError, UnresolvedCitation) as exc:
                last_error = _short_error(exc)
                self.stats.errors[type(exc).__name__] += 1
                self.stats.validate_s += time.perf_counter() - t3
                messages = [*messages[:2], Message(role="assistant", content=reply.content[:1500]),
                            Message(role="user", content=prompts.render_retry(prompt, last_error))]
                continue
            self.stats.validate_s += time.perf_counter() - t3
            if attempt == 0:
                self.stats.model_valid_first += 1
            else:
                self.stats.model_valid_retry += 1
            if self.cache is not None:
                self.cache.put(key, answer, material)
            self.last_answer = answer
            self.last_choice_probs = {k: dict(v) for k, v in reply.choice_probs.items()}
            return verdict
        return self.rules_only(candidate, "model answer failed validation twice", passages,
                               detail=last_error)

    def explain_many(self, candidates: Iterable[Candidate]) -> list[Verdict]:
        """Verdicts for many candidates, in order."""
        return [self.explain(c) for c in candidates]

    # ------------------------------------------------------------------ building
    def _verdict(self, candidate: Candidate, answer: ModelAnswer, passage_ids: Sequence[str],
                 rule_ids: Sequence[str]) -> Verdict:
        known = candidate.evidence_ids
        steps = [CausalStep(text=s.text, evidence_ids=tuple(dict.fromkeys(s.evidence_ids)))
                 for s in answer.causal_chain if set(s.evidence_ids) <= known]  # unsupported claims dropped
        evidence = tuple(dict.fromkeys(answer.evidence_ids))
        if not evidence:
            evidence = tuple(dict.fromkeys(e for s in steps for e in s.evidence_ids)) or \
                tuple(ev.id for ev in candidate.evidence)
        decision = decide(candidate, self.rules, answer, self.weights)
        cited_rules = tuple(dict.fromkeys([*decision.rule_ids, *answer.rule_ids]))
        summary = answer.summary
        if decision.label is not answer.label:
            summary = f"Decision: {decision.label.value} ({decision.note}); the model judged {answer.label.value}: {summary}"
        anomaly_type = "none" if decision.label is Label.NORMAL else answer.anomaly_type
        verdict = Verdict(
            candidate_id=candidate.id, label=decision.label, severity=decision.severity,
            anomaly_type=anomaly_type[:80], summary=summary[:600], causal_chain=tuple(steps),
            evidence_ids=evidence, passage_ids=tuple(dict.fromkeys(answer.passage_ids)), rule_ids=cited_rules,
            confidence=decision.confidence, actions=tuple(a for a in answer.actions if a.strip()),
            provenance=self.provenance(), explained_by=ExplainedBy.MODEL)
        check_citations(verdict, candidate, set(passage_ids), set(rule_ids) | set(decision.rule_ids))
        return verdict

    def rules_only(self, candidate: Candidate, reason: str, passages: Sequence[Any] = (),
                   detail: str = "") -> Verdict:
        """The deterministic fallback: detector score vs threshold plus the matched rules."""
        self.stats.fallbacks += 1
        if detail:
            log.info("rules-only verdict for %s: %s (%s)", candidate.id, reason, detail)
        decision = decide(candidate, self.rules, None, self.weights)
        reasons = Counter(str(ev.data.get("reason")) for ev in candidate.evidence if isinstance(ev.data.get("reason"), str))
        if decision.label is Label.NORMAL:
            anomaly_type = "none"
        elif reasons:
            anomaly_type = reasons.most_common(1)[0][0].replace("_", " ")[:80]
        else:
            anomaly_type = f"{candidate.modality.value} anomaly"
        steps = tuple(CausalStep(text=ev.summary[:400] or ev.id, evidence_ids=(ev.id,)) for ev in candidate.evidence[:4])
        rel = "above" if candidate.score > candidate.threshold else "at or below"
        rules_txt = ""
        if decision.rule_ids:
            effects = {r.id: (r.effect.value if r.effect else "guidance") for r in self.rules}
            rules_txt = " Rules applied: " + ", ".join(f"{rid} ({effects.get(rid, '?')})" for rid in decision.rule_ids) + "."
        summary = (f"Rules-only verdict ({reason}). Detector {candidate.detector} scored {candidate.score:.4g}, "
                   f"{rel} its threshold {candidate.threshold:.4g}; {len(candidate.evidence)} evidence item(s)."
                   f"{rules_txt}")
        actions: list[str] = []
        first, last = candidate.locator.get("first_line"), candidate.locator.get("last_line")
        if isinstance(first, int) and isinstance(last, int):
            actions.append(f"Review lines {first}-{last} of {candidate.source}"[:200])
        elif candidate.evidence:
            actions.append("Review the cited evidence in the source")
        verdict = Verdict(
            candidate_id=candidate.id, label=decision.label, severity=decision.severity, anomaly_type=anomaly_type,
            summary=summary[:600], causal_chain=steps, evidence_ids=tuple(ev.id for ev in candidate.evidence),
            passage_ids=(), rule_ids=decision.rule_ids, confidence=decision.confidence, actions=tuple(actions),
            provenance=self.provenance(), explained_by=ExplainedBy.RULES_ONLY)
        check_citations(verdict, candidate, set(), set(decision.rule_ids))
        return verdict


def _short_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'verdict'}: {e['msg']}" for e in exc.errors()[:6])
    return str(exc)[:400]

