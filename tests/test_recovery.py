"""Dead processes holding claims: a waiter turns a dead producer's claim into padding and releases
a dead consumer's frames (ring.c, shmq_recover; docs/ARCHITECTURE.md, "Dead processes"), and
never touches a live process's claim, however long it holds it.

Deterministic cases first, each with processes that really die; then randomized fault injection:
producers and consumers SIGKILLed and SIGSTOPped at random moments while traffic flows, checked
for loss, duplicates, order and leftovers. `SHMQ_FAULT_SCALE=N` runs N times more iterations of
it (the seed of a failing iteration is in the assertion message).
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

import shmq
from shmq import _attach
from shmq._native import _ring
from shmq._segment import read_info
from shmq.testing import segment_exists
from tests import _recovery_workers as rw
from tests import _workers as w
from tests.conftest import CTX
from tests.test_cli import run_cli

JOIN_S = 60.0
SCALE = max(1, int(os.environ.get("SHMQ_FAULT_SCALE", "1")))
# Recovery looks at a stall once it has lasted RECOVER_AFTER_NS; a waiter notices within one
# wait slice more. Anything that should be recovered is given far longer than that.
RECOVERED_WITHIN_S = 5.0

pytestmark = pytest.mark.timeout(180)


def start(target: Any, *args: Any) -> Any:
    p = CTX.Process(target=target, args=args)
    p.start()
    return p


def wait_file(path: Path, procs: list[Any]) -> None:
    """Wait for a worker's marker; a worker that died first fails the test at once."""
    end = time.monotonic() + 30
    while not path.exists():
        dead = [p.exitcode for p in procs if p.exitcode is not None]
        assert not dead, f"a worker exited ({dead}) before writing {path.name}"
        assert time.monotonic() < end, f"{path.name} never appeared"
        time.sleep(0.005)


def stop_stopped(proc: Any) -> None:
    """End a worker the test may have left SIGSTOPped (a stopped process ignores SIGKILL's
    reaping until continued)."""
    if proc.pid is not None and proc.is_alive():
        os.kill(proc.pid, signal.SIGCONT)
    w.stop_all([proc])


def kill(proc: Any) -> None:
    proc.kill()
    proc.join(5)
    assert proc.exitcode == -signal.SIGKILL


# -- producers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mpsc", "mpmc"])
def test_dead_producer_threads_claims_between_live_ones(name: str, tmp_path: Path, kind: str) -> None:
    """A process whose two threads hold put_view claims is killed; between and after its claims
    this process put two messages that were deferred (their turn had not come). A get finds the
    first dead claim, pads it, and the first live message is committed; the second dead claim is
    found next. Both live messages arrive, in order, and nothing of the dead ones does."""
    q = shmq.Queue(name, create=True, kind=kind, capacity=4096, wait="block")  # type: ignore[arg-type]
    m = [tmp_path / f"open{i}" for i in range(2)]
    gate = tmp_path / "go"
    holder = start(rw.views_in_threads, name, "put", [(None, str(m[0])), (str(gate), str(m[1]))])
    try:
        wait_file(m[0], [holder])
        q.put(b"live-1", timeout=0)  # behind the first dead claim: deferred at once
        gate.touch()
        wait_file(m[1], [holder])
        q.put(b"live-2", timeout=0)
        kill(holder)
        assert q.get(timeout=RECOVERED_WITHIN_S) == b"live-1"
        assert q.get(timeout=RECOVERED_WITHIN_S) == b"live-2"
        with pytest.raises(shmq.Empty):
            q.get(timeout=0.3)
        st = q.stats()
        assert st.dead_producer_claims == 2
        assert st.messages_put == st.messages_got == 2 and st.depth_bytes == 0
        for i in range(40):  # the ring goes on: 40 x 200 B through 4 KiB
            q.put(bytes([i]) * 200, timeout=1)
            assert q.get(timeout=1) == bytes([i]) * 200
    finally:
        w.stop_all([holder])
        q.close()


