"""The topic router: `Router` (a child process you start from Python), `serve` (the router itself).

One router serves one bus. Its two halves run in two threads:

* the **control plane** (this module, the main thread): a Unix socket where publishers and
  subscribers say hello, the subscription table (a `TopicIndex`), queue groups, and housekeeping
  every 100 ms (ring depths into the bus segment, rings of gone clients drained and removed);
* the **data plane** (`_ring.Forwarder`, C, its own thread with the GIL released): reads every
  publisher ring, finds each message's route by an array index, evaluates filters, and copies the
  message into each subscriber ring, applying the `on_full` policies. It comes back to Python only
  when a publisher uses a topic for the first time (to compute that topic's route) or a ring is
  damaged.

Routes are recomputed in Python when subscriptions change and handed to the forwarder as whole
replacements; the forwarder never waits for Python while messages flow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shmq import _attach, _bus, _durable
from shmq._bus import (
    OFF_GENERATION,
    OFF_HEARTBEAT_NS,
    OFF_MAGIC,
    OFF_MAX_PUBLISHERS,
    OFF_MAX_SUBSCRIBERS,
    OFF_MAX_TOPICS,
    OFF_PUBLISHERS,
    OFF_ROUTER_PID,
    OFF_STARTED_NS,
    OFF_STATE,
    OFF_SUBSCRIBERS,
    OFF_TOPICS,
    OFF_TOPICS_UNTRACKED,
    OFF_TOPICS_USED,
    OFF_VERSION,
    POLICIES,
    PUBLISHER_SLOT,
    SLOT_CORRUPT,
    SLOT_DRAINING,
    SLOT_FREE,
    SLOT_LIVE,
    SUBSCRIBER_DESCRIPTION,
    SUBSCRIBER_DESCRIPTION_MAX,
    SUBSCRIBER_SLOT,
    TOPIC_SLOT,
    LineSocket,
    put_u32,
    put_u64,
    validate_bus,
)
from shmq._durable import DurableState, Persistence
from shmq._errors import (
    AlreadyExists,
    ArgumentTypeError,
    InvalidArgument,
    LogWriteError,
    NotFound,
    PermissionDenied,
    RouterUnavailable,
    ShmqError,
)
from shmq._native import _ring
from shmq._segment import (
    SEGMENT_PREFIX,
    SHM_DIR,
    Segment,
    segment_path,
    set_mode,
    validate_mode,
    validate_name,
)
from shmq._wire import encode_filter
from shmq.acl import Acl, PeerCredentials, default_admits, peer_credentials
from shmq.filters import compile_filter
from shmq.queue import WAITS
from shmq.topics import TopicIndex, matches, validate_pattern, validate_topic

__all__ = ["Router", "serve"]

log = logging.getLogger("shmq.router")

HOUSEKEEPING_S = 0.1
RUN_SLICE_S = 0.25
RECONNECT_GRACE_S = 3.0


@dataclass
class _Publisher:
    id: int
    slot: int
    pid: int
    ring_name: str
    publisher_id: int
    segment: Segment
    link: LineSocket | None
    gone: bool = False  # its connection ended: drain its ring, then forget it
    corrupt: bool = False  # isolated: its ring is not read any more
    peer: PeerCredentials | None = None  # as the kernel reported them at connect


@dataclass
class _Subscriber:
    id: int
    slot: int
    pid: int
    ring_name: str
    patterns: tuple[str, ...]
    where: str | None
    program: bytes | None
    group: str | None
    on_full: str
    segment: Segment
    link: LineSocket | None
    capacity: int
    log_fed: bool = False  # fed from the durable log (start= or durable=), not by durable routes
    state: DurableState | None = None  # durable=: its state file
    durable_name: str | None = None
    spill_dir: Path | None = None
    spill_full_seen: int = 0
    peer: PeerCredentials | None = None  # as the kernel reported them at connect
    latency: str | None = None  # its LatencyRecorder's name (record_latency), for shmq top and stat


@dataclass
class _Group:
    """Subscribers sharing one group name, patterns and filter: each message goes to one of them."""

    key: tuple[str, tuple[str, ...], str | None]
    program: bytes | None
    on_full: str  # "block" or "drop", the same for every member
    members: list[int] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)  # redelivery inputs waiting for a member


@dataclass
class _Redelivery:
    """The ring of a group member that left, read by the router for the other members."""

    input_id: int
    segment: Segment
    ring_name: str
    group: tuple[str, tuple[str, ...], str | None]
    #: its subscriber slot, kept (state draining) until the ring is empty: a router that starts
    #: after this one died or stopped finds the ring there and redelivers what is left
    slot: int


class _RouterCore:
    """The router's state and both planes (runs inside the router's process)."""

    def __init__(
        self,
        bus: str,
        *,
        wait: str,
        spin_ns: int,
        max_publishers: int,
        max_subscribers: int,
        max_topics: int,
        last_value: bool,
        persistence: Persistence | None = None,
        acl: Acl | None = None,
        mode: int = 0o600,
    ) -> None:
        self.bus = bus
        self.acl = acl
        self.mode = mode
        self.owner_uid = os.geteuid()
        self.refused_topic_id: int | None = None  # the sink for topics the ACL refuses a publisher
        self.persistence = persistence or Persistence()
        self.wait_code = WAITS[wait]
        self.spin_ns = spin_ns
        self.max_publishers, self.max_subscribers, self.max_topics = (
            max_publishers,
            max_subscribers,
            max_topics,
        )
        self.keep_last = last_value
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.listener = self._bind()
        self.left_members: list[tuple[int, int, dict[str, Any]]] = []  # (see _create_bus_segment)
        try:
            self.segment = self._create_bus_segment()
        except BaseException:
            self.listener.close()
            raise
        self.forwarder = _ring.Forwarder(self.segment.mapping)
        self.data_dir: _durable.DataDir | None = None
        self.flusher: _durable.Flusher | None = None
        self.log_errors = 0
        self.next_retention = 0.0
        try:
            self._open_persistence()
        except BaseException:
            self.listener.close()
            del self.forwarder
            with contextlib.suppress(NotFound):
                Segment.unlink(self.segment.name)
            self.segment.close()
            raise
        self.publishers: dict[int, _Publisher] = {}
        self.subscribers: dict[int, _Subscriber] = {}
        self.groups: dict[tuple[str, tuple[str, ...], str | None], _Group] = {}
        self.redeliveries: dict[int, _Redelivery] = {}
        self.index: TopicIndex[Any] = TopicIndex()
        self.topics: dict[str, int] = {}  # topic -> router topic id
        self.topic_names: list[str] = []
        self.next_id = 1
        self.free_pub_slots = list(range(max_publishers - 1, -1, -1))
        self.free_sub_slots = list(range(max_subscribers - 1, -1, -1))
        self.selector = selectors.DefaultSelector()
        self.forward_thread: threading.Thread | None = None
        self.awaiting: set[str] = set()  # subscriber rings expected to reconnect (see serve)
        self.forward_error: BaseException | None = None
        self._adopt_left_members()

    # -- set-up and tear-down ------------------------------------------------------------------

    def _open_persistence(self) -> None:
        p = self.persistence
        spill_root = p.spill_root(self.bus)
        with contextlib.suppress(OSError):  # spill files of an earlier router of this bus: stale
            for entry in spill_root.iterdir():
                if entry.name.startswith(f"{self.bus}."):
                    shutil.rmtree(entry, ignore_errors=True)
        _ring.set_file_mode(self.mode)  # the log's and spill's files, made in C
        if p.data_dir is None:
            return
        self.data_dir = _durable.DataDir(p.data_dir, self.mode)
        try:
            info = self.forwarder.open_log(str(p.log_dir), p.segment_bytes, _durable.FSYNC_CODES[p.fsync])
        except OSError as exc:
            self.data_dir.close()
            raise LogWriteError(
                exc.errno or 0, f"cannot open the durable log: {exc.strerror or exc}"
            ) from None
        for segment, offset, length, truncated in info["damage"]:
            if truncated:
                log.warning(
                    "log %s: segment %020d: cut a torn or corrupt last record at offset %d (%d bytes)",
                    p.log_dir,
                    segment,
                    offset,
                    length,
                )
            elif length:
                log.warning(
                    "log %s: segment %020d: skipped %d damaged bytes at offset %d (later records are kept)",
                    p.log_dir,
                    segment,
                    length,
                    offset,
                )
            else:
                log.warning("log %s: segment %020d has a damaged header; it is skipped", p.log_dir, segment)
        log.info(
            "bus %r: durable log %s: records %d..%d, durable topics %s, fsync=%s",
            self.bus,
            p.log_dir,
            info["first_seq"],
            info["next_seq"] - 1,
            list(p.durable),
            p.fsync,
        )
        if p.fsync != "never":
            self.flusher = _durable.Flusher(self.forwarder, p.fsync, p.fsync_interval_ms, self._on_sync_error)
            self.flusher.start()

    def _on_sync_error(self, exc: OSError) -> None:
        put_u32(self.segment.mapping, _bus.OFF_LOG_ERROR, exc.errno or 5)
        log.error("bus %r: syncing the durable log failed: %s", self.bus, exc)

    def _durable_topic(self, topic: str) -> bool:
        return self.data_dir is not None and any(matches(p, topic) for p in self.persistence.durable)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(_bus.socket_address(self.bus))
        except OSError as exc:
            sock.close()
            if exc.errno == 98:  # EADDRINUSE: the kernel says a live process holds it
                raise AlreadyExists(
                    f"a router is already running on bus {self.bus!r}{_holder(self.bus)}; stop it first "
                    f"(Ctrl-C, or kill its pid), or pick another bus name"
                ) from None
            raise
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def _create_bus_segment(self) -> Segment:
        name = _bus.bus_segment_name(self.bus)
        # We hold the socket, so any bus segment already there was left by a router that died
        # (the socket is freed with its process; a live router would still hold it).
        with contextlib.suppress(NotFound, ShmqError):
            old = _bus.open_bus_segment(self.bus)
            pid, started = _bus.u64(old.mapping, OFF_ROUTER_PID), _bus.u64(old.mapping, OFF_STARTED_NS)
            self.left_members = _group_members_in(old.mapping)
            old.close()
            state = "alive?" if _bus.router_alive(pid, started) else "dead"
            log.warning("bus %r: replacing the bus segment left by router pid %d (%s)", self.bus, pid, state)
        with contextlib.suppress(NotFound):
            Segment.unlink(name)
        pubs, subs, topics, size = _bus.bus_layout(self.max_publishers, self.max_subscribers, self.max_topics)
        segment = Segment.create(name, size, self.mode)
        set_mode(name, self.mode)
        m = segment.mapping
        put_u32(m, OFF_VERSION, _bus.BUS_VERSION)
        put_u32(m, OFF_STATE, _bus.STATE_RUNNING)
        put_u64(m, OFF_ROUTER_PID, os.getpid())
        put_u64(m, OFF_STARTED_NS, time.time_ns())
        put_u64(m, OFF_GENERATION, random.getrandbits(63))
        put_u32(m, OFF_MAX_PUBLISHERS, self.max_publishers)
        put_u32(m, OFF_MAX_SUBSCRIBERS, self.max_subscribers)
        put_u32(m, OFF_MAX_TOPICS, self.max_topics)
        put_u64(m, OFF_PUBLISHERS, pubs)
        put_u64(m, OFF_SUBSCRIBERS, subs)
        put_u64(m, OFF_TOPICS, topics)
        put_u64(m, OFF_MAGIC, _bus.BUS_MAGIC)  # last: readers check it first
        return segment

    def close(self) -> None:
        """Stop forwarding, say goodbye (EOF) to every client, remove the bus segment."""
        self.stopping.set()
        self.forwarder.stop()
        if self.forward_thread is not None:
            self.forward_thread.join(5.0)
        if self.flusher is not None:
            self.flusher.stop()
        if self.data_dir is not None:
            with contextlib.suppress(OSError):
                self.forwarder.sync(0)  # a clean stop leaves everything on disk
        with self.lock:
            clients: list[_Publisher | _Subscriber] = [*self.publishers.values(), *self.subscribers.values()]
            for client in clients:
                if client.link is not None:
                    client.link.close()
            self.listener.close()
            self.selector.close()
            put_u32(self.segment.mapping, OFF_STATE, _bus.STATE_STOPPED)
            for redelivery in self.redeliveries.values():
                # Undelivered messages of a gone group member stay in its ring for the next router.
                redelivery.segment.close()
            del self.forwarder  # releases every ring buffer before the segments close
            for client in clients:
                client.segment.close()
                if isinstance(client, _Subscriber) and client.state is not None:
                    client.state.release()
                    client.state.close()
            with contextlib.suppress(NotFound):
                Segment.unlink(self.segment.name)
            self.segment.close()
            if self.data_dir is not None:
                self.data_dir.close()

    # -- the data plane ------------------------------------------------------------------------

    def start_forwarding(self) -> None:
        self.forward_thread = threading.Thread(target=self._forward, name="shmq-forwarder", daemon=True)
        self.forward_thread.start()

    def _forward(self) -> None:
        try:
            while not self.stopping.is_set():
                event = self.forwarder.run(RUN_SLICE_S, self.wait_code, self.spin_ns)
                if event is not None:
                    with self.lock:
                        self._on_event(event)
        except BaseException as exc:  # reported by the main loop, which then stops
            self.forward_error = exc
            self.stopping.set()

    def _on_event(self, event: tuple[Any, ...]) -> None:
        if event[0] == "topic":
            _, input_id, local_id, raw = event
            try:
                topic = validate_topic(raw.decode("utf-8", "surrogatepass"))
            except (UnicodeDecodeError, ShmqError) as exc:
                self._isolate(input_id, f"invalid topic {raw!r}: {exc}")
                return
            refusal = self._publish_refusal(input_id, topic)
            gid = self._topic_id(topic) if refusal is None else self._refused_topic(input_id, topic, refusal)
            self.forwarder.map_topic(input_id, local_id, gid)
        elif event[0] == "corrupt":
            self._isolate(event[1], "a message or cursor failed its bounds check")
        elif event[0] == "log_topic":
            _, output_id, raw = event
            gid = self._topic_id(raw.decode("utf-8", "replace"))
            sub = self.subscribers.get(output_id)
            if sub is not None and sub.log_fed:  # (set already unless it raced with a new topic)
                self.forwarder.set_output_match(sub.id, [(gid, self._wants(sub, self.topic_names[gid]))])
        elif event[0] == "log_error":
            _, _, errno, what = event
            put_u32(self.segment.mapping, _bus.OFF_LOG_ERROR, errno or 5)
            if self.log_errors % 100 == 0:
                log.error(
                    "bus %r: cannot %s under %s: %s; durable messages wait in their publishers' rings "
                    "(retrying every 100 ms)",
                    self.bus,
                    what,
                    self.persistence.log_dir,
                    os.strerror(errno) if errno else "error",
                )
            self.log_errors += 1
            self.lock.release()
            try:
                self.stopping.wait(0.1)
            finally:
                self.lock.acquire()

    def _isolate(self, input_id: int, why: str) -> None:
        """Stop reading a damaged publisher ring; everyone else carries on."""
        log.error("bus %r: isolating publisher ring %d: %s", self.bus, input_id, why)
        # (the forwarder marks a ring it finds damaged itself; one isolated here for what Python
        # found, such as an invalid topic, must not be read again on the next pass)
        with contextlib.suppress(ShmqError):
            self.forwarder.isolate_input(input_id)
        publisher = self.publishers.get(input_id)
        if publisher is not None:
            publisher.corrupt = True
            self._slot_state(publisher, SLOT_CORRUPT)
            if publisher.link is not None:
                with contextlib.suppress(OSError):
                    publisher.link.send({"op": "error", "error": "CorruptSegment", "message": why})

    def _publish_refusal(self, input_id: int, topic: str) -> str | None:
        """Why the ACL refuses this publisher `topic` (None: allowed).

        Publishers check their rules themselves before a topic's first message (pubsub.py,
        _prepare), so this is reached only by a client that skipped the check, or one that used
        the topic under an earlier router with a laxer ACL."""
        pub = self.publishers.get(input_id)
        if self.acl is None or pub is None or pub.peer is None:
            return None
        decision = self.acl.check_publish(pub.peer, topic)
        return None if decision.allowed else decision.reason

    def _refused_topic(self, input_id: int, topic: str, reason: str) -> int:
        """The sink topic: no route, no statistics, no log; its messages are read and dropped."""
        log.warning("bus %r: publisher %d: %s; its messages on it are dropped", self.bus, input_id, reason)
        pub = self.publishers.get(input_id)
        if pub is not None and pub.link is not None:
            with contextlib.suppress(OSError):
                pub.link.send({"op": "error", "error": "PermissionDenied", "message": reason, "topic": topic})
        if self.refused_topic_id is None:
            gid = len(self.topic_names)
            # NUL cannot occur in a topic, so the name cannot collide with a real one.
            self.forwarder.add_topic(gid, -1, False, False, b"\0refused")
            self.topic_names.append("")
            self.refused_topic_id = gid
        return self.refused_topic_id

    def _topic_id(self, topic: str) -> int:
        gid = self.topics.get(topic)
        if gid is not None:
            return gid
        gid = len(self.topic_names)
        stats = -1
        stats_index = len(self.topics)  # not gid: the refused-topic sink has an id but no slot
        if stats_index < self.max_topics:
            stats = _bus.u64(self.segment.mapping, OFF_TOPICS) + stats_index * TOPIC_SLOT
            raw = topic.encode()
            self.segment.mapping[stats + 64 : stats + 64 + len(raw)] = raw
            put_u32(self.segment.mapping, stats + 4, len(raw))
            put_u32(self.segment.mapping, stats, SLOT_LIVE)
            put_u32(self.segment.mapping, OFF_TOPICS_USED, stats_index + 1)
        else:
            untracked = _bus.u64(self.segment.mapping, OFF_TOPICS_UNTRACKED)
            put_u64(self.segment.mapping, OFF_TOPICS_UNTRACKED, untracked + 1)
        durable = self._durable_topic(topic)
        self.forwarder.add_topic(gid, stats, self.keep_last, durable, topic.encode())
        self.topics[topic] = gid
        self.topic_names.append(topic)
        self.forwarder.update([(gid, self._targets(topic))])
        for sub in self.subscribers.values():
            if sub.log_fed:
                self.forwarder.set_output_match(sub.id, [(gid, self._wants(sub, topic))])
        return gid

    @staticmethod
    def _wants(sub: _Subscriber, topic: str) -> bool:
        return any(matches(p, topic) for p in sub.patterns)

    def _targets(self, topic: str) -> list[tuple[bytes | None, list[int], bool, int]]:
        targets = []
        for value in sorted(self.index.match(topic), key=repr):
            if isinstance(value, tuple):
                group = self.groups[value]
                if not group.members:  # nobody to take new messages: like a topic nobody wants
                    continue
                targets.append((group.program, list(group.members), True, POLICIES[group.on_full]))
            else:
                sub = self.subscribers[value]
                if sub.log_fed and self._durable_topic(topic):
                    continue  # it reads durable topics from the log, in log order
                targets.append((sub.program, [sub.id], False, 0))
        return targets

    def _reroute(
        self, patterns: tuple[str, ...], replay: tuple[int, list[int], bytes | None] | None = None
    ) -> None:
        """Recompute the route of every known topic one of `patterns` matches."""
        affected = [
            (gid, topic) for topic, gid in self.topics.items() if any(matches(p, topic) for p in patterns)
        ]
        self.forwarder.update([(gid, self._targets(topic)) for gid, topic in affected], replay)

    # -- the control plane ---------------------------------------------------------------------

    def _returning_subscribers(self) -> set[str]:
        """Rings of live subscribers left by an earlier router of this bus: they will say hello again."""
        prefix = f"{SEGMENT_PREFIX}bus.{self.bus}.s."
        rings = set()
        with contextlib.suppress(OSError):
            for entry in os.listdir(SHM_DIR):
                if entry.startswith(prefix):
                    pid = entry[len(prefix) :].split(".", 1)[0]
                    if pid.isdigit() and _pid_alive(int(pid)):
                        rings.add(entry[len(SEGMENT_PREFIX) :])
        return rings

    def serve(self, ready: Any = None) -> None:
        """Run until stop() or a signal; `ready()` is called once clients can connect."""
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        # After a restart, publishers may reconnect (and have their queued messages routed) before
        # every subscriber is back: forwarding waits until the subscribers whose rings are still
        # there have said hello again, or RECONNECT_GRACE_S, so none misses what was queued.
        self.awaiting = self._returning_subscribers()
        grace_end = time.monotonic() + RECONNECT_GRACE_S
        if self.awaiting:
            log.info("bus %r: waiting for %d subscribers to reconnect", self.bus, len(self.awaiting))
        if ready is not None:
            ready()
        next_housekeeping = time.monotonic()
        while not self.stopping.is_set():
            if self.forward_thread is None and (not self.awaiting or time.monotonic() >= grace_end):
                if self.awaiting:
                    log.warning(
                        "bus %r: %d subscribers did not reconnect within %s s; routing without them",
                        self.bus,
                        len(self.awaiting),
                        RECONNECT_GRACE_S,
                    )
                self.start_forwarding()
            timeout = max(0.0, next_housekeeping - time.monotonic())
            for key, _ in self.selector.select(timeout):
                if self.stopping.is_set():
                    break
                with self.lock:
                    if key.data is None:
                        self._accept()
                    else:
                        self._on_readable(key.data)
            if time.monotonic() >= next_housekeeping:
                with self.lock:
                    self._housekeeping()
                next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        if self.forward_error is not None:
            raise self.forward_error

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        link = LineSocket(sock)
        # Read now, at connect: the kernel's word on who connected, whatever the hello will claim.
        try:
            peer = peer_credentials(sock)
        except OSError as exc:
            log.warning("bus %r: cannot read a client's credentials (%s); closing it", self.bus, exc)
            link.close()
            return
        self.selector.register(sock, selectors.EVENT_READ, ["new", link, None, peer])

    def _on_readable(self, data: list[Any]) -> None:
        kind, link, client, peer = data
        messages = link.feed()
        if messages is None:  # EOF: the client closed, or its process died
            self._disconnect(link, client)
            return
        for message in messages:
            if kind != "new" or message.get("op") != "hello":
                continue  # nothing else is expected from a client yet
            try:
                client = self._hello(link, message, peer)
            except ShmqError as exc:
                reply: dict[str, Any] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
                for attr in ("topic", "expression"):
                    if hasattr(exc, attr):
                        reply[attr] = getattr(exc, attr)
                with contextlib.suppress(OSError):
                    link.send(reply)
                self._disconnect(link, None)
                return
            # (the rest of this read is a client's too: a second hello is not a new client)
            kind = data[0] = "client"
            data[2] = client

    def _disconnect(self, link: LineSocket, client: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(link.sock)
        link.close()
        if isinstance(client, _Publisher):
            client.link = None
            client.gone = True
            if not client.corrupt:
                self._slot_state(client, SLOT_DRAINING)
            self.forwarder.wake()
        elif isinstance(client, _Subscriber):
            self._remove_subscriber(client)

    def _hello(
        self, link: LineSocket, message: dict[str, Any], peer: PeerCredentials
    ) -> _Publisher | _Subscriber:
        if message.get("version") != _bus.PROTOCOL_VERSION:
            raise InvalidArgument(
                f"client speaks protocol {message.get('version')!r}, this router {_bus.PROTOCOL_VERSION}: "
                "use the same shmq version everywhere"
            )
        self._admit(peer, message)
        role, ring_name = message.get("role"), message.get("ring")
        prefix = f"bus.{self.bus}.{'p' if role == 'publisher' else 's'}."
        if not isinstance(ring_name, str) or not ring_name.startswith(prefix):
            raise InvalidArgument(f"bad ring name {ring_name!r} for a {role}")
        self._check_ring_owner(ring_name, peer)
        if role == "publisher":
            if self.acl is not None and not self.acl.may(peer, "publish"):
                raise PermissionDenied(
                    f"{peer.describe()} may not publish on bus {self.bus!r}: no rule in {self.acl.source} "
                    "allows it to publish anything; add an 'allow publish' rule for it"
                )
            return self._add_publisher(link, ring_name, peer.pid, int(message.get("publisher_id", 0)), peer)
        if role == "subscriber":
            return self._add_subscriber(link, ring_name, peer.pid, message, peer)
        raise InvalidArgument(f"unknown role {role!r}")

    def _admit(self, peer: PeerCredentials, message: dict[str, Any]) -> None:
        """Refuse a hello whose pid is not the kernel's, or from a user the default policy excludes."""
        claimed = message.get("pid")
        if claimed != peer.pid:
            raise PermissionDenied(
                f"the client says it is pid {claimed!r} but the kernel says pid {peer.pid}: a client "
                "must connect from its own process (in the router's pid namespace: run the router "
                "and its clients in the same container)"
            )
        if self.acl is None and not default_admits(peer, self.owner_uid):
            raise PermissionDenied(
                f"{peer.describe()} may not use bus {self.bus!r}: without an ACL only the router's user "
                f"(uid {self.owner_uid}) and root may connect; start the router with --acl FILE "
                "(Router(bus, acl=PATH)) granting this user, and a --mode that lets it open the segments"
            )

    @staticmethod
    def _check_ring_owner(ring_name: str, peer: PeerCredentials) -> None:
        """A client may only hand the router its own ring, never another user's."""
        try:
            owner = os.stat(segment_path(validate_name(ring_name))).st_uid
        except FileNotFoundError:
            return  # attach() reports the missing ring
        if owner != peer.uid:
            raise PermissionDenied(
                f"ring {ring_name!r} belongs to uid {owner}, not to the connecting {peer.describe()}: "
                "a client names the ring it created itself"
            )

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _add_publisher(
        self, link: LineSocket, ring_name: str, pid: int, publisher_id: int, peer: PeerCredentials
    ) -> _Publisher:
        if not self.free_pub_slots:
            raise InvalidArgument(
                f"bus {self.bus!r} has {self.max_publishers} publishers already; start the router "
                "with a larger max_publishers"
            )
        segment = Segment.attach(ring_name, _ring.HEADER_SIZE)
        segment.register(_attach.ROLE_ROUTER)
        slot = self.free_pub_slots.pop()
        pub = _Publisher(self._new_id(), slot, pid, ring_name, publisher_id, segment, link, peer=peer)
        off = self._pub_slot_offset(slot)
        self.segment.mapping[off : off + PUBLISHER_SLOT] = bytes(PUBLISHER_SLOT)
        put_u32(self.segment.mapping, off + 4, pid)
        put_u32(self.segment.mapping, off + 8, publisher_id)
        put_u32(self.segment.mapping, off + _bus.PS_UID, peer.uid)
        put_u32(self.segment.mapping, off + _bus.PS_GID, peer.gid)
        raw = ring_name.encode()[:63]
        self.segment.mapping[off + 64 : off + 64 + len(raw)] = raw
        try:
            self.forwarder.add_input(pub.id, segment.mapping, off)
        except BaseException:
            self.free_pub_slots.append(slot)
            segment.close()
            raise
        put_u32(self.segment.mapping, off, SLOT_LIVE)
        self.publishers[pub.id] = pub
        reply: dict[str, Any] = {
            "ok": True,
            "bus_segment": self.segment.name,
            "slot": slot,
            "id": pub.id,
            "durable": list(self.persistence.durable) if self.data_dir is not None else [],
            "fsync": self.persistence.fsync,
        }
        if self.acl is not None:
            # The rules that apply to this publisher, in order: it checks each new topic itself,
            # before writing anything, so a refusal raises in publish() (see _publish_refusal).
            reply["publish_rules"] = [
                [rule.allows, rule.pattern, rule.describe(self.acl.source)]
                for rule in self.acl.rules_for(peer, "publish")
            ]
            reply["acl_source"] = self.acl.source
        _send_reply(link, reply)
        log.info(
            "bus %r: publisher %d (pid %d) attached %s as uid %d", self.bus, pub.id, pid, ring_name, peer.uid
        )
        return pub

    def _add_subscriber(
        self, link: LineSocket, ring_name: str, pid: int, message: dict[str, Any], peer: PeerCredentials
    ) -> _Subscriber:
        patterns = message.get("patterns")
        if not isinstance(patterns, list) or not patterns:
            raise InvalidArgument("a subscriber needs at least one pattern")
        patterns_t = tuple(validate_pattern(p) for p in patterns)
        if self.acl is not None:
            for pattern in patterns_t:
                decision = self.acl.check_subscribe(peer, pattern)
                if not decision.allowed:
                    raise PermissionDenied(decision.reason)
        where = message.get("where")
        program = encode_filter(compile_filter(where)) if where is not None else None
        group = message.get("group")
        on_full = message.get("on_full", "block")
        if on_full not in POLICIES:
            raise InvalidArgument(f"on_full must be one of {', '.join(POLICIES)}, got {on_full!r}")
        if group is not None and on_full not in ("block", "drop"):
            raise InvalidArgument("a queue group member takes on_full='block' or 'drop'")
        start, durable_name = message.get("start"), message.get("durable")
        latency = message.get("latency")
        if latency is not None and (not isinstance(latency, str) or len(latency) > 200):
            raise InvalidArgument(f"latency names the subscriber's LatencyRecorder, got {latency!r}")
        log_fed = start is not None or durable_name is not None
        if log_fed and self.data_dir is None:
            raise InvalidArgument(
                f"bus {self.bus!r} has no durable log, so start= and durable= have nothing to read: run "
                "the router with --data-dir DIR --durable PATTERN"
            )
        if log_fed and group is not None:
            raise InvalidArgument("start= and durable= cannot be used with group=")
        state = None
        if durable_name is not None:
            durable_name = _durable.validate_durable_name(durable_name)
            if any(s.durable_name == durable_name for s in self.subscribers.values()):
                raise AlreadyExists(
                    f"durable subscription {durable_name!r} is in use by another subscriber; close it "
                    "first, or pick another name"
                )
        key = (str(group), tuple(sorted(set(patterns_t))), str(compile_filter(where)) if where else None)
        if group is not None and key in self.groups and self.groups[key].on_full != on_full:
            raise InvalidArgument(
                f"queue group {group!r} uses on_full={self.groups[key].on_full!r}; its members must "
                f"agree: join with on_full={self.groups[key].on_full!r}"
            )
        if not self.free_sub_slots:
            raise InvalidArgument(
                f"bus {self.bus!r} has {self.max_subscribers} subscribers already; start the router "
                "with a larger max_subscribers"
            )
        first_seq = self._resolve_start(start) if log_fed else 0
        redelivered_upto = 0
        if durable_name is not None:
            assert self.data_dir is not None
            state = DurableState(
                self.data_dir.state_path(durable_name), create_start=first_seq or 1, mode=self.mode
            )
        try:
            segment = Segment.attach(ring_name, _ring.HEADER_SIZE)
        except BaseException:
            if state is not None:
                state.close()
            raise
        segment.register(_attach.ROLE_ROUTER)
        if state is not None:
            if not state.fresh:
                if state.ring == ring_name:
                    # The same subscriber, back after a router restart: its ring holds what was
                    # delivered; go on after that.
                    delivered = state.delivered_to(_bus.u64(segment.mapping, _ring.OFF_TAIL_COMMIT))
                    first_seq = delivered + 1 if delivered else state.start_seq
                else:
                    # A new subscriber process: resume after the last acknowledged record; what
                    # was (or may have been) delivered and not acknowledged comes again, flagged
                    # redelivered.
                    first_seq = max(state.acked + 1, state.start_seq)
                    redelivered_upto = state.delivered_to(None)
            elif first_seq == 0:
                first_seq = int(self.forwarder.log_info()["next_seq"])
                state.put(_durable.STATE_OFF_START, first_seq)
        slot = self.free_sub_slots.pop()
        capacity = len(segment.mapping) - _ring.HEADER_SIZE
        sub = _Subscriber(
            self._new_id(),
            slot,
            pid,
            ring_name,
            patterns_t,
            where,
            program,
            group,
            on_full,
            segment,
            link,
            capacity,
            log_fed=log_fed,
            state=state,
            durable_name=durable_name,
            peer=peer,
            latency=latency,
        )
        off = self._sub_slot_offset(slot)
        m = self.segment.mapping
        m[off : off + SUBSCRIBER_SLOT] = bytes(SUBSCRIBER_SLOT)
        put_u32(m, off + 4, pid)
        put_u32(m, off + 8, POLICIES[on_full])
        put_u32(m, off + 12, sub.id)
        put_u32(m, off + _bus.SS_UID, peer.uid)
        put_u32(m, off + _bus.SS_GID, peer.gid)
        put_u64(m, off + 88, capacity)
        description = _describe(sub)
        m[off + SUBSCRIBER_DESCRIPTION : off + SUBSCRIBER_DESCRIPTION + len(description)] = description
        try:
            self.forwarder.add_output(sub.id, segment.mapping, POLICIES[on_full], off)
            if on_full == "spill":
                self._set_spill(sub, message.get("max_spill_bytes"))
            if log_fed:
                self.forwarder.set_output_log(
                    sub.id,
                    first_seq,
                    redelivered_upto,
                    None if state is None else state.mapping,
                    _durable.STATE_OFF_DELIVERED,
                    _durable.STATE_OFF_INTENT_END,
                    program,
                )
                self.forwarder.set_output_match(
                    sub.id, [(gid, self._wants(sub, topic)) for topic, gid in self.topics.items()]
                )
        except BaseException:
            with contextlib.suppress(ShmqError):
                self.forwarder.remove_output(sub.id)
            self.free_sub_slots.append(slot)
            segment.close()
            if state is not None:
                state.close()
            raise
        if state is not None:
            state.claim(pid, ring_name)
        put_u32(m, off, SLOT_LIVE)
        self.subscribers[sub.id] = sub
        self.awaiting.discard(ring_name)
        if group is None:
            for pattern in patterns_t:
                self.index.add(pattern, sub.id)
        else:
            grp = self.groups.get(key)
            if grp is None:
                grp = self.groups[key] = _Group(key, program, on_full)
                for pattern in key[1]:
                    self.index.add(pattern, key)
            grp.members.append(sub.id)
            for input_id in grp.orphans:  # messages a gone member left: now someone can take them
                self.forwarder.set_input_target(input_id, (None, list(grp.members), True, POLICIES["block"]))
        replay = None
        if message.get("last_value"):
            wanted = [gid for topic, gid in self.topics.items() if any(matches(p, topic) for p in patterns_t)]
            replay = (sub.id, wanted, program)
        self._reroute(patterns_t, replay)
        reply: dict[str, Any] = {"ok": True, "bus_segment": self.segment.name, "slot": slot, "id": sub.id}
        if log_fed:
            reply["first_seq"] = first_seq
        if state is not None:
            reply["durable_state"] = str(state.path)
        _send_reply(link, reply)
        log.info(
            "bus %r: subscriber %d (pid %d) %s on %s as uid %d",
            self.bus,
            sub.id,
            pid,
            ring_name,
            list(patterns_t),
            peer.uid,
        )
        return sub

    def _resolve_start(self, start: Any) -> int:
        """The first log seq for start= ("earliest" 1, "latest" 0: resolved by the forwarder)."""
        info = self.forwarder.log_info()
        if start is None or start == "latest":
            return 0
        if start == "earliest":
            return max(int(info["first_seq"]), 1)
        if isinstance(start, dict) and "time_ns" in start:
            reader = _ring.LogReader(str(self.persistence.log_dir), time_ns=int(start["time_ns"]))
            try:
                return max(int(reader.next_seq), 1)
            finally:
                reader.close()
        if isinstance(start, bool) or not isinstance(start, int):
            raise ArgumentTypeError(
                f"start must be 'earliest', 'latest', a log sequence (int) or a datetime, got {start!r}"
            )
        if not 1 <= start <= info["next_seq"]:
            raise InvalidArgument(
                f"start={start} is outside the log, which holds records {info['first_seq']} to "
                f"{info['next_seq'] - 1} (the next one will be {info['next_seq']})"
            )
        return start

    def _set_spill(self, sub: _Subscriber, max_bytes: Any) -> None:
        root = self.persistence.spill_root(self.bus)
        _durable.make_dir(root, self.mode)
        sub.spill_dir = root / f"{self.bus}.{sub.id}.{os.getpid()}"
        if max_bytes is None:
            max_bytes = self.persistence.max_spill_bytes or _durable.default_max_spill_bytes(root)
        elif isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise InvalidArgument(f"max_spill_bytes must be a positive int, got {max_bytes!r}")
        self.forwarder.set_output_spill(sub.id, str(sub.spill_dir), max_bytes, _durable.SPILL_SEGMENT_BYTES)

    def _remove_subscriber(self, sub: _Subscriber) -> None:
        self.subscribers.pop(sub.id, None)
        sub.link = None
        if sub.state is not None:
            sub.state.release()
        # EOF means the subscriber closed (and removes its ring itself) or died: either way its
        # ring goes now. (Checking for life would miss a process still exiting when asked.)
        alive = _pid_alive(sub.pid)
        if sub.group is None:
            for pattern in sub.patterns:
                self.index.remove(pattern, sub.id)
            self._reroute(sub.patterns)
            self.forwarder.remove_output(sub.id)
            sub.segment.close()
            with contextlib.suppress(NotFound):
                Segment.unlink(sub.ring_name)
        else:
            key = next(k for k, g in self.groups.items() if sub.id in g.members)
            grp = self.groups[key]
            grp.members.remove(sub.id)
            self._reroute(key[1])
            self.forwarder.remove_output(sub.id)
            # What it had not taken yet goes to the other members (or waits for the next one).
            input_id = self._new_id()
            self.forwarder.add_input(input_id, sub.segment.mapping, -1)
            self.forwarder.set_input_target(input_id, (None, list(grp.members), True, POLICIES["block"]))
            self.redeliveries[input_id] = _Redelivery(input_id, sub.segment, sub.ring_name, key, sub.slot)
            grp.orphans.append(input_id)
            put_u32(self.segment.mapping, self._sub_slot_offset(sub.slot), SLOT_DRAINING)
        if sub.group is None:
            self._free_sub_slot(sub.slot)
        if sub.state is not None:
            sub.state.close()
        log.info("bus %r: subscriber %d left (%s)", self.bus, sub.id, "closed" if alive else "died")

    def _adopt_left_members(self) -> None:
        """Group members the last router knew that are gone now (they died while no router ran, or
        the last router stopped while it was redelivering what they left): their rings become
        redelivery inputs, as if they had just left, so the group gets what they had not taken."""
        for pid, uid, info in self.left_members:
            ring_name = info.get("ring")
            # (only a ring of this bus, made by that member: the description is not trusted further)
            if not isinstance(ring_name, str) or not ring_name.startswith(f"bus.{self.bus}.s.{pid}."):
                continue
            if _pid_alive(pid) or not self.free_sub_slots or info.get("on_full") not in ("block", "drop"):
                continue  # (a live member says hello again)
            try:
                segment = Segment.attach(ring_name, _ring.HEADER_SIZE)
            except ShmqError:
                continue  # removed meanwhile (its process closed it, or shmq gc)
            try:
                if os.stat(segment.path).st_uid != uid:
                    raise InvalidArgument(f"it is not owned by uid {uid}, who subscribed with it")
                segment.register(_attach.ROLE_ROUTER)
                patterns = tuple(validate_pattern(p) for p in info["patterns"])
                where = info["where"]
                key = (
                    str(info["group"]),
                    tuple(sorted(set(patterns))),
                    str(compile_filter(where)) if where else None,
                )
                grp = self.groups.get(key)
                if grp is None:
                    program = encode_filter(compile_filter(where)) if where is not None else None
                    grp = self.groups[key] = _Group(key, program, info["on_full"])
                    for pattern in key[1]:
                        self.index.add(pattern, key)
                input_id = self._new_id()
                self.forwarder.add_input(input_id, segment.mapping, -1)
            except (ShmqError, OSError, KeyError, TypeError, ValueError) as exc:
                log.warning(
                    "bus %r: cannot take over the ring %s a group member left: %s", self.bus, ring_name, exc
                )
                segment.close()
                continue
            self.forwarder.set_input_target(input_id, (None, list(grp.members), True, POLICIES["block"]))
            slot = self.free_sub_slots.pop()
            off = self._sub_slot_offset(slot)
            m = self.segment.mapping
            m[off : off + SUBSCRIBER_SLOT] = bytes(SUBSCRIBER_SLOT)
            put_u32(m, off + 4, pid)
            put_u32(m, off + 8, POLICIES[grp.on_full])
            put_u32(m, off + _bus.SS_UID, uid)
            raw = json.dumps(info, separators=(",", ":")).encode()
            m[off + SUBSCRIBER_DESCRIPTION : off + SUBSCRIBER_DESCRIPTION + len(raw)] = raw
            put_u32(m, off, SLOT_DRAINING)
            self.redeliveries[input_id] = _Redelivery(input_id, segment, ring_name, key, slot)
            grp.orphans.append(input_id)
            self._reroute(key[1])
            log.info("bus %r: redelivering what group member pid %d left in %s", self.bus, pid, ring_name)

    def _forget_group(self, key: tuple[str, tuple[str, ...], str | None]) -> None:
        for pattern in key[1]:
            self.index.remove(pattern, key)
        del self.groups[key]
        self._reroute(key[1])

    def _housekeeping(self) -> None:
        m = self.segment.mapping
        put_u64(m, OFF_HEARTBEAT_NS, time.monotonic_ns())
        for pub in list(self.publishers.values()):
            off = self._pub_slot_offset(pub.slot)
            depth = self.forwarder.input_depth(pub.id)
            info = _ring_counters(pub.segment)
            put_u64(m, off + 40, max(depth, 0))
            put_u64(m, off + 48, info[1])
            put_u64(m, off + 56, info[2])
            if pub.gone and (depth <= 0 or pub.corrupt):
                self._forget_publisher(pub)
        for sub in self.subscribers.values():
            off = self._sub_slot_offset(sub.slot)
            got, depth, depth_bytes = _subscriber_counters(sub.segment)
            put_u64(m, off + 64, got)
            put_u64(m, off + 72, depth)
            put_u64(m, off + 80, depth_bytes)
            if sub.on_full == "spill":
                full = _bus.u64(m, off + _bus.SS_SPILL_FULL)
                if full != sub.spill_full_seen:
                    sub.spill_full_seen = full
                    log.warning(
                        "bus %r: subscriber %d's spill file reached max_spill_bytes (%d times so far); "
                        "it blocks until it catches up",
                        self.bus,
                        sub.id,
                        full,
                    )
        if self.data_dir is not None and time.monotonic() >= self.next_retention:
            self.next_retention = time.monotonic() + 1.0
            p = self.persistence
            if p.retain_bytes is not None or p.retain_seconds is not None:
                assert p.log_dir is not None
                try:
                    _durable.apply_retention(self.forwarder, p.log_dir, p.retain_bytes, p.retain_seconds)
                except OSError as exc:
                    log.error("bus %r: retention failed: %s", self.bus, exc)
        for redelivery in list(self.redeliveries.values()):
            if self.forwarder.input_depth(redelivery.input_id) == 0:
                self.forwarder.remove_input(redelivery.input_id)
                del self.redeliveries[redelivery.input_id]
                grp = self.groups.get(redelivery.group)
                if grp is not None:
                    grp.orphans.remove(redelivery.input_id)
                    if not grp.members and not grp.orphans:
                        self._forget_group(redelivery.group)
                redelivery.segment.close()
                with contextlib.suppress(NotFound):
                    Segment.unlink(redelivery.ring_name)
                self._free_sub_slot(redelivery.slot)

    def _forget_publisher(self, pub: _Publisher) -> None:
        self.forwarder.remove_input(pub.id)
        del self.publishers[pub.id]
        off = self._pub_slot_offset(pub.slot)
        put_u32(self.segment.mapping, off, SLOT_FREE)
        self.free_pub_slots.append(pub.slot)
        pub.segment.close()
        with contextlib.suppress(NotFound):  # its publisher closed or died: the ring is done
            Segment.unlink(pub.ring_name)
        log.info("bus %r: publisher %d detached", self.bus, pub.id)

    def _pub_slot_offset(self, slot: int) -> int:
        return _bus.u64(self.segment.mapping, OFF_PUBLISHERS) + slot * PUBLISHER_SLOT

    def _sub_slot_offset(self, slot: int) -> int:
        return _bus.u64(self.segment.mapping, OFF_SUBSCRIBERS) + slot * SUBSCRIBER_SLOT

    def _free_sub_slot(self, slot: int) -> None:
        put_u32(self.segment.mapping, self._sub_slot_offset(slot), SLOT_FREE)
        self.free_sub_slots.append(slot)

    def _slot_state(self, pub: _Publisher, state: int) -> None:
        put_u32(self.segment.mapping, self._pub_slot_offset(pub.slot), state)


