"""Command-line options that several commands share (``detect``, ``bench``, ``report``).

One definition, so ``anomaly-agent detect`` and ``anomaly-agent report`` read a log the same
way and a new option or default changes both. Defaults come from ``ANOMALY_AGENT_<OPTION>``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from agent.settings import env_setting as _env

__all__ = ["add_log_options", "add_window_options"]

Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def add_log_options(parser: Parser, detectors: Sequence[str]) -> None:
    """How to read a log and which detector scores it."""
    parser.add_argument("--format", default=_env("format", "hdfs"),
                        help="format string like '<Date> <Time> <Level> <Content>' or a system name (hdfs, bgl, ...)")
    parser.add_argument("--parser", default=_env("parser", "hdfs"), help="drain3 preset in detectors/logs/parsers.toml")
    parser.add_argument("--detector", default=_env("detector", "log-ensemble"), choices=list(detectors))
    parser.add_argument("--id-pattern", default=_env("id_pattern", r"blk_-?\d+"), help="regex naming a line's session")


def add_window_options(parser: Parser, *, fraction_of: str = "the input") -> None:
    """What the detector fits on and how lines are grouped into candidates."""
    parser.add_argument("--train", default=_env("train", None), help="log of normal operation to fit on")
    parser.add_argument("--train-fraction", type=float, default=_env("train_fraction", 0.2),
                        help=f"without --train: fit on this leading share of {fraction_of}")
    parser.add_argument("--group", choices=["session", "count", "time"], default=_env("group", "session"))
    parser.add_argument("--window", type=float, default=_env("window", 100.0), help="window size (lines or seconds)")
    parser.add_argument("--step", type=float, default=_env("step", None), help="window step (default: tumbling)")
    parser.add_argument("--max-idle-lines", type=int, default=_env("max_idle_lines", 200_000))
