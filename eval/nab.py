"""NAB: the Numenta Anomaly Benchmark scorer (standard profiles) and the runner for our detectors.

The scorer follows NAB v1.x ``nab/sweeper.py`` exactly:

* per file, the first ``min(floor(0.15 * n), 0.15 * 5000)`` rows are probationary
  (not scored);
* a row inside window ``[l, r]`` (indices, inclusive, width ``w = r - l + 1``) is
  worth ``A_TP * S(-(r - i + 1) / w) / S(-1)`` if it is the first detection in the
  window, where ``S(x) = 2 * sigmoid(-5x) - 1`` (``-1`` when ``x > 3``);
* a row outside windows is worth ``A_FP * S(|i - r_prev| / (w_prev - 1))`` after a
  window, ``-A_FP`` before any window;
* a window with no detection costs ``-A_FN``;
* one threshold for the whole corpus, chosen by sweeping every distinct score
  (exactly what NAB's optimiser does), detection = ``score >= threshold``;
* normalised score ``100 * (raw - null) / (perfect - null)``.

The sweep is vectorised: inside a window only the earliest detection counts, and
since ``S`` falls along the window, the window's value at threshold ``t`` is the
running maximum of its rows' values taken in decreasing score order.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.ts_metrics import affiliation_prf, pate, point_prf, vus_pr

PROFILES: dict[str, dict[str, float]] = {
    "standard": {"tp": 1.0, "fp": 0.11, "fn": 1.0},
    "reward_low_FP_rate": {"tp": 1.0, "fp": 0.22, "fn": 1.0},
    "reward_low_FN_rate": {"tp": 1.0, "fp": 0.11, "fn": 2.0},
}


def load_profiles(path: Path) -> dict[str, dict[str, float]]:
    """NAB's ``config/profiles.json`` -> ``{profile: {tp, fp, fn}}``."""
    raw = json.loads(Path(path).read_text())
    return {name: {"tp": v["CostMatrix"]["tpWeight"], "fp": v["CostMatrix"]["fpWeight"],
                   "fn": v["CostMatrix"]["fnWeight"]} for name, v in raw.items()}


def scaled_sigmoid(x: np.ndarray) -> np.ndarray:
    """NAB's ``scaledSigmoid``: ``2 / (1 + exp(5x)) - 1``, and ``-1`` beyond ``x > 3``."""
    x = np.asarray(x, dtype=float)
    with np.errstate(over="ignore"):
        val = 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0
    return np.where(x > 3.0, -1.0, val)


def probationary_length(n: int, percent: float = 0.15) -> int:
    """Rows not scored at the start of a file of ``n`` rows."""
    return int(min(math.floor(percent * n), percent * 5000))


@dataclass(frozen=True)
class FileScoring:
    """Per-row sweep values of one file, ready for the corpus sweep.

    Attributes:
        scores: Detector scores of the scorable rows.
        weights: Unit sweep value of each scorable row (TP value for window rows,
            FP value otherwise), before profile weights.
        window: Window index of each scorable row (``-1`` outside windows).
        n_windows: Windows with at least one scorable row.
    """

    scores: np.ndarray
    tp_value: np.ndarray
    fp_value: np.ndarray
    window: np.ndarray
    n_windows: int


