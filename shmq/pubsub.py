"""`Publisher` and `Subscriber`: the client side of a bus (the router is shmq/router.py).

Each client owns one ring: a publisher writes its messages into its ring and the router reads
them; the router writes a subscriber's messages into the subscriber's ring. The hot calls
(`publish`, `publish_many`, `recv`, `recv_many`) are native methods of the base classes
(shmq/_native/_pubsub.c); this module adds what is not hot: the control connection to the
router (hello, liveness, reconnection), validation, statistics, iteration and asyncio.

The control connection is watched by a daemon thread per client that blocks on the socket: when
the router goes away (stopped, crashed) the thread sees EOF at once, marks the client
disconnected, and reconnects with back-off until a router is back, saying hello again with the
same ring, so whatever is queued in the rings survives the restart.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from shmq import _bus, _durable
from shmq._async import RingWaiter
from shmq._bus import POLICIES, PublisherStats, SubscriberStats, validate_bus
from shmq._errors import (
    ArgumentTypeError,
    Closed,
    Empty,
    Full,
    InvalidArgument,
    LogWriteError,
    NotDurable,
    NotFound,
    PermissionDenied,
    RouterUnavailable,
    ShmqError,
)
from shmq._native import _ring
from shmq._segment import Segment, set_mode, validate_mode
from shmq._wire import encode_headers
from shmq.acl import first_match
from shmq.filters import compile_filter
from shmq.latency import LatencyRecorder
from shmq.queue import DEFAULT_CAPACITY, WAITS, Kind, Queue, Wait, _check_capacity
from shmq.topics import matches, validate_pattern, validate_topic

__all__ = ["Message", "Publisher", "Subscriber"]

from shmq._native._ring import Message

log = logging.getLogger("shmq.pubsub")

DEFAULT_CONNECT_TIMEOUT = 5.0
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.01, 0.1


class _Link:
    """The control connection of one client: hello, then liveness, then reconnection."""

    def __init__(self, bus: str, hello: dict[str, Any], on_connect: Any, on_disconnect: Any) -> None:
        self.bus = bus
        self.hello = {**hello, "version": _bus.PROTOCOL_VERSION}
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.generation = 0  # connections made so far
        self.refusal: ShmqError | None = None  # why the last router refused us on reconnect
        self._sock: _bus.LineSocket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def open(self, timeout: float | None) -> None:
        """Connect now (waiting up to `timeout` for a router), then watch in the background."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _BACKOFF_MIN_S
        while True:
            try:
                self._handshake(timeout=5.0)
                break
            except ShmqError:
                raise  # the router answered and refused: retrying would get the same answer
            except (OSError, ConnectionError):
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise RouterUnavailable(
                        f"no router is serving bus {self.bus!r}; start one with `shmq router {self.bus}` "
                        f"or shmq.Router({self.bus!r}).start()"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
        self._thread = threading.Thread(target=self._watch, name=f"shmq-link-{self.bus}", daemon=True)
        self._thread.start()

    def _handshake(self, timeout: float) -> None:
        sock = _bus.connect(self.bus, timeout)
        try:
            sock.send(self.hello)
            reply = sock.receive()
        except BaseException:
            sock.close()
            raise
        if reply is None:
            sock.close()
            raise ConnectionError("the router closed the connection during hello")
        if not reply.get("ok"):
            sock.close()
            raise _bus.error_from_reply(reply)
        sock.sock.settimeout(None)
        with self._lock:
            if self.closed.is_set():
                sock.close()
                raise Closed("closed")
            self._sock = sock
        self.on_connect(reply)
        self.generation += 1
        self.connected.set()

    def _watch(self) -> None:
        while not self.closed.is_set():
            sock = self._sock
            try:
                while sock is not None:
                    message = sock.receive()
                    if message is None:
                        break
                    if message.get("op") == "error":
                        log.error("bus %r: the router says: %s", self.bus, message.get("message"))
            except (OSError, ValueError, ConnectionError):
                pass
            self.connected.clear()
            with self._lock:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
            if self.closed.is_set():
                return
            self.on_disconnect()
            log.info("bus %r: router gone; reconnecting", self.bus)
            delay = _BACKOFF_MIN_S
            while not self.closed.is_set():
                try:
                    self._handshake(timeout=5.0)
                    self.refusal = None
                    log.info("bus %r: reconnected", self.bus)
                    break
                except Closed:
                    return
                except ShmqError as exc:
                    # Kept for the calls that wait for a router: they say this, not "no router".
                    self.refusal = exc
                    log.warning("bus %r: the router refused us on reconnect: %s", self.bus, exc)
                except (OSError, ConnectionError):
                    pass
                self.closed.wait(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)

    def wait_connected(self, deadline_ns: int) -> bool:
        """Wait until connected; deadline_ns as time.monotonic_ns() (-1 forever, 0 no wait)."""
        if self.connected.is_set():
            return True
        if deadline_ns == 0:
            return False
        while not self.closed.is_set():
            if self.refusal is not None:
                return False  # a router is there and said no: the caller says why, at once
            left = None if deadline_ns < 0 else (deadline_ns - time.monotonic_ns()) / 1e9
            if left is not None and left <= 0:
                return self.connected.is_set()
            if self.connected.wait(0.1 if left is None else min(left, 0.1)):
                return True
        return False

    def close(self) -> None:
        self.closed.set()
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.sock.shutdown(2)
            sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)


