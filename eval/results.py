"""Writing an evaluation's result: the one place that decides the JSON layout every ``eval`` shares."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_result"]


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
