"""Adapters and worker loops for benchmarks/bench_queue.py (runs in spawned processes).

Every implementation is driven by the same loops, through plain bound methods so
that no adapter layer sits between the loop and the library call:

* round trip: role A times ``put(msg); get()`` with ``time.perf_counter_ns``; role B
  echoes (``put(get())``). Busy-poll ("spin") variants of the peers loop on their
  non-blocking call: ``Pipe.poll()``, ``get_nowait()``, ``recv(zmq.NOBLOCK)``.
* throughput: role A calls ``put(msg)`` n times (``put_many(batch)`` n/B times);
  role B calls ``get()`` n times (``get_many()`` until n messages arrived). A
  reports the clock before its first call, B the clock after its last
  (CLOCK_MONOTONIC is one clock for every process).
* view (1 MiB): one copy on each side, into and out of the transport: A copies a
  prepared numpy array into the message (shmq ``put_view``; Pipe ``send_bytes``;
  zmq ``send``) and stamps the sequence number; B copies the message into a
  reused buffer (shmq ``get_view``; Pipe ``recv_bytes_into``; zmq
  ``recv(copy=False)`` and a copy) and finally checks the last stamp.
* idle: role B waits on an empty channel and reports its CPU time per wall time.

Channels are created by the parent (``make_channels``), so the parent alone owns
their lifetime and can clean up after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import signal
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

IMPLS = ("shmq", "mp.Queue", "mp.Pipe", "faster-fifo", "pyzmq")
STAMP = struct.Struct("<Q")
BATCH_GET = 1024  # max messages per get_many call (shmq's default; passed to faster-fifo too)


def identity(data: Any) -> Any:
    """faster-fifo ``dumps``: send the bytes as they are (no pickling), like shmq and Pipe."""
    return data


def availability(impl: str) -> str | None:
    """None if `impl` can run here, else why not."""
    mod = {"faster-fifo": "faster_fifo", "pyzmq": "zmq", "shmq": "shmq"}.get(impl)
    if mod is None:
        return None
    try:
        __import__(mod)
    except ImportError:
        return "not installed"
    return None


# ---------------------------------------------------------------------------
# Parent side: channels
# ---------------------------------------------------------------------------


@dataclass
class Channels:
    """What each role receives (picklable for spawn), and how the parent cleans up."""

    handles: dict[str, Any]
    cleanup: Callable[[], None]
    after_start: Callable[[], None] = field(default=lambda: None)
    stats: Callable[[], dict[str, int]] | None = None  # shmq: the rings' shared wait/wake counters


def make_channels(
    impl: str, spec: dict[str, Any], ctx: Any, names: Callable[[], str], tmpdir: str
) -> Channels:
    """Create the channel(s) a scenario needs. spec["kind"] is rtt, tput or idle."""
    count = 2 if spec["kind"] == "rtt" else 1
    if impl == "shmq":
        import shmq

        queues = [
            shmq.Queue(names(), create=True, capacity=spec["capacity"], kind=spec["ring"], wait=spec["wait"])
            for _ in range(count)
        ]
        handles = [q.name for q in queues]

        def cleanup() -> None:
            for q in queues:
                q.close()
                with contextlib.suppress(shmq.NotFound):
                    q.unlink()

        def stats() -> dict[str, int]:
            keys = ("messages_got", "put_waits", "get_waits", "data_wakes", "space_wakes")
            counters = [q.stats() for q in queues]
            return {k: sum(getattr(c, k) for c in counters) for k in keys}

        return Channels({"A": handles, "B": handles}, cleanup, stats=stats)
    if impl == "mp.Queue":
        mq = [ctx.Queue() for _ in range(count)]

        def cleanup() -> None:
            for q in mq:
                q.close()
                q.cancel_join_thread()

        return Channels({"A": mq, "B": mq}, cleanup)
    if impl == "mp.Pipe":
        a, b = ctx.Pipe()  # the default: duplex (a Unix socketpair)

        def close_both() -> None:
            a.close()
            b.close()

        if spec["kind"] == "idle":  # no process holds A: keep it open here, or B would see EOF
            return Channels({"B": b}, close_both, after_start=b.close)
        return Channels({"A": a, "B": b}, close_both, after_start=close_both)
    if impl == "faster-fifo":
        import faster_fifo

        fq = [
            faster_fifo.Queue(max_size_bytes=spec["capacity"], loads=bytes, dumps=identity)
            for _ in range(count)
        ]

        def cleanup() -> None:
            for q in fq:
                q.close()

        return Channels({"A": fq, "B": fq}, cleanup)
    if impl == "pyzmq":
        address = f"ipc://{os.path.join(tmpdir, names())}.sock"
        return Channels({"A": address, "B": address}, lambda: None)
    raise ValueError(impl)


# ---------------------------------------------------------------------------
# Child side: endpoints
# ---------------------------------------------------------------------------


@dataclass
class Endpoint:
    put: Callable[[Any], Any] | None = None
    get: Callable[[], Any] | None = None
    put_many: Callable[[Any], Any] | None = None
    get_many: Callable[[], Any] | None = None
    view_produce: Callable[[int, Any], None] | None = None
    view_consume: Callable[[int, Any], int] | None = None
    idle_wait: Callable[[float], None] | None = None
    close: Callable[[], None] = field(default=lambda: None)


def _spin_get(get_nowait: Callable[[], Any], empty: type[BaseException]) -> Callable[[], Any]:
    def get() -> Any:
        while True:
            try:
                return get_nowait()
            except empty:
                pass

    return get


def _open_shmq(role: str, spec: dict[str, Any], handles: list[str]) -> Endpoint:
    import shmq

    qs = [shmq.Queue(name, wait=spec["wait"]) for name in handles]
    out = qs[0] if role == "A" else (qs[1] if len(qs) > 1 else None)
    inp = qs[0] if role == "B" else (qs[1] if len(qs) > 1 else None)

    def close() -> None:
        for q in qs:
            q.close()

    ep = Endpoint(close=close)
    if out is not None:
        ep.put, ep.put_many = out.put, out.put_many
        put_view = out.put_view

        def view_produce(n: int, src: Any) -> None:
            size, stamp = len(src), STAMP.pack_into
            for i in range(n):
                with put_view(size) as v:
                    v[:] = src
                    stamp(v, 0, i)

        ep.view_produce = view_produce
    if inp is not None:
        ep.get, ep.get_many = inp.get, inp.get_many
        get_view = inp.get_view

        def view_consume(n: int, dst: Any) -> int:
            for _ in range(n):
                with get_view() as v:
                    dst[:] = v
            return int(STAMP.unpack_from(dst, 0)[0])

        def idle_wait(seconds: float) -> None:
            with contextlib.suppress(shmq.Empty):
                inp.get(timeout=seconds)

        ep.view_consume, ep.idle_wait = view_consume, idle_wait
    return ep


def _ends(role: str, handles: list[Any]) -> tuple[Any, Any]:
    """(out, in) for this role: A sends on handles[0], B receives on it; handles[1] is the way back."""
    back = handles[1] if len(handles) > 1 else None
    return (handles[0], back) if role == "A" else (back, handles[0])


def _open_mp_queue(role: str, spec: dict[str, Any], handles: list[Any]) -> Endpoint:
    out, inp = _ends(role, handles)
    ep = Endpoint()
    if out is not None:
        ep.put = out.put
    if inp is not None:
        ep.get = _spin_get(inp.get_nowait, queue.Empty) if spec.get("poll") else inp.get

        def idle_wait(seconds: float) -> None:
            with contextlib.suppress(queue.Empty):
                inp.get(timeout=seconds)

        ep.idle_wait = idle_wait
    return ep


def _open_pipe(role: str, spec: dict[str, Any], conn: Any) -> Endpoint:
    ep = Endpoint(put=conn.send_bytes, close=conn.close)
    if spec.get("poll"):
        poll, recv = conn.poll, conn.recv_bytes

        def get() -> bytes:
            while not poll():
                pass
            return recv()

        ep.get = get
    else:
        ep.get = conn.recv_bytes

    def view_produce(n: int, src: Any) -> None:
        send, stamp = conn.send_bytes, STAMP.pack_into
        for i in range(n):
            stamp(src, 0, i)  # the kernel copies it during send_bytes
            send(src)

    def view_consume(n: int, dst: Any) -> int:
        recv_into = conn.recv_bytes_into
        for _ in range(n):
            recv_into(dst)
        return int(STAMP.unpack_from(dst, 0)[0])

    ep.view_produce, ep.view_consume, ep.idle_wait = view_produce, view_consume, conn.poll
    return ep


def _open_faster_fifo(role: str, spec: dict[str, Any], handles: list[Any]) -> Endpoint:
    out, inp = _ends(role, handles)
    ep = Endpoint()
    if out is not None:
        ep.put, ep.put_many = out.put, out.put_many
    if inp is not None:
        if spec.get("poll"):
            ep.get = _spin_get(inp.get_nowait, queue.Empty)
        else:
            ep.get = inp.get
        get_many = inp.get_many

        def get_batch() -> list[bytes]:
            return get_many(max_messages_to_get=BATCH_GET)

        def idle_wait(seconds: float) -> None:
            with contextlib.suppress(queue.Empty):
                inp.get(timeout=seconds)

        ep.get_many, ep.idle_wait = get_batch, idle_wait
    return ep


def _open_zmq(role: str, spec: dict[str, Any], address: str) -> Endpoint:
    import zmq

    zctx = zmq.Context()
    sock = zctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    if spec["size"] >= 1 << 16:  # bound the buffering of big messages (default HWM: 1000 messages)
        sock.setsockopt(zmq.SNDHWM, 8)
        sock.setsockopt(zmq.RCVHWM, 8)
    if role == "B":
        sock.bind(address)
    else:
        sock.connect(address)

    def close() -> None:
        sock.close(linger=0)
        zctx.term()

    ep = Endpoint(put=sock.send, close=close)
    if spec.get("poll"):
        recv, noblock = sock.recv, zmq.NOBLOCK

        def get() -> bytes:
            while True:
                try:
                    return recv(noblock)
                except zmq.Again:
                    pass

        ep.get = get
    else:
        ep.get = sock.recv

    def view_produce(n: int, src: Any) -> None:
        send, stamp = sock.send, STAMP.pack_into
        for i in range(n):
            stamp(src, 0, i)
            send(src)  # copy=True: zmq copies the buffer into its message

    def view_consume(n: int, dst: Any) -> int:
        recv = sock.recv
        for _ in range(n):
            frame = recv(copy=False)
            dst[:] = frame.buffer
        return int(STAMP.unpack_from(dst, 0)[0])

    def idle_wait(seconds: float) -> None:
        sock.poll(int(seconds * 1000))

    ep.view_produce, ep.view_consume, ep.idle_wait = view_produce, view_consume, idle_wait
    return ep


OPENERS: dict[str, Callable[[str, dict[str, Any], Any], Endpoint]] = {
    "shmq": _open_shmq,
    "mp.Queue": _open_mp_queue,
    "mp.Pipe": _open_pipe,
    "faster-fifo": _open_faster_fifo,
    "pyzmq": _open_zmq,
}


# ---------------------------------------------------------------------------
# Child side: the measured loops
# ---------------------------------------------------------------------------


def percentiles(samples: list[int]) -> dict[str, float]:
    """Nearest-rank percentiles in ns (the rule c_pingpong.c uses)."""
    s = sorted(samples)
    n = len(s)

    def rank(q: float) -> int:
        return s[min(n, max(1, int(q * n + 0.999999999))) - 1]

    return {
        "n": n,
        "min": s[0],
        "p50": rank(0.50),
        "p99": rank(0.99),
        "p999": rank(0.999),
        "max": s[-1],
        "mean": sum(s) / n,
    }


def _rtt_client(ep: Endpoint, n: int, msg: bytes) -> dict[str, Any]:
    put, get, clock = ep.put, ep.get, time.perf_counter_ns
    assert put is not None and get is not None
    lat = [0] * n
    reply = b""
    for i in range(n):
        t0 = clock()
        put(msg)
        reply = get()
        lat[i] = clock() - t0
    if bytes(reply) != msg:
        raise RuntimeError("the echo came back different")
    return percentiles(lat)


def _rtt_server(ep: Endpoint, n: int) -> dict[str, Any]:
    put, get = ep.put, ep.get
    assert put is not None and get is not None
    for _ in range(n):
        put(get())
    return {}


def _produce(ep: Endpoint, spec: dict[str, Any], n: int) -> dict[str, Any]:
    mode, size = spec["mode"], spec["size"]
    clock = time.perf_counter_ns
    if mode == "view":
        import numpy as np

        src = memoryview(np.arange(size, dtype=np.uint64).view(np.uint8)[:size])
        assert ep.view_produce is not None
        t0 = clock()
        ep.view_produce(n, src)
    elif mode == "batch":
        assert ep.put_many is not None
        batch = [b"\xab" * size] * spec["batch"]
        put_many = ep.put_many
        t0 = clock()
        for _ in range(n // spec["batch"]):
            put_many(batch)
    else:
        msg = b"\xab" * size
        put = ep.put
        assert put is not None
        t0 = clock()
        for _ in range(n):
            put(msg)
    return {"t0": t0, "t_put_done": clock()}


def _consume(ep: Endpoint, spec: dict[str, Any], n: int) -> dict[str, Any]:
    mode, size = spec["mode"], spec["size"]
    clock = time.perf_counter_ns
    result: dict[str, Any] = {}
    if mode == "view":
        dst = memoryview(bytearray(size))
        assert ep.view_consume is not None
        last = ep.view_consume(n, dst)
        t1 = clock()
        if last != n - 1:
            raise RuntimeError(f"last message carried stamp {last}, expected {n - 1}")
    elif mode == "batch":
        get_many = ep.get_many
        assert get_many is not None
        got = calls = 0
        while got < n:
            got += len(get_many())
            calls += 1
        t1 = clock()
        result["messages_per_get_many"] = got / calls
    else:
        get = ep.get
        assert get is not None
        last = b""
        for _ in range(n):
            last = get()
        t1 = clock()
        if len(last) != size:
            raise RuntimeError(f"got a {len(last)}-byte message, expected {size}")
    result["t1"] = t1
    return result


def _idle(ep: Endpoint, seconds: float) -> dict[str, Any]:
    assert ep.idle_wait is not None
    cpu0, wall0 = time.process_time(), time.perf_counter()
    ep.idle_wait(seconds)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"cpu_s": cpu, "wall_s": wall, "core_percent": 100.0 * cpu / wall}


def _run(role: str, ep: Endpoint, spec: dict[str, Any], n: Any) -> dict[str, Any]:
    kind = spec["kind"]
    if kind == "rtt":
        return _rtt_client(ep, n, b"\xab" * spec["size"]) if role == "A" else _rtt_server(ep, n)
    if kind == "tput":
        return _produce(ep, spec, n) if role == "A" else _consume(ep, spec, n)
    if kind == "idle":
        return _idle(ep, n)
    raise ValueError(kind)


def worker(role: str, impl: str, spec: dict[str, Any], handles: Any, ctrl: Any) -> None:
    """Process entry point: open the endpoint, then run commands from the parent until "quit".

    SIGINT is ignored: on Ctrl-C the parent terminates the workers and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent around start()
    ep = None
    try:
        cpus = spec.get("cpus")
        if cpus:
            os.sched_setaffinity(0, {cpus[0 if role == "A" else 1]})
        ep = OPENERS[impl](role, spec, handles)
        ctrl.send(("ready", os.getpid()))
        while True:
            cmd, arg = ctrl.recv()
            if cmd == "quit":
                break
            gc.collect()
            gc.disable()
            try:
                result = _run(role, ep, spec, arg)
            finally:
                gc.enable()
            ctrl.send(("ok", result))
    except BaseException:
        with contextlib.suppress(Exception):
            ctrl.send(("error", traceback.format_exc()))
    finally:
        if ep is not None:
            with contextlib.suppress(Exception):
                ep.close()
