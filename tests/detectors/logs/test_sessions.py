"""Grouping events into sessions and windows, streaming and bounded."""

from __future__ import annotations

import pytest

from detectors.logs.sessions import LogEvent, LogSequence, Sessionizer, parse_timestamp


def ev(line_no: int, content: str = "", ts: float | None = None, tid: int = 1) -> LogEvent:
    return LogEvent(line_no=line_no, template_id=tid, template="t", level="INFO", content=content, timestamp=ts)


def lines_of(seq: LogSequence) -> list[int]:
    return [e.line_no for e in seq.events]


# ------------------------------------------------------------------ sessions


def test_sessions_group_by_block_id() -> None:
    events = [ev(1, "Receiving block blk_1"), ev(2, "Receiving block blk_-2"), ev(3, "no id here"),
              ev(4, "Received block blk_1 of size 5"), ev(5, "Received block blk_-2 of size 5")]
    grouper = Sessionizer("session")
    seqs = {s.id: s for s in grouper.group(events)}
    assert set(seqs) == {"blk_1", "blk_-2"}
    assert lines_of(seqs["blk_1"]) == [1, 4]
    assert lines_of(seqs["blk_-2"]) == [2, 5]
    assert grouper.without_id == 1
    assert seqs["blk_1"].first_line == 1 and seqs["blk_1"].last_line == 4
    assert seqs["blk_1"].templates == (1, 1)


def test_line_naming_two_ids_goes_to_both_sessions_once() -> None:
    events = [ev(1, "allocate blk_1"), ev(2, "allocate blk_2"),
              ev(3, "BLOCK* ask 10.0.0.1:50010 to replicate blk_1 blk_2 blk_1 to datanode(s)")]
    seqs = {s.id: s for s in Sessionizer("session").group(events)}
    assert lines_of(seqs["blk_1"]) == [1, 3]  # named twice, added once
    assert lines_of(seqs["blk_2"]) == [2, 3]


def test_custom_id_pattern() -> None:
    events = [ev(1, "req=abc start"), ev(2, "req=def start"), ev(3, "req=abc end")]
    seqs = {s.id: s for s in Sessionizer("session", id_pattern=r"req=\w+").group(events)}
    assert lines_of(seqs["req=abc"]) == [1, 3]


def test_idle_sessions_are_closed_while_streaming() -> None:
    # One new block per line: with max_idle_lines=10, the block of line n is complete
    # (and emitted by add) once line n+10 arrives, so at most 10 stay open.
    grouper = Sessionizer("session", max_idle_lines=10)
    emitted: list[LogSequence] = []
    for n in range(1, 101):
        emitted.extend(grouper.add(ev(n, f"Receiving block blk_{n}")))
        assert n - len(emitted) <= 10  # open sessions stay bounded
    assert [s.id for s in emitted] == [f"blk_{n}" for n in range(1, 91)]
    rest = list(grouper.flush())
    assert [s.id for s in rest] == [f"blk_{n}" for n in range(91, 101)]
    assert list(grouper.flush()) == []


def test_active_session_is_not_closed_by_idle_rule() -> None:
    grouper = Sessionizer("session", max_idle_lines=3)
    events = [ev(n, "blk_7 keeps talking" if n % 2 else f"other blk_{100 + n}") for n in range(1, 21)]
    seqs = grouper.group(events)
    busy = [s for s in seqs if s.id == "blk_7"]
    assert len(busy) == 1 and lines_of(busy[0]) == list(range(1, 21, 2))


def test_idle_gap_counts_input_lines_not_events() -> None:
    # Lines 2..9 belong to no session (or are blank); blk_1's gap is still 9 lines.
    grouper = Sessionizer("session", max_idle_lines=5)
    assert list(grouper.add(ev(1, "blk_1"))) == []
    out = list(grouper.add(ev(10, "blk_2")))
    assert [s.id for s in out] == ["blk_1"]


# ------------------------------------------------------------------ count windows