def _group_members_in(mapping: Any) -> list[tuple[int, int, dict[str, Any]]]:
    """(pid, uid, description) of every group member an old bus segment lists (live or draining), when
    the description is whole (a long filter is cut short there, and then the group is unknown)."""
    found = []
    subs, count = _bus.u64(mapping, OFF_SUBSCRIBERS), _bus.u32(mapping, OFF_MAX_SUBSCRIBERS)
    for i in range(count):
        off = subs + i * SUBSCRIBER_SLOT
        if off + SUBSCRIBER_SLOT > len(mapping) or _bus.u32(mapping, off) not in (SLOT_LIVE, SLOT_DRAINING):
            continue
        raw = bytes(mapping[off + SUBSCRIBER_DESCRIPTION : off + SUBSCRIBER_SLOT]).split(b"\0", 1)[0]
        try:
            info = json.loads(raw)
        except ValueError:
            continue
        if (
            isinstance(info, dict)
            and info.get("group") is not None
            and len(raw) < SUBSCRIBER_DESCRIPTION_MAX - 1
        ):
            found.append((_bus.u32(mapping, off + 4), _bus.u32(mapping, off + _bus.SS_UID), info))
    return found


def _describe(sub: _Subscriber) -> bytes:
    info = {
        "ring": sub.ring_name,
        "patterns": list(sub.patterns),
        "where": sub.where,
        "group": sub.group,
        "on_full": sub.on_full,
    }
    if sub.latency is not None:
        info["latency"] = sub.latency
    raw = json.dumps(info, separators=(",", ":")).encode()
    if len(raw) >= SUBSCRIBER_DESCRIPTION_MAX:  # keep it valid JSON: shorten the filter text
        info["where"] = (sub.where or "")[:60] + "..."
        raw = json.dumps(info, separators=(",", ":")).encode()[: SUBSCRIBER_DESCRIPTION_MAX - 1]
    return raw


