"""CSV / Parquet -> :class:`TimeSeries`, with every repair counted and reported.

Rules (each violation raises :class:`TimeSeriesInputError` naming the file, the
column and the rule, never a bare pandas traceback):

* the file exists, has a ``.csv``/``.parquet``/``.pq`` suffix, and is not empty;
* at least ``min_rows`` (default 2) rows: a single row has no "normal" to compare to;
* every value column is numeric: text that does not parse as a number is an error
  (the first offending value and row are named), not silently coerced to NaN;
* no value column is entirely NaN/inf;
* the time column, when present, parses as dates (unparseable stamps are an error).

Repairs (done, counted in :class:`TimeSeriesIngestReport`, never silent): ``inf``
becomes NaN; NaNs are filled by linear interpolation in time (edges by nearest);
unsorted rows are sorted by time; duplicate timestamps are averaged into one row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detectors.timeseries.series import TimeSeries, TimeSeriesInputError

TIME_COLUMN_NAMES = ("timestamp", "time", "datetime", "date", "ts")


@dataclass
class TimeSeriesIngestReport:
    """What ingest did to the file: rows, repairs per column, order problems."""

    source: str
    rows_read: int = 0
    rows_out: int = 0
    time_column: str | None = None
    value_columns: list[str] = field(default_factory=list)
    nan_filled: dict[str, int] = field(default_factory=dict)
    inf_replaced: dict[str, int] = field(default_factory=dict)
    unsorted_rows: int = 0
    duplicate_timestamps: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (also stored in ``TimeSeries.meta['ingest']``)."""
        return asdict(self)


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise TimeSeriesInputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise TimeSeriesInputError(f"{path}: unsupported suffix {suffix!r}; rule: .csv, .parquet or .pq")
    if path.stat().st_size == 0:
        raise TimeSeriesInputError(f"{path}: file is empty; rule: a header and at least 2 rows")
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError as exc:
        raise TimeSeriesInputError(f"{path}: file is empty; rule: a header and at least 2 rows") from exc
    except (ValueError, OSError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) on bad files
        raise TimeSeriesInputError(f"{path}: cannot be read as {suffix[1:]}: {exc}") from exc


def _guess_time_column(df: pd.DataFrame) -> str | None:
    for col in df.columns:
        if str(col).strip().lower() in TIME_COLUMN_NAMES:
            return str(col)
    for col in df.columns:
        if pd.api.types.is_datetime64_any_dtype(df[col]):
            return str(col)
    return None


_NA_TEXT = {"", "nan", "NaN", "NA", "N/A", "null", "NULL", "None", "none", "-"}


def _numeric(series: pd.Series, column: str, source: str) -> np.ndarray:
    """Column -> float array; text that is not a number or a NA marker is an error."""
    if pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=np.float64)
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    text = series.astype("string").str.strip()
    is_na = text.isna() | text.isin(_NA_TEXT)
    parsed = pd.to_numeric(text.where(~is_na), errors="coerce")
    bad = parsed.isna() & ~is_na
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise TimeSeriesInputError(
            f"{source}: column {column!r} is not numeric (row {row + 1} = {str(series.iloc[row])[:40]!r}, "
            f"{int(bad.sum())} such values); rule: value columns must hold numbers (or be excluded with columns=...)")
    return parsed.to_numpy(dtype=np.float64, na_value=np.nan)


