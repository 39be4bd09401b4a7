"""Reading a router's durable log: `read_log` yields its records, `inspect_log` checks its segments.

A router started with ``data_dir=DIR`` writes the messages of its durable topics to ``DIR/log``, a
directory of segment files named ``<base_seq, 20 digits>.seg`` (shmq/_native/log.h has the byte
layout; shmq/_durable.py the data directory). Both functions take either ``DIR`` or ``DIR/log``,
and read while a router appends (they see what was written when they get there)::

    from shmq.log import inspect_log, read_log

    for entry in read_log("/var/lib/md", topic="md.XNAS.>", start=1000):
        print(entry.seq, entry.time, entry.topic, entry.headers, entry.data)

    report = inspect_log("/var/lib/md")
    if report.damaged:
        print(report.damage)

Every record carries a CRC-32C: a damaged record is skipped by `read_log` (its iterator's
``damage`` lists what it skipped) and reported by `inspect_log`, with the segment and the offset
where the bad bytes start.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from shmq._errors import (
    ArgumentTypeError,
    CorruptSegment,
    InvalidArgument,
    MessageDecodeError,
    NotFound,
    PermissionDenied,
)
from shmq._native import _ring
from shmq.topics import matches, validate_pattern

__all__ = ["LogDamage", "LogEntry", "LogRecords", "LogReport", "LogSegment", "inspect_log", "read_log"]

#: A record body's message header (shmq/_native/bus.h): topic_id, topic_len, headers_len,
#: publisher_id, flags, seq, timestamp_ns, log_seq.
_MSG_HEADER = struct.Struct("<IHHIIQQQ")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_SEQ = (1 << 64) - 1
_BATCH = 1024


def segment_name(base_seq: int) -> str:
    """The file name of the segment whose first record is `base_seq`."""
    return f"{base_seq:020d}.seg"


def wall_time(time_ns: int) -> datetime:
    """A CLOCK_REALTIME timestamp in nanoseconds as an aware datetime (UTC; microseconds)."""
    return _EPOCH + timedelta(microseconds=time_ns // 1000)


@dataclass(frozen=True)
class LogEntry:
    """One record of a durable log: a message as the router appended it."""

    seq: int  #: the record's sequence number in the log, from 1 (`Message.log_seq`)
    time_ns: int  #: wall clock (time.time_ns()) when the router appended it
    topic: str
    headers: dict[str, str | int | float | bool] = field(hash=False)
    data: bytes
    publisher_id: int  #: the publisher that sent it (`Message.publisher_id`)
    publisher_seq: int  #: its sequence number per publisher and topic (`Message.seq`)
    timestamp_ns: int  #: CLOCK_MONOTONIC at publish (`Message.timestamp_ns`)
    segment: int  #: base_seq of the segment file holding it (`segment_name` gives the file name)
    offset: int  #: where the record starts in that file

    @property
    def time(self) -> datetime:
        """`time_ns` as an aware datetime (UTC)."""
        return wall_time(self.time_ns)


@dataclass(frozen=True)
class LogDamage:
    """Bytes of a segment that do not hold good records (a bad checksum, a torn write, ...)."""

    segment: int  #: base_seq of the segment (its file name: `segment_name`)
    offset: int  #: where the bad bytes start
    length: int  #: how many bytes are bad (skipped by readers)
    truncated: bool  #: True: a torn tail, nothing good after it in the segment
    bad_header: bool = False  #: the segment's header is not valid: the whole file is unreadable

    @property
    def file(self) -> str:
        return segment_name(self.segment)

    def describe(self) -> str:
        """One line: where, how long, what kind."""
        if self.bad_header:
            return f"{self.file}: bad segment header, the whole file is unreadable"
        kind = "torn tail (nothing readable after it)" if self.truncated else "damaged record(s)"
        return f"{self.file} offset {self.offset}: {self.length} bytes, {kind}"


@dataclass(frozen=True)
class LogSegment:
    """What a scan of one segment file found."""

    name: str  #: the file name, <base_seq>.seg
    path: Path
    base_seq: int
    size: int  #: the file's size in bytes (segments are preallocated whole)
    used: int  #: bytes up to the end of the last record
    records: int  #: good records
    first_seq: int | None  #: None when the segment has no good record
    last_seq: int | None
    first_time_ns: int | None
    last_time_ns: int | None
    damaged_records: int  #: damaged ranges (one may span several records)
    damaged_bytes: int
    bad_header: bool
    damage: tuple[LogDamage, ...]

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["path"] = str(self.path)
        return row


@dataclass(frozen=True)
class LogReport:
    """`inspect_log`'s answer: every segment, the totals, and what is damaged."""

    path: Path  #: the log directory (DIR/log)
    segments: tuple[LogSegment, ...]
    size: int  #: bytes of all segment files
    records: int  #: good records in all
    first_seq: int | None  #: None when the log has no good record
    last_seq: int | None
    first_time_ns: int | None
    last_time_ns: int | None
    damaged_records: int  #: damaged ranges in all
    damaged_bytes: int
    bad_segments: int  #: segments whose header is not valid (unreadable whole)
    missing_records: int  #: sequence numbers absent between the first segment's start and last_seq
    damage: tuple[LogDamage, ...]

    @property
    def damaged(self) -> bool:
        """True if anything was found wrong: damaged records, bad segments or missing records."""
        return bool(self.damaged_records or self.bad_segments or self.missing_records)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "segments": [s.to_dict() for s in self.segments],
            "size": self.size,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_time_ns": self.first_time_ns,
            "last_time_ns": self.last_time_ns,
            "damaged_records": self.damaged_records,
            "damaged_bytes": self.damaged_bytes,
            "bad_segments": self.bad_segments,
            "missing_records": self.missing_records,
            "damaged": self.damaged,
            "damage": [asdict(d) for d in self.damage],
        }


