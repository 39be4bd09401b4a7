"""Stateful model test: a Queue of each kind against a pure-Python model of the ring.

The model keeps the FIFO of messages (a deque) and the ring geometry: tail and head positions
and, per queued frame, where it ends. A put of n bytes needs frame_size(n) bytes, preceded by a
PAD frame up to the end of the data area when the frame would not fit before it; it fits if
tail_after - head <= capacity. An abandoned put_view leaves its bytes in the ring as PAD until
a reader walks over them. So the model predicts exactly when Full and Empty happen, what
qsize/empty/full/stats say, and where the cursors stand.

A read takes every committed message up to max_messages (get_many keeps reading while messages
are there, whatever the kind), and frees any abandoned frames it walks over on the way.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import shmq
from shmq._native import _ring
from shmq._segment import segment_path
from shmq.testing import remove_segment, unique_name

pytestmark = pytest.mark.timeout(60)

KINDS = ["spsc", "mpsc", "mpmc"]
CURSORS = (_ring.OFF_TAIL_CLAIM, _ring.OFF_TAIL_COMMIT, _ring.OFF_HEAD_CLAIM, _ring.OFF_HEAD_RELEASE)
SETTINGS = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def frame_size(n: int) -> int:
    return (8 + n + 7) & ~7


@dataclass
class Entry:
    """One claim in the ring: a message, or an abandoned put_view (payload None)."""

    payload: bytes | None
    end: int  #: position right after the frame (any PAD before it belongs to this entry)


@dataclass
class RingModel:
    capacity: int
    tail: int
    head: int
    entries: deque[Entry] = field(default_factory=deque)
    put_count: int = 0
    put_bytes: int = 0
    get_count: int = 0
    get_bytes: int = 0

    @property
    def max_message(self) -> int:
        return self.capacity // 2 - 8

    @property
    def messages(self) -> list[bytes]:
        return [e.payload for e in self.entries if e.payload is not None]

    def end_after(self, tail: int, n: int) -> int:
        """Where a frame of n payload bytes claimed at `tail` ends, PAD included."""
        off = tail % self.capacity
        if off + frame_size(n) > self.capacity:
            tail += self.capacity - off
        return tail + frame_size(n)

    def fits(self, n: int) -> bool:
        return self.end_after(self.tail, n) - self.head <= self.capacity

    def put(self, payload: bytes | None, n: int) -> None:
        self.tail = self.end_after(self.tail, n)
        self.entries.append(Entry(payload, self.tail))
        if payload is not None:
            self.put_count += 1
            self.put_bytes += n

    def take(self, max_messages: int) -> list[bytes]:
        """What one read of up to max_messages returns (shmq_read, walk, release)."""
        while True:
            limit = self.tail
            if self.head == limit:
                return []
            out: list[bytes] = []
            while self.head != limit and len(out) < max_messages:
                entry = self.entries.popleft()
                self.head = entry.end
                if entry.payload is not None:
                    out.append(entry.payload)
            if out:
                self.get_count += len(out)
                self.get_bytes += sum(map(len, out))
                return out
            # only abandoned frames: they were freed, look again


class Abandon(Exception):
    """Raised inside a put_view block to abandon it."""


def sizes(max_message: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, 7, 8, 9, max_message - 8, max_message - 1, max_message]),
        st.integers(0, max_message),
    )


class QueueMachine(RuleBasedStateMachine):
    """Drives one Queue and the model with the same operations."""

    kind = "mpmc"

    def __init__(self) -> None:
        super().__init__()
        self.name = unique_name()
        self.q: shmq.Queue | None = None
        self.model: RingModel | None = None
        self.serial = 0

    # -- set-up: a ring of a small capacity, empty at an arbitrary position ----

    @initialize(
        capacity=st.sampled_from([64, 256, 1024]),
        start=st.one_of(
            st.sampled_from([0, 2**32 - 512, 2**63 - 1024]),
            st.integers(0, 2**40).map(lambda x: x * 8),
        ),
    )
    def create(self, capacity: int, start: int) -> None:
        shmq.Queue(self.name, create=True, kind=self.kind, capacity=capacity).close()  # type: ignore[arg-type]
        fd = os.open(segment_path(self.name), os.O_RDWR)
        try:
            for off in CURSORS:
                os.pwrite(fd, struct.pack("<Q", start), off)
        finally:
            os.close(fd)
        self.q = shmq.Queue(self.name)
        self.model = RingModel(capacity, start, start)

    def teardown(self) -> None:
        if self.q is not None:
            self.q.close()
        remove_segment(self.name)

    # -- helpers ------------------------------------------------------------

    @property
    def queue(self) -> shmq.Queue:
        assert self.q is not None
        return self.q

    @property
    def ring(self) -> RingModel:
        assert self.model is not None
        return self.model

    def payload(self, n: int) -> bytes:
        self.serial += 1
        return (self.serial.to_bytes(4, "little") * (n // 4 + 1))[:n]

    # -- producers ----------------------------------------------------------

    @rule(data=st.data())
    def put_nowait(self, data: st.DataObject) -> None:
        n = data.draw(sizes(self.ring.max_message), label="size")
        payload = self.payload(n)
        if self.ring.fits(n):
            self.queue.put_nowait(payload)
            self.ring.put(payload, n)
        else:
            event("put_nowait: Full")
            with pytest.raises(shmq.Full):
                self.queue.put_nowait(payload)

    @rule(data=st.data())
    def put_with_timeout_zero(self, data: st.DataObject) -> None:
        n = data.draw(sizes(self.ring.max_message), label="size")
        payload = bytearray(self.payload(n))
        if self.ring.fits(n):
            self.queue.put(payload, timeout=0)
            self.ring.put(bytes(payload), n)
        else:
            with pytest.raises(shmq.Full):
                self.queue.put(payload, timeout=0)

    @rule(data=st.data())
    def put_many(self, data: st.DataObject) -> None:
        ns = data.draw(st.lists(sizes(self.ring.max_message), max_size=6), label="sizes")
        payloads = [self.payload(n) for n in ns]
        expected = 0
        for p in payloads:
            if not self.ring.fits(len(p)):
                break
            self.ring.put(p, len(p))
            expected += 1
        if expected < len(payloads):
            event("put_many: partial")
        assert self.queue.put_many(payloads, timeout=0) == expected

    @rule(data=st.data(), abandon=st.booleans())
    def put_view(self, data: st.DataObject, abandon: bool) -> None:
        n = data.draw(sizes(self.ring.max_message), label="size")
        payload = self.payload(n)
        if not self.ring.fits(n):
            with pytest.raises(shmq.Full):
                self.queue.put_view(n, timeout=0)
            return
        try:
            with self.queue.put_view(n, timeout=0) as buf:
                assert buf.nbytes == n
                buf[:] = payload
                if abandon:
                    raise Abandon
        except Abandon:
            event("put_view: abandoned")
        self.ring.put(None if abandon else payload, n)

    # -- consumers ----------------------------------------------------------

    @rule()
    def get_nowait(self) -> None:
        expected = self.ring.take(1)
        if expected:
            assert self.queue.get_nowait() == expected[0]
        else:
            with pytest.raises(shmq.Empty):
                self.queue.get_nowait()

    @rule()
    def get_with_timeout_zero(self) -> None:
        expected = self.ring.take(1)
        if expected:
            assert self.queue.get(timeout=0) == expected[0]
        else:
            with pytest.raises(shmq.Empty):
                self.queue.get(timeout=0)

    @rule(max_messages=st.integers(1, 8))
    def get_many(self, max_messages: int) -> None:
        expected = self.ring.take(max_messages)
        assert self.queue.get_many(max_messages=max_messages, timeout=0) == expected

    @rule()
    def get_view(self) -> None:
        expected = self.ring.take(1)
        if not expected:
            with pytest.raises(shmq.Empty):
                self.queue.get_view(timeout=0)
            return
        with self.queue.get_view(timeout=0) as view:
            assert view.readonly
            assert bytes(view) == expected[0]

    @precondition(lambda self: self.model is not None and len(self.model.entries) > 0)
    @rule()
    def drain(self) -> None:
        expected = self.ring.messages
        got: list[bytes] = []
        while batch := self.queue.get_many(max_messages=1024, timeout=0):
            got.extend(batch)
        assert got == expected
        while self.ring.take(1024):
            pass

    # -- what the queue reports ---------------------------------------------

    @invariant()
    def observations_match(self) -> None:
        if self.q is None:
            return
        m = self.ring
        q = self.queue
        assert q.qsize() == len(m.messages)
        if m.messages:
            assert q.empty() is False
        elif m.tail == m.head:
            assert q.empty() is True
        else:
            event("only abandoned frames queued")
        assert q.full() is not m.fits(0)
        if m.tail // m.capacity != m.head // m.capacity:
            event("frames straddle the wrap")
        s = q.stats()
        assert (s.name, s.kind, s.capacity, s.max_message) == (
            self.name,
            self.kind,
            m.capacity,
            m.max_message,
        )
        assert s.depth_messages == len(m.messages)
        assert s.depth_bytes == m.tail - m.head
        assert (s.messages_put, s.bytes_put, s.messages_got, s.bytes_got) == (
            m.put_count,
            m.put_bytes,
            m.get_count,
            m.get_bytes,
        )
        assert (s.put_waits, s.get_waits, s.data_wakes, s.space_wakes) == (0, 0, 0, 0)
        c = q._counters()
        assert c["tail_commit"] == m.tail
        assert c["head_release"] == m.head


def machine_for(kind: str) -> type[QueueMachine]:
    return type(f"QueueMachine_{kind}", (QueueMachine,), {"kind": kind})


@pytest.mark.parametrize("kind", KINDS)
def test_queue_matches_model(kind: str) -> None:
    """Random operation sequences on a small ring: every result, Full and Empty, qsize, empty,
    full, stats and cursor agree with the model."""
    run_state_machine_as_test(machine_for(kind), settings=SETTINGS)


def test_model_predicts_the_pad_rule() -> None:
    """The model itself: a frame that fits in the free bytes but not before the end is refused."""
    m = RingModel(256, 64, 64)
    m.put(bytes(120), 120)  # 64..192
    assert m.fits(56) is True  # frame 64 ends at 256
    assert m.fits(57) is False  # 64 PAD + frame 72 > 128 free
    m.put(None, 8)  # an abandoned frame stays until a reader passes it
    assert m.take(5) == [bytes(120)]
    assert m.head == m.tail
