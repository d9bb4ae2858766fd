"""The ``anomaly-agent`` command line: detect, eval, bench, demo.

Every option has a default, a flag and an environment variable
(``ANOMALY_AGENT_<OPTION>``, e.g. ``ANOMALY_AGENT_DETECTOR``); nothing is read
silently from the working directory. User errors print one clear line and exit
with status 2 -- never a bare traceback.

This is the one module in ``agent`` that imports ``eval`` (lazily, for the ``eval``
and ``bench`` subcommands); the rest of ``agent`` does not.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.settings import env_setting as _env

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "samples" / "hdfs_demo"


class UserError(Exception):
    """A problem with the user's input or settings: printed without a traceback."""


# -- detect -------------------------------------------------------------------------------
def _grouping(args: argparse.Namespace) -> dict[str, Any]:
    grouping: dict[str, Any] = {"mode": args.group}
    if args.group == "session":
        grouping.update(id_pattern=args.id_pattern, max_idle_lines=args.max_idle_lines)
    else:
        grouping.update(size=args.window, step=args.step)
    return grouping


def _parser_config(name: str):  # noqa: ANN202
    from detectors.logs.templates import load_preset

    return load_preset(name)


def cmd_detect(args: argparse.Namespace) -> int:
    from detectors.logs.ingest import IngestReport, read_log
    from detectors.logs.pipeline import LogPipeline
    from detectors.registry import make_detector

    pipe = LogPipeline(make_detector(args.detector), log_format=args.format,
                       parser=_parser_config(args.parser), grouping=_grouping(args))
    if args.train:
        report = pipe.fit(Path(args.train))
        print(f"fitted on {args.train}: {report.summary()}", file=sys.stderr)
    else:
        records = []
        report = IngestReport(source=args.input)
        total = 0
        for rec in read_log(args.input, args.format, report=report):
            total += 1
            records.append(rec)
        n_fit = max(1, int(len(records) * args.train_fraction))
        print(f"no --train file: fitting on the first {n_fit} of {total} lines of {args.input}, "
              "assumed mostly normal", file=sys.stderr)
        pipe.fit_sequences(records[:n_fit])
        del records
    lo_hi = None
    if args.lines:
        try:
            lo, hi = (int(x) for x in args.lines.split("-", 1))
        except ValueError as exc:
            raise UserError(f"--lines must look like 100-500, got {args.lines!r}") from exc
        lo_hi = (lo, hi)
    result = pipe.detect(Path(args.input), line_range=lo_hi)
    out = Path(args.out) if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as fh:
            for cand in result.candidates:
                fh.write(cand.to_json() + "\n")
    print(result.report.summary(), file=sys.stderr)
    if result.unseen_lines:
        print(f"{result.unseen_lines} line(s) matched no template learned from normal data", file=sys.stderr)
    _print_candidates(result.candidates[: args.top], result.sequences_scored)
    if out:
        print(f"wrote {len(result.candidates)} candidates to {out}")
    return 0


def _diverse(candidates: Sequence[Any], n: int) -> list[Any]:
    """The top ``n`` candidates, taken in turn from each kind of finding (its first evidence's reason).

    Scores of different members are not comparable in size, so a plain top-n can show a
    single kind of anomaly; a demo should show each kind the detectors found.
    """
    groups: dict[str, list[Any]] = {}
    for cand in candidates:
        reason = cand.evidence[0].data.get("reason", "other") if cand.evidence else "other"
        groups.setdefault(str(reason), []).append(cand)
    out: list[Any] = []
    while len(out) < n and any(groups.values()):
        for queue in groups.values():
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


def _print_candidates(candidates: Sequence[Any], scored: int) -> None:
    print(f"{len(candidates)} top candidate(s) of {scored} sequences scored")
    for rank, cand in enumerate(candidates, 1):
        loc = cand.locator
        print(f"{rank:3d}. {loc.get('sequence')}  score {cand.score:.3g} (threshold {cand.threshold:.3g}, "
              f"{cand.detector})  lines {loc.get('first_line')}-{loc.get('last_line')}")
        for ev in cand.evidence[:3]:
            lines = ev.data.get("lines", [])
            print(f"       [{ev.id}] {ev.summary}  lines {lines[:6]}")


