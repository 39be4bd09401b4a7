"""The public Queue API in one process: round trips, batches, views, objects, observation,
identity, lifecycle, and the package's exports."""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import pickle
import queue as std_queue
import struct
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shmq
from shmq._native import _ring
from shmq._segment import segment_path
from shmq.testing import remove_segment, segment_exists

pytestmark = pytest.mark.timeout(60)

KINDS = ["spsc", "mpsc", "mpmc"]
MakeQueue = Callable[..., shmq.Queue]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fs(n: int) -> int:
    return (8 + n + 7) & ~7


def u32_at(name: str, offset: int) -> int:
    with open(segment_path(name), "rb") as f:
        f.seek(offset)
        return int(struct.unpack("<I", f.read(4))[0])


# -- round trips ------------------------------------------------------------------

STRUCTURED = np.array([(1, 2.5, b"ab"), (-3, 4.0, b"cd")], dtype=[("i", "<i4"), ("f", "<f8"), ("s", "S2")])
MESSAGES: dict[str, tuple[Any, bytes]] = {
    "bytes": (b"hello", b"hello"),
    "bytearray": (bytearray(b"\x00\x01\x02"), b"\x00\x01\x02"),
    "memoryview": (memoryview(b"abcdef")[1:4], b"bcd"),
    "memoryview-int32": (memoryview(array("i", [1, -2, 3])), array("i", [1, -2, 3]).tobytes()),
    "numpy-1d": (np.arange(5, dtype=np.float32), np.arange(5, dtype=np.float32).tobytes()),
    "numpy-2d": (np.arange(12, dtype=np.int16).reshape(3, 4), np.arange(12, dtype=np.int16).tobytes()),
    "numpy-structured": (STRUCTURED, STRUCTURED.tobytes()),
    "numpy-0d": (np.array(7, dtype=np.int64), struct.pack("<q", 7)),
    "empty-bytes": (b"", b""),
    "empty-bytearray": (bytearray(), b""),
    "empty-memoryview": (memoryview(b""), b""),
    "empty-numpy": (np.empty(0, dtype=np.float64), b""),
    "binary": (bytes(range(256)) * 3, bytes(range(256)) * 3),
}


@pytest.mark.parametrize("what", MESSAGES)
def test_round_trip(make_queue: MakeQueue, kind: str, what: str) -> None:
    """Every C-contiguous buffer comes back as the bytes it held, through put/get and through
    put_nowait/get_nowait."""
    data, expected = MESSAGES[what]
    q = make_queue(kind=kind, capacity=4096)
    q.put(data, timeout=1)
    q.put_nowait(data)
    first, second = q.get(timeout=1), q.get_nowait()
    assert type(first) is bytes
    assert first == second == expected


def test_structured_and_2d_arrays_rebuild(make_queue: MakeQueue) -> None:
    """The bytes of a 2-D and a structured array rebuild equal arrays with numpy.frombuffer."""
    q = make_queue(capacity=4096)
    grid = np.arange(24, dtype=np.float64).reshape(4, 6)
    q.put(grid, timeout=1)
    q.put(STRUCTURED, timeout=1)
    assert np.array_equal(np.frombuffer(q.get(timeout=1), dtype=np.float64).reshape(4, 6), grid)
    back = np.frombuffer(q.get(timeout=1), dtype=STRUCTURED.dtype)
    assert back.tolist() == STRUCTURED.tolist()


def test_message_is_a_copy(make_queue: MakeQueue) -> None:
    """put copies: changing the source afterwards does not change the queued message."""
    q = make_queue(capacity=256)
    src = bytearray(b"before")
    q.put(src, timeout=1)
    src[:] = b"AFTER!"
    assert q.get(timeout=1) == b"before"


def test_order_is_kept_across_many_wraps(make_queue: MakeQueue, kind: str) -> None:
    """Messages come out in the order they went in, through many wraps of a small ring."""
    q = make_queue(kind=kind, capacity=256)
    sent: list[bytes] = []
    got: list[bytes] = []
    for i in range(600):
        msg = str(i).encode() * (i % 9)
        q.put(msg, timeout=1)
        sent.append(msg)
        if i >= 3:  # keep three in flight
            got.append(q.get(timeout=1))
    got.extend(q.get_many(max_messages=1024, timeout=0))
    assert got == sent
    assert q.stats().messages_put == 600


