"""Shared definitions of the fine-tuning tests (a module with a unique name: ``conftest`` is not importable reliably)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eval.hdfs import HDFSData
from finetune.dataset import BuildConfig, CasePool, Example

SMALL = BuildConfig(anomalies=16, anomalies_full_view=6, normal_flagged=6, normal_quiet=8, uncertain=4, rule_cases=10, injection_cases=9,
                   borderline=6)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclass(frozen=True)
class SmallSet:
    """A data set written to disk and what it was built from."""

    path: Path
    examples: list[Example]
    pool: CasePool
    data: HDFSData
