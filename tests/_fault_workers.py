"""Worker functions for the pub/sub fault-injection tests (tests/test_fault_pubsub.py).

The rules of tests/_workers.py and tests/_pubsub_workers.py hold: module-level functions (the spawn
context imports them by name), orders taken from files in a per-worker control directory, results
reported through files, never through shmq, so a bug in shmq cannot hide in the reporting channel;
every blocking call has a timeout, so a hang becomes a traceback and a non-zero exit code.

What differs: these workers are killed (SIGKILL) and frozen (SIGSTOP) at random moments, so what
they received cannot wait for a final report. Every receiver appends one fixed-size record per
message to an O_APPEND log with a single write (a record is either wholly in the file or not at
all), and the parent reads the log whatever became of the process.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import shmq
from tests._workers import dump, load, wait_until

OP_TIMEOUT = 20.0  # seconds any single wait in a worker may take before it counts as a hang
GRACE_S = 0.2  # after the expected messages, how long a receiver keeps listening for extra ones
MAX_BODY = 48  # payload body bytes: 0..MAX_BODY, so frames differ in size and rings wrap unevenly

# -- numbered, checksummed payloads ----------------------------------------------------------------

_HEAD = struct.Struct("<III")  # publisher number (the test's, not publisher_id), message number, body length
_CRC = struct.Struct("<I")


def body(pub_no: int, n: int) -> bytes:
    """The deterministic body of message n of publisher pub_no (so a receiver can check it)."""
    rng = random.Random(pub_no * 1_000_003 + n)
    return rng.randbytes(rng.randint(0, MAX_BODY))


def payload(pub_no: int, n: int) -> bytes:
    b = body(pub_no, n)
    head = _HEAD.pack(pub_no, n, len(b)) + b
    return head + _CRC.pack(zlib.crc32(head))


MIN_PAYLOAD = _HEAD.size + _CRC.size  # (an empty body)


def check_payload(data: bytes | memoryview) -> tuple[int, int, bool]:
    """(pub_no, n, intact) of a payload; intact means length, checksum and body all match."""
    view = memoryview(data)
    if view.nbytes < MIN_PAYLOAD:
        return (0xFFFFFFFF, 0xFFFFFFFF, False)
    pub_no, n, length = _HEAD.unpack_from(view, 0)
    if view.nbytes != _HEAD.size + length + _CRC.size:
        return (pub_no, n, False)
    (crc,) = _CRC.unpack_from(view, _HEAD.size + length)
    intact = crc == zlib.crc32(view[: _HEAD.size + length]) and bytes(
        view[_HEAD.size : _HEAD.size + length]
    ) == body(pub_no, n)
    return (pub_no, n, intact)


# -- what receivers log ----------------------------------------------------------------------------

# pub_no, n, topic number (index in the worker's topic list), publisher_id, seq, log_seq, flags
_REC = struct.Struct("<IIIIQQB7x")
F_INTACT, F_REDELIVERED, F_LAST_VALUE = 1, 2, 4


class Rec(NamedTuple):
    pub_no: int
    n: int
    topic: int
    publisher_id: int
    seq: int
    log_seq: int
    flags: int

    @property
    def key(self) -> tuple[int, int]:
        """Which published message this is: (publisher number, message number)."""
        return (self.pub_no, self.n)


def read_recs(path: str | Path) -> list[Rec]:
    """Every whole record of a receiver's log (a torn tail, impossible with one O_APPEND write of a
    fixed size, would be ignored)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return [Rec(*r) for r in _REC.iter_unpack(raw[: len(raw) - len(raw) % _REC.size])]


def count_recs(path: str | Path) -> int:
    try:
        return os.stat(path).st_size // _REC.size
    except FileNotFoundError:
        return 0


class _Log:
    """A receiver's append-only log (one os.write per record)."""

    def __init__(self, path: Path, topics: Sequence[str]) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.topic_no = {t: i for i, t in enumerate(topics)}

    def write(
        self, topic: str, data: bytes | memoryview, publisher_id: int, seq: int, log_seq: int, flags: int
    ) -> tuple[int, int]:
        pub_no, n, intact = check_payload(data)
        flags |= F_INTACT if intact else 0
        topic_no = self.topic_no.get(topic, 0xFFFFFFFF)
        os.write(self.fd, _REC.pack(pub_no, n, topic_no, publisher_id, seq, log_seq, flags))
        return (pub_no, n)

    def message(self, msg: shmq.Message) -> tuple[int, int]:
        flags = (F_REDELIVERED if msg.redelivered else 0) | (F_LAST_VALUE if msg.last_value else 0)
        return self.write(msg.topic, msg.data, msg.publisher_id, msg.seq, msg.log_seq or 0, flags)