class _Client(abc.ABC):
    """What Publisher and Subscriber share: the ring, the bus segment, the link."""

    _bus: str
    _slot: int
    _ring: Queue
    _link: _Link
    _bus_segment: Segment | None

    def _map_bus(self, reply: dict[str, Any]) -> Segment:
        old = self._bus_segment
        segment = _bus.open_bus_segment(self.bus)
        self._bus_segment = segment
        self._slot = int(reply["slot"])
        if old is not None:
            old.close()
        return segment

    def _unmap_bus(self) -> None:
        segment, self._bus_segment = self._bus_segment, None
        if segment is not None:
            segment.close()

    @property
    def bus(self) -> str:
        return self._bus

    @property
    def ring_name(self) -> str:
        return self._ring.name

    @property
    def connected(self) -> bool:
        return self._link.connected.is_set()

    @property
    def closed(self) -> bool:
        return self._link.closed.is_set()

    @abc.abstractmethod
    def close(self) -> None:
        """Leave the bus (Publisher and Subscriber say what else)."""

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _state(self) -> str:
        return "closed" if self.closed else ("connected" if self.connected else "waiting for the router")

    def _release_ring(self) -> None:
        """Unmap the bus segment, close and remove our ring (the router may have removed it)."""
        self._unmap_bus()
        self._ring.close()
        with contextlib.suppress(NotFound):
            self._ring.unlink()

    def _check_open(self) -> None:
        if self._link.closed.is_set():
            raise Closed(f"this {type(self).__name__.lower()} of bus {self._bus!r} is closed")


def _random_id() -> int:
    return random.getrandbits(32) or 1


