"""Module-level worker functions for spawned processes (the spawn context needs importable targets).

Workers report through files (pickles written atomically), never through shmq itself, so a bug in
shmq cannot hide in the reporting channel. Every blocking call has a timeout: a worker that waits too
long raises, exits non-zero and prints its traceback, which the test sees as a non-zero exitcode.
"""

from __future__ import annotations

import os
import pickle
import random
import struct
import time
import zlib
from typing import Any

import shmq

QueueRef = shmq.Queue | str  # a worker accepts a pickled Queue (attaches on unpickling) or a name
OP_TIMEOUT = 30.0  # seconds any single blocking call in a worker may take before it counts as a hang

# -- numbered, checksummed messages ------------------------------------------------------------

_HEAD = struct.Struct("<III")  # producer id, sequence number, body length
_TAIL = struct.Struct("<I")  # crc32 of head + body
MAX_BODY = 2000
RECORD = struct.Struct("<IIB")  # producer, seq, ok: one record of a consumer's append-only log


def body(producer: int, seq: int, max_body: int = MAX_BODY) -> bytes:
    """The deterministic body of message (producer, seq): random length 0..max_body."""
    rng = random.Random(producer * 1_000_003 + seq)
    return rng.randbytes(rng.randint(0, max_body))


def make_message(producer: int, seq: int, max_body: int = MAX_BODY) -> bytes:
    b = body(producer, seq, max_body)
    head = _HEAD.pack(producer, seq, len(b)) + b
    return head + _TAIL.pack(zlib.crc32(head))


def check_message(data: Any, max_body: int = MAX_BODY) -> tuple[int, int, bool]:
    """(producer, seq, ok) for a message buffer; ok means length, checksum and exact body all match."""
    view = memoryview(data)
    if view.nbytes < _HEAD.size + _TAIL.size:
        return (-1, -1, False)
    producer, seq, n = _HEAD.unpack_from(view, 0)
    if view.nbytes != _HEAD.size + n + _TAIL.size:
        return (producer, seq, False)
    (crc,) = _TAIL.unpack_from(view, _HEAD.size + n)
    ok = crc == zlib.crc32(view[: _HEAD.size + n]) and view[_HEAD.size : _HEAD.size + n] == body(
        producer, seq, max_body
    )
    return (producer, seq, ok)


# -- reporting ---------------------------------------------------------------------------------


def dump(path: str, obj: object) -> None:
    """Write a pickle atomically: a reader sees the whole result or no file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, path)


def load(path: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def read_records(path: str) -> list[tuple[int, int, bool]]:
    """Complete records of an append-only log written with RECORD (a torn tail is ignored)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    whole = len(raw) - len(raw) % RECORD.size
    return [(p, s, bool(ok)) for p, s, ok in RECORD.iter_unpack(raw[:whole])]


def _attach(ref: QueueRef, wait: str | None = None) -> shmq.Queue:
    if isinstance(ref, shmq.Queue):
        return ref
    return shmq.Queue(ref, wait=wait or "adaptive")  # type: ignore[arg-type]


# -- stress producers and consumers ------------------------------------------------------------

PRODUCER_MODES = ("put", "many", "view", "nowait", "short", "mixed")
CONSUMER_MODES = ("get", "many", "view", "mixed")


def _put_many_all(q: shmq.Queue, batch: list[bytes], deadline: float) -> None:
    """put_many returns how many it put when the timeout passes: resend the rest, in order."""
    while batch:
        n = q.put_many(batch, timeout=OP_TIMEOUT)
        batch = batch[n:]
        if batch and time.monotonic() > deadline:
            raise shmq.Full(f"put_many made no progress for {OP_TIMEOUT} s")


