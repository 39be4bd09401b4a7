"""The main job (``scripts/demo``, ``shmq demo``): market data through a pub/sub router.

Processes on one machine, talking only through shared memory:

* a **router** (``shmq.Router``, a child process) that copies each message from the publisher's
  ring into the rings of the subscribers that want it;
* a **feed** that publishes numpy ticks (a 40-byte record: symbol, venue, bid, ask, sizes,
  exchange time) on ``md.<venue>.<symbol>`` (3 venues x 20 symbols) at a fixed rate, each with
  the headers ``{"venue", "symbol", "price"}`` that ``where=`` filters test;
* six **subscribers**: ``wildcard`` (``md.>``: everything, lossless), ``filtered`` (``md.*.*``
  where ``price > 100 and venue == 'XNAS'``, evaluated by the router), ``conflating`` (``md.>``,
  ``on_full="conflate"``, a 1 KiB ring and a 2 ms nap after each message: too slow for the feed,
  it skips to the newest tick of each topic) and ``risk#1..3``, a queue group on ``md.XNYS.>``
  sharing the work, each tick to one member.

At the end it prints a row per subscriber (messages received, drops, one-way latency percentiles:
``time.monotonic_ns()`` on receipt minus the publish timestamp ``Message.timestamp_ns``), the bus
totals from ``shmq.bus_stats``, and checks what each subscriber got against the feed's own log.
The exit status is 0 only if every check holds. Every process is stopped and every segment
removed on the way out, Ctrl-C, SIGTERM and failures included (if the main process is killed
outright, its children notice and leave, closing their rings).

``--queue`` runs the queue demo instead (`run_queue_demo`): ping-pong latency and one-way
throughput between two processes, shmq beside multiprocessing.Queue. With ``wait="spin"`` both
processes busy-poll, so on a 2-core machine the two spinning processes own both cores;
``adaptive`` spins ~50 µs then sleeps; ``block`` always sleeps in the kernel. The full comparison
against every peer is ``benchmarks/bench_queue.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import multiprocessing.queues
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np
import numpy.typing as npt

import shmq
from shmq.testing import list_segments, remove_segment, unique_name

CTX = multiprocessing.get_context("spawn")

# -- the market-data demo ------------------------------------------------------------------------

VENUES = ("XNAS", "XNYS", "ARCX")
#: Symbols and their opening mid prices: some far above 100, some below, some crossing it.
SYMBOLS = (
    ("AAPL", 189.25),
    ("MSFT", 412.10),
    ("NVDA", 121.40),
    ("AMZN", 178.05),
    ("GOOG", 165.30),
    ("META", 495.80),
    ("TSLA", 176.55),
    ("JPM", 198.20),
    ("XOM", 100.00),
    ("WMT", 99.90),
    ("DIS", 100.10),
    ("ORCL", 125.15),
    ("KO", 61.35),
    ("PFE", 28.45),
    ("INTC", 31.10),
    ("F", 12.20),
    ("T", 17.40),
    ("BAC", 38.65),
    ("CSCO", 48.90),
    ("NKE", 94.30),
)
#: Every topic of the feed; a tick's topic number is venue * len(SYMBOLS) + symbol.
TOPICS = tuple(f"md.{venue}.{symbol}" for venue in VENUES for symbol, _ in SYMBOLS)
TOPIC_NUMBERS = {topic: i for i, topic in enumerate(TOPICS)}

#: One tick as it travels: the message payload is one row of a numpy array of this dtype.
TICK = np.dtype(
    [
        ("symbol", "<u2"),
        ("venue", "u1"),
        ("bid", "<f8"),
        ("ask", "<f8"),
        ("bid_size", "<u4"),
        ("ask_size", "<u4"),
        ("exch_ts", "<i8"),  # time.time_ns() when the feed stamped it
    ],
    align=True,
)

FILTER = "price > 100 and venue == 'XNAS'"
BURST_S = 0.001  # the feed publishes a burst of rate/1000 ticks every millisecond
MAX_TICKS = 5_000_000
IDLE_POLL_S = 0.05
SLOW_NAP_S = 0.002
CONNECT_TIMEOUT_S = 60.0  # the children start first, then the router
PERCENTILE_COLUMNS = ("p50", "p90", "p99", "p99.9", "max")


@dataclass(frozen=True)
class SubscriberSpec:
    """One subscriber process of the demo."""

    name: str
    patterns: str
    where: str | None = None
    group: str | None = None
    on_full: str = "block"
    capacity: int = 1 << 20
    nap_s: float = 0.0  # sleep after each message (the slow one)
    check_payload: bool = False  # decode every tick and compare it with its topic and headers

    def describe(self) -> str:
        if self.where:
            return f"{self.patterns:10} where {self.where} (the router filters)"
        if self.group:
            return f"{self.patterns:10} queue group {self.group!r}: each tick to one member"
        if self.on_full == "conflate":
            return (
                f"{self.patterns:10} on_full='conflate', {self.capacity // 1024} KiB ring, "
                f"naps {self.nap_s * 1e3:g} ms after each message"
            )
        return f"{self.patterns:10} every tick, lossless (on_full='block')"


GROUP_SIZE = 3
SUBSCRIBERS = (
    SubscriberSpec("wildcard", "md.>", check_payload=True),
    SubscriberSpec("filtered", "md.*.*", where=FILTER),
    SubscriberSpec("conflating", "md.>", on_full="conflate", capacity=1024, nap_s=SLOW_NAP_S),
    *(
        SubscriberSpec(f"risk#{i + 1}", "md.XNYS.>", group="risk", check_payload=True)
        for i in range(GROUP_SIZE)
    ),
)


def _tick_plan(seconds: float, rate: int) -> tuple[int, int]:
    """(ticks per burst, bursts) for `rate` ticks/s during `seconds`."""
    per_burst = max(1, round(rate * BURST_S))
    bursts = max(1, round(seconds / BURST_S))
    return per_burst, bursts


def _tick_count(seconds: float, rate: int) -> int:
    """How many ticks the feed will publish; ValueError if the options make no sense."""
    if not 0 < seconds <= 3600:
        raise ValueError(f"seconds must be more than 0 and at most 3600, got {seconds:g}")
    per_burst, bursts = _tick_plan(seconds, rate)
    if rate < 1 or per_burst * bursts > MAX_TICKS:
        raise ValueError(f"rate x seconds must make 1 to {MAX_TICKS:,} ticks, got {rate} x {seconds:g}")
    return per_burst * bursts


def make_ticks(count: int, seed: int) -> npt.NDArray[Any]:
    """`count` ticks on random topics; each symbol's mid walks in cents, the spread is 1-4 cents."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, len(TOPICS), count)
    symbol = topic % len(SYMBOLS)
    ticks = np.zeros(count, TICK)
    ticks["symbol"] = symbol
    ticks["venue"] = topic // len(SYMBOLS)
    mid_cents = np.empty(count, np.int64)
    steps = rng.choice(np.array([-2, -1, -1, 0, 1, 1, 2]), count)
    for s, (_, opening) in enumerate(SYMBOLS):
        rows = symbol == s
        mid_cents[rows] = round(opening * 100) + np.cumsum(steps[rows])
    half_spread = rng.integers(1, 3, count)
    ticks["bid"] = (mid_cents - half_spread) / 100.0
    ticks["ask"] = (mid_cents + half_spread) / 100.0
    ticks["bid_size"] = rng.integers(1, 50, count) * 100
    ticks["ask_size"] = rng.integers(1, 50, count) * 100
    return ticks


