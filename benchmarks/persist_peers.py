"""Worker side of benchmarks/bench_persist.py: the measured loops of shmq, SQLite and Redis.

Runs in long-lived worker processes (multiprocessing "spawn") that the parent drives over a
control pipe, one command at a time; each command answers ("ok", result) or ("error", traceback).
An endpoint (a shmq Publisher or Subscriber, an SQLite connection, a Redis client) is opened by
one command and used by the next ones, so that connecting is never inside a measured interval.

* ``shmq``: ``shmq.Publisher`` through a router the parent started with a data directory and a
  durable topic; ``publish_many`` batches (fsync "never" / "interval") or one ``publish`` per
  message ("always": each call returns once the router has synced the record). A run ends when
  ``shmq.bus_stats(bus).appended`` says the router appended everything. Replay and spill use
  ``shmq.Subscriber`` with ``recv_many``.
* ``sqlite``: the standard library's sqlite3, WAL mode, one table
  ``log(seq INTEGER PRIMARY KEY, topic TEXT, ts INTEGER, data BLOB)``; ``executemany`` in one
  transaction per batch, or one transaction per row.
* ``redis``: redis-py against a local redis-server (unix socket), ``XADD`` to one stream:
  pipelined (``transaction=False``) per batch, or one call per message.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process). A payload is
``os.urandom(size)``, made once per command (no implementation compresses it).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import time
import traceback
from typing import Any

TOPIC = "bench.t"
SQL_CREATE = (
    "CREATE TABLE IF NOT EXISTS log"
    "(seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, ts INTEGER NOT NULL, data BLOB NOT NULL)"
)
SQL_INSERT = "INSERT INTO log(topic, ts, data) VALUES (?, ?, ?)"
POLL_S = 0.0005  # between bus_stats() polls while waiting for the router to append


def wait_until(t: float | None) -> None:
    if t is None:
        return
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def wait_appended(bus: str, target: int, timeout: float) -> float:
    """Poll shmq.bus_stats(bus).appended until it reaches `target`; the time it did."""
    import shmq

    deadline = time.monotonic() + timeout
    while True:
        appended = shmq.bus_stats(bus).appended
        now = time.monotonic()  # (after the call: the figure is never early)
        if appended >= target:
            return now
        if now > deadline:
            raise TimeoutError(f"the router appended {appended} of {target} records within {timeout} s")
        time.sleep(POLL_S)


class Worker:
    """The endpoints one worker holds, and the commands on them."""

    def __init__(self) -> None:
        self.pub: Any = None
        self.sub: Any = None
        self.db: Any = None
        self.redis: Any = None

    # -- shmq ------------------------------------------------------------------------------

    def pub_open(self, a: dict[str, Any]) -> dict[str, Any]:
        import shmq

        self.pub_close({})
        self.pub = shmq.Publisher(a["bus"], capacity=a.get("capacity", 1 << 20))
        return {}

    def pub_close(self, a: dict[str, Any]) -> dict[str, Any]:
        if self.pub is not None:
            pub, self.pub = self.pub, None
            pub.close(linger=a.get("linger", 30.0))
        return {}

    def publish(self, a: dict[str, Any]) -> dict[str, Any]:
        """n messages (batch > 1: publish_many), or single publishes for `duration` seconds
        from t_go; then, with `appended`, wait until the router appended that many records."""
        pub, payload, batch = self.pub, os.urandom(a["size"]), a["batch"]
        wait_until(a.get("t_go"))
        count = 0
        t0 = time.monotonic()
        if a.get("duration") is not None:
            t_stop = t0 + a["duration"]
            while time.monotonic() < t_stop:
                pub.publish(TOPIC, payload)
                count += 1
        elif batch > 1:
            msgs = [payload] * batch
            for _ in range(a["n"] // batch):
                pub.publish_many(TOPIC, msgs)
            count = a["n"] // batch * batch
        else:
            for _ in range(a["n"]):
                pub.publish(TOPIC, payload)
            count = a["n"]
        t_sent = time.monotonic()
        if a.get("flush"):
            pub.flush()  # the router took everything out of this publisher's ring
        t_end = time.monotonic()
        if a.get("appended") is not None:
            t_end = wait_appended(a["bus"], a["appended"], a.get("timeout", 300.0))
        return {"count": count, "t0": t0, "t_sent": t_sent, "t_end": t_end}

    def sub_open(self, a: dict[str, Any]) -> dict[str, Any]:
        import shmq

        self.sub_close({})
        kw = {k: a[k] for k in ("on_full", "capacity", "start", "max_spill_bytes") if k in a}
        self.sub = shmq.Subscriber(a["bus"], a.get("pattern", "bench.>"), **kw)
        return {}

    def sub_close(self, a: dict[str, Any]) -> dict[str, Any]:
        if self.sub is not None:
            sub, self.sub = self.sub, None
            sub.close()
        return {}

    def consume(self, a: dict[str, Any]) -> dict[str, Any]:
        """recv_many until n messages; the time of the first and of the last. With sizes False
        the payload bytes are not added up (a Python loop over the messages costs as much as
        receiving small ones)."""
        sub, n, most, sizes = self.sub, a["n"], a.get("max_messages", 4096), a.get("sizes", True)
        count = nbytes = 0
        t_first = 0.0
        t0 = time.monotonic()
        while count < n:
            msgs = sub.recv_many(most, a.get("timeout", 60.0))
            if not msgs:
                raise TimeoutError(
                    f"received {count} of {n} messages, then nothing for {a.get('timeout', 60.0)} s"
                )
            if not count:
                t_first = time.monotonic()
            count += len(msgs)
            if sizes:
                nbytes += sum(len(m.data) for m in msgs)
        return {"count": count, "bytes": nbytes, "t0": t0, "t_first": t_first, "t_last": time.monotonic()}

    def replay(self, a: dict[str, Any]) -> dict[str, Any]:
        """A new Subscriber(start="earliest") reads the n records of the log: from the call that
        creates it to its n-th message."""
        import shmq

        cpu0, t0 = time.process_time(), time.monotonic()
        sub = shmq.Subscriber(a["bus"], "bench.>", start="earliest", capacity=a.get("capacity", 1 << 20))
        try:
            self.sub = sub
            result = self.consume({**a, "sizes": False})
            result["cpu_measured_s"] = time.process_time() - cpu0  # (closing it is not counted)
        finally:
            self.sub = None
            sub.close()
        result["t0"] = t0
        return result

    def logread(self, a: dict[str, Any]) -> dict[str, Any]:
        from shmq._native import _ring

        t0 = time.monotonic()
        reader = _ring.LogReader(a["dir"])
        count = 0
        most = a.get("max_records", 4096)
        try:
            while True:
                records = reader.read(most)
                if not records:
                    break
                count += len(records)
        finally:
            reader.close()
        return {"count": count, "t0": t0, "t_end": time.monotonic()}

    # -- SQLite ----------------------------------------------------------------------------

    def sqlite_open(self, a: dict[str, Any]) -> dict[str, Any]:
        import sqlite3

        self.sqlite_close({})
        # isolation_level=None: no implicit transactions; BEGIN/COMMIT are explicit below, and
        # a lone INSERT is its own transaction.
        db = sqlite3.connect(a["path"], isolation_level=None, timeout=60.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={a['synchronous']}")
        db.execute(SQL_CREATE)
        self.db = db
        return {}

    def sqlite_close(self, a: dict[str, Any]) -> dict[str, Any]:
        if self.db is not None:
            db, self.db = self.db, None
            db.close()
        return {}

    def sqlite_insert(self, a: dict[str, Any]) -> dict[str, Any]:
        db, payload, batch = self.db, os.urandom(a["size"]), a["batch"]
        now = time.time_ns
        wait_until(a.get("t_go"))
        count = 0
        t0 = time.monotonic()
        if a.get("duration") is not None:
            t_stop = t0 + a["duration"]
            while time.monotonic() < t_stop:
                db.execute(SQL_INSERT, (TOPIC, now(), payload))
                count += 1
        elif batch > 1:
            for _ in range(a["n"] // batch):
                db.execute("BEGIN")
                db.executemany(SQL_INSERT, [(TOPIC, now(), payload) for _ in range(batch)])
                db.execute("COMMIT")
            count = a["n"] // batch * batch
        else:
            for _ in range(a["n"]):
                db.execute(SQL_INSERT, (TOPIC, now(), payload))
            count = a["n"]
        t_end = time.monotonic()
        return {"count": count, "t0": t0, "t_sent": t_end, "t_end": t_end}

    def sqlite_read(self, a: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        cur = self.db.execute("SELECT seq, topic, ts, data FROM log ORDER BY seq")
        count, chunk = 0, a.get("chunk", 4096)
        while True:
            rows = cur.fetchmany(chunk)
            if not rows:
                break
            count += len(rows)
        return {"count": count, "t0": t0, "t_end": time.monotonic()}

    # -- Redis -----------------------------------------------------------------------------

    def redis_open(self, a: dict[str, Any]) -> dict[str, Any]:
        import redis

        self.redis_close({})
        self.redis = redis.Redis(unix_socket_path=a["sock"], socket_timeout=120)
        self.redis.ping()
        return {}

    def redis_close(self, a: dict[str, Any]) -> dict[str, Any]:
        if self.redis is not None:
            r, self.redis = self.redis, None
            r.close()
        return {}

    def redis_xadd(self, a: dict[str, Any]) -> dict[str, Any]:
        r, payload, batch = self.redis, os.urandom(a["size"]), a["batch"]
        fields = {"d": payload}
        wait_until(a.get("t_go"))
        count = 0
        t0 = time.monotonic()
        if a.get("duration") is not None:
            t_stop = t0 + a["duration"]
            while time.monotonic() < t_stop:
                r.xadd(TOPIC, fields)
                count += 1
        elif batch > 1:
            for _ in range(a["n"] // batch):
                pipe = r.pipeline(transaction=False)
                for _ in range(batch):
                    pipe.xadd(TOPIC, fields)
                pipe.execute()
            count = a["n"] // batch * batch
        else:
            for _ in range(a["n"]):
                r.xadd(TOPIC, fields)
            count = a["n"]
        t_end = time.monotonic()
        return {"count": count, "t0": t0, "t_sent": t_end, "t_end": t_end}

    def redis_read(self, a: dict[str, Any]) -> dict[str, Any]:
        r, chunk = self.redis, a.get("chunk", 4096)
        t0 = time.monotonic()
        count = 0
        start = "-"
        while True:
            entries = r.xrange(TOPIC, min=start, max="+", count=chunk)
            if not entries:
                break
            count += len(entries)
            start = "(" + entries[-1][0].decode()  # exclusive: after the last one read
        return {"count": count, "t0": t0, "t_end": time.monotonic()}

    # -- the disk itself ------------------------------------------------------------------

    def sync_floor(self, a: dict[str, Any]) -> dict[str, Any]:
        """What one durable write costs without any messaging: write a record into a preallocated,
        mmap'ed file (as shmq's log does) and fdatasync it, for `duration` seconds."""
        import mmap

        size = 64 << 20
        fd = os.open(a["path"], os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
            m = mmap.mmap(fd, size)
            try:
                record = os.urandom(a["size"])
                step = (len(record) + 7) // 8 * 8
                count = off = 0
                t0 = time.monotonic()
                t_stop = t0 + a["duration"]
                while time.monotonic() < t_stop and off + step <= size:
                    m[off : off + len(record)] = record
                    os.fdatasync(fd)
                    off += step
                    count += 1
                t_end = time.monotonic()
            finally:
                m.close()
        finally:
            os.close(fd)
            os.unlink(a["path"])
        return {"count": count, "t0": t0, "t_end": t_end}

    def close(self) -> None:
        for fn in (self.pub_close, self.sub_close, self.sqlite_close, self.redis_close):
            with contextlib.suppress(Exception):
                fn({"linger": 0.0})


COMMANDS = {
    name
    for name in dir(Worker)
    if not name.startswith("_") and name != "close" and callable(getattr(Worker, name))
}


def worker(ctrl: Any) -> None:
    """Process entry point: run commands from the parent until "quit".

    SIGINT is ignored (the parent cleans up on Ctrl-C); the worker is killed if the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: never outlive the parent
    w = Worker()
    ctrl.send(("ready", os.getpid()))
    try:
        while True:
            cmd, arg = ctrl.recv()
            if cmd == "quit":
                break
            try:
                if cmd not in COMMANDS:
                    raise ValueError(f"unknown command {cmd!r}")
                gc.collect()
                gc.disable()
                cpu0 = time.process_time()
                try:
                    result = getattr(w, cmd)(arg or {})
                finally:
                    gc.enable()
                result["cpu_s"] = time.process_time() - cpu0
                ctrl.send(("ok", result))
            except BaseException:
                ctrl.send(("error", traceback.format_exc()))
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    finally:
        w.close()