# -- eval / bench ------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a directory; it must hold the data sets "
                        "(hdfs_labelled/, loghub_2k/, loghub_2k_corrected/, nab/, smap_msl/; see README, 'Data')")
    if args.what == "explain":
        from eval import explain

        explain.run(data_dir, Path(args.out) if args.out else None, model=args.model, limit=args.limit,
                    calibration=args.calibration, save_weights=args.save_weights,
                    injection_cases_n=args.injection_cases, rule_cases=args.rule_cases,
                    alerts_limit=args.alerts_limit)
        return 0
    if args.what == "timeseries":
        from eval import timeseries

        timeseries.run(data_dir, Path(args.out) if args.out else None, include_slow=not args.fast)
        return 0
    from eval import logs

    detectors = tuple(args.detectors.split(",")) if args.detectors else logs.LOG_DETECTORS
    fractions = tuple(float(x) for x in args.splits.split(",")) if args.splits else ()
    modes = () if args.skip_parsing else ("per-system", "generic")
    logs.run(data_dir, Path(args.out) if args.out else None, detectors=detectors, fractions=fractions,
             parsing_modes=modes)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "api":
        from eval.api_bench import bench_api

        r = bench_api(duration_s=args.duration, clients=args.clients, out=args.out)
        return 0 if r["meets_target"] else 1
    if args.what == "adapter":
        from eval.adapter_bench import bench_adapter

        if not args.adapter:
            raise UserError("bench adapter needs --adapter RUN/adapter.gguf (a training run's export, with the "
                            "peft adapter/ folder beside it)")
        result = bench_adapter(args.adapter, preset=args.model, prompts=args.prompts)
    elif args.what == "explain":
        from eval.explain_bench import bench_explain

        result = bench_explain(model=args.model, repeats=args.repeats)
    elif args.what == "timeseries":
        from eval.ts_bench import bench_timeseries

        result = bench_timeseries()
    else:
        from eval.bench import bench_logs

        path = Path(args.file) if args.file else DEMO_DIR / "test.log"
        result = bench_logs(path, log_format=args.format, parser=args.parser, detector=args.detector,
                            memory_factor=args.memory_factor, id_pattern=args.id_pattern)
    if args.out:
        from eval.results import write_result

        write_result(result, args.out)
    return 0


