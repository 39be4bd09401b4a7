"""Bad input gives a clear exception of the right class, and never loses a queued message.

Every exception is checked against both the shmq class and the builtin it also is, and for a
message that names the queue or the bad value. Tests that start from a queue holding SENTINELS
check afterwards that all of them are still there, in order.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import shmq
from shmq._native import _ring
from shmq._segment import segment_path
from shmq.testing import drain, remove_segment, segment_exists, unique_name

pytestmark = pytest.mark.timeout(60)

KINDS = ["spsc", "mpsc", "mpmc"]
SENTINELS = [b"first", b"", b"third" * 9]
OFF_HEADER_SIZE = 48  # ring.h SHMQ_OFF_HEADER_SIZE (not exported by _ring)


def loaded(q: shmq.Queue) -> shmq.Queue:
    for s in SENTINELS:
        q.put(s, timeout=1)
    return q


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def q(make_queue: Callable[..., shmq.Queue], kind: str) -> Iterator[shmq.Queue]:
    """A 1 KiB queue holding SENTINELS; the test must leave them there."""
    queue = loaded(make_queue(kind=kind, capacity=1024))
    yield queue
    if not queue.closed:
        assert drain(queue) == SENTINELS


def raises(cls: type[BaseException], builtin: type[BaseException], fn: Callable[[], object]) -> str:
    """Call fn; it must raise `cls`, which must also be a `builtin`. Returns the message."""
    with pytest.raises(cls) as info:
        fn()
    assert isinstance(info.value, builtin)
    return str(info.value)


def write_at(name: str, offset: int, data: bytes) -> bytes:
    """Overwrite segment bytes through a file handle; returns what was there."""
    with open(segment_path(name), "r+b") as f:
        f.seek(offset)
        old = f.read(len(data))
        f.seek(offset)
        f.write(data)
    return old


# -- messages of the wrong type -------------------------------------------------

NONCONTIGUOUS = np.arange(10, dtype=np.int64)[::2]
BAD_MESSAGES: list[tuple[str, Any, str]] = [
    ("int", 5, "got int"),
    ("str", "text", "got str"),
    ("list", [1, 2], "got list"),
    ("None", None, "got NoneType"),
    ("dict", {"a": 1}, "got dict"),
    ("float", 1.5, "got float"),
    ("noncontiguous", NONCONTIGUOUS, "non-contiguous numpy.ndarray"),
    ("fortran", np.asfortranarray(np.ones((3, 4))), "non-contiguous numpy.ndarray"),
]
PUTS: dict[str, Callable[[shmq.Queue, Any], object]] = {
    "put": lambda q, x: q.put(x, timeout=1),
    "put-no-timeout": lambda q, x: q.put(x),
    "put_nowait": lambda q, x: q.put_nowait(x),
    "put_many": lambda q, x: q.put_many([x], timeout=1),
}


@pytest.mark.parametrize("how", PUTS)
@pytest.mark.parametrize(("bad", "fragment"), [b[1:] for b in BAD_MESSAGES], ids=[b[0] for b in BAD_MESSAGES])
def test_message_of_wrong_type(q: shmq.Queue, how: str, bad: object, fragment: str) -> None:
    """A message that is not a C-contiguous buffer is MessageTypeError (a TypeError) naming its
    type; nothing is written."""
    before = q.stats()
    msg = raises(shmq.MessageTypeError, TypeError, lambda: PUTS[how](q, bad))
    assert fragment in msg
    assert q.stats() == before


@pytest.mark.parametrize(("bad", "fragment"), [b[1:] for b in BAD_MESSAGES], ids=[b[0] for b in BAD_MESSAGES])
def test_put_many_with_one_bad_item_in_the_middle_puts_nothing(
    q: shmq.Queue, bad: object, fragment: str
) -> None:
    """put_many validates every message before writing any: the good ones before the bad one are
    not put either, and the error says which message it was."""
    before = q.stats()
    msg = raises(shmq.MessageTypeError, TypeError, lambda: q.put_many([b"good", b"also", bad, b"after"]))
    assert msg.startswith("message 2 of 4: ")
    assert fragment in msg
    assert q.stats() == before


def test_put_many_with_an_oversize_item_in_the_middle_puts_nothing(q: shmq.Queue) -> None:
    """An oversize message in the middle of a batch: MessageTooLarge, and nothing is put."""
    before = q.stats()
    big = bytes(q.max_message + 1)
    msg = raises(shmq.MessageTooLarge, ValueError, lambda: q.put_many([b"good", big, b"after"], timeout=1))
    assert f"message of {q.max_message + 1} bytes" in msg
    assert q.stats() == before


@pytest.mark.parametrize("bad", [5, None, 1.5])
def test_put_many_needs_an_iterable(q: shmq.Queue, bad: object) -> None:
    """put_many(<not iterable>) is a TypeError that says an iterable is needed."""
    msg = raises(TypeError, TypeError, lambda: q.put_many(bad))  # type: ignore[arg-type]
    assert "iterable of messages" in msg


@pytest.mark.parametrize("single", [b"abc", bytearray(b"abc"), memoryview(b"abc"), "abc"])
def test_put_many_of_a_single_message_says_use_put(q: shmq.Queue, single: object) -> None:
    """put_many(b"abc") is a single message, not an iterable of them: ArgumentTypeError says so
    and nothing is put."""
    before = q.stats()
    msg = raises(shmq.ArgumentTypeError, TypeError, lambda: q.put_many(single))  # type: ignore[arg-type]
    assert "use put()" in msg
    assert q.stats() == before


@pytest.mark.parametrize(
    ("bad", "type_name"), [("5", "str"), (None, "NoneType"), (1.5, "float"), ([1], "list")]
)
def test_put_view_size_of_wrong_type(q: shmq.Queue, bad: object, type_name: str) -> None:
    """put_view(nbytes) needs an int: anything else is a TypeError naming the type."""
    before = q.stats()
    msg = raises(TypeError, TypeError, lambda: q.put_view(bad, timeout=1))  # type: ignore[arg-type]
    assert type_name in msg
    assert q.stats() == before


@pytest.mark.parametrize("bad", [-1, -(2**40)])
def test_put_view_negative_size(q: shmq.Queue, bad: int) -> None:
    """A negative put_view size is InvalidArgument naming the value."""
    msg = raises(shmq.InvalidArgument, ValueError, lambda: q.put_view(bad, timeout=1))
    assert f"got {bad}" in msg


# -- oversize -------------------------------------------------------------------

OVERSIZE: dict[str, Callable[[shmq.Queue, int], object]] = {
    "put": lambda q, n: q.put(bytes(n), timeout=1),
    "put_nowait": lambda q, n: q.put_nowait(bytearray(n)),
    "put_many": lambda q, n: q.put_many([memoryview(bytes(n))], timeout=1),
    "put_view": lambda q, n: q.put_view(n, timeout=1),
    "numpy": lambda q, n: q.put(np.zeros(n, dtype=np.uint8), timeout=1),
}


@pytest.mark.parametrize("extra", [1, 8, 10_000])
@pytest.mark.parametrize("how", OVERSIZE)
def test_oversize_message(q: shmq.Queue, how: str, extra: int) -> None:
    """More than max_message bytes is MessageTooLarge (a ValueError) naming the size, the limit
    and the queue, raised before anything is written."""
    before = q.stats()
    n = q.max_message + extra
    msg = raises(shmq.MessageTooLarge, ValueError, lambda: OVERSIZE[how](q, n))
    assert f"message of {n} bytes" in msg
    assert f"max_message={q.max_message}" in msg
    assert repr(q.name) in msg
    assert q.stats() == before


def test_oversize_object(q: shmq.Queue) -> None:
    """put_obj of an object whose pickle is too large is MessageTooLarge; nothing is written."""
    before = q.stats()
    msg = raises(shmq.MessageTooLarge, ValueError, lambda: q.put_obj(np.zeros(200), timeout=1))
    assert repr(q.name) in msg
    assert q.stats() == before


def test_put_view_absurd_size_is_message_too_large(q: shmq.Queue) -> None:
    """A size beyond Py_ssize_t is still just a message that is too large."""
    raises(shmq.MessageTooLarge, ValueError, lambda: q.put_view(2**64, timeout=1))


# -- constructor arguments ------------------------------------------------------

BAD_CAPACITIES: list[tuple[object, str]] = [
    (100, "got 100; try 128"),
    (65, "got 65; try 128"),
    (32, "got 32; try 64"),
    (0, "got 0"),
    (-256, "got -256"),
    (2**33, f"got {2**33}; try {2**32}"),
    (True, "got bool"),
    (256.0, "got float"),
    ("256", "got str"),
]


@pytest.mark.parametrize("create", [True, False], ids=["create", "attach"])
@pytest.mark.parametrize(("capacity", "fragment"), BAD_CAPACITIES, ids=[repr(c[0]) for c in BAD_CAPACITIES])
def test_bad_capacity(name: str, capacity: object, fragment: str, create: bool) -> None:
    """A capacity that is not a power-of-two int from 64 to 2**32 is InvalidArgument naming it,
    and no segment is created."""
    msg = raises(
        shmq.InvalidArgument,
        ValueError,
        lambda: shmq.Queue(name, create=create, capacity=capacity),  # type: ignore[arg-type]
    )
    assert fragment in msg
    assert not segment_exists(name)


@pytest.mark.parametrize("arg", ["kind", "wait"])
@pytest.mark.parametrize(
    "bad",
    [
        "fifo",
        "SPSC",
        "",
        1,
        ["spsc"],
    ],
)
def test_unknown_kind_or_wait(name: str, arg: str, bad: object) -> None:
    """An unknown kind or wait strategy is InvalidArgument listing the valid ones; nothing is created."""
    msg = raises(shmq.InvalidArgument, ValueError, lambda: shmq.Queue(name, create=True, **{arg: bad}))
    assert f"got {bad!r}" in msg
    valid = "spsc, mpsc, mpmc" if arg == "kind" else "spin, yield, block, adaptive"
    assert valid in msg
    assert not segment_exists(name)


BAD_NAMES: list[tuple[object, str]] = [
    ("", "got 0"),
    ("a/b", "contains '/'"),
    ("x" * 300, "got 300"),
    ("x" * 201, "got 201"),
    ("with space", "contains ' '"),
    ("nul\0byte", "contains '\\x00'"),
    ("tab\there", "contains '\\t'"),
    ("back\\slash", "contains '\\\\'"),
    (5, "got int"),
    (None, "got NoneType"),
    (b"bytes", "got bytes"),
]


@pytest.mark.parametrize("create", [True, False], ids=["create", "attach"])
@pytest.mark.parametrize(("bad", "fragment"), BAD_NAMES, ids=[f"name{i}" for i in range(len(BAD_NAMES))])
def test_bad_name(bad: object, fragment: str, create: bool) -> None:
    """A name that cannot name a segment is InvalidArgument saying what is wrong with it."""
    msg = raises(shmq.InvalidArgument, ValueError, lambda: shmq.Queue(bad, create=create))  # type: ignore[arg-type]
    assert fragment in msg
    if isinstance(bad, str) and bad and not {"/", "\0"} & set(bad):
        assert not os.path.exists(segment_path(bad))


def test_longest_name_works() -> None:
    """200 characters is the documented limit, and it works."""
    n = unique_name()
    n += "x" * (200 - len(n))
    try:
        with shmq.Queue(n, create=True, capacity=64) as q, shmq.Queue(n) as other:
            q.put(b"ok", timeout=1)
            assert other.get(timeout=1) == b"ok"
    finally:
        remove_segment(n)


def test_attach_to_missing_name(name: str) -> None:
    """Attaching to a name nobody created is NotFound (a FileNotFoundError) naming the queue."""
    msg = raises(shmq.NotFound, FileNotFoundError, lambda: shmq.Queue(name))
    assert repr(name) in msg
    assert not segment_exists(name)


def test_create_existing_name(q: shmq.Queue) -> None:
    """Creating a name that exists is AlreadyExists (a FileExistsError); the queue is untouched."""
    msg = raises(shmq.AlreadyExists, FileExistsError, lambda: shmq.Queue(q.name, create=True, capacity=64))
    assert repr(q.name) in msg
    assert q.capacity == 1024


@pytest.mark.parametrize("capacity", [2048, 64])
def test_attach_with_wrong_capacity(q: shmq.Queue, capacity: int) -> None:
    """Attaching with another capacity than the segment's is IncompatibleSegment (a ValueError)
    naming the queue and both capacities."""
    msg = raises(shmq.IncompatibleSegment, ValueError, lambda: shmq.Queue(q.name, capacity=capacity))
    assert repr(q.name) in msg
    assert f"has capacity 1024, not {capacity}" in msg


@pytest.mark.parametrize("other", KINDS)
def test_attach_with_wrong_kind(q: shmq.Queue, kind: str, other: str) -> None:
    """Attaching with another kind than the segment's is IncompatibleSegment (a ValueError)
    naming the queue and both kinds; the right kind attaches."""
    if other == kind:
        with shmq.Queue(q.name, kind=other) as same:  # type: ignore[arg-type]
            assert same.kind == kind
        return
    msg = raises(shmq.IncompatibleSegment, ValueError, lambda: shmq.Queue(q.name, kind=other))  # type: ignore[arg-type]
    assert repr(q.name) in msg
    assert f"is a {kind} ring, not {other}" in msg


# -- damaged segments -----------------------------------------------------------

HEADER_DAMAGE: list[tuple[str, int, bytes, type[shmq.ShmqError], str]] = [
    ("magic", _ring.OFF_MAGIC, b"NOTARING", shmq.CorruptSegment, "not a shmq ring"),
    (
        "magic-one-bit",
        _ring.OFF_MAGIC,
        struct.pack("<Q", _ring.MAGIC ^ 1),
        shmq.CorruptSegment,
        "wrong magic",
    ),
    ("magic-zero", _ring.OFF_MAGIC, bytes(8), shmq.CorruptSegment, "never finished"),
    (
        "version-next",
        _ring.OFF_VERSION,
        struct.pack("<I", _ring.VERSION + 1),
        shmq.IncompatibleSegment,
        "version",
    ),
    ("version-1", _ring.OFF_VERSION, struct.pack("<I", 1), shmq.IncompatibleSegment, "version"),
    ("version-0", _ring.OFF_VERSION, struct.pack("<I", 0), shmq.IncompatibleSegment, "version"),
    ("kind-0", _ring.OFF_KIND, struct.pack("<I", 0), shmq.IncompatibleSegment, "unknown ring kind"),
    ("kind-4", _ring.OFF_KIND, struct.pack("<I", 4), shmq.IncompatibleSegment, "unknown ring kind"),
    ("kind-max", _ring.OFF_KIND, b"\xff" * 4, shmq.IncompatibleSegment, "unknown ring kind"),
    ("capacity-double", _ring.OFF_CAPACITY, struct.pack("<Q", 2048), shmq.CorruptSegment, "size"),
    ("capacity-half", _ring.OFF_CAPACITY, struct.pack("<Q", 512), shmq.CorruptSegment, "size"),
    ("capacity-odd", _ring.OFF_CAPACITY, struct.pack("<Q", 1000), shmq.CorruptSegment, "size"),
    ("capacity-zero", _ring.OFF_CAPACITY, bytes(8), shmq.CorruptSegment, "size"),
    ("capacity-huge", _ring.OFF_CAPACITY, struct.pack("<Q", 2**40), shmq.CorruptSegment, "size"),
    ("max_message", _ring.OFF_MAX_MESSAGE, struct.pack("<Q", 999), shmq.CorruptSegment, "size"),
    ("header_size", OFF_HEADER_SIZE, struct.pack("<I", 0), shmq.CorruptSegment, "size"),
]


@pytest.mark.parametrize(
    ("offset", "data", "cls", "fragment"), [h[1:] for h in HEADER_DAMAGE], ids=[h[0] for h in HEADER_DAMAGE]
)
def test_damaged_header_is_refused_on_attach(
    name: str, kind: str, offset: int, data: bytes, cls: type[shmq.ShmqError], fragment: str
) -> None:
    """A segment whose header was overwritten is refused on attach with CorruptSegment or
    IncompatibleSegment naming it; the refusal changes nothing (restoring the bytes restores the
    queue with every message)."""
    loaded(shmq.Queue(name, create=True, kind=kind, capacity=1024)).close()  # type: ignore[arg-type]
    old = write_at(name, offset, data)
    with pytest.raises(cls) as info:
        shmq.Queue(name)
    assert isinstance(info.value, shmq.ShmqError)
    assert repr(name) in str(info.value)
    assert fragment in str(info.value)
    write_at(name, offset, old)
    with shmq.Queue(name) as again:
        assert drain(again) == SENTINELS


@pytest.mark.parametrize("size", [0, 100])
def test_file_smaller_than_a_header(name: str, size: int) -> None:
    """A file at shmq.<name> too small for a header (after the 1 s grace for a creator) is
    CorruptSegment naming its path and size."""
    with open(segment_path(name), "xb") as f:
        f.write(random.Random(size).randbytes(size))
    t0 = time.monotonic()
    with pytest.raises(shmq.CorruptSegment) as info:
        shmq.Queue(name)
    assert time.monotonic() - t0 >= 0.9  # it waited for a creator that might still size it
    assert segment_path(name) in str(info.value)
    assert f"is {size} bytes" in str(info.value)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "size", [4096, _ring.HEADER_SIZE, _ring.HEADER_SIZE + 256, _ring.HEADER_SIZE + 1024, 20_000]
)
def test_file_of_random_bytes(name: str, size: int, seed: int) -> None:
    """A file of random bytes is CorruptSegment naming it, never a crash."""
    with open(segment_path(name), "xb") as f:
        f.write(random.Random(seed).randbytes(size))
    with pytest.raises(shmq.CorruptSegment) as info:
        shmq.Queue(name)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_behind_a_valid_magic(name: str, seed: int) -> None:
    """Random bytes behind a correct magic number are refused (corrupt or incompatible), never a crash."""
    rng = random.Random(seed)
    with open(segment_path(name), "xb") as f:
        f.write(struct.pack("<Q", _ring.MAGIC) + rng.randbytes(_ring.HEADER_SIZE + 256 - 8))
    with pytest.raises((shmq.CorruptSegment, shmq.IncompatibleSegment)) as info:
        shmq.Queue(name)
    assert repr(name) in str(info.value)


def test_valid_header_with_random_data_and_cursors_never_crashes(name: str, kind: str) -> None:
    """A valid header over random frames: every read is CorruptSegment or a message of a legal
    size, never a crash, a hang or an out-of-bounds payload."""
    shmq.Queue(name, create=True, kind=kind, capacity=256).close()  # type: ignore[arg-type]
    rng = random.Random(kind)
    for _ in range(50):
        write_at(name, _ring.HEADER_SIZE, rng.randbytes(256))
        head = rng.randrange(0, 2**40) * 8
        tail = head + rng.randrange(0, 33) * 8
        for off in (_ring.OFF_TAIL_CLAIM, _ring.OFF_TAIL_COMMIT):
            write_at(name, off, struct.pack("<Q", tail))
        for off in (_ring.OFF_HEAD_CLAIM, _ring.OFF_HEAD_RELEASE):
            write_at(name, off, struct.pack("<Q", head))
        with shmq.Queue(name) as damaged:
            for _ in range(4):
                try:
                    got = damaged.get_many(timeout=0)
                except shmq.CorruptSegment:
                    break
                assert all(len(m) <= damaged.max_message for m in got)
                if not got:
                    break


TAIL_GARBAGE: dict[str, tuple[Callable[[int, int], int], bool]] = {
    # name: (garbage tail from the real head and tail, are the queued frames still readable first?)
    "huge": (lambda h, t: 0xDEADBEEF_DEADBEE8, False),
    "behind-head": (lambda h, t: h - 8, False),
    "far-behind": (lambda h, t: 0, False),
    "beyond-capacity": (lambda h, t: h + 1024 + 8, False),
    "all-ones": (lambda h, t: 2**64 - 1, False),
    "misaligned": (lambda h, t: t + 3, True),
    "past-the-frames": (lambda h, t: t + 64, True),
}


def _get_view(q: shmq.Queue) -> list[bytes]:
    with q.get_view(timeout=0.5) as view:
        return [bytes(view)]


GETS: dict[str, Callable[[shmq.Queue], list[bytes]]] = {
    "get_nowait": lambda q: [q.get_nowait()],
    "get": lambda q: [q.get(timeout=0.5)],
    "get_many": lambda q: q.get_many(timeout=0.5),
    "get_view": _get_view,
}


@pytest.mark.parametrize("how", GETS)
@pytest.mark.parametrize("garbage", TAIL_GARBAGE)
def test_garbage_tail_cursor(name: str, kind: str, garbage: str, how: str) -> None:
    """A tail cursor overwritten with garbage makes reads raise CorruptSegment naming the queue,
    every time, rather than crash, hang or return bytes that were never put. Frames that are
    still intact below a plausible garbage tail are delivered first."""
    make_garbage, prefix_readable = TAIL_GARBAGE[garbage]
    with shmq.Queue(name, create=True, kind=kind, capacity=1024) as q:  # type: ignore[arg-type]
        q.put(b"warm-up" * 20, timeout=1)
        assert q.get(timeout=1) == b"warm-up" * 20
        loaded(q)
        head, real_tail = q._counters()["head_release"], q._counters()["tail_commit"]
        assert head == 8 + 140 + 4
        write_at(name, _ring.OFF_TAIL_COMMIT, struct.pack("<Q", make_garbage(head, real_tail)))
        got: list[bytes] = []
        for _ in range(len(SENTINELS) + 1):
            try:
                got.extend(GETS[how](q))
            except shmq.CorruptSegment as exc:
                assert repr(name) in str(exc)
                assert "corrupt" in str(exc)
                break
        else:
            pytest.fail(f"reads after a {garbage} tail never raised CorruptSegment; got {got!r}")
        assert got == (SENTINELS if prefix_readable else [])
        with pytest.raises(shmq.CorruptSegment):
            GETS[how](q)  # and again: it does not go away or turn into data
        if not prefix_readable:
            with pytest.raises(shmq.CorruptSegment):  # a fresh attach refuses the cursors too
                shmq.Queue(name)
        write_at(name, _ring.OFF_TAIL_COMMIT, struct.pack("<Q", real_tail))
        if not prefix_readable:
            with shmq.Queue(name) as repaired:
                assert drain(repaired) == SENTINELS


FRAME_DAMAGE: dict[str, bytes] = {
    "length-huge": struct.pack("<II", 0xFFFFFFF0, _ring.FRAME_MSG),
    "length-over-max": struct.pack("<II", 1024 // 2 - 8 + 1, _ring.FRAME_MSG),
    "length-past-tail": struct.pack("<II", 200, _ring.FRAME_MSG),
    "state-zero": struct.pack("<II", 5, 0),
    "state-unknown": struct.pack("<II", 5, 7),
    "pad-past-the-end": struct.pack("<II", 1024, _ring.FRAME_PAD),
}


@pytest.mark.parametrize("how", GETS)
@pytest.mark.parametrize("damage", FRAME_DAMAGE)
def test_damaged_frame_header(name: str, kind: str, damage: str, how: str) -> None:
    """A frame header overwritten with nonsense is CorruptSegment on read, never a crash or an
    out-of-bounds payload; the cursors stay where they were."""
    with shmq.Queue(name, create=True, kind=kind, capacity=1024) as q:  # type: ignore[arg-type]
        loaded(q)
        before = q._counters()
        write_at(name, _ring.HEADER_SIZE, FRAME_DAMAGE[damage])  # the first queued frame
        with pytest.raises(shmq.CorruptSegment) as info:
            GETS[how](q)
        assert repr(name) in str(info.value)
        after = q._counters()
        assert (after["head_release"], after["tail_commit"]) == (
            before["head_release"],
            before["tail_commit"],
        )


def test_attach_waits_for_a_creator_that_is_still_writing_the_header(name: str) -> None:
    """An attacher that finds a sized segment whose magic is still zero waits for the creator,
    as it does for one that has not sized the file yet."""
    donor = unique_name()
    try:
        shmq.Queue(donor, create=True, capacity=256).close()
        with open(segment_path(donor), "rb") as f:
            header = f.read(_ring.HEADER_SIZE)
    finally:
        remove_segment(donor)
    fd = os.open(segment_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, _ring.HEADER_SIZE + 256)  # sized, header not written yet

    def finish_creating() -> None:
        time.sleep(0.2)
        os.pwrite(fd, header[8:], 8)
        os.pwrite(fd, header[:8], 0)  # magic last, like the real creator

    creator = threading.Thread(target=finish_creating)
    creator.start()
    try:
        with shmq.Queue(name) as q:
            assert q.capacity == 256
    finally:
        creator.join()
        os.close(fd)


# -- closed queues, timeouts, counts --------------------------------------------

AFTER_CLOSE: dict[str, Callable[[shmq.Queue], object]] = {
    "put": lambda q: q.put(b"x", timeout=1),
    "put-no-timeout": lambda q: q.put(b"x"),
    "put_nowait": lambda q: q.put_nowait(b"x"),
    "put_many": lambda q: q.put_many([b"x"], timeout=1),
    "put_view": lambda q: q.put_view(1, timeout=1),
    "put_obj": lambda q: q.put_obj({"a": 1}, timeout=1),
    "get": lambda q: q.get(timeout=1),
    "get-no-timeout": lambda q: q.get(),
    "get_nowait": lambda q: q.get_nowait(),
    "get_many": lambda q: q.get_many(timeout=1),
    "get_view": lambda q: q.get_view(timeout=1),
    "get_obj": lambda q: q.get_obj(timeout=1),
    "qsize": lambda q: q.qsize(),
    "empty": lambda q: q.empty(),
    "full": lambda q: q.full(),
    "stats": lambda q: q.stats(),
}


@pytest.mark.parametrize("op", AFTER_CLOSE)
def test_operations_after_close(q: shmq.Queue, op: str) -> None:
    """Every operation on a closed handle is Closed (a ValueError) naming the queue; the segment
    and its messages stay for other handles."""
    other = shmq.Queue(q.name)
    try:
        q.close()
        msg = raises(shmq.Closed, ValueError, lambda: AFTER_CLOSE[op](q))
        assert repr(q.name) in msg
        assert q.closed is True
        assert drain(other) == SENTINELS
    finally:
        other.close()


TIMEOUT_TAKERS: dict[str, Callable[[shmq.Queue, object], object]] = {
    "put": lambda q, t: q.put(b"x", timeout=t),
    "put_many": lambda q, t: q.put_many([b"x"], timeout=t),
    "put_view": lambda q, t: q.put_view(1, timeout=t),
    "put_obj": lambda q, t: q.put_obj(1, timeout=t),
    "get": lambda q, t: q.get(timeout=t),
    "get_many": lambda q, t: q.get_many(timeout=t),
    "get_view": lambda q, t: q.get_view(timeout=t),
    "get_obj": lambda q, t: q.get_obj(timeout=t),
}


@pytest.mark.parametrize(
    ("timeout", "fragment"), [(-1, "got -1"), (-0.001, "got -0.001"), (float("nan"), "got nan")]
)
@pytest.mark.parametrize("op", TIMEOUT_TAKERS)
def test_negative_timeout(q: shmq.Queue, op: str, timeout: float, fragment: str) -> None:
    """A negative (or NaN) timeout is InvalidArgument (a ValueError) naming it; nothing moves."""
    before = q.stats()
    msg = raises(shmq.InvalidArgument, ValueError, lambda: TIMEOUT_TAKERS[op](q, timeout))
    assert "non-negative" in msg
    assert fragment in msg
    assert q.stats() == before


@pytest.mark.parametrize("op", ["put", "get", "get_many", "put_view"])
def test_timeout_of_wrong_type(q: shmq.Queue, op: str) -> None:
    """A timeout that is not a number is ArgumentTypeError (a TypeError) naming its type."""
    msg = raises(shmq.ArgumentTypeError, TypeError, lambda: TIMEOUT_TAKERS[op](q, "soon"))
    assert "got str" in msg


@pytest.mark.parametrize("max_messages", [0, -1, -(2**40)])
def test_get_many_max_messages_below_one(q: shmq.Queue, max_messages: int) -> None:
    """get_many(max_messages < 1) is InvalidArgument naming the value; nothing is taken."""
    before = q.stats()
    msg = raises(shmq.InvalidArgument, ValueError, lambda: q.get_many(max_messages=max_messages, timeout=1))
    assert f"got {max_messages}" in msg
    assert q.stats() == before


def test_get_many_max_messages_not_an_int(q: shmq.Queue) -> None:
    """get_many(max_messages=1.5) is a TypeError; nothing is taken."""
    before = q.stats()
    raises(TypeError, TypeError, lambda: q.get_many(max_messages=1.5, timeout=1))  # type: ignore[arg-type]
    assert q.stats() == before


@pytest.mark.parametrize(
    "raw",
    [
        bytes(16),
        bytes(24),
        b"",
        b"x" * 100,
        b"\xff" * 64,
    ],
    ids=["zeros16", "zeros24", "empty", "text", "ff"],
)
def test_get_obj_of_a_raw_message(make_queue: Callable[..., shmq.Queue], raw: bytes) -> None:
    """get_obj() of a message that put_obj() did not write is MessageDecodeError (a ValueError)
    saying so; that message is consumed and the next one is intact."""
    q = make_queue(capacity=1024)
    q.put(raw, timeout=1)
    q.put(b"next", timeout=1)
    with pytest.raises(shmq.MessageDecodeError) as info:
        q.get_obj(timeout=1)
    assert "not a put_obj() message" in str(info.value)
    assert repr(q.name) in str(info.value)
    assert q.get(timeout=1) == b"next"
