"""White-box tests of the ring layout around the wrap.

Each test creates a segment, sets the four cursors by hand through a private
mmap of /dev/shm/shmq.<name> (a ring is empty when all four are equal), attaches
a fresh handle (its process-local cursor caches are filled at attach), and then
checks byte by byte where frames, PAD frames and cursors end up. Positions are
u64 byte counters: the tests cross a wrap of the data offset at small positions,
at 2**32 (a u32 truncation would show) and at 2**63 (a signed comparison would show).
"""

from __future__ import annotations

import mmap
import os
import random
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

import shmq
from shmq._native import _ring
from shmq._segment import segment_path

pytestmark = pytest.mark.timeout(60)

KINDS = ["spsc", "mpsc", "mpmc"]
CAP = 256
HDR = _ring.HEADER_SIZE
MSG, PAD, DONE = _ring.FRAME_MSG, _ring.FRAME_PAD, _ring.FRAME_DONE
CURSOR_OFFSETS = {
    "tail_claim": _ring.OFF_TAIL_CLAIM,
    "tail_commit": _ring.OFF_TAIL_COMMIT,
    "head_claim": _ring.OFF_HEAD_CLAIM,
    "head_release": _ring.OFF_HEAD_RELEASE,
}
# Positions where the data offset wraps: a few laps in, at 2**32 and at 2**63.
BASES = {"lap5": 5 * CAP, "2**32": 2**32, "2**63": 2**63}


