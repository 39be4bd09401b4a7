"""Pub/sub across real processes (spawn): exact delivery sets under wildcards and filters, queue
groups with a member killed or leaving mid-stream, every on_full policy against a subscriber
frozen with SIGSTOP, last values for late joiners, a router crash and restart, asyncio.

Each test has its own bus and router; workers (tests/_pubsub_workers.py) take their orders from
files and report through files. Nothing here measures time: "not blocked" is shown by counters
(no stall recorded, no publish timed out), never by a stopwatch.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmq
from shmq.filters import compile_filter
from shmq.testing import remove_segment, segment_exists, unique_name
from shmq.topics import matches
from tests import _pubsub_workers as pw
from tests._workers import dump, wait_until
from tests.conftest import CTX

pytestmark = pytest.mark.timeout(90)

WAIT_S = pw.OP_TIMEOUT  # generous bound for anything the parent waits for


@pytest.fixture
def killed() -> set[int]:
    """Pids of the test's children that ended by a signal (filled in by `children`)."""
    return set()


@pytest.fixture
def bus(killed: set[int]) -> Iterator[str]:
    """A fresh bus name; the test fails if any of its segments survive it (rings of children it
    killed excepted: see pw.no_leaks)."""
    name = unique_name("ps")
    with pw.no_leaks(name, killed):
        yield name


@pytest.fixture
def router(bus: str) -> Iterator[shmq.Router]:
    r = shmq.Router(bus).start()
    try:
        yield r
    finally:
        pw.settle(bus)
        r.stop()


@pytest.fixture
def children(tmp_path: Path, killed: set[int]) -> Iterator[pw.Children]:
    kids = pw.Children(CTX, tmp_path)
    try:
        yield kids
    finally:
        kids.stop()
        killed.update(p.pid for p in kids.procs if p.exitcode is not None and p.exitcode < 0)


def key(msg: shmq.Message) -> tuple[int, str, int]:
    return (msg.publisher_id, msg.topic, msg.seq)


def check_exact(got: list[shmq.Message], expected: dict[tuple[int, str, int], pw.Record], who: str) -> None:
    """`got` holds exactly the `expected` messages (intact), once each, in order per publisher+topic."""
    counts = Counter(key(m) for m in got)
    dups = sorted(k for k, n in counts.items() if n > 1)
    assert not dups, f"{who}: {len(dups)} messages delivered twice, e.g. {dups[:3]}"
    missing = sorted(set(expected) - set(counts))
    extra = sorted(set(counts) - set(expected))
    assert not missing, f"{who}: {len(missing)} of {len(expected)} messages lost, e.g. {missing[:3]}"
    assert not extra, f"{who}: {len(extra)} messages it should not have got, e.g. {extra[:3]}"
    last: dict[tuple[int, str], tuple[int, int]] = {}
    for m in got:
        _, _, data, headers = expected[key(m)]
        assert (m.data, m.headers, m.last_value) == (data, headers or {}, False), f"{who}: {m!r} damaged"
        # types too: an int header must not come back as a float, nor a bool as an int
        assert {k: type(v) for k, v in m.headers.items()} == {k: type(v) for k, v in (headers or {}).items()}
        stream = (m.publisher_id, m.topic)
        prev_seq, prev_ts = last.get(stream, (0, 0))
        assert m.seq > prev_seq, f"{who}: {stream} seq {m.seq} came after seq {prev_seq}"
        assert m.timestamp_ns >= prev_ts, f"{who}: {stream} timestamps went backwards"
        last[stream] = (m.seq, m.timestamp_ns)


# -- 1. exact delivery sets ------------------------------------------------------------------------

TOPICS = (
    "md.XNAS.AAPL",
    "md.XNAS.MSFT",
    "md.ARCX.AAPL",
    "md.BATS.IBM",
    "md.XNAS.AAPL.opt",  # four tokens: md.> takes it, md.*.AAPL and md.XNAS.* do not
    "news.AAPL",
    "news.MSFT.alert",
    "ref.XNAS",
    "ref",  # one token: > takes it, ref.> does not
)

# (patterns, where, options): overlapping patterns within one subscriber, filters that test int vs
# float, missing headers, bool vs str kinds and negation; two small `block` rings that wrap and push
# back on the publishers the whole time.
SUBSCRIPTIONS: list[tuple[list[str], str | None, dict[str, Any]]] = [
    (["md.>"], None, {}),
    (["md.*.AAPL", "news.>", "md.XNAS.AAPL"], None, {"capacity": 4096}),
    ([">"], "price > 100 and side == 'B'", {"capacity": 8192}),
    (["md.XNAS.*", "md.*.AAPL"], "venue in ('XNAS', 'ARCX') and not halted == true", {}),
    (["news.*", "ref.>", "ref"], "not urgent == true or price <= 99.5", {"wait": "block"}),
]


