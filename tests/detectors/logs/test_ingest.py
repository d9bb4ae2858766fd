"""Ingestion of bad and odd input: nothing is dropped silently, and what can be read is read."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from detectors.logs.ingest import (
    KNOWN_FORMATS,
    MAX_LINE_CHARS,
    IngestReport,
    LogFormat,
    LogInputError,
    LogRecord,
    read_log,
    resolve_format,
)

HDFS = KNOWN_FORMATS["hdfs"]
GOOD = [
    "081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
    "081109 203519 145 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_-1608999687919862906 terminating",
    "081109 203519 29 INFO dfs.FSNamesystem: BLOCK* NameSystem.addStoredBlock: blockMap updated: 10.250.10.6:50010 is added to blk_-1608999687919862906 size 91178",
    "081109 214043 2561 ERROR dfs.DataNode$DataXceiver: 10.251.30.6:50010:DataXceiver: java.io.IOException: Block blk_1 is valid, and cannot be written to.",
]


def _read(path: Path, fmt: str | None = HDFS, **kw: object) -> tuple[list[LogRecord], IngestReport]:
    report = IngestReport(source=str(path))
    records = list(read_log(path, fmt, report=report, **kw))  # type: ignore[arg-type]
    return records, report


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ whole-file errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LogInputError, match="no such file"):
        list(read_log(tmp_path / "nope.log", HDFS))


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(LogInputError, match="directory"):
        list(read_log(tmp_path, HDFS))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.log"
    path.write_bytes(b"")
    with pytest.raises(LogInputError, match="empty") as err:
        list(read_log(path, HDFS))
    assert str(path) in str(err.value)


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "image.log"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    with pytest.raises(LogInputError, match="binary") as err:
        list(read_log(path, HDFS))
    assert str(path) in str(err.value)


def test_gzip_of_binary_is_binary(tmp_path: Path) -> None:
    path = tmp_path / "blob.gz"
    path.write_bytes(gzip.compress(b"\x00\x01\x02" * 5000))
    with pytest.raises(LogInputError, match="binary"):
        list(read_log(path, HDFS))


def test_blank_only_file_is_an_error_with_counts(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "blank.log", ["", "   ", ""])
    report = IngestReport(source=str(path))
    with pytest.raises(LogInputError, match="none of 3 lines"):
        list(read_log(path, HDFS, report=report))
    assert report.blank == 3 and report.lines_read == 3 and report.parsed == 0


def test_format_matching_nothing_names_file_and_first_problem_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "spark.log", ["", "17/06/09 20:10:40 INFO executor.Executor: Running task",
                                                 "17/06/09 20:10:41 INFO executor.Executor: Finished task"])
    with pytest.raises(LogInputError) as err:
        list(read_log(path, "<Date> <Time> <Pid> <Level> <Component>: <Content>"))
    message = str(err.value)
    assert str(path) in message
    assert "line 2" in message  # line 1 is blank; line 2 is the first that failed
    assert "<Pid>" in message  # which format was tried


def test_partly_matching_file_counts_the_misses(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "mixed.log", [GOOD[0], "garbage without a header", GOOD[1], "", GOOD[2]])
    records, report = _read(path)
    assert [r.line_no for r in records] == [1, 3, 5]
    assert report.unparseable == 1 and report.blank == 1 and report.parsed == 3 and report.lines_read == 5
    assert report.problems[0].line_no == 2 and "does not match format" in report.problems[0].reason
    assert "1 unparseable" in report.summary() and "line 2" in report.summary()
    assert report.to_dict()["problems"] == [{"line": 2, "reason": report.problems[0].reason}]


# ------------------------------------------------------------------ line-level problems


def test_one_megabyte_line_is_truncated_counted_and_the_rest_parsed(tmp_path: Path) -> None:
    huge = GOOD[0] + " " + "x" * 1_000_000
    path = _write_lines(tmp_path / "huge.log", [GOOD[1], huge, GOOD[2], GOOD[3]])
    records, report = _read(path)
    assert [r.line_no for r in records] == [1, 2, 3, 4]
    assert report.truncated == 1
    assert len(records[1].content) <= MAX_LINE_CHARS
    assert records[1].content.startswith("Receiving block blk_-1608999687919862906")
    assert records[2].content == GOOD[2].split(": ", 1)[1]
    assert any(p.line_no == 2 and "truncated" in p.reason for p in report.problems)
    assert report.undecodable == 0


def test_long_line_below_the_byte_cap_is_truncated_too(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "long.log", [GOOD[0] + " " + "y" * (MAX_LINE_CHARS * 2), GOOD[1]])
    records, report = _read(path)
    assert len(records) == 2 and report.truncated == 1
    assert len(records[0].raw) == MAX_LINE_CHARS




def test_truncated_count_stays_exact_after_problem_list_is_full(tmp_path: Path) -> None:
    lines = []
    for i in range(25):
        lines += [GOOD[0] + " " + "x" * 300_000, GOOD[1]]
    records, report = _read(_write_lines(tmp_path / "many_long.log", lines))
    assert len(records) == 50
    assert report.truncated == 25




def test_truncating_utf8_line_does_not_make_it_undecodable(tmp_path: Path) -> None:
    # Two lines whose prefixes differ by one byte: wherever the byte cut falls, it
    # splits a two-byte character in one of them.
    path = tmp_path / "utf8.log"
    path.write_text(GOOD[0] + " " + "é" * 600_000 + "\n" + GOOD[0] + "  " + "é" * 600_000 + "\n", encoding="utf-8")
    records, report = _read(path)
    assert report.truncated == 2
    assert report.undecodable == 0
    assert all(r.content.endswith("éé") for r in records)


def test_latin1_line_is_counted_and_still_parsed(tmp_path: Path) -> None:
    path = tmp_path / "mixed_encoding.log"
    latin = "081109 203520 30 INFO dfs.FSNamesystem: caf\xe9 na\xefve r\xe9sum\xe9 blk_7".encode("latin-1")
    path.write_bytes(GOOD[0].encode() + b"\n" + latin + b"\n" + "081109 203521 30 INFO x: ünïcode ok".encode() + b"\n")
    records, report = _read(path)
    assert len(records) == 3
    assert records[1].content == "café naïve résumé blk_7"
    assert records[2].content == "ünïcode ok"
    assert report.undecodable == 1
    assert report.problems[0].line_no == 2 and "UTF-8" in report.problems[0].reason


def test_crlf_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "windows.log"
    path.write_bytes(("\r\n".join(GOOD) + "\r\n").encode())
    records, _ = _read(path)
    assert [r.raw for r in records] == GOOD


# ------------------------------------------------------------------ gzip


def test_gzip_is_detected_by_magic_not_name(tmp_path: Path) -> None:
    path = tmp_path / "plain_name.log"
    path.write_bytes(gzip.compress(("\n".join(GOOD) + "\n").encode()))
    records, report = _read(path)
    assert [r.raw for r in records] == GOOD and report.fatal is None


def test_gzip_cut_short_keeps_records_before_the_cut(tmp_path: Path) -> None:
    lines = [f"081109 2035{i % 60:02d} {i} INFO dfs.FSNamesystem: line number {i} blk_{i}" for i in range(20_000)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "cut.log.gz"
    path.write_bytes(data[: len(data) // 2])
    records, report = _read(path)
    assert 0 < len(records) < len(lines)
    assert [r.raw for r in records] == lines[: len(records)]  # a clean prefix, in order
    assert report.fatal is not None
    assert re.search(rf"line {len(records) + 1}\b", report.fatal), report.fatal
    assert "damaged" in report.fatal and "stopped early" in report.summary()


def test_gzip_cut_in_the_header_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gz"
    path.write_bytes(gzip.compress(b"\n".join(g.encode() for g in GOOD))[:12])
    report = IngestReport(source=str(path))
    try:
        records = list(read_log(path, HDFS, report=report))
    except LogInputError:
        return
    assert records == [] and report.fatal is not None


# ------------------------------------------------------------------ JSON lines


def test_json_lines(tmp_path: Path) -> None:
    rows = [
        json.dumps({"message": "Receiving block blk_1", "level": "info", "ts": 1.5, "nested": {"x": 1}}),
        "{not json",
        json.dumps({"msg": "wrong key"}),
        json.dumps([1, 2]),
        "",
        json.dumps({"message": "Received block blk_1", "level": "ERROR"}),
    ]
    path = _write_lines(tmp_path / "app.jsonl", rows)
    records, report = _read(path, None)
    assert [r.line_no for r in records] == [1, 6]
    assert records[0].content == "Receiving block blk_1"
    assert records[0].fields == {"level": "info", "ts": "1.5"}  # scalars only, as strings
    assert records[1].level == "ERROR"
    assert report.unparseable == 3 and report.blank == 1
    reasons = {p.line_no: p.reason for p in report.problems}
    assert "invalid JSON" in reasons[2]
    assert "'message' missing" in reasons[3] and "msg" in reasons[3]
    assert "list" in reasons[4]


def test_json_detected_from_first_line_and_other_key(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "app.log", [json.dumps({"text": "hello"}), json.dumps({"text": "world"})])
    records, _ = _read(path, None, json_content_key="text")
    assert [r.content for r in records] == ["hello", "world"]


def test_json_with_no_usable_line_is_an_error(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [json.dumps({"msg": "x"}), "{oops"])
    with pytest.raises(LogInputError, match="line 1"):
        list(read_log(path))


def test_plain_text_without_format_is_whole_line_content(tmp_path: Path) -> None:
    records, _ = _read(_write_lines(tmp_path / "free.txt", ["hello world", "{not json either"]), None)
    assert [(r.content, r.fields) for r in records] == [("hello world", {}), ("{not json either", {})]


# ------------------------------------------------------------------ format strings


HEADER_LINES = GOOD + [
    "081109 203518 143 INFO dfs.DataNode: content: with: colons",
    "081109 203518 143 WARN dfs.DataNode$DataXceiver: writeBlock blk_1 received exception java.io.IOException: x",
    "081109 203518 143 INFO a.b.C: ",
]


@pytest.mark.parametrize("line", HEADER_LINES)
def test_fast_path_and_regex_agree(line: str) -> None:
    fast = LogFormat(HDFS)
    assert fast._fast is not None, "the HDFS format should take the fast path"
    slow = LogFormat(HDFS)
    slow._fast = None  # force the regex
    assert fast.parse(line) == slow.parse(line)
    fields, content = fast.parse(line)  # type: ignore[misc]
    assert set(fields) == {"Date", "Time", "Pid", "Level", "Component"}
    assert line.endswith(content)




def test_fast_path_and_regex_agree_on_extra_spaces_before_content() -> None:
    line = "081109 203518 143 INFO dfs.DataNode:   indented content"
    slow = LogFormat(HDFS)
    slow._fast = None
    assert LogFormat(HDFS).parse(line) == slow.parse(line)


def test_regex_fallback_handles_extra_spaces_in_header() -> None:
    fmt = LogFormat(HDFS)
    fields, content = fmt.parse("081109  203518 143 INFO dfs.DataNode: hello")  # type: ignore[misc]
    assert fields["Time"] == "203518" and content == "hello"


def test_format_without_fast_path_parses() -> None:
    # Literal text between fields is matched literally (brackets need no escaping).
    fmt = LogFormat("<Date> <Time> <Level> [<Process>] <Component>: <Content>")
    assert fmt._fast is None
    fields, content = fmt.parse(  # type: ignore[misc]
        "2016-03-02 11:22:33,456 INFO [main] org.example.app.Master: Created the master")
    assert fields == {"Date": "2016-03-02", "Time": "11:22:33,456", "Level": "INFO", "Process": "main",
                      "Component": "org.example.app.Master"}
    assert content == "Created the master"


# One invented line per shipped system format, shaped like that system's logs.
KNOWN_FORMAT_LINES = {
    "hdfs": GOOD[0],
    "hadoop": "2016-03-02 11:22:33,456 INFO [main] org.example.mapreduce.AppMaster: Created the master",
    "spark": "17/01/02 10:11:12 INFO storage.BlockManager: Registering block manager",
    "zookeeper": "2016-03-02 11:22:33,456 - INFO  [main:QuorumPeer@123] - Reading configuration",
    "bgl": "- 1117000000 2005.06.01 R01-M0-N1 2005-06-01-10.00.00.000001 R01-M0-N1 RAS KERNEL INFO cache parity corrected",
    "hpc": "12345 node-7 unix.hw state_change.unavailable 1077000000 1 Component State Change: unavailable",
    "thunderbird": "- 1131000000 2005.11.01 an100 Nov 1 10:00:00 an100/an100 crond(pam_unix)[1234]: session closed",
    "windows": "2016-09-28 04:30:30, Info                  CBS    Loaded the servicing stack",
    "linux": "Jun 14 15:16:01 combo sshd(pam_unix)[1999]: authentication failure; uid=0",
    "android": "03-17 16:13:38.811  1702  2395 D WindowManager: freezing display",
    "healthapp": "20171223-22:15:29:606|Step_LSC|30002312|onStandStepChanged 3579",
    "apache": "[Sun Dec 04 04:47:44 2005] [notice] workerEnv.init() ok",
    "proxifier": "[10.30 16:49:06] chrome.exe - proxy.example.org:5070 open through proxy HTTPS",
    "openssh": "Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user admin from 10.0.0.1",
    "openstack": "nova-api.log 2017-05-16 00:00:00.008 25746 INFO nova.api.server [req-1 - - -] GET /v2/servers",
    "mac": "Jul  1 09:00:55 host-1 kernel[0]: thunderbolt switch ready",
}


def _format_params() -> list[object]:
    out = []
    for name in sorted(KNOWN_FORMATS):
        out.append(pytest.param(name, id=name))
    return out


def test_every_known_format_has_a_sample_line() -> None:
    assert set(KNOWN_FORMAT_LINES) == set(KNOWN_FORMATS)


@pytest.mark.parametrize("name", _format_params())
def test_known_format_parses_its_system(name: str) -> None:
    parsed = LogFormat(resolve_format(name)).parse(KNOWN_FORMAT_LINES[name])
    assert parsed is not None, f"{name}: {KNOWN_FORMATS[name]!r} does not match {KNOWN_FORMAT_LINES[name]!r}"
    fields, content = parsed
    assert content and KNOWN_FORMAT_LINES[name].endswith(content)


def test_non_matching_line_is_none() -> None:
    assert LogFormat(HDFS).parse("just some words") is None
    assert LogFormat(HDFS).parse("") is None


@pytest.mark.parametrize("spec,needle", [
    ("no placeholders here", "placeholders"),
    ("<Date> <Time> <Level>", "<Content>"),
    ("<Date> <Date> <Content>", "repeats"),
])
def test_bad_format_strings(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        LogFormat(spec)


def test_resolve_format() -> None:
    assert resolve_format("hdfs") == HDFS
    assert resolve_format("HDFS") == HDFS
    assert resolve_format("<Level> <Content>") == "<Level> <Content>"
    with pytest.raises(ValueError) as err:
        resolve_format("hdfs2")
    assert "hdfs2" in str(err.value) and "hdfs" in str(err.value) and "<Date>" in str(err.value)


def test_read_log_accepts_known_name_and_reports_level(tmp_path: Path) -> None:
    records, report = _read(_write_lines(tmp_path / "h.log", GOOD), "hdfs")
    assert [r.level for r in records] == ["INFO", "INFO", "INFO", "ERROR"]
    assert records[0].fields["Pid"] == "143" and report.parsed == 4
    with pytest.raises(ValueError, match="unknown log format"):
        list(read_log(tmp_path / "h.log", "nosuchsystem"))