# -- finding the log ---------------------------------------------------------------------------------


def log_directory(path: str | os.PathLike[str]) -> Path:
    """The log directory of `path`: ``path/log`` if that exists (a data directory), else `path`.

    Raises NotFound if there is no such directory or it holds no log, InvalidArgument if it is a
    file, ArgumentTypeError if `path` is not a str or path object.
    """
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise ArgumentTypeError(f"path must be a str or a path, got {type(path).__name__}")
    given = Path(path)
    if not given.exists():
        raise NotFound(
            f"no durable log at {given}: the directory does not exist (a router with "
            "data_dir=DIR / --data-dir DIR writes its log under DIR/log)"
        )
    if not given.is_dir():
        raise InvalidArgument(f"{given} is not a directory: give a router's data directory or its log/")
    if (given / "log").is_dir():
        return given / "log"
    try:
        has_segments = bool(_ring.log_segments(str(given)))
    except PermissionError as exc:
        raise PermissionDenied(f"cannot read {given}: {exc.strerror}") from None
    # An empty log/ under a data directory (beside its LOCK) is a log with no records yet.
    if not has_segments and not (given.name == "log" and (given.parent / "LOCK").exists()):
        raise NotFound(
            f"no durable log at {given}: it has no log/ directory and no <base_seq>.seg segment files "
            "(give the data_dir of a router with durable topics, or its log/)"
        )
    return given


def _os_error(exc: OSError, where: Path) -> Exception:
    """An OSError of the native reader as shmq's class for it (others stay as they are)."""
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"the log at {where} went away while reading it: {exc}")
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"cannot read the log at {where}: {exc}")
    return exc


# -- reading -----------------------------------------------------------------------------------------


def _since_ns(since: object) -> int:
    if not isinstance(since, datetime):
        raise ArgumentTypeError(f"since must be a datetime, got {type(since).__name__}")
    # A naive datetime is local time (as datetime.timestamp() has it).
    micros = (since.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)
    return max(micros * 1000, 0)


def _start(start: object) -> int:
    if isinstance(start, bool) or not isinstance(start, int):
        raise ArgumentTypeError(f"start must be an int, got {type(start).__name__}")
    if not 1 <= start <= _MAX_SEQ:
        raise InvalidArgument(f"start must be a log sequence number from 1, got {start}")
    return start


