"""Worker side of benchmarks/bench_pubsub.py: the pub/sub adapters and the measured loops.

Runs in long-lived worker processes (multiprocessing "spawn") that the parent drives over a
control pipe: ``open`` an endpoint (a publisher, a subscriber, or both in one process for the
"loop" latency variant), run commands on it, ``close`` it, and so on for the next cell.

Implementations:

* ``shmq``: ``shmq.Publisher`` / ``shmq.Subscriber`` through a router (``shmq.Router``, started
  by the parent for each cell). Batches: ``publish_many`` / ``recv_many``.
* ``pyzmq``: a PUB socket bound to ``ipc://`` and SUB sockets connected to it (``subscribe(b"")``),
  default high-water marks (1000 messages each side): a slow subscriber loses messages. No batch
  API: one ``send`` / ``recv`` per message (zmq batches internally).
* ``iceoryx2``: a publish-subscribe service (ipc), payload a 64-byte ctypes struct sent with
  ``send_copy``; lossless unless a row says otherwise (``enable_safe_overflow(False)`` and the
  publisher's ``RetryUntilDelivered`` back-pressure). Subscribers poll ``receive()``; where they
  must not spin, an event service carries the wake-ups (the publisher notifies once per message,
  or once per batch when streaming), as iceoryx2's event-based examples do.

Every message is 64 bytes: (seq, intended send time, actual send time, spare) as four 64-bit
integers, then padding. The end of a stream is a message whose seq is all ones; the publisher
repeats it every millisecond until the parent says stop (a lossy transport may drop some).
Times are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process; shmq stamps
``Message.timestamp_ns`` with the same clock).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import struct
import time
import traceback
from collections.abc import Callable
from typing import Any

IMPLS = ("shmq", "pyzmq", "iceoryx2")
PEERS = IMPLS[1:]
SIZE = 64
MSG = struct.Struct("<QqqQ")  # seq, intended send ns, actual send ns, spare; padded to SIZE
END_SEQ = (1 << 64) - 1
END = b"\xff" * SIZE
DATA = b"\xab" * SIZE  # the throughput payload (its seq field is not all ones)
END_EVERY_S = 0.001


def availability(impl: str) -> str | None:
    """None if `impl` can run here, else why not."""
    mod = {"shmq": "shmq", "pyzmq": "zmq", "iceoryx2": "iceoryx2"}[impl]
    try:
        __import__(mod)
    except ImportError:
        return "not installed"
    return None


def version(impl: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version({"shmq": "shmq", "pyzmq": "pyzmq", "iceoryx2": "iceoryx2"}[impl])
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def percentiles(samples: list[int]) -> dict[str, float]:
    """Nearest-rank percentiles in ns (the rule benchmarks/peers.py uses)."""
    s = sorted(samples)
    n = len(s)
    if n == 0:
        return {"n": 0}

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


# ---------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------


class Endpoint:
    """One process's side of a cell. spec keys (all impls): impl, role ("pub", "sub", "loop"),
    name (bus / ipc path / service name), topic, wait ("spin", "adaptive": how a subscriber waits;
    peers: "spin" busy-polls, anything else blocks), lossy (the iceoryx2 variant with safe
    overflow), batch (messages per publish_many / per iceoryx2 notification)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.send: Callable[[Any], Any] = _missing
        self.send_end: Callable[[], Any] = _missing
        self.closers: list[Callable[[], Any]] = []

    def close(self) -> None:
        for fn in reversed(self.closers):
            with contextlib.suppress(Exception):
                fn()
        self.closers.clear()

    # Filled in by the subclasses:
    def publish_stream(self, n: int, batch: int) -> None:
        raise NotImplementedError

    def consume(self) -> tuple[int, int, int]:
        """Receive until the end marker: (messages, clock after the first, clock after the last)."""
        raise NotImplementedError

    def latency(self, n: int) -> dict[str, Any]:
        raise NotImplementedError

    def drain(self, idle_s: float) -> int:
        raise NotImplementedError

    def recv_one(self) -> tuple[bytes, int]:
        """(the first 32 payload bytes, shmq timestamp or 0), waiting as the spec says."""
        raise NotImplementedError

    def poll_head(self, timeout_s: float) -> bytes | None:
        """The first 32 payload bytes of the next message, None if none came within timeout_s."""
        raise NotImplementedError


def _missing(*args: Any) -> Any:
    raise RuntimeError("this endpoint has no such side")