# -- demo ----------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from detectors.logs.pipeline import LogPipeline
    from detectors.registry import make_detector

    sample = Path(args.sample)
    train, test, labels_csv = sample / "train.log", sample / "test.log", sample / "test_labels.csv"
    if not train.exists():
        raise UserError(f"demo sample missing: {train}; regenerate with `python -m eval.synth {sample}`")
    pipe = LogPipeline(make_detector(args.detector), log_format="hdfs", parser=_parser_config("hdfs"),
                       grouping={"mode": "session", "id_pattern": r"blk_-?\d+"})
    pipe.fit(train)
    result = pipe.detect(test)
    print(f"anomaly-agent demo: fitted {args.detector} on {train.name} (normal operation), "
          f"scored {result.sequences_scored} block sessions of {test.name}\n")
    _print_candidates(_diverse(result.candidates, args.top), result.sequences_scored)
    if labels_csv.exists():
        import csv

        with labels_csv.open() as fh:
            truth = {r["BlockId"]: r["Label"] == "Anomaly" for r in csv.DictReader(fh)}
        flagged = {c.locator.get("sequence") for c in result.candidates}
        tp = sum(1 for b in flagged if truth.get(b))
        n_anom = sum(truth.values())
        precision = tp / len(flagged) if flagged else 0.0
        recall = tp / n_anom if n_anom else 0.0
        print(f"\nagainst the sample's labels: {len(flagged)} flagged, {tp} of {n_anom} anomalous blocks found "
              f"(precision {precision:.2f}, recall {recall:.2f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for cand in result.candidates:
            fh.write(cand.to_json() + "\n")
    print(f"wrote {len(result.candidates)} candidates to {out}")
    if args.explain > 0:
        _demo_verdicts(_diverse(result.candidates, args.explain), args, out.parent)
    return 0


def _demo_verdicts(candidates: Sequence[Any], args: argparse.Namespace, out_dir: Path) -> None:
    """The demo's last step: cited verdicts for the shown candidates, with the example knowledge."""
    from agent.explain import Explainer
    from agent.models import ModelNotInstalled, make_model
    from knowledge.ingest import ingest_paths
    from knowledge.store import KnowledgeStore

    store = KnowledgeStore(out_dir / "demo-knowledge")
    ingest_paths(store, [REPO_ROOT / "knowledge" / "examples"])  # idempotent: unchanged passages are kept
    model: Any = None
    if args.model != "none":
        model = make_model(args.model)
        try:
            model.load()
        except ModelNotInstalled as exc:
            print(f"\n(no explainer model: {exc}; showing rules-only verdicts)")
            model = None
    explainer = Explainer(model, store=store, rules=[], cache_dir=out_dir / "demo-explain-cache")
    print(f"\nverdicts ({explainer.provenance().model_id}, example knowledge base):")
    verdicts_path = out_dir / "demo_verdicts.jsonl"
    with verdicts_path.open("w", encoding="utf-8") as fh:
        for cand in candidates:
            verdict = explainer.explain(cand)
            fh.write(verdict.to_json() + "\n")
            _print_verdict(cand.id, verdict)
    stats = explainer.stats.as_dict()
    print(f"{stats['candidates']} verdicts, {stats['model_calls']} model calls, {stats['cache_hits']} from the "
          f"explanation cache, {stats['fallbacks']} rules-only; wrote {verdicts_path}")


def _print_verdict(cand_id: str, verdict: Any) -> None:
    print(f"{cand_id}: {verdict.label.value}, severity {int(verdict.severity)}, {verdict.anomaly_type} "
          f"[{verdict.explained_by.value}] {verdict.summary[:160]}")
    for step in verdict.causal_chain[:2]:
        print(f"    - {step.text[:120]} [{', '.join(step.evidence_ids)}]")
    cited = ", ".join([*verdict.passage_ids, *verdict.rule_ids])
    if cited:
        print(f"    knowledge and rules: {cited}")


# -- explain -------------------------------------------------------------------------------
def _read_candidates(path: Path) -> list[Any]:
    from pydantic import ValidationError

    from detectors.records import Candidate

    if not path.exists():
        raise UserError(f"{path}: no such file (write one with `anomaly-agent detect ... --out {path.name}`)")
    out = []
    problems = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(Candidate.model_validate_json(line))
            except ValidationError as exc:
                # Keep every valid candidate; name each bad line (the first few) and go on.
                problems += 1
                if problems <= 5:
                    first = exc.errors()[0]
                    where = ".".join(str(x) for x in first.get("loc", ())) or "line"
                    print(f"{path}: line {line_no}: field {where!r}: {first.get('msg')} (line skipped)", file=sys.stderr)
    if problems > 5:
        print(f"{path}: {problems} bad lines in all were skipped", file=sys.stderr)
    if not out:
        raise UserError(f"{path}: no valid candidates in the file ({problems} bad lines)")
    return out


def cmd_explain(args: argparse.Namespace) -> int:
    from agent.explain import Explainer
    from knowledge.rules import RuleBook

    candidates = _read_candidates(Path(args.candidates))[: args.top]
    store = None
    store_dir = _store_dir(args)
    if not args.no_knowledge and store_dir.exists():
        from knowledge.store import KnowledgeStore

        store = KnowledgeStore(store_dir)
    model = None
    if args.model != "none":
        from agent.models import make_model

        model = make_model(args.model)
    explainer = Explainer(model, store=store, rules=RuleBook(store_dir), cache_dir=store_dir / "explain-cache")
    out = Path(args.out) if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    with (out.open("w", encoding="utf-8") if out else open(os.devnull, "w")) as fh:
        for cand in candidates:
            verdict = explainer.explain(cand)
            fh.write(verdict.to_json() + "\n")
            _print_verdict(cand.id, verdict)
    stats = explainer.stats.as_dict()
    print("explain stats: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    if out:
        print(f"wrote {len(candidates)} verdicts to {out}")
    return 0


# -- knowledge and rules ---------------------------------------------------------------------
def _store_dir(args: argparse.Namespace) -> Path:
    return Path(args.store).expanduser()


def cmd_knowledge(args: argparse.Namespace) -> int:
    from knowledge.store import KnowledgeStore

    store = KnowledgeStore(_store_dir(args))
    if args.action == "add":
        from knowledge.ingest import ingest_paths

        paths = [Path(p) for p in args.paths] or [REPO_ROOT / "knowledge" / "examples"]
        results = ingest_paths(store, paths)
        for result in results:
            print(result.line())
        return 0 if all(r.ok for r in results) else 1
    if args.action == "search":
        if not args.paths:
            raise UserError("knowledge search needs a query, e.g. anomaly-agent knowledge search 'DataNode write'")
        for passage in store.search(" ".join(args.paths), k=args.k):
            print(f"[{passage.id}] {passage.source} > {passage.heading}  (score {passage.score:.3f})")
            print("    " + passage.text[:300].replace("\n", " "))
        return 0
    if args.action == "remove":
        for source in args.paths:
            store.remove_source(source)
            print(f"removed {source}")
        return 0
    for info in store.list_sources():
        print(info)
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from knowledge.rules import RuleBook

    book = RuleBook(_store_dir(args))
    if args.action == "add":
        if not args.text:
            raise UserError('rules add needs the rule text, e.g. anomaly-agent rules add "a DataNode error '
                            'during a write pipeline is at least high severity"')
        rule = book.add(" ".join(args.text), effect=args.effect, severity=args.severity)
        print(rule.describe())
        return 0
    if args.action == "remove":
        for rule_id in args.text:
            print(f"removed {book.remove(rule_id).describe()}")
        return 0
    for rule in book.list():
        print(rule.describe())
    print(f"rules version {book.rules_version}")
    return 0


# -- wiring --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from agent.options import add_log_options, add_window_options
    from detectors.registry import known_detectors

    p = argparse.ArgumentParser(prog="anomaly-agent",
                                description="Find, rank and explain anomalies in logs and time series.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("detect", help="rank anomalous sessions/windows of a log file")
    d.add_argument("input")
    add_log_options(d, known_detectors())
    add_window_options(d)
    d.add_argument("--lines", default=None, help="only lines in this range, e.g. 1000-2000")
    d.add_argument("--top", type=int, default=_env("top", 20))
    d.add_argument("--out", default=_env("out", None), help="write all candidates as JSON lines")
    d.set_defaults(func=cmd_detect)

    e = sub.add_parser("eval", help="measure on public labelled data")
    e.add_argument("what", choices=["logs", "timeseries", "explain", "finetune"],
                   help="finetune: base vs tuned explainer on held-out cases (its own options: eval finetune --help)")
    e.add_argument("--data-dir", required=_env("data_dir", None) is None, default=_env("data_dir", None))
    e.add_argument("--out", default=_env("eval_out", None))
    e.add_argument("--detectors", default=None, help="comma-separated subset")
    e.add_argument("--splits", default="0.8,0.5", help="chronological train fractions, comma-separated")
    e.add_argument("--skip-parsing", action="store_true", help="logs: HDFS only")
    e.add_argument("--fast", action="store_true", help="timeseries: skip the slow matrix-profile runs")
    e.add_argument("--model", default=_env("model", "smollm2-135m"), help="explain: the explainer model")
    e.add_argument("--limit", type=int, default=200, help="explain: HDFS candidates to explain")
    e.add_argument("--calibration", type=int, default=60,
                   help="explain: sessions of the 50-80%% slice that measure the decision weights (0: use agent/weights.json)")
    e.add_argument("--save-weights", action="store_true", help="explain: record the measured weights in agent/weights.json")
    e.add_argument("--injection-cases", type=int, default=24, help="explain: injection suite size (0: skip)")
    e.add_argument("--rule-cases", type=int, default=None, help="explain: first N rule-suite cases (default all; 0: skip)")
    e.add_argument("--alerts-limit", type=int, default=100,
                   help="explain: sessions of the stale-detector part (its alerts on the test part + unflagged; 0: skip)")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="throughput and memory as ratios measured in one run")
    b.add_argument("what", choices=["logs", "timeseries", "explain", "api", "adapter"])
    b.add_argument("file", nargs="?", help="logs: the log file (default: the bundled demo sample)")
    add_log_options(b, known_detectors())
    b.add_argument("--memory-factor", type=int, default=_env("memory_factor", 10))
    b.add_argument("--model", default=_env("model", "smollm2-135m"), help="explain: the llama.cpp preset")
    b.add_argument("--repeats", type=int, default=1, help="explain: passes over the synthetic candidates")
    b.add_argument("--duration", type=float, default=15.0, help="api: seconds of load")
    b.add_argument("--clients", type=int, default=50, help="api: concurrent clients")
    b.add_argument("--adapter", default=None,
                   help="adapter: a training run's adapter.gguf (its peft adapter/ folder beside it)")
    b.add_argument("--prompts", type=int, default=6, help="adapter: explainer prompts per backend")
    b.add_argument("--out", default=None)
    b.set_defaults(func=cmd_bench)

    default_store = _env("store", str(Path(os.environ.get("XDG_DATA_HOME", "~/.local/share")) / "anomaly-agent"))
    k = sub.add_parser("knowledge", help="process documents and runbooks (Chroma store)")
    k.add_argument("action", choices=["add", "search", "list", "remove"])
    k.add_argument("paths", nargs="*", help="add: files/folders (default: the bundled examples); "
                                            "search: the query; remove: sources")
    k.add_argument("-k", type=int, default=5, help="search: passages to show")
    k.add_argument("--store", default=default_store, help="store directory")
    k.set_defaults(func=cmd_knowledge)

    r = sub.add_parser("rules", help="natural-language anomaly rules")
    r.add_argument("action", choices=["add", "list", "remove"])
    r.add_argument("text", nargs="*", help="add: the rule in plain language; remove: rule ids")
    r.add_argument("--effect", default=None, choices=["raise_severity", "lower_severity", "set_normal",
                                                      "define_anomaly"])
    r.add_argument("--severity", default=None, help="0-4 or none/low/medium/high/critical")
    r.add_argument("--store", default=default_store, help="store directory")
    r.set_defaults(func=cmd_rules)

    x = sub.add_parser("explain", help="turn candidates (JSON lines from detect) into cited verdicts")
    x.add_argument("candidates", help="JSON lines written by `detect --out` or `demo`")
    x.add_argument("--model", default=_env("model", "smollm2-135m"),
                   help="smollm2-135m (embedded), qwen2.5-coder-0.5b/1.5b, llama-cpp, openai, or none (rules only)")
    x.add_argument("--store", default=default_store, help="knowledge/rules store directory")
    x.add_argument("--no-knowledge", action="store_true", help="do not retrieve passages")
    x.add_argument("--top", type=int, default=_env("explain_top", 20))
    x.add_argument("--out", default=_env("explain_out", None), help="write verdicts as JSON lines")
    x.set_defaults(func=cmd_explain)

    from agent import api as api_cmd
    from agent import report as report_cmd

    sv = sub.add_parser("serve", help="HTTP API and web interface for analysts (bearer token)")
    api_cmd.add_arguments(sv)
    sv.set_defaults(func=api_cmd.serve)

    rp = sub.add_parser("report", help="explain every candidate into one resumable HTML/JSON/CSV report")
    report_cmd.add_arguments(rp)
    rp.set_defaults(func=report_cmd.run)

    for words, helptext in (("finetune", "LoRA fine-tuning of the explainer model (--config --data --out; see finetune/)"),
                            ("finetune-data", "build the fine-tuning data set from the training part of labelled logs"),
                            ("finetune-export", "convert a peft LoRA adapter to a GGUF LoRA for llama.cpp")):
        sub.add_parser(words, help=helptext, add_help=False)  # handled by PASS_THROUGH in main()

    m = sub.add_parser("demo", help="run the main job on the bundled sample")
    m.add_argument("--sample", default=_env("sample", str(DEMO_DIR)))
    m.add_argument("--detector", default=_env("detector", "log-ensemble"), choices=known_detectors())
    m.add_argument("--top", type=int, default=10)
    m.add_argument("--out", default=_env("demo_out", "out/demo_candidates.jsonl"))
    m.add_argument("--explain", type=int, default=_env("demo_explain", 5),
                   help="explain this many of the shown candidates (0: detection only)")
    m.add_argument("--model", default=_env("model", "smollm2-135m"), help="the explainer model, or none (rules only)")
    m.set_defaults(func=cmd_demo)
    return p


# Subcommands whose options live with their module (fine-tuning has many): the rest of the
# command line is handed to the module's own ``main``.
PASS_THROUGH = {"finetune": "finetune.train", "finetune-data": "finetune.dataset",
                "finetune-export": "finetune.export", "eval finetune": "finetune.evaluate"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    import importlib

    from agent.settings import SettingError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        for words, module in PASS_THROUGH.items():
            n = len(words.split())
            if argv[:n] == words.split():
                return int(importlib.import_module(module).main(argv[n:]) or 0)
        parser = build_parser()
    except SettingError as exc:  # a bad ANOMALY_AGENT_* default, found while building the options
        print(f"anomaly-agent: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, KeyError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"anomaly-agent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # Model problems (not installed, hash refused, timeout) are RuntimeErrors with a reason.
        from agent.models import ModelError

        if not isinstance(exc, ModelError):
            raise
        print(f"anomaly-agent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
