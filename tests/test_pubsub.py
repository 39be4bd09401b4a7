"""Pub/sub in one process: the API's behaviour (fields, sequence numbers, wildcards, filters,
timeouts, iteration, asyncio, pickling, statistics) and bad input of every kind.

The router is a real child process here too (shmq.Router always is); only the clients share the
test's process. Cross-process behaviour is in tests/test_pubsub_multiprocess.py.
"""

from __future__ import annotations

import asyncio
import math
import pickle
import queue
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import shmq
from shmq.filters import compile_filter
from shmq.testing import unique_name
from tests import _pubsub_workers as pw
from tests._workers import wait_until

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0  # bound for anything that should happen at once


@pytest.fixture
def bus() -> Iterator[str]:
    """A fresh bus name; the test fails if any of its segments survive it."""
    name = unique_name("ps")
    with pw.no_leaks(name):
        yield name


@pytest.fixture
def router(bus: str) -> Iterator[shmq.Router]:
    r = shmq.Router(bus).start()
    try:
        yield r
    finally:
        pw.settle(bus)
        r.stop()


@pytest.fixture(scope="module")
def shared_bus() -> Iterator[str]:
    """One bus and router for the bad-input tests, which leave nothing on it (saves a router start
    per case); checked for leftovers at the end of the module."""
    name = unique_name("ps")
    with pw.no_leaks(name):
        r = shmq.Router(name).start()
        try:
            yield name
        finally:
            pw.settle(name)
            r.stop()


def drain(sub: shmq.Subscriber, count: int) -> list[shmq.Message]:
    """Exactly `count` messages (Empty if they do not come), then check that nothing else is there."""
    got: list[shmq.Message] = []
    while len(got) < count:
        batch = sub.recv_many(count - len(got), timeout=WAIT_S)
        if not batch:
            raise shmq.Empty(f"got {len(got)} of {count} messages")
        got += batch
    assert sub.recv_many(timeout=0.05) == []
    return got


# -- the API --------------------------------------------------------------------------------------------


def test_message_fields_round_trip(bus: str, router: shmq.Router) -> None:
    """Every header kind, every kind of buffer as data; seq, timestamp, publisher id, last_value."""
    headers = {
        "s": "été",
        "i": -(2**63),
        "big": 2**63 - 1,
        "f": 1.5,
        "t": True,
        "F": False,
        "np": np.int16(7),
    }
    payloads: list[Any] = [
        b"bytes",
        bytearray(b"bytearray"),
        memoryview(b"xxmemoryviewxx")[2:-2],
        np.arange(6, dtype=np.float64),
        b"",
    ]
    with shmq.Subscriber(bus, "f.>") as sub, shmq.Publisher(bus) as pub:
        before = time.monotonic_ns()
        seqs = [pub.publish("f.x", data, headers=headers, timeout=WAIT_S) for data in payloads]
        after = time.monotonic_ns()
        got = drain(sub, len(payloads))
    assert seqs == [1, 2, 3, 4, 5]
    for msg, data, seq in zip(got, payloads, seqs, strict=True):
        assert (msg.topic, msg.seq, msg.data, msg.publisher_id, msg.last_value) == (
            "f.x",
            seq,
            bytes(data),
            pub.publisher_id,
            False,
        )
        assert type(msg.data) is bytes
        assert msg.headers == {**headers, "np": 7}
        assert type(msg.headers["np"]) is int and type(msg.headers["t"]) is bool
        assert before <= msg.timestamp_ns <= after  # time.monotonic_ns() at publish
        assert msg.latency_ns() >= 0
    mutated = got[0].headers
    mutated["s"] = "changed"
    assert got[0].headers["s"] == "été"  # each access is a fresh dict: the message stays as received
    assert np.array_equal(np.frombuffer(got[3].data, dtype=np.float64), np.arange(6))
    assert "f.x" in repr(got[0]) and "seq=1" in repr(got[0])


