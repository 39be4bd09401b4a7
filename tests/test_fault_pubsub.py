"""Fault injection on the pub/sub side, across real processes, at random moments.

Each test runs several iterations; each iteration starts fresh publisher and subscriber processes
(tests/_fault_workers.py) on its own topics, injects faults at moments drawn from a seeded
`random.Random`, and then checks what the documents promise (README "Pub/sub", docs/ARCHITECTURE.md
"When a process dies", "Queue groups", "The forwarding loop", "Appending: durable before routed",
"Replay, the seam, and durable subscriptions"):

1. a plain subscriber SIGKILLed (sometimes frozen first, sometimes before it finished subscribing):
   the other subscribers get every message exactly once, in per-publisher order; the router goes on
   serving; the dead subscriber's ring is removed by the router (by `shmq gc --yes` if it died
   before the router knew it);
2. a queue-group member SIGKILLed: every message reaches the group, nothing is lost, and the only
   possible duplicate is the message the dead member was in the middle of reading (it logged it,
   then died before releasing it);
3. the router SIGKILLed and restarted, 1-3 times an iteration: nothing is lost; a plain subscriber
   may get again only what a router read from a publisher ring and had not released (at most 64
   messages per publisher ring, replayed contiguously, once per kill); on durable topics the log
   holds every message exactly once, and log-fed subscribers (start=, durable=) get each exactly
   once, in log order, with no gap;
4. a subscriber frozen (SIGSTOP) for a random time, then resumed: under `block` the publishers are
   held back (never more than the rings hold ahead of it) and nothing is lost; under a dropping
   policy the publishers never wait and every message is either received or counted as a drop,
   exactly; either way a stream it does not take flows meanwhile; then it catches up;
5. after each test every process has ended and, once `shmq gc --yes` ran for the bus, no segment
   of the test is left (before it, only rings of processes the test SIGKILLed may be).

At the end, the faults these found, each as the smallest test that shows it (both fixed): a client
killed between its hello and the router's answer killed the router; a group member that died while
no router ran lost its unread messages.

Every wait is bounded; nothing measures time. The seed is printed in every assertion message:
``SHMQ_FAULT_SEED=<seed>`` replays the same random choices (the timing of the processes is the
machine's). The default run is short (CI: well under a minute on 2 cores); ``SHMQ_FAULT_SCALE=N``
runs N times as many iterations, e.g.
``SHMQ_FAULT_SCALE=20 .venv/bin/python -m pytest tests/test_fault_pubsub.py -p no:timeout`` for a long
soak (pytest-timeout scales with the iterations too, so ``-p no:timeout`` is optional).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import shmq
from shmq._native import _ring
from shmq.log import read_log
from shmq.testing import list_segments, remove_segment, segment_exists, unique_name
from shmq.topics import matches
from tests import _fault_workers as fw
from tests import _pubsub_workers as pw
from tests._workers import dump, wait_until
from tests.conftest import CTX
from tests.test_cli import run_cli

SCALE = max(0.1, float(os.environ.get("SHMQ_FAULT_SCALE", "1")))
WAIT_S = fw.OP_TIMEOUT  # generous bound for anything the parent waits for
READ_BATCH = 64  # messages the router reads from a publisher ring at a time (ARCHITECTURE.md)

pytestmark = pytest.mark.timeout(int(60 * SCALE) + 60)


def iterations(base: int) -> int:
    return max(1, round(base * SCALE))


@pytest.fixture
def seed() -> int:
    """The run's seed: SHMQ_FAULT_SEED replays one; each iteration derives its own from it."""
    chosen = os.environ.get("SHMQ_FAULT_SEED")
    return int(chosen) if chosen else random.randrange(1 << 31)


# -- the harness: processes, routers, and the segments they leave --------------------------------------


