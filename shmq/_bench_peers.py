"""The worker side of `shmq bench` (shmq/bench.py): endpoints of every implementation and the
measured loops, run in processes the parent starts with the multiprocessing "spawn" context.

Every message starts with two little-endian int64: a sequence number and a time stamp
(``time.monotonic_ns()``, CLOCK_MONOTONIC: one clock for every process on the machine). A
sequence number from 0 up is a measured message; ``WARMUP`` marks the warm-up traffic that comes
first (not measured), ``END`` the end of the run. The stamp is the time the message was sent, or
with a fixed rate the time it was *due*, so a stall anywhere (sender, queue, receiver) shows as
latency instead of as fewer samples (coordinated omission).

A worker runs one cell (one implementation, one message size) and talks to the parent over a
control pipe: ``ready`` once its endpoint is open; then ``run``; a receiver answers ``warm`` when
the first warm-up message arrives, the sender warms up until the parent says ``go``; each answers
``done`` with its counts; the sender of a fan-out repeats END every millisecond until ``stop``
(a lossy transport may drop some); ``quit`` closes the endpoint. Latencies go straight into a
named `shmq.LatencyRecorder` the parent created, so every implementation is measured by the
same histogram code.

Peers: ``mp.Queue`` (multiprocessing.Queue, bounded to the ring's capacity in messages),
``mp.Pipe`` (send_bytes / recv_bytes), ``faster-fifo`` (raw bytes, nothing pickled), ``pyzmq``
(PAIR over ipc:// for a queue, PUB/SUB for a fan-out: lossy past the high-water mark) and
``iceoryx2`` (publish-subscribe services over shared memory, fixed-size payloads, lossless:
RetryUntilDelivered). Without a broker of their own, the multiprocessing and faster-fifo fan-outs
write each message into one channel per subscriber. ``wait="spin"`` makes the peers busy-poll
their non-blocking call; any other wait mode uses their blocking call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import os
import queue
import signal
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HEADER = struct.Struct("<qq")  # sequence number, stamp (ns)
WARMUP = -1
END = -2
TIMELINE_BUCKET_NS = 50_000_000
LONG_TIMEOUT_S = 1e9  # "forever" for the APIs whose default timeout is a few seconds
END_EVERY_S = 0.001
_CLOCK_STRIDE = 64  # an unpaced throughput receiver reads the clock once per this many messages
_SLEEP_AHEAD_NS = 150_000  # a paced sender sleeps when the next message is due further away...
_SLEEP_MARGIN_NS = 80_000  # ...and wakes this early, to spin the rest: sleeps overshoot


def _peer_module(name: str) -> Any:
    """A peer's module (imported by name: the peers are optional and untyped)."""
    return importlib.import_module(name)


@dataclass
class Endpoint:
    """One worker's side: `send` writes to the way out, `recv` / `recv_batch` read the way in."""

    send: Callable[[Any], Any] | None = None
    recv: Callable[[], Any] | None = None
    recv_batch: Callable[[], list[Any]] | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list)

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()
        self.closers.clear()


def _spin(
    poll_once: Callable[[], Any], nothing: type[BaseException] | tuple[type[BaseException], ...]
) -> Any:
    def recv() -> Any:
        while True:
            try:
                return poll_once()
            except nothing:
                pass

    return recv


def _one(recv: Callable[[], Any]) -> Callable[[], list[Any]]:
    def recv_batch() -> list[Any]:
        return [recv()]

    return recv_batch


