"""Session-level evaluation on the labelled HDFS samples (LogLead 2% sample, block labels).

Protocol: blocks are ordered by their first line (chronological); the first
``train_fraction`` of blocks is the training part, the rest the test part. Templates
and detectors are learned from the *normal* training blocks only; labels of the test
part are used for nothing but the final metrics. Thresholds come from each
detector's own rule on training scores (``contamination``), never from test labels.
"""

from __future__ import annotations

import csv
import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detectors.base import Detector
from detectors.logs.ingest import IngestReport, LogRecord, read_log
from detectors.logs.pipeline import LogParser
from detectors.logs.sessions import LogSequence, Sessionizer
from detectors.logs.templates import ParserConfig, load_preset

HDFS_DIR = Path("hdfs_labelled") / "loglead_2pct"
DOWNLOAD_HINT = (
    "HDFS_v1 from Loghub (https://github.com/logpai/loghub, https://zenodo.org/records/8196385); the 2% sample "
    "is LogLead's demo/samples/hdfs_events_2percent.parquet (https://github.com/EvoTestOps/LogLead). "
    "Expected files: <data-dir>/hdfs_labelled/loglead_2pct/HDFS_2pct.log.gz and block_labels.csv"
)


@dataclass
class HDFSData:
    """Records, block labels and the chronological block order."""

    records: list[LogRecord]
    labels: dict[str, bool]
    order: list[str]
    report: IngestReport


def load_hdfs(data_dir: Path) -> HDFSData:
    """Load the 2% HDFS sample from ``data_dir`` (the folder holding ``hdfs_labelled/``)."""
    base = Path(data_dir) / HDFS_DIR
    log, labels_csv = base / "HDFS_2pct.log.gz", base / "block_labels.csv"
    for path in (log, labels_csv):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found. {DOWNLOAD_HINT}")
    labels: dict[str, bool] = {}
    with labels_csv.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("Label") not in ("Normal", "Anomaly"):
                raise ValueError(f"{labels_csv}: block {row.get('BlockId')!r} has label {row.get('Label')!r}; "
                                 "expected Normal or Anomaly")
            labels[row["BlockId"]] = row["Label"] == "Anomaly"
    report = IngestReport(source=str(log))
    records = list(read_log(log, "hdfs", report=report))
    first_seen: dict[str, int] = {}
    grouper = Sessionizer("session")
    for rec in records:
        for sid in grouper.id_regex.findall(rec.content):
            first_seen.setdefault(sid, rec.line_no)
    order = [b for b in sorted(first_seen, key=first_seen.__getitem__) if b in labels]
    return HDFSData(records, labels, order, report)


@dataclass
class Split:
    """Sequences and labels of one chronological split."""

    name: str
    train_normal: list[LogSequence]
    train_all: list[LogSequence]
    test: list[LogSequence]
    y_test: np.ndarray
    y_train: np.ndarray
    parser_seconds: float


def make_split(data: HDFSData, train_fraction: float, parser: ParserConfig | None = None) -> Split:
    """Chronological split; templates learned from normal training blocks only."""
    n_train = int(len(data.order) * train_fraction)
    train_ids = set(data.order[:n_train])
    train_normal_ids = {b for b in train_ids if not data.labels[b]}
    grouper = Sessionizer("session")
    t0 = time.perf_counter()
    log_parser = LogParser(parser or _hdfs_parser())
    log_parser.learn(r for r in data.records
                     if any(s in train_normal_ids for s in grouper.id_regex.findall(r.content)))
    seqs = {s.id: s for s in grouper.group(log_parser.events(data.records))}
    elapsed = time.perf_counter() - t0
    train_all = [seqs[b] for b in data.order[:n_train] if b in seqs]
    test = [seqs[b] for b in data.order[n_train:] if b in seqs]
    return Split(
        name=f"{round(train_fraction * 100)}/{round((1 - train_fraction) * 100)}",
        train_normal=[s for s in train_all if s.id in train_normal_ids],
        train_all=train_all,
        test=test,
        y_test=np.array([data.labels[s.id] for s in test]),
        y_train=np.array([data.labels[s.id] for s in train_all]),
        parser_seconds=elapsed,
    )


def fitted_split(data: HDFSData, train_fraction: float, detector: str = "log-ensemble") -> tuple[Split, Any]:
    """The chronological split and ``detector`` fitted on its normal training sessions: what the
    explainer evals and the fine-tuning data score candidates with."""
    from detectors.registry import make_detector

    split = make_split(data, train_fraction)
    fitted = make_detector(detector)
    fitted.fit(split.train_normal)
    return split, fitted


CALIBRATION_SLICE = (0.5, 0.8)
"""Where the calibration sessions come from: between 50% and 80% of the chronological order,
after the detector's fitting data (the first 50%) and before the test part (the last 20%)."""


def calibration_blocks(order: Sequence[str]) -> frozenset[str]:
    """The sessions reserved for measuring the explainer's decision weights.

    Every other block of :data:`CALIBRATION_SLICE` (chosen by a hash of its id, so the choice
    does not depend on the order of anything else). Why reserved: the weights say how much to
    trust the tuned model, so they must be measured on sessions it was not trained on, and the
    fine-tuning data (``finetune.dataset``) leaves these out; the other half of the slice trains.
    """
    lo, hi = CALIBRATION_SLICE
    window = order[int(len(order) * lo):int(len(order) * hi)]
    return frozenset(b for b in window if int(hashlib.sha256(b.encode()).hexdigest()[:8], 16) % 2 == 0)


