"""Log-parsing benchmark: our drain3 configuration against the Loghub 2k ground truth.

The template miner is only as good as its configuration (masks, thresholds,
delimiters), so we measure it the way the log-parsing literature does, on the
16 Loghub 2k samples, to keep the presets in ``parsers.toml`` honest:

* GA / FGA: grouping accuracy and its F1 over groups (Zhu et al., ICSE-SEIP 2019;
  Jiang et al., ISSTA 2024). Only the grouping matters, not the template text.
* PA: parsing accuracy, the fraction of messages whose template string equals the
  ground truth exactly. Reported raw and after the Loghub-2.0 template clean-up.
* FTA: F1 over templates that are both grouped and written correctly (clean-up on).

The data directory is a parameter (the folder that holds ``loghub_2k/`` and
``loghub_2k_corrected/``); nothing here knows where it lives.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from detectors.logs.templates import ParserConfig, TemplateMiner, load_preset, preset_names

SYSTEMS: tuple[str, ...] = (
    "Android", "Apache", "BGL", "HDFS", "HPC", "Hadoop", "HealthApp", "Linux",
    "Mac", "OpenSSH", "OpenStack", "Proxifier", "Spark", "Thunderbird", "Windows", "Zookeeper",
)  # fmt: skip

Mode = Literal["per-system", "generic"]

_LAYOUT = (
    "expected <data_dir>/loghub_2k/<System>/<System>_2k.log_structured.csv and "
    "<data_dir>/loghub_2k_corrected/<System>/<System>_2k.log_structured_corrected.csv"
)


# --------------------------------------------------------------------------- data


def structured_csv_path(data_dir: Path, system: str, corrected: bool) -> Path:
    """Path of one system's structured CSV; a function so errors and tests agree on it."""
    if corrected:
        return Path(data_dir) / "loghub_2k_corrected" / system / f"{system}_2k.log_structured_corrected.csv"
    return Path(data_dir) / "loghub_2k" / system / f"{system}_2k.log_structured.csv"