def test_seq_counts_per_publisher_and_topic(bus: str, router: shmq.Router) -> None:
    """Sequence numbers start at 1 for each (publisher, topic); publish_many returns the last one
    (and the previous last for an empty batch); last_seqs() reports them."""
    with shmq.Subscriber(bus, ">") as sub, shmq.Publisher(bus) as a, shmq.Publisher(bus) as b:
        assert a.publisher_id != b.publisher_id
        assert a.publish("x", b"1", timeout=WAIT_S) == 1
        assert a.publish("y", b"1", timeout=WAIT_S) == 1
        assert b.publish("x", b"1", timeout=WAIT_S) == 1
        assert a.publish_many("x", [b"2", b"3", b"4"], timeout=WAIT_S) == 4
        assert a.publish_many("x", (bytes([i]) for i in range(3)), timeout=WAIT_S) == 7  # any iterable
        assert a.publish_many("x", [], timeout=WAIT_S) == 7
        assert b.publish("x", b"2", timeout=WAIT_S) == 2
        assert a.last_seqs() == {"x": 7, "y": 1} and b.last_seqs() == {"x": 2}
        got = drain(sub, 10)
    streams: dict[tuple[int, str], list[int]] = {}
    for m in got:
        streams.setdefault((m.publisher_id, m.topic), []).append(m.seq)
    assert streams == {
        (a.publisher_id, "x"): list(range(1, 8)),
        (a.publisher_id, "y"): [1],
        (b.publisher_id, "x"): [1, 2],
    }


def test_wildcards_and_overlapping_patterns(bus: str, router: shmq.Router) -> None:
    """`*` is exactly one token, `>` one or more trailing ones; a subscriber whose patterns overlap
    gets each message once; topics are case-sensitive and compared exactly."""
    topics = ["a", "a.b", "a.b.c", "a.c", "b.b", "A.b", "a.b.c.d"]
    cases = {
        ("a.*",): ["a.b", "a.c"],
        ("a.>",): ["a.b", "a.b.c", "a.c", "a.b.c.d"],
        ("*.b",): ["a.b", "b.b", "A.b"],
        ("*",): ["a"],
        (">",): topics,
        ("a.*", "a.>", "a.b", "*.b"): ["a.b", "a.b.c", "a.c", "b.b", "A.b", "a.b.c.d"],
        ("a.*.c",): ["a.b.c"],
        ("a.b",): ["a.b"],
    }
    subs = {patterns: shmq.Subscriber(bus, list(patterns)) for patterns in cases}
    try:
        with shmq.Publisher(bus) as pub:
            for topic in topics:
                pub.publish(topic, topic.encode(), timeout=WAIT_S)
        for patterns, expected in cases.items():
            assert [m.topic for m in drain(subs[patterns], len(expected))] == expected, patterns
            assert subs[patterns].patterns == patterns
    finally:
        for sub in subs.values():
            sub.close()


FILTERS = [
    "n > 5",
    "n == 5 or s == 'x'",
    "not flag == true",
    "flag != true",
    "s in ('x', 'y') and n < 100.5",
    "s not in ('x', 1)",
    "`odd key` == 5",
]
HEADER_VALUES: list[Any] = [0, 5, 5.0, 6, 100.5, -1, math.nan, math.inf, True, False, "x", "y", "", "é"]


def random_filter_headers(rng: random.Random) -> dict[str, Any]:
    return {name: rng.choice(HEADER_VALUES) for name in ("n", "s", "flag", "odd key") if rng.random() < 0.7}


def test_router_filter_decisions_equal_the_python_filter(bus: str, router: shmq.Router) -> None:
    """The router evaluates where= natively: for random headers (missing ones, NaN, bool vs int,
    int vs float, strings) it delivers exactly what shmq.filters.Filter.matches accepts, and counts
    the rest as `filtered`."""
    rng = random.Random(7)
    headers = [random_filter_headers(rng) for _ in range(300)]
    subs: list[shmq.Subscriber] = []
    try:
        for text in FILTERS:
            subs.append(shmq.Subscriber(bus, "flt.*", where=text))
        with shmq.Publisher(bus) as pub:
            for i, h in enumerate(headers):
                pub.publish("flt.x", str(i).encode(), headers=h, timeout=WAIT_S)
            pub.publish("elsewhere", b"not a matching topic: not counted as filtered", timeout=WAIT_S)
        for sub, text in zip(subs, FILTERS, strict=True):
            where = compile_filter(text)
            expected = [str(i).encode() for i, h in enumerate(headers) if where.matches(h)]
            assert 0 < len(expected) < len(headers), text  # the filter really decides something
            assert [m.data for m in drain(sub, len(expected))] == expected, text
            st = sub.stats()
            assert (st.delivered, st.filtered) == (len(expected), len(headers) - len(expected)), text
            assert st.where == str(where)
    finally:
        for sub in subs:
            sub.close()


def test_recv_timeouts(bus: str, router: shmq.Router) -> None:
    """recv raises Empty (also queue.Empty) at its timeout, at once with timeout 0; recv_many
    returns [] then, and at most max_messages otherwise."""
    with shmq.Subscriber(bus, "t") as sub, shmq.Publisher(bus) as pub:
        with pytest.raises(shmq.Empty):
            sub.recv(timeout=0.05)
        with pytest.raises(queue.Empty):
            sub.recv(0)
        assert sub.recv_many(timeout=0.05) == []
        pub.publish_many("t", [b"%d" % i for i in range(5)], timeout=WAIT_S)
        assert pub.flush(WAIT_S)
        first = sub.recv_many(max_messages=3, timeout=WAIT_S)
        assert 1 <= len(first) <= 3
        rest = drain(sub, 5 - len(first))
        assert [m.data for m in first + rest] == [b"%d" % i for i in range(5)]


