"""`shmq log inspect` and `shmq log dump`, and shmq/log.py beneath them, on logs a real router wrote.

Each log is written by a router (a child process, as shmq.Router always is) with a data directory
and durable topics ``md.>``, fed by a Publisher in this process; the router is stopped before the
log is read, except where a test reads a live log on purpose. Damage is made by flipping bytes of
a copy of a log, after its router stopped. The CLI runs in-process through click's CliRunner.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import shmq
from shmq import log as shmq_log
from shmq._wire import encode_headers
from shmq.cli import main
from shmq.log import LogEntry, inspect_log, read_log, segment_name
from shmq.testing import unique_name
from tests import _pubsub_workers as pw

pytestmark = pytest.mark.timeout(120)

OP_TIMEOUT = 20.0  # the longest any publish, flush or router start may take (never reached when well)
SEGMENT_BYTES = 65536
REC_HEADER = 24  # a log record's header (shmq/_native/log.h)
MSG_HEADER = 40  # a pub/sub message's header (shmq/_native/bus.h)

Published = tuple[str, bytes, dict[str, Any] | None]


@dataclasses.dataclass
class WrittenLog:
    """A data directory a router wrote, and what went into its log (the durable messages, in order)."""

    data_dir: Path
    messages: list[Published]
    publisher_id: int
    started_ns: int  # time.time_ns() before the first publish and after the last
    finished_ns: int

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"


def write_log(
    data_dir: Path,
    messages: Sequence[Published],
    *,
    segment_bytes: int = SEGMENT_BYTES,
    pause_after: int | None = None,
) -> WrittenLog:
    """Run a router with `data_dir`, publish `messages` (``md.>`` is durable, the rest is not),
    wait until the router took them all, stop it. With `pause_after`, wait until the router took
    that many messages, then 20 ms more (so the log's times have a gap there)."""
    bus = unique_name("lg")
    with pw.no_leaks(bus):
        router = shmq.Router(bus, data_dir=data_dir, durable=["md.>"], segment_bytes=segment_bytes)
        router.start(timeout=OP_TIMEOUT)
        try:
            started = time.time_ns()
            with shmq.Publisher(bus, connect_timeout=OP_TIMEOUT) as pub:
                for i, (topic, data, headers) in enumerate(messages):
                    if i == pause_after:
                        assert pub.flush(OP_TIMEOUT)
                        time.sleep(0.02)
                    pub.publish(topic, data, headers=headers, timeout=OP_TIMEOUT)
                assert pub.flush(OP_TIMEOUT)
                publisher_id = pub.publisher_id
            finished = time.time_ns()
            pw.settle(bus)
        finally:
            router.stop(timeout=OP_TIMEOUT)
    durable = [m for m in messages if m[0].startswith("md.")]
    return WrittenLog(data_dir, durable, publisher_id, started, finished)


SMALL: list[Published] = [
    ("md.a", b"hello", None),
    ("md.b.c", "héllo wörld".encode(), {"venue": "XNAS", "qty": 100, "px": 1.5, "live": True}),
    ("other", b"not durable: not in the log", None),
    ("md.a", b"\x00\x01\xff binary", {"id": "007"}),
    ("md.x.y", b"", None),
    ("md.a", b"tab\there", None),
    ("md.b.c", b"line\nbreak", {"n": -7}),
]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> WrittenLog:
    """Six durable messages of every kind, in one segment."""
    return write_log(tmp_path_factory.mktemp("small"), SMALL)


def big_messages(count: int) -> list[Published]:
    topics = ["md.XNAS.AAPL", "md.XNYS.IBM", "md.XNAS.MSFT"]
    return [
        (topics[i % 3], f"tick {i} ".encode() + bytes(60), {"i": i, "venue": topics[i % 3].split(".")[1]})
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> WrittenLog:
    """1500 messages of ~170 bytes in 64 KiB segments: five segments; a pause after the 1000th."""
    written = write_log(tmp_path_factory.mktemp("big"), big_messages(1500), pause_after=1000)
    assert len(segment_bases(written)) >= 4
    return written


@pytest.fixture
def big_copy(big: WrittenLog, tmp_path: Path) -> WrittenLog:
    """A copy of the big log, to damage."""
    shutil.copytree(big.data_dir, tmp_path / "data")
    return dataclasses.replace(big, data_dir=tmp_path / "data")


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def segment_bases(written: WrittenLog) -> list[int]:
    return sorted(int(p.name[:20]) for p in written.log_dir.glob("*.seg"))


def payload_offset(entry: LogEntry) -> int:
    """Where the entry's payload starts in its segment file."""
    headers = encode_headers(entry.headers) if entry.headers else b""
    return entry.offset + REC_HEADER + MSG_HEADER + len(entry.topic.encode()) + len(headers)


def flip(path: Path, offset: int, count: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        original = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in original))


def corrupt(written: WrittenLog, seq: int) -> LogEntry:
    """Flip bytes inside the payload of record `seq`; returns the record as it was."""
    entry = next(e for e in read_log(written.data_dir, start=seq))
    assert entry.seq == seq and len(entry.data) >= 4
    flip(written.log_dir / segment_name(entry.segment), payload_offset(entry) + 1)
    return entry


def dump_lines(*args: str) -> list[str]:
    result = cli("log", "dump", *args)
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def dumped_seqs(*args: str) -> list[int]:
    return [json.loads(line)["seq"] for line in dump_lines(*args, "--json")]


# -- shmq.log: read_log --------------------------------------------------------------------------------


def test_read_log_returns_every_durable_message_with_its_fields(small: WrittenLog) -> None:
    entries = list(read_log(small.data_dir))
    assert [(e.topic, e.data, e.headers) for e in entries] == [(t, d, h or {}) for t, d, h in small.messages]
    assert [e.seq for e in entries] == list(range(1, len(small.messages) + 1))
    per_topic: dict[str, int] = {}
    for e in entries:
        per_topic[e.topic] = per_topic.get(e.topic, 0) + 1
        assert e.publisher_seq == per_topic[e.topic]  # per publisher and topic, from 1
        assert e.publisher_id == small.publisher_id
        assert small.started_ns <= e.time_ns <= small.finished_ns
        assert e.time == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=e.time_ns // 1000)
        assert 0 < e.timestamp_ns <= time.monotonic_ns()
        assert e.segment == 1 and e.offset >= 64 and e.offset % 8 == 0
    assert [e.time_ns for e in entries] == sorted(e.time_ns for e in entries)
    assert isinstance(entries[1].headers["live"], bool) and entries[1].headers["px"] == 1.5


def test_log_entry_is_frozen_and_hashable(small: WrittenLog) -> None:
    entry = next(read_log(small.data_dir))
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.seq = 5  # type: ignore[misc]
    assert hash(entry) == hash(dataclasses.replace(entry))
    assert entry == dataclasses.replace(entry) and entry != dataclasses.replace(entry, seq=99)


def test_read_log_takes_the_data_dir_or_its_log_dir(small: WrittenLog) -> None:
    assert (
        list(read_log(small.data_dir)) == list(read_log(small.log_dir)) == list(read_log(str(small.log_dir)))
    )


def test_read_log_start_topic_and_since(big: WrittenLog) -> None:
    everything = list(read_log(big.data_dir))
    assert len(everything) == 1500 and [e.seq for e in everything] == list(range(1, 1501))
    assert [e.seq for e in read_log(big.data_dir, start=1490)] == list(range(1490, 1501))
    assert list(read_log(big.data_dir, start=1501)) == []
    ibm = list(read_log(big.data_dir, topic="md.XNYS.IBM"))
    assert [e.seq for e in ibm] == list(range(2, 1501, 3))
    xnas = list(read_log(big.data_dir, topic="md.XNAS.*", start=1000))
    assert [e.seq for e in xnas] == [s for s in range(1000, 1501) if s % 3 != 2]
    assert list(read_log(big.data_dir, topic="md.XNAS")) == []  # a pattern matches whole topics
    assert len(list(read_log(big.data_dir, topic=">"))) == 1500
    # since: the router paused 20 ms after the 1000th record: the 1001st is the first at or after
    # a time between them, given aware (UTC, or another zone) or naive (local time).
    gap = everything[1000].time_ns - everything[999].time_ns
    assert gap >= 10_000_000
    between = datetime.fromtimestamp((everything[999].time_ns + gap // 2) / 1e9, UTC)
    other_zone = between.astimezone(timezone(timedelta(hours=5, minutes=30)))  # the same instant
    for since in (between, other_zone, between.astimezone().replace(tzinfo=None)):
        assert [e.seq for e in read_log(big.data_dir, since=since)] == list(range(1001, 1501))
    assert [e.seq for e in read_log(big.data_dir, since=between, start=1400)] == list(range(1400, 1501))
    assert next(e.seq for e in read_log(big.data_dir, since=between, start=3)) == 1001
    assert list(read_log(big.data_dir, since=datetime.now(UTC) + timedelta(days=1))) == []
    assert len(list(read_log(big.data_dir, since=datetime(1970, 1, 1, tzinfo=UTC)))) == 1500


def test_read_log_is_a_closable_iterator(big: WrittenLog) -> None:
    with read_log(big.data_dir) as records:
        assert iter(records) is records
        assert next(records).seq == 1
        assert next(records).seq == 2
    with pytest.raises(StopIteration):
        next(records)
    records = read_log(big.data_dir, start=1499)
    assert [e.seq for e in records] == [1499, 1500] and records.damage == []
    with pytest.raises(StopIteration):
        next(records)


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"start": 0}, shmq.InvalidArgument, "start must be a log sequence number from 1, got 0"),
        ({"start": 1 << 64}, shmq.InvalidArgument, "start must be"),
        ({"start": "1"}, shmq.ArgumentTypeError, "start must be an int, got str"),
        ({"start": True}, shmq.ArgumentTypeError, "start must be an int, got bool"),
        ({"start": 1.0}, shmq.ArgumentTypeError, "start must be an int, got float"),
        ({"topic": "md..a"}, shmq.InvalidTopic, "md..a"),
        ({"topic": "md.>.a"}, shmq.InvalidTopic, ">"),
        ({"topic": 5}, shmq.ArgumentTypeError, "int"),
        ({"since": "2026-01-01"}, shmq.ArgumentTypeError, "since must be a datetime, got str"),
        ({"since": 1.5e9}, shmq.ArgumentTypeError, "since must be a datetime, got float"),
    ],
)
def test_read_log_bad_arguments_raise_at_the_call(
    small: WrittenLog, kwargs: dict[str, Any], error: type[Exception], says: str
) -> None:
    with pytest.raises(error) as info:
        read_log(small.data_dir, **kwargs)  # no iteration: raised at once
    assert says in str(info.value)
    assert isinstance(info.value, ValueError | TypeError)