class ShmqEndpoint(Endpoint):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        import shmq

        self.shmq = shmq
        role, bus, topic = spec["role"], spec["name"], spec["topic"]
        self.sub: Any = None
        self.pub: Any = None
        if role in ("sub", "loop"):
            self.sub = shmq.Subscriber(
                bus,
                topic,
                wait=spec["wait"],
                on_full=spec.get("on_full", "block"),
                capacity=spec.get("capacity", 1 << 20),
            )
            self.closers.append(self.sub.close)
        if role in ("pub", "loop"):
            self.pub = shmq.Publisher(bus, wait=spec.get("pub_wait", spec["wait"]))
            self.closers.append(lambda: self.pub.close(linger=1.0))
            publish = self.pub.publish
            self.send = lambda data: publish(topic, data)
            self.send_end = lambda: publish(topic, END)

    def publish_stream(self, n: int, batch: int) -> None:
        topic = self.spec["topic"]
        if batch > 1:
            publish_many = self.pub.publish_many
            msgs = [DATA] * batch
            for _ in range(n // batch):
                publish_many(topic, msgs)
            if n % batch:
                publish_many(topic, msgs[: n % batch])
        else:
            publish = self.pub.publish
            for _ in range(n):
                publish(topic, DATA)

    def consume(self) -> tuple[int, int, int]:
        recv_many, clock = self.sub.recv_many, time.monotonic_ns
        first = recv_many()
        t_first = clock()
        got = 0
        batch = first
        while batch[-1].data[0] != 0xFF:
            got += len(batch)
            batch = recv_many()
        # The last batch ends with the end marker (maybe repeated): count the data before it.
        got += sum(1 for m in batch if m.data[0] != 0xFF)
        return got, t_first, clock()

    def latency(self, n: int) -> dict[str, Any]:
        recv, clock, unpack = self.sub.recv, time.monotonic_ns, MSG.unpack_from
        intended = [0] * n
        actual = [0] * n
        stamped = [0] * n
        k = 0
        while True:
            m = recv()
            now = clock()
            seq, t_int, t_act, _ = unpack(m.data)
            if seq == END_SEQ:
                break
            if k < n:
                intended[k] = now - t_int
                actual[k] = now - t_act
                stamped[k] = now - m.timestamp_ns
                k += 1
        return {
            "count": k,
            "intended": percentiles(intended[:k]),
            "actual": percentiles(actual[:k]),
            "timestamp": percentiles(stamped[:k]),
        }

    def drain(self, idle_s: float) -> int:
        got = 0
        while True:
            batch = self.sub.recv_many(timeout=idle_s)
            if not batch:
                return got
            got += len(batch)

    def recv_one(self) -> tuple[bytes, int]:
        m = self.sub.recv()
        return m.data, m.timestamp_ns

    def poll_head(self, timeout_s: float) -> bytes | None:
        try:
            return bytes(self.sub.recv(timeout=timeout_s).data)
        except self.shmq.Empty:
            return None


class ZmqEndpoint(Endpoint):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.closers.append(lambda: self.ctx.term())
        role, address = spec["role"], spec["name"]
        self.sock_sub: Any = None
        if role in ("pub", "loop"):
            pub = self.ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(address)
            self.closers.append(lambda: pub.close(linger=0))
            self.send = pub.send
            self.send_end = lambda: pub.send(END)
        if role in ("sub", "loop"):
            sub = self.ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(address)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.closers.append(lambda: sub.close(linger=0))
            self.sock_sub = sub
            if spec["wait"] == "spin":
                recv, noblock, again = sub.recv, zmq.NOBLOCK, zmq.Again

                def recv_spin() -> bytes:
                    while True:
                        try:
                            return recv(noblock)
                        except again:
                            pass

                self.recv = recv_spin
            else:
                self.recv = sub.recv

    def publish_stream(self, n: int, batch: int) -> None:
        send = self.send
        for _ in range(n):
            send(DATA)

    def consume(self) -> tuple[int, int, int]:
        recv, clock = self.recv, time.monotonic_ns
        m = recv()
        t_first = clock()
        got = 0
        while m[0] != 0xFF:
            got += 1
            m = recv()
        return got, t_first, clock()

    def latency(self, n: int) -> dict[str, Any]:
        recv, clock, unpack = self.recv, time.monotonic_ns, MSG.unpack_from
        intended = [0] * n
        actual = [0] * n
        k = 0
        while True:
            m = recv()
            now = clock()
            seq, t_int, t_act, _ = unpack(m)
            if seq == END_SEQ:
                break
            if k < n:
                intended[k] = now - t_int
                actual[k] = now - t_act
                k += 1
        return {"count": k, "intended": percentiles(intended[:k]), "actual": percentiles(actual[:k])}

    def drain(self, idle_s: float) -> int:
        got = 0
        sub, noblock = self.sock_sub, self.zmq.NOBLOCK
        while sub.poll(int(idle_s * 1000)):
            with contextlib.suppress(self.zmq.Again):
                while True:
                    sub.recv(noblock)
                    got += 1
        return got

    def recv_one(self) -> tuple[bytes, int]:
        return self.recv(), 0

    def poll_head(self, timeout_s: float) -> bytes | None:
        if self.sock_sub.poll(max(1, int(timeout_s * 1000))):
            return bytes(self.sock_sub.recv())
        return None


class IoxPayload(ctypes.Structure):
    _fields_ = [
        ("seq", ctypes.c_uint64),
        ("intended", ctypes.c_int64),
        ("actual", ctypes.c_int64),
        ("spare", ctypes.c_uint64),
        ("pad", ctypes.c_uint8 * (SIZE - 32)),
    ]


class IoxEndpoint(Endpoint):
    """iceoryx2. Lossless unless spec["lossy"] (then safe overflow: the oldest sample is overwritten)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        import iceoryx2 as iox2

        self.iox2 = iox2
        with contextlib.suppress(Exception):
            iox2.set_log_level(iox2.LogLevel.Error)
        role = spec["role"]
        self.node = (
            iox2.NodeBuilder.new()
            .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
            .create(iox2.ServiceType.Ipc)
        )
        name = iox2.ServiceName.new(spec["name"])
        depth = spec.get("iox_buffer", 8192)
        service = (
            self.node.service_builder(name)
            .publish_subscribe(IoxPayload)
            .max_publishers(1)
            .max_subscribers(max(8, spec.get("subscribers", 8)))
            .max_nodes(16)
            .subscriber_max_buffer_size(depth)
            .history_size(0)
            .enable_safe_overflow(bool(spec.get("lossy")))
            .open_or_create()
        )
        self.service = service
        # Wake-ups for subscribers that do not spin: an event service beside the data.
        self.notify: Callable[[], Any] | None = None
        self.listener: Any = None
        if spec["wait"] != "spin":
            events = (
                self.node.service_builder(iox2.ServiceName.new(spec["name"] + "/ev"))
                .event()
                .max_listeners(16)
                .max_notifiers(4)
                .max_nodes(16)
                .open_or_create()
            )
            self.events = events
            if role in ("pub", "loop"):
                notifier = events.notifier_builder().create()
                self.closers.append(notifier.delete)
                self.notify = notifier.notify
            if role in ("sub", "loop"):
                self.listener = events.listener_builder().create()
                self.closers.append(self.listener.delete)
        self.wait_timeout = iox2.Duration.from_millis(10)
        if role in ("pub", "loop"):
            builder = service.publisher_builder()
            if not spec.get("lossy"):
                builder = builder.backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            pub = builder.create()
            self.closers.append(pub.delete)
            self.pub = pub
            payload = IoxPayload()
            self.payload = payload
            self.payload_view = memoryview(payload).cast("B")
            end = IoxPayload.from_buffer_copy(END)
            data = IoxPayload.from_buffer_copy(DATA)
            send_copy, notify = pub.send_copy, self.notify
            if notify is None:

                def send(buf: Any) -> None:
                    self.payload_view[: len(buf)] = buf
                    send_copy(payload)

                self.send_end = lambda: send_copy(end)
            else:

                def send(buf: Any) -> None:
                    self.payload_view[: len(buf)] = buf
                    send_copy(payload)
                    notify()

                def send_end() -> None:
                    send_copy(end)
                    notify()

                self.send_end = send_end
            self.send = send
            self.data = data
        if role in ("sub", "loop"):
            self.sub = service.subscriber_builder().buffer_size(depth).create()
            self.closers.append(self.sub.delete)
            receive, string_at = self.sub.receive, ctypes.string_at
            if self.listener is None:

                def recv_head() -> Any:
                    while True:
                        sample = receive()
                        if sample is not None:
                            return string_at(sample.payload_ptr, 32)

            else:
                timed_wait, timeout = self.listener.timed_wait, self.wait_timeout

                def recv_head() -> Any:
                    while True:
                        sample = receive()
                        if sample is not None:
                            return string_at(sample.payload_ptr, 32)
                        timed_wait(timeout)

            self.recv_head = recv_head

    def publish_stream(self, n: int, batch: int) -> None:
        send_copy, data, notify = self.pub.send_copy, self.data, self.notify
        if notify is None:
            for _ in range(n):
                send_copy(data)
            return
        for _ in range(n // batch):
            for _ in range(batch):
                send_copy(data)
            notify()
        for _ in range(n % batch):
            send_copy(data)
        notify()

    def consume(self) -> tuple[int, int, int]:
        receive, string_at, clock = self.sub.receive, ctypes.string_at, time.monotonic_ns
        end8 = END[:8]
        listener = self.listener
        timed_wait, timeout = (listener.timed_wait, self.wait_timeout) if listener else (None, None)
        got = 0
        t_first = 0
        while True:
            sample = receive()
            if sample is None:
                if timed_wait is not None:
                    timed_wait(timeout)
                continue
            if string_at(sample.payload_ptr, 8) == end8:
                break
            if not got:
                t_first = clock()
            got += 1
        return got, t_first or clock(), clock()

    def latency(self, n: int) -> dict[str, Any]:
        recv_head, clock, unpack = self.recv_head, time.monotonic_ns, MSG.unpack_from
        intended = [0] * n
        actual = [0] * n
        k = 0
        while True:
            head = recv_head()
            now = clock()
            seq, t_int, t_act, _ = unpack(head)
            if seq == END_SEQ:
                break
            if k < n:
                intended[k] = now - t_int
                actual[k] = now - t_act
                k += 1
        return {"count": k, "intended": percentiles(intended[:k]), "actual": percentiles(actual[:k])}

    def drain(self, idle_s: float) -> int:
        receive = self.sub.receive
        got = 0
        deadline = time.monotonic() + idle_s
        while time.monotonic() < deadline:
            if receive() is not None:
                got += 1
                deadline = time.monotonic() + idle_s
            else:
                time.sleep(0.001)
        return got

    def recv_one(self) -> tuple[bytes, int]:
        return self.recv_head(), 0

    def poll_head(self, timeout_s: float) -> bytes | None:
        deadline = time.monotonic() + timeout_s
        while True:
            sample = self.sub.receive()
            if sample is not None:
                return ctypes.string_at(sample.payload_ptr, 32)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.0002)

    def close(self) -> None:
        super().close()
        # The node and the services have no delete(): they go with their last reference.
        for attr in ("sub", "pub", "listener", "service", "events", "node"):
            if hasattr(self, attr):
                setattr(self, attr, None)
        gc.collect()


OPENERS: dict[str, Callable[[dict[str, Any]], Endpoint]] = {
    "shmq": ShmqEndpoint,
    "pyzmq": ZmqEndpoint,
    "iceoryx2": IoxEndpoint,
}


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _end_until_stop(ep: Endpoint, ctrl: Any) -> None:
    """Repeat the end marker every millisecond until the parent says stop."""
    send_end = ep.send_end
    while True:
        send_end()
        if ctrl.poll(END_EVERY_S):
            cmd, _ = ctrl.recv()
            if cmd != "stop":
                raise RuntimeError(f"expected stop, got {cmd!r}")
            return


def cmd_publish(ep: Endpoint, arg: dict[str, Any], ctrl: Any) -> dict[str, Any]:
    """n messages as fast as possible (in batches), then end markers until stop."""
    clock = time.monotonic_ns
    t0 = clock()
    ep.publish_stream(arg["n"], arg.get("batch", 1))
    t_sent = clock()
    _end_until_stop(ep, ctrl)
    return {"t0": t0, "t_sent": t_sent}


def cmd_pace(ep: Endpoint, arg: dict[str, Any], ctrl: Any) -> dict[str, Any]:
    """n messages at fixed intended times start + i * interval, each stamped with its intended
    and actual send time. pacing "sleep": sleep until the intended time (timer slack 1 ns);
    "spin": busy-wait for it. A late message is sent at once (its lateness counts)."""
    n, interval, spin = arg["n"], arg["interval_ns"], arg["pacing"] == "spin"
    clock, sleep, pack = time.monotonic_ns, time.sleep, MSG.pack_into
    send = ep.send
    buf = bytearray(SIZE)
    start = clock() + 2_000_000
    late = 0
    for i in range(n):
        t = start + i * interval
        if spin:
            while clock() < t:
                pass
        else:
            d = t - clock()
            if d > 0:
                sleep(d * 1e-9)
        now = clock()
        if now - t > interval:
            late += 1
        pack(buf, 0, i, t, now, 0)
        send(buf)
    _end_until_stop(ep, ctrl)
    return {"late_by_over_an_interval": late}


def _loop_sync(ep: Endpoint) -> None:
    """Send end markers until one comes back (zmq connects in the background), then drain."""
    deadline = time.monotonic() + 10.0
    while True:
        ep.send_end()
        if ep.poll_head(0.005) is not None:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the loop endpoint never received its own messages")
    ep.drain(0.02)


def cmd_loop(ep: Endpoint, arg: dict[str, Any], ctrl: Any) -> dict[str, Any]:
    """Publisher and subscriber in this one process: at each intended time (busy-wait for it),
    publish, then receive that message back through the router / transport."""
    n, interval = arg["n"], arg["interval_ns"]
    clock, pack, unpack = time.monotonic_ns, MSG.pack_into, MSG.unpack_from
    send, recv = ep.send, ep.recv_one
    _loop_sync(ep)
    buf = bytearray(SIZE)
    intended = [0] * n
    actual = [0] * n
    stamped = [0] * n
    start = clock() + 2_000_000
    for i in range(n):
        t = start + i * interval
        while clock() < t:
            pass
        now = clock()
        pack(buf, 0, i, t, now, 0)
        send(buf)
        head, ts = recv()
        done = clock()
        seq, t_int, t_act, _ = unpack(head)
        if seq != i:
            raise RuntimeError(f"expected message {i}, got {seq}")
        intended[i] = done - t_int
        actual[i] = done - t_act
        stamped[i] = done - ts if ts else 0
    out: dict[str, Any] = {"count": n, "intended": percentiles(intended), "actual": percentiles(actual)}
    if any(stamped):
        out["timestamp"] = percentiles(stamped)
    return out


def run_command(ep: Endpoint, cmd: str, arg: Any, ctrl: Any) -> dict[str, Any]:
    cpu0, wall0 = time.process_time(), time.monotonic_ns()
    if cmd == "publish":
        result = cmd_publish(ep, arg, ctrl)
    elif cmd == "pace":
        result = cmd_pace(ep, arg, ctrl)
    elif cmd == "loop":
        result = cmd_loop(ep, arg, ctrl)
    elif cmd == "consume":
        got, t_first, t_last = ep.consume()
        result = {"count": got, "t_first": t_first, "t_last": t_last}
    elif cmd == "latency":
        result = ep.latency(arg["n"])
    elif cmd == "drain":
        result = {"drained": ep.drain(arg["idle_s"])}
    else:
        raise ValueError(f"unknown command {cmd!r}")
    result["cpu_s"] = time.process_time() - cpu0
    result["wall0"] = wall0
    return result


def worker(ctrl: Any) -> None:
    """Process entry point: run commands from the parent until "quit".

    SIGINT is ignored (the parent cleans up on Ctrl-C); the timer slack is set to 1 ns so that
    a paced publisher's sleeps end on time; the worker is killed if the parent dies (a worker
    spinning in a receive would otherwise spin on forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK: 1 ns
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: never outlive the parent
    ep: Endpoint | None = None
    ctrl.send(("ready", os.getpid()))
    try:
        while True:
            cmd, arg = ctrl.recv()
            if cmd == "quit":
                break
            try:
                if cmd == "open":
                    if ep is not None:
                        ep.close()
                        ep = None
                    ep = OPENERS[arg["impl"]](arg)
                    ctrl.send(("ok", {}))
                elif cmd == "close":
                    if ep is not None:
                        ep.close()
                        ep = None
                    ctrl.send(("ok", {}))
                else:
                    if ep is None:
                        raise RuntimeError(f"{cmd}: no endpoint is open")
                    gc.collect()
                    gc.disable()
                    try:
                        result = run_command(ep, cmd, arg, ctrl)
                    finally:
                        gc.enable()
                    ctrl.send(("ok", result))
            except BaseException:
                ctrl.send(("error", traceback.format_exc()))
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    finally:
        if ep is not None:
            ep.close()