def test_dead_producer_claim_across_the_wrap(name: str, tmp_path: Path) -> None:
    """The dead claim straddles the end of the data area (padding to the end, its frame at 0):
    the padding written over it is split at the end, and the ring reads on cleanly."""
    q = shmq.Queue(name, create=True, kind="mpsc", capacity=4096, wait="block")
    for _ in range(8):  # move the cursors to 8 * 504 = 4032, 64 bytes before the end
        q.put(bytes(496), timeout=1)
        q.get(timeout=1)
    marker, release = tmp_path / "open", tmp_path / "release"
    holder = start(rw.hold_put_view_until, name, bytes(200), str(marker), str(release))
    try:
        wait_file(marker, [holder])
        assert q._counters()["tail_claim"] == 4096 + 208  # the wrap's padding, then 8 + 200
        q.put(b"after", timeout=0)
        kill(holder)
        assert q.get(timeout=RECOVERED_WITHIN_S) == b"after"
        for i in range(30):
            q.put(bytes([i]) * 300, timeout=1)
            assert q.get(timeout=1) == bytes([i]) * 300
        assert q.stats().dead_producer_claims == 1
    finally:
        w.stop_all([holder])
        q.close()


def test_stopped_producer_holding_a_claim_is_left_alone(name: str, tmp_path: Path) -> None:
    """A producer SIGSTOPped inside put_view is alive: waiters behind it wait (or time out) as
    long as it is stopped, and nothing is recovered; once it goes on, its message and the one
    deferred behind it arrive in order."""
    q = shmq.Queue(name, create=True, kind="mpmc", capacity=4096, wait="block")
    marker, release = tmp_path / "open", tmp_path / "release"
    holder = start(rw.hold_put_view_until, name, b"held", str(marker), str(release))
    try:
        wait_file(marker, [holder])
        os.kill(holder.pid, signal.SIGSTOP)
        q.put(b"behind", timeout=0)
        with pytest.raises(shmq.Empty):
            q.get(timeout=1.0)  # ten recovery intervals
        assert q.stats().dead_producer_claims == 0
        os.kill(holder.pid, signal.SIGCONT)
        release.touch()
        assert q.get(timeout=10) == b"held"
        assert q.get(timeout=10) == b"behind"
        holder.join(JOIN_S)
        assert holder.exitcode == 0
        assert q.stats().dead_producer_claims == 0
    finally:
        stop_stopped(holder)
        q.close()


def test_recovery_refuses_while_a_handle_is_untracked(name: str, tmp_path: Path) -> None:
    """A handle attached without a table entry (the table was full) could hold any claim:
    nothing is recovered while one is counted; once it is gone, the dead claim is."""
    q = shmq.Queue(name, create=True, kind="mpsc", capacity=4096, wait="block")
    marker, release = tmp_path / "open", tmp_path / "release"
    holder = start(rw.hold_put_view_until, name, b"held", str(marker), str(release))
    mapping = q._segment.mapping
    try:
        wait_file(marker, [holder])
        q.put(b"behind", timeout=0)
        kill(holder)
        _ring.attach_untracked(mapping, 1)
        try:
            with pytest.raises(shmq.Empty):
                q.get(timeout=0.6)
            assert q.stats().dead_producer_claims == 0
        finally:
            _ring.attach_untracked(mapping, -1)
        assert q.get(timeout=RECOVERED_WITHIN_S) == b"behind"
        assert q.stats().dead_producer_claims == 1
    finally:
        w.stop_all([holder])
        q.close()


def test_a_dead_recoverers_lock_is_taken_over_a_live_ones_is_not(name: str, tmp_path: Path) -> None:
    """The recovery lock names its holder: a dead holder's lock is taken over; while a live
    process holds it, this one does not recover."""
    q = shmq.Queue(name, create=True, kind="mpsc", capacity=4096, wait="block")
    marker, release = tmp_path / "open", tmp_path / "release"
    holder = start(rw.hold_put_view_until, name, b"held", str(marker), str(release))
    bystander = start(rw.wait_for_file, str(tmp_path / "never"), 120.0)
    mapping = q._segment.mapping
    try:
        wait_file(marker, [holder])
        q.put(b"behind", timeout=0)
        live = _attach.identity(bystander.pid)
        assert live
        struct.pack_into("<Q", mapping, _ring.OFF_RECOVER_LOCK, live)
        kill(holder)
        with pytest.raises(shmq.Empty):
            q.get(timeout=0.6)
        kill(bystander)  # now the lock's holder is dead
        assert q.get(timeout=RECOVERED_WITHIN_S) == b"behind"
        assert struct.unpack_from("<Q", mapping, _ring.OFF_RECOVER_LOCK)[0] == 0
    finally:
        w.stop_all([holder, bystander])
        q.close()