class Raw:
    """Byte-level access to a segment through this test's own shared mapping."""

    def __init__(self, name: str, capacity: int = CAP) -> None:
        fd = os.open(segment_path(name), os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self.capacity = capacity

    def close(self) -> None:
        self.map.close()

    def u64(self, off: int) -> int:
        return int(struct.unpack_from("<Q", self.map, off)[0])

    def set_u64(self, off: int, value: int) -> None:
        struct.pack_into("<Q", self.map, off, value)

    def cursors(self) -> dict[str, int]:
        return {k: self.u64(off) for k, off in CURSOR_OFFSETS.items()}

    def set_position(self, pos: int) -> None:
        """Make the ring empty at `pos`: all four cursors equal."""
        for off in CURSOR_OFFSETS.values():
            self.set_u64(off, pos)

    def frame(self, pos: int) -> tuple[int, int]:
        """(length, state) of the frame header at position `pos`."""
        length, state = struct.unpack_from("<II", self.map, HDR + pos % self.capacity)
        return int(length), int(state)

    def payload(self, pos: int, n: int) -> bytes:
        off = HDR + pos % self.capacity + 8
        return bytes(self.map[off : off + n])

    def snapshot(self) -> bytes:
        return bytes(self.map[:])


@contextmanager
def ring_at(name: str, kind: str, pos: int, capacity: int = CAP) -> Iterator[tuple[shmq.Queue, Raw]]:
    """An empty queue whose four cursors all sit at `pos`, plus raw access to its segment.

    The segment itself is removed by the `name` fixture."""
    shmq.Queue(name, create=True, kind=kind, capacity=capacity).close()  # type: ignore[arg-type]
    raw = Raw(name, capacity)
    try:
        raw.set_position(pos)
        q = shmq.Queue(name)
        try:
            yield q, raw
        finally:
            q.close()
    finally:
        raw.close()


def fs(n: int) -> int:
    """frame_size, computed independently of the C code."""
    return (8 + n + 7) & ~7


def expect_cursors(raw: Raw, kind: str, start: int, tail: int, head: int) -> None:
    """Cursors as the kind uses them: spsc never moves tail_claim, only mpmc moves head_claim."""
    assert raw.cursors() == {
        "tail_claim": start if kind == "spsc" else tail,
        "tail_commit": tail,
        "head_claim": head if kind == "mpmc" else start,
        "head_release": head,
    }


def consumed(state: int, kind: str) -> int:
    """The state a frame has after a reader is done with it (mpmc readers set DONE)."""
    return state | DONE if kind == "mpmc" else state


def payload_of(n: int, seed: int = 0) -> bytes:
    return bytes((seed * 31 + i * 7 + 1) % 251 for i in range(n))


def put_with(how: str) -> Callable[[shmq.Queue, bytes], None]:
    def put(q: shmq.Queue, data: bytes) -> None:
        if how == "put":
            q.put(data, timeout=1)
        elif how == "put_nowait":
            q.put_nowait(data)
        elif how == "put_many":
            assert q.put_many([data], timeout=1) == 1
        else:
            with q.put_view(len(data), timeout=1) as buf:
                buf[:] = data

    return put


def get_with(how: str) -> Callable[[shmq.Queue], bytes]:
    def get(q: shmq.Queue) -> bytes:
        if how == "get":
            return q.get(timeout=1)
        if how == "get_many":
            got = q.get_many(max_messages=1, timeout=1)
            assert len(got) == 1
            return got[0]
        with q.get_view(timeout=1) as view:
            return bytes(view)

    return get


PUTTERS = ["put", "put_nowait", "put_many", "put_view"]
GETTERS = ["get", "get_many", "get_view"]


def test_frame_size_matches_layout() -> None:
    """frame_size is 8 header bytes plus the payload rounded up to 8."""
    for n in [0, 1, 7, 8, 9, 15, 16, 17, 120, 121, 2**31 - 8]:
        assert _ring.frame_size(n) == fs(n)
    assert [_ring.frame_size(n) for n in (0, 1, 8, 9)] == [8, 16, 16, 24]


@pytest.mark.parametrize("base", BASES.values(), ids=BASES.keys())
@pytest.mark.parametrize("how", PUTTERS)
@pytest.mark.parametrize("kind", KINDS)
def test_message_fits_exactly_to_the_end(name: str, kind: str, how: str, base: int) -> None:
    """A frame ending exactly at the end of the data area needs no PAD; the next starts at 0."""
    start = base - 32
    data = payload_of(24)
    with ring_at(name, kind, start) as (q, raw):
        put_with(how)(q, data)
        assert raw.frame(start) == (24, MSG)
        assert raw.payload(start, 24) == data
        expect_cursors(raw, kind, start, tail=base, head=start)
        assert q.get(timeout=1) == data
        expect_cursors(raw, kind, start, tail=base, head=base)
        assert raw.frame(start) == (24, consumed(MSG, kind))
        put_with(how)(q, b"next")
        assert raw.frame(base) == (4, MSG)  # offset 0
        assert raw.payload(base, 4) == b"next"
        expect_cursors(raw, kind, start, tail=base + 16, head=base)
        assert q.get(timeout=1) == b"next"


@pytest.mark.parametrize("base", BASES.values(), ids=BASES.keys())
@pytest.mark.parametrize("how", PUTTERS)
@pytest.mark.parametrize("kind", KINDS)
def test_pad_frame_fills_the_end(name: str, kind: str, how: str, base: int) -> None:
    """A frame that does not fit before the end leaves a PAD frame there and starts at offset 0."""
    start = base - 16
    data = payload_of(24, seed=3)
    with ring_at(name, kind, start) as (q, raw):
        put_with(how)(q, data)
        assert raw.frame(start) == (16 - 8, PAD)
        assert raw.frame(base) == (24, MSG)
        assert raw.payload(base, 24) == data
        expect_cursors(raw, kind, start, tail=base + fs(24), head=start)
        assert q.qsize() == 1
        assert q.stats().depth_bytes == 16 + fs(24)
        assert q.get(timeout=1) == data
        expect_cursors(raw, kind, start, tail=base + fs(24), head=base + fs(24))
        assert raw.frame(start) == (8, consumed(PAD, kind))
        assert raw.frame(base) == (24, consumed(MSG, kind))


@pytest.mark.parametrize("base", BASES.values(), ids=BASES.keys())
@pytest.mark.parametrize("how", GETTERS)
@pytest.mark.parametrize("kind", KINDS)
def test_getters_skip_the_pad_frame(name: str, kind: str, how: str, base: int) -> None:
    """Every way of reading steps over a PAD frame and frees it together with the message."""
    start = base - 8
    with ring_at(name, kind, start) as (q, raw):
        q.put(b"abcdefghi", timeout=1)  # frame 24 does not fit in the last 8 bytes
        assert raw.frame(start) == (0, PAD)  # the smallest PAD: a bare header
        assert raw.frame(base) == (9, MSG)
        assert get_with(how)(q) == b"abcdefghi"
        expect_cursors(raw, kind, start, tail=base + 24, head=base + 24)
        with pytest.raises(shmq.Empty):
            q.get_nowait()


@pytest.mark.parametrize("base", BASES.values(), ids=BASES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_zero_length_messages_at_the_end(name: str, kind: str, base: int) -> None:
    """A zero-length frame is a bare 8-byte header: it fills the last 8 bytes exactly."""
    start = base - 8
    with ring_at(name, kind, start) as (q, raw):
        q.put(b"", timeout=1)
        assert raw.frame(start) == (0, MSG)
        expect_cursors(raw, kind, start, tail=base, head=start)
        with q.put_view(0, timeout=1) as buf:
            assert buf.nbytes == 0
        assert raw.frame(base) == (0, MSG)
        expect_cursors(raw, kind, start, tail=base + 8, head=start)
        assert q.qsize() == 2
        with q.get_view(timeout=1) as view:
            assert view.nbytes == 0
            assert bytes(view) == b""
        assert q.get_many(timeout=1) == [b""]
        expect_cursors(raw, kind, start, tail=base + 8, head=base + 8)
        assert q.qsize() == 0


@pytest.mark.parametrize("base", BASES.values(), ids=BASES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_put_many_across_the_wrap(name: str, kind: str, base: int) -> None:
    """One batch claim may contain the wrap: the PAD frame sits between two of its messages."""
    start = base - 40
    a, b, c = payload_of(16, 1), payload_of(24, 2), b""
    with ring_at(name, kind, start) as (q, raw):
        assert q.put_many([a, b, c], timeout=1) == 3
        assert raw.frame(start) == (16, MSG)  # offset 216..240
        assert raw.frame(start + 24) == (8, PAD)  # 240..256: b (frame 32) does not fit
        assert raw.frame(base) == (24, MSG)
        assert raw.frame(base + 32) == (0, MSG)
        assert raw.payload(start, 16) == a
        assert raw.payload(base, 24) == b
        expect_cursors(raw, kind, start, tail=base + 40, head=start)
        assert q.get_many(max_messages=10, timeout=1) == [a, b, c]
        expect_cursors(raw, kind, start, tail=base + 40, head=base + 40)


@pytest.mark.parametrize("base", BASES.values(), ids=BASES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_views_are_contiguous_and_in_place(name: str, kind: str, base: int) -> None:
    """put_view/get_view hand out contiguous, 8-byte aligned views of the frame's payload in shared
    memory, right after a PAD frame at the wrap: writes show in the segment, segment writes show
    in the view, and nothing is published before the block ends."""
    start = base - 16
    data = payload_of(24, 5)
    with ring_at(name, kind, start) as (q, raw):
        with q.put_view(24, timeout=1) as buf:
            assert (buf.contiguous, buf.c_contiguous, buf.readonly) == (True, True, False)
            assert (buf.nbytes, buf.format, buf.itemsize, buf.shape) == (24, "B", 1, (24,))
            arr = np.frombuffer(buf, np.uint8)
            assert arr.ctypes.data % 8 == 0
            del arr
            buf[:] = data
            assert raw.payload(base, 24) == data  # written in place
            assert raw.frame(start) == (8, PAD)
            assert raw.frame(base) == (24, MSG)
            claimed = base + fs(24)
            assert raw.cursors()["tail_commit"] == start  # not published yet
            assert raw.cursors()["tail_claim"] == (start if kind == "spsc" else claimed)
            assert q.qsize() == 0
        expect_cursors(raw, kind, start, tail=claimed, head=start)
        with q.get_view(timeout=1) as view:
            assert (view.contiguous, view.c_contiguous, view.readonly) == (True, True, True)
            assert (view.nbytes, view.format) == (24, "B")
            assert bytes(view) == data
            raw.map[HDR + 8] = 0xEE  # first payload byte of the frame at offset 0
            assert view[0] == 0xEE  # the view *is* the shared memory
            assert raw.cursors()["head_release"] == start  # not released yet
        expect_cursors(raw, kind, start, tail=claimed, head=claimed)


@pytest.mark.parametrize("capacity", [64, 256, 4096])
@pytest.mark.parametrize("kind", KINDS)
def test_max_message_fits_an_empty_ring_at_any_offset(name: str, kind: str, capacity: int) -> None:
    """An empty ring accepts a max_message payload wherever its cursors stand."""
    shmq.Queue(name, create=True, kind=kind, capacity=capacity).close()  # type: ignore[arg-type]
    raw = Raw(name, capacity)
    maxm = capacity // 2 - 8
    try:
        offsets = sorted({*range(0, capacity, 8)} if capacity <= 256 else {0, 8, 2040, 2048, 2056, 4088})
        for i, off in enumerate(offsets):
            start = 2**32 + 7 * capacity + off if i % 2 else 2**63 + off
            raw.set_position(start)
            q = shmq.Queue(name)
            try:
                assert q.max_message == maxm
                data = payload_of(maxm, seed=off)
                q.put_nowait(data)
                at = start if off + capacity // 2 <= capacity else start + capacity - off
                if at != start:
                    assert raw.frame(start) == (capacity - off - 8, PAD)
                assert raw.frame(at) == (maxm, MSG)
                expect_cursors(raw, kind, start, tail=at + capacity // 2, head=start)
                assert q.get_nowait() == data
                expect_cursors(raw, kind, start, tail=at + capacity // 2, head=at + capacity // 2)
            finally:
                q.close()
    finally:
        raw.close()


@pytest.mark.parametrize("base", BASES.values(), ids=BASES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_max_message_plus_one_changes_nothing(name: str, kind: str, base: int) -> None:
    """max_message + 1 bytes raises MessageTooLarge from every put path, and not one byte of the
    segment (cursors, counters, frames) changes."""
    start = base - 24
    with ring_at(name, kind, start) as (q, raw):
        q.put(b"first", timeout=1)
        q.put(b"second", timeout=1)  # crosses the wrap
        assert q.get(timeout=1) == b"first"
        before = raw.snapshot()
        big = bytes(q.max_message + 1)
        attempts: list[Callable[[], object]] = [
            lambda: q.put(big, timeout=1),
            lambda: q.put_nowait(big),
            lambda: q.put_many([b"ok", big], timeout=1),
            lambda: q.put_view(q.max_message + 1, timeout=1),
            lambda: q.put_obj(big, timeout=1),
        ]
        for attempt in attempts:
            with pytest.raises(shmq.MessageTooLarge):
                attempt()
            assert raw.snapshot() == before
        assert q.get_many(timeout=1) == [b"second"]


@pytest.mark.parametrize("kind", KINDS)
def test_full_because_of_the_pad_rule(name: str, kind: str) -> None:
    """A frame that would fit in the free byte count but not before the end, once the PAD is
    counted, is Full; the ring is untouched; after a get it fits with its PAD."""
    start = 2**32 + 64  # offset 64
    with ring_at(name, kind, start) as (q, raw):
        first = payload_of(120)
        q.put_nowait(first)  # frame 128: offsets 64..192, 128 bytes free
        assert q.stats().depth_bytes == 128
        before = raw.snapshot()
        with pytest.raises(shmq.Full) as info:
            q.put_nowait(bytes(57))  # frame 72 <= 128 free, but 64 PAD + 72 = 136 > 128
        assert repr(name) in str(info.value)
        with pytest.raises(shmq.Full):
            q.put_view(57, timeout=0)
        assert q.put_many([bytes(57)], timeout=0) == 0
        assert raw.snapshot() == before
        q.put_nowait(payload_of(56))  # frame 64 ends exactly at the end: no PAD, fits
        assert raw.frame(start + 128) == (56, MSG)
        expect_cursors(raw, kind, start, tail=start + 192, head=start)
        assert q.full() is False  # 64 bytes free at offset 0
        q.put_nowait(payload_of(56, 1))  # 0..64: now exactly `capacity` bytes are queued
        assert q.full() is True
        with pytest.raises(shmq.Full):
            q.put_nowait(b"")
        expect_cursors(raw, kind, start, tail=start + 256, head=start)
        assert q.get_many(timeout=0) == [first, payload_of(56), payload_of(56, 1)]
        expect_cursors(raw, kind, start, tail=start + 256, head=start + 256)


@pytest.mark.parametrize("kind", KINDS)
def test_full_with_pad_then_fits_after_get(name: str, kind: str) -> None:
    """At offset 192 with 128 bytes queued, 57 bytes are Full (needs a 64-byte PAD); after the
    queued frame is read the PAD frame and message land where the layout says."""
    start = 2**63 + 64
    with ring_at(name, kind, start) as (q, raw):
        q.put_nowait(payload_of(120))  # 64..192
        with pytest.raises(shmq.Full):
            q.put_nowait(bytes(57))
        assert q.get_nowait() == payload_of(120)
        q.put_nowait(payload_of(57, 9))
        assert raw.frame(start + 128) == (64 - 8, PAD)  # 192..256
        assert raw.frame(start + 192) == (57, MSG)  # offset 0
        expect_cursors(raw, kind, start, tail=start + 192 + fs(57), head=start + 128)
        assert q.get_nowait() == payload_of(57, 9)
        expect_cursors(raw, kind, start, tail=start + 192 + fs(57), head=start + 192 + fs(57))


@pytest.mark.parametrize("base", [2**32 - 200, 2**63 - 200], ids=["2**32", "2**63"])
@pytest.mark.parametrize("kind", KINDS)
def test_random_traffic_places_every_frame(name: str, kind: str, base: int) -> None:
    """Seeded random puts and gets across several wraps: every frame header (and PAD) is where an
    independent placement model puts it, and every payload comes back intact and in order."""
    rng = random.Random(f"{kind}-{base}")
    with ring_at(name, kind, base) as (q, raw):
        maxm = q.max_message
        tail = head = base
        queued: list[tuple[int, bytes]] = []  # (end position, payload)
        for step in range(400):
            if rng.random() < 0.55:
                n = rng.choice([0, 1, 7, 8, 9, maxm, maxm - 1, rng.randint(0, maxm)])
                data = payload_of(n, step)
                off = tail % CAP
                at = tail + (CAP - off) if off + fs(n) > CAP else tail
                if at + fs(n) - head > CAP:
                    with pytest.raises(shmq.Full):
                        q.put_nowait(data)
                    continue
                q.put_nowait(data)
                if at != tail:
                    assert raw.frame(tail) == (at - tail - 8, PAD)
                assert raw.frame(at) == (n, MSG)
                assert raw.payload(at, n) == data
                tail = at + fs(n)
                queued.append((tail, data))
            elif queued:
                end, data = queued.pop(0)
                assert q.get_nowait() == data
                head = end
            else:
                with pytest.raises(shmq.Empty):
                    q.get_nowait()
            expect_cursors(raw, kind, base, tail=tail, head=head)
        assert tail - base > 3 * CAP  # the walk really wrapped several times