def test_tumbling_count_windows() -> None:
    seqs = Sessionizer("count", size=4).group([ev(n) for n in range(1, 11)])
    assert [lines_of(s) for s in seqs] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [s.id for s in seqs] == ["lines 1-4", "lines 5-8", "lines 9-10"]


def test_sliding_count_windows() -> None:
    grouper = Sessionizer("count", size=4, step=2)
    emitted = []
    for n in range(1, 9):
        emitted.extend(grouper.add(ev(n)))
    assert [lines_of(s) for s in emitted] == [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8]]


def test_count_windows_ignore_ids() -> None:
    seqs = Sessionizer("count", size=2).group([ev(1, "blk_1"), ev(2, "nothing"), ev(3, "blk_2 blk_3")])
    assert [lines_of(s) for s in seqs] == [[1, 2], [3]]


# ------------------------------------------------------------------ time windows


def test_tumbling_time_windows() -> None:
    stamps = [0, 3, 9.5, 10, 14, 25]
    seqs = Sessionizer("time", size=10).group([ev(i + 1, ts=1_000_000 + t) for i, t in enumerate(stamps)])
    assert [lines_of(s) for s in seqs] == [[1, 2, 3], [4, 5], [6]]
    for seq in seqs:
        assert seq.id.startswith("time ") and seq.id.endswith("+10s")
        span = [e.timestamp for e in seq.events]
        assert max(span) - min(span) < 10  # type: ignore[operator]


def test_sliding_time_windows() -> None:
    stamps = [0, 4, 7, 12, 16]
    seqs = Sessionizer("time", size=10, step=5).group([ev(i + 1, ts=t + 500.0) for i, t in enumerate(stamps)])
    assert [lines_of(s) for s in seqs] == [[1, 2, 3], [3, 4], [4, 5]]


def test_time_windows_jump_over_a_long_silence() -> None:
    # A day of silence must not produce thousands of empty windows (or any).
    day = 86_400.0
    stamps = [0, 1, 2, day + 0, day + 1, day + 30]
    grouper = Sessionizer("time", size=10)
    seqs = grouper.group([ev(i + 1, ts=1_000_000 + t) for i, t in enumerate(stamps)])
    assert [lines_of(s) for s in seqs] == [[1, 2, 3], [4, 5], [6]]
    assert all(s.events for s in seqs)


def test_sliding_windows_after_silence_start_near_the_next_event() -> None:
    stamps = [0, 1, 10_000, 10_003]
    seqs = Sessionizer("time", size=10, step=5).group([ev(i + 1, ts=t) for i, t in enumerate(stamps)])
    assert [lines_of(s) for s in seqs] == [[1, 2], [3, 4]]


def test_time_windows_count_lines_without_time() -> None:
    grouper = Sessionizer("time", size=10)
    seqs = grouper.group([ev(1, ts=5.0), ev(2, ts=None), ev(3, ts=6.0)])
    assert [lines_of(s) for s in seqs] == [[1, 3]]
    assert grouper.without_time == 1


# ------------------------------------------------------------------ config and timestamps


@pytest.mark.parametrize("kwargs,needle", [
    ({"mode": "block"}, "unknown grouping"),
    ({"mode": "count", "size": 0}, "size"),
    ({"mode": "time", "size": 10, "step": 11}, "step"),
    ({"mode": "time", "size": 10, "step": 0}, "step"),
])
def test_bad_grouping_settings(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Sessionizer(**kwargs)  # type: ignore[arg-type]


def test_parse_timestamp_formats() -> None:
    hdfs = parse_timestamp({"Date": "081109", "Time": "203518"})
    later = parse_timestamp({"Date": "081109", "Time": "203528"})
    assert hdfs is not None and later is not None and later - hdfs == 10
    assert parse_timestamp({"Date": "2015-10-18", "Time": "18:01:47,978"}) is not None
    assert parse_timestamp({"Timestamp": "1117838570"}) == 1117838570.0
    assert parse_timestamp({"Date": "yesterday", "Time": "noon"}) is None
    assert parse_timestamp({}) is None
