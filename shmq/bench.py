"""`shmq bench`: latency, throughput and fan-out measured across real processes, optionally beside
the peers a user would pick instead (``--compare``). The library part (`BenchConfig`, `run`,
`render`) works without the command line; `bench_command` is the ``shmq bench`` click command.

Every cell (one implementation, one message size) runs in fresh worker processes started with the
multiprocessing "spawn" context (shmq/_bench_peers.py has their loops); the parent creates the
channels (queues, the router of a fan-out, the latency recorders), sends commands, and removes all
of it at the end, also after Ctrl-C or an error. Each run warms up (``--warmup`` seconds of the
same traffic, not measured, until every receiver has had some) and then measures for
``--duration`` seconds. Messages are ``--size`` bytes (from 16: a sequence number and a time stamp
lead each message); times are CLOCK_MONOTONIC (``time.monotonic_ns()``), one clock for every
process of the machine.

* ``latency``: one-way, sender to receiver, recorded by the receiver (``now - stamp``) into a named
  `shmq.LatencyRecorder` in shared memory. Without ``--rate``: unloaded latency, ping-pong (the
  receiver echoes each message back, and the sender sends the next one only when the echo came
  back). With ``--rate N``: a fixed-rate sender, message i due at ``start + i/N`` and stamped with
  that *intended* time, no echo: a stall anywhere (the sender, the queue, the receiver) shows up as
  latency of every message that was due during it, instead of hiding as fewer samples
  (coordinated omission). Messages the sender sent more than one interval late are counted.
* ``throughput``: one producer sends as fast as it can (``--rate``: at that rate) for
  ``--duration``, one consumer receives: messages and bytes per second from the producer's first
  send to the consumer's last receive, and the messages received per 50 ms (the timeline).
* ``fanout``: a router (``shmq.Router``) in its own process, one publisher, ``--subscribers N``
  subscribers: per subscriber, publish-to-receive latency (from the intended time with
  ``--rate``) and the delivered rate. Without ``--rate`` the publisher runs flat out, so latency
  includes the queueing behind full rings: use ``--rate`` for latency at a given load.

Queue scenarios use ``--kind`` rings (default spsc); ``--wait`` is how every shmq waiter waits
(the router's too). Peers (``--compare``): multiprocessing.Queue, multiprocessing.Pipe,
faster-fifo, pyzmq (PAIR over ipc://; PUB/SUB for the fan-out, lossy past its high-water mark)
and iceoryx2; with ``--wait spin`` they busy-poll, otherwise they block in their own calls.
Ratios: throughput shmq / peer, latency peer p50 / shmq p50 (both: how many times better shmq is).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, NoReturn

import click

from shmq import _bench_peers
from shmq._errors import InvalidArgument, NotFound, ShmqError
from shmq._native import _ring
from shmq.latency import LatencyRecorder, LatencySummary
from shmq.queue import DEFAULT_CAPACITY, KINDS, WAITS, Kind, Wait
from shmq.testing import list_segments, remove_segment, unique_name

__all__ = [
    "IMPLEMENTATIONS",
    "PEERS",
    "SCENARIOS",
    "BenchConfig",
    "BenchError",
    "BenchReport",
    "CellResult",
    "LatencyResult",
    "SubscriberResult",
    "bench_command",
    "render",
    "run",
]

SCENARIOS = ("latency", "throughput", "fanout")
IMPLEMENTATIONS = ("shmq", "mp.Queue", "mp.Pipe", "faster-fifo", "pyzmq", "iceoryx2")
PEERS = IMPLEMENTATIONS[1:]
_MODULES = {"faster-fifo": "faster_fifo", "pyzmq": "zmq", "iceoryx2": "iceoryx2"}
_DISTRIBUTIONS = {"faster-fifo": "faster-fifo", "pyzmq": "pyzmq", "iceoryx2": "iceoryx2"}
MIN_SIZE = _bench_peers.HEADER.size
#: bytes a bus message needs beside its payload (frame, bus header, topic): a generous bound
_BUS_OVERHEAD = 256
_TOPIC = "bench"
_CTX = multiprocessing.get_context("spawn")
_SETUP_TIMEOUT_S = 60.0
_PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9), ("p9999", 99.99))
TIMES = "\u00d7"


class BenchError(ShmqError):
    """A measurement could not be made (a worker failed, died or did not answer)."""


# -- settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; `validate()` says what is wrong with it, if anything."""

    scenario: str
    sizes: tuple[int, ...] = (64,)
    kind: Kind = "spsc"
    wait: Wait = "adaptive"
    rate: float | None = None  #: messages per second of a fixed-rate sender; None: see the scenario
    duration: float = 3.0  #: seconds measured, per cell
    warmup: float = 0.5  #: seconds of warm-up before each measurement
    subscribers: int = 4  #: fanout
    capacity: int | None = None  #: shmq ring bytes; None: 1 MiB, or enough for 4 messages
    peers: tuple[str, ...] = ()  #: implementations measured beside shmq
    inject_stall_ms: float = 0.0  #: the receiver sleeps this long once, halfway through

    def validate(self) -> None:
        if self.scenario not in SCENARIOS:
            raise InvalidArgument(f"scenario must be one of {', '.join(SCENARIOS)}, got {self.scenario!r}")
        if not self.sizes:
            raise InvalidArgument("give at least one message size")
        for size in self.sizes:
            largest = self.largest_size()
            if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= largest:
                raise InvalidArgument(
                    f"message size must be {MIN_SIZE} to {largest:,} bytes (each message starts with a "
                    f"sequence number and a time stamp{self._capacity_hint()}), got {size}"
                )
        if self.kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.wait not in WAITS:
            raise InvalidArgument(f"wait must be one of {', '.join(WAITS)}, got {self.wait!r}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise InvalidArgument(
                f"rate is messages per second, more than 0, got {self.rate}; leave it out to send "
                "as fast as possible (latency: ping-pong)"
            )
        for label, value in (("duration", self.duration), ("warm-up", self.warmup)):
            if not math.isfinite(value) or value < 0 or (label == "duration" and value == 0):
                raise InvalidArgument(
                    f"{label} is seconds, {'more than' if label == 'duration' else 'from'} 0, got {value}"
                )
        if (
            isinstance(self.subscribers, bool)
            or not isinstance(self.subscribers, int)
            or self.subscribers < 1
        ):
            raise InvalidArgument(f"a fan-out needs at least 1 subscriber, got {self.subscribers}")
        if self.capacity is not None:
            lo, hi = _ring.MIN_CAPACITY, _ring.MAX_CAPACITY
            if self.capacity < lo or self.capacity > hi or self.capacity & (self.capacity - 1):
                raise InvalidArgument(
                    f"capacity must be a power of two from {lo} to {hi} bytes, got {self.capacity}"
                )
        for peer in self.peers:
            if peer not in PEERS:
                raise InvalidArgument(f"peers are {', '.join(PEERS)}, got {peer!r}")
        if not math.isfinite(self.inject_stall_ms) or self.inject_stall_ms < 0:
            raise InvalidArgument(f"a stall is milliseconds from 0, got {self.inject_stall_ms}")

    def largest_size(self) -> int:
        overhead = _BUS_OVERHEAD if self.scenario == "fanout" else 0
        capacity = self.capacity or _ring.MAX_CAPACITY
        return capacity // 2 - 8 - overhead

    def _capacity_hint(self) -> str:
        if self.capacity is None:
            return ""
        return (
            f"; a ring of {self.capacity:,} bytes carries at most {self.largest_size():,}: raise --capacity"
        )

    def capacity_for(self, size: int) -> int:
        if self.capacity is not None:
            return self.capacity
        need = 4 * (size + 8 + (_BUS_OVERHEAD if self.scenario == "fanout" else 0))
        return min(_ring.MAX_CAPACITY, max(DEFAULT_CAPACITY, 1 << (need - 1).bit_length()))

    @property
    def implementations(self) -> tuple[str, ...]:
        return ("shmq", *[p for p in PEERS if p in self.peers])

    def describe(self) -> str:
        """The scenario in words, for the table's title."""
        if self.scenario == "latency":
            what = (
                f"one-way latency, fixed rate {self.rate:,g} msg/s, measured from each message's "
                "intended send time"
                if self.rate
                else "one-way latency, ping-pong (each message goes when the previous one came back)"
            )
        elif self.scenario == "throughput":
            what = "throughput, one producer to one consumer, " + (
                f"offered at {self.rate:,g} msg/s" if self.rate else "as fast as the producer can"
            )
        else:
            what = f"fan-out, 1 publisher to {self.subscribers} subscriber(s) through a router, " + (
                f"fixed rate {self.rate:,g} msg/s, latency from the intended send time"
                if self.rate
                else "as fast as the publisher can (latency includes queueing: use --rate)"
            )
        ring = "" if self.scenario == "fanout" else f"{self.kind} rings, "
        return f"{what}; {ring}wait={self.wait}; {self.warmup:g} s warm-up, {self.duration:g} s measured"


