"""How long a ring stays stopped after a process dies holding a claim (docs/ARCHITECTURE.md,
"Dead processes"), and what claim tracking costs on the hot path.

1. A producer is SIGKILLed inside put_view() on an mpmc ring, with a message deferred behind its
   claim: time until a waiting get() returns that message.
2. A consumer is SIGKILLed inside get_view(): time until a producer that needs the space it holds
   (through put/get rounds on a 4 KiB ring) gets past it.

What tracking claims costs on the hot path is bench_queue.py's `rtt_spin_mpmc` row (see
benchmarks/README.md).

Nothing spins in 1 and 2 (wait="block"): the waiter sleeps and looks for a dead claim once per
half recovery interval. Run: .venv/bin/python benchmarks/bench_recovery.py [--rounds N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import shmq
from shmq._native import _ring
from tests import _recovery_workers as rw

CTX = mp.get_context("spawn")


def _wait_file(path: str) -> None:
    end = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.001)


def dead_producer(name: str, tmp: str) -> float:
    q = shmq.Queue(name, create=True, kind="mpmc", capacity=4096, wait="block")
    try:
        marker, release = f"{tmp}/p.m", f"{tmp}/p.r"
        holder = CTX.Process(target=rw.hold_put_view_until, args=(name, b"x", marker, release))
        holder.start()
        _wait_file(marker)
        q.put(b"behind", timeout=0)  # deferred behind the claim
        holder.kill()
        holder.join()
        t0 = time.monotonic()
        assert q.get(timeout=10) == b"behind"
        return time.monotonic() - t0
    finally:
        q.close()
        q.unlink()


def dead_consumer(name: str, tmp: str) -> float:
    q = shmq.Queue(name, create=True, kind="mpmc", capacity=4096, wait="block")
    try:
        q.put(b"leased", timeout=1)
        marker = f"{tmp}/c.m"
        holder = CTX.Process(target=rw.views_in_threads, args=(name, "get", [(None, marker)]))
        holder.start()
        _wait_file(marker)
        holder.kill()
        holder.join()
        t0 = time.monotonic()
        for _ in range(20):  # 10 KB through 4 KiB: the released space behind the lease is needed
            q.put(bytes(500), timeout=10)
            q.get(timeout=10)
        return time.monotonic() - t0
    finally:
        q.close()
        q.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    interval_ms = _ring.RECOVER_AFTER_NS / 1e6
    rows: dict[str, list[float]] = {"dead producer (put_view)": [], "dead consumer (get_view)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            name = f"bench-recovery-{os.getpid()}-{i}"
            for f in (f"{tmp}/p.m", f"{tmp}/c.m"):
                if os.path.exists(f):
                    os.unlink(f)
            rows["dead producer (put_view)"].append(dead_producer(name, tmp))
            rows["dead consumer (get_view)"].append(dead_consumer(name, tmp))
    print(f"shmq recovery after a SIGKILL mid-claim, {args.rounds} rounds")
    print(f"(recovery interval {interval_ms:.0f} ms; nothing spins: every waiter blocks)")
    print("| case | median | max |")
    print("|---|---:|---:|")
    for label, times in rows.items():
        print(f"| {label} | {statistics.median(times) * 1000:.0f} ms | {max(times) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