def random_headers(rng: random.Random, topic: str) -> dict[str, Any] | None:
    headers: dict[str, Any] = {}
    roll = rng.random()
    if roll < 0.4:
        headers["price"] = rng.randint(98, 102)
    elif roll < 0.85:
        headers["price"] = rng.choice([99.5, 100.0, 100.5, rng.uniform(95, 105)])
    side = rng.choice(["B", "S", "b", None])
    if side is not None:
        headers["side"] = side
    tokens = topic.split(".")
    if tokens[0] == "md" and rng.random() < 0.9:
        headers["venue"] = tokens[1] if rng.random() < 0.85 else tokens[1].lower()
    for name, choices in (("halted", [True, False, "true", None]), ("urgent", [True, False, 1, None])):
        value = rng.choice(choices)
        if value is not None:
            headers[name] = value
    return headers or None


def publisher_plan(index: int, count: int) -> list[pw.Step]:
    """`count` messages over random topics: single publishes and publish_many batches."""
    rng = random.Random(index)
    steps: list[pw.Step] = []
    n = 0
    while n < count:
        topic = rng.choice(TOPICS)
        headers = random_headers(rng, topic)
        size = min(count - n, rng.randint(2, 20) if rng.random() < 0.3 else 1)
        batch = [f"p{index}-{n + i}-".encode() + rng.randbytes(rng.randint(0, 300)) for i in range(size)]
        steps.append(("many", topic, batch, headers) if size > 1 else ("one", topic, batch[0], headers))
        n += size
    return steps


def wanted(patterns: list[str], where: str | None, topic: str, headers: dict[str, Any] | None) -> str:
    """ "deliver", "filter" (topic matches, where= rejects) or "skip" (no pattern matches)."""
    if not any(matches(p, topic) for p in patterns):
        return "skip"
    if where is not None and not compile_filter(where).matches(headers or {}):
        return "filter"
    return "deliver"


def caught_up(sub: shmq.SubscriberStats) -> bool:
    return sub.received == sub.delivered and sub.depth_messages == sub.lag == 0


def test_exact_delivery_sets_with_wildcards_and_filters(
    bus: str, router: shmq.Router, children: pw.Children
) -> None:
    """3 publisher processes x 5 subscriber processes with overlapping wildcard patterns and where=
    filters: each subscriber receives exactly the messages the test computes from what was
    published (shmq.topics.matches + Filter.matches), none lost, none twice, intact, in order per
    publisher and topic; the router's counters (bus, per subscriber, per topic) agree exactly."""
    plans = [publisher_plan(i, 500) for i in range(3)]
    planned: list[tuple[str, dict[str, Any] | None]] = []  # (topic, headers) of every message
    for plan in plans:
        for step in plan:
            planned += [(step[1], step[3])] * (len(step[2]) if step[0] == "many" else 1)
    subs = []
    for j, (patterns, where, options) in enumerate(SUBSCRIPTIONS):
        opts = {**options, "where": where}
        proc, ctl = children.start(pw.collect, f"sub{j}", bus, patterns, opts, stay=True)
        verdicts = Counter(wanted(patterns, where, topic, headers) for topic, headers in planned)
        dump(str(ctl / "count"), verdicts["deliver"])
        subs.append((proc, ctl, verdicts))
    rings = [pw.await_file(proc, ctl / "ready")[1] for proc, ctl, _ in subs]
    pubs = [children.start(pw.publish_phases, f"pub{i}", bus, [plan]) for i, plan in enumerate(plans)]
    for proc, ctl in pubs:
        pw.await_file(proc, ctl / "ready")
    for _, ctl in pubs:
        (ctl / "go0").touch()  # all at once: the publishers race each other
    results = [pw.await_file(proc, ctl / "result", WAIT_S) for proc, ctl in pubs]
    pw.join_ok([proc for proc, _ in pubs])

    published: dict[tuple[int, str, int], pw.Record] = {}
    for publisher_id, records, _ in results:
        per_topic: dict[str, list[int]] = defaultdict(list)
        for record in records:
            published[(publisher_id, record[0], record[1])] = record
            per_topic[record[0]].append(record[1])
        for topic, seqs in per_topic.items():  # numbered from 1 per publisher and topic, no gaps
            assert seqs == list(range(1, len(seqs) + 1)), topic
    assert len(published) == len(planned) == 1500

    for j, ((proc, ctl, _), (patterns, where, _)) in enumerate(zip(subs, SUBSCRIPTIONS, strict=True)):
        got, own_stats = pw.await_file(proc, ctl / "result", WAIT_S)
        expected = {k: r for k, r in published.items() if wanted(patterns, where, r[0], r[3]) == "deliver"}
        check_exact(got, expected, f"subscriber {j} {patterns} where={where!r}")
        assert (own_stats.delivered, own_stats.received, own_stats.lag) == (len(expected), len(expected), 0)

    # Counters, while the subscribers are still attached (they wait for "exit").
    stats = shmq.bus_stats(bus)
    total_delivered = sum(verdicts["deliver"] for _, _, verdicts in subs)
    assert (stats.messages, stats.deliveries, stats.drops) == (1500, total_delivered, 0)
    for ring, (_, _, verdicts) in zip(rings, subs, strict=True):
        sub = pw.subscriber_stats(bus, ring)
        assert (sub.delivered, sub.filtered, sub.drops, sub.pending) == (
            verdicts["deliver"],
            verdicts["filter"],
            0,
            0,
        ), sub
        # received and depth of another process's ring come from the router's 100 ms snapshot
        assert wait_until(lambda r=ring: caught_up(pw.subscriber_stats(bus, r)), 5), ring
    assert {t.topic: t.messages for t in stats.topics} == Counter(topic for topic, _ in planned)
    assert (
        stats.bytes
        == sum(t.bytes for t in stats.topics)
        == sum(pw.message_size(r[0], r[2], r[3]) for r in published.values())
    )
    for _, ctl, _ in subs:
        (ctl / "exit").touch()
    pw.join_ok([proc for proc, _, _ in subs])