# -- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult(LatencySummary):
    """A latency summary (ns) and its percentile spectrum: (percentile, ns) pairs."""

    spectrum: list[tuple[float, int]] = field(default_factory=list)

    @classmethod
    def of(cls, recorder: LatencyRecorder) -> LatencyResult:
        s = recorder.summary()
        points: list[tuple[float, int]] = []
        if s.count:
            # 20 points per decade of 1/(1-p) (the HdrHistogram plot), up to what the count resolves.
            top = math.log10(max(2, s.count))
            k = 0
            while k / 20 <= top:
                p = 100.0 * (1.0 - 10 ** (-k / 20))
                points.append((round(p, 6), recorder.percentile(p)))
                k += 1
            points.append((100.0, s.max))

        # A percentile is the top of its bucket (within 0.1 %): never report one past the extremes.
        def clamp(ns: int) -> int:
            return min(max(ns, s.min), s.max)

        points = [(p, clamp(ns)) for p, ns in points]
        tail = (clamp(s.p50), clamp(s.p90), clamp(s.p99), clamp(s.p999), clamp(s.p9999))
        return cls(s.count, s.mean, s.min, *tail, s.max, points)


@dataclass
class SubscriberResult:
    index: int
    received: int
    msgs_per_s: float
    latency: LatencyResult | None


