"""Ingest: repairs are reported, bad input gives a clear error naming the column and the rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from detectors.timeseries.ingest import read_series
from detectors.timeseries.residual import ResidualDetector
from detectors.timeseries.series import SeriesTooShortError, TimeSeries, TimeSeriesInputError


def _csv(tmp_path: Path, text: str, name: str = "s.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_repairs_nan_inf_duplicates_unsorted(tmp_path: Path) -> None:
    p = _csv(tmp_path, "timestamp,a,b\n2024-01-01 00:02,3,inf\n2024-01-01 00:00,1,1\n"
                       "2024-01-01 00:01,,2\n2024-01-01 00:01,2,2\n2024-01-01 00:03,4,nan\n")
    s, rep = read_series(p)
    assert s.columns == ("a", "b") and len(s) == 4
    assert rep.unsorted_rows == 1 and rep.duplicate_timestamps == 1
    assert rep.inf_replaced == {"b": 1} and rep.nan_filled["b"] == 2
    assert np.isfinite(s.values).all()
    assert s.values[1, 0] == 2.0  # the duplicate's NaN ignored, the other value kept
    assert s.label(0).startswith("2024-01-01T00:00")


def test_parquet_and_index(tmp_path: Path) -> None:
    p = tmp_path / "s.parquet"
    pd.DataFrame({"x": np.arange(5.0), "y": np.ones(5)}).to_parquet(p)
    s, rep = read_series(p)
    assert s.timestamps is None and s.n_vars == 2 and rep.time_column is None
    assert s.label(3) == "3"


@pytest.mark.parametrize("text, needle", [
    ("", "empty"),
    ("timestamp,v\n", "no data rows"),
    ("timestamp,v\n2024-01-01,1\n", "at least 2 rows"),
    ("timestamp,v,w\n2024-01-01,1,\n2024-01-02,2,nan\n", "'w' is entirely NaN"),
    ("timestamp,v,host\n2024-01-01,1,web1\n2024-01-02,2,web2\n", "'host' is not numeric"),
    ("timestamp,v\nnot a date,1\n2024-01-02,2\n", "'timestamp' row 1"),
])
def test_bad_input_names_column_and_rule(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(TimeSeriesInputError, match=needle) as err:
        read_series(_csv(tmp_path, text))
    assert "rule" in str(err.value) or "not found" in str(err.value)


def test_unsupported_and_missing(tmp_path: Path) -> None:
    with pytest.raises(TimeSeriesInputError, match="not found"):
        read_series(tmp_path / "nope.csv")
    with pytest.raises(TimeSeriesInputError, match="unsupported suffix"):
        read_series(_csv(tmp_path, "a\n1\n", "x.txt"))


def test_series_shorter_than_window() -> None:
    from detectors.timeseries.context import ContextDiscrepancyDetector

    short = TimeSeries.from_array(np.arange(10.0), ["temp"])
    with pytest.raises(SeriesTooShortError, match=r"'temp'.*needs at least 144"):
        ContextDiscrepancyDetector(window=16, n_context=8).fit([short])
    det = ResidualDetector().fit([TimeSeries.from_array(np.sin(np.arange(200.0)), ["temp"])])
    with pytest.raises(SeriesTooShortError, match="temp"):
        det.score([TimeSeries.from_array([1.0, 2.0], ["temp"])])
    with pytest.raises(TimeSeriesInputError, match="2 columns"):
        det.score([TimeSeries.from_array(np.ones((50, 2)))])
