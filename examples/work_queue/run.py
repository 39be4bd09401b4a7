"""A work queue on a bus: a queue group of workers shares jobs, and killing a worker loses nothing.

    python examples/work_queue/run.py [--jobs 2000] [--workers 3] [--job-ms 1.0]

* The dispatcher (this process) publishes numbered jobs on ``jobs.resize``.
* Each worker (a process) subscribes to ``jobs.>`` with ``group="workers"``: each job goes to
  exactly one member. Their rings are small (4 KiB, a few dozen jobs), so the router passes over
  a busy worker and work goes where there is room. A worker publishes one result per job on
  ``results.<worker>``; the dispatcher subscribes to ``results.>``.
* Part way through, worker 1 hangs (SIGSTOP). The router stops giving it jobs once its ring is
  full; then the dispatcher kills it (SIGKILL). The router sees the death at once (its control
  socket closes) and hands every job still queued in the dead worker's ring to the others.
* The job the worker had in its hands when it hung (taken, not finished) is not in any ring, so
  the router cannot redeliver it: the dispatcher re-publishes jobs whose result is missing once
  everything else is done. The run ends with every job done exactly once.

Exit status 0 if every job has exactly one result, 1 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import struct
import sys
import time
from collections import Counter
from multiprocessing.synchronize import Event

import shmq
from shmq.testing import list_segments, segment_exists, unique_name

JOB = struct.Struct("<qd")  # job id, work in seconds
RESULT = struct.Struct("<qqq")  # job id, worker number, pid
CTX = multiprocessing.get_context("spawn")


def worker(bus: str, number: int, stop: Event) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the dispatcher's business
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with (
        shmq.Subscriber(bus, "jobs.>", group="workers", capacity=4096) as jobs,
        shmq.Publisher(bus) as results,
    ):
        while not stop.is_set():
            try:
                msg = jobs.recv(timeout=0.1)
            except shmq.Empty:
                continue
            job, work_s = JOB.unpack(msg.data)
            time.sleep(work_s)  # the work
            results.publish(f"results.w{number}", RESULT.pack(job, number, os.getpid()))


def receive_results(
    sub: shmq.Subscriber,
    done: Counter[int],
    by_worker: Counter[int],
    quiet_s: float,
    until: int | None = None,
) -> None:
    """Take results until `until` jobs are done, or none has come for `quiet_s` seconds."""
    last = time.monotonic()
    while time.monotonic() - last < quiet_s and (until is None or len(done) < until):
        for msg in sub.recv_many(256, timeout=0.05):
            job, number, _ = RESULT.unpack(msg.data)
            done[job] += 1
            by_worker[number] += 1
            last = time.monotonic()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--job-ms", type=float, default=1.0, help="how long one job takes")
    args = parser.parse_args()
    if args.workers < 2 or args.jobs < 100:
        parser.error("this example needs at least 2 workers and 100 jobs")

    bus = unique_name("work")
    stop = CTX.Event()
    workers = [CTX.Process(target=worker, args=(bus, n, stop)) for n in range(1, args.workers + 1)]
    victim = workers[0]
    done: Counter[int] = Counter()
    by_worker: Counter[int] = Counter()
    with shmq.Router(bus):
        try:
            with shmq.Subscriber(bus, "results.>") as results, shmq.Publisher(bus) as dispatcher:
                for w in workers:
                    w.start()
                while sum(s.group == "workers" for s in shmq.bus_stats(bus).subscribers) < args.workers:
                    time.sleep(0.01)  # every worker has joined the group
                print(f"work queue: {args.workers} workers in group 'workers' on jobs.>, {args.jobs:,} jobs")
                for job in range(args.jobs):
                    dispatcher.publish("jobs.resize", JOB.pack(job, args.job_ms / 1000), timeout=30)

                # Worker 1 hangs part way through.
                receive_results(results, done, by_worker, quiet_s=10.0, until=args.jobs // 5)
                assert victim.pid is not None
                os.kill(victim.pid, signal.SIGSTOP)
                print(f"worker 1 (pid {victim.pid}) hangs (SIGSTOP) after {sum(done.values()):,} results")
                ring, queued = wait_until_full(bus, victim.pid)
                print(f"  its ring holds {queued} jobs nobody else can take while it lives")

                os.kill(victim.pid, signal.SIGKILL)
                victim.join(10)
                print(f"killed worker 1 (SIGKILL): the router hands its {queued} queued jobs to the others")
                receive_results(results, done, by_worker, quiet_s=1.0)
                missing = [job for job in range(args.jobs) if job not in done]
                print(
                    f"{len(missing)} job(s) missing after that: what worker 1 had in its hands; re-published"
                )
                for job in missing:
                    dispatcher.publish("jobs.resize", JOB.pack(job, args.job_ms / 1000), timeout=30)
                receive_results(results, done, by_worker, quiet_s=1.0)
                ring_removed = wait_gone(ring, timeout=5.0)
        finally:
            stop.set()
            for w in workers:
                if w.is_alive() and w is not victim:
                    w.join(10)
                if w.is_alive():
                    w.kill()
                    w.join(5)

    shares = ", ".join(f"worker {n}: {by_worker[n]:,}" for n in sorted(by_worker))
    exactly_once = len(done) == args.jobs and all(count == 1 for count in done.values())
    duplicates = sum(count - 1 for count in done.values())
    print(f"results: {len(done):,} of {args.jobs:,} jobs done, {duplicates} twice ({shares})")
    print(
        f"the dead worker's ring {'was drained and removed' if ring_removed else 'is STILL THERE'} (router)"
    )
    leftover = list_segments(f"bus.{bus}")
    ok = exactly_once and queued > 0 and len(missing) <= 1 and ring_removed and not leftover
    if leftover:
        print(f"segments left behind: {leftover}", file=sys.stderr)
    print("ok: every job done exactly once, nothing lost with the killed worker" if ok else "FAILED")
    return 0 if ok else 1


def wait_until_full(bus: str, pid: int) -> tuple[str, int]:
    """Wait until the router stops delivering to the hung worker; (its ring, jobs queued in it)."""
    last = -1
    while True:
        (stats,) = [s for s in shmq.bus_stats(bus).subscribers if s.pid == pid]
        if stats.delivered == last:
            return stats.ring, stats.depth_messages
        last = stats.delivered
        time.sleep(0.3)  # > the router's 100 ms housekeeping, which refreshes depth_messages


def wait_gone(ring: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while segment_exists(ring):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


if __name__ == "__main__":
    sys.exit(main())