class Publisher(_ring.PublisherCore, _Client):
    """Publishes messages on a bus: ``seq = pub.publish("md.XNAS.AAPL", data, headers={...})``.

    `data` is any C-contiguous buffer (bytes, bytearray, memoryview, numpy array). `headers` is a
    dict of str to str/int/float/bool that subscribers' ``where=`` filters test. Each message gets
    `timestamp_ns` (``time.monotonic_ns()`` at publish) and `seq`, numbered from 1 per publisher and
    topic (so a subscriber can spot a gap from one publisher; several publishers of one topic each
    count their own).

    ``publish`` waits up to `timeout` (None: forever) when the publisher's ring is full, which
    happens when a subscriber with ``on_full="block"`` is behind (back-pressure), and raises
    `Full` then; during a router outage it waits for the router to come back and raises
    `RouterUnavailable` at the timeout. `capacity` is the publisher's ring size in bytes.

    Use one Publisher from several threads if you like (its ring takes several producers); close
    it (or use ``with``) to wait until the router took everything (``linger``) and free the ring.

    On a router with an ACL (shmq/acl.py), publishing on a topic the ACL refuses this user raises
    `PermissionDenied` naming the topic and the rule, and nothing is written. `mode` is the ring's
    permission bits (default 0o600); a router running as another user needs e.g. 0o660 or 0o666.
    """

    def __init__(
        self,
        bus: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        wait: Wait = "adaptive",
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        mode: int = 0o600,
    ) -> None:
        self._bus = validate_bus(bus)
        if not isinstance(wait, str) or wait not in WAITS:
            raise InvalidArgument(f"wait must be one of {', '.join(WAITS)}, got {wait!r}")
        _check_capacity(capacity)
        validate_mode(mode)
        self._bus_segment = None
        self._slot = -1
        # (allows, pattern, which rule) for this user from the router's ACL; None: no ACL
        self._publish_rules: list[tuple[bool, str, str]] | None = None
        self._forgotten: dict[str, int] = {}  # topics a router's ACL refused: their last seq
        self._acl_source = ""
        ring = Queue(_bus.client_ring_name(bus, "p"), create=True, kind="mpsc", capacity=capacity, wait=wait)
        self._publisher_id = _random_id()
        try:
            set_mode(ring.name, mode)
            super().__init__(ring, self._publisher_id)
            self._ring = ring
            self._link = _Link(
                bus,
                {
                    "op": "hello",
                    "role": "publisher",
                    "ring": ring.name,
                    "pid": _pid(),
                    "publisher_id": self.publisher_id,
                },
                self._connected,
                self._disconnected,
            )
            self._link.open(connect_timeout)
        except BaseException:
            ring.close()
            ring.unlink()
            raise

    @property
    def publisher_id(self) -> int:
        """The id every message of this publisher carries (`Message.publisher_id`)."""
        return self._publisher_id

    # -- called by the native half -----------------------------------------------------------

    def _prepare(self, topic: str, deadline_ns: int) -> None:
        """Register a new topic, and wait for a router if there is none right now.

        The native publish calls this only for a topic it has not seen, or while disconnected,
        so the ACL check here costs nothing on the hot path."""
        self._check_open()
        validate_topic(topic)
        if not self.connected and not self._link.wait_connected(deadline_ns):
            self._check_open()
            self._raise_refusal()
            raise RouterUnavailable(
                f"no router is serving bus {self._bus!r} (waited for it to come back); start one with "
                f"`shmq router {self._bus}`; nothing was published"
            )
        self._check_permission(topic)
        # (a topic forgotten under a stricter router goes on from its last seq: seqs only grow)
        self._add_topic(topic, self._forgotten.pop(topic, 0))

    def _publish_refusal(self, topic: str) -> str | None:
        """Why the router's ACL refuses us `topic` (first matching rule); None if it does not."""
        rules = self._publish_rules
        if rules is None:
            return None
        found = first_match(rules, topic)
        if found is None:
            return (
                f"publishing on {topic!r} is not allowed on bus {self._bus!r}: no rule in "
                f"{self._acl_source} allows this user to publish on it; ask for an 'allow publish' rule; "
                "nothing was published"
            )
        allowed, rule = found
        if not allowed:
            return f"publishing on {topic!r} is denied by {rule} (bus {self._bus!r}); nothing was published"
        return None

    def _check_permission(self, topic: str) -> None:
        refusal = self._publish_refusal(topic)
        if refusal is not None:
            raise PermissionDenied(refusal)

    def _raise_refusal(self) -> None:
        """Raise what the router said when it refused us on reconnect, if it did."""
        refusal = self._link.refusal
        if refusal is not None:
            raise refusal.with_traceback(None)  # (the same object each time: no growing traceback)

    def _timed_out(self, nbytes: int) -> None:
        if not self.connected:
            self._raise_refusal()
            raise RouterUnavailable(
                f"no router is serving bus {self._bus!r} and this publisher's ring is full; start one "
                f"with `shmq router {self._bus}`; nothing was published"
            )
        raise Full(
            f"publisher ring of bus {self._bus!r} stayed full for the timeout: a subscriber with "
            "on_full='block' is behind (back-pressure); wait longer, let it catch up, or subscribe "
            "it with a dropping policy"
        )

    def _encode_headers(self, headers: Any) -> bytes:
        return encode_headers(headers)

    def _connected(self, reply: dict[str, Any]) -> None:
        rules = reply.get("publish_rules")
        self._acl_source = str(reply.get("acl_source", ""))
        self._publish_rules = (
            None
            if rules is None
            else [(bool(allow), str(pattern), str(rule)) for allow, pattern, rule in rules]
        )
        if self._publish_rules is not None:
            # Topics used under an earlier router are known to the native publish, which then
            # does not ask _prepare again: forget the ones this router's rules refuse, so that
            # publishing on them raises PermissionDenied instead of being dropped by the router.
            for topic, seq in self._last_seqs().items():
                if self._publish_refusal(topic) is not None:
                    self._forgotten[topic] = seq
                    self._forget_topic(topic)
        segment = self._map_bus(reply)
        self._set_bus(segment.mapping)
        durable = tuple(reply.get("durable", ()))
        if durable and reply.get("fsync") == "always":
            # Only then does publish wait for the disk; otherwise it stays the native call.
            self._durable_patterns = durable
            self._durable_cache: dict[str, bool] = {}
            self.publish = self._publish_durable  # type: ignore[method-assign]
            self.publish_many = self._publish_many_durable  # type: ignore[method-assign]
        else:
            self.__dict__.pop("publish", None)
            self.__dict__.pop("publish_many", None)

    def _is_durable(self, topic: str) -> bool:
        known = self._durable_cache.get(topic)
        if known is None:
            known = self._durable_cache[topic] = any(matches(p, topic) for p in self._durable_patterns)
        return known

    def _publish_durable(
        self, topic: str, data: Any, headers: Any = None, timeout: float | None = None
    ) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        seq = int(_ring.PublisherCore.publish(self, topic, data, headers, timeout))
        if self._is_durable(topic):
            self._await_disk(deadline)
        return seq

    def _publish_many_durable(
        self, topic: str, messages: Any, headers: Any = None, timeout: float | None = None
    ) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        seq = int(_ring.PublisherCore.publish_many(self, topic, messages, headers, timeout))
        if self._is_durable(topic):
            self._await_disk(deadline)
        return seq

    def _await_disk(self, deadline: float | None) -> None:
        """fsync="always": return once the router says our ring is on disk up to our last message."""
        pos = self._last_end()
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            segment = self._bus_segment
            if segment is None or self._slot < 0:
                if not self._link.wait_connected(
                    time.monotonic_ns() + int((0.1 if left is None else min(left, 0.1)) * 1e9)
                ):
                    self._check_open()
                continue
            off = _bus.u64(segment.mapping, _bus.OFF_PUBLISHERS) + self._slot * _bus.PUBLISHER_SLOT
            if self._wait_durable(pos, off, 0.1 if left is None else min(left, 0.1)):
                return
            self._check_open()
        segment = self._bus_segment
        errno = _bus.u32(segment.mapping, _bus.OFF_LOG_ERROR) if segment is not None else 0
        if errno:
            raise LogWriteError(
                errno,
                f"bus {self._bus!r}: the router cannot write its durable log ({os.strerror(errno)}); the "
                "message is queued and will be written once it can: free disk space (or raise the "
                "limit) on the router's data directory",
            )
        raise NotDurable(
            f"bus {self._bus!r}: the message was published, but the router did not confirm it on disk "
            "within the timeout; it stays queued. Publish with a longer timeout, or check the router"
        )

    def _disconnected(self) -> None:
        self._set_bus(None)
        self._unmap_bus()

    # -- lifecycle ---------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the router has taken everything published so far; False at the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._ring.qsize() > 0:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.0005)
        return True

    def close(self, linger: float | None = 5.0) -> None:
        """Wait up to `linger` seconds for the router to take what is queued, then detach."""
        if self._link.closed.is_set():
            return
        left = 0 if not self.connected else linger
        if not self.flush(left) or self._ring.qsize():
            log.warning(
                "bus %r: closing a publisher with %d messages the router has not taken; they are lost",
                self._bus,
                self._ring.qsize(),
            )
        self._link.close()
        self._set_bus(None)
        self._release_ring()

    def __enter__(self) -> Publisher:
        return self

    def __repr__(self) -> str:
        return f"<shmq.Publisher bus={self._bus!r} id={self.publisher_id} {self._state()}>"

    def stats(self) -> PublisherStats:
        """This publisher's counters: its ring, and what the router took from it."""
        self._check_open()
        counters = self._ring._counters()
        segment = self._bus_segment
        routed = routed_bytes = stalls = 0
        if segment is not None and self._slot >= 0:
            slot = _bus.read_publisher(
                self._bus,
                segment.mapping,
                _bus.u64(segment.mapping, _bus.OFF_PUBLISHERS) + self._slot * _bus.PUBLISHER_SLOT,
            )
            routed, routed_bytes, stalls = slot.routed, slot.routed_bytes, slot.stalls
        return PublisherStats(
            bus=self._bus,
            publisher_id=self.publisher_id,
            pid=_pid(),
            ring=self._ring.name,
            state="live" if self.connected else "disconnected",
            published=counters["messages_put"],
            routed=routed,
            routed_bytes=routed_bytes,
            depth_messages=counters["depth_messages"],
            depth_bytes=counters["depth_bytes"],
            stalls=stalls,
            uid=os.geteuid(),
            gid=os.getegid(),
        )

    def last_seqs(self) -> dict[str, int]:
        """The last sequence number published on each topic."""
        return {**self._forgotten, **self._last_seqs()}


