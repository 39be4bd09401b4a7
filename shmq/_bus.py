"""What the router and its clients share: names, the bus segment, statistics, the control protocol.

A bus named ``B`` has:

* a control socket in the abstract Unix namespace, ``\\0shmq.bus.B`` (no file to go stale: the
  kernel removes it when the router's process ends, so a second router gets EADDRINUSE exactly
  while a live one holds it, and clients see EOF the moment the router dies);
* the bus segment ``/dev/shm/shmq.bus.B``, created by the router: the doorbell publishers ring to
  wake it, and every statistic (router, per publisher, per subscriber, per topic), so any process
  can read them without talking to the router (`bus_stats`);
* one ring per publisher (``shmq.bus.B.p.<pid>.<n>``, created by the publisher, read by the
  router) and one per subscriber (``shmq.bus.B.s.<pid>.<n>``, created by the subscriber, written
  by the router). Clients own their rings, so a router restart loses nothing queued in them.

The control protocol is one JSON object per line on the socket: the client says ``hello`` with its
role and ring, the router answers ``{"ok": true, ...}`` or ``{"ok": false, "error": <class>,
"message": ...}``, and the connection stays open as the liveness signal in both directions.
docs/ARCHITECTURE.md has the bus segment's layout byte by byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from shmq import _errors
from shmq._errors import CorruptSegment, IncompatibleSegment, InvalidArgument, NotFound
from shmq._native import _ring
from shmq._segment import Segment, process_started_by

PROTOCOL_VERSION = 1
BUS_MAGIC = 0x0053554251514D48  # bus.h SHMQ_BUS_MAGIC
BUS_VERSION = 2
MAX_BUS_NAME = 100

# Bus segment header (bus.h and docs/ARCHITECTURE.md).
OFF_MAGIC, OFF_VERSION, OFF_STATE = 0, 8, 12
OFF_ROUTER_PID, OFF_STARTED_NS, OFF_GENERATION = 16, 24, 32
OFF_MAX_PUBLISHERS, OFF_MAX_SUBSCRIBERS, OFF_MAX_TOPICS = 40, 44, 48
OFF_PUBLISHERS, OFF_SUBSCRIBERS, OFF_TOPICS = 56, 64, 72
OFF_HEARTBEAT_NS, OFF_TOPICS_USED, OFF_TOPICS_UNTRACKED = 80, 88, 96
OFF_LOG_ERROR, OFF_LOG_NEXT, OFF_LOG_SYNCED = 104, 112, 120
STATE_RUNNING, STATE_STOPPED = 1, 2
COUNTER_NAMES = (
    "messages",
    "bytes",
    "deliveries",
    "drops",
    "stalls",
    "sleeps",
    "passes",
    "redeliveries",
    "appended",
    "log_bytes",
    "syncs",
    "spilled",
    "replayed",
)

PUBLISHER_SLOT = _ring.PUBLISHER_SLOT
SUBSCRIBER_SLOT = _ring.SUBSCRIBER_SLOT
TOPIC_SLOT = 320
SLOT_FREE, SLOT_LIVE, SLOT_DRAINING, SLOT_CORRUPT = 0, 1, 2, 3
SLOT_STATES = {SLOT_FREE: "free", SLOT_LIVE: "live", SLOT_DRAINING: "draining", SLOT_CORRUPT: "corrupt"}
# Subscriber slot statistics (bus.h SHMQ_SS_*): persistence
SS_SPILLED, SS_SPILL_BYTES, SS_SPILL_FULL, SS_REPLAYED, SS_LOG_SEQ, SS_SKIPPED, SS_SPILL_MAX = (
    112,
    120,
    128,
    136,
    144,
    152,
    160,
)
SS_SPILL_MSGS = 168
SS_INTENT_END, SS_INTENT_SEQ = 176, 184  # log-fed: stored before each commit (bus.h)
# The client's uid and gid as the kernel reported them at connect (SO_PEERCRED); Python only.
PS_UID, PS_GID = 144, 148
SS_UID, SS_GID = 192, 196
SUBSCRIBER_DESCRIPTION = 256  # offset of the JSON description in a subscriber slot
SUBSCRIBER_DESCRIPTION_MAX = SUBSCRIBER_SLOT - SUBSCRIBER_DESCRIPTION

POLICIES = {
    "block": _ring.POLICY_BLOCK,
    "drop": _ring.POLICY_DROP,
    "drop_oldest": _ring.POLICY_DROP_OLDEST,
    "conflate": _ring.POLICY_CONFLATE,
    "spill": _ring.POLICY_SPILL,
}

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def validate_bus(bus: object) -> str:
    """Return `bus` if it can name a bus, else raise InvalidArgument saying why."""
    if not isinstance(bus, str):
        raise _errors.ArgumentTypeError(f"a bus name must be a str, got {type(bus).__name__}")
    if not bus or len(bus) > MAX_BUS_NAME:
        raise InvalidArgument(f"a bus name must have 1 to {MAX_BUS_NAME} characters, got {len(bus)}")
    bad = [c for c in bus if c in "/\\\0" or not c.isprintable() or c.isspace()]
    if bad:
        raise InvalidArgument(
            f"bus name {bus!r} contains {bad[0]!r}; use letters, digits and . _ - (no '/', no spaces)"
        )
    return bus


def bus_segment_name(bus: str) -> str:
    return f"bus.{bus}"


def socket_address(bus: str) -> bytes:
    return b"\0shmq.bus." + bus.encode()


def client_ring_name(bus: str, role: str) -> str:
    """A fresh ring name for a client of this process: role is "p" or "s"."""
    return f"bus.{bus}.{role}.{os.getpid()}.{next(_ring_numbers)}"


def _numbers() -> Any:
    n = 0
    while True:
        n += 1
        yield f"{n}{time.monotonic_ns() % 1000000:06d}"


_ring_numbers = _numbers()


def u64(buf: Any, off: int) -> int:
    return int(_U64.unpack_from(buf, off)[0])


def u32(buf: Any, off: int) -> int:
    return int(_U32.unpack_from(buf, off)[0])


def put_u64(buf: Any, off: int, value: int) -> None:
    _U64.pack_into(buf, off, value)


def put_u32(buf: Any, off: int, value: int) -> None:
    _U32.pack_into(buf, off, value)


def bus_layout(max_publishers: int, max_subscribers: int, max_topics: int) -> tuple[int, int, int, int]:
    """Offsets of the three slot tables and the segment size."""
    publishers = 4096
    subscribers = publishers + max_publishers * PUBLISHER_SLOT
    topics = subscribers + max_subscribers * SUBSCRIBER_SLOT
    size = topics + max_topics * TOPIC_SLOT
    return publishers, subscribers, topics, (size + 4095) & ~4095


def open_bus_segment(bus: str) -> Segment:
    """Attach to a bus segment and check its header."""
    segment = Segment.attach(bus_segment_name(bus), 4096)
    try:
        if u64(segment.mapping, OFF_MAGIC) != BUS_MAGIC:
            raise CorruptSegment(f"{segment.path} is not a shmq bus segment (wrong magic number)")
        if u32(segment.mapping, OFF_VERSION) != BUS_VERSION:
            raise IncompatibleSegment(
                f"{segment.path} has bus layout version {u32(segment.mapping, OFF_VERSION)}"
            )
    except BaseException:
        segment.close()
        raise
    return segment


# -- statistics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublisherStats:
    """One publisher, as the router sees it (from the bus segment)."""

    bus: str
    publisher_id: int  #: the id in every message it published (`Message.publisher_id`)
    pid: int
    ring: str
    state: str  #: "live", "draining" (gone; the router still routes what it left) or "corrupt"
    published: int  #: messages written into its ring
    routed: int  #: messages the router has taken from its ring
    routed_bytes: int
    depth_messages: int  #: published and not yet routed
    depth_bytes: int
    stalls: int  #: times its next message waited for a full `block` subscriber (back-pressure)
    uid: int = -1  #: its user and group, as the kernel told the router (-1: not known)
    gid: int = -1


@dataclass(frozen=True)
class SubscriberStats:
    """One subscriber: what the router delivered, dropped and holds for it, and how far behind it is."""

    bus: str
    subscriber_id: int
    pid: int
    ring: str
    patterns: tuple[str, ...]
    where: str | None
    group: str | None
    on_full: str
    state: str
    capacity: int  #: ring bytes
    delivered: int  #: messages written into its ring
    delivered_bytes: int
    received: int  #: messages it has taken from its ring
    depth_messages: int  #: delivered and not yet received
    depth_bytes: int
    drops: int  #: messages dropped for it: by its on_full policy, or too large for its ring
    too_large: int  #: of the drops: messages larger than its ring's max_message (any policy)
    filtered: int  #: messages on matching topics that its where= filter rejected
    pending: int  #: messages the router holds for it (conflation, last values, spill files)
    lag: int  #: depth_messages + pending (+ spilled messages not yet back): how far behind it is
    spilled: int = 0  #: on_full="spill": messages written to its spill file
    spill_bytes: int = 0  #: bytes in its spill file now
    spill_full: int = 0  #: times its spill file reached max_spill_bytes (it blocked then)
    replayed: int = 0  #: messages it got from the durable log (start= or durable=)
    log_seq: int = 0  #: the log sequence of the last of them
    skipped: int = 0  #: log records it never got (removed by retention, or damaged)
    uid: int = -1  #: its user and group, as the kernel told the router (-1: not known)
    gid: int = -1
    latency: str | None = None  #: name of its LatencyRecorder (Subscriber(record_latency=...))


@dataclass(frozen=True)
class TopicStats:
    topic: str
    messages: int  #: published messages the router routed
    bytes: int  #: their bytes as carried: 40-byte message header, topic, headers and payload
    deliveries: int  #: copies written into subscriber rings (a group delivery counts once)
    drops: int
    last_seq: int
    last_timestamp_ns: int


@dataclass(frozen=True)
class BusStats:
    """A snapshot of a bus read from shared memory (the router is not disturbed)."""

    bus: str
    router_pid: int
    router_alive: bool
    started_ns: int  #: time.time_ns() when the router started
    generation: int  #: changes each time a router starts on the bus
    messages: int  #: messages routed
    bytes: int
    deliveries: int
    drops: int
    stalls: int
    sleeps: int  #: times the router went to sleep for lack of work
    redeliveries: int  #: messages a gone group member left, offered again to the other members
    publishers: tuple[PublisherStats, ...]
    subscribers: tuple[SubscriberStats, ...]
    topics: tuple[TopicStats, ...]
    untracked_topics: int  #: topics beyond max_topics (routed, but without statistics)
    appended: int = 0  #: records appended to the durable log
    log_bytes: int = 0
    syncs: int = 0  #: fdatasync calls that flushed the log
    spilled: int = 0  #: messages written to spill files
    replayed: int = 0  #: messages delivered from the log
    log_next_seq: int = 0  #: the durable log's next sequence (0: no log)
    log_synced_seq: int = 0  #: every record up to here is on disk
    log_error: int = 0  #: errno of the log's last failure (0: healthy)


def _name(buf: Any, off: int, size: int) -> str:
    raw = bytes(buf[off : off + size]).split(b"\0", 1)[0]
    return raw.decode("utf-8", "replace")


def read_publisher(bus: str, buf: Any, off: int) -> PublisherStats:
    return PublisherStats(
        bus=bus,
        publisher_id=u32(buf, off + 8),
        pid=u32(buf, off + 4),
        ring=_name(buf, off + 64, 64),
        state=SLOT_STATES.get(u32(buf, off), "unknown"),
        published=u64(buf, off + 56),
        routed=u64(buf, off + 16),
        routed_bytes=u64(buf, off + 24),
        depth_messages=u64(buf, off + 40),
        depth_bytes=u64(buf, off + 48),
        stalls=u64(buf, off + 32),
        uid=u32(buf, off + PS_UID),
        gid=u32(buf, off + PS_GID),
    )


def read_subscriber(bus: str, buf: Any, off: int, live_ring: Any = None) -> SubscriberStats:
    try:
        info = json.loads(_name(buf, off + SUBSCRIBER_DESCRIPTION, SUBSCRIBER_DESCRIPTION_MAX) or "{}")
    except ValueError:
        info = {}
    received, depth, depth_bytes = u64(buf, off + 64), u64(buf, off + 72), u64(buf, off + 80)
    if live_ring is not None:  # the subscriber itself: exact, not the last snapshot
        counters = live_ring._counters()
        received, depth, depth_bytes = (
            counters["messages_got"],
            counters["depth_messages"],
            counters["depth_bytes"],
        )
    # drop_oldest: the router takes messages out of the ring too; those were not received.
    received = max(received - u64(buf, off + 96), 0)
    pending = u64(buf, off + 48) + u64(buf, off + SS_SPILL_MSGS)  # (spilled: held by the router too)
    return SubscriberStats(
        bus=bus,
        subscriber_id=u32(buf, off + 12),
        pid=u32(buf, off + 4),
        ring=str(info.get("ring", "")),
        patterns=tuple(info.get("patterns", ())),
        where=info.get("where"),
        group=info.get("group"),
        on_full=str(info.get("on_full", "")),
        state=SLOT_STATES.get(u32(buf, off), "unknown"),
        capacity=u64(buf, off + 88),
        delivered=u64(buf, off + 16),
        delivered_bytes=u64(buf, off + 24),
        received=received,
        depth_messages=depth,
        depth_bytes=depth_bytes,
        drops=u64(buf, off + 32),
        too_large=u64(buf, off + 104),
        filtered=u64(buf, off + 40),
        pending=pending,
        lag=depth + pending,
        spilled=u64(buf, off + SS_SPILLED),
        spill_bytes=u64(buf, off + SS_SPILL_BYTES),
        spill_full=u64(buf, off + SS_SPILL_FULL),
        replayed=u64(buf, off + SS_REPLAYED),
        log_seq=u64(buf, off + SS_LOG_SEQ),
        skipped=u64(buf, off + SS_SKIPPED),
        uid=u32(buf, off + SS_UID),
        gid=u32(buf, off + SS_GID),
        latency=info["latency"] if isinstance(info.get("latency"), str) else None,
    )


def read_topic(buf: Any, off: int) -> TopicStats:
    length = u32(buf, off + 4)
    return TopicStats(
        topic=bytes(buf[off + 64 : off + 64 + length]).decode("utf-8", "replace"),
        messages=u64(buf, off + 8),
        bytes=u64(buf, off + 16),
        deliveries=u64(buf, off + 24),
        drops=u64(buf, off + 32),
        last_seq=u64(buf, off + 40),
        last_timestamp_ns=u64(buf, off + 48),
    )


def router_alive(pid: int, started_ns: int) -> bool:
    """Whether `pid` is still the router that started at `started_ns` (not a reused pid)."""
    # create_time has ~10 ms resolution; the router started after its process was created.
    return process_started_by(pid, started_ns, slack_ns=50_000_000)


def bus_stats(bus: str) -> BusStats:
    """Statistics of a bus, read from its shared memory (raises NotFound if no router made it)."""
    validate_bus(bus)
    try:
        segment = open_bus_segment(bus)
    except NotFound:
        raise NotFound(
            f"bus {bus!r} has no router (no {bus_segment_name(bus)} segment); start one with "
            f"`shmq router {bus}`"
        ) from None
    try:
        return snapshot(bus, segment.mapping)
    finally:
        segment.close()


def snapshot(bus: str, buf: Any) -> BusStats:
    max_pub, max_sub, max_topics = (
        u32(buf, OFF_MAX_PUBLISHERS),
        u32(buf, OFF_MAX_SUBSCRIBERS),
        u32(buf, OFF_MAX_TOPICS),
    )
    pubs_off, subs_off, topics_off = u64(buf, OFF_PUBLISHERS), u64(buf, OFF_SUBSCRIBERS), u64(buf, OFF_TOPICS)
    publishers = tuple(
        read_publisher(bus, buf, pubs_off + i * PUBLISHER_SLOT)
        for i in range(max_pub)
        if u32(buf, pubs_off + i * PUBLISHER_SLOT) != SLOT_FREE
    )
    subscribers = tuple(
        read_subscriber(bus, buf, subs_off + i * SUBSCRIBER_SLOT)
        for i in range(max_sub)
        if u32(buf, subs_off + i * SUBSCRIBER_SLOT) != SLOT_FREE
    )
    used = min(u32(buf, OFF_TOPICS_USED), max_topics)
    topics = tuple(read_topic(buf, topics_off + i * TOPIC_SLOT) for i in range(used))
    counters = {name: u64(buf, _ring.BUS_OFF_COUNTERS + 8 * i) for i, name in enumerate(COUNTER_NAMES)}
    pid, started = u64(buf, OFF_ROUTER_PID), u64(buf, OFF_STARTED_NS)
    return BusStats(
        bus=bus,
        router_pid=pid,
        router_alive=u32(buf, OFF_STATE) == STATE_RUNNING and router_alive(pid, started),
        started_ns=started,
        generation=u64(buf, OFF_GENERATION),
        messages=counters["messages"],
        bytes=counters["bytes"],
        deliveries=counters["deliveries"],
        drops=counters["drops"],
        stalls=counters["stalls"],
        sleeps=counters["sleeps"],
        redeliveries=counters["redeliveries"],
        publishers=publishers,
        subscribers=subscribers,
        topics=topics,
        untracked_topics=u64(buf, OFF_TOPICS_UNTRACKED),
        appended=counters["appended"],
        log_bytes=counters["log_bytes"],
        syncs=counters["syncs"],
        spilled=counters["spilled"],
        replayed=counters["replayed"],
        log_next_seq=u64(buf, OFF_LOG_NEXT),
        log_synced_seq=u64(buf, OFF_LOG_SYNCED),
        log_error=u32(buf, OFF_LOG_ERROR),
    )


# -- the control protocol --------------------------------------------------------------------------

MAX_LINE = 64 * 1024


class LineSocket:
    """A stream socket carrying one JSON object per line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def receive(self) -> dict[str, Any] | None:
        """The next message; None at EOF. Raises ConnectionError on a garbled stream."""
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise ConnectionError("control message too long")
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ConnectionError("control message is not an object")
        return message

    def feed(self) -> list[dict[str, Any]] | None:
        """Non-blocking: the complete messages now readable; None at EOF."""
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not chunk:
            return None
        self._buffer += chunk
        if len(self._buffer) > MAX_LINE and b"\n" not in self._buffer:
            return None
        out = []
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                return None
            if isinstance(message, dict):
                out.append(message)
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect(bus: str, timeout: float) -> LineSocket:
    """Connect to the bus's router socket (raises ConnectionError/OSError if none listens)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_address(bus))
    except BaseException:
        sock.close()
        raise
    return LineSocket(sock)


def error_from_reply(reply: dict[str, Any]) -> _errors.ShmqError:
    """The exception a router's refusal stands for (its class is named in the reply)."""
    cls = getattr(_errors, str(reply.get("error", "ShmqError")), _errors.ShmqError)
    if not (isinstance(cls, type) and issubclass(cls, _errors.ShmqError)):
        cls = _errors.ShmqError
    message = str(reply.get("message", "the router refused"))
    if cls is _errors.InvalidTopic:
        return _errors.InvalidTopic(message, topic=str(reply.get("topic", "")), token="", index=-1)
    if cls is _errors.InvalidFilter:
        return _errors.InvalidFilter(message, expression=str(reply.get("expression", "")), position=0)
    return cls(message)