@dataclass
class CellResult:
    """One implementation at one message size. status: "ok", "not installed", "n/a" or "error"
    (`note` says why)."""

    impl: str
    size: int
    status: str = "ok"
    note: str = ""
    sent: int = 0
    due: int = 0  #: fixed rate: messages due in the run (sent < due when the sender fell behind)
    received: int = 0  #: fanout: by all subscribers together
    elapsed_s: float = 0.0
    msgs_per_s: float = 0.0  #: fanout: of the slowest subscriber
    bytes_per_s: float = 0.0
    late_sends: int = 0
    max_late_ns: int = 0
    latency: LatencyResult | None = None  #: fanout: all subscribers together
    subscribers: list[SubscriberResult] = field(default_factory=list)
    #: (middle of a 50 ms bucket in seconds since the first measured send, messages received per
    #: second in it); the first and last buckets are partly outside the run
    timeline: list[tuple[float, float]] = field(default_factory=list)
    busy: int = 0  #: processes that poll or run flat out instead of sleeping when idle
    processes: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class BenchReport:
    config: BenchConfig
    results: list[CellResult]
    machine: dict[str, Any]
    started: str
    table: str = ""

    def to_json(self) -> dict[str, Any]:
        settings = asdict(self.config)
        settings["implementations"] = list(self.config.implementations)
        return {
            "shmq_version": _version("shmq"),
            "started": self.started,
            "settings": settings,
            "machine": self.machine,
            "units": "latencies in ns, rates per second",
            "results": [asdict(r) for r in self.results],
            "table": self.table,
        }


# -- availability ---------------------------------------------------------------------------------


def _version(distribution: str) -> str:
    if distribution == "shmq":
        import shmq

        return shmq.__version__
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def unavailable(impl: str, scenario: str) -> tuple[str, str] | None:
    """(status, why) if `impl` cannot run `scenario` here, else None."""
    module = _MODULES.get(impl)
    if module is not None and importlib.util.find_spec(module) is None:
        return "not installed", f"pip install {_DISTRIBUTIONS[impl]}"
    return None


def machine_facts(config: BenchConfig) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "shmq": _version("shmq"),
    }
    for impl in config.peers:
        if impl in _DISTRIBUTIONS:
            facts[impl] = _version(_DISTRIBUTIONS[impl])
    return facts


# -- workers --------------------------------------------------------------------------------------


class _Workers:
    """The spawned processes of one cell, driven over control pipes."""

    def __init__(self, tick: Callable[[], None]) -> None:
        #: checks run while waiting (e.g. that the router still runs); each raises BenchError
        self.watches: list[Callable[[], None]] = []
        self.procs: dict[str, Any] = {}
        self.ctrl: dict[str, Connection] = {}
        self.inbox: dict[str, list[tuple[str, Any]]] = {}  # answers read early, while watching
        self.tick = tick

    def start(self, role: str, impl: str, plan: dict[str, Any], handles: dict[str, Any]) -> None:
        parent_end, child_end = _CTX.Pipe()
        kind = "sender" if role == "sender" else "receiver"
        proc = _CTX.Process(
            target=_bench_peers.worker,
            args=(kind, impl, plan, handles, child_end),
            name=f"shmq-bench-{impl}-{role}",
            daemon=True,
        )
        # The child inherits the blocked SIGINT and ignores it before unblocking it, so a Ctrl-C
        # during its start-up reaches only us (we stop it and clean up).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        child_end.close()
        self.procs[role], self.ctrl[role] = proc, parent_end

    def tell(self, role: str, what: str, value: Any = None) -> None:
        self.ctrl[role].send((what, value))

    def _receive(self, role: str) -> tuple[str, Any]:
        try:
            said, value = self.ctrl[role].recv()
        except EOFError:
            proc = self.procs[role]
            proc.join(1)
            raise BenchError(f"the {role} process died (exit code {proc.exitcode})") from None
        if said == "error":
            raise BenchError(f"the {role} process failed: {str(value).strip().splitlines()[-1]}")
        return said, value

    def _watch_others(self, role: str) -> None:
        """Raise at once if another worker failed or died (this one may wait for it forever)."""
        for watch in self.watches:
            watch()
        for other, conn in self.ctrl.items():
            if other == role:
                continue
            if conn.poll():
                self.inbox.setdefault(other, []).append(self._receive(other))
            elif not self.procs[other].is_alive() and not conn.poll():
                raise BenchError(f"the {other} process died (exit code {self.procs[other].exitcode})")

    def expect(self, role: str, what: str, timeout: float) -> Any:
        """Wait for `what` from `role` (ticking the progress meanwhile); raise BenchError on an
        error, a death or silence of any worker."""
        waiting = self.inbox.get(role)
        if waiting:
            said, value = waiting.pop(0)
        else:
            conn, proc = self.ctrl[role], self.procs[role]
            deadline = time.monotonic() + timeout
            while not conn.poll(0.05):
                self.tick()
                self._watch_others(role)
                if not proc.is_alive() and not conn.poll():
                    raise BenchError(f"the {role} process died (exit code {proc.exitcode})")
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"the {role} process said nothing for {timeout:.0f} s (expected {what!r})"
                    )
            said, value = self._receive(role)
        if said != what:
            raise BenchError(f"the {role} process said {said!r}, expected {what!r}")
        return value

    def close(self, patience: float = 5.0) -> None:
        """Ask every worker to quit; stop those still running after `patience` seconds."""
        for conn in self.ctrl.values():
            with contextlib.suppress(OSError):
                conn.send(("quit", None))
        deadline = time.monotonic() + patience
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for conn in self.ctrl.values():
            conn.close()
        self.procs.clear()
        self.ctrl.clear()