def _slot(mapping: Any, i: int) -> tuple[int, int]:
    """(state, start) of deferred-commit slot i."""
    off = _ring.OFF_DEFERRED + i * _ring.DEFERRED_SLOT_SIZE
    state, _, start = struct.unpack_from("<IIQ", mapping, off)
    return state, start


def _set_slot(mapping: Any, i: int, state: int, start: int | None = None) -> None:
    off = _ring.OFF_DEFERRED + i * _ring.DEFERRED_SLOT_SIZE
    struct.pack_into("<I", mapping, off, state)
    if start is not None:
        struct.pack_into("<Q", mapping, off + 8, start)


def _dead_entry(mapping: Any) -> int:
    """An attachment entry whose owner is dead (this pid with another start time): 1 + its index,
    as a slot state carries it."""
    me = _attach.identity(os.getpid())
    assert me
    index = _ring.attach_claim(mapping, me + (1 << 22), _attach.ROLE_USER, 0)
    assert index >= 0
    return index + 1


def _ghost_claim(mapping: Any, size: int) -> int:
    """A claim of `size` ring bytes by a producer that died at once: where it starts."""
    at = int(struct.unpack_from("<Q", mapping, _ring.OFF_TAIL_CLAIM)[0])
    struct.pack_into("<Q", mapping, _ring.OFF_TAIL_CLAIM, at + size)
    return at


WRITING, READY, TAKEN = 1, 2, 3  # deferred-commit slot states (ring.c)


def test_a_slot_a_dead_committer_had_taken_is_committed(name: str) -> None:
    """A process committing someone else's deferred claim died between taking its slot and the
    commit: the claim (complete: its put returned) is made ready again and delivered."""
    q = shmq.Queue(name, create=True, kind="mpsc", capacity=4096, wait="block")
    m = q._segment.mapping
    try:
        at = _ghost_claim(m, 16)
        q.put(b"handed over", timeout=0)  # deferred behind the ghost
        (i,) = [i for i in range(_ring.DEFERRED_SLOTS) if _slot(m, i) == (READY, at + 16)]
        # The dead committer: it committed the ghost's claim (as padding), took the slot, died.
        struct.pack_into("<II", m, _ring.HEADER_SIZE + at, 8, _ring.FRAME_PAD)
        struct.pack_into("<Q", m, _ring.OFF_TAIL_COMMIT, at + 16)
        _set_slot(m, i, TAKEN | _dead_entry(m) << 8)
        assert q.get(timeout=RECOVERED_WITHIN_S) == b"handed over"
        assert _slot(m, i)[0] == 0 and q.stats().messages_put == 1
    finally:
        q.close()


def test_a_slot_a_dead_producer_was_filling_is_freed_and_its_claim_padded(name: str) -> None:
    """A producer died while handing its claim over (slot WRITING, tagged with its entry): the slot
    is freed and the claim padded. The same slot tagged with a live process is left alone."""
    q = shmq.Queue(name, create=True, kind="mpsc", capacity=4096, wait="block")
    m = q._segment.mapping
    try:
        at = _ghost_claim(m, 24)
        registration = q._segment.registration
        assert registration is not None
        _set_slot(m, 15, WRITING | (registration.index + 1) << 8, at)  # "live": this process
        q.put(b"behind", timeout=0)
        with pytest.raises(shmq.Empty):
            q.get(timeout=0.6)
        assert q.stats().dead_producer_claims == 0
        _set_slot(m, 15, WRITING | _dead_entry(m) << 8)
        assert q.get(timeout=RECOVERED_WITHIN_S) == b"behind"
        assert _slot(m, 15)[0] == 0 and q.stats().dead_producer_claims == 1
    finally:
        q.close()


def test_closing_a_handle_with_a_claim_open_keeps_its_entry(name: str) -> None:
    """A handle closed while one of its put_views is still open keeps its attachment entry (its
    claim bound in it): recovery must go on seeing that a live process holds that claim."""
    q = shmq.Queue(name, create=True, kind="mpsc", capacity=4096, wait="block")
    other = shmq.Queue(name)
    try:
        mine = [a for a in read_info(name).attached if a.pid == os.getpid()]
        view = other.put_view(8, timeout=0)
        other.close()
        assert [a for a in read_info(name).attached if a.pid == os.getpid()] == mine
        q.put(b"behind", timeout=0)
        with pytest.raises(shmq.Empty):
            q.get(timeout=0.6)  # the open claim is a live process's: nothing is recovered
        assert q.stats().dead_producer_claims == 0
        view.commit()
        assert q.get(timeout=1) == bytes(8)
        assert q.get(timeout=1) == b"behind"
    finally:
        q.close()


