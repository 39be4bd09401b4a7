"""Deferred commits across real processes: producers that hand their claims over (because an
earlier producer holds a put_view, or was preempted mid-copy) lose nothing, duplicate nothing and
keep their order; the path is really taken (stats().deferred_commits > 0)."""

from __future__ import annotations

import random
import struct
import time
import zlib
from typing import Any

import pytest

import shmq
from shmq.testing import unique_name
from tests.conftest import CTX

pytestmark = pytest.mark.timeout(120)

HEAD = struct.Struct("<IIII")  # producer, sequence, body length, crc32 of the body
PER_PRODUCER = 1500


def body(producer: int, seq: int) -> bytes:
    rng = random.Random(producer * 1_000_003 + seq)
    return rng.randbytes(rng.randrange(0, 200))


def produce(name: str, producer: int, holder: bool, start: Any) -> None:
    """Send PER_PRODUCER numbered messages with put_nowait (retrying on Full). The holder sends
    through put_view and keeps every 25th one open for 2 ms, so the others must hand over."""
    q = shmq.Queue(name)
    start.wait(30)  # a barrier: all producers start sending at the same time
    for seq in range(PER_PRODUCER):
        data = body(producer, seq)
        msg = HEAD.pack(producer, seq, len(data), zlib.crc32(data)) + data
        while True:
            try:
                if holder:
                    with q.put_view(len(msg), timeout=0) as view:
                        view[:] = msg
                        if seq % 25 == 0:
                            time.sleep(0.002)
                else:
                    q.put_nowait(msg)
                break
            except shmq.Full:
                time.sleep(0)
    q.close()


@pytest.mark.parametrize("kind", ["mpsc", "mpmc"])
def test_handed_over_claims_are_delivered_exactly_once_in_order(kind: str) -> None:
    name = unique_name()
    producers = 3
    with shmq.Queue(name, create=True, capacity=4096, kind=kind, wait="block") as q:  # type: ignore[arg-type]
        start = CTX.Barrier(producers)
        procs = [CTX.Process(target=produce, args=(name, p, p == 0, start)) for p in range(producers)]
        try:
            for p in procs:
                p.start()
            next_seq = [0] * producers
            total = producers * PER_PRODUCER
            received = 0
            deadline = time.monotonic() + 90
            while received < total:
                assert time.monotonic() < deadline, f"stalled at {received} of {total}: {next_seq}"
                for msg in q.get_many(256, timeout=1):
                    producer, seq, length, crc = HEAD.unpack_from(msg)
                    data = msg[HEAD.size :]
                    assert len(data) == length and zlib.crc32(data) == crc, (producer, seq)
                    assert data == body(producer, seq), (producer, seq)
                    assert seq == next_seq[producer], (
                        f"producer {producer}: got {seq}, want {next_seq[producer]}"
                    )
                    next_seq[producer] += 1
                    received += 1
            for p in procs:
                p.join(30)
                assert p.exitcode == 0
            assert q.get_many(timeout=0.2) == []  # nothing extra
            stats = q.stats()
            assert stats.messages_got == total == stats.messages_put
            assert stats.deferred_commits > 0, "no claim was handed over: the test did not test it"
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(10)
