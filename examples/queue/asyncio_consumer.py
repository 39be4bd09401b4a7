"""An asyncio service consuming a queue fed by another process.

get_async waits without blocking the event loop (a heartbeat keeps ticking)
and without polling it; a timeout raises shmq.Empty like the blocking get.

    python examples/queue/asyncio_consumer.py
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time

import shmq
from shmq.testing import unique_name

MESSAGES = 50


def feeder(q: shmq.Queue) -> None:
    for i in range(MESSAGES):
        time.sleep(0.002)
        q.put(f"event {i}".encode(), timeout=30)


async def consume(q: shmq.Queue) -> list[bytes]:
    beats = 0

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            await asyncio.sleep(0.005)
            beats += 1

    ticker = asyncio.create_task(heartbeat())
    received = [await q.get_async(timeout=30) for _ in range(MESSAGES)]
    with contextlib.suppress(shmq.Empty):
        await q.get_async(timeout=0.05)
    ticker.cancel()
    print(f"received {len(received)} events; the event loop ticked {beats} times meanwhile")
    return received


def main() -> None:
    with shmq.Queue(unique_name("events"), create=True) as q:
        child = multiprocessing.get_context("spawn").Process(target=feeder, args=(q,))
        child.start()
        received = asyncio.run(consume(q))
        child.join(timeout=30)
    assert received == [f"event {i}".encode() for i in range(MESSAGES)]


if __name__ == "__main__":
    main()
