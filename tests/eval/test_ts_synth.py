"""The synthetic generator: faults land in known variables; contract data is well formed."""

from __future__ import annotations

import numpy as np

from eval.synth_ts import FAULT_KINDS, contract_items, make_case


def test_make_case() -> None:
    case = make_case(0, n_vars=22)
    assert case.train.n_vars == 22 and len(case.faults) == 12
    assert {f.kind for f in case.faults} == set(FAULT_KINDS)
    corr = np.corrcoef(case.train.values, rowvar=False)
    assert np.median(np.abs(corr[np.triu_indices(22, 1)])) > 0.3  # correlated signals
    assert case.labels().sum() == sum(f.i1 - f.i0 + 1 for f in case.faults)


def test_contract_items() -> None:
    normal, test, labels = contract_items(0)
    assert len(test) == len(labels) and 0 < sum(labels) < len(labels)
    assert all(t.n_vars == normal[0].n_vars for t in test)