# -- channels -------------------------------------------------------------------------------------


def _make_channels(
    impl: str, config: BenchConfig, size: int, receivers: int, echo: bool, stack: contextlib.ExitStack
) -> tuple[dict[str, Any], list[dict[str, Any]], Callable[[], None], Any]:
    """Create what the workers share: (sender's handles, each receiver's handles, what to do once
    they started, the router or None). Everything is closed or removed by `stack`."""
    fanout = config.scenario == "fanout"
    capacity = config.capacity_for(size)
    after_start: Callable[[], None] = lambda: None  # noqa: E731
    if impl == "shmq" and fanout:
        from shmq.router import Router

        bus = unique_name("bench")
        # (last out: the rings the clients made, if a client was killed before it could remove its own)
        stack.callback(_remove_leftovers, f"bus.{bus}.")
        router = Router(bus, wait=config.wait)
        stack.callback(router.stop)
        router.start()
        handles: dict[str, Any] = {"bus": bus, "topic": _TOPIC}
        return handles, [dict(handles) for _ in range(receivers)], after_start, router
    if impl == "shmq":
        from shmq.queue import Queue

        names = [unique_name("bench") for _ in range(2 if echo else 1)]
        for name in names:
            q = Queue(name, create=True, capacity=capacity, kind=config.kind, wait=config.wait)
            stack.callback(_close_queue, q)
        handles = {"forward": names[0], "back": names[1] if echo else None}
        return handles, [handles], after_start, None
    if impl in ("mp.Queue", "faster-fifo"):
        if impl == "mp.Queue":
            maxsize = max(16, capacity // (size + 8))

            def make() -> Any:
                q = _CTX.Queue(maxsize)
                stack.callback(_close_mp_queue, q)
                return q
        else:
            faster_fifo = importlib.import_module("faster_fifo")

            def make() -> Any:
                q = faster_fifo.Queue(max_size_bytes=capacity, loads=bytes, dumps=bytes)
                stack.callback(q.close)
                return q

        forward = [make() for _ in range(receivers)]
        back = make() if echo else None
        sender = {"forward": forward, "back": back}
        return sender, [{**sender, "index": i} for i in range(receivers)], after_start, None
    if impl == "mp.Pipe":
        pairs = [_CTX.Pipe(duplex=echo) for _ in range(receivers)]
        # Pipe(duplex=False) is (receiving end, sending end); a duplex pipe's ends both do both.
        ends = [(a, b) if echo else (b, a) for a, b in pairs]  # (sender's end, receiver's end)
        sender = {"sender": [s for s, _ in ends]}
        receiver_ends = [r for _, r in ends]

        def close_ours() -> None:
            for a, b in pairs:
                a.close()
                b.close()

        stack.callback(close_ours)
        return sender, [{"receiver": receiver_ends, "index": i} for i in range(receivers)], close_ours, None
    if impl == "pyzmq":
        directory = tempfile.mkdtemp(prefix="shmq-bench-")
        stack.callback(_remove_tree, directory)
        handles = {"address": f"ipc://{os.path.join(directory, 'bench.sock')}"}
        return handles, [handles for _ in range(receivers)], after_start, None
    if impl == "iceoryx2":
        base = unique_name("shmq-bench")
        handles = {"forward": base, "back": base + "-back"}
        return handles, [handles for _ in range(receivers)], after_start, None
    raise InvalidArgument(f"unknown implementation {impl!r}")


def _close_queue(q: Any) -> None:
    q.close()
    with contextlib.suppress(NotFound):
        q.unlink()


def _close_mp_queue(q: Any) -> None:
    q.close()
    q.cancel_join_thread()


def _remove_tree(directory: str) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


def _remove_leftovers(prefix: str) -> None:
    for name in list_segments(prefix):
        remove_segment(name)


# -- one cell -------------------------------------------------------------------------------------


def _busy(config: BenchConfig, impl: str) -> tuple[int, int]:
    """(processes that poll or run flat out, processes) in a cell of `impl`."""
    polls = config.wait == "spin" or (impl == "shmq" and config.wait == "yield")
    if impl == "shmq" and config.wait == "adaptive":
        # An adaptive waiter spins ~50 µs before it sleeps: messages closer than that keep it spinning.
        polls = config.rate is None or 1e9 / config.rate < 50_000
    # A paced sender spins the last stretch before each due time: below ~150 µs between
    # messages it never sleeps.
    sender_spins = config.rate is None or polls or 1e9 / config.rate < 150_000
    if config.scenario == "latency":
        if config.rate is None:
            return (2 if polls else 0), 2
        return int(sender_spins) + int(polls), 2
    if config.scenario == "throughput":
        return (2 if config.rate is None else int(sender_spins) + int(polls)), 2
    subscribers = config.subscribers
    router = 1 if impl == "shmq" else 0
    if config.rate is None:  # everybody flat out
        return 1 + router + subscribers, 1 + router + subscribers
    return int(sender_spins) + (router + subscribers) * int(polls), 1 + router + subscribers


def _run_cell(impl: str, config: BenchConfig, size: int, progress: Callable[[float], None]) -> CellResult:
    result = CellResult(impl, size)
    result.busy, result.processes = _busy(config, impl)
    missing = unavailable(impl, config.scenario)
    if missing is not None:
        result.status, result.note = missing
        return result
    fanout = config.scenario == "fanout"
    echo = config.scenario == "latency" and config.rate is None
    receivers = config.subscribers if fanout else 1
    records = config.scenario != "throughput"
    plan = {
        "size": size,
        "wait": config.wait,
        "rate": config.rate or 0.0,
        "duration": config.duration,
        "echo": echo,
        "fanout": fanout,
        "stamp": records or bool(config.rate),
        "subscribers": receivers,
        "capacity": config.capacity_for(size),
        "stall_ms": config.inject_stall_ms,
    }
    expected = config.warmup + config.duration
    measuring_since: list[float] = []  # set once the workers run (setup counts as 0 %)

    def tick() -> None:
        if measuring_since:
            progress(min(0.99, (time.monotonic() - measuring_since[0]) / max(expected, 1e-3)))

    with contextlib.ExitStack() as stack:
        sender, receiver_handles, after_start, router = _make_channels(
            impl, config, size, receivers, echo, stack
        )
        recorders: list[LatencyRecorder] = []
        if records:
            for _ in range(receivers):
                recorder = LatencyRecorder(unique_name("bench"), create=True)
                stack.callback(_drop_recorder, recorder)
                recorders.append(recorder)
        workers = _Workers(tick)
        stack.push(functools.partial(_close_workers, workers))
        if router is not None:
            workers.watches.append(functools.partial(_check_router, router))
        roles = [f"receiver {i + 1}" if fanout else "receiver" for i in range(receivers)]
        for i, role in enumerate(roles):
            worker_plan = {**plan, "recorder": recorders[i].name if records else None}
            workers.start(role, impl, worker_plan, receiver_handles[i])
        workers.start("sender", impl, plan, sender)
        after_start()
        for role in [*roles, "sender"]:
            workers.expect(role, "ready", _SETUP_TIMEOUT_S)
        for role in [*roles, "sender"]:
            workers.tell(role, "run")
        measuring_since.append(time.monotonic())
        for role in roles:
            workers.expect(role, "warm", _SETUP_TIMEOUT_S)
        while time.monotonic() - measuring_since[0] < config.warmup:
            tick()
            time.sleep(0.02)
        workers.tell("sender", "go")
        # A fixed-rate sender that falls behind gives up at twice the duration.
        timeout = 3 * config.duration + _SETUP_TIMEOUT_S
        answers = [workers.expect(role, "done", timeout) for role in roles]
        if fanout:
            workers.tell("sender", "stop")
        sent = workers.expect("sender", "done", _SETUP_TIMEOUT_S)
        progress(1.0)
        _fill(result, config, sent, answers, recorders)
    return result


def _close_workers(workers: _Workers, exc_type: type[BaseException] | None, *_: object) -> None:
    # After a success the workers are quitting by themselves; after Ctrl-C or a failure they may be
    # in the middle of a loop that never reads the control pipe again: stop them at once.
    workers.close(patience=5.0 if exc_type is None else 0.2)


def _check_router(router: Any) -> None:
    if not router.is_alive():
        raise BenchError(f"the router of bus {router.bus!r} stopped during the run")


def _drop_recorder(recorder: LatencyRecorder) -> None:
    recorder.close()
    with contextlib.suppress(NotFound):
        recorder.unlink()


def _fill(
    result: CellResult,
    config: BenchConfig,
    sent: dict[str, Any],
    answers: list[dict[str, Any]],
    recorders: list[LatencyRecorder],
) -> None:
    t0 = sent["t0"]
    result.sent, result.due = sent["sent"], sent["due"]
    result.late_sends, result.max_late_ns = sent["late"], sent["max_late_ns"]
    rates = []
    for i, answer in enumerate(answers):
        elapsed = max(1, answer["t_last"] - t0) / 1e9
        rate = answer["received"] / elapsed if answer["received"] else 0.0
        rates.append(rate)
        latency = LatencyResult.of(recorders[i]) if recorders else None
        if latency is not None and latency.count != answer["received"]:
            raise BenchError(
                f"{result.impl}: receiver {i + 1} counted {answer['received']} messages but recorded "
                f"{latency.count} latencies"
            )
        result.subscribers.append(SubscriberResult(i + 1, answer["received"], rate, latency))
    result.received = sum(a["received"] for a in answers)
    result.elapsed_s = max(1, max(a["t_last"] for a in answers) - t0) / 1e9
    result.msgs_per_s = min(rates) if rates else 0.0
    result.bytes_per_s = result.msgs_per_s * result.size
    if recorders:
        if len(recorders) == 1:
            result.latency = result.subscribers[0].latency
        else:
            merged = LatencyRecorder()
            for recorder in recorders:
                merged.merge(recorder)
            result.latency = LatencyResult.of(merged)
    if config.scenario != "fanout":
        result.subscribers = []
    buckets: dict[int, int] = {}
    for answer in answers:
        for bucket, count in answer["timeline"]:
            buckets[bucket] = buckets.get(bucket, 0) + count
    width = _bench_peers.TIMELINE_BUCKET_NS
    result.timeline = [
        (round((bucket * width + width // 2 - t0) / 1e9, 3), count * 1e9 / width)
        for bucket, count in sorted(buckets.items())
    ]


# -- the run --------------------------------------------------------------------------------------


def run(
    config: BenchConfig,
    progress: Callable[[int, int, float, str], None] | None = None,
) -> BenchReport:
    """Measure every implementation of `config` at every size. `progress(cell, cells, fraction of
    this cell done, label)` is called while it runs (from this thread)."""
    config.validate()
    cells = [(impl, size) for size in config.sizes for impl in config.implementations]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results: list[CellResult] = []
    for n, (impl, size) in enumerate(cells):
        label = f"{impl} {size} B"

        def step(fraction: float, n: int = n, label: str = label) -> None:
            if progress is not None:
                progress(n, len(cells), fraction, label)

        step(0.0)
        try:
            results.append(_run_cell(impl, config, size, step))
        except BenchError as exc:
            if impl == "shmq":
                raise
            results.append(CellResult(impl, size, status="error", note=str(exc)))
    report = BenchReport(config, results, machine_facts(config), started)
    report.table = render(report)
    return report


# -- the table ------------------------------------------------------------------------------------


def _us(ns: float) -> str:
    us = ns / 1000
    if us < 10:
        return f"{us:.2f}"
    if us < 1000:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def _rate(per_s: float) -> str:
    if per_s >= 1e6:
        return f"{per_s / 1e6:.2f} M"
    if per_s >= 1e3:
        return f"{per_s / 1e3:.1f} k"
    return f"{per_s:.0f}"


def _ratio(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}{TIMES}"
    return f"{x:.1f}{TIMES}" if x >= 1 else f"{x:.2g}{TIMES}"


def _table(header: Sequence[str], rows: list[list[str]], left: int = 2) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _shmq_cell(report: BenchReport, size: int) -> CellResult | None:
    for r in report.results:
        if r.impl == "shmq" and r.size == size and r.ok:
            return r
    return None


def _latency_cells(lat: LatencyResult | None) -> list[str]:
    if lat is None or not lat.count:
        return ["-"] * 8
    return [f"{lat.count:,}", *(_us(getattr(lat, k)) for k, _ in _PERCENTILES), _us(lat.max), _us(lat.mean)]


def _busy_line(report: BenchReport) -> str:
    config = report.config
    cpus = report.machine.get("cpus_usable") or report.machine.get("cpu_count") or 1
    shmq = next((r for r in report.results if r.impl == "shmq"), None)
    if shmq is None:
        return ""
    peers = [r for r in report.results if r.impl != "shmq" and r.ok]
    text = f"Busy processes (spinning, or running flat out): shmq {shmq.busy} of {shmq.processes}"
    if peers:
        text += f"; peers {peers[0].busy} of {peers[0].processes}"
    text += f"; {cpus} CPU(s)."
    if config.wait == "spin":
        text += " wait=spin: every waiting process burns a core"
    elif config.wait == "yield":
        text += " wait=yield: waiting processes loop on sched_yield"
    elif config.wait == "adaptive":
        text += (
            " wait=adaptive: a waiter spins up to ~50 µs, then sleeps (messages closer than that keep "
            "it spinning)"
        )
    else:
        text += " wait=block: waiters sleep in the kernel at once"
    if any(r.busy > cpus for r in report.results if r.ok):
        text += (
            f". More busy processes than CPUs: they take turns on {cpus} core(s), and latency grows to "
            "the scheduler's time slices (milliseconds)"
        )
    return text + "."


def render(report: BenchReport) -> str:
    """The result as text: the settings, one table, the ratios and what to keep in mind."""
    config = report.config
    lines = [f"shmq bench {config.scenario}: {config.describe()}", ""]
    latency_header = ["count", "p50", "p90", "p99", "p99.9", "p99.99", "max", "mean"]
    compare = len(config.implementations) > 1
    rows: list[list[str]] = []
    notes: list[str] = []
    if config.scenario == "latency":
        header = ["impl", "size", *latency_header]
        if config.rate:
            header.append("late sends")
        if compare:
            header.append("shmq " + TIMES)
        for r in report.results:
            row = [r.impl, f"{r.size} B"]
            if not r.ok:
                rows.append([*row, r.status, *[""] * (len(header) - 3)])
                notes.append(f"{r.impl}: {r.status}: {r.note}")
                continue
            row += _latency_cells(r.latency)
            if config.rate:
                row.append(_late(r))
            if compare:
                row.append(_latency_ratio(report, r))
            rows.append(row)
        lines += _table(header, rows)
        lines.append("Latencies in µs; count = messages received and measured.")
    elif config.scenario == "throughput":
        header = ["impl", "size", "sent", "received", "msgs/s", "MB/s", "seconds"]
        if config.rate:
            header.append("late sends")
        if compare:
            header.append("shmq " + TIMES)
        for r in report.results:
            row = [r.impl, f"{r.size} B"]
            if not r.ok:
                rows.append([*row, r.status, *[""] * (len(header) - 3)])
                notes.append(f"{r.impl}: {r.status}: {r.note}")
                continue
            row += [
                f"{r.sent:,}",
                f"{r.received:,}",
                _rate(r.msgs_per_s),
                f"{r.bytes_per_s / 1e6:,.1f}",
                f"{r.elapsed_s:.2f}",
            ]
            if config.rate:
                row.append(_late(r))
            if compare:
                row.append(_throughput_ratio(report, r))
            rows.append(row)
        lines += _table(header, rows)
        lines.append("Rates from the producer's first measured send to the consumer's last receive.")
    else:
        header = ["impl", "size", "subscriber", "received", "lost", "msgs/s", *latency_header]
        if config.rate:
            header.append("late sends")
        if compare:
            header += ["shmq " + TIMES + " rate", "shmq " + TIMES + " p50"]
        for r in report.results:
            row = [r.impl, f"{r.size} B"]
            if not r.ok:
                rows.append([*row, r.status, *[""] * (len(header) - 3)])
                notes.append(f"{r.impl}: {r.status}: {r.note}")
                continue
            for s in r.subscribers:
                sub = [*row, str(s.index), f"{s.received:,}", f"{r.sent - s.received:,}", _rate(s.msgs_per_s)]
                sub += _latency_cells(s.latency)
                rows.append(sub + [""] * (len(header) - len(sub)))
            total = [*row, "all", f"{r.received:,}", f"{r.sent * len(r.subscribers) - r.received:,}"]
            total += [_rate(r.msgs_per_s) + " (slowest)", *_latency_cells(r.latency)]
            if config.rate:
                total.append(_late(r))
            if compare:
                total += [_throughput_ratio(report, r), _latency_ratio(report, r)]
            rows.append(total)
        lines += _table(header, rows)
        lines.append(
            "Latencies in µs (publish to receive); lost = published but not received (only a lossy "
            "peer loses: pyzmq PUB/SUB past its high-water mark)."
        )
        if "pyzmq" in config.implementations or any(
            p in config.implementations for p in ("mp.Queue", "mp.Pipe", "faster-fifo")
        ):
            lines.append(
                "Peers without a broker (multiprocessing, faster-fifo) write each message into one channel "
                "per subscriber; pyzmq PUB/SUB and iceoryx2 fan out by themselves."
            )
    if compare:
        lines.append(
            f"shmq {TIMES}: how many times better shmq did (throughput: shmq / peer; latency: peer p50 / "
            "shmq p50)."
        )
    if config.rate and any(r.late_sends or r.sent < r.due for r in report.results if r.ok):
        lines.append(
            "late sends: messages the sender sent more than one interval after they were due (their "
            "latency counts from the due time); a sender that cannot keep up stops at twice --duration."
        )
    busy = _busy_line(report)
    if busy:
        lines.append(busy)
    lines += notes
    return "\n".join(lines)


def _late(r: CellResult) -> str:
    text = f"{r.late_sends:,}"
    if r.late_sends:
        text += f" (max {_us(r.max_late_ns)} µs)"
    if r.sent < r.due:
        text += f", {r.due - r.sent:,} never sent"
    return text


def _latency_ratio(report: BenchReport, r: CellResult) -> str:
    base = _shmq_cell(report, r.size)
    if r.impl == "shmq" or base is None or base.latency is None or r.latency is None or not base.latency.p50:
        return ""
    return _ratio(r.latency.p50 / base.latency.p50)


def _throughput_ratio(report: BenchReport, r: CellResult) -> str:
    base = _shmq_cell(report, r.size)
    if r.impl == "shmq" or base is None or not r.msgs_per_s:
        return ""
    return _ratio(base.msgs_per_s / r.msgs_per_s)


# -- the command ----------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _usage(message: str) -> NoReturn:
    raise click.UsageError(message)


@contextlib.contextmanager
def _progress_bar(cells: int) -> Iterator[Callable[[int, int, float, str], None] | None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("shmq bench: {task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=cells)

        def update(cell: int, total: int, fraction: float, label: str) -> None:
            bar.update(task, completed=cell + fraction, description=f"{label} ({cell + 1}/{total})")

        yield update


@click.command("bench")
@click.argument("scenario", type=click.Choice(SCENARIOS))
@click.option(
    "--size",
    "sizes",
    type=int,
    multiple=True,
    metavar="BYTES",
    help=f"Message size in bytes (from {MIN_SIZE}); repeat for one row per size.  [default: 64]",
)
@click.option(
    "--kind", type=click.Choice(list(KINDS)), help="Ring kind of the queue scenarios.  [default: spsc]"
)
@click.option(
    "--wait",
    type=click.Choice(list(WAITS)),
    default="adaptive",
    show_default=True,
    help="How shmq waiters wait (subscribers and router too); peers busy-poll with spin, else block.",
)
@click.option(
    "--rate",
    type=float,
    metavar="N",
    help="Fixed-rate sender, N messages/s, latency measured from each message's intended send time "
    "(coordinated omission). Without it: latency is ping-pong, throughput and fanout flat out.",
)
@click.option(
    "--duration", type=float, default=3.0, show_default=True, metavar="S", help="Seconds measured per row."
)
@click.option(
    "--warmup", type=float, default=0.5, show_default=True, metavar="S", help="Seconds of warm-up per row."
)
@click.option("--subscribers", type=int, metavar="N", help="fanout: subscribers.  [default: 4]")
@click.option(
    "--capacity",
    type=int,
    metavar="BYTES",
    help="shmq ring size (a power of two).  [default: 1 MiB, or 4 messages]",
)
@click.option("--compare", is_flag=True, help="Also measure every installed peer and print ratios.")
@click.option(
    "--peer",
    "peers",
    type=click.Choice(PEERS),
    multiple=True,
    help="Compare with this peer only (repeatable; implies --compare).",
)
@click.option(
    "--inject-stall",
    type=float,
    default=0.0,
    metavar="MS",
    help="Pause the receiver once, halfway through, for MS milliseconds: shows how a stall appears "
    "(with --rate every message due during it counts it).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Write every result, the settings and the machine to FILE.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    metavar="FILE.png",
    help="Write the latency spectrum and throughput over time (needs matplotlib).",
)
def bench_command(
    scenario: str,
    sizes: tuple[int, ...],
    kind: str | None,
    wait: str,
    rate: float | None,
    duration: float,
    warmup: float,
    subscribers: int | None,
    capacity: int | None,
    compare: bool,
    peers: tuple[str, ...],
    inject_stall: float,
    json_path: str | None,
    plot_path: str | None,
) -> None:
    """Measure SCENARIO across real processes: latency (one-way), throughput (one producer, one
    consumer) or fanout (a router, one publisher, --subscribers subscribers).

    Prints p50/p90/p99/p99.9/p99.99/max/mean latency (µs) and rates; --compare runs the same
    measurement on multiprocessing.Queue, multiprocessing.Pipe, faster-fifo, pyzmq and iceoryx2
    where installed. Every shared-memory segment the run makes is removed at the end, also on
    Ctrl-C. Exit codes: 0 done, 1 a measurement failed, 2 bad input, 130 interrupted.
    """
    if subscribers is not None and scenario != "fanout":
        _usage("--subscribers is for the fanout scenario")
    if kind is not None and scenario == "fanout":
        _usage("--kind is for the latency and throughput scenarios (a fan-out goes through a router)")
    if compare and not peers:
        peers = PEERS
    config = BenchConfig(
        scenario=scenario,
        sizes=sizes or (64,),
        kind=kind or "spsc",  # type: ignore[arg-type]
        wait=wait,  # type: ignore[arg-type]
        rate=rate,
        duration=duration,
        warmup=warmup,
        subscribers=4 if subscribers is None else subscribers,
        capacity=capacity,
        peers=tuple(peers),
        inject_stall_ms=inject_stall,
    )
    try:
        config.validate()
    except InvalidArgument as exc:
        _usage(str(exc))
    if plot_path is not None:
        from shmq import _plot

        try:
            _plot.require()
        except ImportError as exc:
            click.echo(f"shmq bench: {exc}", err=True)
            raise SystemExit(2) from None
    cells = len(config.sizes) * len(config.implementations)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up as Ctrl-C does
    try:
        with _progress_bar(cells) as progress:
            report = run(config, progress)
    except KeyboardInterrupt:
        click.echo("shmq bench: interrupted; everything it made was removed", err=True)
        raise SystemExit(130) from None
    except (BenchError, ShmqError, OSError) as exc:
        click.echo(f"shmq bench: {exc}", err=True)
        raise SystemExit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(report.table)
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump(report.to_json(), f, indent=1)
            f.write("\n")
    if plot_path is not None:
        from shmq import _plot

        _plot.write(report, plot_path)
        click.echo(f"plot: {plot_path}")
    if any(r.status == "error" for r in report.results):
        raise SystemExit(1)