def producer(ref: QueueRef, wait: str, producer_id: int, count: int, mode: str, seed: int) -> None:
    """Put messages (producer_id, 0..count-1) in order, using one put style or a random mix."""
    q = _attach(ref, wait)
    rng = random.Random(seed)
    seq = 0
    while seq < count:
        style = rng.choice(PRODUCER_MODES[:5]) if mode == "mixed" else mode
        if style == "many":
            n = min(count - seq, rng.randint(1, 16))
            _put_many_all(
                q, [make_message(producer_id, s) for s in range(seq, seq + n)], time.monotonic() + OP_TIMEOUT
            )
            seq += n
            continue
        msg = make_message(producer_id, seq)
        if style == "put":
            q.put(msg, timeout=OP_TIMEOUT)
        elif style == "view":
            with q.put_view(len(msg), timeout=OP_TIMEOUT) as buf:
                buf[:] = msg
        elif style in ("nowait", "short"):
            # put_nowait / a ~1 ms deadline: on multi-producer rings a claim whose commit turn has
            # not come by then is handed over to the predecessor's committer (deferred commit)
            try:
                if style == "nowait":
                    q.put_nowait(msg)
                else:
                    q.put(msg, timeout=rng.uniform(0, 0.002))
            except shmq.Full:
                q.put(msg, timeout=OP_TIMEOUT)
        else:
            raise ValueError(style)
        seq += 1
    q.close()


def consumer(ref: QueueRef, wait: str, mode: str, out_path: str, done_path: str, seed: int) -> None:
    """Take messages until `done_path` exists and the ring is empty; dump [(producer, seq, ok)].

    The done flag is read *before* the get that finds the ring empty: the test creates it only
    after every producer has exited, so that Empty proves nothing more will come.
    """
    q = _attach(ref, wait)
    rng = random.Random(seed)
    got: list[tuple[int, int, bool]] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        done = os.path.exists(done_path)
        style = rng.choice(CONSUMER_MODES[:3]) if mode == "mixed" else mode
        try:
            if style == "get":
                got.append(check_message(q.get(timeout=0.05)))
            elif style == "many":
                batch = q.get_many(max_messages=rng.randint(1, 32), timeout=0.05)
                if not batch:
                    raise shmq.Empty
                got.extend(check_message(m) for m in batch)
            elif style == "view":
                with q.get_view(timeout=0.05) as view:
                    got.append(check_message(view))  # checked in place, while leased
            else:
                raise ValueError(style)
        except shmq.Empty:
            if done:
                break
    else:
        raise TimeoutError("consumer never saw the done flag")
    q.close()
    dump(out_path, got)


def logging_consumer(ref: QueueRef, wait: str, log_path: str, pause: float) -> None:
    """A slow consumer that appends one RECORD per message with a single write (for SIGKILL tests).

    It spends nearly all its time sleeping or blocked in get(), never inside a claim, so a SIGKILL
    almost surely lands outside one; at most the one message taken just before the kill is unlogged.
    """
    q = _attach(ref, wait)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    while True:
        p, s, ok = check_message(q.get(timeout=OP_TIMEOUT * 2))
        os.write(fd, RECORD.pack(p, s, ok))
        time.sleep(pause)


def paced_producer(ref: QueueRef, wait: str, producer_id: int, count: int, every: int, pause: float) -> None:
    """Put `count` numbered messages, sleeping `pause` s after every `every` (runs for a while)."""
    q = _attach(ref, wait)
    for seq in range(count):
        q.put(make_message(producer_id, seq), timeout=OP_TIMEOUT)
        if seq % every == every - 1:
            time.sleep(pause)
    q.close()


def hold_get_view(ref: QueueRef, wait: str, marker_path: str) -> None:
    """Lease one message with get_view and keep it (until killed)."""
    q = _attach(ref, wait)
    with q.get_view(timeout=OP_TIMEOUT) as view:
        dump(marker_path, bytes(view))
        time.sleep(OP_TIMEOUT * 4)


def hold_put_view(ref: QueueRef, wait: str, marker_path: str, hold: float) -> None:
    """Claim space with put_view, keep it open `hold` seconds, then commit b"held"."""
    q = _attach(ref, wait)
    with q.put_view(4, timeout=OP_TIMEOUT) as buf:
        dump(marker_path, time.monotonic())
        time.sleep(hold)
        buf[:] = b"held"
    q.close()


