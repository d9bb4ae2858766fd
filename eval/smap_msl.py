"""NASA SMAP / MSL (telemanom): per-channel fit on train, score test, event-level P/R/F0.5.

Protocol (see ``smap_msl/README.md``): each labelled channel is fitted on its
``train`` array (assumed nominal) and scored on ``test``; column 0 is the telemetry
value and is what every detector here scores (the one-hot command columns are not
used). ``P-2`` appears twice in the labels: we take the union of its sequences and
count the channel once. ``T-10`` has no labels and is skipped.

No setting below looks at test labels. Thresholds are either learned from the
channel's train data (``fixed``: the ``1 - contamination`` quantile of train point
scores) or telemanom's label-free dynamic threshold applied to each channel's
test scores (``dynamic``). Detector settings are fixed a priori (not tuned here).

Threshold-free metrics (VUS-PR, PATE) need scores comparable across channels: each
channel's scores are divided by its train threshold before concatenation.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detectors.timeseries.base import TimeSeriesDetector
from detectors.timeseries.segments import runs
from detectors.timeseries.series import TimeSeries
from detectors.timeseries.threshold import dynamic_threshold
from eval.ts_metrics import affiliation_prf, event_prf, pate, point_prf, prf_from_counts, spans, vus_pr

TELEMANOM_PUBLISHED = {"SMAP": {"precision": 0.855, "recall": 0.855}, "MSL": {"precision": 0.926, "recall": 0.694}}


def load_labels(data_dir: Path) -> dict[str, tuple[str, list[tuple[int, int]]]]:
    """``{chan: (spacecraft, [(start, end), ...])}``; P-2's two rows are merged (union)."""
    df = pd.read_csv(data_dir / "labeled_anomalies.csv")
    out: dict[str, tuple[str, list[tuple[int, int]]]] = {}
    for row in df.itertuples():
        seqs = [tuple(map(int, s)) for s in ast.literal_eval(row.anomaly_sequences)]
        if row.chan_id in out:
            out[row.chan_id][1].extend(seqs)
        else:
            out[row.chan_id] = (row.spacecraft, list(seqs))
    return out


def label_vector(n: int, seqs: list[tuple[int, int]]) -> np.ndarray:
    """Inclusive sequences -> bool vector (overlapping rows union)."""
    y = np.zeros(n, dtype=bool)
    for a, b in seqs:
        y[a : b + 1] = True
    return y


def run(data_dir: Path, factories: dict[str, Callable[[], TimeSeriesDetector]], *,
        channels: list[str] | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every detector on SMAP and MSL; returns per-spacecraft metrics per detector."""
    labels = load_labels(data_dir)
    train = np.load(data_dir / "train.npz")
    test = np.load(data_dir / "test.npz")
    chans = [c for c in sorted(labels) if channels is None or c in channels]
    acc: dict[tuple[str, str], dict[str, Any]] = {}
    t_start = time.perf_counter()
    for chan in chans:
        craft, seqs = labels[chan]
        tr = TimeSeries.from_array(train[chan][:, 0], ["value"], id=f"{chan}-train")
        te = TimeSeries.from_array(test[chan][:, 0], ["value"], id=chan)
        y = label_vector(len(te), seqs)
        true_spans = spans(y)
        for name, make in factories.items():
            key = (craft, name)
            a = acc.setdefault(key, {"y": [], "s": [], "pred_fixed": [], "pred_dyn": [], "counts_fixed": [0, 0, 0],
                                     "counts_dyn": [0, 0, 0], "seconds": 0.0})
            t0 = time.perf_counter()
            det = make().fit([tr])
            s = det.point_scores(te)
            a["seconds"] += time.perf_counter() - t0
            thr = det.threshold_ if det.threshold_ > 0 else 1.0
            fixed = s > det.threshold_
            dyn = dynamic_threshold(s).mask
            for pred, ck in ((fixed, "counts_fixed"), (dyn, "counts_dyn")):
                ev = event_prf(true_spans, runs(pred))
                for i, k in enumerate(("tp", "fp", "fn")):
                    a[ck][i] += ev[k]
            a["y"].append(y)
            a["s"].append(s / thr)
            a["pred_fixed"].append(fixed)
            a["pred_dyn"].append(dyn)
    out: dict[str, Any] = {}
    for (craft, name), a in sorted(acc.items()):
        y = np.concatenate(a["y"])
        s = np.concatenate(a["s"])
        res: dict[str, Any] = {"channels": len(a["y"]), "seconds": round(a["seconds"], 1)}
        for mode in ("dyn", "fixed"):
            pred = np.concatenate(a[f"pred_{mode}"])
            tp, fp, fn = a[f"counts_{mode}"]
            ev = prf_from_counts(tp, fp, fn, 0.5)
            pt = point_prf(y, pred)
            aff = affiliation_prf(y, pred)
            res["dynamic" if mode == "dyn" else "fixed"] = {
                "event_tp": tp, "event_fp": fp, "event_fn": fn,
                "event_precision": round(ev["precision"], 4), "event_recall": round(ev["recall"], 4),
                "event_f0.5": round(ev["f0.5"], 4),
                "point_precision": round(pt["precision"], 4), "point_recall": round(pt["recall"], 4),
                "point_f1": round(pt["f1"], 4),
                "affiliation_precision": round(aff["precision"], 4), "affiliation_recall": round(aff["recall"], 4)}
        res["vus_pr"] = round(vus_pr(y, s, max_buffer=100), 4)
        res["pate"] = round(pate(y, s), 4)
        out.setdefault(craft, {})[name] = res
        d = res["dynamic"]
        echo(f"  {craft} {name}: event P {d['event_precision']:.3f} R {d['event_recall']:.3f} "
             f"F0.5 {d['event_f0.5']:.3f} (dynamic); fixed F0.5 {res['fixed']['event_f0.5']:.3f}; "
             f"point F1 {d['point_f1']:.3f}; VUS-PR {res['vus_pr']:.3f}; PATE {res['pate']:.3f} [{res['seconds']} s]")
    out["telemanom_published"] = TELEMANOM_PUBLISHED
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out