# -- batches ------------------------------------------------------------------------


def test_put_many_and_get_many(make_queue: MakeQueue, kind: str) -> None:
    """put_many returns how many it put; get_many returns them in order, at most max_messages."""
    q = make_queue(kind=kind, capacity=4096)
    batch = [bytes([i]) * i for i in range(20)]
    assert q.put_many(batch, timeout=1) == 20
    assert q.put_many([], timeout=1) == 0
    assert q.put_many(iter([b"gen-1", b"gen-2"]), timeout=1) == 2
    assert q.qsize() == 22
    assert q.get_many(max_messages=5, timeout=1) == batch[:5]
    assert q.get_many(max_messages=1, timeout=1) == batch[5:6]
    assert q.get_many(timeout=1) == [*batch[6:], b"gen-1", b"gen-2"]
    assert q.qsize() == 0


def test_get_many_empty_returns_empty_list(make_queue: MakeQueue, kind: str) -> None:
    """get_many on an empty queue returns [] when the timeout expires, without raising."""
    q = make_queue(kind=kind, capacity=256)
    assert q.get_many(timeout=0) == []
    t0 = time.monotonic()
    assert q.get_many(max_messages=3, timeout=0.05) == []
    assert time.monotonic() - t0 >= 0.05


def test_get_many_waits_for_the_first_message(make_queue: MakeQueue, kind: str) -> None:
    """get_many waits for one message, then returns what is there."""
    q = make_queue(kind=kind, capacity=256)
    putter = threading.Timer(0.05, lambda: q.put_many([b"late", b"later"], timeout=1))
    putter.start()
    try:
        got = q.get_many(timeout=10)
    finally:
        putter.join()
    assert got in ([b"late", b"later"], [b"late"])  # put_many may land in one commit or two
    assert got + q.get_many(timeout=0) == [b"late", b"later"]


def test_put_many_partial_count_when_the_ring_fills(make_queue: MakeQueue, kind: str) -> None:
    """With nobody reading, put_many puts what fits, waits for the timeout and returns the count;
    the rest is not put."""
    q = make_queue(kind=kind, capacity=256)
    batch = [bytes([i]) * 100 for i in range(10)]  # frames of 112: two fit in 256
    t0 = time.monotonic()
    assert q.put_many(batch, timeout=0.05) == 2
    assert time.monotonic() - t0 >= 0.05
    assert q.put_many(batch[2:], timeout=0) == 0
    assert q.get_many(timeout=0) == batch[:2]
    assert q.put_many(batch[2:], timeout=0) == 2


def test_put_and_get_time_out(make_queue: MakeQueue, kind: str) -> None:
    """A full put raises Full (also queue.Full) and an empty get raises Empty (also queue.Empty)
    after the timeout, naming the queue; timeout=0 never waits."""
    q = make_queue(kind=kind, capacity=64)
    q.put(bytes(q.max_message), timeout=0)
    q.put(bytes(q.max_message), timeout=0)
    for timeout in (0, 0.05):
        with pytest.raises(std_queue.Full) as full:
            q.put(b"x", timeout=timeout)
        assert isinstance(full.value, shmq.Full)
        assert repr(q.name) in str(full.value)
    q.get_many(timeout=0)
    for timeout in (0, 0.05):
        with pytest.raises(std_queue.Empty) as empty:
            q.get(timeout=timeout)
        assert isinstance(empty.value, shmq.Empty)
        assert repr(q.name) in str(empty.value)


def test_get_many_takes_everything_available_large(make_queue: MakeQueue) -> None:
    """get_many returns every queued message up to max_messages, however many bytes they are."""
    q = make_queue(capacity=1 << 18)
    assert q.put_many([bytes(1000)] * 100, timeout=1) == 100
    assert len(q.get_many(max_messages=1024, timeout=0)) == 100


@pytest.mark.parametrize("kind", ["spsc", "mpsc"])
def test_get_many_takes_everything_available(make_queue: MakeQueue, kind: str) -> None:
    """get_many returns every message committed before the call (up to max_messages)."""
    q = make_queue(kind=kind, capacity=256)
    q.put(b"a", timeout=1)
    q.put(b"b", timeout=1)
    assert q.get(timeout=1) == b"a"  # the reader caches the tail after b
    q.put(b"c", timeout=1)
    assert q.get_many(max_messages=10, timeout=0) == [b"b", b"c"]


