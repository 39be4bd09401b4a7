"""`shmq.Queue`: a point-to-point message queue over a shared-memory ring.

The hot methods (put, get, their _nowait and _many forms, the views) are the
native `Ring` methods themselves: `Queue` subclasses the C type, so a call
goes straight into C with no Python frame in between. This module adds what
is not hot: naming and lifecycle, pickling, asyncio, objects, statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import struct
import time
from dataclasses import dataclass
from typing import Any, Literal

from shmq._async import RingWaiter
from shmq._attach import ROLE_CREATOR, ROLE_USER
from shmq._errors import Empty, Full, IncompatibleSegment, InvalidArgument, MessageDecodeError, NotFound
from shmq._native import _ring
from shmq._segment import Segment, set_mode, validate_mode, validate_name

log = logging.getLogger("shmq.queue")

Kind = Literal["spsc", "mpsc", "mpmc"]
Wait = Literal["spin", "yield", "block", "adaptive"]

KINDS: dict[str, int] = {"spsc": _ring.KIND_SPSC, "mpsc": _ring.KIND_MPSC, "mpmc": _ring.KIND_MPMC}
WAITS: dict[str, int] = {
    "spin": _ring.WAIT_SPIN,
    "yield": _ring.WAIT_YIELD,
    "block": _ring.WAIT_BLOCK,
    "adaptive": _ring.WAIT_ADAPTIVE,
}
_KIND_NAMES = {v: k for k, v in KINDS.items()}
DEFAULT_CAPACITY = 1 << 20
DEFAULT_KIND: Kind = "mpmc"

# put_obj frames: u32 number of out-of-band buffers, u32 zero, u64 pickle length,
# u64 per buffer length; then the pickle, then each buffer, each 8-byte aligned.
_OBJ_HEADER = struct.Struct("<IIQ")
_OBJ_LENGTH = struct.Struct("<Q")


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of a queue's shared counters (all processes together).

    Counters only grow for the life of the segment; depths are approximate while
    other processes run.
    """

    name: str
    kind: str
    capacity: int  #: data bytes in the ring
    max_message: int  #: largest payload accepted
    depth_messages: int  #: messages put and not yet taken
    depth_bytes: int  #: ring bytes in use, frame headers and padding included
    messages_put: int
    messages_got: int
    bytes_put: int  #: payload bytes
    bytes_got: int
    put_waits: int  #: times a producer went to sleep because the ring was full
    get_waits: int  #: times a consumer went to sleep because the ring was empty
    data_wakes: int  #: futex wakes issued to sleeping consumers
    space_wakes: int  #: futex wakes issued to sleeping producers
    deferred_commits: int  #: claims handed to an earlier producer to commit (see ARCHITECTURE)
    #: dead producers' claims turned into padding so the ring could go on (see ARCHITECTURE)
    dead_producer_claims: int
    #: messages consumers had taken when they died (released for them; not delivered again)
    dead_consumer_messages: int


