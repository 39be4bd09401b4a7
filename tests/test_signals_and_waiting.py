"""Waiting: Ctrl-C (SIGINT) ends a blocked call, close() from another thread ends one, an idle
blocked waiter costs little CPU, spin waits still honour their timeouts."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import shmq
from tests import _workers as w
from tests.conftest import CTX

pytestmark = pytest.mark.timeout(120)

MakeQueue = Callable[..., shmq.Queue]
REPO = str(Path(__file__).resolve().parent.parent)

# The child blocks in one call with no timeout; SIGINT must turn into KeyboardInterrupt there.
BLOCKED_SCRIPT = """
import sys, time
import shmq

name, wait, op = sys.argv[1:4]
q = shmq.Queue(name, wait=wait)
try:
    print("READY", flush=True)
    if op == "get":
        q.get()
    elif op == "get_many":
        q.get_many()
    elif op == "get_view":
        with q.get_view():
            pass
    elif op == "put":
        q.put(b"z" * int(sys.argv[4]))
    elif op == "put_view":
        with q.put_view(int(sys.argv[4])):
            pass
    print("RETURNED", flush=True)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(0)
sys.exit(3)
"""


def start_script(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", BLOCKED_SCRIPT, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The child's next stdout line, or "" if none comes within `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def fill(q: shmq.Queue, size: int) -> int:
    """put_nowait `size`-byte messages until the ring is full; return how many fit."""
    n = 0
    while True:
        try:
            q.put_nowait(b"f" * size)
        except shmq.Full:
            return n
        n += 1


def wait_until_sleeping(q: shmq.Queue, wait: str, counter: str, before: int) -> None:
    """Block/adaptive waiters announce their futex sleep in a counter; spinners cannot, so give
    them time to get into their loop."""
    if wait in ("block", "adaptive"):
        assert w.wait_until(lambda: getattr(q.stats(), counter) > before, 30), f"no {counter} seen"
    time.sleep(0.3)


SIGINT_CASES = [
    ("get", "block"),
    ("get", "adaptive"),
    ("get", "spin"),
    ("get", "yield"),
    ("get_many", "block"),
    ("get_view", "adaptive"),
    ("put", "block"),
    ("put", "adaptive"),
    ("put_view", "block"),
]


@pytest.mark.parametrize(("op", "wait"), SIGINT_CASES, ids=[f"{o}-{w_}" for o, w_ in SIGINT_CASES])
def test_sigint_interrupts_call_blocked_without_timeout(make_queue: MakeQueue, op: str, wait: str) -> None:
    """A subprocess blocked with timeout=None (get on an empty ring, put on a full one) turns
    SIGINT into KeyboardInterrupt promptly with every wait strategy: it prints its marker and
    exits, rather than hanging until a message or space arrives (none ever does)."""
    q = make_queue(capacity=4096, kind="mpmc")
    size = 500
    if op.startswith("put"):
        fill(q, size)
    counter = "put_waits" if op.startswith("put") else "get_waits"
    before = getattr(q.stats(), counter)
    put_before = q.stats().messages_put
    proc = start_script(q.name, wait, op, str(size))
    try:
        assert read_line(proc, 30) == "READY"
        wait_until_sleeping(q, wait, counter, before)
        assert proc.poll() is None, "the call returned although nothing could arrive"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - t0
        assert (proc.returncode, out.strip()) == (0, "INTERRUPTED"), err
        assert elapsed < 10
        # nothing was taken or added by the interrupted call
        st = q.stats()
        assert (st.messages_put, st.messages_got) == (put_before, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


CLOSE_CASES = [("get", "block"), ("get", "adaptive"), ("get", "spin"), ("put", "block"), ("put", "adaptive")]


@pytest.mark.parametrize(("op", "wait"), CLOSE_CASES, ids=[f"{o}-{w_}" for o, w_ in CLOSE_CASES])
def test_close_from_another_thread_ends_blocked_call(make_queue: MakeQueue, op: str, wait: str) -> None:
    """A thread blocked in get() (empty ring) or put() (full ring) with a 30 s timeout gets
    shmq.Closed promptly when another thread closes the queue."""
    q = make_queue(capacity=4096, kind="mpmc", wait=wait)
    if op == "put":
        fill(q, 500)
    counter = "put_waits" if op == "put" else "get_waits"
    before = getattr(q.stats(), counter)
    result: list[BaseException | bytes | None] = []

    def blocked() -> None:
        try:
            result.append(q.get(timeout=30) if op == "get" else q.put(b"p" * 500, timeout=30))
        except BaseException as exc:  # the class is the result
            result.append(exc)

    t = threading.Thread(target=blocked, daemon=True)
    t.start()
    wait_until_sleeping(q, wait, counter, before)
    assert t.is_alive()
    t0 = time.monotonic()
    q.close()
    t.join(10)
    elapsed = time.monotonic() - t0
    assert not t.is_alive(), "the blocked call did not notice close()"
    assert len(result) == 1 and isinstance(result[0], shmq.Closed), result
    assert elapsed < 5
    with pytest.raises(shmq.Closed):
        q.get_nowait()


@pytest.mark.parametrize("wait", ["block", "adaptive"])
def test_idle_blocked_get_uses_little_cpu(make_queue: MakeQueue, tmp_path: Path, wait: str) -> None:
    """A process blocked for 1.5 s in get() on an empty ring sleeps: its CPU time over the wait
    is under 30% of the elapsed time (a spinning waiter would be near 100%)."""
    q = make_queue(capacity=4096, kind="spsc")
    out = str(tmp_path / "cpu.pkl")
    child = CTX.Process(target=w.idle_get_cpu, args=(q.name, wait, 1.5, out))
    try:
        child.start()
        child.join(60)
        assert child.exitcode == 0
        outcome, wall, cpu = w.load(out)
        assert outcome == "empty"
        assert wall >= 1.4
        assert cpu < 0.3 * wall, f"{cpu:.3f} s CPU in {wall:.3f} s idle wait"
    finally:
        w.stop_all([child])


def test_idle_get_async_uses_little_cpu(make_queue: MakeQueue, tmp_path: Path) -> None:
    """A process awaiting get_async for 1.5 s (event loop + helper waiter thread) uses under 30%
    of a core: neither the loop nor the waiter thread polls."""
    q = make_queue(capacity=4096, kind="mpmc")
    out = str(tmp_path / "cpu.pkl")
    child = CTX.Process(target=w.idle_get_async_cpu, args=(q.name, 1.5, out))
    try:
        child.start()
        child.join(60)
        assert child.exitcode == 0
        outcome, wall, cpu = w.load(out)
        assert outcome == "empty" and wall >= 1.4
        assert cpu < 0.3 * wall, f"{cpu:.3f} s CPU in {wall:.3f} s idle wait"
    finally:
        w.stop_all([child])


@pytest.mark.parametrize("wait", ["spin", "yield"])
def test_busy_wait_strategies_honour_timeouts(make_queue: MakeQueue, wait: str) -> None:
    """With wait="spin" (and "yield") every blocking call still ends at its timeout: get, get_view
    raise Empty, get_many returns [], put and put_view raise Full; none returns early."""
    q = make_queue(capacity=4096, kind="mpmc", wait=wait)

    def timed(call: Callable[[], object], exc: type[BaseException] | None) -> float:
        t0 = time.monotonic()
        if exc is None:
            assert call() == []
        else:
            with pytest.raises(exc):
                call()
        return time.monotonic() - t0

    def get_view() -> None:
        with q.get_view(timeout=0.2):
            pass

    def put_view() -> None:
        with q.put_view(500, timeout=0.2):
            pass

    elapsed = [
        timed(lambda: q.get(timeout=0.2), shmq.Empty),
        timed(get_view, shmq.Empty),
        timed(lambda: q.get_many(10, timeout=0.2), None),
    ]
    n = fill(q, 500)
    elapsed += [timed(lambda: q.put(b"p" * 500, timeout=0.2), shmq.Full), timed(put_view, shmq.Full)]
    assert all(0.15 <= e < 10 for e in elapsed), elapsed
    assert q.qsize() == n and q.stats().messages_put == n  # the timed-out puts wrote nothing


def test_put_behind_open_put_view_of_other_process_honours_timeout(
    make_queue: MakeQueue, tmp_path: Path
) -> None:
    """Another process keeps a put_view open for 2.5 s on an mpsc ring with plenty of room; a
    put(timeout=0.3) from a third process returns within about its timeout (its claim is handed
    over, not waited out), and once the view is committed both messages arrive in claim order
    (regression: the put waited for the other producer's commit, ignoring its timeout)."""
    q = make_queue(capacity=4096, kind="mpsc")
    marker = str(tmp_path / "holding")
    out = str(tmp_path / "put.pkl")
    holder = CTX.Process(target=w.hold_put_view, args=(q.name, "block", marker, 2.5))
    putter = CTX.Process(target=w.timed_put_behind, args=(q.name, 0.3, out))
    try:
        holder.start()
        assert w.wait_until(lambda: os.path.exists(marker), 30)
        putter.start()
        putter.join(30)
        assert putter.exitcode == 0
        outcome, start, end = w.load(out)
        assert outcome == "ok" and end - start < 2.0, f"put(timeout=0.3) took {end - start:.1f} s ({outcome})"
        assert holder.is_alive()  # the view is still open: the put did not wait for it
        holder.join(30)
        assert holder.exitcode == 0
        assert [q.get(timeout=5), q.get(timeout=5)] == [b"held", b"behind"]
        with pytest.raises(shmq.Empty):
            q.get(timeout=0.1)
    finally:
        w.stop_all([holder, putter])


def test_sigint_interrupts_put_waiting_for_commit_turn(make_queue: MakeQueue, tmp_path: Path) -> None:
    """Same situation with put() and no timeout: SIGINT ends it promptly with KeyboardInterrupt
    (not only after the other producer commits), and the interrupted put delivers nothing: once
    the view is committed only its message is there (regression: the commit-turn wait ignored
    signals)."""
    q = make_queue(capacity=4096, kind="mpsc")
    marker = str(tmp_path / "holding")
    holder = CTX.Process(target=w.hold_put_view, args=(q.name, "block", marker, 2.5))
    proc: subprocess.Popen[str] | None = None
    try:
        holder.start()
        assert w.wait_until(lambda: os.path.exists(marker), 30)
        proc = start_script(q.name, "block", "put", "10")
        assert read_line(proc, 30) == "READY"
        time.sleep(0.3)
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=2.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"put() still blocked {time.monotonic() - t0:.1f} s after SIGINT")
        assert (proc.returncode, out.strip()) == (0, "INTERRUPTED"), err
        holder.join(30)
        assert holder.exitcode == 0
        assert q.get(timeout=5) == b"held"
        with pytest.raises(shmq.Empty):
            q.get(timeout=0.2)
        assert q.stats().messages_put == 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        w.stop_all([holder])