# -- zero-copy views --------------------------------------------------------------


def test_put_view_commits_on_exit(make_queue: MakeQueue, kind: str) -> None:
    """A put_view is writable, exactly nbytes long, invisible until its block ends, then delivered."""
    q = make_queue(kind=kind, capacity=256)
    with q.put_view(5, timeout=1) as buf:
        assert (buf.readonly, buf.nbytes, buf.contiguous) == (False, 5, True)
        buf[:] = b"hello"
        assert q.qsize() == 0
        assert q.empty() is True
    assert q.qsize() == 1
    assert q.get(timeout=1) == b"hello"


def test_abandoned_put_view_delivers_nothing_and_frees_the_space(make_queue: MakeQueue, kind: str) -> None:
    """An exception in a put_view block propagates, nothing is delivered, and once a reader has
    passed the abandoned frame the whole ring is free again."""
    q = make_queue(kind=kind, capacity=256)
    with pytest.raises(KeyError), q.put_view(q.max_message, timeout=1) as buf:
        buf[:] = bytes(q.max_message)
        raise KeyError("boom")
    assert q.qsize() == 0
    q.put(b"after", timeout=1)
    assert q.get(timeout=1) == b"after"  # the abandoned frame is skipped
    with pytest.raises(shmq.Empty):
        q.get_nowait()
    assert q.stats().depth_bytes == 0
    assert q.put_many([b""] * 40, timeout=0) == 256 // 8  # the whole ring, in 8-byte frames
    assert q.full() is True
    s = q.stats()
    assert (s.messages_put, s.bytes_put, s.depth_bytes) == (33, 5, 256)


def test_abandoned_put_view_alone_reads_as_empty(make_queue: MakeQueue, kind: str) -> None:
    """With only an abandoned put_view in the ring, get_nowait is Empty and qsize is 0."""
    q = make_queue(kind=kind, capacity=256)
    with pytest.raises(RuntimeError), q.put_view(10, timeout=1):
        raise RuntimeError
    assert q.qsize() == 0
    with pytest.raises(shmq.Empty):
        q.get_nowait()
    assert q.empty() is True


def test_empty_after_an_abandoned_put_view(make_queue: MakeQueue, kind: str) -> None:
    """empty() agrees with qsize() and get_nowait() right after an abandoned put_view."""
    q = make_queue(kind=kind, capacity=256)
    with pytest.raises(RuntimeError), q.put_view(10, timeout=1):
        raise RuntimeError
    assert q.qsize() == 0
    assert q.empty() is True


def test_get_view_is_read_only_and_released_on_exit(make_queue: MakeQueue, kind: str) -> None:
    """A get_view is read-only, holds the message, and is released (unusable) after the block."""
    q = make_queue(kind=kind, capacity=256)
    q.put(b"payload", timeout=1)
    q.put(b"next", timeout=1)
    with q.get_view(timeout=1) as view:
        assert (view.readonly, view.nbytes, view.contiguous, view.format) == (True, 7, True, "B")
        assert bytes(view) == b"payload"
        with pytest.raises(TypeError):
            view[0] = 0
    with pytest.raises(ValueError, match="released"):
        bytes(view)
    with pytest.raises(ValueError, match="released"):
        view[0]
    assert q.get(timeout=1) == b"next"
    assert q.get_many(timeout=0) == []


def test_put_view_unusable_after_the_block(make_queue: MakeQueue) -> None:
    """Writing through a put_view after its block ended is refused; the delivered message is intact."""
    q = make_queue(capacity=256)
    with q.put_view(3, timeout=1) as buf:
        buf[:] = b"abc"
    with pytest.raises(ValueError, match="released"):
        buf[0] = 0
    assert q.get(timeout=1) == b"abc"


def test_get_view_exception_still_releases(make_queue: MakeQueue, kind: str) -> None:
    """An exception inside a get_view block propagates and the message is consumed."""
    q = make_queue(kind=kind, capacity=256)
    q.put(b"one", timeout=1)
    with pytest.raises(ZeroDivisionError), q.get_view(timeout=1) as view:
        assert bytes(view) == b"one"
        _ = 1 / 0
    assert q.qsize() == 0
    with pytest.raises(shmq.Empty):
        q.get_nowait()