class Queue(_ring.Ring):
    """A named message queue in shared memory, shared by any processes on this machine.

    ``Queue(name, create=True)`` makes a new segment; ``Queue(name)`` attaches to
    an existing one (its kind and capacity are read from the segment). Messages
    are any C-contiguous buffers, delivered whole and in order (per producer for
    ``mpsc``/``mpmc``). ``wait`` chooses how a blocked call waits: ``"spin"``
    (lowest latency, burns a core), ``"yield"``, ``"block"`` (futex sleep) or
    ``"adaptive"`` (spin ~50 µs, then sleep; the default). ``mode`` sets a created segment's
    permission bits (0o600, the default, lets only this user in; 0o660 with a shared group lets
    that group's processes attach too).
    """

    def __init__(
        self,
        name: str,
        *,
        create: bool = False,
        capacity: int | None = None,
        kind: Kind | None = None,
        wait: Wait = "adaptive",
        mode: int = 0o600,
    ) -> None:
        validate_name(name)
        validate_mode(mode)
        if not isinstance(wait, str) or wait not in WAITS:
            raise InvalidArgument(f"wait must be one of {', '.join(WAITS)}, got {wait!r}")
        if kind is not None and (not isinstance(kind, str) or kind not in KINDS):
            raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if capacity is not None:
            _check_capacity(capacity)
        self._name = name
        self._wait_name: Wait = wait
        self._owner = bool(create)
        self._read_waiter: RingWaiter | None = None
        self._write_waiter: RingWaiter | None = None
        if create:
            cap = DEFAULT_CAPACITY if capacity is None else capacity
            segment, replaced = Segment.create_or_replace(name, _ring.HEADER_SIZE + cap, mode)
            set_mode(name, mode)  # (exactly: the umask may have narrowed it)
            if replaced:
                log.warning("queue %r: replaced the segment left behind under its name: %s", name, replaced)
            try:
                _ring.format_segment(
                    segment.mapping, KINDS[kind or DEFAULT_KIND], cap, os.getpid(), time.time_ns()
                )
                super().__init__(segment.mapping, name, WAITS[wait])
                segment.register(ROLE_CREATOR, self)
            except BaseException:
                segment.close()
                Segment.unlink(name)
                raise
        else:
            segment = Segment.attach(name, _ring.HEADER_SIZE)
            try:
                super().__init__(segment.mapping, name, WAITS[wait])
                if kind is not None and kind != self.kind:
                    raise IncompatibleSegment(
                        f"queue {name!r} is a {self.kind} ring, not {kind}; attach without kind= "
                        f"or with kind={self.kind!r}"
                    )
                if capacity is not None and capacity != self.capacity:
                    raise IncompatibleSegment(
                        f"queue {name!r} has capacity {self.capacity}, not {capacity}; attach "
                        f"without capacity= or with capacity={self.capacity}"
                    )
                segment.register(ROLE_USER, self)
            except BaseException:
                self._close_ring()
                segment.close()
                raise
        self._segment = segment

    # -- identity ---------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> Kind:
        return _KIND_NAMES[self._kind_code]  # type: ignore[return-value]

    @property
    def wait(self) -> Wait:
        return self._wait_name

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.qsize()} queued"
        return (
            f"<shmq.Queue name={self._name!r} kind={self.kind} capacity={self.capacity} "
            f"max_message={self.max_message} wait={self._wait_name} {state}>"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles by name: the receiving process attaches to the same segment.
        return (_attach, (self._name, self._wait_name))

    # -- lifecycle --------------------------------------------------------

    def close(self) -> None:
        """Stop using the queue in this process. The segment stays for the others."""
        for waiter in (self._read_waiter, self._write_waiter):
            if waiter is not None:
                waiter.close()
        if not self.closed and any(self._open_claims()):
            # A put_view / get_view of another thread is still open: our entry must go on
            # saying that a live process holds that claim.
            self._segment.keep_registration()
        self._close_ring()
        self._segment.close()

    def unlink(self) -> None:
        """Remove the queue's name from the system; processes attached keep working."""
        Segment.unlink(self._name)

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close; the creating handle also unlinks the segment."""
        self.close()
        if self._owner:
            with contextlib.suppress(NotFound):
                self.unlink()

    # -- statistics -------------------------------------------------------

    def stats(self) -> QueueStats:
        c = self._counters()
        return QueueStats(
            name=self._name,
            kind=self.kind,
            capacity=self.capacity,
            max_message=self.max_message,
            depth_messages=c["depth_messages"],
            depth_bytes=c["depth_bytes"],
            messages_put=c["messages_put"],
            messages_got=c["messages_got"],
            bytes_put=c["bytes_put"],
            bytes_got=c["bytes_got"],
            put_waits=c["put_waits"],
            get_waits=c["get_waits"],
            data_wakes=c["data_wakes"],
            space_wakes=c["space_wakes"],
            deferred_commits=c["deferred_commits"],
            dead_producer_claims=c["dead_producer_claims"],
            dead_consumer_messages=c["dead_consumer_messages"],
        )

    # -- objects (pickle protocol 5, out-of-band buffers written in place) --

    def put_obj(self, obj: Any, timeout: float | None = None) -> None:
        """Pickle `obj` (protocol 5) into one message. Large buffers (numpy arrays)
        go out of band: copied once, straight into the ring."""
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
        head = _OBJ_HEADER.size + _OBJ_LENGTH.size * len(raws)
        total = _align8(head + len(data)) + sum(_align8(r.nbytes) for r in raws)
        with self.put_view(total, timeout) as view:
            _OBJ_HEADER.pack_into(view, 0, len(raws), 0, len(data))
            for i, raw in enumerate(raws):
                _OBJ_LENGTH.pack_into(view, _OBJ_HEADER.size + _OBJ_LENGTH.size * i, raw.nbytes)
            view[head : head + len(data)] = data
            offset = _align8(head + len(data))
            for raw in raws:
                view[offset : offset + raw.nbytes] = raw
                offset += _align8(raw.nbytes)
        for b in buffers:
            b.release()

    def get_obj(self, timeout: float | None = None) -> Any:
        """Take one message written by put_obj() and unpickle it. Out-of-band
        buffers come back writable (numpy arrays own a private copy)."""
        with self.get_view(timeout) as view:
            payload = bytearray(view)
        return _load_obj(payload, self._name)

    # -- asyncio ----------------------------------------------------------

    async def put_async(self, data: Any, timeout: float | None = None) -> None:
        """Put without blocking the event loop; raises Full after `timeout` seconds."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            try:
                self.put_nowait(data)
                return
            except Full:
                nbytes = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
                if self._write_waiter is None:
                    self._write_waiter = RingWaiter(lambda n, t: self.wait_writable(n, t), self._name)
                if not await self._write_waiter.wait(nbytes, _remaining(deadline)):
                    raise Full(f"queue {self._name!r} stayed full for {timeout} s") from None

    async def get_async(self, timeout: float | None = None) -> bytes:
        """Get without blocking the event loop; raises Empty after `timeout` seconds.

        Cancellation-safe: the message is taken in the event loop only when the
        coroutine is about to return it."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            try:
                return self.get_nowait()
            except Empty:
                if self._read_waiter is None:
                    self._read_waiter = RingWaiter(lambda _n, t: self.wait_readable(t), self._name)
                if not await self._read_waiter.wait(0, _remaining(deadline)):
                    raise Empty(f"queue {self._name!r} stayed empty for {timeout} s") from None


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - asyncio.get_running_loop().time())


def _load_obj(payload: bytearray, name: str) -> Any:
    try:
        count, _, length = _OBJ_HEADER.unpack_from(payload, 0)
        lengths = [
            _OBJ_LENGTH.unpack_from(payload, _OBJ_HEADER.size + _OBJ_LENGTH.size * i)[0] for i in range(count)
        ]
        head = _OBJ_HEADER.size + _OBJ_LENGTH.size * count
        whole = memoryview(payload)
        data = whole[head : head + length]
        offset = _align8(head + length)
        buffers = []
        for n in lengths:
            if offset + n > len(payload):
                raise ValueError("buffer runs past the message")
            buffers.append(whole[offset : offset + n])
            offset += _align8(n)
        if head + length > len(payload):
            raise ValueError("pickle runs past the message")
        return pickle.loads(data, buffers=buffers)
    except Exception as exc:  # struct.error, UnpicklingError, EOFError, ... from foreign bytes
        raise MessageDecodeError(
            f"a message on queue {name!r} is not a put_obj() message ({type(exc).__name__}: {exc}); "
            f"it was consumed. Use get() for raw bytes"
        ) from exc


def _check_capacity(capacity: object) -> None:
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise InvalidArgument(f"capacity must be an int number of bytes, got {type(capacity).__name__}")
    lo, hi = _ring.MIN_CAPACITY, _ring.MAX_CAPACITY
    if capacity < lo or capacity > hi or capacity & (capacity - 1):
        suggestion = min(hi, max(lo, 1 << max(0, capacity - 1).bit_length()))
        raise InvalidArgument(
            f"capacity must be a power of two from {lo} to {hi} bytes, got {capacity}; try {suggestion}"
        )


def _attach(name: str, wait: Wait) -> Queue:
    return Queue(name, wait=wait)