# -- consumers ---------------------------------------------------------------------------------


def test_dead_consumer_threads_views_around_a_live_view(name: str, tmp_path: Path) -> None:
    """mpmc: a process holds get_views in two threads (messages 1 and 3) and is killed while this
    process holds a view of message 2. Message 1 is released for the dead one at once; message 2
    stays leased (its reader lives), so nothing behind it is reused; once this process lets go of
    it, message 3 is released as well."""
    q = shmq.Queue(name, create=True, kind="mpmc", capacity=4096, wait="block")
    for i in range(1, 5):
        q.put(f"m{i}".encode(), timeout=1)
    m = [tmp_path / f"open{i}" for i in range(2)]
    gate = tmp_path / "go"
    holder = start(rw.views_in_threads, name, "get", [(None, str(m[0])), (str(gate), str(m[1]))])
    try:
        wait_file(m[0], [holder])
        assert w.load(str(m[0])) == b"m1"
        with q.get_view(timeout=1) as live:
            assert bytes(live) == b"m2"
            gate.touch()
            wait_file(m[1], [holder])
            assert w.load(str(m[1])) == b"m3"
            kill(holder)
            assert q.get(timeout=1) == b"m4"
            release_at = q._counters()["head_release"]
            with pytest.raises(shmq.Empty):
                q.get(timeout=0.6)  # the waiter releases m1, not the live m2 (nor m3 behind it)
            st = q.stats()
            assert st.dead_consumer_messages == 1
            assert q._counters()["head_release"] > release_at  # m1 went
            assert bytes(live) == b"m2"  # and what we hold is intact
            assert st.depth_messages == 2  # m2 and m3 are still taken, not released
        with pytest.raises(shmq.Empty):
            q.get(timeout=0.6)  # now m3 (stalled behind nothing live) is released too
        st = q.stats()
        assert st.dead_consumer_messages == 2 and st.depth_bytes == 0
        assert st.messages_got == st.messages_put == 4
    finally:
        w.stop_all([holder])
        q.close()


def test_stopped_consumer_holding_a_view_is_left_alone(name: str, tmp_path: Path) -> None:
    """A consumer SIGSTOPped inside get_view keeps its frame, however long: producers that
    fill the ring behind it time out (Full), and nothing is released for it."""
    q = shmq.Queue(name, create=True, kind="mpmc", capacity=4096, wait="block")
    q.put(b"leased", timeout=1)
    marker = tmp_path / "open"
    holder = start(rw.views_in_threads, name, "get", [(None, str(marker))])
    try:
        wait_file(marker, [holder])
        os.kill(holder.pid, signal.SIGSTOP)
        with pytest.raises(shmq.Full):
            for _ in range(100):
                q.put(bytes(500), timeout=0.3)
        assert q.stats().dead_consumer_messages == 0
        os.kill(holder.pid, signal.SIGCONT)
        kill(holder)
        q.get_many(100, timeout=1)  # drains, then finds the dead view and releases it
        q.put(bytes(500), timeout=RECOVERED_WITHIN_S)
        assert q.stats().dead_consumer_messages == 1
    finally:
        stop_stopped(holder)
        q.close()


# -- randomized fault injection -----------------------------------------------------------------


def _records(paths: list[Path]) -> list[list[tuple[int, int, bool]]]:
    return [w.read_records(str(p)) for p in paths]