def tick_topics(ticks: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """The topic number of each tick."""
    topics: npt.NDArray[np.int64] = ticks["venue"].astype(np.int64) * len(SYMBOLS) + ticks["symbol"]
    return topics


def tick_prices(ticks: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """The ``price`` header of each tick: its mid, computed the same way everywhere."""
    prices: npt.NDArray[np.float64] = (ticks["bid"] + ticks["ask"]) / 2.0
    return prices


def _parent_alive() -> bool:
    """False once the demo's main process is gone (killed): its children then leave too."""
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def _child_signals() -> None:
    """In a child: Ctrl-C is the parent's business (it stops everyone); SIGTERM exits cleanly,
    closing the child's rings on the way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def exit_now(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)


def _feed(bus: str, results_name: str, go: Event, seconds: float, rate: int, seed: int) -> None:
    _child_signals()
    per_burst, bursts = _tick_plan(seconds, rate)
    ticks = make_ticks(per_burst * bursts, seed)
    topics = tick_topics(ticks).tolist()
    prices = tick_prices(ticks).tolist()
    raw = memoryview(ticks.view(np.uint8).data)  # row i is raw[i * size : (i + 1) * size]
    size = TICK.itemsize
    seqs = np.zeros(len(ticks), np.int64)
    venues = [VENUES[t // len(SYMBOLS)] for t in range(len(TOPICS))]
    symbols = [SYMBOLS[t % len(SYMBOLS)][0] for t in range(len(TOPICS))]
    stamps = ticks["exch_ts"]
    results = shmq.Queue(results_name)
    try:
        with shmq.Publisher(bus, connect_timeout=CONNECT_TIMEOUT_S) as pub:
            results.put_obj(("ready", "feed", None), timeout=30)
            while not go.wait(0.5):
                if not _parent_alive():
                    return
            publish, now, sleep = pub.publish, time.monotonic, time.sleep
            started = now()
            for b in range(bursts):
                delay = started + b * BURST_S - now()
                if delay > 0:
                    sleep(delay)
                lo = b * per_burst
                stamps[lo : lo + per_burst] = time.time_ns()
                for i in range(lo, lo + per_burst):
                    t = topics[i]
                    headers = {"venue": venues[t], "symbol": symbols[t], "price": prices[i]}
                    seqs[i] = publish(TOPICS[t], raw[i * size : (i + 1) * size], headers, 30.0)
            elapsed = now() - started
            pub.flush(30)
            stats = pub.stats()
        log = {"topic": np.array(topics, np.int64), "seq": seqs, "price": np.array(prices)}
        results.put_obj(("feed", "feed", {**log, "elapsed": elapsed, "stats": stats}), timeout=60)
    finally:
        raw.release()
        results.close()


def _subscribe(bus: str, results_name: str, spec: SubscriberSpec, stop: Event) -> None:
    _child_signals()
    latencies: list[int] = []
    topics: list[int] = []
    seqs: list[int] = []
    checked = bad = 0
    numbers = TOPIC_NUMBERS
    results = shmq.Queue(results_name)
    try:
        with shmq.Subscriber(
            bus,
            spec.patterns,
            where=spec.where,
            group=spec.group,
            on_full=spec.on_full,
            capacity=spec.capacity,
            connect_timeout=CONNECT_TIMEOUT_S,
        ) as sub:
            results.put_obj(("ready", spec.name, None), timeout=30)
            idle = 0
            while True:
                if spec.nap_s:
                    try:
                        batch = [sub.recv(IDLE_POLL_S)]
                    except shmq.Empty:
                        batch = []
                else:
                    batch = sub.recv_many(4096, IDLE_POLL_S)
                now = time.monotonic_ns()
                if batch:
                    idle = 0
                    for m in batch:
                        latencies.append(now - m.timestamp_ns)
                        topics.append(numbers[m.topic])
                        seqs.append(m.seq)
                    if spec.check_payload:
                        checked += len(batch)
                        bad += _bad_payloads(batch)
                    if spec.nap_s:
                        time.sleep(spec.nap_s)
                elif stop.is_set():
                    # The feed is done and the router has taken all of it: finish once nothing is
                    # queued or held for us (twice in a row, a poll apart).
                    idle = idle + 1 if sub.stats().lag == 0 else 0
                    if idle >= 2:
                        break
                elif not _parent_alive():
                    return
            stats = sub.stats()
        result = {
            "latency_ns": np.array(latencies, np.int64),
            "topic": np.array(topics, np.int64),
            "seq": np.array(seqs, np.int64),
            "stats": stats,
            "checked": checked,
            "bad": bad,
        }
        results.put_obj(("subscriber", spec.name, result), timeout=60)
    finally:
        results.close()


def _bad_payloads(batch: Sequence[shmq.Message]) -> int:
    """How many messages of `batch` carry a tick that disagrees with their topic or headers."""
    ticks = np.frombuffer(b"".join(m.data for m in batch), TICK)
    want_topic = np.array([TOPIC_NUMBERS[m.topic] for m in batch])
    want_price = np.array([m.headers["price"] for m in batch], np.float64)
    good = (tick_topics(ticks) == want_topic) & (tick_prices(ticks) == want_price)
    return int(len(batch) - np.count_nonzero(good))


class _Inbox:
    """What the children report on the results queue, by kind and name."""

    def __init__(self, results: shmq.Queue, processes: Sequence[BaseProcess], router: shmq.Router) -> None:
        self.results = results
        self.processes = processes
        self.router = router
        self.got: dict[tuple[str, str], Any] = {}

    def wait_for(self, kind: str, names: Sequence[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while any((kind, name) not in self.got for name in names):
            try:
                got_kind, name, payload = self.results.get_obj(timeout=0.2)
                self.got[got_kind, name] = payload
                continue
            except shmq.Empty:
                pass
            for p in self.processes:
                if p.exitcode not in (None, 0):
                    raise RuntimeError(f"the {p.name} process failed (exit code {p.exitcode})")
            if not self.router.is_alive():
                raise RuntimeError(f"the router of bus {self.router.bus!r} exited")
            if time.monotonic() > deadline:
                missing = [name for name in names if (kind, name) not in self.got]
                raise RuntimeError(f"no {kind!r} report from {', '.join(missing)} within {timeout:g} s")
        return {name: self.got[kind, name] for name in names}


def _results_capacity(ticks: int) -> int:
    """A results ring whose largest message holds a log of every tick (18 bytes each, plus slack)."""
    need = 2 * (24 * ticks + (1 << 20))
    return 1 << max(22, (need - 1).bit_length())


@dataclass(frozen=True)
class Check:
    ok: bool
    text: str


@dataclass
class MarketDemoResult:
    """What `run_market_demo` measured and checked (it also prints all of it)."""

    ticks: int
    elapsed_s: float
    subscribers: dict[str, dict[str, Any]]
    bus: shmq.BusStats
    checks: list[Check]
    leftover_segments: list[str]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def run_market_demo(
    seconds: float = 5.0, rate: int = 20_000, *, seed: int = 1, out: Callable[[str], None] = print
) -> MarketDemoResult:
    """Run the market-data demo: `rate` ticks/s for `seconds`; print the tables and checks."""
    ticks = _tick_count(seconds, rate)
    per_burst, bursts = _tick_plan(seconds, rate)
    bus = unique_name("demo-md")
    results_name = unique_name("demo-results")
    cores = os.cpu_count() or 1
    python = sys.version.split()[0]
    out(
        f"shmq {shmq.__version__} market-data demo (Python {python}, {cores} CPUs): 1 feed -> router -> "
        f"{len(SUBSCRIBERS)} subscribers, {len(SUBSCRIBERS) + 3} processes"
    )
    out(
        f"feed: {per_burst / BURST_S:,.0f} ticks/s for {bursts * BURST_S:g} s (bursts of {per_burst} every "
        f"{BURST_S * 1e3:g} ms), {TICK.itemsize}-byte numpy ticks"
    )
    out(f"      on {len(TOPICS)} topics md.<venue>.<symbol> ({len(VENUES)} venues x {len(SYMBOLS)} symbols)")
    out("subscribers:")
    for spec in SUBSCRIBERS:
        if spec.group is None or spec.name.endswith("#1"):
            label = spec.name if spec.group is None else f"{spec.name[:-2]}#1..{GROUP_SIZE}"
            out(f"  {label:12} {spec.describe()}")
    router = shmq.Router(bus)
    go, stop = CTX.Event(), CTX.Event()
    processes: list[BaseProcess] = []
    try:
        with shmq.Queue(
            results_name, create=True, kind="mpsc", capacity=_results_capacity(ticks), wait="block"
        ) as results:
            for spec in SUBSCRIBERS:
                processes.append(
                    CTX.Process(target=_subscribe, args=(bus, results_name, spec, stop), name=spec.name)
                )
            feed_args = (bus, results_name, go, seconds, rate, seed)
            processes.append(CTX.Process(target=_feed, args=feed_args, name="feed"))
            with _sigint_ignored():
                for p in processes:
                    p.start()  # they wait for the router to connect
            router.start()
            inbox = _Inbox(results, processes, router)
            names = [spec.name for spec in SUBSCRIBERS]
            inbox.wait_for("ready", [*names, "feed"], timeout=120)
            go.set()
            feed = inbox.wait_for("feed", ["feed"], timeout=3 * seconds + 120)["feed"]
            stop.set()
            subscribers = inbox.wait_for("subscriber", names, timeout=120)
            for p in processes:
                p.join(30)
            totals = shmq.bus_stats(bus)
    finally:
        _stop(processes)
        router.stop()
        # Whatever a killed process could not remove (normally nothing): reported below.
        leftover = [*list_segments(f"bus.{bus}"), *list_segments(results_name)]
        for name in leftover:
            remove_segment(name)
    checks = check_market_demo(feed, subscribers, totals, leftover)
    _report(out, feed, subscribers, totals, checks)
    return MarketDemoResult(ticks, feed["elapsed"], subscribers, totals, checks, leftover)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Processes started in here ignore SIGINT from birth (an ignored signal stays ignored across
    exec), so a Ctrl-C reaches only this process (and the router, which stops cleanly), and this
    process stops them with SIGTERM: no child dies half-started with a traceback. A Ctrl-C in
    the moment this lasts is lost. (Blocking SIGINT instead is not enough: numpy's threads would
    take it.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(processes: Sequence[BaseProcess]) -> None:
    """Stop whatever still runs: SIGTERM (the children close their rings), then SIGKILL."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        if p.pid is None:  # never started
            continue
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def _per_topic(topic: npt.NDArray[np.int64], seq: npt.NDArray[np.int64]) -> Iterator[npt.NDArray[np.int64]]:
    for t in range(len(TOPICS)):
        yield seq[topic == t]


def check_market_demo(
    feed: dict[str, Any], subs: dict[str, dict[str, Any]], totals: shmq.BusStats, leftover: list[str]
) -> list[Check]:
    """Compare what each subscriber received with the feed's log of what it published."""
    topic, seq, price = feed["topic"], feed["seq"], feed["price"]
    n = len(topic)
    published = list(_per_topic(topic, seq))
    checks = [
        Check(
            all(np.array_equal(s, np.arange(1, len(s) + 1)) for s in published),
            f"feed: {n:,} ticks published, seq 1, 2, 3, ... on each of {len(TOPICS)} topics",
        )
    ]

    w = subs["wildcard"]
    in_order = all(
        np.array_equal(a, b) for a, b in zip(_per_topic(w["topic"], w["seq"]), published, strict=True)
    )
    checks.append(
        Check(
            in_order and len(w["seq"]) == n,
            f"wildcard: got {len(w['seq']):,} of {n:,} ticks, each exactly once and in order on every topic",
        )
    )
    checks.append(
        Check(
            w["bad"] == 0 and w["checked"] == n,
            f"wildcard: {w['checked']:,} payloads decoded as ticks matching their topic and price header "
            f"({w['bad']} did not)",
        )
    )

    f = subs["filtered"]
    wanted = (price > 100) & (topic // len(SYMBOLS) == VENUES.index("XNAS"))
    expected = list(_per_topic(topic[wanted], seq[wanted]))
    exact = all(np.array_equal(a, b) for a, b in zip(_per_topic(f["topic"], f["seq"]), expected, strict=True))
    checks.append(
        Check(
            exact and len(f["seq"]) == int(wanted.sum()),
            f"filtered: got {len(f['seq']):,} ticks = exactly the {int(wanted.sum()):,} with {FILTER}, "
            "in order",
        )
    )
    checks.append(
        Check(
            f["stats"].filtered == n - int(wanted.sum()),
            f"filtered: the router's filter rejected {f['stats'].filtered:,} = {n:,} - {int(wanted.sum()):,}",
        )
    )

    c = subs["conflating"]
    got = list(_per_topic(c["topic"], c["seq"]))
    last_ok = all(len(p) == 0 or (len(g) > 0 and g[-1] == p[-1]) for g, p in zip(got, published, strict=True))
    ordered = all(bool(np.all(np.diff(g) > 0)) for g in got)
    cs = c["stats"]
    checks.append(
        Check(
            last_ok and ordered,
            f"conflating: ends with the last tick of each of {len(TOPICS)} topics; never out of order",
        )
    )
    checks.append(
        Check(
            cs.delivered + cs.drops == n and cs.delivered == len(c["seq"]) and cs.pending == 0,
            f"conflating: {cs.delivered:,} delivered + {cs.drops:,} conflated away "
            f"= {cs.delivered + cs.drops:,} of {n:,}",
        )
    )

    group = [name for name in subs if name.startswith("risk#")]
    xnys = topic // len(SYMBOLS) == VENUES.index("XNYS")
    key = (topic << 40) + seq
    got_keys = np.concatenate([(subs[g]["topic"] << 40) + subs[g]["seq"] for g in group])
    shares = " + ".join(f"{len(subs[g]['seq']):,}" for g in group)
    checks.append(
        Check(
            np.array_equal(np.sort(got_keys), np.sort(key[xnys])),
            f"risk group: {int(xnys.sum()):,} XNYS ticks, each to exactly one of {len(group)} workers "
            f"({shares})",
        )
    )
    bad = sum(subs[g]["bad"] for g in group)
    text = f"risk group: every payload matches its topic and price header ({bad} did not)"
    checks.append(Check(bad == 0, text))

    delivered = sum(s["stats"].delivered for s in subs.values())
    checks.append(
        Check(
            totals.messages == n and totals.deliveries == delivered and totals.drops == cs.drops,
            f"bus: routed {totals.messages:,} messages; {totals.deliveries:,} deliveries and "
            f"{totals.drops:,} drops, as the subscribers count them",
        )
    )
    checks.append(
        Check(
            not leftover,
            "cleanup: no segment left in /dev/shm" + (f" (removed {leftover})" if leftover else ""),
        )
    )
    return checks


def _report(
    out: Callable[[str], None],
    feed: dict[str, Any],
    subs: dict[str, dict[str, Any]],
    totals: shmq.BusStats,
    checks: list[Check],
) -> None:
    n, elapsed, pub = len(feed["topic"]), feed["elapsed"], feed["stats"]
    out("")
    out(f"published {n:,} ticks in {elapsed:.2f} s ({n / elapsed:,.0f}/s); publisher stalls {pub.stalls}")
    out("")
    out("one-way latency, publish -> received by the subscriber's Python code, microseconds")
    out(f"{'subscriber':12} {'received':>9} {'drops':>7} " + " ".join(f"{c:>8}" for c in PERCENTILE_COLUMNS))
    for name, result in subs.items():
        lat = result["latency_ns"] / 1000.0
        if len(lat):
            p50, p90, p99, p999 = np.percentile(lat, [50, 90, 99, 99.9])
            cols = f"{p50:8.1f} {p90:8.1f} {p99:8.1f} {p999:8.1f} {lat.max():8.1f}"
        else:
            cols = f"{'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>8}"
        out(f"{name:12} {len(lat):9,} {result['stats'].drops:7,} {cols}")
    processes, cpus = len(SUBSCRIBERS) + 3, os.cpu_count() or 1
    out("(between bursts the router and the subscribers sleep (wait='adaptive'): a tick pays for waking")
    out(f" them, and {processes} processes share {cpus} CPUs; conflating: the age of the newest tick read)")
    out("")
    out(
        f"bus totals (shmq.bus_stats): {totals.messages:,} messages ({totals.bytes / 1e6:.1f} MB), "
        f"{totals.deliveries:,} deliveries, {totals.drops:,} drops,"
    )
    out(f"  {totals.stalls:,} stalls (back-pressure), the router went to sleep {totals.sleeps:,} times")
    out("")
    out("checks")
    for c in checks:
        out(f"  {'ok  ' if c.ok else 'FAIL'} {c.text}")
    failed = sum(not c.ok for c in checks)
    out(f"all {len(checks)} checks passed" if not failed else f"{failed} of {len(checks)} checks FAILED")


# -- the queue demo (--queue) ----------------------------------------------------------------------

MESSAGE = b"x" * 64
CTX = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p99: float
    p999: float
    max: float

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Percentiles:
        s = sorted(samples_ns)
        n = len(s)

        def at(q: float) -> float:
            return s[min(n - 1, int(q * n))] / 1000.0

        return cls(at(0.50), at(0.99), at(0.999), s[-1] / 1000.0)


def _shmq_echo(request: str, reply: str, wait: str, count: int) -> None:
    requests = shmq.Queue(request, wait=wait)  # type: ignore[arg-type]
    replies = shmq.Queue(reply, wait=wait)  # type: ignore[arg-type]
    get, put = requests.get, replies.put
    for _ in range(count):
        put(get(timeout=30))
    requests.close()
    replies.close()


def _mp_echo(request: Any, reply: Any, count: int) -> None:
    for _ in range(count):
        reply.put(request.get(timeout=30))


def _time_round_trips(
    put: Callable[[bytes], None], get: Callable[[], Any], warmup: int, rounds: int
) -> Percentiles:
    for _ in range(warmup):
        put(MESSAGE)
        get()
    now = time.perf_counter_ns
    samples = [0] * rounds
    gc.disable()
    try:
        for i in range(rounds):
            t0 = now()
            put(MESSAGE)
            get()
            samples[i] = now() - t0
    finally:
        gc.enable()
    return Percentiles.of(samples)


def shmq_ping_pong(wait: str, rounds: int, warmup: int = 2000) -> Percentiles:
    request, reply = unique_name("demo"), unique_name("demo")
    with (
        shmq.Queue(request, create=True, kind="spsc", wait=wait) as out,  # type: ignore[arg-type]
        shmq.Queue(reply, create=True, kind="spsc", wait=wait) as back,  # type: ignore[arg-type]
    ):
        child = CTX.Process(target=_shmq_echo, args=(request, reply, wait, warmup + rounds))
        child.start()
        try:
            get = back.get
            result = _time_round_trips(out.put, lambda: get(timeout=30), warmup, rounds)
        finally:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    return result


def mp_queue_ping_pong(rounds: int, warmup: int = 500) -> Percentiles:
    out: multiprocessing.queues.Queue[bytes] = CTX.Queue()
    back: multiprocessing.queues.Queue[bytes] = CTX.Queue()
    child = CTX.Process(target=_mp_echo, args=(out, back, warmup + rounds))
    child.start()
    try:
        return _time_round_trips(out.put, lambda: back.get(timeout=30), warmup, rounds)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def _shmq_drain(name: str, count: int, batch: bool) -> None:
    q = shmq.Queue(name)
    got = 0
    if batch:
        while got < count:
            got += len(q.get_many(4096, timeout=30))
    else:
        get = q.get
        for _ in range(count):
            get(timeout=30)
    q.close()


def _mp_drain(q: Any, count: int) -> None:
    for _ in range(count):
        q.get(timeout=30)


def shmq_throughput(count: int, batch: bool) -> float:
    name = unique_name("demo")
    with shmq.Queue(name, create=True, kind="spsc", capacity=1 << 22) as q:
        child = CTX.Process(target=_shmq_drain, args=(name, count, batch))
        child.start()
        q.put(MESSAGE)  # wait for the consumer to attach and start
        while q.qsize():
            time.sleep(0.001)
        count -= 1
        t0 = time.perf_counter()
        if batch:
            chunk = [MESSAGE] * 1024
            sent = 0
            while sent < count:
                sent += q.put_many(chunk[: count - sent], timeout=30)
        else:
            put = q.put
            for _ in range(count):
                put(MESSAGE)
        child.join(timeout=60)
        elapsed = time.perf_counter() - t0
    return count / elapsed


def mp_queue_throughput(count: int) -> float:
    q: multiprocessing.queues.Queue[bytes] = CTX.Queue()
    child = CTX.Process(target=_mp_drain, args=(q, count))
    child.start()
    t0 = time.perf_counter()
    for _ in range(count):
        q.put(MESSAGE)
    child.join(timeout=120)
    return count / (time.perf_counter() - t0)


def run_queue_demo(rounds: int = 50_000, messages: int = 1_000_000) -> int:
    """The queue demo: ping-pong latency and one-way throughput, beside multiprocessing.Queue."""
    python = sys.version.split()[0]
    print(f"shmq {shmq.__version__} queue demo: 64-byte messages between two processes (Python {python})")
    print()
    print("Round trip (parent -> child -> parent), microseconds")
    print(f"{'':34} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>9}")
    rows: list[tuple[str, Percentiles]] = [
        ("shmq spsc, wait=spin (2 spinning)", shmq_ping_pong("spin", rounds)),
        ("shmq spsc, wait=adaptive", shmq_ping_pong("adaptive", rounds)),
        ("shmq spsc, wait=block", shmq_ping_pong("block", max(1000, rounds // 10))),
        ("multiprocessing.Queue", mp_queue_ping_pong(max(1000, rounds // 10))),
    ]
    for label, p in rows:
        print(f"{label:34} {p.p50:8.2f} {p.p99:8.2f} {p.p999:8.2f} {p.max:9.1f}")
    base = rows[-1][1].p50
    print(f"-> shmq adaptive p50 is {base / rows[1][1].p50:,.0f}x faster than multiprocessing.Queue")
    print()
    print("One-way throughput, messages per second")
    single = shmq_throughput(messages, batch=False)
    batched = shmq_throughput(messages * 5, batch=True)
    mpq = mp_queue_throughput(max(10_000, messages // 10))
    print(f"{'shmq put/get (one per call)':34} {single:14,.0f}   {single / mpq:6.1f}x multiprocessing.Queue")
    print(f"{'shmq put_many/get_many':34} {batched:14,.0f}   {batched / mpq:6.1f}x multiprocessing.Queue")
    print(f"{'multiprocessing.Queue':34} {mpq:14,.0f}")
    print()
    print("Every peer, every size: .venv/bin/python benchmarks/bench_queue.py")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shmq demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the feed publishes")
    parser.add_argument("--rate", type=int, default=20_000, help="ticks per second the feed publishes")
    parser.add_argument("--seed", type=int, default=1, help="seed of the feed's random prices")
    parser.add_argument("--queue", action="store_true", help="run the queue demo instead")
    parser.add_argument("--rounds", type=int, help="queue demo: ping-pong round trips per row (50,000)")
    parser.add_argument("--messages", type=int, help="queue demo: messages per throughput row (1,000,000)")
    args = parser.parse_args(argv)
    if args.queue:
        return run_queue_demo(
            50_000 if args.rounds is None else args.rounds,
            1_000_000 if args.messages is None else args.messages,
        )
    if args.rounds is not None or args.messages is not None:
        note = "shmq demo: --rounds and --messages belong to the queue demo (--queue); ignored"
        print(note, file=sys.stderr)
    try:
        _tick_count(args.seconds, args.rate)
    except ValueError as exc:
        parser.error(str(exc))

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM (a CI timeout, kill): clean up as for Ctrl-C

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        result = run_market_demo(args.seconds, args.rate, seed=args.seed)
    except KeyboardInterrupt:
        print("\ninterrupted: every demo process stopped and its segments removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
