"""Workers for tests/test_recovery.py: processes that die (or stop) holding claims.

They report through files, as in tests/_workers.py; logs are append-only records written with one
unbuffered write each, so a SIGKILL leaves every record whole.
"""

from __future__ import annotations

import os
import random
import threading
import time

import shmq
from tests._workers import OP_TIMEOUT, RECORD, check_message, dump, make_message

MAX_BODY = 200  # small messages: a 4 KiB ring wraps and fills often


def record(data: object) -> bytes:
    """The log record for a message taken (a garbled one is logged as not ok)."""
    producer, seq, ok = check_message(data, MAX_BODY)
    return RECORD.pack(producer & 0xFFFFFFFF, seq & 0xFFFFFFFF, ok)


def wait_for_file(path: str, timeout: float = OP_TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.002)


def create_and_wait(name: str, kind: str, capacity: int, marker: str) -> None:
    """Create the queue, say so, and stay until killed (a creator that dies with everyone else)."""
    q = shmq.Queue(name, create=True, kind=kind, capacity=capacity, wait="block")  # type: ignore[arg-type]
    dump(marker, True)
    time.sleep(3600)
    q.close()


def hold_put_view_until(name: str, payload: bytes, marker: str, release: str) -> None:
    """Open a put_view, say so in `marker`, wait for `release` to exist, then fill and commit it."""
    q = shmq.Queue(name, wait="block")
    with q.put_view(len(payload), timeout=OP_TIMEOUT) as buf:
        dump(marker, True)
        wait_for_file(release)
        buf[:] = payload
    q.close()


def views_in_threads(name: str, side: str, steps: list[tuple[str | None, str]]) -> None:
    """For each (gate, marker): wait for the gate file (if any), open a view in a new thread
    (side "put": a put_view of 8 bytes, filled with b"dead<i>..."; "get": a get_view, whose
    bytes go in the marker), and write the marker once it is open. Then hold them all until
    killed."""
    q = shmq.Queue(name, wait="block")
    forever = threading.Event()
    for i, (gate, marker) in enumerate(steps):
        if gate is not None:
            wait_for_file(gate)
        opened = threading.Event()
        held: list[bytes] = []

        def hold(i: int = i, opened: threading.Event = opened, held: list[bytes] = held) -> None:
            if side == "put":
                with q.put_view(8, timeout=OP_TIMEOUT) as buf:
                    buf[:] = f"dead{i:04d}".encode()
                    opened.set()
                    forever.wait()
            else:
                with q.get_view(timeout=OP_TIMEOUT) as view:
                    held.append(bytes(view))
                    opened.set()
                    forever.wait()

        threading.Thread(target=hold, daemon=True).start()
        if not opened.wait(OP_TIMEOUT):
            raise TimeoutError(f"view {i} never opened")
        dump(marker, held[0] if held else True)
    forever.wait(3600)


def fault_producer(name: str, producer: int, count: int, seed: int, log_path: str) -> None:
    """Put `count` numbered messages in random ways (put, put_many, put_view that dawdles inside
    the view), logging each one once the call that put it has returned (it is then committed)."""
    rng = random.Random(seed)
    q = shmq.Queue(name, wait="block")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    seq = 0
    while seq < count:
        mode = rng.choice(("put", "many", "view", "view"))
        if mode == "many":
            batch = [
                make_message(producer, s, MAX_BODY) for s in range(seq, min(count, seq + rng.randint(1, 4)))
            ]
            assert q.put_many(batch, timeout=OP_TIMEOUT) == len(batch)
        elif mode == "view":
            msg = make_message(producer, seq, MAX_BODY)
            with q.put_view(len(msg), timeout=OP_TIMEOUT) as buf:
                buf[:] = msg
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0, 0.004))  # a window to be killed in, holding the claim
            batch = [msg]
        else:
            batch = [make_message(producer, seq, MAX_BODY)]
            q.put(batch[0], timeout=OP_TIMEOUT)
        os.write(fd, b"".join(RECORD.pack(producer, s, 1) for s in range(seq, seq + len(batch))))
        seq += len(batch)
    os.close(fd)
    q.close()


def fault_consumer(name: str, seed: int, log_path: str, done_path: str) -> None:
    """Take messages with get_view (sometimes dawdling inside it) or get, logging each one inside
    the view, before it is released; stop once `done_path` exists and the ring is empty."""
    rng = random.Random(seed)
    q = shmq.Queue(name, wait="block")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    while True:
        try:
            if rng.random() < 0.7:
                with q.get_view(timeout=0.05) as view:
                    os.write(fd, record(view))
                    if rng.random() < 0.5:
                        time.sleep(rng.uniform(0, 0.01))  # killed here: dies holding the view
            else:
                data = q.get(timeout=0.05)
                os.write(fd, record(data))
        except shmq.Empty:
            if os.path.exists(done_path):
                break
    os.close(fd)
    q.close()