def _fan(sends: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """A send that writes every message into each subscriber's channel (no broker)."""
    if len(sends) == 1:
        return sends[0]

    def send(data: Any) -> None:
        for s in sends:
            s(data)

    return send


# -- openers: (role, plan, handles) -> Endpoint ---------------------------------------------------


def _open_shmq(role: str, plan: dict[str, Any], handles: dict[str, Any]) -> Endpoint:
    import shmq

    ep = Endpoint()
    wait = plan["wait"]
    if plan["fanout"]:
        if role == "sender":
            pub = shmq.Publisher(handles["bus"], wait=wait, capacity=plan["capacity"])
            ep.closers.append(functools.partial(pub.close, linger=1.0))
            ep.send = functools.partial(pub.publish, handles["topic"])
        else:
            sub = shmq.Subscriber(handles["bus"], handles["topic"], wait=wait, capacity=plan["capacity"])
            ep.closers.append(sub.close)
            recv, recv_many = sub.recv, sub.recv_many

            def recv_data() -> bytes:
                return recv().data

            def recv_batch() -> list[bytes]:
                return [m.data for m in recv_many()]

            ep.recv, ep.recv_batch = recv_data, recv_batch
        return ep
    forward = shmq.Queue(handles["forward"], wait=wait)
    ep.closers.append(forward.close)
    back = None
    if handles.get("back"):
        back = shmq.Queue(handles["back"], wait=wait)
        ep.closers.append(back.close)
    out, inp = (forward, back) if role == "sender" else (back, forward)
    if out is not None:
        ep.send = out.put
    if inp is not None:
        ep.recv, ep.recv_batch = inp.get, inp.get_many
    return ep


def _put_copy(put: Callable[[Any], Any], data: Any) -> None:
    put(bytes(data))


def _open_mp_queue(role: str, plan: dict[str, Any], handles: dict[str, Any]) -> Endpoint:
    ep = Endpoint()
    spin = plan["wait"] == "spin"
    forward: list[Any] = handles["forward"]
    back = handles.get("back")
    # (put() hands the object to a feeder thread that pickles it later: send a copy, not our buffer)
    if role == "sender":
        ep.send = _fan([functools.partial(_put_copy, q.put) for q in forward])
        inp = back
    else:
        inp = forward[handles["index"]]
        if back is not None:
            ep.send = functools.partial(_put_copy, back.put)
    if inp is not None:
        ep.recv = _spin(inp.get_nowait, queue.Empty) if spin else inp.get
        ep.recv_batch = _one(ep.recv)
    return ep


def _open_pipe(role: str, plan: dict[str, Any], handles: dict[str, Any]) -> Endpoint:
    ep = Endpoint()
    spin = plan["wait"] == "spin"
    if role == "sender":
        conns: list[Any] = handles["sender"]
        ep.send = _fan([c.send_bytes for c in conns])
        ep.closers.extend(c.close for c in conns)
        conn = conns[0] if plan["echo"] else None
    else:
        conn = handles["receiver"][handles["index"]]
        ep.closers.append(conn.close)
        if plan["echo"]:
            ep.send = conn.send_bytes
    if conn is not None:
        if spin:
            poll, recv_bytes = conn.poll, conn.recv_bytes

            def recv() -> bytes:
                while not poll():
                    pass
                return bytes(recv_bytes())

            ep.recv = recv
        else:
            ep.recv = conn.recv_bytes
        ep.recv_batch = _one(ep.recv)
    return ep


def _open_faster_fifo(role: str, plan: dict[str, Any], handles: dict[str, Any]) -> Endpoint:
    ep = Endpoint()
    spin = plan["wait"] == "spin"
    forward: list[Any] = handles["forward"]
    back = handles.get("back")
    if role == "sender":
        ep.send = _fan([functools.partial(q.put, timeout=LONG_TIMEOUT_S) for q in forward])
        inp = back
    else:
        inp = forward[handles["index"]]
        if back is not None:
            ep.send = functools.partial(back.put, timeout=LONG_TIMEOUT_S)
    if inp is not None:
        if spin:
            ep.recv = _spin(inp.get_nowait, queue.Empty)
            ep.recv_batch = _one(ep.recv)
        else:
            ep.recv = functools.partial(inp.get, timeout=LONG_TIMEOUT_S)
            ep.recv_batch = functools.partial(inp.get_many, timeout=LONG_TIMEOUT_S, max_messages_to_get=1024)
    return ep


def _open_zmq(role: str, plan: dict[str, Any], handles: dict[str, Any]) -> Endpoint:
    zmq = _peer_module("zmq")

    ep = Endpoint()
    context = zmq.Context()
    ep.closers.append(context.term)
    if plan["fanout"]:
        sock = context.socket(zmq.PUB if role == "sender" else zmq.SUB)
    else:
        sock = context.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    ep.closers.append(functools.partial(sock.close, linger=0))
    if plan["size"] >= 1 << 16:  # bound what zmq buffers of big messages (the default is 1000 each)
        sock.setsockopt(zmq.SNDHWM, 8)
        sock.setsockopt(zmq.RCVHWM, 8)
    if plan["fanout"]:
        if role == "sender":
            sock.bind(handles["address"])
        else:
            sock.connect(handles["address"])
            sock.setsockopt(zmq.SUBSCRIBE, b"")
    elif role == "receiver":
        sock.bind(handles["address"])
    else:
        sock.connect(handles["address"])
    if role == "sender" or plan["echo"]:
        ep.send = sock.send
    if role == "receiver" or plan["echo"]:
        if plan["wait"] == "spin":
            ep.recv = _spin(functools.partial(sock.recv, zmq.NOBLOCK), zmq.Again)
        else:
            ep.recv = sock.recv
        ep.recv_batch = _one(ep.recv)
    return ep


def _iox_payload_type(size: int) -> Any:
    # The same name and layout in every process: iceoryx2 checks both when a service is opened.
    return type(f"ShmqBench{size}", (ctypes.Structure,), {"_fields_": [("data", ctypes.c_uint8 * size)]})


class _IoxChannel:
    """One iceoryx2 publish-subscribe service (and an event service for waiting without spinning)."""

    def __init__(self, node: Any, name: str, plan: dict[str, Any], publisher: bool) -> None:
        iox2 = _peer_module("iceoryx2")

        size, spin = plan["size"], plan["wait"] == "spin"
        payload_type = _iox_payload_type(size)
        depth = max(4, min(8192, (64 << 20) // size))
        service = (
            node.service_builder(iox2.ServiceName.new(name))
            .publish_subscribe(payload_type)
            .max_publishers(1)
            .max_subscribers(max(8, plan["subscribers"]))
            .max_nodes(max(16, plan["subscribers"] + 4))
            .subscriber_max_buffer_size(depth)
            .history_size(0)
            .enable_safe_overflow(False)
            .open_or_create()
        )
        self.keep: list[Any] = [service]
        self.closers: list[Callable[[], Any]] = []
        notify: Callable[[], Any] | None = None
        listener: Any = None
        if not spin:
            events = (
                node.service_builder(iox2.ServiceName.new(name + "/ev"))
                .event()
                .max_listeners(max(16, plan["subscribers"] + 4))
                .max_notifiers(4)
                .max_nodes(max(16, plan["subscribers"] + 4))
                .open_or_create()
            )
            self.keep.append(events)
            if publisher:
                notifier = events.notifier_builder().create()
                self.closers.append(notifier.delete)
                notify = notifier.notify
            else:
                listener = events.listener_builder().create()
                self.closers.append(listener.delete)
        if publisher:
            pub = (
                service.publisher_builder()
                .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
                .create()
            )
            self.closers.append(pub.delete)
            payload = payload_type()
            view = memoryview(payload).cast("B")
            send_copy = pub.send_copy

            def send(data: Any) -> None:
                view[: len(data)] = data
                send_copy(payload)
                if notify is not None:
                    notify()

            self.send = send
        else:
            sub = service.subscriber_builder().buffer_size(depth).create()
            self.closers.append(sub.delete)
            receive, string_at = sub.receive, ctypes.string_at
            wait_for_event = None
            if listener is not None:
                wait_for_event = functools.partial(listener.timed_wait, iox2.Duration.from_millis(10))

            def recv() -> bytes:
                while True:
                    sample = receive()
                    if sample is not None:
                        return string_at(sample.payload_ptr, size)
                    if wait_for_event is not None:
                        wait_for_event()

            self.recv = recv

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()
        self.keep.clear()


def _open_iceoryx2(role: str, plan: dict[str, Any], handles: dict[str, Any]) -> Endpoint:
    iox2 = _peer_module("iceoryx2")

    with contextlib.suppress(Exception):
        iox2.set_log_level(iox2.LogLevel.Error)
    node = (
        iox2.NodeBuilder.new()
        .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
        .create(iox2.ServiceType.Ipc)
    )
    ep = Endpoint()
    holder: list[Any] = [node]
    ep.closers.append(holder.clear)  # the node goes with its last reference
    forward = _IoxChannel(node, handles["forward"], plan, publisher=role == "sender")
    ep.closers.append(forward.close)
    back = None
    if plan["echo"]:
        back = _IoxChannel(node, handles["back"], plan, publisher=role == "receiver")
        ep.closers.append(back.close)
    out, inp = (forward, back) if role == "sender" else (back, forward)
    if out is not None:
        ep.send = out.send
    if inp is not None:
        ep.recv = inp.recv
        ep.recv_batch = _one(inp.recv)
    ep.closers.append(gc.collect)
    return ep


OPENERS: dict[str, Callable[[str, dict[str, Any], dict[str, Any]], Endpoint]] = {
    "shmq": _open_shmq,
    "mp.Queue": _open_mp_queue,
    "mp.Pipe": _open_pipe,
    "faster-fifo": _open_faster_fifo,
    "pyzmq": _open_zmq,
    "iceoryx2": _open_iceoryx2,
}


# -- the measured loops ---------------------------------------------------------------------------


class _Control:
    """The worker's end of the control pipe."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def say(self, what: str, value: Any = None) -> None:
        self.conn.send((what, value))

    def heard(self, what: str) -> bool:
        """True if the parent said `what` (checked without waiting)."""
        if not self.conn.poll():
            return False
        said, _ = self.conn.recv()
        if said != what:
            raise RuntimeError(f"expected {what!r} from the parent, got {said!r}")
        return True

    def wait_for(self, what: str) -> Any:
        said, value = self.conn.recv()
        if said != what:
            raise RuntimeError(f"expected {what!r} from the parent, got {said!r}")
        return value


def _message(size: int) -> bytearray:
    return bytearray(b"\xab" * size)


def _due(start: int, i: int, rate: float) -> int:
    return start + int(i * 1e9 / rate)


def _pace(due: int, spin: bool, clock: Callable[[], int]) -> None:
    ahead = due - clock()
    if ahead > _SLEEP_AHEAD_NS and not spin:
        time.sleep((ahead - _SLEEP_MARGIN_NS) / 1e9)
    while clock() < due:
        pass


def _end_of_run(send: Callable[[Any], Any], buf: bytearray, ctl: _Control, repeat: bool) -> None:
    HEADER.pack_into(buf, 0, END, 0)
    send(buf)
    if repeat:  # a lossy transport may drop some: go on until every receiver has its END
        while not ctl.conn.poll(END_EVERY_S):
            send(buf)
        ctl.wait_for("stop")


def run_sender(ep: Endpoint, plan: dict[str, Any], ctl: _Control) -> dict[str, Any]:
    """Warm up until the parent says go, then send for `duration` seconds and say what was sent."""
    send, recv, clock, pack = ep.send, ep.recv, time.monotonic_ns, HEADER.pack_into
    assert send is not None
    size, rate, echo = plan["size"], plan["rate"], plan["echo"]
    spin = plan["wait"] == "spin"
    buf = _message(size)
    # Warm-up: the same traffic, not measured, until every receiver has some and the parent says go.
    start, i = clock(), 0
    while True:
        if rate:
            _pace(_due(start, i, rate), spin, clock)
        pack(buf, 0, WARMUP, clock())
        send(buf)
        if echo:
            assert recv is not None
            recv()
        i += 1
        if (rate or echo or not i % 256) and ctl.heard("go"):
            break
    duration_ns = int(plan["duration"] * 1e9)
    sent = late = max_late = due_count = 0
    if echo:  # ping-pong: the next message goes when the previous one came back
        assert recv is not None
        t0 = clock()
        end = t0 + duration_ns
        now = t0
        while now < end:
            pack(buf, 0, sent, now)
            send(buf)
            recv()
            sent += 1
            now = clock()
    elif rate:  # fixed rate: message i is due at t0 + i / rate, and stamped with that time
        due_count = max(1, round(plan["duration"] * rate))
        t0 = clock() + 1_000_000
        give_up = t0 + 2 * duration_ns  # a sender that cannot keep up stops at twice the duration
        interval = 1e9 / rate
        for i in range(due_count):
            due = _due(t0, i, rate)
            now = clock()
            if now < due:
                _pace(due, spin, clock)
            elif now - due > interval:
                late += 1
                max_late = max(max_late, now - due)
                if now > give_up:
                    break
            pack(buf, 0, i, due)
            send(buf)
            sent += 1
    elif plan["stamp"]:  # as fast as it can, each message stamped when sent
        t0 = clock()
        end = t0 + duration_ns
        now = t0
        while now < end:
            pack(buf, 0, sent, now)
            send(buf)
            sent += 1
            now = clock()
    else:  # as fast as it can; the receiver only counts, so no clock read per message
        pack(buf, 0, 0, 0)
        t0 = clock()
        end = t0 + duration_ns
        while clock() < end:
            for _ in range(256):
                send(buf)
            sent += 256
    t_sent = clock()
    _end_of_run(send, buf, ctl, repeat=plan["fanout"])
    return {
        "sent": sent,
        "due": due_count or sent,
        "t0": t0,
        "t_sent": t_sent,
        "late": late,
        "max_late_ns": max_late,
    }


class _Stall:
    """Fault injection (``--inject-stall MS``): the receiver sleeps once, halfway through the run.
    `check` takes a time (a message's stamp, or the clock) and sleeps when it is half the run past
    the first time it was given."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.seconds = plan["stall_ms"] / 1e3
        self.half_ns = int(plan["duration"] * 5e8)
        self.origin: int | None = None
        self.done = not plan["stall_ms"]

    def check(self, t: int) -> None:
        if self.origin is None:
            self.origin = t
        elif t - self.origin >= self.half_ns:
            self.done = True
            time.sleep(self.seconds)


def run_receiver(ep: Endpoint, plan: dict[str, Any], ctl: _Control) -> dict[str, Any]:
    """Receive until END: count, record each measured message's latency (when there is a recorder),
    and count messages per 50 ms of receive time (the timeline)."""
    from shmq.latency import LatencyRecorder

    recorder = LatencyRecorder(plan["recorder"]) if plan.get("recorder") else None
    timeline: dict[int, int] = {}
    stall = _Stall(plan)
    try:
        if plan["echo"]:
            assert recorder is not None
            got, t_first, t_last = _echo_loop(ep, ctl, recorder, timeline, stall)
        elif recorder is not None:
            got, t_first, t_last = _stamped_loop(ep, ctl, recorder, timeline, stall)
        else:
            got, t_first, t_last = _counting_loop(ep, ctl, timeline, stall)
    finally:
        if recorder is not None:
            recorder.close()
    return {"received": got, "t_first": t_first, "t_last": t_last, "timeline": sorted(timeline.items())}


def _echo_loop(
    ep: Endpoint, ctl: _Control, recorder: Any, timeline: dict[int, int], stall: _Stall
) -> tuple[int, int, int]:
    recv, send, clock, unpack = ep.recv, ep.send, time.monotonic_ns, HEADER.unpack_from
    assert recv is not None and send is not None
    record = recorder.record
    warm = False
    got = t_first = now = 0
    while True:
        data = recv()
        now = clock()
        seq, stamp = unpack(data)
        if seq < 0:
            if seq == END:
                break
            send(data)
            if not warm:
                warm = True
                ctl.say("warm")
            continue
        if not stall.done:
            stall.check(stamp)
        send(data)
        record(now - stamp)
        if not got:
            t_first = now
        got += 1
        bucket = now // TIMELINE_BUCKET_NS
        timeline[bucket] = timeline.get(bucket, 0) + 1
    return got, t_first, now if got else 0


def _stamped_loop(
    ep: Endpoint, ctl: _Control, recorder: Any, timeline: dict[int, int], stall: _Stall
) -> tuple[int, int, int]:
    recv_batch, clock, unpack = ep.recv_batch, time.monotonic_ns, HEADER.unpack_from
    assert recv_batch is not None
    record = recorder.record
    warm = False
    got = t_first = t_last = 0
    while True:
        batch = recv_batch()
        now = clock()  # every message of the batch had arrived by now
        before = got
        done = False
        for data in batch:
            seq, stamp = unpack(data)
            if seq < 0:
                if seq == END:
                    done = True
                    break
                if not warm:
                    warm = True
                    ctl.say("warm")
                continue
            if not stall.done:
                stall.check(stamp)
            record(now - stamp)
            got += 1
        if got > before:
            if not before:
                t_first = now
            t_last = now
            bucket = now // TIMELINE_BUCKET_NS
            timeline[bucket] = timeline.get(bucket, 0) + got - before
        if done:
            return got, t_first, t_last


def _counting_loop(
    ep: Endpoint, ctl: _Control, timeline: dict[int, int], stall: _Stall
) -> tuple[int, int, int]:
    recv, clock, unpack = ep.recv, time.monotonic_ns, HEADER.unpack_from
    assert recv is not None
    # The warm-up messages, then the measured stream: a measured message has a sequence number
    # from 0 (its byte 7, the high byte, is 0), so one index tells it from WARMUP and END.
    said_warm = False
    while True:
        data = recv()
        if not data[7]:
            break
        if unpack(data)[0] == END:
            return 0, 0, 0
        if not said_warm:
            said_warm = True
            ctl.say("warm")
    t_first = counted_at = clock()
    got, counted = 1, 0  # (the first one is in no bucket yet)
    while True:
        data = recv()
        if data[7]:  # END: the only control message after the warm-up
            break
        got += 1
        if not got % _CLOCK_STRIDE:
            counted_at = clock()
            bucket = counted_at // TIMELINE_BUCKET_NS
            timeline[bucket] = timeline.get(bucket, 0) + got - counted
            counted = got
            if not stall.done:
                stall.check(counted_at)
    t_last = clock()
    bucket = t_last // TIMELINE_BUCKET_NS
    timeline[bucket] = timeline.get(bucket, 0) + got - counted
    return got, t_first, t_last


def worker(role: str, impl: str, plan: dict[str, Any], handles: dict[str, Any], conn: Any) -> None:
    """Process entry point (see the module docstring for the conversation with the parent).

    SIGINT is ignored: on Ctrl-C the parent stops the workers and cleans up. The worker dies with
    its parent (a receiver waiting for a message would otherwise wait forever) and sleeps with a
    timer slack of 1 ns so that a paced sender's sleeps end on time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent around start()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    ctl = _Control(conn)
    ep: Endpoint | None = None
    try:
        ep = OPENERS[impl](role, plan, handles)
        ctl.say("ready", os.getpid())
        ctl.wait_for("run")
        gc.collect()
        gc.disable()
        result = run_sender(ep, plan, ctl) if role == "sender" else run_receiver(ep, plan, ctl)
        gc.enable()
        ctl.say("done", result)
        ctl.wait_for("quit")
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    except BaseException:
        with contextlib.suppress(Exception):
            ctl.say("error", traceback.format_exc())
    finally:
        if ep is not None:
            ep.close()