def test_read_log_and_inspect_log_without_a_log(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for function in (read_log, inspect_log):
        with pytest.raises(shmq.NotFound) as info:
            function(missing)
        assert isinstance(info.value, FileNotFoundError)
        assert str(info.value).startswith(f"no durable log at {missing}: the directory does not exist")
        assert "DIR/log" in str(info.value)
        with pytest.raises(shmq.NotFound, match=r"no log/ directory and no <base_seq>\.seg segment files"):
            function(tmp_path)  # a directory, but not a log
        (tmp_path / "file").write_text("x")
        with pytest.raises(shmq.InvalidArgument, match="is not a directory"):
            function(tmp_path / "file")
        with pytest.raises(shmq.ArgumentTypeError, match="path must be a str or a path, got int"):
            function(3)  # type: ignore[arg-type]
        with pytest.raises(shmq.ArgumentTypeError, match="got bytes"):
            function(os.fsencode(tmp_path))  # type: ignore[arg-type]


def test_a_data_dir_with_an_empty_log_is_an_empty_log(tmp_path: Path) -> None:
    written = write_log(tmp_path, [("other", b"not durable", None)])
    assert written.messages == [] and written.log_dir.is_dir()
    assert list(read_log(tmp_path)) == []
    for path in (tmp_path, written.log_dir):
        report = inspect_log(path)
        assert (report.records, report.first_seq, report.last_seq, report.damaged) == (0, None, None, False)


def test_decode_record_rejects_a_body_that_is_no_message() -> None:
    with pytest.raises(shmq.CorruptSegment, match=r"record 7 \(00000000000000000001.seg offset 64\)"):
        shmq_log.decode_record(7, 0, 1, 64, b"short")
    header = bytes(4) + (300).to_bytes(2, "little") + bytes(34)  # a topic longer than the body
    with pytest.raises(shmq.CorruptSegment, match="bad topic or header lengths"):
        shmq_log.decode_record(7, 0, 1, 64, header + b"md.a")


def test_read_log_and_inspect_log_on_a_live_router(tmp_path: Path) -> None:
    """Both read while the router appends: the active segment, records up to the last flush."""
    bus = unique_name("lg")
    router = shmq.Router(bus, data_dir=tmp_path, durable=["md.>"], segment_bytes=SEGMENT_BYTES)
    with pw.no_leaks(bus), router:
        with shmq.Publisher(bus, connect_timeout=OP_TIMEOUT) as pub:
            pub.publish_many("md.live", [b"a", b"b", b"c"], timeout=OP_TIMEOUT)
            assert pub.flush(OP_TIMEOUT)
            assert [e.data for e in read_log(tmp_path)] == [b"a", b"b", b"c"]
            pub.publish("md.live", b"d", timeout=OP_TIMEOUT)
            assert pub.flush(OP_TIMEOUT)
            report = inspect_log(tmp_path)
            assert (report.records, report.last_seq, report.damaged) == (4, 4, False)
            assert cli("log", "inspect", str(tmp_path)).exit_code == 0
        pw.settle(bus)


# -- shmq.log: inspect_log -------------------------------------------------------------------------------


def test_inspect_log_reports_segments_and_totals(big: WrittenLog) -> None:
    report = inspect_log(big.data_dir)
    bases = segment_bases(big)
    assert len(bases) >= 3 and [s.base_seq for s in report.segments] == bases
    assert report.path == big.log_dir
    assert (report.records, report.first_seq, report.last_seq) == (1500, 1, 1500)
    assert report.size == len(bases) * SEGMENT_BYTES
    assert (report.damaged_records, report.damaged_bytes, report.bad_segments, report.missing_records) == (
        0,
    ) * 4
    assert report.damage == () and not report.damaged
    for seg, following in zip(report.segments, [*report.segments[1:], None], strict=True):
        assert seg.name == segment_name(seg.base_seq) and seg.path == big.log_dir / seg.name
        assert seg.first_seq == seg.base_seq and seg.size == SEGMENT_BYTES and 64 < seg.used <= seg.size
        assert seg.last_seq is not None and seg.records == seg.last_seq - seg.base_seq + 1
        assert seg.first_time_ns is not None and seg.last_time_ns is not None
        assert big.started_ns <= seg.first_time_ns <= seg.last_time_ns <= big.finished_ns
        if following is not None:
            assert following.base_seq == seg.last_seq + 1
    assert report.first_time_ns == report.segments[0].first_time_ns
    assert report.last_time_ns == report.segments[-1].last_time_ns
    row = json.loads(json.dumps(report.to_dict()))
    assert row["records"] == 1500 and row["damaged"] is False and len(row["segments"]) == len(bases)


# -- shmq log inspect ------------------------------------------------------------------------------------


def iso_ms(time_ns: int) -> str:
    """As inspect shows a time: ISO 8601, local, to the millisecond (truncated)."""
    when = datetime.fromtimestamp(time_ns // 10**9, UTC) + timedelta(milliseconds=time_ns % 10**9 // 10**6)
    return when.astimezone().isoformat(timespec="milliseconds")


def test_inspect_prints_a_table_and_exits_0(big: WrittenLog) -> None:
    result = cli("log", "inspect", str(big.data_dir))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    report = inspect_log(big.data_dir)
    assert lines[0] == f"log {big.log_dir}: {len(report.segments)} segments"
    columns = "SEGMENT BYTES RECORDS FIRST SEQ LAST SEQ FIRST TIME LAST TIME DAMAGED"
    assert " ".join(lines[1].split()) == columns
    for line, seg in zip(lines[2:], report.segments, strict=False):
        assert seg.first_time_ns is not None and seg.last_time_ns is not None
        assert line.split() == [
            seg.name, str(SEGMENT_BYTES), str(seg.records), str(seg.first_seq), str(seg.last_seq),
            iso_ms(seg.first_time_ns), iso_ms(seg.last_time_ns), "0",
        ]  # fmt: skip
    total = lines[2 + len(report.segments)].split()
    assert total[:5] == ["TOTAL", str(report.size), "1500", "1", "1500"] and total[-1] == "0"
    assert lines[-1] == "ok: 1500 records, no damage"
    assert result.stderr == ""


def test_inspect_json(small: WrittenLog) -> None:
    result = cli("log", "inspect", str(small.log_dir), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["path"] == str(small.log_dir)
    assert (report["records"], report["first_seq"], report["last_seq"]) == (6, 1, 6)
    assert (report["damaged"], report["damage"], report["missing_records"]) == (False, [], 0)
    [seg] = report["segments"]
    assert seg["name"] == "00000000000000000001.seg" and seg["records"] == 6
    assert seg["first_time_ns"] == report["first_time_ns"] <= report["last_time_ns"] == seg["last_time_ns"]


def test_inspect_help_states_the_exit_codes() -> None:
    result = cli("log", "inspect", "--help")
    assert result.exit_code == 0
    assert "0  no damage found" in result.stdout and "1  damage found" in result.stdout
    assert "2  DIR does not exist or holds no log" in result.stdout


# -- shmq log dump ---------------------------------------------------------------------------------------


def test_dump_text_shows_payloads_as_sub_does(small: WrittenLog) -> None:
    lines = dump_lines(str(small.data_dir))
    entries = list(read_log(small.data_dir))
    when = [e.time.astimezone().isoformat(timespec="microseconds") for e in entries]
    assert lines == [
        f"1 {when[0]} md.a hello",
        f'2 {when[1]} md.b.c {{"venue": "XNAS", "qty": 100, "px": 1.5, "live": true}} héllo wörld',
        f'3 {when[2]} md.a {{"id": "007"}} b\'\\x00\\x01\\xff binary\'',
        f"4 {when[3]} md.x.y ",
        f"5 {when[4]} md.a tab\there",
        f"6 {when[5]} md.b.c {{\"n\": -7}} b'line\\nbreak'",
    ]


def test_dump_json(small: WrittenLog) -> None:
    rows = [json.loads(line) for line in dump_lines(str(small.data_dir), "--json")]
    entries = list(read_log(small.data_dir))
    assert len(rows) == 6
    for row, entry in zip(rows, entries, strict=True):
        data = base64.b64decode(row["data"]) if row.get("encoding") == "base64" else row["data"].encode()
        assert (row["seq"], row["topic"], row["headers"], data) == (
            entry.seq,
            entry.topic,
            entry.headers,
            entry.data,
        )
        assert row["time_ns"] == entry.time_ns
        assert datetime.fromisoformat(row["time"]) == entry.time
        assert (row["publisher_id"], row["publisher_seq"], row["timestamp_ns"]) == (
            small.publisher_id,
            entry.publisher_seq,
            entry.timestamp_ns,
        )
        assert (row["segment"], row["offset"]) == (1, entry.offset)
    assert rows[2]["encoding"] == "base64" and "encoding" not in rows[0]


def test_dump_topic_from_limit(big: WrittenLog) -> None:
    assert dumped_seqs(str(big.data_dir), "--topic", "md.XNYS.>", "--limit", "3") == [2, 5, 8]
    assert dumped_seqs(str(big.data_dir), "--from", "1499") == [1499, 1500]
    assert dumped_seqs(str(big.data_dir), "--from", "1501") == []
    assert dumped_seqs(str(big.data_dir), "--from", "700", "-n", "4", "--topic", "md.*.MSFT") == [
        702,
        705,
        708,
        711,
    ]
    # across segment boundaries
    second = segment_bases(big)[1]
    assert dumped_seqs(str(big.log_dir), "--from", str(second - 2), "--limit", "4") == list(
        range(second - 2, second + 2)
    )
    assert len(dump_lines(str(big.data_dir))) == 1500
    lines = dump_lines(str(big.data_dir), "--from", "1000", "-n", "1")
    entry = next(read_log(big.data_dir, start=1000))
    when = entry.time.astimezone().isoformat(timespec="microseconds")
    payload = repr(b"tick 999 " + bytes(60))  # not printable: a bytes literal, as `shmq sub` shows it
    assert lines == [f'1000 {when} md.XNAS.AAPL {{"i": 999, "venue": "XNAS"}} {payload}']


def test_dump_since(big: WrittenLog) -> None:
    # The router paused 20 ms after record 1000: half-way is before 1001.
    before, after = list(read_log(big.data_dir, start=1000))[:2]
    middle = (before.time_ns + after.time_ns) // 2
    since = shmq_log.wall_time(middle)
    for text in (since.isoformat(), since.astimezone().replace(tzinfo=None).isoformat()):
        assert dumped_seqs(str(big.data_dir), "--since", text, "-n", "2") == [1001, 1002]
    result = cli("log", "dump", str(big.data_dir), "--since", "yesterday")
    assert result.exit_code == 2 and "is not an ISO 8601 time" in result.stderr


def test_dump_stops_cleanly_and_bad_options_exit_2(small: WrittenLog) -> None:
    for args in (["--from", "0"], ["--limit", "0"], ["--from", "x"]):
        result = cli("log", "dump", str(small.data_dir), *args)
        assert result.exit_code == 2, (args, result.output)
    result = cli("log", "dump", str(small.data_dir), "--topic", "md..a")
    assert result.exit_code == 2
    assert result.stderr.startswith("shmq log dump: bad --topic pattern: ") and result.stdout == ""


# -- damage ------------------------------------------------------------------------------------------------


def test_a_corrupted_record_is_reported_by_inspect_and_skipped_by_dump(big_copy: WrittenLog) -> None:
    bases = segment_bases(big_copy)
    seq = bases[1] + 10  # in a closed (not the last) segment
    bad = corrupt(big_copy, seq)
    assert bad.segment == bases[1]
    file = segment_name(bad.segment)

    result = cli("log", "inspect", str(big_copy.data_dir))
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "damage (readers skip it):" in out
    assert f"  {file} offset {bad.offset}: " in out and "damaged record(s)" in out
    assert "DAMAGED: 1 damaged range(s)" in out and "1 record(s) missing" in out
    row = next(line for line in out.splitlines() if line.startswith(file)).split()
    assert row[2] == str(bases[2] - bases[1] - 1)  # records: one fewer
    assert row[-1] == "1"  # damaged

    result = cli("log", "inspect", str(big_copy.data_dir), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["damaged"] is True and report["records"] == 1499 and report["missing_records"] == 1
    [damage] = report["damage"]
    assert (damage["segment"], damage["offset"], damage["truncated"], damage["bad_header"]) == (
        bad.segment,
        bad.offset,
        False,
        False,
    )
    record_bytes = next(read_log(big_copy.data_dir, start=seq + 1)).offset - bad.offset
    assert damage["length"] == record_bytes == report["damaged_bytes"]
    seg = next(s for s in report["segments"] if s["base_seq"] == bad.segment)
    assert (seg["damaged_records"], seg["first_seq"], seg["last_seq"]) == (1, bases[1], bases[2] - 1)

    result = cli("log", "dump", str(big_copy.data_dir), "--json")
    assert result.exit_code == 0
    seqs = [json.loads(line)["seq"] for line in result.stdout.splitlines()]
    assert seqs == [s for s in range(1, 1501) if s != seq]
    assert result.stderr == (
        f"shmq log dump: skipped {file} offset {bad.offset}: {record_bytes} bytes, damaged record(s)\n"
    )
    result = cli("log", "dump", str(big_copy.data_dir), "--from", str(seq - 1), "-n", "2")
    assert [line.split()[0] for line in result.stdout.splitlines()] == [str(seq - 1), str(seq + 1)]
    assert "skipped" in result.stderr

    records = read_log(big_copy.data_dir)
    assert [e.seq for e in records] == seqs
    assert [(d.segment, d.offset, d.truncated) for d in records.damage] == [(bad.segment, bad.offset, False)]


def test_damage_outside_what_was_read_is_not_reported(big_copy: WrittenLog) -> None:
    bases = segment_bases(big_copy)
    bad = corrupt(big_copy, bases[1] + 10)
    # Before the start asked for (even in the same segment) or beyond where reading stopped:
    # nothing skipped that was wanted.
    for args in (["--from", str(bad.seq + 5)], ["--limit", "3"], ["--from", str(bad.seq - 3), "-n", "3"]):
        result = cli("log", "dump", str(big_copy.data_dir), *args)
        assert result.exit_code == 0 and result.stderr == "", (args, result.stderr)
    records = read_log(big_copy.data_dir, start=bad.seq + 5)
    assert next(records).seq == bad.seq + 5 and records.damage == []
    records = read_log(big_copy.data_dir, start=bad.seq)  # the start itself is the damaged one
    assert next(records).seq == bad.seq + 1
    assert [(d.segment, d.offset) for d in records.damage] == [(bad.segment, bad.offset)]


def test_a_torn_last_record_is_a_truncated_tail(big_copy: WrittenLog) -> None:
    last = corrupt(big_copy, 1500)
    report = inspect_log(big_copy.data_dir)
    assert report.damaged and report.last_seq == 1499 and report.records == 1499
    [damage] = report.damage
    assert (damage.segment, damage.offset, damage.truncated) == (last.segment, last.offset, True)
    assert damage.length == SEGMENT_BYTES - last.offset  # the rest of the (preallocated) file
    result = cli("log", "inspect", str(big_copy.data_dir))
    assert result.exit_code == 1 and "torn tail (nothing readable after it)" in result.stdout
    assert dumped_seqs(str(big_copy.data_dir), "--from", "1498") == [1498, 1499]


def test_a_segment_with_a_bad_header(big_copy: WrittenLog) -> None:
    bases = segment_bases(big_copy)
    flip(big_copy.log_dir / segment_name(bases[1]), 0, 8)  # its magic number
    report = inspect_log(big_copy.data_dir)
    assert report.damaged and report.bad_segments == 1
    assert report.missing_records == bases[2] - bases[1]
    seg = report.segments[1]
    assert seg.bad_header and seg.records == 0 and seg.first_seq is None
    assert seg.damage == (shmq_log.LogDamage(bases[1], 0, SEGMENT_BYTES, False, bad_header=True),)
    result = cli("log", "inspect", str(big_copy.data_dir))
    assert result.exit_code == 1
    assert f"{segment_name(bases[1])}: bad segment header" in result.stdout
    assert (
        next(line for line in result.stdout.splitlines() if line.startswith(seg.name)).split()[-1] == "HEADER"
    )
    records = read_log(big_copy.data_dir)
    seqs = [e.seq for e in records]
    assert seqs == [s for s in range(1, 1501) if not bases[1] <= s < bases[2]]
    assert [(d.segment, d.bad_header) for d in records.damage] == [(bases[1], True)]


def test_a_missing_segment_is_damage_but_retention_is_not(big_copy: WrittenLog) -> None:
    bases = segment_bases(big_copy)
    (big_copy.log_dir / segment_name(bases[0])).unlink()  # as retention removes old segments
    report = inspect_log(big_copy.data_dir)
    assert not report.damaged and report.first_seq == bases[1]
    assert cli("log", "inspect", str(big_copy.data_dir)).exit_code == 0
    assert dumped_seqs(str(big_copy.data_dir), "-n", "1") == [bases[1]]
    (big_copy.log_dir / segment_name(bases[2])).unlink()  # from the middle: records lost
    report = inspect_log(big_copy.data_dir)
    assert report.damaged and report.missing_records == bases[3] - bases[2]
    result = cli("log", "inspect", str(big_copy.data_dir))
    assert result.exit_code == 1
    assert f"missing: {bases[3] - bases[2]} sequence number(s) between {bases[1]} and 1500" in result.stdout


# -- no log -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "dump"])
def test_a_missing_or_wrong_directory_exits_2(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nowhere"
    result = cli("log", command, str(missing))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"shmq log {command}: no durable log at {missing}: the directory does not exist (a router "
        "with data_dir=DIR / --data-dir DIR writes its log under DIR/log)\n"
    )
    result = cli("log", command, str(tmp_path))
    assert result.exit_code == 2 and "no log/ directory and no <base_seq>.seg segment files" in result.stderr
    (tmp_path / "file").write_text("x")
    result = cli("log", command, str(tmp_path / "file"))
    assert result.exit_code == 2 and "is not a directory" in result.stderr


def test_an_empty_log(tmp_path: Path) -> None:
    write_log(tmp_path, [("other", b"x", None)])
    result = cli("log", "inspect", str(tmp_path))
    assert result.exit_code == 0 and result.stdout.splitlines()[-1] == "ok: 0 records, no damage"
    assert dump_lines(str(tmp_path)) == []
