"""Market data on a bus: a feed, a filtering strategy and a late-joining price board.

    python examples/market_data/run.py [--seconds 2] [--rate 5000]

* A router (``shmq.Router``) runs in a child process for the whole example.
* The **feed** (a process) publishes ticks, 32-byte rows of a numpy structured array, on
  ``md.<venue>.<symbol>``, each with the headers ``venue``, ``symbol`` and ``price``.
* The **strategy** (a process) subscribes to ``md.>`` with
  ``where="symbol in ('AAPL', 'MSFT')"``: the router evaluates the filter, so the
  strategy never sees the other symbols. It decodes each batch of ticks with
  ``numpy.frombuffer`` and keeps a fast and a slow moving average of each symbol's mid,
  counting crossovers (its "signals").
* The **board** (this process) joins half-way with ``last_value=True``: the router first hands
  it the newest tick of every topic it has seen (a snapshot), then the live ticks.
  ``on_full="conflate"`` keeps it current if it falls behind: only the newest tick per topic
  waits.

At the end the example prints the board and checks the strategy and the board against the
feed's own log; exit status 0 if both agree.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from multiprocessing.synchronize import Event

import numpy as np

import shmq
from shmq.testing import unique_name

VENUES = ("XNAS", "XNYS")
SYMBOLS = {"AAPL": 189.25, "MSFT": 412.10, "NVDA": 121.40, "AMZN": 178.05, "KO": 61.35, "F": 12.20}
TOPICS = [f"md.{venue}.{symbol}" for venue in VENUES for symbol in SYMBOLS]
TICK = np.dtype([("bid", "<f8"), ("ask", "<f8"), ("bid_size", "<u4"), ("ask_size", "<u4"), ("ts", "<i8")])
WATCH = ("AAPL", "MSFT")
WHERE = f"symbol in {WATCH!r}"  # symbol in ('AAPL', 'MSFT')
CTX = multiprocessing.get_context("spawn")


def feed(bus: str, report: shmq.Queue, go: Event, seconds: float, rate: int) -> None:
    """Publish `rate` ticks/s (a burst every 10 ms) for `seconds`; report what was published."""
    rng = np.random.default_rng(7)
    mids = {topic: SYMBOLS[topic.split(".")[2]] for topic in TOPICS}
    per_burst = max(1, rate // 100)
    published: dict[str, list[float]] = {topic: [] for topic in TOPICS}
    with shmq.Publisher(bus) as pub:
        report.put_obj("ready")
        go.wait(60)
        start = time.monotonic()
        for burst in range(round(seconds * 100)):
            time.sleep(max(0.0, start + burst / 100 - time.monotonic()))
            ticks = np.zeros(per_burst, TICK)
            topics = [str(t) for t in rng.choice(TOPICS, per_burst)]
            for i, topic in enumerate(topics):
                mids[topic] = round(mids[topic] + rng.choice([-0.01, 0.0, 0.01]), 2)
                ticks[i] = (mids[topic] - 0.01, mids[topic] + 0.01, 100, 200, time.time_ns())
            for tick, topic in zip(ticks, topics, strict=True):
                price = float(tick["bid"] + tick["ask"]) / 2
                _, venue, symbol = topic.split(".")
                pub.publish(topic, tick.tobytes(), {"venue": venue, "symbol": symbol, "price": price})
                published[topic].append(price)
        pub.flush(10)
    report.put_obj(("feed", published))


def strategy(bus: str, report: shmq.Queue, stop: Event) -> None:
    """Moving-average crossovers on the watched symbols; reports the prices it saw, per topic."""
    fast: dict[str, float] = {}
    slow: dict[str, float] = {}
    above: dict[str, bool] = {}
    signals = 0
    seen: dict[str, list[float]] = {}
    with shmq.Subscriber(bus, "md.>", where=WHERE) as sub:
        report.put_obj("ready")
        while True:
            batch = sub.recv_many(1024, timeout=0.1)
            if not batch:
                if stop.is_set() and sub.stats().lag == 0:  # the feed is done and we have it all
                    break
                continue
            ticks = np.frombuffer(b"".join(m.data for m in batch), TICK)  # one decode per batch
            for msg, mid in zip(batch, (ticks["bid"] + ticks["ask"]) / 2, strict=True):
                symbol = msg.topic.rsplit(".", 1)[1]
                fast[symbol] = 0.3 * mid + 0.7 * fast.get(symbol, mid)
                slow[symbol] = 0.05 * mid + 0.95 * slow.get(symbol, mid)
                now_above = fast[symbol] > slow[symbol]
                signals += symbol in above and now_above != above[symbol]
                above[symbol] = now_above
                seen.setdefault(msg.topic, []).append(float(mid))
    report.put_obj(("strategy", seen, signals))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="how long the feed publishes")
    parser.add_argument("--rate", type=int, default=5000, help="ticks per second")
    args = parser.parse_args()

    bus = unique_name("md")
    go, stop = CTX.Event(), CTX.Event()
    with (
        shmq.Router(bus),
        shmq.Queue(unique_name("md-report"), create=True, kind="mpsc", capacity=1 << 24) as report,
    ):
        processes = [
            CTX.Process(target=feed, args=(bus, report, go, args.seconds, args.rate), name="feed"),
            CTX.Process(target=strategy, args=(bus, report, stop), name="strategy"),
        ]
        for p in processes:
            p.start()
        try:
            for _ in processes:
                assert report.get_obj(timeout=60) == "ready"
            go.set()
            print(
                f"feed: {len(TOPICS)} topics md.<venue>.<symbol>, {args.rate:,} ticks/s, {args.seconds:g} s"
            )
            time.sleep(args.seconds / 2)

            # The board joins late: the router first replays the newest tick of every topic.
            with shmq.Subscriber(bus, "md.>", last_value=True, on_full="conflate", capacity=4096) as board:
                t0 = time.monotonic()
                snapshot = board.recv_many(len(TOPICS), timeout=5)
                took_ms = (time.monotonic() - t0) * 1e3
                replayed = sum(m.last_value for m in snapshot)
                print(
                    f"board joined late: snapshot of {replayed} topics in {took_ms:.2f} ms (last_value=True)"
                )
                latest = {m.topic: float(m.headers["price"]) for m in snapshot}
                reports = {}
                while "feed" not in reports:  # live updates until the feed is done
                    for msg in board.recv_many(1024, timeout=0.05):
                        latest[msg.topic] = float(msg.headers["price"])
                    if not report.empty():
                        kind, *payload = report.get_obj()
                        reports[kind] = payload
                stop.set()
                while True:  # what is still queued or conflated for the board
                    batch = board.recv_many(1024, timeout=0.1)
                    for msg in batch:
                        latest[msg.topic] = float(msg.headers["price"])
                    if not batch and board.stats().lag == 0:
                        break
                drops = board.stats().drops
            kind, *payload = report.get_obj(timeout=60)
            reports[kind] = payload
        finally:
            stop.set()
            for p in processes:
                p.join(30)
                if p.is_alive():
                    p.kill()

    (published,) = reports["feed"]
    seen, signals = reports["strategy"]
    watched = {t: prices for t, prices in published.items() if t.split(".")[2] in WATCH and prices}
    strategy_ok = seen == watched
    board_ok = latest == {t: prices[-1] for t, prices in published.items() if prices}
    count = sum(len(v) for v in seen.values())
    print(f"strategy ({WHERE}): {count:,} ticks, {signals} crossover signals")
    print("board (last price per venue):")
    for symbol in SYMBOLS:
        cells = "  ".join(f"{v} {latest.get(f'md.{v}.{symbol}', float('nan')):8.2f}" for v in VENUES)
        print(f"  {symbol:5} {cells}")
    print(f"  ({drops:,} updates conflated away while it was busy)")
    print(f"strategy saw exactly the {WATCH} ticks, in order: {'yes' if strategy_ok else 'NO'}")
    print(f"board ends on the feed's last price of every topic: {'yes' if board_ok else 'NO'}")
    return 0 if strategy_ok and board_ok else 1


if __name__ == "__main__":
    sys.exit(main())