def test_many_puts_behind_an_open_put_view_all_delivered_once(make_queue: MakeQueue) -> None:
    """20 threads put(timeout=0.2) on an mpsc ring while the main thread holds a put_view open
    for 1.5 s: more than the 16 claims that can be handed over. At least 16 puts return before
    the view is committed, every put returns, and afterwards the view's message comes first and
    each thread's message exactly once (no claim lost or doubled by the hand-over table)."""
    q = make_queue(capacity=4096, kind="mpsc")
    returned: dict[int, float] = {}
    errors: list[BaseException] = []

    def put(i: int) -> None:
        try:
            q.put(b"t%02d" % i, timeout=0.2)
            returned[i] = time.monotonic()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(i,), daemon=True) for i in range(20)]
    with q.put_view(4, timeout=5) as buf:
        for t in threads:
            t.start()
        time.sleep(1.5)
        buf[:] = b"view"
        committed = time.monotonic()
    for t in threads:
        t.join(20)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert len(returned) == 20
    assert sum(1 for at in returned.values() if at < committed) >= 16
    got = [q.get(timeout=5) for _ in range(21)]
    assert got[0] == b"view"
    assert sorted(got[1:]) == sorted(b"t%02d" % i for i in range(20))
    with pytest.raises(shmq.Empty):
        q.get_nowait()