def _send_reply(link: LineSocket, reply: dict[str, Any]) -> None:
    """Answer a hello. A client that died or hung up meanwhile is not the router's failure (it
    used to take the router down with it): its link reads EOF next, and that removes it."""
    with contextlib.suppress(OSError):
        link.send(reply)


def _ring_counters(segment: Segment) -> tuple[int, int, int]:
    """(depth messages, depth bytes, messages put) of a ring, from its header."""
    m = segment.mapping
    put = _bus.u64(m, _ring.OFF_TAIL_COMMIT + 8)
    got = _bus.u64(m, _ring.OFF_HEAD_RELEASE + 8)
    depth_bytes = _bus.u64(m, _ring.OFF_TAIL_COMMIT) - _bus.u64(m, _ring.OFF_HEAD_RELEASE)
    return max(put - got, 0), max(depth_bytes, 0), put


def _subscriber_counters(segment: Segment) -> tuple[int, int, int]:
    """(messages taken, depth messages, depth bytes) of a subscriber ring."""
    m = segment.mapping
    put = _bus.u64(m, _ring.OFF_TAIL_COMMIT + 8)
    got = _bus.u64(m, _ring.OFF_HEAD_RELEASE + 8)
    depth_bytes = _bus.u64(m, _ring.OFF_TAIL_COMMIT) - _bus.u64(m, _ring.OFF_HEAD_RELEASE)
    return got, max(put - got, 0), max(depth_bytes, 0)


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _holder(bus: str) -> str:
    """' (pid N)' for the router holding the bus, when its segment says so."""
    try:
        segment = _bus.open_bus_segment(bus)
    except ShmqError:
        return ""
    try:
        return f" (pid {_bus.u64(segment.mapping, OFF_ROUTER_PID)})"
    finally:
        segment.close()