# -- small point-to-point helpers --------------------------------------------------------------


def timed_get(ref: QueueRef, wait: str, timeout: float, out_path: str) -> None:
    """get(timeout) once; dump ("ok", data, elapsed) or ("empty", None, elapsed)."""
    q = _attach(ref, wait)
    t0 = time.monotonic()
    try:
        data = q.get(timeout=timeout)
    except shmq.Empty:
        dump(out_path, ("empty", None, time.monotonic() - t0))
    else:
        dump(out_path, ("ok", data, time.monotonic() - t0))
    q.close()


def timed_put(ref: QueueRef, wait: str, data: bytes, timeout: float, out_path: str) -> None:
    """put(data, timeout) once; dump ("ok", elapsed) or ("full", elapsed)."""
    q = _attach(ref, wait)
    t0 = time.monotonic()
    try:
        q.put(data, timeout=timeout)
    except shmq.Full:
        dump(out_path, ("full", time.monotonic() - t0))
    else:
        dump(out_path, ("ok", time.monotonic() - t0))
    q.close()


def timed_put_many(ref: QueueRef, wait: str, messages: list[bytes], timeout: float, out_path: str) -> None:
    """put_many(messages, timeout) once; dump ("ok", count) or ("full", None) if it raised."""
    q = _attach(ref, wait)
    try:
        n = q.put_many(messages, timeout=timeout)
    except shmq.Full:
        dump(out_path, ("full", None))
    else:
        dump(out_path, ("ok", n))
    q.close()


def put_all(ref: QueueRef, wait: str, messages: list[bytes], delay: float = 0.0) -> None:
    """Sleep `delay`, then put every message (blocking, with a timeout)."""
    q = _attach(ref, wait)
    time.sleep(delay)
    for m in messages:
        q.put(m, timeout=OP_TIMEOUT)
    q.close()


def get_all(ref: QueueRef, wait: str, count: int, out_path: str, delay: float = 0.0) -> None:
    """Sleep `delay`, then get `count` messages; dump them as a list."""
    q = _attach(ref, wait)
    time.sleep(delay)
    got = [q.get(timeout=OP_TIMEOUT) for _ in range(count)]
    q.close()
    dump(out_path, got)


def numbered_producer(ref: QueueRef, count: int, seed: int, max_pause: float) -> None:
    """Put u32 numbers 0..count-1 at random moments (bursts and pauses)."""
    q = _attach(ref)
    rng = random.Random(seed)
    for i in range(count):
        q.put(struct.pack("<I", i), timeout=OP_TIMEOUT)
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0, max_pause))
    q.close()


def queue_identity(q: shmq.Queue, out_path: str, messages: list[bytes], use_with: bool) -> None:
    """Receive a Queue as a Process argument: report what it attached to, put messages, exit.

    With use_with the child leaves a `with q:` block: a non-creating handle must not unlink.
    """
    ident = (q.name, q.kind, q.capacity, q.max_message, q.wait)
    if use_with:
        with q:
            for m in messages:
                q.put(m, timeout=OP_TIMEOUT)
    else:
        for m in messages:
            q.put(m, timeout=OP_TIMEOUT)  # and exit without close(): the handle is just dropped
    dump(out_path, ident)


# -- numpy ---------------------------------------------------------------------------------------


def numpy_obj_echo(q_in: shmq.Queue, q_out: shmq.Queue) -> None:
    """get_obj a dict of arrays, double every array in place (they must be writable), put_obj it back."""
    import numpy as np

    obj = q_in.get_obj(timeout=OP_TIMEOUT)
    for value in obj.values():
        if isinstance(value, np.ndarray) and value.dtype.names:
            for field in value.dtype.names:
                value[field] *= 2
        elif isinstance(value, np.ndarray):
            value *= 2
    obj["flags"] = {
        k: (v.flags.writeable, v.flags.c_contiguous, v.flags.f_contiguous)
        for k, v in obj.items()
        if isinstance(v, np.ndarray)
    }
    q_out.put_obj(obj, timeout=OP_TIMEOUT)