def test_views_time_out(make_queue: MakeQueue, kind: str) -> None:
    """get_view on an empty queue is Empty; put_view on a full one is Full."""
    q = make_queue(kind=kind, capacity=64)
    with pytest.raises(shmq.Empty):
        q.get_view(timeout=0.02)
    q.put_many([bytes(q.max_message)] * 2, timeout=0)
    with pytest.raises(shmq.Full):
        q.put_view(0, timeout=0.02)


def test_put_while_own_put_view_is_open_is_refused(make_queue: MakeQueue, kind: str) -> None:
    """Putting from the thread that holds an open put_view is refused (it would deadlock the
    ordered commit); the view still commits normally."""
    q = make_queue(kind=kind, capacity=256)
    with q.put_view(2, timeout=1) as buf:
        buf[:] = b"v1"
        with pytest.raises(shmq.ShmqError, match="put_view"):
            q.put(b"x", timeout=1)
        with pytest.raises(shmq.ShmqError, match="put_view"):
            q.put_view(1, timeout=1)
    q.put(b"x", timeout=1)
    assert q.get_many(timeout=0) == [b"v1", b"x"]


def test_mpmc_get_views_may_overlap_and_end_in_any_order(make_queue: MakeQueue) -> None:
    """On mpmc one handle may hold two get_views; releasing them out of order frees the ring."""
    q = make_queue(kind="mpmc", capacity=256)
    q.put_many([b"a" * 100, b"b" * 100], timeout=1)
    with q.get_view(timeout=1) as first:
        with q.get_view(timeout=1) as second:
            assert bytes(second) == b"b" * 100
        assert q.stats().depth_bytes == 224  # the first frame still holds the head
        assert bytes(first) == b"a" * 100
    assert q.stats().depth_bytes == 0
    assert q.put_many([b""] * 40, timeout=0) == 256 // 8


def test_spsc_second_get_view_is_refused(make_queue: MakeQueue) -> None:
    """A single-consumer handle refuses a read while its get_view is open."""
    q = make_queue(kind="spsc", capacity=256)
    q.put_many([b"a", b"b"], timeout=1)
    with q.get_view(timeout=1) as view:
        with pytest.raises(shmq.ShmqError, match="get_view"):
            q.get(timeout=1)
        assert bytes(view) == b"a"
    assert q.get(timeout=1) == b"b"


@pytest.mark.parametrize("side", ["get_view", "put_view"])
def test_leaked_frombuffer_raises_buffer_error(make_queue: MakeQueue, side: str) -> None:
    """An array made from the view and still alive when the block ends is a BufferError there."""
    q = make_queue(capacity=256)
    q.put(b"12345678", timeout=1)
    leaked: list[np.ndarray] = []
    try:
        with pytest.raises(BufferError):
            slot = q.get_view(timeout=1) if side == "get_view" else q.put_view(8, timeout=1)
            with slot as view:
                leaked.append(np.frombuffer(view, dtype=np.uint8))
    finally:
        leaked.clear()  # never touch it: it may point at memory the ring has reused