class Harness:
    """One test's bus, child processes and routers; `close` ends every one of them and removes every
    segment of the bus, whatever happened (the test checks for leaks itself before that)."""

    def __init__(self, root: Path) -> None:
        self.bus = unique_name("fault")
        self.root = root
        ctl = root / "ctl"
        ctl.mkdir()
        self.children = pw.Children(CTX, ctl)
        self.routers: list[shmq.Router] = []
        self.killed: set[int] = set()  # pids this test SIGKILLed (children and routers)

    def start_router(self, **options: Any) -> shmq.Router:
        router = shmq.Router(self.bus, **options).start()
        self.routers.append(router)
        return router

    def kill_router(self, router: shmq.Router) -> None:
        assert router.pid is not None
        self.killed.add(router.pid)
        router.kill()  # SIGKILL, then reaped

    def kill(self, proc: Any) -> None:
        self.killed.add(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(WAIT_S)

    def stop_router(self, router: shmq.Router) -> None:
        """Stop it once its clients are gone and it removed what they left (else the leak check
        would blame the test for rings the router was about to remove)."""
        pw.settle_live(self.bus)
        router.stop()

    def close(self) -> None:
        self.children.stop()  # SIGCONT, then SIGKILL whatever is still running
        for router in self.routers:
            if router.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(router.pid, signal.SIGCONT)  # (a test that failed with it frozen)
            router.stop()
        for name in pw.bus_segments(self.bus):
            remove_segment(name)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def assert_no_leak(h: Harness, tag: str) -> None:
    """Every process of the test has ended; what is left of the bus belongs to processes the test
    SIGKILLed (a dead router's bus segment, or a ring whose owner died before the router knew it),
    and `shmq gc --yes` for the bus removes all of it."""
    procs = h.children.procs
    pw.join_ok([p for p in procs if p.pid not in h.killed])
    for p in procs:
        p.join(WAIT_S)
    assert all(p.exitcode is not None for p in procs), f"{tag}: processes still running"
    assert not any(r.is_alive() for r in h.routers), f"{tag}: a router still runs"
    left = pw.bus_segments(h.bus)
    blamed = [n for n in left if n != f"bus.{h.bus}" and pw.ring_owner(h.bus, n) not in h.killed]
    assert not blamed, f"{tag}: segments of processes that ended cleanly were left behind: {blamed}"
    assert f"bus.{h.bus}" not in left, f"{tag}: the last router, stopped cleanly, left its bus segment"
    gc = run_cli("gc", "--yes", f"bus.{h.bus}*")
    assert gc.returncode == 0, f"{tag}: shmq gc failed: {gc.stderr}"
    still = pw.bus_segments(h.bus)
    assert not still, f"{tag}: left after `shmq gc --yes`: {still} (gc said: {gc.stdout.strip()})"


# -- what was published, and what a receiver must have got ------------------------------------------


@dataclass
class Published:
    """What the publisher processes of one iteration published."""

    topics: list[str]
    ids: dict[int, int] = field(default_factory=dict)  # pub_no -> publisher_id
    # pub_no -> [(n, topic number, seq), ...] in publish order
    records: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    retried: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(len(r) for r in self.records.values())

    def index(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(pub_no, n) -> (topic number, seq)."""
        return {(p, n): (t, s) for p, recs in self.records.items() for n, t, s in recs}

    def expected(self, patterns: str | Sequence[str]) -> dict[int, list[int]]:
        """pub_no -> the message numbers a subscriber to `patterns` must get, in publish order."""
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        wanted = [any(matches(p, t) for p in pats) for t in self.topics]
        return {p: [n for n, t, _ in recs if wanted[t]] for p, recs in self.records.items()}


def collect_publishers(pubs: list[tuple[Any, Path]], topics: list[str], tag: str) -> Published:
    """Wait for each publisher's result; check that it numbered its messages per topic from 1
    without a gap (a publish that raised and was retried used no number: nothing was published)."""
    out = Published(topics)
    for pub_no, (proc, ctl) in enumerate(pubs):
        publisher_id, records, retried = pw.await_file(proc, ctl / "result", WAIT_S)
        out.ids[pub_no] = publisher_id
        out.records[pub_no] = records
        out.retried.update(retried)
        assert [n for n, _, _ in records] == list(range(len(records))), f"{tag}: publisher {pub_no} result"
        for t in range(len(topics)):
            seqs = [s for _, topic, s in records if topic == t]
            assert seqs == list(range(1, len(seqs) + 1)), f"{tag}: publisher {pub_no} seqs on {topics[t]}"
    pw.join_ok([proc for proc, _ in pubs])
    return out


def check_intact(recs: list[fw.Rec], published: Published, who: str) -> None:
    """Every logged message is one that was published, whole, under its topic, seq and publisher."""
    index = published.index()
    for r in recs:
        assert r.flags & fw.F_INTACT, f"{who}: message {r.key} damaged"
        assert r.key in index, f"{who}: got {r.key}, which was never published"
        assert (r.topic, r.seq) == index[r.key], f"{who}: {r.key} came with topic/seq {(r.topic, r.seq)}"
        assert r.publisher_id == published.ids[r.pub_no], f"{who}: {r.key} with a wrong publisher_id"


def check_exactly_once(
    recs: list[fw.Rec], published: Published, patterns: str | Sequence[str], who: str
) -> None:
    """Exactly the messages on matching topics, once each, in per-publisher order, intact."""
    check_intact(recs, published, who)
    counts = Counter(r.key for r in recs)
    dups = sorted(k for k, c in counts.items() if c > 1)
    assert not dups, f"{who}: {len(dups)} messages delivered twice, e.g. {dups[:5]}"
    for pub_no, exp in published.expected(patterns).items():
        got = [r.n for r in recs if r.pub_no == pub_no]
        missing = sorted(set(exp) - set(got))
        assert not missing, (
            f"{who}: {len(missing)} of publisher {pub_no}'s {len(exp)} messages lost, e.g. {missing[:5]}"
        )
        assert got == exp, f"{who}: publisher {pub_no}'s messages extra or out of order"


def check_replays(
    recs: list[fw.Rec], published: Published, patterns: str | Sequence[str], kills: int, who: str
) -> int:
    """What a plain subscriber may get across router crashes (ARCHITECTURE.md, "When a process
    dies": the router mid-pass): every message, in per-publisher order, except that after a crash
    the messages of the dead router's current read of a publisher ring (at most 64; committed to
    this ring, not yet released from the publisher's) come again, contiguously, in order. So per
    publisher the stream is runs of its expected sequence, each run starting at most 64 before
    where the previous one got to, never after it (no gap), and at most one new run per kill.
    Returns how many messages came twice."""
    check_intact(recs, published, who)
    twice = 0
    for pub_no, exp in published.expected(patterns).items():
        pos = {n: i for i, n in enumerate(exp)}
        got = [pos[r.n] for r in recs if r.pub_no == pub_no and r.n in pos]
        assert len(got) == sum(1 for r in recs if r.pub_no == pub_no), (
            f"{who}: a message it did not subscribe to"
        )
        rewinds, high, prev = 0, -1, -1
        for x in got:
            if x == prev + 1 and x <= high:
                pass  # a replayed run goes on
            elif x == high + 1:
                pass  # the next new message
            elif x <= high:
                rewinds += 1  # a crash: the dead router's read comes again from here
                assert high - x < READ_BATCH, (
                    f"{who}: publisher {pub_no}: {high - x + 1} messages came again after a crash "
                    f"(at most {READ_BATCH}: one read of its ring)"
                )
            else:
                raise AssertionError(
                    f"{who}: publisher {pub_no}: messages {exp[high + 1 : x][:5]}... skipped"
                )
            high, prev = max(high, x), x
        assert high == len(exp) - 1, (
            f"{who}: publisher {pub_no}: lost its last {len(exp) - 1 - high} messages"
        )
        assert rewinds <= kills, f"{who}: publisher {pub_no}: {rewinds} replays for {kills} router crashes"
        twice += len(got) - len(exp)
    return twice


# -- small helpers -------------------------------------------------------------------------------------

Proc = tuple[Any, Path]  # a child process and its control directory


def spawn(h: Harness, name: str, target: Any, *args: Any, **kwargs: Any) -> Proc:
    """Start a worker (spawning costs ~0.2 s: start them all, then wait for them)."""
    return h.children.start(target, name, *args, **kwargs)


def ready(procs: Sequence[Proc]) -> list[Any]:
    return [pw.await_file(proc, ctl / "ready") for proc, ctl in procs]


def publishers(
    h: Harness, rng: random.Random, prefix: str, topics: list[str], counts: list[int], options: dict[str, Any]
) -> list[Proc]:
    return [
        spawn(h, f"{prefix}-pub{p}", fw.publisher, h.bus, p, topics, count, rng.randrange(1 << 30), options)
        for p, count in enumerate(counts)
    ]


def go(pubs: Sequence[Proc], finish: bool) -> None:
    for _, ctl in pubs:
        if finish:
            (ctl / "finish").touch()  # (no router crash to wait for: they may close when done)
        (ctl / "go").touch()


def expect(procs: Sequence[Proc], patterns: Sequence[str | list[str]], published: Published) -> None:
    """Tell each receiver how many distinct messages to wait for."""
    for (_, ctl), pats in zip(procs, patterns, strict=True):
        dump(str(ctl / "count"), sum(len(v) for v in published.expected(pats).values()))


def freeze(proc: Any, tag: str) -> None:
    os.kill(proc.pid, signal.SIGSTOP)
    assert wait_until(lambda: pw.is_stopped(proc.pid), WAIT_S), f"{tag}: {proc.name} did not stop"


def progress(pubs: Sequence[Proc]) -> int:
    return sum(fw.read_progress(ctl / "published") for _, ctl in pubs)


def logged(ctl: Path) -> int:
    return fw.count_recs(ctl / "log")


def subscriber_by_ring(bus: str, ring: str) -> shmq.SubscriberStats | None:
    return next((s for s in shmq.bus_stats(bus).subscribers if s.ring == ring), None)


def caught_up(bus: str, ring: str) -> bool:
    stats = subscriber_by_ring(bus, ring)
    return stats is not None and stats.lag == 0 and stats.pending == 0


def ring_frames(capacity: int, topics: Sequence[str]) -> int:
    """The most messages of this test's smallest size that fit in a ring of `capacity` bytes."""
    smallest = _ring.MSG_HEADER + min(len(t.encode()) for t in topics) + fw.MIN_PAYLOAD
    return capacity // _ring.frame_size(smallest)


def gc_removes(pattern: str, prefix: str, timeout: float) -> bool:
    """Run `shmq gc --yes PATTERN` until nothing starts with `prefix` (False after `timeout`)."""

    def gone() -> bool:
        return run_cli("gc", "--yes", pattern).returncode == 0 and not list_segments(prefix)

    return wait_until(gone, timeout, interval=0.5)


# -- 1. a subscriber killed ----------------------------------------------------------------------------


def test_sigkill_a_subscriber_at_a_random_moment(h: Harness, seed: int) -> None:
    """Two publishers stream numbered messages over three topics to two surviving subscribers
    (different patterns and ring sizes) and a victim (random ring size and on_full policy), which
    is SIGKILLed at a random moment: while receiving, after being frozen with a full ring (a `block`
    victim then holds the publishers up until it dies), or while it is still subscribing. The
    survivors get exactly their messages, once, in per-publisher order; the publishers finish; the
    router removes the victim's ring (if the router never heard of it, `shmq gc --yes` does) and
    goes on serving: every iteration runs on the same router."""
    router = h.start_router()
    for it in range(iterations(3)):
        kill_a_subscriber(h, router, seed, it)
    h.stop_router(router)
    assert_no_leak(h, f"seed {seed}")


def kill_a_subscriber(h: Harness, router: shmq.Router, seed: int, it: int) -> None:
    rng = random.Random(seed * 1000 + it)
    tag = f"seed {seed} iteration {it}"
    topics = [f"k{it}.a", f"k{it}.b.x", f"k{it}.c"]
    second: list[str | list[str]] = [[f"k{it}.a", f"k{it}.*.x"], f"k{it}.*", [f"k{it}.c", f"k{it}.b.>"]]
    patterns = [f"k{it}.>", rng.choice(second)]
    how = rng.choices(["running", "frozen", "subscribing"], [0.55, 0.3, 0.15])[0]
    victim_options = {
        "capacity": rng.choice([4096, 8192, 65536]),
        "on_full": rng.choice(["block", "block", "drop", "drop_oldest", "conflate"]),
    }
    victim_seed = rng.randrange(1 << 30)

    def start_victim() -> Proc:
        return spawn(h, f"{it}-victim", fw.receiver, h.bus, f"k{it}.>", victim_options, topics, victim_seed)

    victim, victim_ctl = start_victim() if how != "subscribing" else (None, None)
    survivors = [
        spawn(
            h,
            f"{it}-sub{j}",
            fw.receiver,
            h.bus,
            pats,
            {"capacity": rng.choice([4096, 16384, 1 << 20]), "wait": rng.choice(["adaptive", "block"])},
            topics,
            rng.randrange(1 << 30),
        )
        for j, pats in enumerate(patterns)
    ]
    counts = [rng.randint(300, 600) for _ in range(2)]
    pub_options = {"capacity": rng.choice([4096, 1 << 16]), "pause": 0.2, "pause_s": 0.005}
    pubs = publishers(h, rng, str(it), topics, counts, pub_options)
    ready(survivors + pubs)
    victim_ring = None
    if victim is not None and victim_ctl is not None:
        victim_ring = ready([(victim, victim_ctl)])[0][1]
    go(pubs, finish=True)

    if victim is None or victim_ctl is None:
        # Killed while it starts: before its ring exists, between its ring and its hello, during
        # the hello, or just after (the spawn and imports take ~0.2-0.5 s here).
        started = time.monotonic()
        victim, victim_ctl = start_victim()
        time.sleep(max(0.0, started + rng.uniform(0.05, 0.6) - time.monotonic()))
    else:
        k = rng.randint(0, 60)
        wait_until(lambda: logged(victim_ctl) >= k or progress(pubs) == sum(counts), WAIT_S)
        time.sleep(rng.uniform(0, 0.03))
        if how == "frozen":
            freeze(victim, tag)
            time.sleep(rng.uniform(0, 0.2))  # its ring fills; under `block` the publishers wait
    at = (logged(victim_ctl), progress(pubs), sum(counts))
    h.kill(victim)
    assert victim.exitcode == -signal.SIGKILL, f"{tag}: the victim ended with {victim.exitcode} first"
    print(f"{tag}: victim {victim_options} {how}, killed having logged {at[0]}, published {at[1]}/{at[2]}")

    # Its ring goes: the router's job on EOF, or gc's if it died before the router knew it.
    prefix = f"bus.{h.bus}.s.{victim.pid}."
    print(f"{tag}: the victim left {list_segments(prefix)}")
    if not wait_until(lambda: not list_segments(prefix), 5):
        assert victim_ring is None, f"{tag}: the router did not remove the ring of a dead subscriber"
        # (a ring whose creator died while writing its header is gc's only after 10 s)
        print(f"{tag}: the router never knew the victim: shmq gc removes its ring")
        assert gc_removes(f"{prefix}*", prefix, 15), (
            f"{tag}: shmq gc --yes did not remove the ring of a subscriber killed while subscribing"
        )

    assert router.is_alive(), (
        f"{tag}: the router died (killed {how}; see also "
        "test_a_client_killed_right_after_its_hello_leaves_the_router_serving)"
    )

    published = collect_publishers(pubs, topics, tag)
    expect(survivors, patterns, published)
    for j, ((proc, ctl), pats) in enumerate(zip(survivors, patterns, strict=True)):
        pw.await_file(proc, ctl / "result", WAIT_S)
        check_exactly_once(fw.read_recs(ctl / "log"), published, pats, f"{tag}: subscriber {j} {pats}")
    pw.join_ok([proc for proc, _ in survivors])
    # What the victim logged before it died: intact, nothing twice.
    victim_recs = fw.read_recs(victim_ctl / "log")
    check_intact(victim_recs, published, f"{tag}: victim")
    assert len({r.key for r in victim_recs}) == len(victim_recs), f"{tag}: the victim got a message twice"

    assert router.is_alive(), f"{tag}: the router died"
    stats = shmq.bus_stats(h.bus)
    assert victim.pid not in {s.pid for s in stats.subscribers}, f"{tag}: the dead subscriber is still listed"
    mine = [t for t in stats.topics if t.topic in topics]
    assert sum(t.messages for t in mine) == published.total, f"{tag}: the router's topic counters"


# -- 2. a queue group member killed ---------------------------------------------------------------------


def test_sigkill_a_group_member_at_a_random_moment(h: Harness, seed: int) -> None:
    """A queue group of three members (rings of random sizes) shares two publishers' streams; one
    member, reading its frames in place and logging each before releasing it, is SIGKILLed at a
    random moment (sometimes frozen first, its ring full). Every message reaches the group: the
    union of the members' logs is everything published. A message comes twice only if the dead
    member had it: ARCHITECTURE.md, "Queue groups": what it had not taken is redelivered to the
    others, and the message it was in the middle of reading is delivered again (at-least-once for
    that one message), the rest exactly once. So at most one duplicate, and it is the last message
    the dead member logged. The router removes its ring once it has redelivered what it held."""
    router = h.start_router()
    for it in range(iterations(3)):
        kill_a_group_member(h, seed, it)
    assert router.is_alive()
    h.stop_router(router)
    assert_no_leak(h, f"seed {seed}")


def kill_a_group_member(h: Harness, seed: int, it: int) -> None:
    rng = random.Random(seed * 1000 + it)
    tag = f"seed {seed} iteration {it}"
    topics = [f"g{it}.a", f"g{it}.b", f"g{it}.c.d"]
    policy = rng.choice(["block", "block", "drop"])  # (`drop`: when every member is full, counted)
    members = [
        spawn(
            h,
            f"{it}-m{m}",
            fw.group_member,
            h.bus,
            f"g{it}.>",
            f"workers{it}",
            {"capacity": rng.choice([4096, 8192, 65536]), "on_full": policy},
            topics,
            rng.randrange(1 << 30),
            m == 0 or rng.random() < 0.5,  # member 0 is the victim: always log-before-release
        )
        for m in range(3)
    ]
    counts = [rng.randint(300, 600) for _ in range(2)]
    pub_options = {"capacity": rng.choice([4096, 1 << 16]), "pause": 0.2, "pause_s": 0.005}
    pubs = publishers(h, rng, str(it), topics, counts, pub_options)
    victim, victim_ctl = members[0]
    victim_ring = ready(members)[0][1]
    ready(pubs)
    go(pubs, finish=True)

    k = rng.randint(0, 80)
    wait_until(lambda: logged(victim_ctl) >= k, WAIT_S)
    time.sleep(rng.uniform(0, 0.02))
    frozen = rng.random() < 0.3
    if frozen:
        freeze(victim, tag)
        time.sleep(rng.uniform(0, 0.2))
    at = (logged(victim_ctl), progress(pubs), sum(counts))
    h.kill(victim)
    assert victim.exitcode == -signal.SIGKILL, f"{tag}: the victim ended with {victim.exitcode} first"
    print(f"{tag}: member killed having logged {at[0]} (frozen first: {frozen}), published {at[1]}/{at[2]}")

    published = collect_publishers(pubs, topics, tag)
    everything = {(p, n) for p, recs in published.records.items() for n, _, _ in recs}
    controls = [ctl for _, ctl in members]

    def union() -> Counter[tuple[int, int]]:
        return Counter(r.key for ctl in controls for r in fw.read_recs(ctl / "log"))

    def drops() -> int:
        return sum(t.drops for t in shmq.bus_stats(h.bus).topics if t.topic in topics)

    wait_until(lambda: len(set(union()) & everything) + drops() >= len(everything), WAIT_S, interval=0.02)
    for _, ctl in members[1:]:
        (ctl / "done").touch()
    pw.join_ok([proc for proc, _ in members[1:]])
    logs = [fw.read_recs(ctl / "log") for ctl in controls]
    for m, recs in enumerate(logs):
        check_intact(recs, published, f"{tag}: member {m}")
    got = union()
    lost = sorted(everything - set(got))
    assert len(lost) == drops(), (
        f"{tag}: {len(lost)} messages reached no member, e.g. {lost[:5]}, and {drops()} were counted as "
        f"dropped (policy {policy}, frozen first: {frozen})"
    )
    dups = sorted(key for key, c in got.items() if c > 1)
    assert len(dups) <= 1 and all(got[d] == 2 for d in dups), (
        f"{tag}: {len(dups)} messages delivered more than once, e.g. {dups[:5]}; only the one the dead "
        "member was reading may come again"
    )
    print(f"{tag}: {policy}: twice {dups}, dropped {drops()}")
    last = [r.key for r in logs[0]][-1:]
    assert not dups or dups == last, (
        f"{tag}: {dups[0]} came twice, but the last message the dead member logged is {last}"
    )
    assert wait_until(lambda: not segment_exists(victim_ring), 5), (
        f"{tag}: the dead member's ring was not removed after its messages were redelivered"
    )
    mine = [t for t in shmq.bus_stats(h.bus).topics if t.topic in topics]
    assert sum(t.messages for t in mine) == published.total, f"{tag}: the router's topic counters"
    assert policy == "drop" or drops() == 0, f"{tag}: {drops()} drops under `block`"


# -- 3. the router killed ------------------------------------------------------------------------------


def test_sigkill_the_router_at_random_moments(h: Harness, seed: int) -> None:
    """Two publishers stream over durable (r<it>.d.*) and other topics; the router is SIGKILLed
    1-3 times at random moments and restarted after a random outage (publishes with short timeouts
    meanwhile raise RouterUnavailable or Full and are retried). Every other iteration the router
    has a durable log, a replaying subscriber (start="earliest") and a durable subscription
    (durable=, acknowledging everything) on the durable topics.

    The documented outcome, no weaker: publishers and subscribers reconnect by themselves and
    nothing queued in their rings is lost; a failed publish published nothing (seqs have no gap);
    plain subscribers get everything in per-publisher order except that, per crash, a publisher's
    messages in the dead router's current read (<= 64) may come again, contiguously; the log holds
    each durable message exactly once, with seqs 1..N, undamaged, in per-publisher order, and every
    copy of a durable message carries its record's log_seq; the replaying and the durable subscriber
    get every record exactly once, in log order (log_seq 1..N), none flagged redelivered (the same
    ring comes back: it resumes after what it had, ARCHITECTURE.md "The intent")."""
    for it in range(iterations(2)):
        kill_the_router(h, seed, it, durable=it % 2 == 1)
    assert_no_leak(h, f"seed {seed}")


def kill_the_router(h: Harness, seed: int, it: int, durable: bool) -> None:
    rng = random.Random(seed * 1000 + it)
    tag = f"seed {seed} iteration {it} ({'durable' if durable else 'no log'})"
    topics = [f"r{it}.d.a", f"r{it}.d.b", f"r{it}.n.a", f"r{it}.n.b"]
    data_dir = h.root / f"data{it}"
    options: dict[str, Any] = {"data_dir": data_dir, "durable": [f"r{it}.d.>"]} if durable else {}
    router = h.start_router(**options)
    second: list[str | list[str]] = [f"r{it}.*.a", [f"r{it}.d.b", f"r{it}.n.>"]]
    patterns = [f"r{it}.>", rng.choice(second)]
    plain = [
        spawn(
            h,
            f"{it}-sub{j}",
            fw.receiver,
            h.bus,
            pats,
            {"capacity": rng.choice([4096, 8192, 1 << 20])},
            topics,
            rng.randrange(1 << 30),
        )
        for j, pats in enumerate(patterns)
    ]
    fed: list[Proc] = []  # log-fed: replaying, durable
    if durable:
        for name, sub_options in (
            ("replaying", {"start": "earliest", "capacity": 4096}),
            ("durable", {"durable": f"d{it}", "capacity": 8192}),
        ):
            fed.append(
                spawn(
                    h,
                    f"{it}-{name}",
                    fw.receiver,
                    h.bus,
                    f"r{it}.d.>",
                    sub_options,
                    topics,
                    rng.randrange(1 << 30),
                    ack=name == "durable",
                )
            )
    counts = [rng.randint(300, 500) for _ in range(2)]
    pub_options = {"capacity": rng.choice([4096, 1 << 16]), "pause": 0.3, "pause_s": 0.01, "short": 0.3}
    pubs = publishers(h, rng, str(it), topics, counts, pub_options)
    ready(plain + fed + pubs)
    go(pubs, finish=False)

    kills = rng.randint(1, 3)
    for _ in range(kills):
        before = progress(pubs)
        # (something flows: it lands mid-stream, unless the stream is over)
        wait_until(lambda b=before: progress(pubs) > b or b == sum(counts), WAIT_S)
        # Sometimes a subscriber is frozen first: a `block` one with a full ring stalls the router in
        # the middle of a message's targets (delivered to some, not yet to it), which widens the
        # window where a crash makes a replay (ARCHITECTURE.md: "the router, mid-pass"); a log-fed
        # one comes back after the new router started, and must resume where its ring got to.
        frozen = rng.choice(plain + fed)[0] if rng.random() < 0.5 else None
        if frozen is not None:
            freeze(frozen, tag)
        time.sleep(rng.uniform(0, 0.25))
        print(f"{tag}: router killed at {progress(pubs)}/{sum(counts)} published, frozen: {frozen}")
        h.kill_router(router)
        time.sleep(rng.choice([0.0, rng.uniform(0, 0.3)]))
        router = h.start_router(**options)
        if frozen is not None:
            os.kill(frozen.pid, signal.SIGCONT)  # (the new router waits up to 3 s for its hello)
    for _, ctl in pubs:
        (ctl / "finish").touch()
    published = collect_publishers(pubs, topics, tag)
    expect(plain + fed, patterns + [f"r{it}.d.>"] * len(fed), published)
    for proc, ctl in plain + fed:
        pw.await_file(proc, ctl / "result", WAIT_S)
    pw.join_ok([proc for proc, _ in plain + fed])

    for j, ((_, ctl), pats) in enumerate(zip(plain, patterns, strict=True)):
        twice = check_replays(
            fw.read_recs(ctl / "log"), published, pats, kills, f"{tag}: subscriber {j} {pats}"
        )
        print(
            f"{tag}: subscriber {j} got {twice} messages twice; publishers retried {dict(published.retried)}"
        )
    if durable:
        check_durable(published, topics, data_dir, plain, fed, f"r{it}.d.>", tag)
    h.stop_router(router)


def check_durable(
    published: Published,
    topics: list[str],
    data_dir: Path,
    plain: list[Proc],
    fed: list[Proc],
    pattern: str,
    tag: str,
) -> None:
    """The log holds every durable message once; log-fed subscribers got exactly the log."""
    index = published.index()
    durable_keys = {
        (p, n) for p, recs in published.records.items() for n, t, _ in recs if matches(pattern, topics[t])
    }
    with read_log(data_dir) as entries:
        log = list(entries)
        damage = entries.damage
    assert not damage, f"{tag}: the log is damaged: {damage}"
    assert [e.seq for e in log] == list(range(1, len(log) + 1)), f"{tag}: the log's seqs have a gap"
    keys = []
    for e in log:
        pub_no, n, intact = fw.check_payload(e.data)
        assert intact and (pub_no, n) in index, f"{tag}: log record {e.seq} is not a published message"
        topic, seq = index[pub_no, n]
        assert (e.topic, e.publisher_seq, e.publisher_id) == (topics[topic], seq, published.ids[pub_no]), tag
        keys.append((pub_no, n))
    dups = [k for k, c in Counter(keys).items() if c > 1]
    assert not dups, f"{tag}: {len(dups)} messages are in the log twice, e.g. {dups[:5]}"
    missing = sorted(durable_keys - set(keys))
    assert not missing, f"{tag}: {len(missing)} durable messages are not in the log, e.g. {missing[:5]}"
    for p in published.records:
        mine = [n for q, n in keys if q == p]
        assert mine == sorted(mine), f"{tag}: publisher {p}'s messages are out of order in the log"
    seq_of = {k: i + 1 for i, k in enumerate(keys)}
    for j, (_, ctl) in enumerate(plain):  # every copy of a durable message carries its record's seq
        for r in fw.read_recs(ctl / "log"):
            if r.key in seq_of:
                assert r.log_seq == seq_of[r.key], f"{tag}: subscriber {j} got {r.key} as log_seq {r.log_seq}"
    for name, (_, ctl) in zip(("replaying", "durable"), fed, strict=True):
        recs = fw.read_recs(ctl / "log")
        check_intact(recs, published, f"{tag}: {name} subscriber")
        seqs = [r.log_seq for r in recs]
        assert seqs == list(range(1, len(log) + 1)), (
            f"{tag}: the {name} subscriber did not get log seqs 1..{len(log)} once each: "
            f"{describe_seqs(seqs)}"
        )
        assert [r.key for r in recs] == keys, (
            f"{tag}: the {name} subscriber got other messages than the log's"
        )
        flagged = [r.log_seq for r in recs if r.flags & fw.F_REDELIVERED]
        assert not flagged, (
            f"{tag}: the {name} subscriber got {len(flagged)} flagged redelivered: {flagged[:5]}"
        )


def describe_seqs(seqs: list[int]) -> str:
    """Where a list of log seqs departs from 1, 2, 3, ... (for assertion messages)."""
    counts = Counter(seqs)
    twice = sorted(s for s, c in counts.items() if c > 1)
    for i, s in enumerate(seqs):
        if s != i + 1:
            return (
                f"at index {i}: {seqs[max(0, i - 3) : i + 5]} (expected {i + 1}); {len(seqs)} in all, "
                f"{len(twice)} twice (e.g. {twice[:5]})"
            )
    return f"{len(seqs)} in order"


# -- 4. a subscriber frozen ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["block", "drop", "drop_oldest", "conflate"])
def test_sigstop_a_subscriber_for_a_random_time(h: Harness, seed: int, policy: str) -> None:
    """A slow subscriber (small ring, `policy`) is frozen with SIGSTOP 1-3 times, at random moments
    for random times, while one or two publishers stream to it and to a fast subscriber (1 MiB
    ring), then resumed with SIGCONT. Afterwards the parent publishes a few more messages once it
    has caught up.

    `block`: at the end of every freeze the publishers are at most what the rings hold ahead of it
    (its ring, and each publisher's: back-pressure), and both subscribers get everything exactly
    once, in per-publisher order. A dropping policy: the publishers never wait for it (no stall),
    the fast subscriber gets everything, and for the slow one every message is either received or
    counted in its drops, exactly (received + drops == published: `drop` and `conflate` write
    delivered + drops == published, `drop_oldest` writes every message and takes the dropped ones
    back out); what it gets comes in order (per publisher; per topic under `conflate`, which keeps
    the newest message of each topic, so it gets each topic's last one), and it gets everything
    published after it caught up."""
    router = h.start_router()
    for it in range(iterations(2)):
        freeze_a_subscriber(h, seed, it, policy)
    h.stop_router(router)
    assert_no_leak(h, f"seed {seed}")


def freeze_a_subscriber(h: Harness, seed: int, it: int, policy: str) -> None:
    rng = random.Random(seed * 1000 + it)
    tag = f"seed {seed} iteration {it} policy {policy}"
    topics = [f"s{it}.a", f"s{it}.b", f"s{it}.c"]
    slow_capacity, pub_capacity = rng.choice([4096, 8192]), rng.choice([4096, 16384])
    slow, slow_ctl = spawn(
        h,
        f"{it}-slow",
        fw.receiver,
        h.bus,
        f"s{it}.>",
        {"capacity": slow_capacity, "on_full": policy},
        topics,
        rng.randrange(1 << 30),
    )
    fast, fast_ctl = spawn(
        h, f"{it}-fast", fw.receiver, h.bus, f"s{it}.>", {"capacity": 1 << 20}, topics, rng.randrange(1 << 30)
    )
    counts = [rng.randint(400, 800) for _ in range(rng.choice([1, 2]))]
    pubs = publishers(
        h, rng, str(it), topics, counts, {"capacity": pub_capacity, "pause": 0.2, "pause_s": 0.005}
    )
    slow_ring = ready([(slow, slow_ctl)])[0][1]
    ready([(fast, fast_ctl), *pubs])
    go(pubs, finish=False)
    # What the rings can hold ahead of a frozen `block` subscriber (smallest messages: an upper bound).
    bound = ring_frames(slow_capacity, topics) + len(pubs) * ring_frames(pub_capacity, topics)

    with shmq.Subscriber(h.bus, f"o{it}.>") as other_sub, shmq.Publisher(h.bus) as other_pub:
        for _ in range(rng.randint(1, 3)):
            other = (other_pub, other_sub, f"o{it}.x")
            freeze_once(h, rng, tag, policy, slow, slow_ctl, slow_ring, pubs, counts, bound, *other)

    # Before the publishers leave: did any of them wait for the slow one?
    assert wait_until(lambda: progress(pubs) == sum(counts), WAIT_S), f"{tag}: the publishers are stuck"
    stalls = {p.publisher_id: p.stalls for p in shmq.bus_stats(h.bus).publishers}
    for _, ctl in pubs:
        (ctl / "finish").touch()
    published = collect_publishers(pubs, topics, tag)
    if policy != "block":
        assert all(stalls.get(pid, 0) == 0 for pid in published.ids.values()), (
            f"{tag}: a publisher waited for a subscriber with on_full={policy!r}: {stalls}"
        )

    # It caught up; a few more now, which it must get (they fit in its ring).
    assert wait_until(lambda: caught_up(h.bus, slow_ring), WAIT_S), (
        f"{tag}: the slow subscriber never caught up"
    )
    tail_no, tail_count = len(pubs), 6
    with shmq.Publisher(h.bus, capacity=1 << 16) as tail:
        records = []
        for i in range(tail_count):
            t = i % len(topics)
            records.append((i, t, tail.publish(topics[t], fw.payload(tail_no, i), timeout=WAIT_S)))
        assert tail.flush(WAIT_S), tag
        published.ids[tail_no] = tail.publisher_id
        published.records[tail_no] = records
    expect([(fast, fast_ctl)], [f"s{it}.>"], published)
    (slow_ctl / "stop").touch()
    pw.await_file(fast, fast_ctl / "result", WAIT_S)
    slow_own: shmq.SubscriberStats = pw.await_file(slow, slow_ctl / "result", WAIT_S)
    pw.join_ok([slow, fast])

    check_exactly_once(fw.read_recs(fast_ctl / "log"), published, f"s{it}.>", f"{tag}: fast subscriber")
    recs = fw.read_recs(slow_ctl / "log")
    who = f"{tag}: slow subscriber"
    if policy == "block":
        check_exactly_once(recs, published, f"s{it}.>", who)
        assert slow_own.drops == 0, f"{who}: {slow_own.drops} drops under `block`"
        return
    check_intact(recs, published, who)
    assert len({r.key for r in recs}) == len(recs), f"{who}: a message came twice"
    total, drops, delivered = published.total, slow_own.drops, slow_own.delivered
    assert slow_own.pending == 0, f"{who}: {slow_own.pending} messages still pending"
    print(f"{tag}: received {len(recs)}, drops {drops}, delivered {delivered}, published {total}")
    assert len(recs) + drops == total, (
        f"{who}: received {len(recs)} + counted drops {drops} != published {total} (delivered {delivered})"
    )
    if policy == "drop_oldest":
        assert delivered == total, f"{who}: drop_oldest writes every message ({delivered} of {total})"
    else:
        assert delivered + drops == total, f"{who}: delivered {delivered} + drops {drops} != {total}"
    bus = shmq.bus_stats(h.bus)
    assert sum(t.drops for t in bus.topics if t.topic in topics) == drops, f"{who}: the topics' drop counters"
    tail_got = [r.n for r in recs if r.pub_no == tail_no]
    assert tail_got == list(range(tail_count)), f"{who}: after catching up it got {tail_got} of the last ones"
    for pub_no, sent in published.records.items():
        if policy != "conflate":
            got = [r.n for r in recs if r.pub_no == pub_no]
            assert got == sorted(got), f"{who}: publisher {pub_no}'s messages out of order"
            continue
        for t, topic in enumerate(topics):  # conflate: order per topic; each topic's newest survives
            got = [r.n for r in recs if r.pub_no == pub_no and r.topic == t]
            assert got == sorted(got), f"{who}: publisher {pub_no}'s messages on {topic} out of order"
            on_topic = [n for n, tn, _ in sent if tn == t]
            if len(pubs) == 1 and on_topic:  # (with two, which one's was newest is the router's call)
                assert on_topic[-1] in got, f"{who}: the newest message on {topic} was conflated away"


def freeze_once(
    h: Harness,
    rng: random.Random,
    tag: str,
    policy: str,
    slow: Any,
    slow_ctl: Path,
    slow_ring: str,
    pubs: list[Proc],
    counts: list[int],
    bound: int,
    other_pub: shmq.Publisher,
    other_sub: shmq.Subscriber,
    other_topic: str,
) -> None:
    """Freeze the slow subscriber at a random moment for a random time, check what must hold
    while it is frozen, resume it."""
    k = logged(slow_ctl) + rng.randint(0, 100)
    wait_until(lambda: logged(slow_ctl) >= k or progress(pubs) == sum(counts), WAIT_S)
    print(f"{tag}: frozen at {progress(pubs)}/{sum(counts)} published, {logged(slow_ctl)} received")
    freeze(slow, tag)
    time.sleep(rng.uniform(0.02, 0.5))
    if policy == "block":
        # What it took from its ring, from the ring itself (bus_stats has the router's 100 ms
        # snapshot); the publishers' progress read after it, so `ahead` can only be overstated.
        ring = shmq.Queue(slow_ring)
        try:
            received = ring.stats().messages_got
        finally:
            ring.close()
        ahead = progress(pubs) - received
        assert ahead <= bound, (
            f"{tag}: the publishers got {ahead} messages ahead of a frozen `block` subscriber; its "
            f"ring and theirs hold at most {bound}: no back-pressure"
        )
    # Whatever it holds up, it holds up only the publishers feeding it: another stream flows.
    sent = [other_pub.publish(other_topic, b"%d" % i, timeout=WAIT_S) for i in range(20)]
    got = [other_sub.recv(timeout=WAIT_S).seq for _ in sent]
    assert got == sent, f"{tag}: an unrelated stream got {got} while a subscriber was frozen"
    os.kill(slow.pid, signal.SIGCONT)


# -- double faults: a client dies while no router runs ---------------------------------------------------


def test_group_member_dying_while_no_router_runs_has_its_messages_redelivered(h: Harness, seed: int) -> None:
    """ARCHITECTURE.md, "Queue groups" and the failure table: a member that leaves or dies has its
        unread messages redelivered to the others. Here it dies while no router runs: member A (frozen,
        so its half of the messages waits in its ring) and the router are SIGKILLed, then a new router
        starts and member B reconnects. A's unread messages reach B: the new router finds A in the
    old bus segment's slots and takes its ring over as a redelivery input."""
    tag = f"seed {seed}"
    topics = ["dd.a"]
    router = h.start_router()
    a, a_ctl = spawn(h, "a", fw.group_member, h.bus, "dd.>", "g", {"capacity": 1 << 16}, topics, seed, True)
    b, b_ctl = spawn(h, "b", fw.group_member, h.bus, "dd.>", "g", {"capacity": 1 << 16}, topics, seed, False)
    a_ring = ready([(a, a_ctl)])[0][1]
    ready([(b, b_ctl)])
    freeze(a, tag)
    count = 40
    with shmq.Publisher(h.bus) as pub:
        for n in range(count):
            pub.publish("dd.a", fw.payload(0, n), timeout=WAIT_S)
        assert pub.flush(WAIT_S)
        a_stats = subscriber_by_ring(h.bus, a_ring)
        assert a_stats is not None and a_stats.delivered > 0, (
            "nothing waits in A's ring: the test proves nothing"
        )
        h.kill_router(router)
        h.kill(a)
        router = h.start_router()
        everything = {(0, n) for n in range(count)}
        got = wait_until(lambda: {r.key for r in fw.read_recs(b_ctl / "log")} >= everything, 3)
        (b_ctl / "done").touch()
        pw.join_ok([b])
        missing = sorted(everything - {r.key for r in fw.read_recs(b_ctl / "log")})
    h.stop_router(router)
    assert got and not missing, (
        f"{len(missing)} messages queued for the member that died while no router ran never reached the "
        f"other member: {missing[:10]}; its ring is left: {segment_exists(a_ring)}"
    )
    assert_no_leak(h, tag)


def test_a_subscriber_killed_while_no_router_runs_is_left_to_gc(h: Harness, seed: int) -> None:
    """A subscriber SIGKILLed while no router runs: the next router never hears of it (it adopts
    the rings of live subscribers only), so it serves the others at once and its ring is
    `shmq gc --yes`'s to remove, which gc does while the router runs, leaving the live ones alone."""
    tag = f"seed {seed}"
    router = h.start_router()
    topics = ["gone.a"]
    victim, victim_ctl = spawn(h, "victim", fw.receiver, h.bus, "gone.>", {}, topics, seed)
    other, other_ctl = spawn(h, "other", fw.receiver, h.bus, "gone.>", {}, topics, seed + 1)
    ready([(victim, victim_ctl), (other, other_ctl)])
    h.kill_router(router)
    h.kill(victim)
    router = h.start_router()
    with shmq.Publisher(h.bus, connect_timeout=WAIT_S) as pub:
        records = [(n, 0, pub.publish("gone.a", fw.payload(0, n), timeout=WAIT_S)) for n in range(10)]
        published = Published(topics, {0: pub.publisher_id}, {0: records})
    prefix = f"bus.{h.bus}.s.{victim.pid}."
    assert list_segments(prefix), f"{tag}: the dead subscriber's ring is gone: the test proves nothing"
    in_use = [n for n in pw.bus_segments(h.bus) if not n.startswith(prefix)]  # the bus, other's ring
    gc = run_cli("gc", "--yes", f"bus.{h.bus}*")
    assert gc.returncode == 0 and not list_segments(prefix), f"{tag}: gc left the dead ring: {gc.stdout}"
    assert set(in_use) <= set(pw.bus_segments(h.bus)), f"{tag}: gc removed segments in use: {gc.stdout}"
    expect([(other, other_ctl)], ["gone.>"], published)
    pw.await_file(other, other_ctl / "result", WAIT_S)
    check_exactly_once(fw.read_recs(other_ctl / "log"), published, "gone.>", f"{tag}: the other subscriber")
    pw.join_ok([other])
    h.stop_router(router)
    assert_no_leak(h, tag)


# -- a client killed during its hello ------------------------------------------------------------------


@pytest.mark.parametrize("role", ["subscriber", "publisher"])
def test_a_client_killed_right_after_its_hello_leaves_the_router_serving(h: Harness, role: str) -> None:
    """The failure table: a client that dies is an EOF at the router, which removes what it left
    and serves everyone else. Here the client dies in its constructor, right after its hello went
    out; the router, frozen meanwhile so that it answers only after the death, must carry on."""
    router = h.start_router()
    assert router.pid is not None
    os.kill(router.pid, signal.SIGSTOP)
    try:
        proc, _ = spawn(h, "client", fw.hello_then_die, h.bus, role)
        proc.join(WAIT_S)
        h.killed.add(proc.pid)
        assert proc.exitcode == -signal.SIGKILL, f"the client ended with {proc.exitcode}"
        prefix = f"bus.{h.bus}.{role[0]}.{proc.pid}."
        assert list_segments(prefix), "the client died before creating its ring: the test proves nothing"
    finally:
        os.kill(router.pid, signal.SIGCONT)
    gone = wait_until(lambda: not list_segments(prefix) or not router.is_alive(), 5)
    assert router.is_alive(), f"the router died answering the hello of a {role} that had just died"
    assert gone, f"the router did not remove the dead {role}'s ring"
    with shmq.Subscriber(h.bus, "y.>", connect_timeout=WAIT_S) as sub:
        assert sub.connected
    h.stop_router(router)
    assert_no_leak(h, role)
