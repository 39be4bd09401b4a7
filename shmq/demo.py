"""The main job (``scripts/demo``): two processes, shmq beside multiprocessing.Queue.

1. Ping-pong: the parent sends a 64-byte message, a child process echoes it
   back; each round trip is timed with ``time.perf_counter_ns``. Printed as
   p50 / p99 / p99.9 / max in microseconds.
2. One-way throughput: a child process consumes as fast as it can while the
   parent produces 64-byte messages, one per call and in batches.

With ``wait="spin"`` both processes busy-poll, so on a 2-core machine the two
spinning processes own both cores; ``adaptive`` spins ~50 µs then sleeps;
``block`` always sleeps in the kernel. The full comparison against every peer
is ``benchmarks/bench_queue.py``.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import multiprocessing.queues
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import shmq
from shmq.testing import unique_name

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=50_000, help="ping-pong round trips per row")
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages per throughput row")
    args = parser.parse_args(argv)
    rounds, messages = args.rounds, args.messages

    python = sys.version.split()[0]
    print(f"shmq {shmq.__version__} demo: 64-byte messages between two processes (Python {python})")
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


if __name__ == "__main__":
    raise SystemExit(main())