def test_leaked_frombuffer_cannot_crash_the_process(name: str) -> None:
    """However a view is misused, the process does not crash (run in a child: it may segfault)."""
    code = f"""
import numpy as np, shmq
q = shmq.Queue({name!r}, create=True, capacity=256)
q.put(b"12345678", timeout=1)
kept = []
try:
    with q.get_view(timeout=1) as view:
        kept.append(np.frombuffer(view, dtype=np.uint8))
except BufferError:
    pass
for i in range(40):  # traffic goes on until the leased frame stops the ring: it is never reused
    try:
        q.put_nowait(bytes([65 + i]) * 8)
    except shmq.Full:
        break
    q.get(timeout=1)
else:
    raise AssertionError("the leased frame was overwritten")
q.close()
q.unlink()
print(bytes(kept[0]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, cwd=ROOT)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.strip() == b"b'12345678'"


# -- objects ------------------------------------------------------------------------


def test_put_obj_get_obj_nested_with_arrays(make_queue: MakeQueue, kind: str) -> None:
    """Nested objects with numpy arrays (C, Fortran, strided, structured, 0-d, empty) come back
    equal, with their dtype and shape, and writable."""
    q = make_queue(kind=kind, capacity=1 << 16)
    obj = {
        "ints": [1, 2, (3, 4)],
        "text": "héllo",
        "none": None,
        "c": np.arange(12, dtype=np.float64).reshape(3, 4),
        "f": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "strided": np.arange(20, dtype=np.int16)[::3],
        "structured": STRUCTURED,
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), dtype=np.uint8),
        "nested": [{"deep": np.ones(5, dtype=np.bool_)}],
    }
    q.put_obj(obj, timeout=1)
    assert q.qsize() == 1
    back = q.get_obj(timeout=1)
    assert back.keys() == obj.keys()
    assert (back["ints"], back["text"], back["none"]) == (obj["ints"], obj["text"], None)
    arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    arrays["deep"] = obj["nested"][0]["deep"]
    back_arrays = {k: v for k, v in back.items() if isinstance(v, np.ndarray)}
    back_arrays["deep"] = back["nested"][0]["deep"]
    for key, original in arrays.items():
        got = back_arrays[key]
        assert (got.dtype, got.shape) == (original.dtype, original.shape), key
        assert got.tolist() == original.tolist(), key
        assert got.flags.writeable, key
    back["c"][0, 0] = 99.0  # writable and private
    assert obj["c"][0, 0] == 0.0


def test_put_obj_plain_objects(make_queue: MakeQueue) -> None:
    """Objects without buffers round-trip through put_obj/get_obj in order."""
    q = make_queue(capacity=4096)
    items: list[Any] = [None, 0, "s", b"b", [1, [2, [3]]], {"k": {1, 2}}, 1.5, (), frozenset({3})]
    for item in items:
        q.put_obj(item, timeout=1)
    assert [q.get_obj(timeout=1) for _ in items] == items


# -- observation --------------------------------------------------------------------


def test_qsize_empty_full(make_queue: MakeQueue, kind: str) -> None:
    """qsize counts messages, empty() is True only with none queued, full() only when not even an
    empty message fits."""
    q = make_queue(kind=kind, capacity=64)
    assert (q.qsize(), q.empty(), q.full()) == (0, True, False)
    q.put(b"", timeout=0)
    assert (q.qsize(), q.empty(), q.full()) == (1, False, False)
    q.put(bytes(24), timeout=0)  # 8 + 32 = 40 of 64 bytes
    q.put(bytes(8), timeout=0)  # 56
    assert (q.qsize(), q.empty(), q.full()) == (3, False, False)
    q.put(b"", timeout=0)  # 64: full
    assert (q.qsize(), q.empty(), q.full()) == (4, False, True)
    assert q.get_many(timeout=0) == [b"", bytes(24), bytes(8), b""]
    assert (q.qsize(), q.empty(), q.full()) == (0, True, False)


def test_stats_after_known_traffic(make_queue: MakeQueue, kind: str) -> None:
    """stats() counts messages and payload bytes each way and the bytes in use, frames included."""
    q = make_queue(kind=kind, capacity=1024)
    sizes = [0, 1, 8, 9, 100]
    q.put_many([bytes(n) for n in sizes], timeout=1)
    q.put(bytes(30), timeout=1)
    assert q.get(timeout=1) == b""
    assert q.get_many(max_messages=2, timeout=1) == [bytes(1), bytes(8)]
    s = q.stats()
    assert isinstance(s, shmq.QueueStats)
    assert dataclasses.asdict(s) == {
        "name": q.name,
        "kind": kind,
        "capacity": 1024,
        "max_message": 504,
        "depth_messages": 3,
        "depth_bytes": fs(9) + fs(100) + fs(30),
        "messages_put": 6,
        "messages_got": 3,
        "bytes_put": 148,
        "bytes_got": 9,
        "put_waits": 0,
        "get_waits": 0,
        "data_wakes": 0,
        "space_wakes": 0,
        "deferred_commits": 0,
        "dead_producer_claims": 0,
        "dead_consumer_messages": 0,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.messages_put = 0  # type: ignore[misc]


def test_stats_count_sleeps_and_wakes(make_queue: MakeQueue, kind: str) -> None:
    """A consumer asleep on an empty ring counts one get_wait, and the put that wakes it one
    data_wake; a get or put that times out asleep counts one wait, and leaves its sleepers bit
    set, so the next waker on that side makes exactly one wake (and later ones none)."""
    q = make_queue(kind=kind, capacity=64, wait="block")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while u32_at(q.name, _ring.OFF_DATA_WAITERS) == 0:
            assert time.monotonic() < deadline, "the reader never went to sleep"
            time.sleep(0.001)
        q.put(b"wake", timeout=1)
    finally:
        reader.join(10)
    assert got == [b"wake"]
    with pytest.raises(shmq.Empty):
        q.get(timeout=0.05)  # sleeps once, nobody wakes it
    assert q.put_many([b""] * 9, timeout=0) == 64 // 8  # the first commit clears the bit: 1 wake
    with pytest.raises(shmq.Full):
        q.put(b"", timeout=0.05)  # sleeps once, nobody wakes it
    s = q.stats()
    assert (s.get_waits, s.data_wakes, s.put_waits, s.space_wakes) == (2, 2, 1, 0)


def test_repr_names_the_queue(make_queue: MakeQueue, kind: str) -> None:
    """repr shows name, kind and capacity, and says when the handle is closed."""
    q = make_queue(kind=kind, capacity=512)
    text = repr(q)
    assert f"name={q.name!r}" in text
    assert f"kind={kind}" in text
    assert "capacity=512" in text
    q.close()
    assert "closed" in repr(q)


def test_identity_properties(make_queue: MakeQueue, kind: str) -> None:
    """name, kind, capacity and max_message reflect the segment; an attacher reads them from it."""
    q = make_queue(kind=kind, capacity=2048)
    assert (q.kind, q.capacity, q.max_message, q.wait) == (kind, 2048, 2048 // 2 - 8, "adaptive")
    with shmq.Queue(q.name, wait="spin") as other:
        assert (other.name, other.kind, other.capacity, other.max_message) == (q.name, kind, 2048, 1016)
        assert other.wait == "spin"
        other.put(b"via other", timeout=1)
    assert q.get(timeout=1) == b"via other"


def test_defaults_when_creating(name: str) -> None:
    """Created without kind or capacity, a queue is an mpmc ring of 1 MiB."""
    with shmq.Queue(name, create=True) as q:
        assert (q.kind, q.capacity, q.max_message) == ("mpmc", 1 << 20, (1 << 19) - 8)


# -- identity and lifecycle ---------------------------------------------------------


def test_pickle_attaches_to_the_same_segment(make_queue: MakeQueue, kind: str) -> None:
    """A pickled queue is its name (and wait strategy): unpickling attaches to the same segment,
    and the unpickled handle does not own (unlink) it."""
    q = make_queue(kind=kind, capacity=256, wait="yield")
    data = pickle.dumps(q)
    assert q.name.encode() in data
    assert len(data) < 200
    clone = pickle.loads(data)
    assert isinstance(clone, shmq.Queue)
    assert clone is not q
    assert (clone.name, clone.kind, clone.capacity, clone.wait) == (q.name, kind, 256, "yield")
    with clone:
        clone.put(b"from clone", timeout=1)
    assert segment_exists(q.name)
    assert q.get(timeout=1) == b"from clone"


def test_context_manager_unlinks_only_for_the_creator(name: str) -> None:
    """Leaving the creator's with-block closes and unlinks; leaving an attacher's only closes."""
    with shmq.Queue(name, create=True, capacity=256) as creator:
        with shmq.Queue(name) as attacher:
            attacher.put(b"x", timeout=1)
        assert attacher.closed
        assert segment_exists(name)
        assert creator.get(timeout=1) == b"x"
    assert creator.closed
    assert not segment_exists(name)


def test_creator_exit_after_explicit_unlink(name: str) -> None:
    """A creator that unlinked inside its block leaves it without an error."""
    with shmq.Queue(name, create=True, capacity=256) as q:
        q.unlink()
        assert not segment_exists(name)
        q.put(b"still mapped", timeout=1)
        assert q.get(timeout=1) == b"still mapped"
    with pytest.raises(shmq.NotFound):
        shmq.Queue(name)


def test_close_twice_and_unlink_after_close(name: str) -> None:
    """close() is idempotent; unlink() works on a closed handle; a second unlink is NotFound."""
    q = shmq.Queue(name, create=True, capacity=256)
    try:
        q.close()
        q.close()
        assert q.closed
        q.unlink()
        assert not segment_exists(name)
        with pytest.raises(shmq.NotFound):
            q.unlink()
    finally:
        remove_segment(name)


def test_close_with_open_view_keeps_the_memory(make_queue: MakeQueue, kind: str) -> None:
    """close() while a view is open keeps the view usable until its block ends."""
    q = make_queue(kind=kind, capacity=256)
    q.put(b"held", timeout=1)
    with q.get_view(timeout=1) as view:
        q.close()
        assert bytes(view) == b"held"
    with pytest.raises(shmq.Closed):
        q.get_nowait()


# -- exports --------------------------------------------------------------------------

EXPECTED_EXPORTS = {
    "Queue",
    "QueueStats",
    "ShmqError",
    "Full",
    "Empty",
    "MessageTooLarge",
    "MessageTypeError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "CorruptSegment",
    "IncompatibleSegment",
    "Closed",
    "PermissionDenied",
}
BUILTIN_BASES: dict[str, type[BaseException] | None] = {
    "ShmqError": Exception,
    "Full": std_queue.Full,
    "Empty": std_queue.Empty,
    "MessageTooLarge": ValueError,
    "MessageTypeError": TypeError,
    "InvalidArgument": ValueError,
    "NotFound": FileNotFoundError,
    "AlreadyExists": FileExistsError,
    "CorruptSegment": None,
    "IncompatibleSegment": ValueError,
    "Closed": ValueError,
    "PermissionDenied": PermissionError,
}


def test_all_lists_the_public_api() -> None:
    """shmq.__all__ holds every public name, each one exists, and `import *` gives exactly those."""
    assert set(shmq.__all__) >= EXPECTED_EXPORTS
    assert len(shmq.__all__) == len(set(shmq.__all__))
    for export in shmq.__all__:
        assert hasattr(shmq, export), export
    namespace: dict[str, Any] = {}
    exec("from shmq import *", namespace)
    del namespace["__builtins__"]
    assert set(namespace) == set(shmq.__all__)
    assert isinstance(shmq.__version__, str)


def test_every_public_attribute_is_exported() -> None:
    """Like trio's test_exports: every public, non-module attribute of shmq is in __all__."""
    public = {n for n in dir(shmq) if not n.startswith("_") and not inspect.ismodule(getattr(shmq, n))}
    assert public <= set(shmq.__all__)