def test_iteration_ends_when_the_subscriber_is_closed(bus: str, router: shmq.Router) -> None:
    """`for msg in sub` blocks between messages and ends when another thread closes the subscriber."""
    sub = shmq.Subscriber(bus, "it")
    got: list[bytes] = []

    def consume() -> None:
        for msg in sub:
            got.append(msg.data)

    consumer = threading.Thread(target=consume)
    try:
        consumer.start()
        with shmq.Publisher(bus) as pub:
            pub.publish_many("it", [b"a", b"b"], timeout=WAIT_S)
            assert wait_until(lambda: len(got) == 2, WAIT_S)
        sub.close()
        consumer.join(WAIT_S)
        assert not consumer.is_alive() and got == [b"a", b"b"]
    finally:
        sub.close()
        consumer.join(WAIT_S)


def test_message_pickles_equal_and_views_its_data_without_copying(bus: str, router: shmq.Router) -> None:
    """pickle.loads(pickle.dumps(msg)) == msg (every field, headers and the last_value flag
    included); messages differing in any field are unequal; msg.view() is a read-only memoryview
    of msg.data itself, not a copy."""
    headers = {"k": "v", "n": 1.5, "ok": True, "i": -3}
    with shmq.Publisher(bus) as pub:
        pub.publish("pk.a", b"old", timeout=WAIT_S)
        pub.publish("pk.a", bytes(range(256)) * 4, headers=headers, timeout=WAIT_S)
        assert pub.flush(WAIT_S)
        with shmq.Subscriber(bus, "pk.*") as live, shmq.Subscriber(bus, "pk.*", last_value=True) as late:
            pub.publish("pk.a", b"plain", timeout=WAIT_S)
            first, second = drain(late, 2)  # the last value of pk.a (seq 2), then seq 3
            (third,) = drain(live, 1)
    assert (first.seq, first.last_value, first.headers) == (2, True, headers)
    assert (second.seq, second.last_value) == (3, False)
    for msg in (first, second, third):
        clone = pickle.loads(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        assert clone == msg
        assert not clone.__ne__(msg)  # != is defined too, not just ==
        assert (clone.topic, clone.seq, clone.data, clone.headers, clone.timestamp_ns) == (
            msg.topic,
            msg.seq,
            msg.data,
            msg.headers,
            msg.timestamp_ns,
        )
        assert (clone.publisher_id, clone.last_value) == (msg.publisher_id, msg.last_value)
    assert second == third  # the same message, seen by two subscribers
    assert first != second and first != "not a message"
    with pytest.raises(TypeError):
        hash(first)  # == compares values, so messages are not hashable

    view = first.view()
    assert isinstance(view, memoryview) and view.readonly and view.obj is first.data  # zero-copy
    assert view.nbytes == len(first.data) == 1024 and view == first.data
    assert np.frombuffer(view, dtype=np.uint8)[255] == 255


def test_clients_close_and_work_as_context_managers(bus: str) -> None:
    """`with` closes clients and stops the router; closed clients raise Closed; close() twice is
    harmless; once the router is gone, a new client cannot connect."""
    with shmq.Router(bus) as r:
        assert r.is_alive() and str(r.pid) in repr(r)
        with shmq.Publisher(bus) as pub, shmq.Subscriber(bus, "c") as sub:
            assert pub.connected and sub.connected and not pub.closed
            pub.publish("c", b"x", timeout=WAIT_S)
            assert sub.recv(timeout=WAIT_S).data == b"x"
        assert pub.closed and sub.closed and not pub.connected
        pub.close()
        sub.close()
        for call in (
            lambda: pub.publish("c", b"x", timeout=0.1),
            lambda: pub.stats(),
            lambda: sub.recv(timeout=0.1),
            lambda: sub.stats(),
        ):
            with pytest.raises(shmq.Closed):
                call()
        assert "closed" in repr(pub) and "closed" in repr(sub)
    assert not r.is_alive()
    with pytest.raises(shmq.RouterUnavailable):
        shmq.Publisher(bus, connect_timeout=0.2)


def test_publish_while_the_router_is_down(bus: str) -> None:
    """When the router stops, clients notice and publish(timeout=...) raises RouterUnavailable,
    publishing nothing; when a router is back, both reconnect by themselves and the stream goes on
    (the failed publish used no sequence number)."""
    first = shmq.Router(bus).start()
    second = None
    try:
        with shmq.Publisher(bus) as pub, shmq.Subscriber(bus, "down") as sub:
            assert pub.publish("down", b"1", timeout=WAIT_S) == 1
            first.stop()
            assert wait_until(lambda: not pub.connected and not sub.connected, WAIT_S)
            with pytest.raises(shmq.RouterUnavailable, match="no router is serving") as info:
                pub.publish("down", b"lost", timeout=0.2)
            assert isinstance(info.value, ConnectionError) and "nothing was published" in str(info.value)
            with pytest.raises(shmq.RouterUnavailable):
                pub.publish_many("down.new", [b"lost"], timeout=0.2)
            assert pub.stats().state == "disconnected" and sub.stats().state == "disconnected"
            second = shmq.Router(bus).start()
            # (the new router waits for returning subscribers before routing: see
            # test_unrouted_messages_reach_a_subscriber_that_reconnects_late)
            assert wait_until(lambda: sub.connected, WAIT_S)
            assert pub.publish("down", b"2", timeout=WAIT_S) == 2
            assert [(m.seq, m.data) for m in drain(sub, 2)] == [(1, b"1"), (2, b"2")]
            assert pub.stats().state == "live"
    finally:
        first.stop()
        if second is not None:
            pw.settle(bus)
            second.stop()


async def _async_checks(bus: str) -> None:
    with shmq.Subscriber(bus, "aio") as sub, shmq.Publisher(bus) as pub:
        with pytest.raises(shmq.Empty):
            await sub.recv_async(timeout=0.05)

        # A cancelled recv_async has taken nothing: the message is there for the next one.
        waiting = asyncio.create_task(sub.recv_async(timeout=WAIT_S))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        pub.publish("aio", b"after cancel", timeout=WAIT_S)
        assert (await sub.recv_async(timeout=WAIT_S)).data == b"after cancel"

        # aiter yields messages as they come and ends when the subscriber is closed.
        later = asyncio.get_running_loop().call_later
        later(0.05, pub.publish, "aio", b"a")
        later(0.1, pub.publish, "aio", b"b")
        got = []
        async for msg in sub.aiter():
            got.append(msg.data)
            if len(got) == 2:
                later(0.05, sub.close)
        assert got == [b"a", b"b"]


def test_asyncio_recv_async_cancel_and_aiter(bus: str, router: shmq.Router) -> None:
    """recv_async times out with Empty; cancelling it loses nothing; aiter ends on close."""
    asyncio.run(asyncio.wait_for(_async_checks(bus), 30))


# -- statistics -------------------------------------------------------------------------------------


def test_stats_are_exact_after_flush_and_drain(bus: str, router: shmq.Router) -> None:
    """pub.stats(), sub.stats() and bus_stats() agree exactly with what was sent, filtered, dropped
    and received, bytes included."""
    sent = [("s.a", b"a%03d" % i, {"n": i}) for i in range(100)] + [("s.b.c", b"c" * 30, None)] * 50
    with (
        shmq.Publisher(bus) as pub,
        shmq.Subscriber(bus, ">") as everything,
        shmq.Subscriber(bus, "s.*", where="n > 5") as filtered,
        shmq.Subscriber(bus, "s.>", on_full="drop", capacity=4096) as dropper,  # never reads
    ):
        for topic, data, headers in sent:
            pub.publish(topic, data, headers=headers, timeout=WAIT_S)
        assert pub.flush(WAIT_S)
        # the router counts what it took just after taking it
        assert wait_until(lambda: pub.stats().routed == len(sent), WAIT_S)
        drain(everything, len(sent))
        drain(filtered, 94)

        total_bytes = sum(pw.message_size(*m) for m in sent)
        p = pub.stats()
        assert (p.published, p.routed, p.routed_bytes, p.depth_messages, p.depth_bytes, p.stalls) == (
            150,
            150,
            total_bytes,
            0,
            0,
            0,
        )
        assert (p.state, p.publisher_id, p.bus, p.ring) == ("live", pub.publisher_id, bus, pub.ring_name)

        e = everything.stats()
        assert (e.delivered, e.delivered_bytes, e.received, e.depth_messages, e.lag) == (
            150,
            total_bytes,
            150,
            0,
            0,
        )
        assert (e.drops, e.filtered, e.pending, e.on_full, e.patterns) == (0, 0, 0, "block", (">",))
        f = filtered.stats()
        assert (f.delivered, f.filtered, f.received, f.drops) == (
            94,
            6,
            94,
            0,
        )  # s.b.c: no match, not filtered
        d = dropper.stats()
        assert d.delivered + d.drops == 150 and d.drops > 0 and d.received == 0
        assert (d.depth_messages, d.lag, d.pending, d.capacity) == (d.delivered, d.delivered, 0, 4096)

        b = shmq.bus_stats(bus)
        assert b.router_alive and b.router_pid == router.pid
        assert (b.messages, b.bytes, b.drops, b.stalls) == (150, total_bytes, d.drops, 0)
        assert b.deliveries == 150 + 94 + d.delivered
        assert [(t.topic, t.messages, t.bytes, t.last_seq) for t in b.topics] == [
            ("s.a", 100, sum(pw.message_size(*m) for m in sent[:100]), 100),
            ("s.b.c", 50, sum(pw.message_size(*m) for m in sent[100:]), 50),
        ]
        assert sum(t.drops for t in b.topics) == d.drops
        assert sum(t.deliveries for t in b.topics) == b.deliveries
        assert b.publishers == (p,)
        assert wait_until(  # bus_stats reads received/depth from the router's 100 ms snapshot
            lambda: (
                {(s.ring, s.delivered, s.received) for s in shmq.bus_stats(bus).subscribers}
                == {(e.ring, 150, 150), (f.ring, 94, 94), (d.ring, d.delivered, 0)}
            ),
            WAIT_S,
        )


def test_topic_deliveries_count_copies_written(bus: str, router: shmq.Router) -> None:
    """Messages a filter rejects or a policy drops are not deliveries (regression: they were)."""
    with (
        shmq.Publisher(bus) as pub,
        shmq.Subscriber(bus, "td", where="n == 1"),
        shmq.Subscriber(bus, "td", on_full="drop", capacity=256),
    ):
        for n in range(20):
            pub.publish("td", bytes(64), headers={"n": n}, timeout=WAIT_S)
        assert pub.flush(WAIT_S)
        stats = shmq.bus_stats(bus)
        (topic,) = stats.topics
        assert topic.deliveries == stats.deliveries  # one topic: its copies are all the copies
        assert 1 <= topic.deliveries < 20 and topic.drops == stats.drops > 0


def test_drop_oldest_received_counts_what_the_subscriber_took(bus: str, router: shmq.Router) -> None:
    with (
        shmq.Publisher(bus) as pub,
        shmq.Subscriber(bus, "do", on_full="drop_oldest", capacity=1024) as sub,
    ):
        for i in range(100):
            pub.publish("do", b"%03d" % i, timeout=WAIT_S)
        assert pub.flush(WAIT_S)
        before = sub.stats()
        assert before.drops > 0
        assert before.received == 0, before  # nothing was received yet
        got = sub.recv_many(timeout=WAIT_S)
        assert sub.stats().received == len(got)


def test_bus_messages_count_each_published_message_once(bus: str, router: shmq.Router) -> None:
    with shmq.Publisher(bus) as pub:
        leaving = shmq.Subscriber(bus, "g", group="workers")
        staying = shmq.Subscriber(bus, "g", group="workers")
        try:
            for i in range(20):
                pub.publish("g", b"%d" % i, timeout=WAIT_S)
            assert pub.flush(WAIT_S)
            leaving.close()  # ~10 queued for it go to `staying`
            assert len(drain(staying, 20)) == 20
        finally:
            leaving.close()
            staying.close()
        assert shmq.bus_stats(bus).messages == 20


# -- bad input --------------------------------------------------------------------------------------

BAD_PATTERNS = [
    ("", "", -1, "empty pattern"),
    ("md..AAPL", "", 1, "doubled dot"),
    ("md.>.AAPL", ">", 1, "must be the last token"),
    ("md.AA*PL", "AA*PL", 1, "must be a whole token"),
    ("md. AAPL", " AAPL", 1, "white space"),
    ("md.", "", 1, "trailing dot"),
    ("a" * 256, "", -1, "the limit is 255"),
    (".".join("a" * 33), "a", 32, "the limit is 32"),
]


@pytest.mark.parametrize(("pattern", "token", "index", "says"), BAD_PATTERNS)
def test_bad_pattern(shared_bus: str, pattern: str, token: str, index: int, says: str) -> None:
    """InvalidTopic (a ValueError) naming the bad token and its index, alone or in a list."""
    for patterns in (pattern, ["ok.>", pattern]):
        with pytest.raises(shmq.InvalidTopic, match=says) as info:
            shmq.Subscriber(shared_bus, patterns)
        assert isinstance(info.value, ValueError)
        assert (info.value.topic, info.value.token, info.value.index) == (pattern, token, index)


@pytest.mark.parametrize(
    ("patterns", "error", "says"),
    [
        ([], shmq.InvalidArgument, "at least one pattern"),
        (5, shmq.ArgumentTypeError, "a str or a list of str"),
        (["ok", 5], shmq.ArgumentTypeError, "must be a str"),
        (None, shmq.ArgumentTypeError, "a str or a list of str"),
    ],
)
def test_bad_pattern_types(shared_bus: str, patterns: Any, error: type, says: str) -> None:
    with pytest.raises(error, match=says):
        shmq.Subscriber(shared_bus, patterns)


def test_bytes_pattern_error_names_bytes(shared_bus: str) -> None:
    with pytest.raises(shmq.ArgumentTypeError, match="bytes"):
        shmq.Subscriber(shared_bus, b"md.>")


@pytest.mark.parametrize(
    ("topic", "error", "says"),
    [
        ("md.*", shmq.InvalidTopic, "wildcard, not allowed in a topic"),
        ("md.>", shmq.InvalidTopic, "wildcard, not allowed in a topic"),
        ("", shmq.InvalidTopic, "empty"),
        ("a..b", shmq.InvalidTopic, "doubled dot"),
        (b"md.x", shmq.ArgumentTypeError, "must be a str"),
        (5, shmq.ArgumentTypeError, "must be a str"),
    ],
)
def test_bad_topic(shared_bus: str, topic: Any, error: type, says: str) -> None:
    """publish and publish_many reject the topic before anything is written: the next good
    publish on a good topic is seq 1 and is the only message delivered."""
    with shmq.Subscriber(shared_bus, ">") as sub, shmq.Publisher(shared_bus) as pub:
        with pytest.raises(error, match=says):
            pub.publish(topic, b"x", timeout=WAIT_S)
        with pytest.raises(error, match=says):
            pub.publish_many(topic, [b"x"], timeout=WAIT_S)
        assert pub.publish("good", b"y", timeout=WAIT_S) == 1
        assert [m.data for m in drain(sub, 1)] == [b"y"]


@pytest.mark.parametrize(
    ("where", "position", "says"),
    [
        ("price >", 7, "unexpected end of expression"),
        ("price > 1 and", 13, "expected a header name"),
        ("a == b", 5, "cannot compare two header names"),
        ("a < 1 < 2", 6, "comparisons do not chain"),
        ("x == 'open", 5, "unterminated string"),
        ("x == 99999999999999999999", 5, "does not fit in a signed 64-bit integer"),
        ("", 0, "unexpected end"),
    ],
)
def test_bad_filter(shared_bus: str, where: str, position: int, says: str) -> None:
    """InvalidFilter (a ValueError) with the expression, the position and a caret under it."""
    with pytest.raises(shmq.InvalidFilter, match=says) as info:
        shmq.Subscriber(shared_bus, "x", where=where)
    assert isinstance(info.value, ValueError)
    assert (info.value.expression, info.value.position) == (where, position)
    assert "\n" in str(info.value) and str(info.value).rstrip().endswith("^")


def test_filter_object_as_where(shared_bus: str) -> None:
    where = compile_filter("n > 1")
    with shmq.Subscriber(shared_bus, "fo", where=where) as sub, shmq.Publisher(shared_bus) as pub:  # type: ignore[arg-type]
        pub.publish("fo", b"no", headers={"n": 1}, timeout=WAIT_S)
        pub.publish("fo", b"yes", headers={"n": 2}, timeout=WAIT_S)
        assert [m.data for m in drain(sub, 1)] == [b"yes"]
        assert sub.where == str(where)


def test_filter_of_the_wrong_type(shared_bus: str) -> None:
    with pytest.raises(shmq.ArgumentTypeError, match="must be a str"):
        shmq.Subscriber(shared_bus, "x", where=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("headers", "error", "says"),
    [
        ({"a": [1]}, shmq.ArgumentTypeError, "header 'a' has a value of type list"),
        ({"a": None}, shmq.ArgumentTypeError, "type NoneType"),
        ({"a": b"x"}, shmq.ArgumentTypeError, "type bytes"),
        ({"a": {"b": 1}}, shmq.ArgumentTypeError, "type dict"),
        ({1: "x"}, shmq.ArgumentTypeError, "header names must be str"),
        ("a=1", shmq.ArgumentTypeError, "headers must be a dict"),
        ({"": 1}, shmq.InvalidArgument, "1 to 255 bytes"),
        ({"k" * 256: 1}, shmq.InvalidArgument, "1 to 255 bytes"),
        ({"a": 2**63}, shmq.InvalidArgument, "signed 64-bit"),
        ({"a": "x" * 65536}, shmq.InvalidArgument, "longer than the limit"),
        ({f"k{i}": "x" * 600 for i in range(120)}, shmq.InvalidArgument, "more than the limit"),
    ],
)
def test_bad_headers(shared_bus: str, headers: Any, error: type, says: str) -> None:
    """Unsupported header names or values raise before anything is published."""
    with shmq.Subscriber(shared_bus, ">") as sub, shmq.Publisher(shared_bus, capacity=1 << 18) as pub:
        with pytest.raises(error, match=says):
            pub.publish("h", b"x", headers=headers, timeout=WAIT_S)
        with pytest.raises(error, match=says):
            pub.publish_many("h", [b"x"], headers=headers, timeout=WAIT_S)
        assert pub.publish("h", b"ok", timeout=WAIT_S) == 1
        assert [m.data for m in drain(sub, 1)] == [b"ok"]


@pytest.mark.parametrize(
    ("data", "says"),
    [("text", "encode it first"), (5, "got int"), (None, "got NoneType"), ([b"a"], "got list")],
)
def test_publish_non_buffer(shared_bus: str, data: Any, says: str) -> None:
    """MessageTypeError (a TypeError) for data that is not a buffer; publish_many checks every item
    of a piece before writing any, so a bad item publishes nothing (exception.published == 0)."""
    with shmq.Subscriber(shared_bus, ">") as sub, shmq.Publisher(shared_bus) as pub:
        with pytest.raises(shmq.MessageTypeError, match=says):
            pub.publish("d", data, timeout=WAIT_S)
        with pytest.raises(shmq.MessageTypeError, match=says) as info:
            pub.publish_many("d", [b"a", b"b", data], timeout=WAIT_S)
        assert info.value.published == 0  # type: ignore[attr-defined]
        with pytest.raises(shmq.ArgumentTypeError, match="single bytes"):
            pub.publish_many("d", b"abc", timeout=WAIT_S)
        assert pub.publish("d", b"ok", timeout=WAIT_S) == 1
        assert [m.data for m in drain(sub, 1)] == [b"ok"]


def test_publish_many_non_iterable(shared_bus: str) -> None:
    with shmq.Publisher(shared_bus) as pub, pytest.raises(shmq.ArgumentTypeError):
        pub.publish_many("d", 5, timeout=WAIT_S)  # type: ignore[arg-type]


def test_publish_too_large_and_bad_timeouts(shared_bus: str) -> None:
    with shmq.Publisher(shared_bus, capacity=4096) as pub, shmq.Subscriber(shared_bus, "z") as sub:
        with pytest.raises(shmq.MessageTooLarge, match="nothing was published"):
            pub.publish("z", bytes(4096), timeout=WAIT_S)
        for timeout, error in (
            ("1", shmq.ArgumentTypeError),
            (-1, shmq.InvalidArgument),
            (math.nan, shmq.InvalidArgument),
        ):
            with pytest.raises(error, match="timeout"):
                pub.publish("z", b"x", timeout=timeout)
            with pytest.raises(error, match="timeout"):
                sub.recv(timeout=timeout)
        with pytest.raises(shmq.InvalidArgument, match="max_messages"):
            sub.recv_many(max_messages=0, timeout=0)


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"on_full": "spil"}, shmq.InvalidArgument, "on_full must be one of"),
        ({"group": "g", "on_full": "conflate"}, shmq.InvalidArgument, "cannot be used with group="),
        ({"group": "g", "on_full": "drop_oldest"}, shmq.InvalidArgument, "cannot be used with group="),
        ({"group": 5}, shmq.ArgumentTypeError, "group must be a str"),
        ({"group": ""}, shmq.InvalidArgument, "1 to 100 printable"),
        ({"group": "g\n"}, shmq.InvalidArgument, "1 to 100 printable"),
        ({"capacity": 1000}, shmq.InvalidArgument, "power of two"),
        ({"capacity": "big"}, shmq.InvalidArgument, "got str"),  # as for Queue (test_bad_input.py)
        ({"wait": "sometimes"}, shmq.InvalidArgument, "wait must be one of"),
    ],
)
def test_bad_subscriber_options(shared_bus: str, options: dict[str, Any], error: type, says: str) -> None:
    with pytest.raises(error, match=says):
        shmq.Subscriber(shared_bus, "x", **options)


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"capacity": 1000}, shmq.InvalidArgument, "power of two"),
        ({"wait": "sometimes"}, shmq.InvalidArgument, "wait must be one of"),
    ],
)
def test_bad_publisher_options(shared_bus: str, options: dict[str, Any], error: type, says: str) -> None:
    with pytest.raises(error, match=says):
        shmq.Publisher(shared_bus, **options)


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("a/b", shmq.InvalidArgument),
        ("a b", shmq.InvalidArgument),
        ("", shmq.InvalidArgument),
        ("x" * 101, shmq.InvalidArgument),
        (5, shmq.ArgumentTypeError),
    ],
)
def test_bad_bus_names(name: Any, error: type) -> None:
    for make in (
        lambda: shmq.Publisher(name, connect_timeout=0.2),
        lambda: shmq.Subscriber(name, "x", connect_timeout=0.2),
        lambda: shmq.Router(name),
        lambda: shmq.bus_stats(name),
    ):
        with pytest.raises(error):
            make()