# -- 2. queue groups -------------------------------------------------------------------------------


def group_publisher_phases(count: int, phases: int) -> list[list[pw.Step]]:
    """`count` numbered messages over two topics, split into `phases` equal phases."""
    per = count // phases
    return [
        [("one", f"jobs.{'ab'[i % 2]}", pw.group_message(i), None) for i in range(k * per, (k + 1) * per)]
        for k in range(phases)
    ]


def wait_for_union(controls: list[Path], count: int, may_lose: int = 0) -> Counter[int]:
    """Wait until the members' logs together hold every index below `count` (all but `may_lose`
    of them: then until the logs stop growing for a while); their Counter."""
    union: Counter[int] = Counter()
    quiet = [0.0]

    def complete() -> bool:
        size = sum(union.values())
        union.clear()
        for ctl in controls:
            union.update(pw.read_log(ctl / "log"))
        missing = count - len(set(union) & set(range(count)))
        if missing == 0:
            return True
        quiet[0] = quiet[0] + 0.02 if sum(union.values()) == size else 0.0
        return missing <= may_lose and quiet[0] >= 1.0

    wait_until(complete, WAIT_S, interval=0.02)
    return union


def test_group_shares_each_message_with_exactly_one_member(
    bus: str, router: shmq.Router, children: pw.Children
) -> None:
    """Three members of one group in three processes: each message reaches exactly one of them,
    each member gets a share, and what a member gets comes in publish order."""
    count = 1500
    members = [children.start(pw.group_member, f"m{k}", bus, "jobs.>", "workers", 4096) for k in range(3)]
    for proc, ctl in members:
        pw.await_file(proc, ctl / "ready")
    pub, pub_ctl = children.start(pw.publish_phases, "pub", bus, group_publisher_phases(count, 1))
    pw.await_file(pub, pub_ctl / "ready")
    (pub_ctl / "go0").touch()
    pw.await_file(pub, pub_ctl / "result", WAIT_S)
    union = wait_for_union([ctl for _, ctl in members], count)
    for _, ctl in members:
        (ctl / "done").touch()
    pw.join_ok([proc for proc, _ in members] + [pub])
    assert sorted(union.elements()) == list(range(count)), "lost or duplicated messages"
    for k, (_, ctl) in enumerate(members):
        log = pw.read_log(ctl / "log")
        assert log, f"member {k} got nothing"
        assert log == sorted(log), f"member {k} got its share out of order"
    stats = shmq.bus_stats(bus)
    # a group delivery counts once
    assert (stats.messages, stats.deliveries, stats.drops) == (count, count, 0)