# -- publishers ------------------------------------------------------------------------------------

_PROGRESS = struct.Struct("<I")  # a publisher's progress log: how many messages are out after each call


def read_progress(path: str | Path) -> int:
    """How many messages a publisher had published (its last progress record; 0 before any)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return 0
    whole = len(raw) - len(raw) % _PROGRESS.size
    return _PROGRESS.unpack_from(raw, whole - _PROGRESS.size)[0] if whole else 0


def publisher(
    bus: str,
    pub_no: int,
    topics: Sequence[str],
    count: int,
    seed: int,
    options: dict[str, Any],
    control: str,
) -> None:
    """Publish messages n = 0..count-1 (payload(pub_no, n)) on random topics once ``go`` exists.

    Options: ``capacity`` (its ring), ``batch`` (probability of a publish_many of 2..16 messages),
    ``pause`` (probability of a sleep of up to ``pause_s`` after a call: the stream spreads out in
    time so that faults land in the middle of it), ``short`` (probability that a single publish
    uses a short timeout; one that raises RouterUnavailable or Full is retried: the test then
    checks that it published nothing, from the sequence numbers).

    Writes ``ready`` (publisher_id) once connected, appends its progress to ``published`` after each
    call, and after the last message waits for ``finish`` and a router (a publisher closed while no
    router runs drops what its ring holds, by design; that is not what these tests are about), then
    closes with a linger and writes ``result``: (publisher_id, [(n, topic number, seq), ...] in
    publish order, {exception name: how many publishes raised it and were retried}).
    """
    ctl = Path(control)
    rng = random.Random(seed)
    progress = os.open(ctl / "published", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    records: list[tuple[int, int, int]] = []
    retried: dict[str, int] = {}
    with shmq.Publisher(bus, capacity=options.get("capacity", 1 << 16), connect_timeout=OP_TIMEOUT) as pub:
        dump(str(ctl / "ready"), pub.publisher_id)
        if not wait_until(lambda: (ctl / "go").exists(), OP_TIMEOUT, interval=0.002):
            raise TimeoutError("no go")
        n = 0
        while n < count:
            topic_no = rng.randrange(len(topics))
            topic = topics[topic_no]
            if rng.random() < options.get("batch", 0.2):
                size = min(count - n, rng.randint(2, 16))
                last = pub.publish_many(
                    topic, [payload(pub_no, m) for m in range(n, n + size)], timeout=OP_TIMEOUT
                )
                records.extend((n + i, topic_no, last - size + 1 + i) for i in range(size))
                n += size
            else:
                deadline = time.monotonic() + OP_TIMEOUT
                while True:
                    short = rng.random() < options.get("short", 0.0)
                    timeout = rng.choice([0.0, 0.001, 0.02]) if short else OP_TIMEOUT
                    try:
                        seq = pub.publish(topic, payload(pub_no, n), timeout=timeout)
                        break
                    except (shmq.RouterUnavailable, shmq.Full) as exc:
                        if not short or time.monotonic() > deadline:
                            raise
                        retried[type(exc).__name__] = retried.get(type(exc).__name__, 0) + 1
                        time.sleep(0.001)
                records.append((n, topic_no, seq))
                n += 1
            os.write(progress, _PROGRESS.pack(n))
            if rng.random() < options.get("pause", 0.1):
                time.sleep(rng.uniform(0, options.get("pause_s", 0.004)))
        if not wait_until(lambda: (ctl / "finish").exists(), 2 * OP_TIMEOUT, interval=0.005):
            raise TimeoutError("no finish")
        if not wait_until(lambda: pub.connected, OP_TIMEOUT, interval=0.005):
            raise TimeoutError("no router to take the last messages")
        if not pub.flush(OP_TIMEOUT):
            raise TimeoutError(f"the router did not take the last {pub.stats().depth_messages} messages")
        publisher_id = pub.publisher_id
    dump(str(ctl / "result"), (publisher_id, records, retried))


# -- receivers -------------------------------------------------------------------------------------


def receiver(
    bus: str,
    patterns: str | list[str],
    options: dict[str, Any],
    topics: Sequence[str],
    seed: int,
    control: str,
    ack: bool = False,
) -> None:
    """Subscribe, then log every message received, with recv and recv_many (random batch sizes);
    with `ack` (a durable subscription), acknowledge each one after logging it.

    Writes ``ready`` (pid, ring name) once subscribed. Stops when ``count`` exists and that many
    distinct messages came (duplicates do not count: a router restart may deliver some twice), or
    when ``stop`` exists and nothing came for GRACE_S; then listens GRACE_S longer, so that extra
    or duplicated messages show, and writes ``result``: its own final SubscriberStats."""
    ctl = Path(control)
    rng = random.Random(seed)
    log = _Log(ctl / "log", topics)
    with shmq.Subscriber(bus, patterns, connect_timeout=OP_TIMEOUT, **options) as sub:
        dump(str(ctl / "ready"), (os.getpid(), sub.ring_name))
        seen: set[tuple[int, int]] = set()
        target: int | None = None
        deadline = time.monotonic() + 3 * OP_TIMEOUT
        while True:
            if target is None and (ctl / "count").exists():
                target = load(str(ctl / "count"))
            if target is not None and len(seen) >= target:
                break
            stopping = (ctl / "stop").exists()  # read before the receive that finds the ring empty
            if time.monotonic() > deadline:
                raise TimeoutError(f"received {len(seen)} distinct messages, expected {target}")
            if rng.random() < 0.5:
                msgs = sub.recv_many(rng.choice([1, 7, 64, 1024]), timeout=GRACE_S if stopping else 0.05)
            else:
                try:
                    msgs = [sub.recv(timeout=GRACE_S if stopping else 0.05)]
                except shmq.Empty:
                    msgs = []
            if not msgs and stopping:
                break
            for msg in msgs:
                seen.add(log.message(msg))
                if ack and msg.log_seq:
                    msg.ack()  # (after the log write: what is acknowledged is in the log)
        for msg in sub.recv_many(1024, timeout=GRACE_S):
            log.message(msg)
        dump(str(ctl / "result"), sub.stats())


_MSG = struct.Struct("<IHHIIQQQ")  # the message header in a ring frame (docs/ARCHITECTURE.md)


def group_member(
    bus: str,
    pattern: str,
    group: str,
    options: dict[str, Any],
    topics: Sequence[str],
    seed: int,
    view: bool,
    control: str,
) -> None:
    """A queue group member logging every message it gets, until ``done`` exists and its ring is
    empty.

    With `view`, it reads its ring's frames in place (``get_view`` on the subscriber's ring,
    decoding the message header itself) and logs each message **before** the frame is released:
    whatever its ring gave up is in its log, so a SIGKILL at any moment loses nothing from the
    test's accounting, and a message logged and not yet released when it died is the one that
    the router may deliver again to another member. (With recv, a kill between the release and
    the log write would make a message look lost: the public API has no log-then-release.)
    Sometimes it dawdles inside the view, to widen that window."""
    ctl = Path(control)
    rng = random.Random(seed)
    log = _Log(ctl / "log", topics)
    with shmq.Subscriber(bus, pattern, group=group, connect_timeout=OP_TIMEOUT, **options) as sub:
        dump(str(ctl / "ready"), (os.getpid(), sub.ring_name))
        deadline = time.monotonic() + 3 * OP_TIMEOUT
        while time.monotonic() < deadline:
            done = (ctl / "done").exists()  # read before the receive that finds the ring empty
            if view:
                try:
                    slot = sub._ring.get_view(timeout=0.05)
                except shmq.Empty:
                    if done:
                        return
                    continue
                with slot as frame:
                    _, topic_len, headers_len, publisher_id, flags, seq, _, log_seq = _MSG.unpack_from(
                        frame, 0
                    )
                    start = _MSG.size
                    topic = bytes(frame[start : start + topic_len]).decode()
                    data = bytes(frame[start + topic_len + headers_len :])  # (no export left at exit)
                    log.write(topic, data, publisher_id, seq, log_seq, (flags & 1) * F_LAST_VALUE)
                    if rng.random() < 0.05:
                        time.sleep(rng.uniform(0, 0.002))
            else:
                msgs = sub.recv_many(rng.choice([1, 16, 256]), timeout=0.05)
                if not msgs and done:
                    return
                for msg in msgs:
                    log.message(msg)
        raise TimeoutError("the done flag never appeared")


def hello_then_die(bus: str, role: str, control: str) -> None:
    """Become a Publisher or Subscriber, and die (SIGKILL, by its own hand) right after sending its
    hello to the router, before the answer: a client killed in the middle of its constructor. (The
    only way to put the death exactly there: wrap the control socket's send.)"""
    from shmq import _bus

    send = _bus.LineSocket.send

    def send_then_die(self: _bus.LineSocket, message: dict[str, Any]) -> None:
        send(self, message)
        if message.get("op") == "hello":
            os.kill(os.getpid(), signal.SIGKILL)

    _bus.LineSocket.send = send_then_die  # type: ignore[method-assign]
    if role == "publisher":
        shmq.Publisher(bus, connect_timeout=OP_TIMEOUT)
    else:
        shmq.Subscriber(bus, "x.>", connect_timeout=OP_TIMEOUT)
    raise AssertionError("still alive after its hello")
