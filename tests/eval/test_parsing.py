"""Metric functions on hand-made examples, and every shipped parser preset on made-up lines.

Stand-alone: nothing here reads /work/shared; the Loghub loader is tested on a tiny
CSV written to a temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from detectors.logs.templates import DEFAULT_MASKS, TemplateMiner, load_preset, preset_names
from eval.parsing import (
    SYSTEMS,
    correct_single_template,
    evaluate_system,
    grouping_accuracy,
    grouping_scores,
    load_loghub_2k,
    markdown_table,
    normalise_masks,
    parse_messages,
    parsing_accuracy,
    preset_for,
    template_f1,
)

# --------------------------------------------------------------------- grouping


def test_ga_perfect_grouping_ignores_label_names() -> None:
    assert grouping_scores(["A", "A", "B"], [7, 7, 3]) == (1.0, 1.0)


def test_ga_merge_loses_both_groups() -> None:
    # Truth {0,1} {2}; prediction puts all three together: nobody is right.
    ga, fga = grouping_scores(["A", "A", "B"], [1, 1, 1])
    assert ga == 0.0
    assert fga == 0.0


def test_ga_split_loses_only_the_split_group() -> None:
    # Truth A={0,1,2}, B={3}; A is split in two, B is exact -> 1 of 4 messages.
    ga, fga = grouping_scores(["A", "A", "A", "B"], [1, 1, 2, 3])
    assert ga == pytest.approx(0.25)
    # 1 correct group; 3 predicted groups, 2 true groups -> P=1/3, R=1/2.
    assert fga == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_ga_textbook_example() -> None:
    truth = ["E1", "E1", "E2", "E2", "E3", "E3"]
    pred = ["a", "a", "b", "c", "d", "d"]
    assert grouping_accuracy(truth, pred) == pytest.approx(4 / 6)


def test_ga_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError):
        grouping_scores(["A"], [1, 2])


def test_ga_empty_input() -> None:
    assert grouping_scores([], []) == (0.0, 0.0)


# ---------------------------------------------------------------------- parsing


def test_pa_exact_string_match() -> None:
    truth = ["open <*>", "open <*>", "close <*>"]
    pred = ["open <*>", "open <*> now", "close <*>"]
    assert parsing_accuracy(truth, pred) == pytest.approx(2 / 3)


def test_fta_counts_templates_right_in_text_and_grouping() -> None:
    truth = ["a <*>", "a <*>", "b <*>", "c"]
    pred = ["a <*>", "a <*>", "b", "c"]  # "b" is grouped right but written wrong
    # correct predicted templates: "a <*>", "c" -> P=2/3, R=2/3
    assert template_f1(truth, pred) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a   b  ", "a b"),  # DS: collapse and strip whitespace
        ("PacketResponder 1 for block blk_<*> terminating", "PacketResponder <*> for block <*> terminating"),  # DG, WV
        ("took <*>.<*> ms", "took <*> ms"),  # DV
        ("<*>@<*>/<*>/<*>:<*>:<*>:<*>.<*> WcpInitialize", "<*> WcpInitialize"),  # joined wildcards
        ("user <*><*> done", "user <*> done"),  # CV
        ("state '<*>' now", "state <*> now"),  # quoted lone wildcard
        ('name "<*>" set', "name <*> set"),
        ("core.<*>", "core.<*>"),  # a word before the dot is constant
        ("v<*>", "<*>"),  # word glued to a variable becomes one variable
        ("/var/<*>/x", "/var/<*>/x"),  # "/" does not split, so paths keep their words
        ("no variables here", "no variables here"),
    ],
)
def test_correct_single_template(raw: str, clean: str) -> None:
    assert correct_single_template(raw) == clean


def test_cleanup_is_idempotent() -> None:
    once = correct_single_template("<*>:<*> x_<*> 12 #<*># y")
    assert correct_single_template(once) == once


def test_normalise_masks_only_touches_configured_names() -> None:
    assert normalise_masks("from <HOST> port <NUM> <foo>", ["HOST", "NUM"]) == "from <*> port <*> <foo>"


def test_parse_messages_reports_final_templates() -> None:
    # The first line's template at learn time was literal; afterwards it is generalised.
    from detectors.logs.templates import ParserConfig

    lines = ["user alice logged in", "user bob logged in", "user carol logged in"]
    ids, templates = parse_messages(lines, ParserConfig(sim_th=0.5, depth=4, masks=()))
    assert len(set(ids)) == 1
    assert templates == ["user <*> logged in"] * 3


# ---------------------------------------------------------------- data loading


def _write_csv(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["LineId,Level,Content,EventId,EventTemplate"]
    for line_id, content, eid, tpl in rows:
        lines.append(f'{line_id},INFO,"{content}",{eid},"{tpl}"')
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())


def _fake_data(tmp_path: Path) -> Path:
    rows = [
        ("2", "user logged in as bob", "E1", "user logged in as <*>"),
        ("1", "user logged in as alice", "E1", "user logged in as <*>"),
        ("3", "disk 081109 full", "E2", "disk <*> full"),
    ]
    _write_csv(tmp_path / "loghub_2k" / "Toy" / "Toy_2k.log_structured.csv", rows)
    _write_csv(tmp_path / "loghub_2k_corrected" / "Toy" / "Toy_2k.log_structured_corrected.csv", rows)
    return tmp_path


def test_load_orders_by_line_id_keeps_strings_and_strips_cr(tmp_path: Path) -> None:
    data = _fake_data(tmp_path)
    contents, ids, templates = load_loghub_2k(data, "Toy", corrected=False)
    assert contents == ["user logged in as alice", "user logged in as bob", "disk 081109 full"]
    assert ids == ["E1", "E1", "E2"]
    assert all("\r" not in t for t in templates)


def test_load_missing_file_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="loghub_2k_corrected.*expected"):
        load_loghub_2k(tmp_path, "HDFS", corrected=True)


def test_load_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "loghub_2k" / "Toy" / "Toy_2k.log_structured.csv"
    path.parent.mkdir(parents=True)
    path.write_text("LineId,Content\n1,hello\n")
    with pytest.raises(ValueError, match="EventId"):
        load_loghub_2k(tmp_path, "Toy", corrected=False)


def test_evaluate_system_and_table_on_toy_data(tmp_path: Path) -> None:
    data = _fake_data(tmp_path)
    row = evaluate_system(data, "Toy", True, load_preset("generic"))
    assert row["GA"] == 1.0
    assert row["PA"] == 1.0  # "<NUM>" -> "<*>", "<*>" learned for the user name
    table = markdown_table([{"mode": "generic", "preset": "generic", **row}])
    assert "| generic | corrected | Toy | generic | 1.000 |" in table
    assert "**mean**" in table


# -------------------------------------------------------------------- presets


def test_every_system_has_a_preset() -> None:
    names = set(preset_names())
    assert "generic" in names
    for system in SYSTEMS:
        assert preset_for(system, "per-system") == system.lower()
    assert preset_for("SomethingElse", "per-system") == "generic"
    assert preset_for("HDFS", "generic") == "generic"


_MADE_UP_LINES = [
    "Received block blk_-1608999687919862906 of size 91178 from /10.250.10.6:50010",
    "Received block blk_7503483334202473044 of size 233217 from /10.250.19.102:50010",
    "session opened for user root by (uid=0)",
    "session opened for user root by (uid=1000)",
    "connection from 203.0.113.9 (host-9.example.net) at Fri Jul  1 07:57:30 2005",
    "worker.example.com:443 close, 1190 bytes (1.16 KB) sent, 0 bytes received, lifetime <1 sec",
    "Took 19.05 seconds to spawn the instance on the hypervisor.",
    "Fan speeds ( 3552 3534 3375 4245 3515 3479 )",
]


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads_and_parses(name: str) -> None:
    config = load_preset(name)
    # inherit_default_masks must not stack the generic masks twice
    assert len(config.masks) == len(set(config.masks))
    miner = TemplateMiner(config)
    ids = [miner.learn(line) for line in _MADE_UP_LINES]
    assert ids[0] == ids[1], "two HDFS block receipts should share a template"
    assert ids[2] == ids[3], "lines differing only in masked values should share a template"
    for cid, line in zip(ids, _MADE_UP_LINES):
        assert miner.match(line) == cid
        assert miner.template(cid)


def test_generic_masks_recognise_common_variables() -> None:
    miner = TemplateMiner(load_preset("generic"))
    assert miner.mask("from 10.0.0.1:22 and fe80::1ff:fe23:4567:890a") == "from <HOST> and <HOST>"
    assert miner.mask("proxy.example.co.uk:5070 and github.com:443") == "<HOST> and <HOST>"
    assert miner.mask("action android.intent.action.TIME_TICK") == "action android.intent.action.TIME_TICK"
    assert miner.mask("uid=0 ruser= tag=\"View Lock\"") == "uid=<VALUE> ruser= tag=<VALUE>"
    assert miner.mask("size 384.0 B, free 2.1 KB in 12ms") == "size <SIZE>, free <SIZE> in <DURATION>"
    assert miner.mask("iar 00106210 dear 0244c1dc rc 0x1f") == "iar <NUM> dear <NUM> rc <HEX>"
    assert miner.mask("generating core.4505 rdd_2_0 wl0 ssh2") == "generating core.<NUM> rdd_<NUM>_<NUM> wl0 ssh2"
    assert miner.mask("at 2016-09-28 04:30:30 and 10:46:47.425") == "at <DATE> and <TIME>"
    assert miner.mask("open /var/log/x.log and C:\\Windows\\x.dll") == "open <PATH> and <PATH>"
    assert miner.mask("isOverlap:false") == "isOverlap:<BOOL>"
    assert len({name for _, name in DEFAULT_MASKS}) >= 10
