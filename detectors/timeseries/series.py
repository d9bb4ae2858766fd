"""The time-series item: values ``(T, D)``, timestamps or an index, column names.

Kept deliberately small and immutable so detectors can share it without copying:
a window is a view with an ``offset`` into its source, so every segment found in a
window still points at the right rows of the original file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class TimeSeriesInputError(ValueError):
    """The input cannot be used as a series; the message names the column and the rule."""


class SeriesTooShortError(TimeSeriesInputError):
    """A series is shorter than what a detector needs (its window or context)."""


@dataclass(frozen=True, eq=False)
class TimeSeries:
    """A regular, numeric, gap-free (after ingest repairs) multivariate series.

    Attributes:
        values: ``(T, D)`` float64, finite.
        columns: One name per column of ``values``.
        timestamps: ``(T,)`` ``datetime64[ns]`` sorted and unique, or ``None`` when
            rows are only indexed.
        id: Name of the series within its source (e.g. channel id or file stem).
        source: File or stream it came from.
        offset: Row of ``values[0]`` in the source; windows keep it so segments
            point at source rows.
        meta: Free JSON-ready notes (ingest report summary, units...).
    """

    values: np.ndarray
    columns: tuple[str, ...]
    timestamps: np.ndarray | None = None
    id: str = "series"
    source: str = ""
    offset: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vals = np.asarray(self.values, dtype=np.float64)
        if vals.ndim == 1:
            vals = vals[:, None]
        if vals.ndim != 2:
            raise TimeSeriesInputError(f"series {self.id!r}: values must be 1-D or 2-D, got shape {vals.shape}")
        object.__setattr__(self, "values", vals)
        cols = tuple(self.columns)
        if len(cols) != vals.shape[1]:
            raise TimeSeriesInputError(
                f"series {self.id!r}: {len(cols)} column names for {vals.shape[1]} value columns")
        object.__setattr__(self, "columns", cols)
        if self.timestamps is not None:
            ts = np.asarray(self.timestamps).astype("datetime64[ns]")
            if ts.shape != (vals.shape[0],):
                raise TimeSeriesInputError(
                    f"series {self.id!r}: {ts.shape[0]} timestamps for {vals.shape[0]} rows")
            object.__setattr__(self, "timestamps", ts)

    @classmethod
    def from_array(cls, values: np.ndarray | Sequence[float], columns: Sequence[str] | None = None,
                   **kw: Any) -> "TimeSeries":
        """Wrap an array; columns default to ``x0, x1, ...``."""
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[:, None]
        names = tuple(columns) if columns is not None else tuple(f"x{i}" for i in range(arr.shape[1]))
        return cls(arr, names, **kw)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_vars(self) -> int:
        """Number of variables ``D``."""
        return int(self.values.shape[1])

    def window(self, start: int, stop: int) -> "TimeSeries":
        """Rows ``[start, stop)`` as a new item that remembers its offset."""
        start, stop = max(0, start), min(len(self), stop)
        ts = None if self.timestamps is None else self.timestamps[start:stop]
        return TimeSeries(self.values[start:stop], self.columns, ts, id=f"{self.id}[{self.offset + start}:{self.offset + stop}]",
                          source=self.source, offset=self.offset + start, meta=self.meta)

    def windows(self, width: int, step: int | None = None) -> list["TimeSeries"]:
        """Consecutive windows of ``width`` rows every ``step`` rows (default: no overlap)."""
        step = step or width
        return [self.window(i, i + width) for i in range(0, max(1, len(self) - width + 1), step)]

    def label(self, i: int) -> str:
        """Human/JSON label of local row ``i``: ISO timestamp if known, else the source row."""
        if self.timestamps is not None:
            return str(np.datetime_as_string(self.timestamps[i], unit="s"))
        return str(self.offset + i)

    def require_length(self, n: int, who: str) -> None:
        """Raise :class:`SeriesTooShortError` naming the column and the rule if ``len < n``."""
        if len(self) < n:
            raise SeriesTooShortError(
                f"series {self.id!r} (column {self.columns[0]!r}{' ...' if self.n_vars > 1 else ''}) has {len(self)} rows; "
                f"{who} needs at least {n} (its window/context length)")