def _pid() -> int:
    import os

    return os.getpid()


def _patterns(patterns: object) -> tuple[str, ...]:
    if isinstance(patterns, str):
        return (validate_pattern(patterns),)
    if isinstance(patterns, (bytes, bytearray, memoryview)) or not isinstance(patterns, Iterable):
        raise ArgumentTypeError(f"patterns must be a str or a list of str, got {type(patterns).__name__}")
    out = tuple(validate_pattern(p) for p in patterns)
    if not out:
        raise InvalidArgument("a subscriber needs at least one pattern")
    return out


def _start(start: object) -> Any:
    """start= as the router takes it: "earliest", "latest", a log seq, or {"time_ns": ...}."""
    if start is None or start in ("earliest", "latest"):
        return start
    if isinstance(start, datetime.datetime):
        return {"time_ns": int(start.timestamp() * 1_000_000) * 1000}
    if isinstance(start, bool) or not isinstance(start, int):
        raise ArgumentTypeError(
            f"start must be 'earliest', 'latest', a log sequence (int) or a datetime, got {start!r}"
        )
    if start < 1:
        raise InvalidArgument(f"start must be a log sequence from 1, got {start}")
    return start


def _group(group: object) -> str | None:
    if group is None:
        return None
    if not isinstance(group, str):
        raise ArgumentTypeError(f"group must be a str or None, got {type(group).__name__}")
    if not group or len(group) > 100 or not group.isprintable():
        raise InvalidArgument(f"group must be 1 to 100 printable characters, got {group!r}")
    return group