def balanced_sample(pool: Sequence[int], labels: Sequence[Any], limit: int, rng: random.Random) -> tuple[list[int], int]:
    """Up to ``limit`` indices of ``pool``, half anomalous (``labels[i]`` true) when there are enough.

    Anomalies are rare (1.3% of HDFS test sessions), so an unbalanced sample would measure
    mostly the easy normals. Anomalies are drawn first, then normals fill the rest; the draws
    depend only on ``rng``'s seed. Returns the sorted indices and how many are anomalous.
    """
    anomalous = [i for i in pool if labels[i]]
    normal = [i for i in pool if not labels[i]]
    n_anom = min(len(anomalous), limit // 2)
    n_norm = min(len(normal), limit - n_anom)
    return sorted(rng.sample(anomalous, n_anom) + rng.sample(normal, n_norm)), n_anom


def prf(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | int]:
    """Precision, recall, F1 and the confusion counts (zero-safe)."""
    tp = int(np.sum(y_true & y_pred))
    fp = int(np.sum(~y_true & y_pred))
    fn = int(np.sum(y_true & ~y_pred))
    tn = int(np.sum(~y_true & ~y_pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def evaluate_detector(split: Split, name: str, factory: Callable[[], Detector[LogSequence]]) -> dict[str, Any]:
    """Fit on normal training sessions, threshold by the detector's own rule, score the test part."""
    detector = factory()
    t0 = time.perf_counter()
    detector.fit(split.train_normal)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = detector.score(split.test)
    score_s = time.perf_counter() - t0
    pred = scores > detector.threshold_
    result: dict[str, Any] = {"split": split.name, "detector": name, **prf(split.y_test, pred),
                              "threshold": round(float(detector.threshold_), 6),
                              "test_sessions": len(split.test), "test_anomalies": int(split.y_test.sum()),
                              "train_normal_sessions": len(split.train_normal),
                              "fit_seconds": round(fit_s, 2), "score_seconds": round(score_s, 3)}
    try:
        from sklearn.metrics import average_precision_score, roc_auc_score

        result["roc_auc"] = round(float(roc_auc_score(split.y_test, scores)), 4)
        result["average_precision"] = round(float(average_precision_score(split.y_test, scores)), 4)
    except ValueError:
        pass
    return result


def evaluate_hdfs(data_dir: Path, detectors: dict[str, Callable[[], Detector[LogSequence]]],
                  fractions: Sequence[float] = (0.8, 0.5)) -> list[dict[str, Any]]:
    """Every detector on every chronological split; one row per (split, detector)."""
    data = load_hdfs(data_dir)
    rows = []
    for fraction in fractions:
        split = make_split(data, fraction)
        for name, factory in detectors.items():
            row = evaluate_detector(split, name, factory)
            row["dataset"] = "HDFS-2pct"
            rows.append(row)
    return rows


def _hdfs_parser() -> ParserConfig:
    try:
        return load_preset("hdfs")
    except ValueError:
        return ParserConfig()


DEEPLOG_DIR = Path("hdfs_labelled") / "deeplog_sequences"


def load_deeplog_sequences(data_dir: Path) -> tuple[list[LogSequence], list[LogSequence]]:
    """DeepLog's HDFS key sequences as :class:`LogSequence` s: (normal, abnormal).

    Lines hold space-separated log keys (key k = template Ek of the full HDFS log);
    there are no raw lines, so ``line_no`` is the position in the session.
    """
    from detectors.logs.sessions import LogEvent

    base = Path(data_dir) / DEEPLOG_DIR
    names = {}
    templates_csv = Path(data_dir) / "loghub_2k" / "HDFS" / "HDFS_templates.csv"
    if templates_csv.exists():
        with templates_csv.open(newline="") as fh:
            for row in csv.DictReader(fh):
                names[int(row["EventId"].lstrip("E"))] = row["EventTemplate"]
    out: list[list[LogSequence]] = []
    for fname in ("hdfs_train", "hdfs_test_abnormal"):
        path = base / fname
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; DeepLog's data/{fname} from https://github.com/wuyifan18/DeepLog")
        seqs = []
        with path.open() as fh:
            for i, line in enumerate(fh, 1):
                keys = [int(k) for k in line.split()]
                if not keys:
                    continue
                events = tuple(LogEvent(j + 1, k, names.get(k, f"E{k}"), "", names.get(k, f"E{k}"))
                               for j, k in enumerate(keys))
                seqs.append(LogSequence(f"{fname}:{i}", events))
        out.append(seqs)
    return out[0], out[1]


def evaluate_deeplog(data_dir: Path, detectors: dict[str, Callable[[], Detector[LogSequence]]],
                     train_fraction: float = 0.8) -> list[dict[str, Any]]:
    """A second, independent HDFS check on DeepLog's preprocessed sessions.

    Fit on the first ``train_fraction`` of DeepLog's normal training sessions; test on
    the remaining normal sessions plus all 16,838 abnormal ones. DeepLog's 553k normal
    test sessions are not available here, so anomalies dominate the test set:
    precision is optimistic, and the false-positive rate on held-out normals is the
    number to watch.
    """
    normal, abnormal = load_deeplog_sequences(data_dir)
    n_fit = int(len(normal) * train_fraction)
    split = Split(name=f"deeplog {round(train_fraction * 100)}% normal", train_normal=normal[:n_fit],
                  train_all=normal[:n_fit], test=normal[n_fit:] + abnormal,
                  y_test=np.array([False] * (len(normal) - n_fit) + [True] * len(abnormal)),
                  y_train=np.zeros(n_fit, dtype=bool), parser_seconds=0.0)
    rows = []
    for name, factory in detectors.items():
        row = evaluate_detector(split, name, factory)
        row["dataset"] = "HDFS-DeepLog"
        row["false_positive_rate"] = round(row["fp"] / max(1, row["fp"] + row["tn"]), 4)
        rows.append(row)
    return rows