@pytest.mark.parametrize(
    "how", ["stop", "kill", "close"], ids=["sigkill-after-log", "sigkill-any-moment", "graceful-close"]
)
def test_group_member_leaving_mid_stream_loses_nothing(
    bus: str, router: shmq.Router, children: pw.Children, how: str
) -> None:
    """A member leaves mid-stream, typically with messages still queued in its ring: SIGKILLed at
    a known point (it stops itself right after logging its 20th message, then the test kills it),
    SIGKILLed at any moment while it receives, or closed gracefully. Its queued messages are
    redelivered to the other members and publishing goes on: the union of what the members
    logged is everything published, with at most one duplicate. Killed at any moment, it may
    also have taken one message and died before logging it: that one alone may be missing."""
    count, leave_after = 1200, 20
    victim, victim_ctl = children.start(
        pw.group_member,
        "victim",
        bus,
        "jobs.>",
        "workers",
        4096,
        leave_after=0 if how == "kill" else leave_after,
        how=how,
    )
    survivors = [children.start(pw.group_member, f"m{k}", bus, "jobs.>", "workers", 4096) for k in range(2)]
    _, victim_ring = pw.await_file(victim, victim_ctl / "ready")
    for proc, ctl in survivors:
        pw.await_file(proc, ctl / "ready")
    phases = group_publisher_phases(count, 2)
    phases[0] = [
        step
        for i, one in enumerate(phases[0])
        for step in ([one, ("sleep", 0.005)] if i % 50 == 49 else [one])
    ]
    pub, pub_ctl = children.start(pw.publish_phases, "pub", bus, phases)
    pw.await_file(pub, pub_ctl / "ready")
    (pub_ctl / "go0").touch()

    if how == "stop":
        assert wait_until(lambda: pw.is_stopped(victim.pid), WAIT_S), "the victim never stopped itself"
        queued = pw.subscriber_stats(bus, victim_ring).delivered - leave_after
        assert queued > 0, "nothing was queued for the victim: the test would prove nothing"
    elif how == "kill":
        assert wait_until(lambda: len(pw.read_log(victim_ctl / "log")) >= leave_after, WAIT_S)
        time.sleep(random.uniform(0, 0.02))  # lands anywhere: in recv, between recv and the log write...
    if how in ("stop", "kill"):
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        assert victim.exitcode == -signal.SIGKILL
    else:
        victim.join(WAIT_S)
        assert victim.exitcode == 0
    logged = len(pw.read_log(victim_ctl / "log"))
    assert logged == leave_after or how == "kill"
    pw.await_file(pub, pub_ctl / "done0", WAIT_S)

    (pub_ctl / "go1").touch()  # the stream goes on after the member left
    pw.await_file(pub, pub_ctl / "result", WAIT_S)
    may_lose = 1 if how == "kill" else 0
    union = wait_for_union([victim_ctl] + [ctl for _, ctl in survivors], count, may_lose)
    for _, ctl in survivors:
        (ctl / "done").touch()
    pw.join_ok([proc for proc, _ in survivors] + [pub])
    lost = sorted(set(range(count)) - set(union))
    assert len(lost) <= may_lose, f"{len(lost)} messages lost: {lost[:10]}"
    assert set(union) <= set(range(count))
    dups = sorted(i for i, n in union.items() if n > 1)
    assert len(dups) <= 1, f"{len(dups)} messages delivered twice: {dups[:10]}"
    stats = shmq.bus_stats(bus)
    assert stats.drops == 0 and sum(t.messages for t in stats.topics) == count
    assert stats.messages == count  # redelivered ones are counted apart (stats.redeliveries)


# -- 3. on_full policies against a frozen subscriber -------------------------------------------------

POLICY_TOPICS = [f"t.k{k}" for k in range(8)]  # equal lengths: every message has the same size


def policy_message(i: int) -> tuple[str, bytes, dict[str, Any]]:
    return POLICY_TOPICS[i % len(POLICY_TOPICS)], struct.pack("<I", i) + bytes(36), {"i": i}


def freeze(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGSTOP)
    assert wait_until(lambda: pw.is_stopped(proc.pid), WAIT_S), f"{proc.name} did not stop"


