"""Shared fixtures: synthetic data with known anomalies, built once per session.

* ``hdfs_synth``: an HDFS-like log (``eval.synth``), parsed into block sessions.
* ``ts_synth``: seasonal, correlated telemetry with injected spikes, level shifts and
  broken correlations.

Everything here is generated; no test needs /work/shared or a network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Torch on a shared 2-core machine is 10-50x slower with 2 threads than with 1 when the
# other core is busy; the detectors read this at fit time. An explicit setting wins.
os.environ.setdefault("ANOMALY_AGENT_THREADS", "1")

from detectors.logs.ingest import IngestReport, read_log  # noqa: E402
from detectors.logs.pipeline import LogParser  # noqa: E402
from detectors.logs.sessions import LogSequence, Sessionizer  # noqa: E402
from detectors.logs.templates import load_preset  # noqa: E402
from detectors.timeseries.series import TimeSeries  # noqa: E402
from eval.synth import SynthLog, generate_hdfs_log  # noqa: E402

N_TRAIN_BLOCKS = 300
N_TEST_BLOCKS = 400
TEST_ANOMALY_RATE = 0.15  # 60 anomalous blocks, 12 of each kind


@dataclass(frozen=True)
class HDFSSynth:
    """Train/test logs on disk, their truth, and their parsed sequences (one per block)."""

    train_path: Path
    test_path: Path
    train_log: SynthLog
    test_log: SynthLog
    parser: LogParser
    train: list[LogSequence]
    test: list[LogSequence]

    def test_of_kind(self, kind: str) -> list[LogSequence]:
        """Test sequences of one anomaly kind."""
        return [s for s in self.test if self.test_log.kinds.get(s.id) == kind]

    @property
    def test_normal(self) -> list[LogSequence]:
        """Test sequences that are normal."""
        return [s for s in self.test if not self.test_log.labels[s.id]]

    @property
    def labels(self) -> dict[str, bool]:
        """Test item id -> anomalous."""
        return self.test_log.labels

    @property
    def kinds(self) -> dict[str, str]:
        """Test item id -> anomaly kind (anomalous items only)."""
        return self.test_log.kinds


def _write(path: Path, log: SynthLog) -> Path:
    path.write_text("\n".join(log.lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def hdfs_synth(tmp_path_factory: pytest.TempPathFactory) -> HDFSSynth:
    """Normal training blocks and a test log with every anomaly kind, parsed with the hdfs preset.

    Templates are learned from the training log only, as in production.
    """
    folder = tmp_path_factory.mktemp("hdfs_synth")
    train_log = generate_hdfs_log(N_TRAIN_BLOCKS, anomaly_rate=0.0, seed=11)
    test_log = generate_hdfs_log(N_TEST_BLOCKS, anomaly_rate=TEST_ANOMALY_RATE, seed=12)
    train_path = _write(folder / "train.log", train_log)
    test_path = _write(folder / "test.log", test_log)
    parser = LogParser(load_preset("hdfs"))
    parser.learn(read_log(train_path, "hdfs"))
    train = Sessionizer("session").group(parser.events(read_log(train_path, "hdfs")))
    report = IngestReport(source=str(test_path))
    test = Sessionizer("session").group(parser.events(read_log(test_path, "hdfs", report=report)))
    assert report.parsed == len(test_log.lines), report.summary()
    assert {s.id for s in test} == set(test_log.labels)
    return HDFSSynth(train_path, test_path, train_log, test_log, parser, train, test)


# ---------------------------------------------------------------------------- time series

TS_KINDS: tuple[str, ...] = ("spike", "level_shift", "decorrelation")
"""Anomalies injected into the synthetic telemetry: a one-row spike in one variable, a
sustained level shift of one variable, and a stretch where a variable that normally
follows another moves against it (each value stays inside its normal range)."""


@dataclass(frozen=True)
class TSSynth:
    """Normal training series and labelled test series of three correlated seasonal variables."""

    train: list[TimeSeries]
    test: list[TimeSeries]
    labels: dict[str, bool]
    kinds: dict[str, str]

    def test_of_kind(self, kind: str) -> list[TimeSeries]:
        """Test series of one anomaly kind."""
        return [s for s in self.test if self.kinds.get(s.id) == kind]

    @property
    def test_normal(self) -> list[TimeSeries]:
        """Test series that are normal."""
        return [s for s in self.test if not self.labels[s.id]]


def _telemetry(rng: np.random.Generator, n: int, start: int) -> np.ndarray:
    t = np.arange(start, start + n)
    base = np.sin(2 * np.pi * t / 50)
    load = base + 0.1 * rng.standard_normal(n)
    follower = 2.0 * base + 0.1 * rng.standard_normal(n)
    other = np.cos(2 * np.pi * t / 50) + 0.1 * rng.standard_normal(n)
    return np.column_stack([load, follower, other])


def make_ts_synth(seed: int = 0, n_train: int = 3, train_len: int = 1500, per_kind: int = 8,
                  n_normal: int = 16, length: int = 400) -> TSSynth:
    """Seeded telemetry with known anomalies; every test series is its own item."""
    rng = np.random.default_rng(seed)
    cols = ("load", "follower", "other")
    train = [TimeSeries(_telemetry(rng, train_len, 0), cols, id=f"train{i}", source="synth") for i in range(n_train)]
    test: list[TimeSeries] = []
    labels: dict[str, bool] = {}
    kinds: dict[str, str] = {}
    plan: list[str | None] = [None] * n_normal + [k for k in TS_KINDS for _ in range(per_kind)]
    for i, kind in enumerate(plan):
        x = _telemetry(rng, length, int(rng.integers(0, 50)))
        at = int(rng.integers(length // 3, 2 * length // 3))
        if kind == "spike":
            x[at, 0] += 4.0
        elif kind == "level_shift":
            x[at: at + 60, 2] += 2.5
        elif kind == "decorrelation":
            x[at: at + 60, 1] = -x[at: at + 60, 1]
        sid = f"s{i:02d}"
        test.append(TimeSeries(x, cols, id=sid, source="synth"))
        labels[sid] = kind is not None
        if kind is not None:
            kinds[sid] = kind
    return TSSynth(train, test, labels, kinds)


@pytest.fixture(scope="session")
def ts_synth() -> TSSynth:
    """Synthetic multivariate telemetry for the time-series detectors."""
    return make_ts_synth()
