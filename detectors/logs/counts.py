"""Collective anomalies from event-count vectors: PCA residual and Isolation Forest.

A sequence becomes a vector of template counts (column 0 counts lines whose template
was never seen in training). Normal workflows obey near-linear invariants -- e.g.
in HDFS every "Receiving block" is matched by a "Received block" and a
"PacketResponder ... terminating" -- so PCA fitted on normal vectors leaves almost
no residual for them, and a broken workflow leaves a large one (Xu et al., SOSP'09).
The evidence names the templates whose counts deviate from what the normal
subspace expects, with observed and expected counts, and their lines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest

from detectors.logs.base import LogDetector, line_evidence, vocabulary
from detectors.logs.sessions import LogSequence
from detectors.records import Evidence


def count_matrix(items: Sequence[LogSequence], vocab: dict[int, int]) -> np.ndarray:
    """Rows = sequences, columns = templates (column 0 = unseen in training)."""
    mat = np.zeros((len(items), len(vocab) + 1), dtype=np.float64)
    for i, seq in enumerate(items):
        row = mat[i]
        for event in seq.events:
            row[vocab.get(event.template_id, 0)] += 1.0
    return mat


class PCACountDetector(LogDetector):
    """Squared residual (SPE) of the count vector outside the normal PCA subspace.

    Args:
        variance: Share of training variance the normal subspace keeps; the rest
            (near-zero directions = workflow invariants) is the anomaly space.
        unseen_weight: Residual added per line of an unseen template, which PCA
            cannot see because its column is constant in training. Large, so a
            never-seen template always clears the threshold.
        min_threshold: Floor of the learned threshold (squared counts).
        contamination: Default 0: normal workflows leave (almost) no residual, so
            the largest training residual is the natural edge of normal; a
            quantile would put the threshold inside the point mass at zero.
    """

    name = "log-pca"

    def __init__(self, *, variance: float = 0.999, unseen_weight: float = 10.0, min_threshold: float = 0.5,
                 contamination: float = 0.0, threshold: float | None = None) -> None:
        super().__init__(contamination=contamination, threshold=threshold)
        if not 0.0 < variance < 1.0:
            raise ValueError(f"variance must be in (0, 1), got {variance!r}")
        self.variance = variance
        self.unseen_weight = unseen_weight
        self.min_threshold = min_threshold

    def _threshold_floor(self) -> float | None:
        # On very regular training data the largest residual is ~1e-30; a residual
        # of less than half a line's count is never a finding.
        return self.min_threshold

    def _fit(self, items: Sequence[LogSequence]) -> None:
        self.vocab_ = vocabulary(items)
        # Template text by id, so evidence can name a template the item lacks.
        self.template_text_ = {e.template_id: e.template for seq in items for e in seq.events}
        mat = count_matrix(items, self.vocab_)
        self.mean_ = mat.mean(axis=0)
        n_comp = min(mat.shape[0], mat.shape[1])
        pca = PCA(n_components=n_comp, svd_solver="full").fit(mat)
        ratio = np.cumsum(pca.explained_variance_ratio_)
        k = int(np.searchsorted(ratio, self.variance) + 1) if ratio[-1] > 0 else 0
        self.n_components_ = min(k, n_comp)
        self.components_ = pca.components_[: self.n_components_]

    def _residual(self, mat: np.ndarray) -> np.ndarray:
        centred = mat - self.mean_
        return centred - centred @ self.components_.T @ self.components_

    def _score(self, items: Sequence[LogSequence]) -> np.ndarray:
        mat = count_matrix(items, self.vocab_)
        resid = self._residual(mat)
        return (resid[:, 1:] ** 2).sum(axis=1) + self.unseen_weight * mat[:, 0]

    def evidence(self, item: LogSequence, score: float) -> tuple[Evidence, ...]:
        mat = count_matrix([item], self.vocab_)
        resid = self._residual(mat)[0]
        expected = mat[0] - resid
        inverse = {col: tid for tid, col in self.vocab_.items()}
        template_text = {**self.template_text_, **{e.template_id: e.template for e in item.events}}
        out: list[Evidence] = []
        if mat[0, 0] > 0:
            events = [e for e in item.events if e.template_id not in self.vocab_]
            out.append(line_evidence("E1", f"{len(events)} line(s) of templates never seen in normal sequences",
                                     events, "unseen_template", observed=int(mat[0, 0]), expected=0))
        order = np.argsort(-np.abs(resid[1:])) + 1
        total = float((resid[1:] ** 2).sum()) or 1.0
        for col in order[:4]:
            share = float(resid[col] ** 2) / total
            if abs(resid[col]) < 0.5 or share < 0.05:
                break
            tid = inverse[int(col)]
            events = [e for e in item.events if e.template_id == tid]
            obs, exp = int(mat[0, col]), float(expected[col])
            text = template_text.get(tid, f"template {tid}")
            direction = "more" if obs > exp else "fewer"
            anchor = f", first at line {events[0].line_no}" if events else f"; sequence spans lines {item.first_line}-{item.last_line}"
            out.append(line_evidence(
                f"E{len(out) + 1}",
                f"{obs} x '{text[:100]}' where the normal workflow implies {exp:.1f} ({direction} than expected){anchor}",
                events or [item.events[-1]], "count_deviation",
                template=text, observed=obs, expected=round(exp, 3), share_of_residual=round(share, 3),
            ))
        return tuple(out)


class IsolationForestCountDetector(LogDetector):
    """Isolation Forest (scikit-learn) on count vectors: a distribution-free baseline."""

    name = "log-iforest"

    def __init__(self, *, n_estimators: int = 200, random_state: int = 0,
                 contamination: float = 0.001, threshold: float | None = None) -> None:
        super().__init__(contamination=contamination, threshold=threshold)
        self.n_estimators = n_estimators
        self.random_state = random_state

    def _fit(self, items: Sequence[LogSequence]) -> None:
        self.vocab_ = vocabulary(items)
        mat = count_matrix(items, self.vocab_)
        self.model_ = IsolationForest(n_estimators=self.n_estimators, random_state=self.random_state).fit(mat)

    def _score(self, items: Sequence[LogSequence]) -> np.ndarray:
        mat = count_matrix(items, self.vocab_)
        # score_samples is higher for normal points; negate so higher = more anomalous,
        # and add the unseen column so a new template always counts.
        return -self.model_.score_samples(mat) + mat[:, 0]

    def evidence(self, item: LogSequence, score: float) -> tuple[Evidence, ...]:
        mat = count_matrix([item], self.vocab_)[0]
        events = [e for e in item.events if e.template_id not in self.vocab_]
        if events:
            return (line_evidence("E1", f"{len(events)} line(s) of templates never seen in normal sequences",
                                  events, "unseen_template"),)
        return (line_evidence("E1", f"the template-count profile of these {int(mat.sum())} lines is isolated "
                                    f"quickly from normal sequences (isolation score {score:.3f})",
                              list(item.events), "isolated_count_profile"),)


class LoglizerPCABaseline(LogDetector):
    """The loglizer PCA baseline: TF-IDF weighted, zero-mean counts and the Q-statistic.

    Kept as an in-run baseline so our numbers are compared with a known method
    measured on the same split (He et al., loglizer).
    """

    name = "baseline-loglizer-pca"

    def __init__(self, *, n_components: float = 0.95, c_alpha: float = 3.2905,
                 contamination: float = 0.001, threshold: float | None = None) -> None:
        super().__init__(contamination=contamination, threshold=threshold)
        self.n_components = n_components
        self.c_alpha = c_alpha

    def _transform(self, mat: np.ndarray) -> np.ndarray:
        mat = mat * self.idf_
        return mat - self.mean_

    def _fit(self, items: Sequence[LogSequence]) -> None:
        self.vocab_ = vocabulary(items)
        mat = count_matrix(items, self.vocab_)
        df = (mat > 0).sum(axis=0)
        self.idf_ = np.log(len(items) / (df + 1e-8))
        self.idf_[df == 0] = 0.0
        self.mean_ = (mat * self.idf_).mean(axis=0)
        x = self._transform(mat)
        cov = x.T @ x / len(items)
        u, sigma, _ = np.linalg.svd(cov)
        k = int(np.searchsorted(np.cumsum(sigma) / max(sigma.sum(), 1e-12), self.n_components) + 1)
        p = u[:, :k]
        self.proj_c_ = np.eye(x.shape[1]) - p @ p.T
        # Q-statistic threshold (Jackson & Mudholkar), as loglizer computes it.
        phi = [float(np.sum(sigma[k:] ** i)) for i in (1, 2, 3)]
        if phi[0] > 0 and phi[1] > 0:
            h0 = 1.0 - 2 * phi[0] * phi[2] / (3.0 * phi[1] ** 2)
            self.q_threshold_ = float(phi[0] * np.power(
                self.c_alpha * np.sqrt(2 * phi[1] * h0 ** 2) / phi[0] + 1.0 + phi[1] * h0 * (h0 - 1) / phi[0] ** 2,
                1.0 / h0))
        else:
            self.q_threshold_ = 0.0

    def _learned_threshold(self) -> float | None:
        return self.q_threshold_

    def evidence(self, item: LogSequence, score: float) -> tuple[Evidence, ...]:
        mat = count_matrix([item], self.vocab_)
        resid = (self._transform(mat) @ self.proj_c_)[0]
        inverse = {col: tid for tid, col in self.vocab_.items()}
        out: list[Evidence] = []
        for col in np.argsort(-np.abs(resid))[:3]:
            if col == 0 or abs(resid[col]) < 1e-9:
                continue
            tid = inverse[int(col)]
            events = [e for e in item.events if e.template_id == tid] or [item.events[-1]]
            out.append(line_evidence(
                f"E{len(out) + 1}", f"TF-IDF weighted count of '{events[0].template[:90]}' is off the normal "
                                    f"subspace (residual {resid[col]:+.2f})",
                events, "count_deviation", observed=int(mat[0, col]), residual=round(float(resid[col]), 4)))
        return tuple(out)

    def _score(self, items: Sequence[LogSequence]) -> np.ndarray:
        x = self._transform(count_matrix(items, self.vocab_))
        resid = x @ self.proj_c_
        return (resid ** 2).sum(axis=1)