@pytest.mark.parametrize(("export", "builtin"), BUILTIN_BASES.items())
def test_exception_hierarchy(export: str, builtin: type[BaseException] | None) -> None:
    """Every exception is a ShmqError and also the builtin it stands beside."""
    cls = getattr(shmq, export)
    assert issubclass(cls, shmq.ShmqError)
    assert issubclass(cls, Exception)
    if builtin is not None:
        assert issubclass(cls, builtin)


def test_no_exception_shadows_a_builtin_name() -> None:
    """Exported exception names do not collide with builtins (so `from shmq import *` is safe)."""
    assert not {n for n in shmq.__all__ if hasattr(builtins, n)}


def test_multiprocessing_block_flag_in_the_timeout_position(make_queue: MakeQueue) -> None:
    """multiprocessing habits work: q.get(False) / q.put(x, False) do not wait (Empty/Full at
    once), q.get(True) / q.put(x, True) wait as long as needed; a bool never means 1 second."""
    q = make_queue(capacity=64)
    with pytest.raises(shmq.Empty):
        q.get(False)
    q.put(b"a", True)
    assert q.get(True) == b"a"
    while True:
        try:
            q.put(b"", False)
        except shmq.Full:
            break
    assert q.qsize() == 64 // 8
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(q.get(True)))
    for _ in range(8):
        q.get(timeout=1)
    # With the ring empty, get(True) must still be waiting after 1.3 s (a "1 second" reading of
    # True would have raised Empty), and then receive the message put after that.
    reader.start()
    time.sleep(1.3)
    assert reader.is_alive() and got == []
    q.put(b"late", timeout=1)
    reader.join(10)
    assert got == [b"late"]