def numpy_view_echo(q_in: shmq.Queue, q_out: shmq.Queue, shape: tuple[int, ...], dtype: str) -> None:
    """Read a raw array through get_view + numpy.frombuffer (copied inside the block); send back x*3+1."""
    import numpy as np

    with q_in.get_view(timeout=OP_TIMEOUT) as view:
        arr = np.frombuffer(view, dtype=dtype).reshape(shape).copy()
    q_out.put(arr * 3 + 1, timeout=OP_TIMEOUT)


# -- signals and CPU -----------------------------------------------------------------------------


def idle_get_cpu(ref: QueueRef, wait: str, seconds: float, out_path: str) -> None:
    """Block in get(timeout=seconds) on an empty queue; dump (outcome, wall seconds, CPU seconds)."""
    q = _attach(ref, wait)
    wall0, cpu0 = time.monotonic(), time.process_time()
    try:
        q.get(timeout=seconds)
        outcome = "got"
    except shmq.Empty:
        outcome = "empty"
    dump(out_path, (outcome, time.monotonic() - wall0, time.process_time() - cpu0))
    q.close()


def racing_getter(ref: QueueRef, wait: str, seconds: float, seed: int, out_path: str) -> None:
    """For `seconds`, get() with short random timeouts; dump (messages received, Empty count)."""
    q = _attach(ref, wait)
    rng = random.Random(seed)
    got: list[bytes] = []
    empties = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            got.append(q.get(timeout=rng.uniform(0.002, 0.03)))
        except shmq.Empty:
            empties += 1
    q.close()
    dump(out_path, (got, empties))


def racing_putter(ref: QueueRef, wait: str, count: int, size: int, seed: int, out_path: str) -> None:
    """put(message i, short random timeout) for i in range(count); dump (indices put, indices Full)."""
    q = _attach(ref, wait)
    rng = random.Random(seed)
    ok: list[int] = []
    full: list[int] = []
    for i in range(count):
        try:
            q.put(struct.pack("<I", i) * (size // 4), timeout=rng.uniform(0.002, 0.03))
            ok.append(i)
        except shmq.Full:
            full.append(i)
    q.close()
    dump(out_path, (ok, full))


# -- parent-side helpers -------------------------------------------------------------------------


def wait_until(predicate: Any, timeout: float, interval: float = 0.005) -> bool:
    """Poll `predicate()` until it is true or `timeout` seconds pass; return its last value."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return bool(predicate())
        time.sleep(interval)


def join_all(procs: list[Any], timeout: float) -> None:
    """Join every process within one overall deadline (some may still be alive afterwards)."""
    end = time.monotonic() + timeout
    for p in procs:
        if p.pid is not None:  # started
            p.join(max(0.0, end - time.monotonic()))


def stop_all(procs: list[Any]) -> None:
    """SIGKILL whatever is still alive among `procs` (our own children only) and reap them."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.kill()
    for p in started:
        p.join(5)


def idle_get_async_cpu(ref: QueueRef, seconds: float, out_path: str) -> None:
    """await get_async(timeout=seconds) on an empty queue; dump (outcome, wall s, CPU s of all threads)."""
    import asyncio

    q = _attach(ref)
    wall0, cpu0 = time.monotonic(), time.process_time()
    try:
        asyncio.run(q.get_async(timeout=seconds))
        outcome = "got"
    except shmq.Empty:
        outcome = "empty"
    dump(out_path, (outcome, time.monotonic() - wall0, time.process_time() - cpu0))
    q.close()


def timed_put_behind(ref: QueueRef, timeout: float, out_path: str) -> None:
    """put(b"behind", timeout); dump (outcome, monotonic start, monotonic end)."""
    q = _attach(ref, "block")
    t0 = time.monotonic()
    try:
        q.put(b"behind", timeout=timeout)
        outcome = "ok"
    except shmq.Full:
        outcome = "full"
    dump(out_path, (outcome, t0, time.monotonic()))
    q.close()