@pytest.mark.parametrize("policy", ["drop", "drop_oldest", "conflate"])
def test_dropping_policy_with_a_frozen_subscriber(
    bus: str, router: shmq.Router, children: pw.Children, policy: str
) -> None:
    """A subscriber with a dropping policy and a 4 KiB ring is frozen (SIGSTOP) while 2000
    messages go out; a fast subscriber receives all of them in order, the publisher never waits for
    anyone (no stall counted, no publish times out), and the frozen one's drops are counted so that
    delivered, dropped and pending add up. After SIGCONT it receives: `drop` the oldest messages
    (the ring's worth), `drop_oldest` the newest, `conflate` the oldest then the newest value of
    every topic."""
    count = 2000
    slow, slow_ctl = children.start(pw.collect, "slow", bus, "t.>", {"on_full": policy, "capacity": 4096})
    fast, fast_ctl = children.start(pw.collect, "fast", bus, "t.>", {"capacity": 1 << 20})
    _, slow_ring = pw.await_file(slow, slow_ctl / "ready")
    pw.await_file(fast, fast_ctl / "ready")
    dump(str(fast_ctl / "count"), count)
    freeze(slow)

    sent = [policy_message(i) for i in range(count)]
    with shmq.Publisher(bus, capacity=1 << 16) as pub:
        for topic, data, headers in sent:
            pub.publish(topic, data, headers=headers, timeout=WAIT_S)
        assert pub.flush(WAIT_S)
        assert wait_until(lambda: pub.stats().routed == count, 5)  # updated just after the router's read
        assert pub.stats().stalls == 0

    s = pw.subscriber_stats(bus, slow_ring)  # frozen: these counters cannot move any more
    assert s.drops > 0 and s.filtered == 0
    if policy == "drop":
        assert (s.delivered + s.drops, s.pending) == (count, 0)
        expect = s.delivered
    elif policy == "drop_oldest":  # every message was written; the oldest were taken back out
        assert (s.delivered, s.pending) == (count, 0) and s.drops < count
        expect = s.delivered - s.drops
    else:  # one newest value per topic waits in the router
        assert (s.delivered + s.drops + s.pending, s.pending) == (count, len(POLICY_TOPICS))
        expect = s.delivered + s.pending
    stats = shmq.bus_stats(bus)
    assert (stats.drops, stats.stalls) == (s.drops, 0)
    assert sum(t.drops for t in stats.topics) == s.drops
    dump(str(slow_ctl / "count"), expect)
    os.kill(slow.pid, signal.SIGCONT)

    fast_got, _ = pw.await_file(fast, fast_ctl / "result", WAIT_S)
    assert [m.data for m in fast_got] == [data for _, data, _ in sent]
    slow_got, slow_own = pw.await_file(slow, slow_ctl / "result", WAIT_S)
    pw.join_ok([slow, fast])
    got = [m.data for m in slow_got]
    assert len(got) == expect
    if policy == "drop":
        assert got == [data for _, data, _ in sent[: s.delivered]]
    elif policy == "drop_oldest":
        assert got == [data for _, data, _ in sent[count - expect :]]
    else:
        assert got[: s.delivered] == [data for _, data, _ in sent[: s.delivered]]
        newest = {topic: data for topic, data, _ in sent}
        assert {m.topic: m.data for m in slow_got[s.delivered :]} == newest
        assert len(slow_got) - s.delivered == len(newest)
        for topic in POLICY_TOPICS:
            seqs = [m.seq for m in slow_got if m.topic == topic]
            assert seqs == sorted(seqs) and seqs[-1] == count // len(POLICY_TOPICS), topic
    # after SIGCONT: what waited in the router was delivered, and nothing more was dropped
    assert (slow_own.delivered, slow_own.drops, slow_own.pending) == (s.delivered + s.pending, s.drops, 0)
    if policy != "drop_oldest":  # drop_oldest: see test_pubsub.py, received counts the router's steals
        assert slow_own.received == len(got)