# -- running a router --------------------------------------------------------------------------------


def serve(
    bus: str,
    *,
    wait: str = "adaptive",
    spin_ns: int = _ring.DEFAULT_SPIN_NS,
    max_publishers: int = 256,
    max_subscribers: int = 256,
    max_topics: int = 16384,
    last_value: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
    durable: Any = (),
    fsync: str = "interval",
    fsync_interval_ms: int = _durable.DEFAULT_FSYNC_INTERVAL_MS,
    segment_bytes: int = _durable.DEFAULT_SEGMENT_BYTES,
    retain_bytes: int | None = None,
    retain_seconds: float | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
    max_spill_bytes: int | None = None,
    acl: str | os.PathLike[str] | None = None,
    mode: int = 0o600,
    ready: Any = None,
    handle_signals: bool = True,
) -> None:
    """Run a router for `bus` in this process until SIGINT or SIGTERM (then it cleans up and returns).

    `shmq router BUS` calls this. Raises AlreadyExists if a router already serves the bus.

    Persistence: with `data_dir`, every message on a topic matching a `durable` pattern is appended
    to a segmented log under ``data_dir/log`` before it is routed; ``fsync`` is "never" (the OS
    flushes), "interval" (every `fsync_interval_ms`) or "always" (publish returns once the record
    is on disk; concurrent publishers share each flush). Segments roll at `segment_bytes`;
    `retain_bytes` / `retain_seconds` remove whole old segments. Subscribers with
    ``on_full="spill"`` spill to files under `spill_dir` (default ``data_dir/spill``, else a
    temporary directory), each up to `max_spill_bytes` (default: half the free space there).

    Security (shmq/acl.py): every client's uid, gid and pid come from the kernel (SO_PEERCRED).
    Without `acl`, only this process's user and root may connect; `acl` is the path of an ACL
    file (read now; a mistake raises InvalidArgument naming the line) that says who may publish
    and subscribe to what. `mode` is the bus segment's permission bits (default 0o600: only its
    owner can open it; clients of other users need e.g. 0o660 with a shared group, or 0o666).
    """
    validate_bus(bus)
    validate_mode(mode)
    access = None if acl is None else Acl.load(acl)
    options = _durable.persistence(
        data_dir,
        durable,
        fsync,
        fsync_interval_ms,
        segment_bytes,
        retain_bytes,
        retain_seconds,
        spill_dir,
        max_spill_bytes,
    )
    if wait not in WAITS:
        raise InvalidArgument(f"wait must be one of {', '.join(WAITS)}, got {wait!r}")
    for name, value in (
        ("max_publishers", max_publishers),
        ("max_subscribers", max_subscribers),
        ("max_topics", max_topics),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
            raise InvalidArgument(f"{name} must be an int from 1 to {1 << 20}, got {value!r}")
    stop_requested = threading.Event()
    core: _RouterCore | None = None
    previous: dict[signal.Signals, Any] = {}

    def stop(signum: int, frame: Any) -> None:
        stop_requested.set()
        if core is not None:
            core.stopping.set()
            core.forwarder.stop()

    # Handlers first: a SIGTERM while the router sets up still ends in a clean close.
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
    try:
        core = _RouterCore(
            bus,
            wait=wait,
            spin_ns=spin_ns,
            max_publishers=max_publishers,
            max_subscribers=max_subscribers,
            max_topics=max_topics,
            last_value=last_value,
            persistence=options,
            acl=access,
            mode=mode,
        )
        try:
            if stop_requested.is_set():
                core.stopping.set()
            core.serve(ready)
        finally:
            core.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# The child ignores Ctrl-C while it imports (the parent's stop() ends it; serve() then installs
# its own handler), so an early Ctrl-C in a terminal prints no traceback from it.
_CHILD_CODE = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "from shmq.router import _child_main; _child_main(sys.argv[1:])"
)