class Subscriber(_ring.SubscriberCore, _Client):
    """Receives the messages of a bus whose topics match `patterns` (a str or a list of them).

    ``where=`` filters on headers (see shmq.filters; evaluated in the router). ``group=``: the
    subscribers sharing a group name (with the same patterns and filter) share the messages, each
    going to one member; when a member leaves or dies, what was queued for it goes to the others.
    ``on_full`` is what the router does when this subscriber's ring is full: ``"block"`` (wait:
    back-pressure on the publishers, lossless), ``"drop"`` (drop new messages for this subscriber),
    ``"drop_oldest"`` (drop the oldest queued ones), ``"conflate"`` (keep only the newest message
    per topic until there is room). Drops are counted in `stats()`. ``last_value=True`` first
    delivers the newest message of every matching topic the router has seen.

    Persistence (a router with a data directory and durable topics): ``on_full="spill"`` spills
    what does not fit to a file (up to `max_spill_bytes`) and feeds it back in order, losing
    nothing. ``start=`` replays durable topics from the log: "earliest", "latest", a log sequence
    (`Message.log_seq`) or a `datetime`, then goes on live with no gap or duplicate at the seam.
    ``durable="name"`` keeps the subscription's position in the router's data directory: after a
    crash, a new Subscriber with the same name resumes after the last message acknowledged with
    ``msg.ack()`` / ``sub.ack(msg)`` (cumulative); unacknowledged ones come again with
    ``msg.redelivered`` True (at-least-once).

    On a router with an ACL (shmq/acl.py), every pattern must be allowed to this user (a rule's
    pattern must cover it entirely), else the constructor raises `PermissionDenied` naming the
    pattern and the rule. `mode` is the ring's permission bits (default 0o600).

    ``record_latency=True`` records, for every message received, the time from its publish to its
    receipt (ns, on the publisher's CLOCK_MONOTONIC stamp) in `sub.latency`, a
    `shmq.LatencyRecorder` (~30 ns a message, in C). The recorder lives in shared memory while
    the subscriber does, named after its ring (``record_latency="name"`` picks the name): other
    processes open it with ``shmq.LatencyRecorder(sub.latency.name)``, and ``shmq top`` and
    ``shmq stat`` show its percentiles.

    ``recv(timeout=None)`` returns a `Message` and raises `Empty` at the timeout;
    ``recv_many`` returns a list ([] at the timeout); iterating blocks and ends when the
    subscriber is closed; ``recv_async`` / ``aiter()`` are for asyncio.
    """

    def __init__(
        self,
        bus: str,
        patterns: str | Iterable[str],
        *,
        where: str | None = None,
        group: str | None = None,
        on_full: str = "block",
        capacity: int = DEFAULT_CAPACITY,
        last_value: bool = False,
        start: str | int | datetime.datetime | None = None,
        durable: str | None = None,
        max_spill_bytes: int | None = None,
        wait: Wait = "adaptive",
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        mode: int = 0o600,
        record_latency: bool | str = False,
    ) -> None:
        if not isinstance(record_latency, (bool, str)) or record_latency == "":
            raise ArgumentTypeError(
                "record_latency is True (a recorder of this process) or a name (a recorder other "
                f"processes can read), got {record_latency!r}"
            )
        self._bus = validate_bus(bus)
        self.patterns = _patterns(patterns)
        validate_mode(mode)
        self.durable = None if durable is None else _durable.validate_durable_name(durable)
        wire_start = _start(start)
        if max_spill_bytes is not None:
            if isinstance(max_spill_bytes, bool) or not isinstance(max_spill_bytes, int):
                raise ArgumentTypeError(
                    f"max_spill_bytes must be an int, got {type(max_spill_bytes).__name__}"
                )
            if max_spill_bytes < 1 or on_full != "spill":
                raise InvalidArgument("max_spill_bytes is a positive int, and only for on_full='spill'")
        if (start is not None or durable is not None) and group is not None:
            raise InvalidArgument("start= and durable= cannot be used with group=")
        self._durable_state: _durable.DurableState | None = None
        self.where = None if where is None else str(compile_filter(where))  # canonical text
        self.group = _group(group)
        if not isinstance(on_full, str) or on_full not in POLICIES:
            raise InvalidArgument(f"on_full must be one of {', '.join(POLICIES)}, got {on_full!r}")
        if self.group is not None and on_full not in ("block", "drop"):
            raise InvalidArgument(
                f"on_full={on_full!r} cannot be used with group=: a queue group shares messages between "
                "members, so it takes 'block' (lossless) or 'drop'"
            )
        if self.durable is not None and on_full != "block":
            raise InvalidArgument(
                "a durable subscription is fed from the log, which waits for it: it takes on_full='block'"
            )
        if not isinstance(wait, str) or wait not in WAITS:
            raise InvalidArgument(f"wait must be one of {', '.join(WAITS)}, got {wait!r}")
        _check_capacity(capacity)
        self.on_full = on_full
        self.last_value = bool(last_value)
        self._bus_segment = None
        self._slot = -1
        self._waiter: RingWaiter | None = None
        kind: Kind = (
            "mpmc" if on_full == "drop_oldest" else "spsc"
        )  # drop_oldest: the router takes from it too
        ring = Queue(_bus.client_ring_name(bus, "s"), create=True, kind=kind, capacity=capacity, wait=wait)
        try:
            set_mode(ring.name, mode)
            super().__init__(ring)
            self._ring = ring
            hello = {
                "op": "hello",
                "role": "subscriber",
                "ring": ring.name,
                "pid": _pid(),
                "patterns": list(self.patterns),
                "where": self.where,
                "group": self.group,
                "on_full": on_full,
                "last_value": self.last_value,
                "start": wire_start,
                "durable": self.durable,
                "max_spill_bytes": max_spill_bytes,
            }
            #: publish-to-receive latency of every message received, with record_latency
            self.latency: LatencyRecorder | None = None
            if record_latency:
                # Always in shared memory, so that shmq top and stat can show its percentiles;
                # record_latency=True names it after the ring.
                named = record_latency if isinstance(record_latency, str) else ring.name
                self.latency = LatencyRecorder(named, create=True, mode=mode)
                self._set_latency(self.latency._hist)
                hello["latency"] = named
            self._link = _Link(bus, hello, self._sub_connected, self._sub_disconnected)
            self._link.open(connect_timeout)
            self._link.hello["last_value"] = False  # after a router restart there is nothing to replay
        except BaseException:
            self._drop_latency()
            ring.close()
            ring.unlink()
            raise

    def _sub_connected(self, reply: dict[str, Any]) -> Segment:
        segment = self._map_bus(reply)
        path = reply.get("durable_state")
        if path is not None and self._durable_state is None:
            self._durable_state = _durable.DurableState(Path(path))
            self._set_acker(self._ack_seq)
        return segment

    def _sub_disconnected(self) -> None:
        # After a router restart a replaying subscriber goes on after what its ring got, not
        # from its start= again (durable subscriptions: the router knows from their state file).
        segment = self._bus_segment
        if segment is not None and self._slot >= 0 and self._link.hello.get("start") is not None:
            off = _bus.u64(segment.mapping, _bus.OFF_SUBSCRIBERS) + self._slot * _bus.SUBSCRIBER_SLOT
            last = _durable.last_delivered(
                _bus.u64(segment.mapping, off + _bus.SS_LOG_SEQ),
                _bus.u64(segment.mapping, off + _bus.SS_INTENT_END),
                _bus.u64(segment.mapping, off + _bus.SS_INTENT_SEQ),
                _bus.u64(self._ring._segment.mapping, _ring.OFF_TAIL_COMMIT),
            )
            if last:
                self._link.hello["start"] = last + 1
        self._unmap_bus()

    def _ack_seq(self, log_seq: int) -> None:
        if self._durable_state is None:
            raise InvalidArgument("only a durable subscription (durable=name) acknowledges messages")
        if not log_seq:
            raise InvalidArgument("this message is not from the durable log (it has no log_seq)")
        self._durable_state.ack(int(log_seq))

    def ack(self, message: Message) -> None:
        """Acknowledge `message` and every message before it (durable subscriptions)."""
        if not isinstance(message, Message):
            raise ArgumentTypeError(f"ack() takes a Message, got {type(message).__name__}")
        self._check_open()
        self._ack_seq(message.log_seq or 0)

    def __iter__(self) -> Iterator[Message]:
        """Every message, blocking between them; ends when the subscriber is closed."""
        while True:
            try:
                yield self.recv()
            except Closed:
                return

    async def recv_async(self, timeout: float | None = None) -> Message:
        """recv without blocking the event loop; raises Empty after `timeout` seconds.

        Cancellation-safe: a message is taken only when the coroutine is about to return it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            try:
                return self.recv(0)
            except Empty:
                if self._waiter is None:
                    self._waiter = RingWaiter(lambda _n, t: self._ring.wait_readable(t), self._ring.name)
                left = None if deadline is None else max(0.0, deadline - loop.time())
                if not await self._waiter.wait(0, left):
                    raise Empty(f"no message on bus {self._bus!r} within {timeout} s") from None

    async def aiter(self) -> AsyncIterator[Message]:
        """``async for msg in sub.aiter()``: ends when the subscriber is closed."""
        while True:
            try:
                yield await self.recv_async()
            except Closed:
                return

    def close(self) -> None:
        """Leave the bus. Messages queued for a group member go to the other members."""
        if self._link.closed.is_set():
            return
        self._link.close()
        if self._waiter is not None:
            self._waiter.close()
        self._set_acker(None)
        if self._durable_state is not None:
            self._durable_state.close()
            self._durable_state = None
        self._drop_latency()
        self._release_ring()

    def _drop_latency(self) -> None:
        # The recorder stays readable here (sub.latency.summary() after the with-block); a named
        # one loses its name, as the subscriber's ring does.
        self._set_latency(None)
        latency = getattr(self, "latency", None)
        if latency is not None and latency.name is not None:
            with contextlib.suppress(NotFound):
                latency.unlink()

    def __enter__(self) -> Subscriber:
        return self

    def __repr__(self) -> str:
        return f"<shmq.Subscriber bus={self._bus!r} patterns={list(self.patterns)} {self._state()}>"

    def stats(self) -> SubscriberStats:
        """Delivered, received, dropped, filtered and pending counts, depth and lag."""
        self._check_open()
        segment = self._bus_segment
        if segment is None or self._slot < 0:
            counters = self._ring._counters()
            return SubscriberStats(
                bus=self._bus,
                subscriber_id=0,
                pid=_pid(),
                ring=self._ring.name,
                patterns=self.patterns,
                where=self.where,
                group=self.group,
                on_full=self.on_full,
                state="disconnected",
                capacity=self._ring.capacity,
                delivered=counters["messages_put"],
                delivered_bytes=counters["bytes_put"],
                received=counters["messages_got"],
                depth_messages=counters["depth_messages"],
                depth_bytes=counters["depth_bytes"],
                drops=0,
                too_large=0,
                filtered=0,
                pending=0,
                lag=counters["depth_messages"],
            )
        off = _bus.u64(segment.mapping, _bus.OFF_SUBSCRIBERS) + self._slot * _bus.SUBSCRIBER_SLOT
        return _bus.read_subscriber(self._bus, segment.mapping, off, live_ring=self._ring)
