"""A pipeline of worker processes connected by shmq queues.

A producer puts numbered jobs on an mpmc queue; three workers take jobs, square
the number and put the result on a results queue; the parent collects exactly
one result per job. Drop-in where multiprocessing.Queue was too slow.

    python examples/queue/worker_pipeline.py
"""

from __future__ import annotations

import multiprocessing
import struct

import shmq
from shmq.testing import unique_name

JOBS = 20_000
WORKERS = 3
STOP = b""  # an empty message tells a worker to finish
JOB = struct.Struct("<q")


def worker(jobs: shmq.Queue, results: shmq.Queue) -> None:
    while (job := jobs.get(timeout=30)) != STOP:
        (n,) = JOB.unpack(job)
        results.put(JOB.pack(n * n), timeout=30)


def main() -> None:
    ctx = multiprocessing.get_context("spawn")
    with (
        shmq.Queue(unique_name("jobs"), create=True, kind="mpmc", wait="block") as jobs,
        shmq.Queue(unique_name("results"), create=True, kind="mpsc", wait="block") as results,
    ):
        workers = [ctx.Process(target=worker, args=(jobs, results)) for _ in range(WORKERS)]
        for w in workers:
            w.start()
        jobs.put_many([JOB.pack(n) for n in range(JOBS)], timeout=30)
        jobs.put_many([STOP] * WORKERS, timeout=30)
        total = 0
        for _ in range(JOBS):
            total += JOB.unpack(results.get(timeout=30))[0]
        for w in workers:
            w.join(timeout=30)
        expected = sum(n * n for n in range(JOBS))
        assert total == expected, (total, expected)
        print(f"{JOBS} jobs through {WORKERS} workers: sum of squares {total} (correct)")


if __name__ == "__main__":
    main()