@pytest.mark.parametrize("kind", ["mpsc", "mpmc"])
@pytest.mark.parametrize("iteration", range(2 * SCALE))
def test_random_kills_lose_and_duplicate_nothing(
    name: str, tmp_path: Path, kind: str, iteration: int
) -> None:
    """Three producers (put / put_many / put_view that dawdles inside) and consumers (get /
    get_view that dawdles inside; two on mpmc) on a 4 KiB ring. At random moments: SIGKILL one or
    two producers, and on mpmc a consumer (a fresh one replaces it) and SIGSTOP another for a
    while. Then the survivors finish, this process drains the rest, and:
    - every message a producer's call returned for is delivered, except those a killed consumer
      had taken (at most `dead_consumer_messages` of them);
    - nothing is delivered twice, garbled, or out of per-producer order within one consumer;
    - nothing a producer never put is delivered;
    - once everyone is gone, `shmq gc` removes the segment."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    why = f"seed={seed} kind={kind}"
    producers_n, count = 3, 300
    created = tmp_path / "created"
    creator = start(rw.create_and_wait, name, kind, 4096, str(created))
    procs: list[Any] = [creator]
    wait_file(created, procs)
    q = shmq.Queue(name, wait="block")
    done = tmp_path / "done"
    plogs = [tmp_path / f"p{i}.log" for i in range(producers_n)]
    clogs: list[Path] = []

    def consumer() -> Any:
        clogs.append(tmp_path / f"c{len(clogs)}.log")
        return start(rw.fault_consumer, name, rng.randrange(1 << 30), str(clogs[-1]), str(done))

    try:
        producers = [
            start(rw.fault_producer, name, i, count, rng.randrange(1 << 30), str(plogs[i]))
            for i in range(producers_n)
        ]
        consumers = [consumer() for _ in range(2 if kind == "mpmc" else 1)]
        procs += producers + consumers
        killed_producers = rng.sample(range(producers_n), rng.randint(1, 2))
        events: list[tuple[float, str, int]] = [
            (rng.uniform(0.05, 0.8), "kill-p", i) for i in killed_producers
        ]
        if kind == "mpmc":
            events.append((rng.uniform(0.05, 0.8), "kill-c", 0))
            events.append((rng.uniform(0.05, 0.8), "stop-c", 1))
        t0 = time.monotonic()
        for at, what, i in sorted(events):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            if what == "kill-p":
                producers[i].kill()
            elif what == "kill-c":
                consumers[i].kill()
                procs.append(consumer())
            else:
                os.kill(consumers[i].pid, signal.SIGSTOP)
                time.sleep(rng.uniform(0.1, 0.4))
                os.kill(consumers[i].pid, signal.SIGCONT)
        survivors = [p for i, p in enumerate(producers) if i not in killed_producers]
        w.join_all(survivors, JOIN_S)
        assert [p.exitcode for p in survivors] == [0] * len(survivors), f"a producer hung or failed: {why}"
        done.touch()
        readers = [p for p in procs if p not in producers and p is not creator]
        w.join_all(readers, JOIN_S)
        assert all(p.exitcode in (0, -signal.SIGKILL) for p in readers), f"a consumer hung or failed: {why}"
        drained = []
        while True:  # what the consumers left (a killed producer's deferred claims included)
            try:
                drained.append(w.check_message(q.get(timeout=1.0), rw.MAX_BODY))
            except shmq.Empty:
                break

        streams = [*_records(clogs), drained]
        delivered = [(p, s) for stream in streams for p, s, ok in stream]
        assert all(ok for stream in streams for *_, ok in stream), f"garbled message: {why}"
        assert len(delivered) == len(set(delivered)), f"duplicates: {why}"
        for stream in streams:
            last: dict[int, int] = defaultdict(lambda: -1)
            for p, s, _ in stream:
                assert s > last[p], f"producer {p} out of order ({last[p]} then {s}): {why}"
                last[p] = s
        confirmed = {(p, s) for log in _records(plogs) for p, s, _ in log}
        st = q.stats()
        missing = confirmed - set(delivered)
        assert len(missing) <= st.dead_consumer_messages, f"lost {sorted(missing)[:10]}, stats {st}: {why}"
        if kind == "mpsc":
            assert not missing, f"lost {sorted(missing)[:10]}: {why}"
        confirmed_upto = {i: max((s for p, s in confirmed if p == i), default=-1) for i in range(producers_n)}
        for p, s in delivered:
            # (a killed producer's last call may have put up to 4 messages it never logged)
            assert p < producers_n and s <= confirmed_upto[p] + 4, f"({p}, {s}) was never put: {why}"
        assert st.depth_bytes == 0, f"{st}: {why}"
        # (the put count may count a message whose producer died between counting and committing)
        assert 0 <= st.messages_put - st.messages_got <= len(killed_producers), f"{st}: {why}"
    finally:
        w.stop_all(procs)  # the creator too
        q.close()  # not unlinked: every participant is now dead or gone
    assert segment_exists(name), why
    result = run_cli("gc", "--yes", name)
    assert result.returncode == 0, result.stderr
    assert not segment_exists(name), f"shmq gc left it: {result.stdout} {why}"