def window_indices(timestamps: np.ndarray, windows: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """Window ``[start, end]`` timestamps -> inclusive row indices."""
    ts = np.asarray(timestamps).astype("datetime64[ns]")
    out = []
    for a, b in windows:
        l = int(np.searchsorted(ts, np.datetime64(pd.Timestamp(a)), side="left"))
        r = int(np.searchsorted(ts, np.datetime64(pd.Timestamp(b)), side="right")) - 1
        if r >= l:
            out.append((l, r))
    return out


def prepare_file(scores: np.ndarray, windows: Sequence[tuple[int, int]], probation: float = 0.15) -> FileScoring:
    """NAB ``calcSweepScore`` for one file: the unweighted value of each scorable row."""
    s = np.asarray(scores, dtype=float)
    n = len(s)
    idx = np.arange(n)
    win = np.full(n, -1)
    tp_val = np.zeros(n)
    fp_val = np.full(n, -1.0)
    prev_r, prev_w = None, None
    edges = sorted(windows)
    # FP values between windows depend on the previous window
    for k, (l, r) in enumerate(edges):
        w = r - l + 1
        win[l : r + 1] = k
        tp_val[l : r + 1] = scaled_sigmoid(-(r - idx[l : r + 1] + 1) / w) / scaled_sigmoid(-1.0)
        nxt = edges[k + 1][0] if k + 1 < len(edges) else n
        after = idx[r + 1 : nxt]
        if w > 1:
            fp_val[r + 1 : nxt] = scaled_sigmoid(np.abs(r - after) / (w - 1))
        else:
            fp_val[r + 1 : nxt] = -1.0
    p = probationary_length(n, probation)
    keep = idx >= p
    wk = win[keep]
    return FileScoring(s[keep], tp_val[keep], fp_val[keep], wk, len(np.unique(wk[wk >= 0])))


def sweep(files: Sequence[FileScoring], profile: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Total raw score at every distinct threshold over the corpus.

    Returns:
        ``(thresholds, totals)`` with thresholds decreasing; the total at
        ``thresholds[i]`` counts every row with ``score >= thresholds[i]``.
    """
    all_s, all_d = [], []
    n_windows = 0
    for f in files:
        out = f.window < 0
        all_s.append(f.scores[out])
        all_d.append(profile["fp"] * f.fp_value[out])
        inw = ~out
        if inw.any():
            s, v, w = f.scores[inw], profile["tp"] * f.tp_value[inw], f.window[inw]
            order = np.lexsort((-v, -s, w))  # by window, then score desc (ties: best value first)
            s, v, w = s[order], v[order], w[order]
            start = np.concatenate(([True], w[1:] != w[:-1]))
            # running max of value within each window, in decreasing-score order
            grp = np.cumsum(start) - 1
            run = v.copy()
            # segment-wise cumulative max via a shifted key (values are within [-1, 1] * tp)
            key = grp * 10.0 + (run + 5.0)
            run = np.maximum.accumulate(key) - grp * 10.0 - 5.0
            prev = np.concatenate(([0.0], run[:-1]))
            prev[start] = -profile["fn"]
            all_s.append(s)
            all_d.append(run - prev)
            n_windows += int(start.sum())
    s = np.concatenate(all_s) if all_s else np.zeros(0)
    d = np.concatenate(all_d) if all_d else np.zeros(0)
    base = -profile["fn"] * n_windows
    order = np.argsort(-s, kind="stable")
    s, d = s[order], d[order]
    tot = base + np.cumsum(d)
    last = np.concatenate((s[1:] != s[:-1], [True]))
    thresholds = np.concatenate(([np.inf], s[last]))
    totals = np.concatenate(([base], tot[last]))
    return thresholds, totals


def null_and_perfect(files: Sequence[FileScoring], profile: dict[str, float]) -> tuple[float, float]:
    """Raw scores of the null detector (flags nothing) and the perfect one (first row of each window)."""
    n_windows = sum(f.n_windows for f in files)
    perfect = 0.0
    for f in files:
        for k in np.unique(f.window[f.window >= 0]):
            perfect += profile["tp"] * float(f.tp_value[f.window == k][0])
    return -profile["fn"] * n_windows, perfect


def score_corpus(files: Sequence[FileScoring], profile: dict[str, float], threshold: float | None = None) -> dict[str, float]:
    """Normalised NAB score; ``threshold=None`` = NAB's corpus-optimised threshold."""
    th, tot = sweep(files, profile)
    null, perfect = null_and_perfect(files, profile)
    if threshold is None:
        k = int(np.argmax(tot))
    else:
        k = int(np.searchsorted(-th, -threshold, side="right") - 1)  # largest listed threshold <= given
    raw = float(tot[k])
    norm = 100.0 * (raw - null) / (perfect - null) if perfect != null else float("nan")
    return {"score": norm, "raw": raw, "threshold": float(th[k]),
            "null": null, "perfect": perfect}


# ----------------------------------------------------------------------- corpus I/O
def load_corpus(nab_dir: Path) -> dict[str, tuple[pd.DataFrame, list[list[str]]]]:
    """``{"category/file.csv": (frame with timestamp,value, windows)}`` from a NAB folder."""
    windows = json.loads((nab_dir / "labels" / "combined_windows.json").read_text())
    out = {}
    for key in sorted(windows):
        df = pd.read_csv(nab_dir / "data" / key)
        df["timestamp"] = pd.to_datetime(df["timestamp"])
        out[key] = (df, windows[key])
    return out


def score_results_dir(nab_dir: Path, results_dir: Path, detector: str,
                      profiles: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Score a NAB results folder (``<detector>/<category>/<detector>_<file>.csv``) like NAB does."""
    profiles = profiles or PROFILES
    windows = json.loads((nab_dir / "labels" / "combined_windows.json").read_text())
    files = []
    for key in sorted(windows):
        cat, name = key.split("/")
        path = results_dir / detector / cat / f"{detector}_{name}"
        if not path.exists():
            continue
        df = pd.read_csv(path)
        ts = pd.to_datetime(df["timestamp"]).to_numpy()
        files.append(prepare_file(df["anomaly_score"].to_numpy(float), window_indices(ts, windows[key])))
    return {"files": len(files), **{p: score_corpus(files, w) for p, w in profiles.items()}}


# ----------------------------------------------------------------------- our detectors
ScoreFn = Callable[[np.ndarray, int], np.ndarray]
"""(values, probationary length) -> one score per row, using only past rows for row t."""


def run_detectors(nab_dir: Path, scorers: dict[str, ScoreFn], *, echo: Callable[[str], None] = print,
                  profiles: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Score every NAB file with every detector; NAB scores plus a label-honest variant.

    Reported per detector and profile:

    * ``score``: NAB protocol (one threshold optimised on the whole labelled corpus,
      as every published NAB result does);
    * ``cv_score``: two-fold cross-validation over files (threshold optimised on the
      other half of the files), so no file's labels pick its own threshold;
    * ``fixed_score``: the detector's own label-free threshold, when it has one.
    """
    profiles = profiles or PROFILES
    corpus = load_corpus(nab_dir)
    keys = list(corpus)
    prepared: dict[str, list[FileScoring]] = {name: [] for name in scorers}
    labels: list[np.ndarray] = []
    raw_scores: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    seconds: dict[str, float] = {name: 0.0 for name in scorers}
    for key in keys:
        df, wins = corpus[key]
        x = df["value"].to_numpy(float)
        idx = window_indices(df["timestamp"].to_numpy(), wins)
        p = probationary_length(len(x))
        yv = np.zeros(len(x), dtype=bool)
        for l, r in idx:
            yv[l : r + 1] = True
        labels.append(yv[p:])
        for name, fn in scorers.items():
            t0 = time.perf_counter()
            s = np.asarray(fn(x, p), dtype=float)
            seconds[name] += time.perf_counter() - t0
            prepared[name].append(prepare_file(s, idx))
            raw_scores[name].append(s[p:])
    fold = np.array([i % 2 for i in range(len(keys))])
    out: dict[str, Any] = {}
    for name in scorers:
        files = prepared[name]
        res: dict[str, Any] = {"seconds": round(seconds[name], 2)}
        for prof, w in profiles.items():
            full = score_corpus(files, w)
            cv_raw = 0.0
            for k in (0, 1):
                train = [f for f, g in zip(files, fold) if g != k]
                test = [f for f, g in zip(files, fold) if g == k]
                thr = score_corpus(train, w)["threshold"]
                cv_raw += score_corpus(test, w, thr)["raw"]
            null, perfect = null_and_perfect(files, w)
            res[prof] = {"score": round(full["score"], 2), "threshold": full["threshold"],
                         "cv_score": round(100 * (cv_raw - null) / (perfect - null), 2)}
        y_all = np.concatenate(labels)
        s_all = np.nan_to_num(np.concatenate(raw_scores[name]))
        pred = s_all >= res["standard"]["threshold"]
        pt = point_prf(y_all, pred)
        aff = affiliation_prf(y_all, pred)
        res["window_metrics"] = {  # windows as labels, scored rows only, all files concatenated
            "vus_pr": round(vus_pr(y_all, s_all, max_buffer=100), 4), "pate": round(pate(y_all, s_all), 4),
            "point_f1_at_nab_threshold": round(pt["f1"], 4),
            "affiliation_precision": round(aff["precision"], 4), "affiliation_recall": round(aff["recall"], 4)}
        out[name] = res
        echo(f"  NAB {name}: VUS-PR {res['window_metrics']['vus_pr']:.3f}, PATE {res['window_metrics']['pate']:.3f}")
        echo(f"  NAB {name}: standard {res['standard']['score']:.1f} (2-fold CV {res['standard']['cv_score']:.1f}), "
             f"low FP {res['reward_low_FP_rate']['score']:.1f}, low FN {res['reward_low_FN_rate']['score']:.1f} "
             f"[{res['seconds']} s]")
    return out


# ----------------------------------------------------------------------- default scorers
def _fitted(make: Callable[[], Any], x: np.ndarray, p: int) -> Any:
    """Detector fitted on the probationary rows only (the rows NAB lets a detector learn from)."""
    from detectors.timeseries.series import TimeSeries

    det = make()
    n_fit = max(p, det.required_length() + 1)
    return det.fit([TimeSeries.from_array(x[:n_fit], ["value"])])


def _raw(make: Callable[[], Any]) -> ScoreFn:
    from detectors.timeseries.series import TimeSeries

    def fn(x: np.ndarray, p: int) -> np.ndarray:
        det = _fitted(make, x, p)
        return det.point_scores(TimeSeries.from_array(x, ["value"])) / max(det.threshold_, 1e-12)
    return fn


def _likelihood(*makes: Callable[[], Any]) -> ScoreFn:
    """Anomaly likelihood of each member's raw scores; the max over members."""
    from detectors.timeseries.threshold import anomaly_likelihood

    def fn(x: np.ndarray, p: int) -> np.ndarray:
        outs = [anomaly_likelihood(_raw(m)(x, p), learning=p) for m in makes]
        return np.max(outs, axis=0)
    return fn


def _online_member(raw: ScoreFn, *, novelty: bool = True, rest: bool = True) -> ScoreFn:
    """One online raw scorer through the NAB likelihood, optionally novelty and the rest period (ablations)."""
    from detectors.timeseries import online

    def fn(x: np.ndarray, p: int) -> np.ndarray:
        s = online.nab_likelihood(raw(x, p), p)
        if novelty:
            s = np.maximum(s, online.spatial_novelty(x, p))
        return online.suppress(s, 0.5, int(0.2 * p)) if rest else s
    return fn


def default_scorers(include_slow: bool = True) -> dict[str, ScoreFn]:
    """Our NAB entries and in-run baselines (all causal; fitted on the probationary rows)."""
    from detectors.timeseries.context import ContextDiscrepancyDetector
    from detectors.timeseries.discord import MatrixProfileDetector
    from detectors.timeseries.iforest import WindowIForestDetector
    from detectors.timeseries.residual import ResidualDetector

    from detectors.timeseries import online

    res = lambda: ResidualDetector(span=10, smooth=5)  # noqa: E731
    ctx = lambda: ContextDiscrepancyDetector(window=8, n_context=8)  # noqa: E731
    out: dict[str, ScoreFn] = {
        # online, keep learning at every row (see detectors/timeseries/online.py)
        "ts-online-context(3 grids)+likelihood+novelty+rest": online.online_context_score,
        "ts-online-ensemble(context,ew)+likelihood+novelty+rest": online.online_ensemble_score,
        "ts-online-context(1 grid)+likelihood+novelty+rest": lambda x, p: online.online_context_score(x, p, n_grids=1),
        "ts-online-ew+likelihood+novelty+rest": _online_member(online.ew_surprise),
        "ts-online-context(3 grids)+likelihood": _online_member(
            lambda x, p: np.mean([online.context_surprise(x, p, offset=g / 3) for g in range(3)], axis=0),
            novelty=False, rest=False),
        "ts-residual+likelihood": _likelihood(res),
        "ts-context+likelihood": _likelihood(ctx),
        "ts-ensemble(residual,context)+likelihood": _likelihood(res, ctx),
        "baseline:ts-residual-raw": _raw(res),
        "baseline:ts-iforest-raw": _raw(lambda: WindowIForestDetector(n_estimators=50)),
    }
    if include_slow:
        out["baseline:ts-matrix-profile-left-raw"] = _raw(lambda: MatrixProfileDetector(m=32, mode="left"))
    return out
