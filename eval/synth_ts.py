"""Synthetic multivariate telemetry with faults injected into known variables.

Realistic enough to make root-cause attribution non-trivial: variables are mixtures
of a few shared latent drivers (daily-like and faster cycles, a random walk load,
AR(1) noise), so they are strongly correlated, have different units and offsets,
and each has its own sensor noise. A fault touches exactly one variable (the
ground-truth root cause) over a known span: spike, level shift, drift, stuck sensor,
noise burst, or a phase-wrong (contextual) value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectors.timeseries.series import TimeSeries

FAULT_KINDS = ("spike", "shift", "drift", "stuck", "noise", "contextual")


@dataclass(frozen=True)
class Fault:
    """One injected fault: variable index, inclusive span, kind, size in noise-std units."""

    var: int
    i0: int
    i1: int
    kind: str
    size: float


@dataclass(frozen=True)
class SynthCase:
    """Normal training series, test series with faults, and the faults."""

    train: TimeSeries
    test: TimeSeries
    faults: tuple[Fault, ...]

    def labels(self) -> np.ndarray:
        """``(T_test,)`` bool point labels."""
        y = np.zeros(len(self.test), dtype=bool)
        for f in self.faults:
            y[f.i0 : f.i1 + 1] = True
        return y


def correlated_signals(n: int, n_vars: int, rng: np.random.Generator, *, period: int = 96,
                       noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """``(n, n_vars)`` correlated signals and each variable's sensor-noise std."""
    t = np.arange(n)
    load = np.cumsum(rng.normal(0, 0.05, n))
    load -= np.linspace(load[0], load[-1], n)  # no long-run trend
    ar = np.zeros(n)
    eps = rng.normal(0, 0.3, n)
    for i in range(1, n):
        ar[i] = 0.9 * ar[i - 1] + eps[i]
    latent = np.column_stack([
        np.sin(2 * np.pi * t / period), np.cos(2 * np.pi * t / period),
        np.sin(2 * np.pi * t / (period / 4)), load, ar,
    ])
    W = rng.normal(0, 1, (latent.shape[1], n_vars))
    W[0] += np.sign(W[0]) * 1.0  # every variable follows the main cycle
    scale = rng.uniform(0.5, 20, n_vars)
    offset = rng.uniform(-50, 100, n_vars)
    sensor_sd = noise * scale * rng.uniform(0.5, 1.5, n_vars)
    x = (latent @ W) * scale + offset + rng.normal(0, 1, (n, n_vars)) * sensor_sd
    return x, sensor_sd


def make_case(seed: int = 0, *, n_vars: int = 24, n_train: int = 3000, n_test: int = 3000, n_faults: int = 12,
              period: int = 96, kinds: tuple[str, ...] = FAULT_KINDS) -> SynthCase:
    """One train/test pair with ``n_faults`` single-variable faults, well separated in time."""
    rng = np.random.default_rng(seed)
    x, sd = correlated_signals(n_train + n_test, n_vars, rng, period=period)
    train, test = x[:n_train].copy(), x[n_train:].copy()
    faults: list[Fault] = []
    slot = n_test // n_faults
    for k in range(n_faults):
        kind = kinds[k % len(kinds)]
        var = int(rng.integers(n_vars))
        length = 1 if kind == "spike" else int(rng.integers(10, 40))
        i0 = k * slot + int(rng.integers(period, max(period + 1, slot - length - 10)))
        i0 = min(i0, n_test - length - 1)
        i1 = i0 + length - 1
        s = sd[var]
        size = float(rng.uniform(6, 10))
        seg = slice(i0, i1 + 1)
        if kind == "spike":
            test[seg, var] += size * s * rng.choice([-1, 1])
        elif kind == "shift":
            test[seg, var] += size * s * rng.choice([-1, 1])
        elif kind == "drift":
            test[seg, var] += np.linspace(0, 1.5 * size * s, length) * rng.choice([-1, 1])
        elif kind == "stuck":
            test[seg, var] = test[i0, var] + 0.6 * size * s  # frozen, off the true value
        elif kind == "noise":
            test[seg, var] += rng.normal(0, size * s / 2, length)
        elif kind == "contextual":
            # the value from half a period later: plausible globally, wrong for the phase
            src = slice(i0 + period // 2, i1 + 1 + period // 2)
            if src.stop <= n_test:
                test[seg, var] = test[src, var]
            else:
                test[seg, var] -= size * s
        faults.append(Fault(var, i0, i1, kind, round(size, 3)))
    cols = tuple(f"sensor_{j:02d}" for j in range(n_vars))
    return SynthCase(TimeSeries(train, cols, id=f"synth{seed}-train", source="synthetic"),
                     TimeSeries(test, cols, id=f"synth{seed}-test", source="synthetic"), tuple(faults))


def contract_items(seed: int = 0) -> tuple[list[TimeSeries], list[TimeSeries], list[bool]]:
    """Data for the generic detector contract test.

    Returns:
        ``(normal_items, test_items, labels)``: normal 8-variable series windows to
        fit on, test windows (300 rows each) of which half contain one injected fault
        of at least 8 noise-std, and one bool label per test item.
    """
    case = make_case(seed, n_vars=8, n_train=2400, n_test=3000, n_faults=5,
                     kinds=("spike", "shift", "drift", "stuck", "shift"))
    normal = case.train.windows(400)
    y = case.labels()
    items, labels = [], []
    for w in case.test.windows(300):
        items.append(w)
        labels.append(bool(y[w.offset - case.test.offset : w.offset - case.test.offset + len(w)].any()))
    return normal, items, labels