def test_no_router_raises_router_unavailable_and_leaves_nothing(bus: str) -> None:
    """Without a router, the constructors give up after connect_timeout with RouterUnavailable (a
    ConnectionError) that says how to start one, and remove the ring they had made."""
    for make in (
        lambda: shmq.Publisher(bus, connect_timeout=0.2),
        lambda: shmq.Subscriber(bus, "x", connect_timeout=0.2),
    ):
        with pytest.raises(shmq.RouterUnavailable) as info:
            make()
        assert isinstance(info.value, ConnectionError)
        assert bus in str(info.value) and "shmq.Router(" in str(info.value)
        assert pw.bus_segments(bus) == []
    with pytest.raises(shmq.NotFound, match="has no router"):
        shmq.bus_stats(bus)


def test_second_router_on_a_bus_is_refused(bus: str, router: shmq.Router) -> None:
    """A second router on a live bus raises AlreadyExists (a FileExistsError) naming the first
    one's pid; the first one keeps serving. Starting a started Router again is refused too."""
    with pytest.raises(shmq.AlreadyExists, match=f"pid {router.pid}") as info:
        shmq.Router(bus).start()
    assert isinstance(info.value, FileExistsError)
    with pytest.raises(shmq.InvalidArgument, match="already started"):
        router.start()
    with shmq.Subscriber(bus, "still") as sub, shmq.Publisher(bus) as pub:
        pub.publish("still", b"served", timeout=WAIT_S)
        assert sub.recv(timeout=WAIT_S).data == b"served"
    assert shmq.bus_stats(bus).router_pid == router.pid


