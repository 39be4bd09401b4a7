"""asyncio: get_async/put_async against other processes, timeouts, a responsive event loop,
cancellation safety, many waiters on one queue, and close() while coroutines wait."""

from __future__ import annotations

import asyncio
import random
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import shmq
from shmq.testing import drain
from tests import _workers as w
from tests.conftest import CTX

pytestmark = pytest.mark.timeout(120)

JOIN_S = 30.0
MakeQueue = Callable[..., shmq.Queue]


class Ticker:
    """Counts how often a coroutine sleeping `period` s gets to run: a blocked loop stops it."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def fill(q: shmq.Queue, size: int) -> list[bytes]:
    """put_nowait distinct `size`-byte messages until the ring is full; return them."""
    out: list[bytes] = []
    while True:
        m = bytes([len(out) % 256]) * size
        try:
            q.put_nowait(m)
        except shmq.Full:
            return out
        out.append(m)


def waiter_threads(name: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"shmq-wait-{name}")]


@pytest.mark.parametrize("kind", ["spsc", "mpmc"])
def test_get_async_receives_from_another_process(make_queue: MakeQueue, kind: str) -> None:
    """get_async() awaits a message that a child process puts 1 s later; meanwhile the event loop
    keeps running other coroutines (a 10 ms ticker ticks dozens of times, not zero)."""
    q = make_queue(capacity=4096, kind=kind)
    child = CTX.Process(target=w.put_all, args=(q.name, "block", [b"hello", b"world"], 1.0))

    async def main() -> tuple[list[bytes], int]:
        with Ticker() as ticker:
            got = [await q.get_async(timeout=JOIN_S), await q.get_async(timeout=JOIN_S)]
        return got, ticker.ticks

    try:
        child.start()
        got, ticks = asyncio.run(main())
        child.join(JOIN_S)
        assert child.exitcode == 0
        assert got == [b"hello", b"world"]
        assert ticks >= 20  # about 100 expected over the ~1 s wait; a blocked loop gives ~0
        assert q.empty()
    finally:
        w.stop_all([child])


@pytest.mark.parametrize("kind", ["spsc", "mpmc"])
def test_put_async_waits_for_space_freed_by_another_process(
    make_queue: MakeQueue, tmp_path: Path, kind: str
) -> None:
    """On a full ring put_async() waits (loop still ticking) until a child process drains it 0.7 s
    later; the child then receives the fill and the awaited message, in order."""
    q = make_queue(capacity=4096, kind=kind)
    filled = fill(q, 500)
    extra = b"E" * 500
    out = str(tmp_path / "got.pkl")
    child = CTX.Process(target=w.get_all, args=(q.name, "block", len(filled) + 1, out, 0.7))

    async def main() -> int:
        with Ticker() as ticker:
            await q.put_async(extra, timeout=JOIN_S)
        return ticker.ticks

    try:
        child.start()
        ticks = asyncio.run(main())
        child.join(JOIN_S)
        assert child.exitcode == 0
        assert w.load(out) == [*filled, extra]
        assert ticks >= 10
    finally:
        w.stop_all([child])


def test_async_timeouts_raise_empty_and_full(make_queue: MakeQueue) -> None:
    """get_async on an empty ring raises Empty and put_async on a full one raises Full, after
    about the timeout (never before it), with the loop running meanwhile; timeout=0 fails at once;
    a timed-out put_async wrote nothing and a timed-out get_async took nothing."""
    q = make_queue(capacity=4096, kind="mpmc")

    async def main() -> dict[str, Any]:
        r: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        with Ticker() as ticker:
            t0 = loop.time()
            with pytest.raises(shmq.Empty):
                await q.get_async(timeout=0.4)
            r["get_elapsed"], r["get_ticks"] = loop.time() - t0, ticker.ticks
            with pytest.raises(shmq.Empty):
                await q.get_async(timeout=0)
            r["filled"] = fill(q, 600)
            t0, before = loop.time(), ticker.ticks
            with pytest.raises(shmq.Full):
                await q.put_async(b"x" * 600, timeout=0.4)
            r["put_elapsed"], r["put_ticks"] = loop.time() - t0, ticker.ticks - before
            with pytest.raises(shmq.Full):
                await q.put_async(b"x" * 600, timeout=0)
        return r

    r = asyncio.run(main())
    assert r["get_elapsed"] >= 0.35 and r["put_elapsed"] >= 0.35
    assert r["get_ticks"] >= 5 and r["put_ticks"] >= 5
    assert drain(q) == r["filled"]  # exactly the fill: nothing from the timed-out put_async


def test_get_async_cancellation_never_loses_a_message(make_queue: MakeQueue) -> None:
    """A child puts 0..N-1 at random moments while three coroutines keep starting get_async()
    and cancelling most of them after random short delays (some are cancelled while waiting,
    some right around the wake-up, some complete). Results of tasks that completed despite
    cancel() count as received. At the end, with a final get_nowait drain, every number was
    received exactly once: a cancelled get_async never swallows a message, and no task whose
    cancel() returned True took one."""
    n = 600
    q = make_queue(capacity=4096, kind="mpmc")
    child = CTX.Process(target=w.numbered_producer, args=(q.name, n, 42, 0.004))
    received: list[int] = []
    counts = {"cancelled": 0, "completed": 0, "cancel_ignored": 0, "empty": 0}

    async def churn(seed: int) -> None:
        rng = random.Random(seed)
        while child.is_alive() or not q.empty():
            task = asyncio.create_task(q.get_async(timeout=5))
            r = rng.random()
            if r < 0.2:
                await asyncio.sleep(0)  # cancel before it even ran, or just after it started
            elif r < 0.9:
                await asyncio.sleep(rng.uniform(0, 0.004))
            # else: never cancelled, runs to completion
            asked = task.cancel() if r < 0.8 else False
            try:
                value = await task
            except asyncio.CancelledError:
                counts["cancelled"] += 1
                continue
            except shmq.Empty:
                counts["empty"] += 1
                continue
            counts["cancel_ignored" if asked else "completed"] += 1
            received.append(struct.unpack("<I", value)[0])

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(churn(1), churn(2), churn(3)), JOIN_S)

    try:
        child.start()
        asyncio.run(main())
        child.join(JOIN_S)
        assert child.exitcode == 0
        received.extend(struct.unpack("<I", m)[0] for m in drain(q))
        assert len(received) == n, f"{n - len(set(received))} lost, {len(received) - len(set(received))} dup"
        assert sorted(received) == list(range(n))
        assert counts["cancel_ignored"] == 0, counts
        assert counts["cancelled"] > 50 and counts["completed"] > 10, counts
    finally:
        w.stop_all([child])


def test_many_concurrent_get_async_waiters_get_distinct_messages(make_queue: MakeQueue) -> None:
    """Twelve coroutines wait in get_async() on one queue at once; a child puts twelve numbered
    messages at random moments: each coroutine gets exactly one, all distinct, none left over."""
    q = make_queue(capacity=4096, kind="mpmc")
    child = CTX.Process(target=w.numbered_producer, args=(q.name, 12, 9, 0.05))

    async def main() -> list[bytes]:
        tasks = [asyncio.create_task(q.get_async(timeout=JOIN_S)) for _ in range(12)]
        await asyncio.sleep(0.05)  # all of them are waiting before the child exists
        child.start()
        return await asyncio.wait_for(asyncio.gather(*tasks), JOIN_S)

    try:
        got = asyncio.run(main())
        child.join(JOIN_S)
        assert child.exitcode == 0
        assert sorted(struct.unpack("<I", m)[0] for m in got) == list(range(12))
        assert q.empty()
    finally:
        w.stop_all([child])


def test_many_concurrent_put_async_waiters_all_land(make_queue: MakeQueue, tmp_path: Path) -> None:
    """Six coroutines wait in put_async() on a full ring; a child drains everything: it receives
    the fill first, in order, then the six awaited messages, each exactly once."""
    q = make_queue(capacity=4096, kind="mpmc")
    filled = fill(q, 300)
    extras = [b"extra%d" % i * 40 for i in range(6)]
    out = str(tmp_path / "got.pkl")
    child = CTX.Process(target=w.get_all, args=(q.name, "block", len(filled) + len(extras), out, 0.3))

    async def main() -> None:
        tasks = [asyncio.create_task(q.put_async(m, timeout=JOIN_S)) for m in extras]
        await asyncio.sleep(0.05)
        child.start()
        await asyncio.wait_for(asyncio.gather(*tasks), JOIN_S)

    try:
        asyncio.run(main())
        child.join(JOIN_S)
        assert child.exitcode == 0
        got = w.load(out)
        assert got[: len(filled)] == filled
        assert sorted(got[len(filled) :]) == sorted(extras)
        assert q.empty()
    finally:
        w.stop_all([child])


@pytest.mark.parametrize("direction", ["get", "put"])
def test_close_in_loop_while_async_waiting_raises_closed(make_queue: MakeQueue, direction: str) -> None:
    """close() called by another coroutine while get_async/put_async waits (timeout 30 s) makes
    the waiter raise Closed promptly instead of hanging; the helper waiter thread then exits."""
    q = make_queue(capacity=4096, kind="mpmc")
    if direction == "put":
        fill(q, 500)

    async def main() -> float:
        coro = q.get_async(timeout=30) if direction == "get" else q.put_async(b"y" * 500, timeout=30)
        task = asyncio.create_task(coro)
        await asyncio.sleep(0.2)
        assert not task.done()
        t0 = time.monotonic()
        q.close()
        with pytest.raises(shmq.Closed):
            await asyncio.wait_for(task, 10)
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    assert elapsed < 5
    assert w.wait_until(lambda: not waiter_threads(q.name), 5), waiter_threads(q.name)


def _close_from_thread_outcomes(make_queue: MakeQueue, trials: int, preempt: float = 0.0) -> list[str]:
    """Close a queue from another thread while get_async waits; the exception class names seen.

    `preempt` > 0 makes the closing thread pause between the two halves of close() (waking the
    asyncio waiters, then closing the ring), as a preempted thread naturally would sometimes.
    """
    outcomes: list[str] = []
    for i in range(trials):
        q = make_queue(capacity=4096, kind="mpmc")
        if preempt:
            close_ring = q._close_ring

            def slow_close_ring(close_ring: Callable[[], None] = close_ring) -> None:
                time.sleep(preempt)
                close_ring()

            q._close_ring = slow_close_ring  # type: ignore[method-assign]

        async def main(q: shmq.Queue = q, i: int = i) -> str:
            task = asyncio.create_task(q.get_async(timeout=30))
            await asyncio.sleep(0.03)
            timer = threading.Timer(0.002 * (i % 7), q.close)
            timer.start()
            try:
                await asyncio.wait_for(task, 10)
            except BaseException as exc:  # the class is the result
                return type(exc).__name__
            finally:
                timer.join()
            return "returned"

        outcomes.append(asyncio.run(main()))
    return outcomes


def test_close_from_other_thread_while_get_async_waiting_raises_closed(make_queue: MakeQueue) -> None:
    """close() from another thread while get_async waits: the coroutine always ends promptly with
    shmq.Closed (never hangs, never returns a message, never another error class), also when the
    closing thread is preempted between waking the waiters and closing the ring, so that the
    woken coroutine finds the ring still open and empty (regression: that raised plain
    ShmqError from RingWaiter.wait)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: vary the interleavings
    try:
        outcomes = _close_from_thread_outcomes(make_queue, 10)
        outcomes += _close_from_thread_outcomes(make_queue, 2, preempt=0.05)
    finally:
        sys.setswitchinterval(old)
    assert outcomes == ["Closed"] * 12, outcomes