def decode_record(seq: int, time_ns: int, segment: int, offset: int, body: bytes) -> LogEntry:
    """A record of the log (as `_ring.LogReader.read` gives it) as a LogEntry.

    Raises CorruptSegment if the body is not a pub/sub message (its checksum was good: the log
    was not written by a router).
    """
    where = f"record {seq} ({segment_name(segment)} offset {offset})"
    if len(body) < _MSG_HEADER.size:
        raise CorruptSegment(f"{where} is not a pub/sub message: {len(body)} bytes")
    _, topic_len, headers_len, publisher_id, _, publisher_seq, timestamp_ns, _ = _MSG_HEADER.unpack_from(body)
    topic_end = _MSG_HEADER.size + topic_len
    headers_end = topic_end + headers_len
    if topic_len == 0 or headers_end > len(body):
        raise CorruptSegment(f"{where} is not a pub/sub message: bad topic or header lengths")
    try:
        topic = body[_MSG_HEADER.size : topic_end].decode("utf-8")
        headers = _ring.decode_headers(body[topic_end:headers_end]) if headers_len else {}
    except (UnicodeDecodeError, MessageDecodeError, CorruptSegment) as exc:
        raise CorruptSegment(f"{where} is not a pub/sub message: {exc}") from None
    return LogEntry(
        seq=seq,
        time_ns=time_ns,
        topic=topic,
        headers=headers,
        data=body[headers_end:],
        publisher_id=publisher_id,
        publisher_seq=publisher_seq,
        timestamp_ns=timestamp_ns,
        segment=segment,
        offset=offset,
    )


class LogRecords(Iterator[LogEntry]):
    """The iterator `read_log` returns: LogEntry objects in log order, and what it skipped.

    Damaged records are skipped; ``damage`` lists the ranges skipped so far (the reader keeps the
    first 16). It holds one segment mapped: ``close()`` (or a with block, or reading to the end)
    lets it go.
    """

    def __init__(self, directory: Path, start: int, topic: str | None, since_ns: int | None) -> None:
        self.path = directory
        self._topic = topic
        self._matched: dict[str, bool] = {}
        self._start = start
        self._batch: list[tuple[int, int, int, int, bytes]] = []
        self._index = 0
        self._position = (0, 0)  # (segment, offset) of the last record taken
        self._floor: tuple[int, int] | None = None  # where damage starts to count (see damage)
        self._by_time = since_ns is not None
        self._damage: list[LogDamage] = []
        try:
            self._reader: _ring.LogReader | None = _ring.LogReader(str(directory), start, since_ns)
        except OSError as exc:
            raise _os_error(exc, directory) from None

    @property
    def damage(self) -> list[LogDamage]:
        """Damaged ranges skipped so far (bad records, torn tails, unreadable segment headers)."""
        self._refresh_damage()
        return list(self._damage)

    def _refresh_damage(self) -> None:
        if self._reader is None:
            return
        # The reader reads ahead (a batch at a time): only what lies before the last record taken
        # was skipped, unless the end was reached. (It notes a segment it cannot open, its
        # header bad, at offset 0 with length 0.)
        # Damage before the first record taken is left out when that record is the one asked
        # for (start=): nothing wanted was lost there.
        done = self._index == len(self._batch)
        floor = self._floor or (0, 0)
        self._damage = [
            LogDamage(seg, off, length, truncated, bad_header=length == 0 and off == 0)
            for seg, off, length, truncated in self._reader.damage()
            if (done or (seg, off) < self._position) and (seg, off) >= floor
        ]

    def _wanted(self, topic: str) -> bool:
        if self._topic is None:
            return True
        hit = self._matched.get(topic)
        if hit is None:
            hit = self._matched[topic] = matches(self._topic, topic)
        return hit

    def __next__(self) -> LogEntry:
        while True:
            if self._index == len(self._batch):
                if self._reader is None:
                    raise StopIteration
                try:
                    self._batch = self._reader.read(_BATCH)
                except OSError as exc:
                    raise _os_error(exc, self.path) from None
                self._index = 0
                if not self._batch:
                    self.close()
                    raise StopIteration
            record = self._batch[self._index]
            self._index += 1
            self._position = (record[2], record[3])
            if record[0] < self._start:  # (opened by time: start= still holds)
                continue
            if self._floor is None:
                exact = record[0] == self._start and not self._by_time
                self._floor = (record[2], record[3]) if exact else (0, 0)
            entry = decode_record(*record)
            if self._wanted(entry.topic):
                return entry

    def close(self) -> None:
        if self._reader is not None:
            self._refresh_damage()  # (kept: what it skipped stays known after closing)
            self._reader.close()
            self._reader = None
        self._batch, self._index = [], 0

    def __enter__(self) -> LogRecords:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_log(
    path: str | os.PathLike[str],
    *,
    start: int = 1,
    topic: str | None = None,
    since: datetime | None = None,
) -> LogRecords:
    """The records of the durable log at `path` (a router's data_dir, or its log/), oldest first.

    start: the first log sequence number wanted (records before it are skipped; if retention
    removed it, reading starts at the oldest record left). topic: a pattern (``md.*.AAPL``,
    ``md.>``): only records whose topic matches. since: only records appended at or after this
    time (a naive datetime is local time). Damaged records are skipped (``.damage`` of the
    returned iterator says where).

    Raises NotFound if there is no log at `path`; InvalidArgument, ArgumentTypeError or
    InvalidTopic (both ValueError) on bad arguments; all before returning.
    """
    directory = log_directory(path)
    first = _start(start)
    if topic is not None:
        validate_pattern(topic)
    since_ns = None if since is None else _since_ns(since)
    return LogRecords(directory, first, topic, since_ns)