def test_block_policy_pushes_back_on_the_publisher_and_loses_nothing(
    bus: str, router: shmq.Router, children: pw.Children
) -> None:
    """A `block` subscriber frozen with SIGSTOP: its ring fills, then the publisher's; publish with
    a timeout then raises Full (back-pressure, not RouterUnavailable) and publishes nothing. After
    SIGCONT everything flows again, and both the frozen and a fast subscriber receive exactly the
    messages that were published (seq 1..n, no gap where publish timed out), in order."""
    slow, slow_ctl = children.start(pw.collect, "slow", bus, "t.block", {"capacity": 4096})
    fast, fast_ctl = children.start(pw.collect, "fast", bus, "t.>", {"capacity": 1 << 20})
    _, slow_ring = pw.await_file(slow, slow_ctl / "ready")
    pw.await_file(fast, fast_ctl / "ready")
    freeze(slow)

    payload = bytes(100)
    with shmq.Publisher(bus, capacity=4096) as pub:
        published = 0
        with pytest.raises(shmq.Full, match="back-pressure"):
            for _ in range(10_000):  # 4 KiB + 4 KiB of rings hold well under a hundred of these
                pub.publish("t.block", payload, timeout=0.3)
                published += 1
        assert 0 < published < 10_000
        own = pub.stats()
        assert own.stalls > 0 and own.depth_messages > 0 and own.published == published
        stats = shmq.bus_stats(bus)
        assert stats.stalls > 0 and stats.drops == 0
        assert pw.subscriber_stats(bus, slow_ring).drops == 0

        os.kill(slow.pid, signal.SIGCONT)
        more = 300
        for _ in range(more):
            pub.publish("t.block", payload, timeout=WAIT_S)
        total = published + more
        for ctl in (slow_ctl, fast_ctl):
            dump(str(ctl / "count"), total)
        for proc, ctl in ((slow, slow_ctl), (fast, fast_ctl)):
            got, own_stats = pw.await_file(proc, ctl / "result", WAIT_S)
            assert [m.seq for m in got] == list(range(1, total + 1)), proc.name
            assert all(m.data == payload and m.publisher_id == pub.publisher_id for m in got)
            assert (own_stats.drops, own_stats.received) == (0, total)
    pw.join_ok([slow, fast])


# -- 4. last values --------------------------------------------------------------------------------


def test_late_joiner_gets_last_values_then_live_messages(
    bus: str, router: shmq.Router, children: pw.Children
) -> None:
    """A subscriber with last_value=True joining late first receives the newest message of each
    matching topic (marked last_value, unchanged otherwise) unless its where= filter rejects that
    message, then live ones in order. A late joiner without last_value gets only live ones."""
    with shmq.Publisher(bus) as pub, shmq.Subscriber(bus, ">") as witness:
        history = []
        for rnd in range(5):
            for k in range(4):
                ok = not (k == 3 and rnd == 4)  # lv.3's newest fails the filter (an older one passes)
                history.append((f"lv.{k}", f"r{rnd}k{k}".encode(), {"ok": ok, "round": rnd}))
            history.append(("other.x", b"never", {"ok": True, "round": rnd}))  # no pattern takes it
        history.append(("lv.1.deep", b"too deep for lv.*", {"ok": True, "round": 9}))
        for topic, data, headers in history:
            pub.publish(topic, data, headers=headers, timeout=WAIT_S)
        originals = witness.recv_many(1024, timeout=WAIT_S)
        while len(originals) < len(history):
            originals += witness.recv_many(1024, timeout=WAIT_S)
        newest = {m.topic: m for m in originals}
        replay = {t: m for t, m in newest.items() if matches("lv.*", t) and m.headers["ok"]}
        assert sorted(replay) == ["lv.0", "lv.1", "lv.2"]

        joiner, joiner_ctl = children.start(
            pw.collect, "joiner", bus, "lv.*", {"last_value": True, "where": "ok == true"}
        )
        plain, plain_ctl = children.start(pw.collect, "plain", bus, "lv.*", {})
        pw.await_file(joiner, joiner_ctl / "ready")
        pw.await_file(plain, plain_ctl / "ready")
        live = [
            ("lv.0", b"live0", {"ok": True}),
            ("lv.3", b"live3", {"ok": False}),  # the joiner's filter rejects it
            ("lv.9", b"new", {"ok": True}),  # a topic the router had not seen
        ]
        for topic, data, headers in live:
            pub.publish(topic, data, headers=headers, timeout=WAIT_S)
        dump(str(joiner_ctl / "count"), len(replay) + 2)
        dump(str(plain_ctl / "count"), len(live))
        joined, _ = pw.await_file(joiner, joiner_ctl / "result", WAIT_S)
        plain_got, _ = pw.await_file(plain, plain_ctl / "result", WAIT_S)
    pw.join_ok([joiner, plain])

    first, rest = joined[: len(replay)], joined[len(replay) :]
    assert all(m.last_value for m in first), first
    assert {m.topic for m in first} == set(replay)
    for m in first:
        original = replay[m.topic]
        assert (m.seq, m.data, m.headers, m.timestamp_ns, m.publisher_id) == (
            original.seq,
            original.data,
            original.headers,
            original.timestamp_ns,
            original.publisher_id,
        )
    assert [(m.topic, m.data, m.last_value) for m in rest] == [
        ("lv.0", b"live0", False),
        ("lv.9", b"new", False),
    ]
    assert [(m.topic, m.data, m.last_value) for m in plain_got] == [(t, d, False) for t, d, _ in live]