def test_messages_of_a_gone_member_wait_for_the_next_one_without_busy_looping(
    bus: str, router: shmq.Router
) -> None:
    """The last member of a group leaves with messages queued: they wait (not lost) for the next
    member, and the router sleeps meanwhile instead of polling the stalled redelivery."""
    with shmq.Publisher(bus) as pub:
        first = shmq.Subscriber(bus, "g.>", group="solo")
        for i in range(10):
            pub.publish("g.x", b"%d" % i, timeout=WAIT_S)
        assert pub.flush(WAIT_S)
        assert wait_until(lambda: first.stats().depth_messages == 10, WAIT_S)
        first.close()
        sleeps = shmq.bus_stats(bus).sleeps
        # a router that busy-loops on the stalled input never goes to sleep
        assert wait_until(lambda: shmq.bus_stats(bus).sleeps > sleeps + 2, WAIT_S)
        with shmq.Subscriber(bus, "g.>", group="solo") as second:
            assert [m.data for m in drain(second, 10)] == [b"%d" % i for i in range(10)]
        stats = shmq.bus_stats(bus)
        assert (stats.messages, stats.redeliveries) == (10, 10)


def test_group_with_drop_policy_drops_only_when_every_member_is_full(bus: str, router: shmq.Router) -> None:
    """A queue group's on_full applies when all its members are full; members must agree on it."""
    with (
        shmq.Publisher(bus) as pub,
        shmq.Subscriber(bus, "q", group="lossy", on_full="drop", capacity=1024) as a,
        shmq.Subscriber(bus, "q", group="lossy", on_full="drop", capacity=1024) as b,
    ):
        with pytest.raises(shmq.InvalidArgument, match="on_full='drop'"):
            shmq.Subscriber(bus, "q", group="lossy", on_full="block", connect_timeout=WAIT_S)
        for i in range(200):  # far more than two 1 KiB rings hold: nobody reads
            pub.publish("q", b"%03d" % i, timeout=WAIT_S)  # never blocks: the group drops
        assert pub.flush(WAIT_S)
        got = a.recv_many(timeout=WAIT_S) + b.recv_many(timeout=WAIT_S)
        drops = a.stats().drops + b.stats().drops
        assert 0 < len(got) < 200 and len(got) + drops == 200
        assert len({m.data for m in got}) == len(got)  # each to one member only
