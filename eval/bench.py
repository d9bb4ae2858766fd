"""`anomaly-agent bench logs FILE`: throughput and memory, as ratios measured in one run.

Speed is reported as a ratio against drain3 parsing the same file in the same
process (so a busy shared machine slows both alike), and memory as the ratio of
peak RSS for a 10x longer input to the 1x input, each measured in a fresh process.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from drain3 import TemplateMiner as Drain3Miner
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig

from detectors.logs.ingest import IngestReport, iter_lines, read_log
from detectors.logs.pipeline import LogPipeline
from detectors.logs.templates import ParserConfig, load_preset
from detectors.registry import make_detector


def drain3_alone(path: Path, config: ParserConfig) -> tuple[int, float]:
    """Lines and seconds for plain drain3 ``add_log_message`` over every raw line."""
    cfg = TemplateMinerConfig()
    cfg.drain_sim_th, cfg.drain_depth = config.sim_th, config.depth
    cfg.masking_instructions = [MaskingInstruction(p, n) for p, n in config.masks]
    cfg.profiling_enabled = False
    miner = Drain3Miner(persistence_handler=None, config=cfg)
    n = 0
    t0 = time.perf_counter()
    for _, text in iter_lines(path, IngestReport(source=str(path))):
        miner.add_log_message(text)
        n += 1
    return n, time.perf_counter() - t0


def _fit_pipeline(path: Path, log_format: str | None, parser: ParserConfig, detector: str,
                  fit_lines: int, grouping: dict[str, Any]) -> LogPipeline:
    pipe = LogPipeline(make_detector(detector), log_format=log_format, parser=parser, grouping=grouping)
    records = []
    for rec in read_log(path, log_format):
        records.append(rec)
        if len(records) >= fit_lines:
            break
    pipe.fit_sequences(records)
    return pipe


def measure(path: Path, log_format: str | None, parser: ParserConfig, detector: str,
            fit_lines: int, grouping: dict[str, Any], fit_path: Path | None = None) -> dict[str, Any]:
    """Fit on the first ``fit_lines`` of ``fit_path`` (default ``path``), then time detection of ``path``."""
    t0 = time.perf_counter()
    pipe = _fit_pipeline(fit_path or path, log_format, parser, detector, fit_lines, grouping)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = pipe.detect(path)
    detect_s = time.perf_counter() - t0
    lines = result.report.lines_read
    return {"lines": lines, "fit_seconds": round(fit_s, 2), "detect_seconds": round(detect_s, 3),
            "lines_per_second": round(lines / detect_s, 1), "candidates": len(result.candidates),
            "sequences": result.sequences_scored,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def make_longer(path: Path, factor: int, out: Path, id_pattern: str) -> Path:
    """Write ``factor`` copies of ``path`` with session ids made unique per copy."""
    rx = re.compile(id_pattern)
    with gzip.open(out, "wt", compresslevel=1) as dst:
        for k in range(factor):
            for _, text in iter_lines(path, IngestReport(source=str(path))):
                dst.write(rx.sub(lambda m, k=k: f"{m.group(0)}{k}" if k else m.group(0), text) + "\n")
    return out


def _in_subprocess(args: dict[str, Any]) -> dict[str, Any]:
    code = ("import json,sys; from eval.bench import _child; print(json.dumps(_child(json.loads(sys.argv[1]))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(args: dict[str, Any]) -> dict[str, Any]:
    parser = ParserConfig.from_dict(args["parser"])
    return measure(Path(args["path"]), args["format"], parser, args["detector"], args["fit_lines"],
                   args["grouping"], Path(args["fit_path"]))


def bench_logs(path: Path, *, log_format: str | None = "hdfs", parser: str = "hdfs",
               detector: str = "log-ensemble", fit_fraction: float = 0.2, memory_factor: int = 10,
               id_pattern: str = r"blk_-?\d+", max_idle_lines: int = 50_000,
               echo: Any = print) -> dict[str, Any]:
    """Run the log benchmark and return its numbers (also echoed as a table)."""
    config = load_preset(parser)
    grouping = {"mode": "session", "id_pattern": id_pattern, "max_idle_lines": max_idle_lines}
    total_lines = sum(1 for _ in iter_lines(path, IngestReport(source=str(path))))
    fit_lines = max(1, int(total_lines * fit_fraction))

    base_lines, base_s = drain3_alone(path, config)
    ours = measure(path, log_format, config, detector, fit_lines, grouping)
    base_lps = base_lines / base_s
    # Second drain3 pass after ours, and take the mean: the machine's load drifts.
    base_lines2, base_s2 = drain3_alone(path, config)
    base_lps = (base_lps + base_lines2 / base_s2) / 2
    result: dict[str, Any] = {
        "file": str(path), "lines": total_lines, "detector": detector, "parser": parser,
        "drain3_lines_per_second": round(base_lps, 1),
        "ours_lines_per_second": ours["lines_per_second"],
        "ratio_to_drain3": round(ours["lines_per_second"] / base_lps, 3),
        "fit_seconds": ours["fit_seconds"], "candidates": ours["candidates"], "sequences": ours["sequences"],
    }
    if memory_factor > 1:
        with tempfile.TemporaryDirectory() as tmp:
            longer = make_longer(path, memory_factor, Path(tmp) / f"x{memory_factor}.log.gz", id_pattern)
            common = {"format": log_format, "parser": config.to_dict(), "detector": detector,
                      "fit_lines": fit_lines, "grouping": grouping, "fit_path": str(path)}
            one = _in_subprocess({**common, "path": str(path)})
            many = _in_subprocess({**common, "path": str(longer)})
        result.update({
            "peak_rss_mb_1x": one["peak_rss_mb"], f"peak_rss_mb_{memory_factor}x": many["peak_rss_mb"],
            "memory_ratio": round(many["peak_rss_mb"] / one["peak_rss_mb"], 3),
            f"lines_per_second_{memory_factor}x": many["lines_per_second"],
        })
    echo("| metric | value |\n|---|---|")
    for key, value in result.items():
        echo(f"| {key} | {value} |")
    return result