# -- 5. router crash and restart -------------------------------------------------------------------


def has_subscriber(bus: str, ring: str) -> bool:
    try:
        return any(sub.ring == ring for sub in shmq.bus_stats(bus).subscribers)
    except shmq.NotFound:  # no router yet
        return False


def test_router_killed_and_restarted_clients_carry_on(bus: str, children: pw.Children) -> None:
    """SIGKILL the router while a publisher process holds messages it has not routed yet (the
    router was frozen first) and a frozen subscriber process has not read what it was sent, then
    start a new one: the publisher's publish during the outage raises RouterUnavailable after its
    timeout (publishing nothing), both clients reconnect by themselves, and the subscriber
    receives everything published before the kill (what its ring held, and what was never routed)
    and after the restart: once each, in order, seqs without a gap.

    The publisher is held (SIGSTOP) until the subscriber is back, so this test is about the
    clients' reconnection (a subscriber coming back after the publisher is the subject of
    test_unrouted_messages_reach_a_subscriber_that_reconnects_late)."""
    topics = ("r.a", "r.b")
    phases: list[list[pw.Step]] = [
        [("one", t, f"{t} early {i}".encode(), None) for i in range(10) for t in topics],
        [("one", t, f"{t} unrouted {i}".encode(), {"i": i}) for i in range(50) for t in topics],
        [("outage", "r.a", 0.3)],
        [("many", t, [f"{t} after {i}".encode() for i in range(50)], None) for t in topics],
    ]
    first = shmq.Router(bus).start()
    first_pid = first.pid
    assert first_pid is not None
    second = None
    try:
        sub, sub_ctl = children.start(pw.collect, "sub", bus, "r.>", {"capacity": 1 << 16})
        _, sub_ring = pw.await_file(sub, sub_ctl / "ready")
        pub, pub_ctl = children.start(pw.publish_phases, "pub", bus, phases)
        pw.await_file(pub, pub_ctl / "ready")
        freeze(sub)  # so that the first messages are still unread in its ring at the crash
        (pub_ctl / "go0").touch()
        assert wait_until(lambda: pw.subscriber_stats(bus, sub_ring).delivered == 20, WAIT_S)

        os.kill(first_pid, signal.SIGSTOP)
        assert wait_until(lambda: pw.is_stopped(first_pid), WAIT_S), "the router did not stop"
        (pub_ctl / "go1").touch()
        pw.await_file(pub, pub_ctl / "done1", WAIT_S)  # in the publisher's ring, not routed
        assert pw.subscriber_stats(bus, sub_ring).delivered == 20
        first.kill()

        (pub_ctl / "go2").touch()
        pw.await_file(pub, pub_ctl / "done2", WAIT_S)
        freeze(pub)
        second = shmq.Router(bus).start()
        os.kill(sub.pid, signal.SIGCONT)
        assert wait_until(lambda: has_subscriber(bus, sub_ring), WAIT_S), "the subscriber never came back"
        os.kill(pub.pid, signal.SIGCONT)
        (pub_ctl / "go3").touch()
        publisher_id, records, outages = pw.await_file(pub, pub_ctl / "result", WAIT_S)
        dump(str(sub_ctl / "count"), len(records))
        got, _ = pw.await_file(sub, sub_ctl / "result", WAIT_S)
        pw.join_ok([pub, sub])
    finally:
        if first.pid is not None:  # still frozen: the test failed before the kill
            os.kill(first.pid, signal.SIGCONT)
        first.kill()
        if second is not None:
            pw.settle(bus)
            second.stop()

    assert len(outages) == 1 and outages[0][0] == "RouterUnavailable", outages
    assert "no router" in outages[0][1] and "nothing was published" in outages[0][1]
    assert len(records) == 220
    check_exact(got, {(publisher_id, r[0], r[1]): r for r in records}, "subscriber")
    for t in topics:  # the failed publish used no sequence number
        assert [m.seq for m in got if m.topic == t] == list(range(1, 111)), t


