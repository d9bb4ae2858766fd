"""Small PNG of a segment in its context: observed vs expected for the top variables.

matplotlib with the Agg backend (no display needed); one figure per segment, closed
right after saving so thousands of segments do not leak memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_segment(path: Path, values: np.ndarray, expected: np.ndarray | None, columns: Sequence[str],
                 var_idx: Sequence[int], i0: int, i1: int, *, context: int | None = None,
                 normal_range: np.ndarray | None = None, title: str = "", scores: np.ndarray | None = None,
                 threshold: float | None = None, x_labels: np.ndarray | None = None) -> Path:
    """Draw rows ``[i0 - context, i1 + context]`` of up to 3 variables plus the score.

    Args:
        path: Output PNG (parents created).
        values: ``(T, D)`` observed.
        expected: ``(T, D)`` expected (forecast/reconstruction) or ``None``.
        columns: Variable names.
        var_idx: Variables to draw, most important first.
        i0, i1: Segment (inclusive), shaded.
        context: Rows of context each side (default: 3x the segment, at least 50).
        normal_range: ``(2, D)`` low/high learned at fit, drawn as dashed lines.
        scores: ``(T,)`` point scores, drawn in a bottom panel with the threshold.
        x_labels: Optional timestamps for the x axis.
    """
    T = values.shape[0]
    ctx = context if context is not None else max(50, 3 * (i1 - i0 + 1))
    a, b = max(0, i0 - ctx), min(T, i1 + ctx + 1)
    x = np.arange(a, b) if x_labels is None else x_labels[a:b]
    idx = list(var_idx)[:3]
    n_panels = len(idx) + (1 if scores is not None else 0)
    fig, axes = plt.subplots(n_panels, 1, figsize=(6.4, 1.5 * n_panels + 0.6), sharex=True, squeeze=False)
    for ax, j in zip(axes[:, 0], idx):
        ax.plot(x, values[a:b, j], lw=0.9, color="tab:blue", label="observed")
        if expected is not None:
            ax.plot(x, expected[a:b, j], lw=0.8, color="tab:orange", ls="-", alpha=0.8, label="expected")
        if normal_range is not None:
            for v in normal_range[:, j]:
                ax.axhline(v, color="grey", ls="--", lw=0.6)
        ax.axvspan(x[i0 - a], x[min(i1, b - 1) - a], color="red", alpha=0.15)
        ax.set_ylabel(str(columns[j])[:14], fontsize=7)
        ax.tick_params(labelsize=6)
    if scores is not None:
        ax = axes[-1, 0]
        ax.plot(x, scores[a:b], lw=0.8, color="black")
        if threshold is not None:
            ax.axhline(threshold, color="red", ls=":", lw=0.8)
        ax.axvspan(x[i0 - a], x[min(i1, b - 1) - a], color="red", alpha=0.15)
        ax.set_ylabel("score", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6, loc="upper left")
    if title:
        fig.suptitle(title[:90], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