# -- inspecting --------------------------------------------------------------------------------------


def _scan(directory: Path, base: int) -> LogSegment | None:
    path = directory / segment_name(base)
    try:
        info = _ring.log_scan_segment(str(path))
    except FileNotFoundError:
        return None  # removed by retention since the listing
    except PermissionError as exc:
        raise PermissionDenied(f"cannot read {path}: {exc.strerror}") from None
    records = int(info["records"])
    if info["bad_header"]:
        damage: tuple[LogDamage, ...] = (LogDamage(base, 0, int(info["size"]), False, bad_header=True),)
    else:
        damage = tuple(LogDamage(*d) for d in info["damage"])
    return LogSegment(
        name=path.name,
        path=path,
        base_seq=base,
        size=int(info["size"]),
        used=int(info["used"]),
        records=records,
        first_seq=int(info["first_seq"]) if records else None,
        last_seq=int(info["last_seq"]) if records else None,
        first_time_ns=int(info["first_time_ns"]) if records else None,
        last_time_ns=int(info["last_time_ns"]) if records else None,
        damaged_records=int(info["damaged_records"]),
        damaged_bytes=int(info["damaged_bytes"]),
        bad_header=bool(info["bad_header"]),
        damage=damage,
    )


def inspect_log(path: str | os.PathLike[str]) -> LogReport:
    """Scan every segment of the durable log at `path` (a router's data_dir, or its log/), checking
    each record's checksum: records, sequence numbers, times and damage, per segment and in all.

    ``report.damaged`` is True if a record is damaged, a segment's header is bad, or sequence
    numbers are missing between the first segment's start and the last record (segments removed
    by retention are not missing: the log starts later). Raises NotFound if there is no log at
    `path`, ArgumentTypeError if `path` is not a path.
    """
    directory = log_directory(path)
    try:
        bases = _ring.log_segments(str(directory))
    except OSError as exc:
        raise _os_error(exc, directory) from None
    segments = tuple(s for s in (_scan(directory, base) for base in bases) if s is not None)
    with_records = [s for s in segments if s.records]
    records = sum(s.records for s in segments)
    last_seq = with_records[-1].last_seq if with_records else None
    missing = 0
    if last_seq is not None:
        missing = max(last_seq - segments[0].base_seq + 1 - records, 0)
    return LogReport(
        path=directory,
        segments=segments,
        size=sum(s.size for s in segments),
        records=records,
        first_seq=with_records[0].first_seq if with_records else None,
        last_seq=last_seq,
        first_time_ns=with_records[0].first_time_ns if with_records else None,
        last_time_ns=with_records[-1].last_time_ns if with_records else None,
        damaged_records=sum(s.damaged_records for s in segments),
        damaged_bytes=sum(s.damaged_bytes for s in segments),
        bad_segments=sum(s.bad_header for s in segments),
        missing_records=missing,
        damage=tuple(d for s in segments for d in s.damage),
    )
