"""Worker functions for the pub/sub tests' spawned processes, and the parent-side helpers they need.

The rules of tests/_workers.py hold here too: workers are module-level functions (the spawn context
imports them by name); they report through files (pickles written atomically, or append-only
logs), never through shmq, so a bug in shmq cannot hide in the reporting channel; every blocking
call has a timeout, so a hang becomes a traceback and a non-zero exit code. Workers take their
orders from files the parent creates in a per-worker control directory, so no handshake relies on
a sleep being long enough. Received messages are dumped as `shmq.Message` objects, so every
multiprocess test also carries messages through pickle.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

import shmq
from shmq._native import _ring
from shmq._wire import encode_headers
from shmq.testing import list_segments, remove_segment
from tests._workers import dump, load, stop_all, wait_until

OP_TIMEOUT = 30.0  # seconds any single wait in a worker may take before it counts as a hang
GRACE_S = 0.2  # after the expected messages, how long a collector keeps listening for extra ones

# A publish step: ("one", topic, data, headers), ("many", topic, [data, ...], headers), ("sleep", s),
# or ("outage", topic, timeout): wait until the router is gone, then try one publish and record how it
# failed (the restart test).
Step = tuple[Any, ...]
# What a publisher reports for each message: (topic, seq, data, headers).
Record = tuple[str, int, bytes, dict[str, Any] | None]


def message_size(topic: str, data: bytes, headers: dict[str, Any] | None) -> int:
    """Bytes of a whole message as the router counts them: 40-byte header, topic, headers, payload."""
    return _ring.MSG_HEADER + len(topic.encode()) + len(encode_headers(headers or {})) + len(data)


def wait_for_file(path: str | Path, timeout: float = OP_TIMEOUT) -> None:
    if not wait_until(lambda: os.path.exists(path), timeout):
        raise TimeoutError(f"{path} did not appear within {timeout} s")


# -- publishers ----------------------------------------------------------------------------------


def publish_phases(bus: str, phases: Sequence[Sequence[Step]], control: str, capacity: int = 1 << 16) -> None:
    """Connect, then run each phase when the parent creates ``go<k>`` in `control`.

    Writes ``ready`` once connected and ``done<k>`` after each phase (so the parent knows what is
    out), then closes (linger: the router takes everything) and writes ``result``:
    (publisher_id, [Record, ...] in publish order, [outage outcome, ...]).
    """
    ctl = Path(control)
    records: list[Record] = []
    outages: list[tuple[str, str]] = []
    with shmq.Publisher(bus, capacity=capacity, connect_timeout=OP_TIMEOUT) as pub:
        dump(str(ctl / "ready"), pub.publisher_id)
        for k, phase in enumerate(phases):
            wait_for_file(ctl / f"go{k}")
            for step in phase:
                kind = step[0]
                if kind == "one":
                    _, topic, data, headers = step
                    seq = pub.publish(topic, data, headers=headers, timeout=OP_TIMEOUT)
                    records.append((topic, seq, data, headers))
                elif kind == "many":
                    _, topic, batch, headers = step
                    last = pub.publish_many(topic, batch, headers=headers, timeout=OP_TIMEOUT)
                    first = last - len(batch) + 1
                    records.extend((topic, first + i, data, headers) for i, data in enumerate(batch))
                elif kind == "sleep":
                    time.sleep(step[1])
                elif kind == "outage":
                    _, topic, timeout = step
                    if not wait_until(lambda: not pub.connected, OP_TIMEOUT):
                        raise TimeoutError("the router never went away")
                    try:
                        seq = pub.publish(topic, b"during the outage", timeout=timeout)
                        outages.append(("published", str(seq)))
                    except shmq.ShmqError as exc:
                        outages.append((type(exc).__name__, str(exc)))
                else:
                    raise ValueError(step)
            dump(str(ctl / f"done{k}"), len(records))
        publisher_id = pub.publisher_id
    dump(str(ctl / "result"), (publisher_id, records, outages))


# -- subscribers ---------------------------------------------------------------------------------


def collect(
    bus: str, patterns: str | list[str], options: dict[str, Any], control: str, stay: bool = False
) -> None:
    """Subscribe and receive until the parent says how many messages to expect, and they came.

    Writes ``ready`` (pid, ring name) once subscribed. The parent writes ``count`` when it knows
    the number (from its plan, or from the router's counters); the collector receives until it has
    that many, listens GRACE_S longer so that extra or duplicated messages show, and writes
    ``result``: ([Message, ...], its own final SubscriberStats). With `stay`, it then stays
    subscribed until ``exit`` appears, so the parent can read it in bus_stats.
    """
    ctl = Path(control)
    with shmq.Subscriber(bus, patterns, connect_timeout=OP_TIMEOUT, **options) as sub:
        dump(str(ctl / "ready"), (os.getpid(), sub.ring_name))
        got: list[shmq.Message] = []
        target: int | None = None
        deadline = time.monotonic() + 2 * OP_TIMEOUT
        while target is None or len(got) < target:
            if target is None and (ctl / "count").exists():
                target = load(str(ctl / "count"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"received {len(got)} messages, expected {target}")
            got.extend(sub.recv_many(256, timeout=0.05))
        got.extend(sub.recv_many(256, timeout=GRACE_S))
        dump(str(ctl / "result"), (got, sub.stats()))
        if stay:
            wait_for_file(ctl / "exit")


# -- queue group members -------------------------------------------------------------------------

INDEX = struct.Struct("<I")  # a group test's message starts with its index; members log the index


def group_message(index: int) -> bytes:
    return INDEX.pack(index) + bytes(32)


def read_log(path: str | Path) -> list[int]:
    """The indices a member logged (a torn last record, impossible with O_APPEND writes, is ignored)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return [i for (i,) in INDEX.iter_unpack(raw[: len(raw) - len(raw) % INDEX.size])]


def group_member(
    bus: str, pattern: str, group: str, capacity: int, control: str, leave_after: int = 0, how: str = ""
) -> None:
    """A queue group member logging each message's index with one O_APPEND write.

    Runs until ``done`` exists and its ring is empty. With `leave_after`, after logging that many:
    ``how="stop"`` stops itself with SIGSTOP (the parent then SIGKILLs it: a death at a known point,
    after the log write and before the next receive, with messages queued in its ring);
    ``how="close"`` closes the subscriber and exits (a graceful leave mid-stream).
    """
    ctl = Path(control)
    fd = os.open(ctl / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with shmq.Subscriber(bus, pattern, group=group, capacity=capacity, connect_timeout=OP_TIMEOUT) as sub:
        dump(str(ctl / "ready"), (os.getpid(), sub.ring_name))
        logged = 0
        deadline = time.monotonic() + 2 * OP_TIMEOUT
        while time.monotonic() < deadline:
            done = (ctl / "done").exists()  # read before the receive that finds the ring empty
            try:
                msg = sub.recv(timeout=0.05)
            except shmq.Empty:
                if done:
                    return
                continue
            os.write(fd, msg.data[: INDEX.size])
            logged += 1
            if logged == leave_after and how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
                raise SystemExit("resumed after SIGSTOP: the test should have killed this member")
            if logged == leave_after and how == "close":
                return
        raise TimeoutError("the done flag never appeared")


def close_link_only(bus: str, control: str) -> None:
    """Subscribe, then do only the first step of Subscriber.close() (hang up on the router), and
    wait to be killed: a client that dies in the middle of close(), or whose exit the router
    notices before the process is gone."""
    sub = shmq.Subscriber(bus, "closing.>", connect_timeout=OP_TIMEOUT)
    sub._link.close()
    dump(str(Path(control) / "ready"), sub.ring_name)
    time.sleep(2 * OP_TIMEOUT)
    raise TimeoutError("the test should have killed this subscriber")


# -- parent side -----------------------------------------------------------------------------------


class Children:
    """The test's child processes: started here, and resumed (SIGCONT) and killed in `stop`."""

    def __init__(self, ctx: Any, root: Path) -> None:
        self.ctx = ctx
        self.root = root
        self.procs: list[Any] = []

    def start(self, target: Any, name: str, *args: Any, **kwargs: Any) -> tuple[Any, Path]:
        """Start `target(*args, control_dir, **kwargs)`; returns the process and its control dir."""
        control = self.root / name
        control.mkdir()
        proc = self.ctx.Process(target=target, args=(*args, str(control)), kwargs=kwargs, name=name)
        self.procs.append(proc)
        proc.start()
        return proc, control

    def stop(self) -> None:
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGCONT)  # a stopped child must not stay stopped whatever happens
        stop_all(self.procs)


def await_file(proc: Any, path: Path, timeout: float = OP_TIMEOUT) -> Any:
    """Wait for a worker's report file (failing fast if the worker died first) and load it."""
    if not wait_until(lambda: path.exists() or not proc.is_alive(), timeout):
        raise AssertionError(f"{proc.name}: no {path.name} after {timeout} s")
    if not path.exists():
        proc.join(5)
        raise AssertionError(f"{proc.name} exited with code {proc.exitcode} before writing {path.name}")
    return load(str(path))


def join_ok(procs: Sequence[Any], timeout: float = OP_TIMEOUT) -> None:
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    codes = {p.name: p.exitcode for p in procs}
    assert all(code == 0 for code in codes.values()), f"a worker failed or hung: {codes}"


def is_stopped(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_STOPPED)
    except psutil.NoSuchProcess:
        return False


def subscriber_stats(bus: str, ring: str) -> shmq.SubscriberStats:
    """One subscriber's slot in bus_stats, found by its ring name."""
    for sub in shmq.bus_stats(bus).subscribers:
        if sub.ring == ring:
            return sub
    raise AssertionError(f"no subscriber with ring {ring} on bus {bus}")


def bus_segments(bus: str) -> list[str]:
    """The bus segment and every client ring of `bus` (rings are named bus.<bus>.p|s.<pid>.<n>)."""
    return [n for n in list_segments(f"bus.{bus}") if n == f"bus.{bus}" or n.startswith(f"bus.{bus}.")]


def ring_owner(bus: str, segment: str) -> int | None:
    """The pid in a client ring's name (bus.<bus>.p|s.<pid>.<n>), None for the bus segment."""
    parts = segment[len(f"bus.{bus}.") :].split(".")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


@contextmanager
def no_leaks(bus: str, excused: set[int] | None = None) -> Iterator[None]:
    """Fail if the bus's segments outlive the block (and remove them either way).

    Rings of the processes in `excused` (filled in by the time the block ends: children the test
    SIGKILLed) are removed without failing: removing a dead client's ring is the router's job,
    and it races the client's exit (test_ring_of_a_subscriber_killed_while_closing_is_removed)."""
    try:
        yield
    finally:
        leaked = bus_segments(bus)
        for n in leaked:
            remove_segment(n)
    blamed = [n for n in leaked if ring_owner(bus, n) not in (excused or set())]
    assert not blamed, f"segments left behind on bus {bus}: {blamed}"


def settle(bus: str, timeout: float = 5.0) -> None:
    """Before stopping a router: wait until every client has left and the router has removed what
    they left behind (a client that died is cleaned up a moment later: its ring once drained).

    Stopping the router first would strand those rings, and the leak check would blame the test."""

    def idle() -> bool:
        try:
            stats = shmq.bus_stats(bus)
        except shmq.NotFound:
            return True
        return not stats.publishers and not stats.subscribers and bus_segments(bus) == [f"bus.{bus}"]

    wait_until(idle, timeout, interval=0.02)


def settle_live(bus: str, timeout: float = 5.0) -> None:
    """`settle`, except that the rings of dead processes (crashed or killed children, which no
    router will hear from again) do not count: wait until every live client has left and the
    router has removed what they left behind."""

    def idle() -> bool:
        try:
            stats = shmq.bus_stats(bus)
        except shmq.NotFound:
            return True
        if stats.publishers or stats.subscribers:
            return False
        owners = [ring_owner(bus, n) for n in bus_segments(bus)]
        return not any(pid is not None and psutil.pid_exists(pid) for pid in owners)

    wait_until(idle, timeout, interval=0.02)
