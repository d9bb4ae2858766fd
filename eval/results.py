"""Writing an evaluation's result: the one place that decides the JSON layout every ``eval`` shares."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["percentile", "write_result"]


def write_result(result: dict[str, Any], out: str | Path | None, echo: Callable[[str], None] = print) -> Path | None:
    """Write ``result`` as indented JSON to ``out`` (parents created) and say where; None writes nothing.

    Values JSON does not know (numpy numbers, paths) are written as text, so a finished
    evaluation is never lost to a serialisation error at the very end.
    """
    if out is None:
        return None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    echo(f"wrote {path}")
    return path


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0-1) of ``values``, rounded to milliseconds; None if empty.

    Nearest rank rather than interpolation: a reported p90 latency is one that was observed.
    """
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, int(q * (len(s) - 1) + 0.5)))], 3)
