"""`anomaly-agent eval logs`: HDFS session detection and Loghub parsing in one run.

Writes one JSON entry per (data set, split, detector) with its metrics, and prints
Markdown tables. Baselines (loglizer-style PCA) are computed in the same run on the
same split, so comparisons never mix machines or protocols.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from detectors.base import Detector
from detectors.logs.sessions import LogSequence
from detectors.registry import ENSEMBLES, make_detector
from eval import hdfs, parsing
from eval.results import write_result

LOG_DETECTORS: tuple[str, ...] = (
    "log-rare-template", "log-cooccurrence", "log-param-range", "log-error-burst", "log-pca", "log-iforest", "log-lstm",
    *ENSEMBLES, "baseline-loglizer-pca",
)  # fmt: skip


def detector_factories(names: Sequence[str] = LOG_DETECTORS) -> dict[str, Callable[[], Detector[LogSequence]]]:
    """Fresh detector per evaluation (each split fits its own)."""
    return {name: (lambda n=name: make_detector(n)) for name in names}


def hdfs_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of HDFS session-level results."""
    head = "| split | detector | precision | recall | F1 | TP | FP | FN | ROC AUC | fit s |\n|---|---|---|---|---|---|---|---|---|---|"
    body = [
        f"| {r['split']} | {r['detector']} | {r['precision']:.3f} | {r['recall']:.3f} | **{r['f1']:.3f}** | "
        f"{r['tp']} | {r['fp']} | {r['fn']} | {r.get('roc_auc', float('nan')):.3f} | {r['fit_seconds']} |"
        for r in rows
    ]
    return "\n".join([head, *body])


def parsing_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean metrics per (mode, ground truth)."""
    out = []
    keys = sorted({(r["mode"], r["truth"]) for r in rows})
    for mode, truth in keys:
        block = [r for r in rows if r["mode"] == mode and r["truth"] == truth]
        out.append({"dataset": "loghub-2k", "mode": mode, "truth": truth, "systems": len(block),
                    **{m: round(sum(r[m] for r in block) / len(block), 4) for m in ("GA", "FGA", "PA_raw", "PA", "FTA")}})
    return out


def run(data_dir: Path, out: Path | None, *, detectors: Sequence[str] = LOG_DETECTORS,
        fractions: Sequence[float] = (0.8, 0.5), parsing_modes: Sequence[str] = ("per-system", "generic"),
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole log evaluation; returns (and writes) the JSON document."""
    t0 = time.perf_counter()
    result: dict[str, Any] = {"hdfs": [], "parsing": [], "parsing_summary": []}
    if fractions:
        result["hdfs"] = hdfs.evaluate_hdfs(Path(data_dir), detector_factories(detectors), fractions)
        echo("## HDFS 2% sample, session level (chronological split, trained on normal sessions only)\n")
        echo(hdfs_table(result["hdfs"]))
        result["hdfs_deeplog"] = hdfs.evaluate_deeplog(Path(data_dir), detector_factories(detectors))
        echo("\n## HDFS, DeepLog's preprocessed sessions (held-out normal + all abnormal)\n")
        echo(hdfs_table(result["hdfs_deeplog"]))
    rows: list[dict[str, Any]] = []
    for mode in parsing_modes:
        rows += parsing.evaluate_all(Path(data_dir), mode)  # type: ignore[arg-type]
    if rows:
        for r in rows:
            r["dataset"] = f"loghub-2k/{r['system']}"
        result["parsing"] = rows
        result["parsing_summary"] = parsing_summary(rows)
        echo("\n## Loghub 2k parsing (drain3), per system and mean\n")
        echo(parsing.markdown_table(rows))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_result(result, out, echo)
    return result