def _watch_parent(parent: int) -> None:
    """Stop this router when the process that started it is gone (even after SIGKILL)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def _child_main(argv: list[str]) -> None:
    """The body of a `Router` child process; argv is BUS OPTIONS_JSON FD.

    Reports one line on file descriptor FD: ``ready`` once clients can connect, or
    ``error <class> <message>``. (A fresh interpreter rather than multiprocessing: it works from
    any script, notebook or REPL, with no ``if __name__ == "__main__"`` guard needed.)"""
    bus, options, fd = argv[0], json.loads(argv[1]), int(argv[2])
    logging.basicConfig(level=options.pop("log_level", logging.WARNING), format="%(name)s: %(message)s")
    report = os.fdopen(fd, "w", buffering=1)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="shmq-parent", daemon=True).start()

    def ready() -> None:
        report.write("ready\n")
        report.close()

    try:
        serve(bus, ready=ready, **options)
    except BaseException as exc:
        if report.closed and isinstance(exc, Exception):
            # After "ready" nobody reads the pipe: the log is the only place left to say it.
            log.critical("bus %r: the router stopped on an error", bus, exc_info=exc)
        with contextlib.suppress(Exception):
            report.write(f"error {type(exc).__name__} {exc}\n".replace("\n", " ").rstrip() + "\n")
            report.close()
        raise SystemExit(1) from None


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class Router:
    """A router for `bus` in a child process: ``with shmq.Router("md"): ...``.

    ``start()`` returns once clients can connect (raises AlreadyExists if another router serves
    the bus); ``stop()`` ends it cleanly (SIGTERM; SIGKILL after `timeout`). Options are those of
    `serve`: ``wait`` ("adaptive" spins 50 µs then sleeps; "spin" for the lowest latency, burning
    a core), ``max_publishers``, ``max_subscribers``, ``max_topics``, ``last_value`` (keep each
    topic's newest message for subscribers that ask for it), ``acl`` (the path of an ACL file:
    who may publish and subscribe to what; without one only this user and root may connect) and
    ``mode`` (the bus segment's permission bits, default 0o600); see shmq/acl.py.
    """

    _PERSISTENCE = (
        "data_dir",
        "durable",
        "fsync",
        "fsync_interval_ms",
        "segment_bytes",
        "retain_bytes",
        "retain_seconds",
        "spill_dir",
        "max_spill_bytes",
    )

    def __init__(self, bus: str, **options: Any) -> None:
        self.bus = validate_bus(bus)
        # Checked here, so a bad option raises InvalidArgument in the caller, not in the child.
        _durable.persistence(**{k: v for k, v in options.items() if k in self._PERSISTENCE})
        if "mode" in options:
            validate_mode(options["mode"])
        if options.get("acl") is not None:
            Acl.load(options["acl"])
        for key in ("data_dir", "spill_dir", "acl"):
            if options.get(key) is not None:
                options[key] = os.fspath(options[key])
        if isinstance(options.get("durable"), (list, tuple)):
            options["durable"] = list(options["durable"])
        self.options = options
        self._process: Any = None
        self._finalizer: Any = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> Router:
        if self.is_alive():
            raise InvalidArgument(f"the router for bus {self.bus!r} is already started (pid {self.pid})")
        read_fd, write_fd = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, self.bus, json.dumps(self.options), str(write_fd)],
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(write_fd)
        try:
            with os.fdopen(read_fd) as report:
                ready, _, _ = select.select([report], [], [], timeout)
                line = report.readline().strip() if ready else ""
        except BaseException:  # Ctrl-C while waiting: no router may outlive a failed start()
            _terminate(process)
            raise
        if line == "ready":
            self._process = process
            # A Router forgotten without stop() (an exception, a failed test) must not leave its
            # child serving the bus after this interpreter exits.
            self._finalizer = weakref.finalize(self, _terminate, process)
            return self
        _terminate(process)
        kind, _, message = line.partition(" ")[2].partition(" ")
        if kind == "AlreadyExists":
            raise AlreadyExists(message)
        if kind == "LogWriteError":
            raise LogWriteError(5, message)
        if kind == "InvalidArgument":  # e.g. the ACL file was edited between __init__ and start()
            raise InvalidArgument(message)
        if not line:
            raise RouterUnavailable(
                f"the router for bus {self.bus!r} did not start within {timeout} s "
                f"(exit code {process.returncode})"
            )
        raise RouterUnavailable(f"the router for bus {self.bus!r} failed to start: {kind}: {message}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the router (it removes its bus segment); clients wait for the next one."""
        process, self._process = self._process, None
        if process is None:
            return
        self._finalizer.detach()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def kill(self) -> None:
        """SIGKILL the router (tests use this to play a crash)."""
        process, self._process = self._process, None
        if process is not None:
            self._finalizer.detach()
            process.kill()
            process.wait(10)

    def __enter__(self) -> Router:
        if not self.is_alive():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_alive() else "stopped"
        return f"<shmq.Router bus={self.bus!r} {state}>"
