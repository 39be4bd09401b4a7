"""Worker functions for the persistence tests' spawned processes (tests/test_persistence.py).

The rules of tests/_workers.py and tests/_pubsub_workers.py hold: module-level functions (the spawn
context imports them by name), orders taken from files in a per-worker control directory, results
reported through files (atomic pickles, or append-only logs of fixed-size records written with one
O_APPEND write each), never through shmq; every blocking call has a timeout.
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import time
from pathlib import Path
from typing import Any

import shmq
from tests._pubsub_workers import OP_TIMEOUT
from tests._workers import dump

COUNTER = struct.Struct("<Q")  # a numbered message's payload starts with its counter
OUTCOME = struct.Struct("<QB")  # (counter, outcome) records of the fault-injection publisher
CONFIRMED, ROUTER_UNAVAILABLE, NOT_DURABLE, LOG_WRITE_ERROR, FULL = 0, 1, 2, 3, 4
OUTCOME_OF = {
    shmq.RouterUnavailable: ROUTER_UNAVAILABLE,
    shmq.NotDurable: NOT_DURABLE,
    shmq.LogWriteError: LOG_WRITE_ERROR,
    shmq.Full: FULL,
}


def counter_message(counter: int, pad: int = 0) -> bytes:
    return COUNTER.pack(counter) + bytes(pad)


def read_outcomes(path: str | Path) -> list[tuple[int, int]]:
    """The (counter, outcome) records of an append-only outcome log (a torn tail is ignored)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return list(OUTCOME.iter_unpack(raw[: len(raw) - len(raw) % OUTCOME.size]))


# -- publishers ----------------------------------------------------------------------------------


def stream_counters(bus: str, topic: str, backlog: int, min_live: int, control: str) -> None:
    """Publish counters 0..backlog-1 (payload = counter), wait until the router took them all, write
    ``backlog``; then keep publishing the following counters in small batches while the parent's
    replaying subscriber catches up, until ``stop`` exists (and at least `min_live` more went out).
    Writes ``result``: how many counters were published in all."""
    ctl = Path(control)
    with shmq.Publisher(bus, capacity=1 << 20, connect_timeout=OP_TIMEOUT) as pub:
        counter = 0
        while counter < backlog:
            batch = [counter_message(c) for c in range(counter, min(counter + 500, backlog))]
            pub.publish_many(topic, batch, timeout=OP_TIMEOUT)
            counter += len(batch)
        if not pub.flush(OP_TIMEOUT):
            raise TimeoutError("the router did not take the backlog")
        dump(str(ctl / "backlog"), counter)
        deadline = time.monotonic() + 2 * OP_TIMEOUT
        while counter < backlog + min_live or not (ctl / "stop").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the stop flag never appeared")
            pub.publish_many(
                topic, [counter_message(c) for c in range(counter, counter + 20)], timeout=OP_TIMEOUT
            )
            counter += 20
            time.sleep(0.0005)  # (a stream, not a burst: the replay overlaps with live appends)
        if not pub.flush(OP_TIMEOUT):
            raise TimeoutError("the router did not take the live messages")
    dump(str(ctl / "result"), counter)


def fault_publisher(bus: str, topic: str, timeout: float, control: str) -> None:
    """The fault-injection publisher: publishes counter 0, 1, 2, ... (payload = counter) to a
    durable topic of a router with fsync="always", each once, and logs each counter's outcome to
    ``outcomes`` with one O_APPEND write *after* publish returned or raised (CONFIRMED only when
    publish returned: the router said it was on disk). A failed publish is not retried: the next
    counter goes out. Stops when ``stop`` exists and writes ``result`` (counters tried)."""
    ctl = Path(control)
    fd = os.open(ctl / "outcomes", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    counter = 0
    with shmq.Publisher(bus, capacity=1 << 16, connect_timeout=OP_TIMEOUT) as pub:
        dump(str(ctl / "ready"), pub.publisher_id)
        deadline = time.monotonic() + 4 * OP_TIMEOUT
        while not (ctl / "stop").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the stop flag never appeared")
            try:
                pub.publish(topic, counter_message(counter), timeout=timeout)
                outcome = CONFIRMED
            except tuple(OUTCOME_OF) as exc:
                outcome = OUTCOME_OF[type(exc)]
            os.write(fd, OUTCOME.pack(counter, outcome))
            counter += 1
        # The stop flag comes while a router is up: close() waits for it to take what is queued.
        if not pub.flush(OP_TIMEOUT):
            raise TimeoutError("the last router did not take what was queued")
    os.close(fd)
    dump(str(ctl / "result"), counter)


# -- subscribers ---------------------------------------------------------------------------------


def durable_member(
    bus: str, pattern: str, name: str, receive: int, ack_upto: int, capacity: int, control: str
) -> None:
    """A durable subscription that receives `receive` messages, acknowledges the one with log_seq
    `ack_upto` (and, cumulatively, every one before it), reports ``acked`` (the log_seqs it got and
    whether any was flagged redelivered), then waits to be killed."""
    ctl = Path(control)
    sub = shmq.Subscriber(bus, pattern, durable=name, capacity=capacity, connect_timeout=OP_TIMEOUT)
    dump(str(ctl / "ready"), (os.getpid(), sub.ring_name))
    got: list[shmq.Message] = []
    deadline = time.monotonic() + OP_TIMEOUT
    while len(got) < receive:
        if time.monotonic() > deadline:
            raise TimeoutError(f"received {len(got)} of {receive}")
        got.extend(sub.recv_many(receive - len(got), timeout=0.05))
    earlier = next(m for m in got if m.log_seq == ack_upto // 2)
    sub.ack(earlier)  # cumulative: an older ack is harmless
    next(m for m in got if m.log_seq == ack_upto).ack()
    dump(str(ctl / "acked"), ([m.log_seq for m in got], [m.redelivered for m in got]))
    time.sleep(2 * OP_TIMEOUT)
    raise TimeoutError("the test should have killed this subscriber")


# -- a router with a file size limit ---------------------------------------------------------------


def limited_router(bus: str, options: dict[str, Any], fsize_limit: int | None, control: str) -> None:
    """shmq.router.serve in this process, with SIGXFSZ ignored (a write past RLIMIT_FSIZE then fails
    with EFBIG instead of killing the process) and, with `fsize_limit`, that soft limit set first
    (the parent can move it with psutil's prlimit). Writes ``ready``; ends at SIGTERM."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if fsize_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, resource.RLIM_INFINITY))
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    from shmq.router import serve

    ctl = Path(control)
    serve(bus, ready=lambda: dump(str(ctl / "ready"), os.getpid()), **options)
    dump(str(ctl / "stopped"), True)
