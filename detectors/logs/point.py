"""Point anomalies in logs: unseen or rare templates, out-of-range numbers, error bursts.

Each detector scores a sequence by its most surprising line(s) and names those
lines in its evidence, so a candidate always points at the exact lines.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
from scipy.stats import poisson

from detectors.logs.base import LogDetector, line_evidence
from detectors.logs.ingest import ERROR_LEVELS, WARN_LEVELS
from detectors.logs.sessions import UNSEEN, LogSequence
from detectors.records import Evidence

# A number that is a whole token (after a space, '=', ':', '(' or ','), so digits
# inside ids such as blk_-123 or 10.0.0.1 are not mistaken for measurements.
_NUMBER = re.compile(r"(?:(?<=^)|(?<=[\s=:(\[,]))[-+]?\d+(?:\.\d+)?(?=$|[\s,;)\]]|ms\b|s\b|%)")


class RareTemplateDetector(LogDetector):
    """Flags sequences containing templates never or rarely seen in normal sequences.

    Score = the largest surprise ``-log10(p)`` over the sequence's templates, where
    ``p`` is the smoothed share of normal training sequences containing the template.
    An unseen template gets the surprise of a template seen zero times.

    Args:
        smoothing: Pseudo-count added to every template's sequence count.
    """

    name = "log-rare-template"

    def __init__(self, *, smoothing: float = 0.5, contamination: float = 0.001, threshold: float | None = None) -> None:
        super().__init__(contamination=contamination, threshold=threshold)
        self.smoothing = smoothing

    def _fit(self, items: Sequence[LogSequence]) -> None:
        doc_freq: Counter[int] = Counter()
        for seq in items:
            doc_freq.update(set(seq.templates))
        doc_freq.pop(UNSEEN, None)
        self.n_train_ = len(items)
        self.doc_freq_ = dict(doc_freq)

    def _surprise(self, template_id: int) -> float:
        count = self.doc_freq_.get(template_id, 0) if template_id != UNSEEN else 0
        return -math.log10((count + self.smoothing) / (self.n_train_ + self.smoothing))

    def _score(self, items: Sequence[LogSequence]) -> np.ndarray:
        return np.array([max((self._surprise(t) for t in set(seq.templates)), default=0.0) for seq in items])

    def evidence(self, item: LogSequence, score: float) -> tuple[Evidence, ...]:
        out: list[Evidence] = []
        by_template: dict[int, list] = defaultdict(list)
        for event in item.events:
            by_template[event.template_id].append(event)
        ranked = sorted(by_template, key=self._surprise, reverse=True)
        for tid in ranked:
            if self._surprise(tid) <= self.threshold_ or len(out) >= 4:
                break
            events = by_template[tid]
            seen = self.doc_freq_.get(tid, 0) if tid != UNSEEN else 0
            if seen == 0:
                summary = f"{len(events)} line(s) match no template seen in normal data, first at line {events[0].line_no}"
                reason = "unseen_template"
            else:
                summary = (f"template seen in only {seen} of {self.n_train_} normal sequences: "
                           f"'{events[0].template[:120]}' at line {events[0].line_no}")
                reason = "rare_template"
            out.append(line_evidence(f"E{len(out) + 1}", summary, events, reason,
                                     normal_sequences_with_template=seen, normal_sequences=self.n_train_))
        return tuple(out)


class ParameterRangeDetector(LogDetector):
    """Flags numeric parameters outside the range learned per template and position.

    For every (template, k-th number in the message) seen at least ``min_count``
    times, the normal range is [min, max] of training values. The score is the
    largest excess beyond the range in units of the range width (plus one, so
    1.0 means 'just at the edge').

    Args:
        min_count: Positions seen fewer times are not checked (too little evidence).
        max_positions: Numbers per message that are checked.
        margin: Training values define the range, so every training score is 0;
            the threshold is ``margin`` range-widths beyond the edge instead.
    """

    name = "log-param-range"

    def __init__(self, *, min_count: int = 30, max_positions: int = 8, margin: float = 1.0,
                 contamination: float = 0.0, threshold: float | None = None) -> None:
        super().__init__(contamination=contamination, threshold=threshold)
        self.min_count = min_count
        self.max_positions = max_positions
        self.margin = margin

    def _threshold_floor(self) -> float | None:
        return self.margin

    def _numbers(self, content: str) -> list[float]:
        return [float(x) for x in _NUMBER.findall(content)[: self.max_positions]]

    def _fit(self, items: Sequence[LogSequence]) -> None:
        values: dict[tuple[int, int], list[float]] = defaultdict(list)
        for seq in items:
            for event in seq.events:
                if event.template_id == UNSEEN:
                    continue
                for k, v in enumerate(self._numbers(event.content)):
                    values[(event.template_id, k)].append(v)
        self.ranges_: dict[tuple[int, int], tuple[float, float]] = {}
        for key, vals in values.items():
            if len(vals) >= self.min_count:
                arr = np.asarray(vals)
                self.ranges_[key] = (float(arr.min()), float(arr.max()))
        self.templates_with_ranges_ = frozenset(tid for tid, _ in self.ranges_)

    def _line_excess(self, template_id: int, content: str) -> list[tuple[float, int, float, tuple[float, float]]]:
        out = []
        if template_id not in self.templates_with_ranges_:
            return out
        for k, v in enumerate(self._numbers(content)):
            rng = self.ranges_.get((template_id, k))
            if rng is None:
                continue
            lo, hi = rng
            width = max(hi - lo, abs(hi) * 0.01, 1e-9)
            excess = max(lo - v, v - hi, 0.0) / width
            out.append((excess, k, v, rng))
        return out

    def _score(self, items: Sequence[LogSequence]) -> np.ndarray:
        scores = np.zeros(len(items))
        checked = self.templates_with_ranges_
        ranges = self.ranges_
        limit = self.max_positions
        for i, seq in enumerate(items):
            best = 0.0
            for event in seq.events:
                tid = event.template_id
                if tid not in checked:
                    continue
                for k, text in enumerate(_NUMBER.findall(event.content)[:limit]):
                    rng = ranges.get((tid, k))
                    if rng is not None:
                        v = float(text)
                        lo, hi = rng
                        if v < lo or v > hi:
                            width = max(hi - lo, abs(hi) * 0.01, 1e-9)
                            best = max(best, (lo - v) / width if v < lo else (v - hi) / width)
            scores[i] = best
        return scores

    def evidence(self, item: LogSequence, score: float) -> tuple[Evidence, ...]:
        hits = []
        for event in item.events:
            for excess, k, v, (lo, hi) in self._line_excess(event.template_id, event.content):
                if excess > self.threshold_:
                    hits.append((excess, event, k, v, lo, hi))
        hits.sort(key=lambda h: h[0], reverse=True)
        out = []
        for excess, event, k, v, lo, hi in hits[:4]:
            out.append(line_evidence(
                f"E{len(out) + 1}",
                f"number #{k + 1} = {v:g} at line {event.line_no} is outside the normal range [{lo:g}, {hi:g}]",
                [event], "out_of_range_parameter", position=k, observed=v, normal_min=lo, normal_max=hi,
            ))
        return tuple(out)


class ErrorBurstDetector(LogDetector):
    """Flags sequences with more error/warning lines than the normal rate explains.

    The normal per-line rates of error- and warning-level lines are learned; the
    score is the Poisson surprise ``-log10 P(X >= k)`` of the observed count ``k``
    (errors weigh fully, warnings by ``warn_weight`` of their surprise).
    """

    name = "log-error-burst"

    def __init__(self, *, warn_weight: float = 0.5, contamination: float = 0.001, threshold: float | None = None) -> None:
        super().__init__(contamination=contamination, threshold=threshold)
        self.warn_weight = warn_weight

    def _fit(self, items: Sequence[LogSequence]) -> None:
        lines = sum(len(s.events) for s in items)
        errors = sum(e.level in ERROR_LEVELS for s in items for e in s.events)
        warns = sum(e.level in WARN_LEVELS for s in items for e in s.events)
        # Add-one smoothing so a clean training set still yields a finite rate.
        self.error_rate_ = (errors + 1) / (lines + 1)
        self.warn_rate_ = (warns + 1) / (lines + 1)

    @staticmethod
    def _tail(k: int, mu: float) -> float:
        if k == 0:
            return 0.0
        return float(-np.log10(max(poisson.sf(k - 1, mu), 1e-300)))

    def _parts(self, seq: LogSequence) -> tuple[float, float]:
        n = len(seq.events)
        errors = sum(e.level in ERROR_LEVELS for e in seq.events)
        warns = sum(e.level in WARN_LEVELS for e in seq.events)
        return self._tail(errors, self.error_rate_ * n), self.warn_weight * self._tail(warns, self.warn_rate_ * n)

    def _score(self, items: Sequence[LogSequence]) -> np.ndarray:
        return np.array([max(self._parts(s)) for s in items])

    def evidence(self, item: LogSequence, score: float) -> tuple[Evidence, ...]:
        err, warn = self._parts(item)
        out = []
        for label, levels, part, rate in (("error", ERROR_LEVELS, err, self.error_rate_),
                                          ("warning", WARN_LEVELS, warn, self.warn_rate_)):
            events = [e for e in item.events if e.level in levels]
            if events and part > 0:
                expected = rate * len(item.events)
                out.append(line_evidence(
                    f"E{len(out) + 1}",
                    f"{len(events)} {label}-level line(s) where about {expected:.2f} are normal, first at line {events[0].line_no}",
                    events, f"{label}_burst", observed=len(events), expected=round(expected, 4),
                ))
        return tuple(out)


class CooccurrenceDetector(LogDetector):
    """Flags sequences where two templates occur together that never (or rarely) do in normal ones.

    The set-level analogue of unseen n-grams: it ignores the order of lines, so it
    is robust to the interleaving of concurrent work inside one session, yet it sees
    conjunctions a linear count model cannot (in HDFS: a block that was
    re-replicated *and* then fully deleted). Score = largest surprise
    ``-log10(p)`` over the sequence's template pairs, ``p`` the smoothed share of
    normal training sequences containing the pair.

    Args:
        smoothing: Pseudo-count per pair.
        max_templates: Sequences with more distinct templates only check the pairs
            among their first ``max_templates`` (bounds cost on huge windows).
    """

    name = "log-cooccurrence"

    def __init__(self, *, smoothing: float = 0.5, max_templates: int = 64,
                 contamination: float = 0.0, threshold: float | None = None) -> None:
        super().__init__(contamination=contamination, threshold=threshold)
        self.smoothing = smoothing
        self.max_templates = max_templates

    def _pairs(self, seq: LogSequence) -> list[tuple[int, int]]:
        # Unseen lines are the rare-template detector's finding; pairing them with
        # every other template would only repeat it.
        ids = sorted(set(seq.templates) - {UNSEEN})[: self.max_templates]
        return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]

    def _fit(self, items: Sequence[LogSequence]) -> None:
        counts: Counter[tuple[int, int]] = Counter()
        for seq in items:
            counts.update(self._pairs(seq))
        self.pair_counts_ = dict(counts)
        self.n_train_ = len(items)

    def _surprise(self, pair: tuple[int, int]) -> float:
        count = self.pair_counts_.get(pair, 0)
        return -math.log10((count + self.smoothing) / (self.n_train_ + self.smoothing))

    def _score(self, items: Sequence[LogSequence]) -> np.ndarray:
        return np.array([max((self._surprise(p) for p in self._pairs(s)), default=0.0) for s in items])

    def evidence(self, item: LogSequence, score: float) -> tuple[Evidence, ...]:
        pairs = sorted(self._pairs(item), key=self._surprise, reverse=True)
        out: list[Evidence] = []
        for a, b in pairs:
            if self._surprise((a, b)) <= self.threshold_ or len(out) >= 3:
                break
            ev_a = [e for e in item.events if e.template_id == a]
            ev_b = [e for e in item.events if e.template_id == b]
            seen = self.pair_counts_.get((a, b), 0)
            out.append(line_evidence(
                f"E{len(out) + 1}",
                f"'{ev_a[0].template[:70]}' (line {ev_a[0].line_no}) and '{ev_b[0].template[:70]}' "
                f"(line {ev_b[0].line_no}) occur together in only {seen} of {self.n_train_} normal sequences",
                ev_a[:3] + ev_b[:3], "rare_cooccurrence", normal_sequences_with_pair=seen,
                normal_sequences=self.n_train_,
            ))
        return tuple(out)