def from_frame(df: pd.DataFrame, *, source: str = "<frame>", time_column: str | None = "auto",
               columns: Sequence[str] | None = None, min_rows: int = 2,
               series_id: str | None = None) -> tuple[TimeSeries, TimeSeriesIngestReport]:
    """Validate and repair a DataFrame into a :class:`TimeSeries`.

    Args:
        df: One row per time step.
        source: Named in errors and the report.
        time_column: Name of the time column; ``"auto"`` looks for a usual name or
            a datetime dtype; ``None`` means rows are indexed, not timed.
        columns: Value columns to use; default = every other column.
        min_rows: Fewer rows after repairs is an error.
        series_id: Id of the item; default = file stem.
    """
    report = TimeSeriesIngestReport(source=source, rows_read=len(df))
    if len(df) == 0:
        raise TimeSeriesInputError(f"{source}: no data rows; rule: at least {min_rows} rows")
    df = df.copy()
    df.columns = [str(c) for c in df.columns]
    tcol = _guess_time_column(df) if time_column == "auto" else time_column
    if tcol is not None and tcol not in df.columns:
        raise TimeSeriesInputError(f"{source}: time column {tcol!r} not found; columns are {list(df.columns)}")
    report.time_column = tcol
    value_cols = list(columns) if columns is not None else [c for c in df.columns if c != tcol]
    missing = [c for c in value_cols if c not in df.columns]
    if missing:
        raise TimeSeriesInputError(f"{source}: column(s) {missing} not found; columns are {list(df.columns)}")
    if not value_cols:
        raise TimeSeriesInputError(f"{source}: no value column; rule: at least one numeric column besides {tcol!r}")
    report.value_columns = value_cols
    values = np.column_stack([_numeric(df[c], c, source) for c in value_cols])
    for j, col in enumerate(value_cols):
        n_inf = int(np.isinf(values[:, j]).sum())
        if n_inf:
            report.inf_replaced[col] = n_inf
    values[np.isinf(values)] = np.nan
    for j, col in enumerate(value_cols):
        if np.isnan(values[:, j]).all():
            raise TimeSeriesInputError(
                f"{source}: column {col!r} is entirely NaN/inf/empty; rule: every value column needs numbers")

    stamps: np.ndarray | None = None
    if tcol is not None:
        raw = df[tcol]
        ts = pd.to_datetime(raw, errors="coerce", utc=False) if not pd.api.types.is_datetime64_any_dtype(raw) else raw
        bad = ts.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise TimeSeriesInputError(
                f"{source}: time column {tcol!r} row {row + 1} = {str(raw.iloc[row])[:40]!r} is not a date; "
                "rule: every row needs a parseable timestamp (or pass time_column=None to use the row index)")
        if getattr(ts.dt, "tz", None) is not None:
            ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
        stamps = ts.to_numpy(dtype="datetime64[ns]")
        order_bad = int((np.diff(stamps.astype(np.int64)) < 0).sum())
        if order_bad:
            report.unsorted_rows = order_bad
            report.notes.append(f"{order_bad} row(s) out of time order; rows were sorted by {tcol!r}")
            order = np.argsort(stamps, kind="stable")
            stamps, values = stamps[order], values[order]
        uniq, inverse, counts = np.unique(stamps, return_inverse=True, return_counts=True)
        if len(uniq) < len(stamps):
            report.duplicate_timestamps = int(len(stamps) - len(uniq))
            report.notes.append(f"{report.duplicate_timestamps} duplicate timestamp row(s) averaged into one row each")
            sums = np.zeros((len(uniq), values.shape[1]))
            cnt = np.zeros((len(uniq), values.shape[1]))
            ok = ~np.isnan(values)
            np.add.at(sums, inverse, np.where(ok, values, 0.0))
            np.add.at(cnt, inverse, ok)
            with np.errstate(invalid="ignore"):
                values = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)
            stamps = uniq

    if len(values) < min_rows:
        raise TimeSeriesInputError(
            f"{source}: {len(values)} row(s) after repairs; rule: at least {min_rows} rows "
            f"(column {value_cols[0]!r})")
    x = np.arange(len(values), dtype=np.float64) if stamps is None else stamps.astype(np.int64).astype(np.float64)
    for j, col in enumerate(value_cols):
        nan = np.isnan(values[:, j])
        if nan.any():
            report.nan_filled[col] = int(nan.sum())
            values[nan, j] = np.interp(x[nan], x[~nan], values[~nan, j])
    if report.nan_filled:
        report.notes.append(f"NaN/inf filled by linear interpolation: {report.nan_filled}")
    report.rows_out = len(values)
    sid = series_id or Path(source).stem
    series = TimeSeries(values, tuple(value_cols), stamps, id=sid, source=source, meta={"ingest": report.to_dict()})
    return series, report


def read_series(path: str | Path, *, time_column: str | None = "auto", columns: Sequence[str] | None = None,
                min_rows: int = 2, series_id: str | None = None) -> tuple[TimeSeries, TimeSeriesIngestReport]:
    """Read a CSV or Parquet file into a :class:`TimeSeries` plus the report of repairs.

    See the module docstring for the rules; ``time_column=None`` uses the row index.
    """
    p = Path(path)
    df = _read_frame(p)
    return from_frame(df, source=str(p), time_column=time_column, columns=columns, min_rows=min_rows,
                      series_id=series_id)