def test_unrouted_messages_reach_a_subscriber_that_reconnects_late(bus: str, children: pw.Children) -> None:
    """The race of the restart test made deterministic: the subscriber process is frozen across
    the restart and resumed once the new router had a chance to route the publisher's queued
    messages. They were published while it was subscribed, so it should still receive them."""
    first = shmq.Router(bus).start()
    first_pid = first.pid
    assert first_pid is not None
    second = None
    try:
        sub, sub_ctl = children.start(pw.collect, "sub", bus, "late.>", {})
        _, sub_ring = pw.await_file(sub, sub_ctl / "ready")
        with shmq.Publisher(bus) as pub:
            os.kill(first_pid, signal.SIGSTOP)
            # (kill() returns before the router has stopped: until it has, it may still route)
            assert wait_until(lambda: pw.is_stopped(first_pid), WAIT_S), "the router did not stop"
            for i in range(10):
                pub.publish("late.x", b"%d" % i, timeout=WAIT_S)  # queued: the router is frozen
            freeze(sub)
            first.kill()
            second = shmq.Router(bus).start()
            # a router that did not wait for its returning subscribers would route them within
            # milliseconds; the subscriber comes back within the router's reconnect grace
            wait_until(lambda: pub.connected and pub.stats().routed == 10, 1)
            os.kill(sub.pid, signal.SIGCONT)
            assert wait_until(lambda: has_subscriber(bus, sub_ring), WAIT_S), "the subscriber never came back"
            assert wait_until(lambda: pw.subscriber_stats(bus, sub_ring).delivered == 10, 5), (
                "the subscriber never got the messages queued before the crash"
            )
    finally:
        if first.pid is not None:
            os.kill(first.pid, signal.SIGCONT)
        first.kill()
        if second is not None:
            for proc in children.procs:  # let the collector finish (cleanly: it removes its ring)
                dump(str(children.root / proc.name / "count"), 0)
                os.kill(proc.pid, signal.SIGCONT)
                proc.join(WAIT_S)
            pw.settle(bus)
            second.stop()


# -- 9. asyncio --------------------------------------------------------------------------------------


def test_asyncio_receive_from_a_publisher_process(
    bus: str, router: shmq.Router, children: pw.Children
) -> None:
    """recv_async and `async for ... in sub.aiter()` receive a publisher process's messages in order
    while the event loop keeps running other tasks; recv_async times out with Empty while the
    publisher has not started."""
    count = 200
    steps: list[pw.Step] = []
    for i in range(count):
        steps.append(("one", "aio.x", struct.pack("<I", i), {"i": i}))
        if i % 25 == 24:
            steps.append(("sleep", 0.02))  # pauses: the subscriber must really wait, more than once
    pub, pub_ctl = children.start(pw.publish_phases, "pub", bus, [steps])

    async def consume(sub: shmq.Subscriber) -> tuple[list[shmq.Message], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        with pytest.raises(shmq.Empty):
            await sub.recv_async(timeout=0.1)
        (pub_ctl / "go0").touch()
        got = [await sub.recv_async(timeout=WAIT_S) for _ in range(10)]

        async def the_rest() -> None:
            async for msg in sub.aiter():
                got.append(msg)
                if len(got) == count:
                    break

        await asyncio.wait_for(the_rest(), WAIT_S)
        tick_task.cancel()
        return got, ticks

    with shmq.Subscriber(bus, "aio.>") as sub:
        pw.await_file(pub, pub_ctl / "ready")
        got, ticks = asyncio.run(consume(sub))
        assert sub.recv_many(timeout=0.05) == []
    pw.join_ok([pub])
    assert [(m.seq, m.data, m.headers) for m in got] == [
        (i + 1, struct.pack("<I", i), {"i": i}) for i in range(count)
    ]
    assert ticks > 0, "the event loop was blocked while waiting"


# -- 7. cleaning up after dead clients -----------------------------------------------------------


def test_ring_of_a_subscriber_killed_while_closing_is_removed(
    bus: str, router: shmq.Router, children: pw.Children
) -> None:
    """The race made deterministic: the subscriber hangs up (the first step of close()) and is
    SIGKILLed before it removes its ring. Nobody else will: the router must."""
    proc, ctl = children.start(pw.close_link_only, "sub", bus)
    ring = pw.await_file(proc, ctl / "ready")
    assert wait_until(lambda: not has_subscriber(bus, ring), WAIT_S), "the router never saw it leave"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    try:
        assert wait_until(lambda: not segment_exists(ring), 3), "the dead subscriber's ring was never removed"
    finally:
        remove_segment(ring)  # so that the teardown need not wait for the router to (not) do it