def test_cancel_after_wakeup_leaves_the_message_queued(make_queue: MakeQueue) -> None:
    """Deterministic form of the cancellation race: get_async waits, a message arrives, and the
    task is cancelled after the waiter thread woke it but before it ran again. cancel() returns
    True, so the task must end cancelled and the message must still be in the queue (regression:
    3.11's asyncio.wait_for swallowed that cancel and the task took the message)."""
    q = make_queue(capacity=4096, kind="mpmc")

    async def main() -> tuple[bool, str, bool]:
        task = asyncio.create_task(q.get_async(timeout=10))
        await asyncio.sleep(0.1)  # the task now waits on the waiter thread
        q.put(b"precious", timeout=5)
        time.sleep(0.3)  # keep the loop busy: the waiter thread resolves the wake-up meanwhile
        asked = task.cancel()
        try:
            outcome = repr(await task)
        except asyncio.CancelledError:
            outcome = "cancelled"
        return asked, outcome, q.empty()

    asked, outcome, empty = asyncio.run(main())
    assert asked
    assert (outcome, empty) == ("cancelled", False), f"task returned {outcome} after cancel()"
    assert q.get_nowait() == b"precious"


def test_idle_waiter_thread_ends_and_frees_an_unclosed_queue(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue used with get_async and dropped without close() is freed once its waiter thread
    has been idle for a while (the thread must not keep it alive forever)."""
    import gc
    import weakref

    import shmq._async

    monkeypatch.setattr(shmq._async, "_IDLE_EXIT_S", 0.2)
    q = shmq.Queue(name, create=True, capacity=4096)

    async def wait_once(queue: shmq.Queue) -> None:
        with pytest.raises(shmq.Empty):
            await queue.get_async(timeout=0.05)

    asyncio.run(wait_once(q))
    ref = weakref.ref(q)
    del q
    deadline = time.monotonic() + 10
    while ref() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    assert ref() is None