def load_loghub_2k(data_dir: Path, system: str, corrected: bool) -> tuple[list[str], list[str], list[str]]:
    """Read one Loghub 2k sample: message contents and ground-truth event ids/templates.

    Everything is read as ``str`` (HDFS dates and ids must not become numbers) and
    ``\\r`` is stripped, because the upstream files mix CRLF and bare CR endings.

    Args:
        data_dir: Folder containing ``loghub_2k/`` and ``loghub_2k_corrected/``.
        system: Loghub system name, e.g. ``"HDFS"`` (case as in the folder names).
        corrected: Use the corrected ground truth of Khan et al. (ICSE 2022).

    Returns:
        ``(contents, truth_event_ids, truth_templates)``, in ``LineId`` order.

    Raises:
        FileNotFoundError: If the CSV is missing (the message names the expected layout).
        ValueError: If the CSV lacks the needed columns or has empty ground truth.
    """
    path = structured_csv_path(data_dir, system, corrected)
    if not path.is_file():
        known = ""
        root = path.parent.parent
        if root.is_dir():
            known = f"; systems present there: {sorted(p.name for p in root.iterdir() if p.is_dir())}"
        raise FileNotFoundError(f"no Loghub 2k file at {path} ({_LAYOUT}){known}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    needed = {"LineId", "Content", "EventId", "EventTemplate"}
    missing = needed - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {list(frame.columns)} ({_LAYOUT})")
    frame = frame.assign(_line=frame["LineId"].astype(int)).sort_values("_line")
    if (frame["EventId"].str.strip() == "").any():
        raise ValueError(f"{path}: empty EventId in {int((frame['EventId'].str.strip() == '').sum())} row(s)")

    def clean(col: str) -> list[str]:
        return [s.replace("\r", "") for s in frame[col].tolist()]

    return clean("Content"), clean("EventId"), clean("EventTemplate")


# ------------------------------------------------------------------------ metrics


def grouping_scores(truth: Sequence[Any], pred: Sequence[Any]) -> tuple[float, float]:
    """Grouping accuracy (GA) and F1 of grouping accuracy (FGA).

    A message is grouped correctly when the set of messages sharing its predicted
    label is exactly the set sharing its true label. FGA is the F1 of
    precision = correct groups / predicted groups and recall = correct groups /
    true groups (Loghub-2.0). Labels are opaque: ids or template strings.

    Returns:
        ``(GA, FGA)``; both 0.0 on empty input.
    """
    if len(truth) != len(pred):
        raise ValueError(f"length mismatch: {len(truth)} truth labels vs {len(pred)} predicted")
    if not truth:
        return 0.0, 0.0
    pred_sizes = Counter(pred)
    by_truth: dict[Any, list[Any]] = defaultdict(list)
    for t, p in zip(truth, pred):
        by_truth[t].append(p)
    correct_msgs = correct_groups = 0
    for members in by_truth.values():
        labels = set(members)
        if len(labels) == 1 and pred_sizes[members[0]] == len(members):
            correct_msgs += len(members)
            correct_groups += 1
    ga = correct_msgs / len(truth)
    precision, recall = correct_groups / len(pred_sizes), correct_groups / len(by_truth)
    fga = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return ga, fga


def grouping_accuracy(truth: Sequence[Any], pred: Sequence[Any]) -> float:
    """GA alone; see :func:`grouping_scores`."""
    return grouping_scores(truth, pred)[0]


def parsing_accuracy(truth_templates: Sequence[str], pred_templates: Sequence[str]) -> float:
    """PA: fraction of messages whose predicted template string equals the truth exactly."""
    if len(truth_templates) != len(pred_templates):
        raise ValueError(f"length mismatch: {len(truth_templates)} vs {len(pred_templates)}")
    if not truth_templates:
        return 0.0
    return sum(t == p for t, p in zip(truth_templates, pred_templates)) / len(truth_templates)


def template_f1(truth_templates: Sequence[str], pred_templates: Sequence[str]) -> float:
    """FTA (Loghub-2.0): F1 over templates that are grouped *and* written correctly.

    Messages are grouped by predicted template string; a predicted template counts
    as correct when all its messages carry one true template equal to it.
    """
    if len(truth_templates) != len(pred_templates):
        raise ValueError(f"length mismatch: {len(truth_templates)} vs {len(pred_templates)}")
    if not truth_templates:
        return 0.0
    by_pred: dict[str, set[str]] = defaultdict(set)
    for t, p in zip(truth_templates, pred_templates):
        by_pred[p].add(t)
    correct = sum(1 for p, ts in by_pred.items() if ts == {p})
    precision, recall = correct / len(by_pred), correct / len(set(truth_templates))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------- template clean-up

# Token delimiters of the Loghub-2.0 clean-up: a reduced set used for path-like
# strings plus the punctuation that separates variables inside a token.
_PATH_DELIMS = r"\s,!;:=|\"'\[\](){}"
_TOKEN_SPLIT = re.compile(r"([" + _PATH_DELIMS + r".\-+@#$%&])")
_DIGITS = re.compile(r"^\d+$")
_WORD_WITH_VAR = re.compile(r"^[^\s/]*<\*>[^\s/]*$")
# After DV/CV, wildcards joined by one of these collapse into one wildcard.
_JOINED_VARS = ("<*>:<*>", "<*>#<*>", "<*>/<*>", "<*>@<*>")


def _replace_until_stable(text: str, old: str, new: str) -> str:
    while old in text:
        text = text.replace(old, new)
    return text


def correct_single_template(template: str) -> str:
    """Canonical form of a template, following the Loghub-2.0 clean-up rules.

    Parsers and ground truths disagree on cosmetic details (``blk_<*>`` vs ``<*>``,
    ``<*>.<*>`` vs ``<*>``, double spaces), so Loghub-2.0 (Jiang et al., ISSTA 2024,
    ``benchmark/evaluation/utils/post_process.py``, after Khan et al., ICSE 2022)
    normalises both sides before comparing strings. The active rules are: DS (collapse
    whitespace), DG (all-digit token -> ``<*>``), WV (token glued to a wildcard -> ``<*>``),
    DV/CV (wildcards joined by ``.``, nothing, ``:``, ``#``, ``/``, ``@`` -> one wildcard)
    and quoted or ``#``-prefixed lone wildcards lose their decoration.
    """
    template = re.sub(r"\s+", " ", template.strip())
    tokens = _TOKEN_SPLIT.split(template)
    out = []
    for token in tokens:
        if _DIGITS.match(token):
            token = "<*>"
        if _WORD_WITH_VAR.match(token) and token != "<*>/<*>":
            token = "<*>"
        out.append(token)
    template = "".join(out)
    template = _replace_until_stable(template, "<*>.<*>", "<*>")
    template = _replace_until_stable(template, "<*><*>", "<*>")
    template = _replace_until_stable(template, " #<*># ", " <*> ")
    template = _replace_until_stable(template, " #<*> ", " <*> ")
    for joined in _JOINED_VARS:
        template = _replace_until_stable(template, joined, "<*>")
    template = _replace_until_stable(template, "<*>.<*>", "<*>")
    template = _replace_until_stable(template, ' "<*>" ', " <*> ")
    template = _replace_until_stable(template, " '<*>' ", " <*> ")
    template = _replace_until_stable(template, "<*><*>", "<*>")
    return template


def normalise_masks(template: str, mask_names: Sequence[str]) -> str:
    """Turn our named masks (``<NUM>``, ``<IP>``...) into the benchmark's ``<*>``.

    Only the configuration's own mask names are replaced, so a literal ``<foo>`` in
    a message survives.
    """
    names = sorted({re.escape(n) for n in mask_names}, key=len, reverse=True)
    if not names:
        return template
    return re.sub(r"<(?:" + "|".join(names) + r")>", "<*>", template)


# ---------------------------------------------------------------------- evaluation


def preset_for(system: str, mode: Mode) -> str:
    """Preset name used for ``system``: its lower-case name if shipped, else ``generic``."""
    if mode == "generic":
        return "generic"
    if mode != "per-system":
        raise ValueError(f"mode must be 'per-system' or 'generic', got {mode!r}")
    name = system.lower()
    return name if name in preset_names() else "generic"


def parse_messages(contents: Sequence[str], config: ParserConfig) -> tuple[list[int], list[str]]:
    """Learn every message in order, then read each one's *final* template.

    drain3 keeps generalising a cluster's template as later messages join, so the
    template returned at learn time would be stale; we keep the cluster id and
    look the template up once all messages are learned.

    Returns:
        ``(cluster_ids, templates)`` with named masks turned into ``<*>``.
    """
    miner = TemplateMiner(config)
    ids = [miner.learn(c) for c in contents]
    final = miner.templates()
    names = [name for _, name in config.masks]
    by_id = {cid: normalise_masks(t, names) for cid, t in final.items()}
    return ids, [by_id[cid] for cid in ids]


def evaluate_system(data_dir: Path, system: str, corrected: bool, config: ParserConfig) -> dict[str, Any]:
    """All benchmark metrics for one system, one ground truth and one configuration.

    Returns:
        A row with ``system``, ``truth`` (``"original"``/``"corrected"``), ``GA``,
        ``FGA``, ``PA_raw``, ``PA`` (after clean-up), ``FTA`` and the numbers of
        predicted and true templates.
    """
    contents, truth_ids, truth_templates = load_loghub_2k(data_dir, system, corrected)
    cluster_ids, templates = parse_messages(contents, config)
    # Truth groups are template strings, as in Loghub-2.0: the corrected ground truth
    # merges some events (Linux E17-E19) by giving them one template, not one id.
    ga, fga = grouping_scores(truth_templates, cluster_ids)
    clean_pred = [correct_single_template(t) for t in templates]
    clean_truth = [correct_single_template(t) for t in truth_templates]
    return {
        "system": system,
        "truth": "corrected" if corrected else "original",
        "GA": ga,
        "FGA": fga,
        "PA_raw": parsing_accuracy(truth_templates, templates),
        "PA": parsing_accuracy(clean_truth, clean_pred),
        "FTA": template_f1(clean_truth, clean_pred),
        "n_pred": len(set(cluster_ids)),
        "n_truth": len(set(truth_templates)),
    }


def evaluate_all(
    data_dir: Path,
    mode: Mode,
    truths: Sequence[bool] = (True, False),
    systems: Sequence[str] = SYSTEMS,
) -> list[dict[str, Any]]:
    """Evaluate every system in one mode, on the corrected and/or original ground truth.

    Args:
        data_dir: Folder containing ``loghub_2k/`` and ``loghub_2k_corrected/``.
        mode: ``"per-system"`` (preset named after the system, else ``generic``) or
            ``"generic"`` (one configuration for all systems).
        truths: Which ground truths, as ``corrected`` flags.
        systems: Subset of :data:`SYSTEMS`.

    Returns:
        One row per (system, ground truth), each with ``mode`` and ``preset`` added.
    """
    rows = []
    for corrected in truths:
        for system in systems:
            preset = preset_for(system, mode)
            row = evaluate_system(data_dir, system, corrected, load_preset(preset))
            rows.append({"mode": mode, "preset": preset, **row})
    return rows


_COLUMNS = ("GA", "FGA", "PA_raw", "PA", "FTA")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a Markdown table, with a mean row after each (mode, ground truth) block."""
    header = ["mode", "truth", "system", "preset", *_COLUMNS, "templates (pred/true)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    blocks: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        blocks[(str(row.get("mode", "")), str(row["truth"]))].append(row)
    for (mode, truth), block in blocks.items():
        for r in block:
            cells = [mode, truth, r["system"], str(r.get("preset", ""))]
            cells += [f"{r[c]:.3f}" for c in _COLUMNS] + [f"{r['n_pred']}/{r['n_truth']}"]
            lines.append("| " + " | ".join(cells) + " |")
        means = [f"**{sum(r[c] for r in block) / len(block):.3f}**" for c in _COLUMNS]
        lines.append("| " + " | ".join([mode, truth, "**mean**", "", *means, ""]) + " |")
    return "\n".join(lines)
