"""Real processes (spawn) through real segments: delivery guarantees under stress, process death,
pickling a Queue into a child, blocking and timeouts across processes, numpy payloads."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import shmq
from shmq.testing import segment_exists
from tests import _workers as w
from tests.conftest import CTX

pytestmark = pytest.mark.timeout(120)

REPO = str(Path(__file__).resolve().parent.parent)
JOIN_S = 60.0  # a worker that has not finished after this long is hung


Record = tuple[int, int, bool]
MakeQueue = Callable[..., shmq.Queue]


def check_streams(streams: list[list[Record]], expected: dict[int, int], *, may_lose: int = 0) -> None:
    """The forbidden outcomes: a damaged message, a duplicate, a reordering inside one consumer's
    stream, an unknown message, and (beyond `may_lose`) a lost one."""
    bad = [r for s in streams for r in s if not r[2]]
    assert not bad, f"{len(bad)} damaged messages, e.g. {bad[:5]}"
    counts = Counter((p, q) for s in streams for p, q, _ in s)
    dups = sorted(k for k, c in counts.items() if c > 1)
    assert not dups, f"{len(dups)} messages delivered twice, e.g. {dups[:5]}"
    want = {(p, q) for p, n in expected.items() for q in range(n)}
    extra = sorted(set(counts) - want)
    assert not extra, f"unknown messages: {extra[:5]}"
    lost = sorted(want - set(counts))
    assert len(lost) <= may_lose, f"{len(lost)} messages lost, e.g. {lost[:5]}"
    for i, s in enumerate(streams):
        last: dict[int, int] = {}
        for p, q, _ in s:
            assert q > last.get(p, -1), f"consumer {i}: producer {p} seq {q} came after seq {last[p]}"
            last[p] = q


# (kind, wait, producer modes, consumer modes, messages per producer, capacity)
STRESS_CASES = [
    ("mpmc", "block", ("put", "many", "view", "short"), ("get", "many", "view"), 1200, 8192),
    ("mpmc", "adaptive", ("nowait", "mixed", "many", "view"), ("mixed", "view", "many"), 1200, 8192),
    ("mpsc", "block", ("mixed", "view", "many"), ("mixed",), 1500, 4096),
    ("mpsc", "adaptive", ("short", "nowait", "mixed"), ("many",), 1500, 4096),
    ("spsc", "block", ("many",), ("view",), 3000, 4096),
    ("spsc", "adaptive", ("mixed",), ("mixed",), 3000, 4096),
    # busy-waiting strategies: 2 cores only, so few messages
    ("spsc", "spin", ("mixed",), ("mixed",), 300, 4096),
    ("mpmc", "yield", ("mixed", "mixed"), ("mixed", "mixed"), 200, 4096),
]


@pytest.mark.parametrize(
    ("kind", "wait", "pmodes", "cmodes", "count", "capacity"),
    STRESS_CASES,
    ids=[f"{c[0]}-{c[1]}-{len(c[2])}x{len(c[3])}" for c in STRESS_CASES],
)
def test_stress_no_loss_no_duplicate_order_kept(
    name: str,
    tmp_path: Path,
    kind: str,
    wait: str,
    pmodes: tuple[str, ...],
    cmodes: tuple[str, ...],
    count: int,
    capacity: int,
) -> None:
    """Producers x consumers through a small ring (constant wraps and Full): every numbered,
    checksummed message arrives exactly once, intact, in per-producer order in each consumer's
    stream, with every put/get style mixed in; the shared counters agree at the end."""
    q = shmq.Queue(name, create=True, capacity=capacity, kind=kind, wait=wait)  # type: ignore[arg-type]
    done = str(tmp_path / "done")
    outs = [str(tmp_path / f"c{j}.pkl") for j in range(len(cmodes))]
    # half the workers get the pickled Queue (attach on unpickling), half the name
    consumers = [
        CTX.Process(target=w.consumer, args=(q if j % 2 else name, wait, m, outs[j], done, 100 + j))
        for j, m in enumerate(cmodes)
    ]
    producers = [
        CTX.Process(target=w.producer, args=(name if i % 2 else q, wait, i, count, m, 200 + i))
        for i, m in enumerate(pmodes)
    ]
    try:
        for p in consumers + producers:
            p.start()
        w.join_all(producers, JOIN_S)
        assert [p.exitcode for p in producers] == [0] * len(producers), "a producer failed or hung"
        Path(done).touch()
        w.join_all(consumers, JOIN_S)
        assert [p.exitcode for p in consumers] == [0] * len(consumers), "a consumer failed or hung"
        streams = [w.load(o) for o in outs]
        check_streams(streams, {i: count for i in range(len(pmodes))})
        if len(streams) == 1:  # single consumer: exactly 0..count-1 per producer
            for i in range(len(pmodes)):
                assert [s for p, s, _ in streams[0] if p == i] == list(range(count))
        st = q.stats()
        total = count * len(pmodes)
        assert (st.messages_put, st.messages_got, st.depth_messages, st.depth_bytes) == (total, total, 0, 0)
        assert (
            st.bytes_put
            == st.bytes_got
            == sum(len(w.make_message(i, s)) for i in range(len(pmodes)) for s in range(count))
        )
        assert st.bytes_put > 20 * capacity  # the ring wrapped many times
        assert q.empty() and q.qsize() == 0
    finally:
        w.stop_all(consumers + producers)
        q.close()


def test_consumer_killed_while_others_run(name: str, tmp_path: Path) -> None:
    """SIGKILL one of three mpmc consumers while producers and the other consumers run: producers
    never hang, the survivors get everything the victim did not take, nothing is duplicated or
    reordered. The victim may have taken messages before dying: the ones it logged count as
    delivered, and at most one (taken, not yet logged) may be missing. It is killed while it sleeps
    between messages, not while it holds a claim (that case is the next test)."""
    q = shmq.Queue(name, create=True, capacity=8192, kind="mpmc", wait="block")
    done = str(tmp_path / "done")
    log = str(tmp_path / "victim.log")
    outs = [str(tmp_path / f"c{j}.pkl") for j in range(2)]
    count = 1500
    victim = CTX.Process(target=w.logging_consumer, args=(name, "block", log, 0.02))
    survivors = [
        CTX.Process(target=w.consumer, args=(name, "block", mode, outs[j], done, j))
        for j, mode in enumerate(("get", "many"))
    ]
    producers = [
        CTX.Process(target=w.paced_producer, args=(name, "block", i, count, 25, 0.02)) for i in range(2)
    ]
    procs = [victim, *survivors, *producers]
    try:
        for p in procs:
            p.start()
        assert w.wait_until(lambda: len(w.read_records(log)) >= 5, 30), "victim never received anything"
        time.sleep(random.uniform(0, 0.2))
        assert all(p.is_alive() for p in producers), "producers finished before the kill: test too short"
        put_at_kill = q.stats().messages_put
        victim.kill()
        victim.join(5)
        assert victim.exitcode == -9
        w.join_all(producers, JOIN_S)
        assert [p.exitcode for p in producers] == [0, 0], "a producer hung or failed after the kill"
        Path(done).touch()
        w.join_all(survivors, JOIN_S)
        assert [p.exitcode for p in survivors] == [0, 0]
        victim_log = w.read_records(log)
        streams = [victim_log] + [w.load(o) for o in outs]
        check_streams(streams, {0: count, 1: count}, may_lose=1)
        st = q.stats()
        assert st.messages_put == 2 * count > put_at_kill  # production went on after the kill
        assert st.messages_got == st.messages_put  # every message was claimed by someone
        assert st.depth_bytes == 0  # and released: the victim died holding no claim
        assert len(victim_log) < count  # the survivors did most of the work
    finally:
        w.stop_all(procs)
        q.close()


def test_consumer_killed_holding_a_view_does_not_wedge_producers(name: str, tmp_path: Path) -> None:
    """A consumer SIGKILLed inside `with get_view()` must not stop the ring for everybody: after it
    dies, a producer and a surviving consumer keep exchanging messages (a waiter releases the dead
    consumer's frame), and the message it held is counted as taken, and lost with it."""
    q = shmq.Queue(name, create=True, capacity=4096, kind="mpmc", wait="block")
    marker = str(tmp_path / "leased")
    victim = CTX.Process(target=w.hold_get_view, args=(name, "block", marker))
    try:
        q.put(b"first", timeout=5)
        victim.start()
        assert w.wait_until(lambda: os.path.exists(marker), 30)
        assert w.load(marker) == b"first"
        victim.kill()
        victim.join(5)
        msg = bytes(1000)
        for i in range(12):  # 12 KB through a 4 KB ring, one message at a time
            q.put(msg, timeout=1.0)
            assert q.get(timeout=1.0) == msg, f"round {i}"
        st = q.stats()
        assert st.dead_consumer_messages == 1
        assert st.messages_got == st.messages_put == 13 and st.depth_bytes == 0
    finally:
        w.stop_all([victim])
        q.close()


def _put_behind_dead_producer(name: str, tmp_path: Path) -> tuple[str, float]:
    """Kill a producer inside `with put_view()`, then put(b"behind", timeout=0.3) from another
    process (a child: if that put hung it could not be interrupted here); (outcome, seconds)."""
    marker = str(tmp_path / "holding")
    out = str(tmp_path / "put.pkl")
    holder = CTX.Process(target=w.hold_put_view, args=(name, "block", marker, 60.0))
    putter = CTX.Process(target=w.timed_put_behind, args=(name, 0.3, out))
    try:
        holder.start()
        assert w.wait_until(lambda: os.path.exists(marker), 30)
        holder.kill()
        holder.join(5)
        putter.start()
        putter.join(10)
        assert putter.exitcode == 0, "put(timeout=0.3) still blocked 10 s after the other producer died"
        outcome, start, end = w.load(out)
        return outcome, end - start
    finally:
        w.stop_all([holder, putter])


def test_producer_killed_holding_a_put_view_does_not_hang_others(name: str, tmp_path: Path) -> None:
    """A producer SIGKILLed inside `with put_view()` on an mpsc ring: another producer's
    put(timeout=0.3) behind its claim returns within a few seconds (its claim is deferred to
    the commit table) instead of waiting forever for the dead producer's commit."""
    q = shmq.Queue(name, create=True, capacity=4096, kind="mpsc", wait="block")
    try:
        outcome, seconds = _put_behind_dead_producer(name, tmp_path)
        assert outcome in ("ok", "full") and seconds < 3, (outcome, seconds)
    finally:
        q.close()


def test_message_put_after_dead_producer_is_delivered(name: str, tmp_path: Path) -> None:
    """A put that returned successfully behind a dead producer's claim should eventually reach a
    consumer (the dead claim turned into padding), not be silently stranded."""
    q = shmq.Queue(name, create=True, capacity=4096, kind="mpsc", wait="block")
    try:
        outcome, _ = _put_behind_dead_producer(name, tmp_path)
        assert outcome == "ok"
        # (the putter, waiting for its commit turn, found the dead claim and padded it; had its
        # timeout been shorter it would have deferred, and this get would have found it)
        assert q.get(timeout=3) == b"behind"
        st = q.stats()
        assert st.dead_producer_claims == 1 and st.messages_got == st.messages_put == 1
        assert st.depth_bytes == 0
    finally:
        q.close()


@pytest.mark.parametrize("use_with", [False, True], ids=["drop", "with-block"])
def test_queue_passed_to_child_as_argument(make_queue: MakeQueue, tmp_path: Path, use_with: bool) -> None:
    """A Queue pickled into a spawned child attaches to the same segment (same name, kind,
    capacity, wait); the child's puts reach the parent, and the child's exit, even leaving a
    `with q:` block, neither unlinks the segment nor closes it for the parent."""
    q = make_queue(capacity=4096, kind="mpsc", wait="block")
    out = str(tmp_path / "ident.pkl")
    msgs = [f"from child {i}".encode() for i in range(5)]
    child = CTX.Process(target=w.queue_identity, args=(q, out, msgs, use_with))
    try:
        child.start()
        child.join(JOIN_S)
        assert child.exitcode == 0
        assert w.load(out) == (q.name, "mpsc", 4096, q.max_message, "block")
        assert segment_exists(q.name)
        assert [q.get(timeout=5) for _ in msgs] == msgs
        q.put(b"still works", timeout=5)
        assert q.get_nowait() == b"still works"
        assert q.empty()
    finally:
        w.stop_all([child])


def test_child_exit_prints_no_resource_tracker_warning(name: str) -> None:
    """In a plain script (not under pytest), a parent passes a Queue to a spawned child that puts
    and exits without closing: the segment survives the child, the parent reads everything, and
    nothing at all is printed on stderr (no resource_tracker 'leaked' warning, no traceback)."""
    script = textwrap.dedent(
        f"""
        import multiprocessing
        import shmq
        from shmq.testing import segment_exists
        from tests import _workers

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            q = shmq.Queue({name!r}, create=True, capacity=4096)
            try:
                msgs = [b"a", b"bb", b"ccc"]
                p = ctx.Process(target=_workers.put_all, args=(q, "block", msgs))
                p.start()
                p.join(30)
                print("exitcode", p.exitcode)
                print("exists", segment_exists({name!r}))
                print("got", [q.get(timeout=5) for _ in msgs])
            finally:
                q.close()
                q.unlink()
            print("exists-after-unlink", segment_exists({name!r}))
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:4] == [
        "exitcode 0",
        "exists True",
        "got [b'a', b'bb', b'ccc']",
        "exists-after-unlink False",
    ]
    assert res.stderr == ""


# -- blocking and timeouts across processes ------------------------------------------------------

WAITS = ["block", "adaptive"]


@pytest.mark.parametrize("wait", WAITS)
def test_get_in_child_blocks_until_parent_puts(name: str, tmp_path: Path, wait: str) -> None:
    """A child blocked in get() (it went to sleep on the futex: get_waits counts it) wakes and
    receives the message the parent puts later."""
    q = shmq.Queue(name, create=True, capacity=4096, kind="spsc", wait=wait)  # type: ignore[arg-type]
    out = str(tmp_path / "r.pkl")
    child = CTX.Process(target=w.timed_get, args=(name, wait, 30.0, out))
    try:
        child.start()
        assert w.wait_until(lambda: q.stats().get_waits >= 1 or not child.is_alive(), 30)
        assert child.is_alive() and q.stats().get_waits >= 1, f"child never slept ({child.exitcode})"
        time.sleep(0.2)
        assert child.is_alive()
        q.put(b"wake up", timeout=5)
        child.join(JOIN_S)
        assert child.exitcode == 0
        status, data, elapsed = w.load(out)
        assert (status, data) == ("ok", b"wake up")
        assert elapsed >= 0.2
        st = q.stats()
        assert (
            st.messages_got == 1 and q.empty()
        )  # (data_wakes may be 0: the put can land between two sleeps)
    finally:
        w.stop_all([child])
        q.close()


@pytest.mark.parametrize("wait", WAITS)
def test_parent_get_blocks_until_child_puts(name: str, wait: str) -> None:
    """The parent blocks in get() (generous timeout) until a child puts 0.5 s after starting;
    it receives exactly the child's messages, in order, and the first wait really slept."""
    q = shmq.Queue(name, create=True, capacity=4096, kind="spsc", wait=wait)  # type: ignore[arg-type]
    msgs = [b"late %d" % i for i in range(3)]
    child = CTX.Process(target=w.put_all, args=(name, "block", msgs, 0.5))
    try:
        child.start()
        t0 = time.monotonic()
        got = [q.get(timeout=JOIN_S) for _ in msgs]
        assert time.monotonic() - t0 >= 0.45
        assert got == msgs
        assert q.stats().get_waits >= 1
        child.join(JOIN_S)
        assert child.exitcode == 0
    finally:
        w.stop_all([child])
        q.close()


@pytest.mark.parametrize("wait", WAITS)
def test_producer_blocked_on_full_ring_wakes_when_parent_drains(name: str, wait: str) -> None:
    """A child putting 20 KB into a 4 KB ring sleeps on the full ring (put_waits counts it) and is
    woken each time the parent drains; every message arrives, in order."""
    q = shmq.Queue(name, create=True, capacity=4096, kind="spsc", wait=wait)  # type: ignore[arg-type]
    msgs = [bytes([i]) * 500 for i in range(40)]
    child = CTX.Process(target=w.put_all, args=(name, wait, msgs))
    try:
        child.start()
        assert w.wait_until(lambda: q.stats().put_waits >= 1 or not child.is_alive(), 30)
        assert child.is_alive() and q.stats().put_waits >= 1, f"child never slept ({child.exitcode})"
        time.sleep(0.2)
        assert child.is_alive()
        got = [q.get(timeout=10) for _ in msgs]
        assert got == msgs
        child.join(JOIN_S)
        assert child.exitcode == 0
        with pytest.raises(shmq.Empty):
            q.get_nowait()
    finally:
        w.stop_all([child])
        q.close()


@pytest.mark.parametrize("wait", WAITS)
def test_get_timeout_in_child_raises_empty_and_takes_nothing(name: str, tmp_path: Path, wait: str) -> None:
    """A child's get(timeout=0.3) on an empty queue raises Empty after (not before) the timeout;
    then, under a race between short get timeouts in the child and puts at random moments in the
    parent, every message ends up either received by the child or still queued: never lost,
    never twice, order kept."""
    q = shmq.Queue(name, create=True, capacity=4096, kind="spsc", wait=wait)  # type: ignore[arg-type]
    out = str(tmp_path / "r.pkl")
    child = CTX.Process(target=w.timed_get, args=(name, wait, 0.3, out))
    racer = CTX.Process(target=w.racing_getter, args=(name, wait, 2.0, 7, str(tmp_path / "race.pkl")))
    try:
        child.start()
        child.join(JOIN_S)
        assert child.exitcode == 0
        status, data, elapsed = w.load(out)
        assert (status, data) == ("empty", None)
        assert elapsed >= 0.25
        q.put(b"after the timeout", timeout=5)
        assert q.get_nowait() == b"after the timeout"  # the timed-out child took nothing

        msgs = [b"m%03d" % i for i in range(60)]
        racer.start()
        rng = random.Random(3)
        for m in msgs:
            time.sleep(rng.uniform(0, 0.03))
            q.put(m, timeout=10)
            if not racer.is_alive():
                break
        racer.join(JOIN_S)
        assert racer.exitcode == 0
        got, empties = w.load(str(tmp_path / "race.pkl"))
        rest = []
        while True:  # the parent consumes again after the racer (see test_consumer_role_handed_back...)
            try:
                rest.append(q.get_nowait())
            except shmq.Empty:
                break
        sent = msgs[: len(got) + len(rest)]
        assert got + rest == sent  # nothing lost, nothing twice, order kept
        assert len(sent) >= 30 and empties > 0  # the race really happened
    finally:
        w.stop_all([child, racer])
        q.close()


@pytest.mark.parametrize("wait", WAITS)
def test_put_timeout_in_child_raises_full_and_writes_nothing(name: str, tmp_path: Path, wait: str) -> None:
    """On a full ring a child's put(timeout=0.3) raises Full after the timeout and writes nothing;
    racing short put timeouts against a slow consumer, exactly the puts that returned are received
    (in order) and none of those that raised Full."""
    q = shmq.Queue(name, create=True, capacity=4096, kind="spsc", wait=wait)  # type: ignore[arg-type]
    fill = []
    while True:
        m = bytes([len(fill)]) * 700
        try:
            q.put_nowait(m)
        except shmq.Full:
            break
        fill.append(m)
    out = str(tmp_path / "r.pkl")
    child = CTX.Process(target=w.timed_put, args=(name, wait, b"X" * 700, 0.3, out))
    racer = CTX.Process(target=w.racing_putter, args=(name, wait, 60, 1000, 11, str(tmp_path / "race.pkl")))
    try:
        child.start()
        child.join(JOIN_S)
        assert child.exitcode == 0
        status, elapsed = w.load(out)
        assert status == "full" and elapsed >= 0.25
        assert [q.get_nowait() for _ in fill] == fill
        with pytest.raises(shmq.Empty):
            q.get_nowait()

        racer.start()
        rng = random.Random(5)
        got = []
        while racer.is_alive():
            try:
                got.append(q.get(timeout=0.05))
            except shmq.Empty:
                continue
            time.sleep(rng.uniform(0, 0.04))
        racer.join(JOIN_S)
        assert racer.exitcode == 0
        while True:
            try:
                got.append(q.get_nowait())
            except shmq.Empty:
                break
        ok, full = w.load(str(tmp_path / "race.pkl"))
        assert sorted(ok + full) == list(range(60))
        assert [int.from_bytes(m[:4], "little") for m in got] == ok
        assert all(m == m[:4] * 250 for m in got)
        assert ok and full  # both outcomes happened
    finally:
        w.stop_all([child, racer])
        q.close()


@pytest.mark.parametrize("wait", WAITS)
def test_put_many_timeout_in_child_reports_what_it_put(name: str, tmp_path: Path, wait: str) -> None:
    """put_many(10 x 1000 bytes, timeout=0.3) into an empty 4 KB ring nobody reads returns how
    many it put (some, not all); the parent receives exactly those, in order, and nothing else."""
    q = shmq.Queue(name, create=True, capacity=4096, kind="spsc", wait=wait)  # type: ignore[arg-type]
    msgs = [bytes([65 + i]) * 1000 for i in range(10)]
    out = str(tmp_path / "r.pkl")
    child = CTX.Process(target=w.timed_put_many, args=(name, wait, msgs, 0.3, out))
    try:
        child.start()
        child.join(JOIN_S)
        assert child.exitcode == 0
        status, n = w.load(out)
        assert status == "ok"
        assert 0 < n < len(msgs)
        assert q.get_many(100, timeout=1) == msgs[:n]
        assert q.get_many(100, timeout=0.05) == []
    finally:
        w.stop_all([child])
        q.close()


# -- numpy -------------------------------------------------------------------------------------


def test_numpy_put_obj_get_obj_round_trip(make_queue: MakeQueue) -> None:
    """A dict of numpy arrays (C-ordered, Fortran-ordered, non-contiguous slice, 0-d, empty, and a
    structured dtype) crosses to a child with put_obj/get_obj, arrives writable and equal, is
    doubled in place there and comes back equal to 2x the original, with order flags kept."""
    q_in = make_queue(capacity=1 << 18, kind="spsc")
    q_out = make_queue(capacity=1 << 18, kind="spsc")
    rng = np.random.default_rng(1)
    base = rng.standard_normal((120, 70))
    sent = {
        "c": base,
        "f": np.asfortranarray(base[:50, :40]),
        "slice": base[::3, ::2],
        "ints": np.arange(1000, dtype=np.int32).reshape(10, 100),
        "zero_d": np.array(7.5),
        "empty": np.zeros((0, 3)),
        "rec": np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i8"), ("b", "<f4")]),
        "meta": {"text": "hello", "n": 3},
    }
    child = CTX.Process(target=w.numpy_obj_echo, args=(q_in, q_out))
    try:
        child.start()
        q_in.put_obj(sent, timeout=10)
        back = q_out.get_obj(timeout=JOIN_S)
        child.join(JOIN_S)
        assert child.exitcode == 0
        assert back["meta"] == sent["meta"]
        for key in ("c", "f", "slice", "ints", "zero_d", "empty"):
            assert back[key].dtype == sent[key].dtype and back[key].shape == sent[key].shape, key
            np.testing.assert_array_equal(back[key], sent[key] * 2)
        np.testing.assert_array_equal(back["rec"]["a"], sent["rec"]["a"] * 2)
        np.testing.assert_array_equal(back["rec"]["b"], sent["rec"]["b"] * 2)
        assert all(flags[0] for flags in back["flags"].values()), back["flags"]  # writable in the child
        assert back["flags"]["f"][2] and back["flags"]["c"][1]
        assert back["f"].flags.f_contiguous and back["c"].flags.c_contiguous
        assert all(v.flags.writeable for v in back.values() if isinstance(v, np.ndarray))
    finally:
        w.stop_all([child])


def test_numpy_get_view_frombuffer_round_trip(make_queue: MakeQueue) -> None:
    """A raw float64 array put as a buffer is read in a child through get_view +
    numpy.frombuffer (copied inside the block) and sent back transformed; read back the same way
    in the parent, the values are exactly 3x+1 and both rings are empty."""
    q_in = make_queue(capacity=1 << 18, kind="spsc", wait="block")
    q_out = make_queue(capacity=1 << 18, kind="spsc", wait="block")
    arr = np.random.default_rng(2).standard_normal((64, 100))
    child = CTX.Process(target=w.numpy_view_echo, args=(q_in, q_out, arr.shape, "float64"))
    try:
        child.start()
        q_in.put(arr, timeout=10)
        with q_out.get_view(timeout=JOIN_S) as view:
            assert view.nbytes == arr.nbytes
            back = np.frombuffer(view, dtype=np.float64).reshape(arr.shape).copy()
        child.join(JOIN_S)
        assert child.exitcode == 0
        np.testing.assert_array_equal(back, arr * 3 + 1)
        assert q_in.empty() and q_out.empty()
    finally:
        w.stop_all([child])


@pytest.mark.parametrize("kind", ["spsc", "mpsc", "mpmc"])
def test_consumer_role_handed_back_to_parent(name: str, tmp_path: Path, kind: str) -> None:
    """One consumer at a time, in turn: the parent reads, a child consumer reads past what the
    parent last saw and exits, then the parent drains the rest through its old handle. Every
    message is delivered once, in order, and the ring is not reported corrupt (regression: the
    old handle's stale cached tail made single-consumer rings raise CorruptSegment)."""
    q = shmq.Queue(name, create=True, capacity=4096, kind=kind)  # type: ignore[arg-type]
    out = str(tmp_path / "child.pkl")
    msgs = [b"msg%02d" % i for i in range(12)]
    child = CTX.Process(target=w.get_all, args=(name, "block", 6, out))
    try:
        for m in msgs[:3]:
            q.put(m, timeout=5)
        got = [q.get(timeout=5)]  # the parent consumes one, and sees 3 committed
        for m in msgs[3:]:
            q.put(m, timeout=5)
        child.start()  # takes msgs[1:7], past the parent's last view of the tail
        child.join(JOIN_S)
        assert child.exitcode == 0
        got += w.load(out)
        while True:
            try:
                got.append(q.get_nowait())
            except shmq.Empty:
                break
        assert got == msgs
    finally:
        w.stop_all([child])
        q.close()
