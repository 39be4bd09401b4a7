"""shmq's persistence tier (durable log, fsync policies, replay, spill) against SQLite and Redis, in one run.

Run (from the repository root; Redis is optional: `apt-get install redis-server` and
`.venv/bin/pip install -e ".[bench]"`, which installs the redis client):

    .venv/bin/python benchmarks/bench_persist.py                  # full run, ~3 minutes
    .venv/bin/python benchmarks/bench_persist.py --quick          # smoke run, ~15 s
    .venv/bin/python benchmarks/bench_persist.py --json out.json  # also save the raw results

Implementations (columns): shmq (`shmq.Publisher` -> `shmq.Router(data_dir=..., durable=["bench.>"],
fsync=...)`, which appends every message of a durable topic to its segmented, CRC-checked mmap log),
SQLite (the standard library's sqlite3, WAL mode, in the publishing process itself: no server) and
Redis (redis-py -> a local redis-server over a unix socket, XADD to one stream, appendonly yes). A
peer that cannot run here says why ("redis: not available (...)") and is skipped.

What is measured (benchmarks/README.md, section "Persistence", has the details and the last results):

* Durable publish throughput, 64 B and 4 KiB payloads, one publisher, fsync "never" / "interval" /
  "always" against SQLite synchronous=OFF / NORMAL / FULL and Redis appendfsync no / everysec /
  always. "never" and "interval" publish in batches (publish_many; one transaction per batch for
  SQLite; a pipeline per batch for Redis), "always" one message at a time (each call returns once
  the record is on disk: shmq's publish waits for the router's fdatasync, SQLite commits each row,
  Redis replies after its fsync). A shmq run ends when shmq.bus_stats(bus).appended says the router
  appended every message. Each run starts from a fresh data directory, database or server.
* Group commit: fsync="always", 8 publisher processes each publishing one message at a time, against
  1 publisher: aggregate msg/s and the ratio (SQLite FULL and Redis always with 8 writers alike);
  1 publisher again with Router(wait="spin"), and the disk's own rate (an mmap'ed write and
  fdatasync in one process) for reference.
* Replay: a log of N 64 B records read by a new Subscriber(start="earliest") with recv_many, and raw
  with shmq._native._ring.LogReader(dir/"log").read(4096); SQLite SELECT ... ORDER BY seq with
  fetchmany(4096); Redis XRANGE COUNT 4096. The data is in the page cache (just written).
* Spill: a Subscriber(on_full="spill") with a 4 MiB ring is SIGSTOPped while ~1 GiB (--quick: 64 MiB)
  is published in 64 KiB messages; the publisher's rate with it spilling against no subscriber and
  a reading one; then SIGCONT and the drain rate into the subscriber in GB/s, and whether the
  spill directory is gone afterwards.

Every row says how many processes are busy or spin: the machine has 2 cores, and the router waits
with wait="adaptive" (spins 50 µs after its last message, then sleeps on a futex).

Cleanup: data directories, databases, spill files and Redis servers live in one temporary directory
on a real disk (not /dev/shm; --dir picks another) that is deleted at exit; routers, Redis servers
and the workers are stopped (SIGCONT first), also on Ctrl-C or SIGTERM, and every
/dev/shm/shmq.bus.persist-<pid>-* segment is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bench_pubsub
import bench_queue
import persist_peers
from bench_queue import TIMES, BenchError, fmt_ratio, log

CTX = bench_queue.CTX
IMPLS = ("shmq", "sqlite", "redis")
PEERS = IMPLS[1:]
PEER_NAMES = {"sqlite": "SQLite (WAL)", "redis": "Redis (AOF)"}
POOL_SIZE = 9  # 8 publishers for group commit, and a subscriber
SMALL, LARGE = 64, 4096
MODES = ("never", "interval", "always")
SQLITE_SYNC = {"never": "OFF", "interval": "NORMAL", "always": "FULL"}
REDIS_FSYNC = {"never": "no", "interval": "everysec", "always": "always"}
BATCH = {SMALL: 256, LARGE: 16}  # messages per publish_many / transaction / pipeline (16 KiB, 64 KiB)
GROUP = 8
SPILL_MSG = 64 << 10


@dataclass(frozen=True)
class Config:
    target_s: float  # a measured publish run lasts about this long (sized by a calibration run)
    runs: int  # measured runs per publish cell (median shown, with the range)
    cal_n: dict[str, int]  # calibration run size: "batched" (64 B; 4 KiB gets a 16th) and "always"
    max_bytes: int  # payload bytes per publish run at most
    group_s: float  # length of one group-commit run
    group_runs: int
    replay_n: int  # records in the replayed log (shmq, SQLite)
    replay_redis_n: int  # Redis: filling a stream through redis-py is slow (~100k/s)
    replay_runs: int
    spill_bytes: int
    spill_runs: int
    sub_capacity: int  # the spilling subscriber's ring
    settle_s: float  # longest wait for the host's slow vCPU placement to pass, per cell


FULL = Config(
    target_s=1.0,
    runs=3,
    cal_n={"batched": 200_000, "always": 300},
    max_bytes=1 << 30,
    group_s=2.0,
    group_runs=3,
    replay_n=2_000_000,
    replay_redis_n=300_000,
    replay_runs=3,
    spill_bytes=1 << 30,
    spill_runs=3,
    sub_capacity=4 << 20,
    settle_s=10.0,
)
QUICK = Config(
    target_s=0.15,
    runs=1,
    cal_n={"batched": 20_000, "always": 50},
    max_bytes=128 << 20,
    group_s=0.4,
    group_runs=1,
    replay_n=200_000,
    replay_redis_n=20_000,
    replay_runs=1,
    spill_bytes=64 << 20,
    spill_runs=1,
    sub_capacity=4 << 20,
    settle_s=0.0,
)


# ---------------------------------------------------------------------------
# Where the data goes: a real disk
# ---------------------------------------------------------------------------


def mount_of(path: str) -> tuple[str, str, str]:
    """(mount point, filesystem type, device) of the file system holding `path`."""
    path = os.path.realpath(path)
    best = ("/", "?", "?")
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    return best


def data_root(requested: str | None) -> str:
    """The directory our temporary directory goes in: --dir, else the system's temporary directory
    unless that is in memory (tmpfs), else benchmarks/.build (git-ignored)."""
    if requested:
        return requested
    candidate = tempfile.gettempdir()
    if mount_of(candidate)[1] in ("tmpfs", "ramfs"):
        candidate = bench_queue.BUILD
        os.makedirs(candidate, exist_ok=True)
    return candidate


# ---------------------------------------------------------------------------
# Worker pool
# ---------------------------------------------------------------------------


class Pool(bench_pubsub.Pool):
    """Long-lived spawned workers (persist_peers.worker) that every cell reuses."""

    def __init__(self, size: int) -> None:
        super().__init__(size, persist_peers.worker, "persist")

    def _dead(self, i: int) -> int | None:
        # Cells here use workers independently: only the one asked must be alive.
        return None if self.procs[i].is_alive() else i

    def call(self, i: int, cmd: str, arg: Any = None, timeout: float = 60.0) -> Any:
        self.send(i, cmd, arg)
        return self.recv(i, timeout)

    def all(self, workers: list[int], cmd: str, arg: Callable[[int], Any] | Any, timeout: float) -> list[Any]:
        """Send a command to several workers at once, then collect their answers."""
        for w in workers:
            self.send(w, cmd, arg(w) if callable(arg) else arg)
        deadline = time.monotonic() + timeout
        return [self.recv(w, max(1.0, deadline - time.monotonic())) for w in workers]


# ---------------------------------------------------------------------------
# Servers: a shmq router, a redis-server
# ---------------------------------------------------------------------------


def redis_availability() -> str | None:
    """None if Redis can be measured here, else why not."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed: apt-get install redis-server"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis Python client is not installed: .venv/bin/pip install redis"
    return None


def redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    for word in out.stdout.split():
        if word.startswith("v="):
            return word[2:]
    return out.stdout.strip() or "?"


class RedisServer:
    """redis-server on a unix socket in `directory`, AOF on with the given appendfsync, no RDB
    snapshots, no AOF rewrites during the run."""

    def __init__(self, directory: str, appendfsync: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.sock = os.path.join(directory, "redis.sock")
        self.log_path = os.path.join(directory, "redis.log")
        cmd = ["redis-server", "--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700"]
        cmd += ["--dir", directory, "--appendonly", "yes", "--appendfsync", appendfsync, "--save", ""]
        cmd += ["--auto-aof-rewrite-percentage", "0", "--daemonize", "no", "--loglevel", "warning"]
        cmd += ["--logfile", self.log_path]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                last = ""
                with contextlib.suppress(OSError), open(self.log_path) as f:
                    last = (f.read().strip().splitlines() or [""])[-1]
                raise BenchError(f"redis-server did not start (exit code {self.process.returncode}): {last}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


# ---------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------


def clamp(x: float, lo: int, hi: int) -> int:
    return int(max(lo, min(hi, x)))


def median_of(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median `key`, and every run's figure."""
    ordered = sorted(runs, key=lambda r: r[key])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["runs_" + key] = [r[key] for r in runs]
    return out


class Bench:
    def __init__(self, cfg: Config, impls: tuple[str, ...], root: str) -> None:
        self.cfg = cfg
        self.impls = impls
        self.prefix = f"persist-{os.getpid()}-"
        self.counter = itertools.count()
        self.tmpdir = tempfile.mkdtemp(prefix="shmq-persist-", dir=root)
        self.missing: dict[str, str] = {}
        try:
            if "redis" in impls and (why := redis_availability() or self.redis_probe()):
                self.missing["redis"] = why
        except BaseException:  # (Ctrl-C or SIGTERM meanwhile)
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise
        self.pool: Pool | None = None
        self.routers: list[Any] = []
        self.servers: list[RedisServer] = []
        self.stopped: set[int] = set()  # pids we SIGSTOPped and have not resumed yet
        self.floor: dict[str, Any] | None = None  # the disk's own fdatasync rate (group section)
        self.prober = bench_queue.Bench(bench_queue.QUICK, ("shmq",))
        self.probes: list[float] = []

    # -- plumbing --------------------------------------------------------------------------

    def seed_probes(self) -> None:
        """A few probes before the first cell, so that its own probe has something to compare with."""
        for _ in range(5):
            p = self.prober.probe()
            if p is None:
                return
            self.probes.append(p)
            time.sleep(0.2)

    def settled_probe(self) -> float | None:
        """bench_queue.py's cross-CPU probe (a C busy-spin ping-pong, p50 ns); while it reads the
        host's slow vCPU placement, wait (up to cfg.settle_s) for it to pass."""
        p = self.prober.probe()
        if p is None:
            return None
        self.probes.append(p)
        deadline = time.monotonic() + self.cfg.settle_s
        while p > bench_pubsub.SLOW_PROBE * bench_pubsub.probe_reference(self.probes):
            if time.monotonic() >= deadline:
                break
            time.sleep(2.0)
            p = self.prober.probe() or p
            self.probes.append(p)
        return p

    def redis_probe(self) -> str | None:
        """Start a redis-server once and ping it: None if that works, else why not."""
        import redis

        path = os.path.join(self.tmpdir, "redis-probe")
        try:
            server = RedisServer(path, "no")
        except (BenchError, OSError) as exc:
            return f"cannot start redis-server: {exc}"
        try:
            client = redis.Redis(unix_socket_path=server.sock, socket_timeout=10)
            client.ping()
            client.close()
        except Exception as exc:
            return f"redis-server started but does not answer: {exc}"
        finally:
            server.stop()
            shutil.rmtree(path, ignore_errors=True)
        return None

    def start_pool(self) -> None:
        self.pool = Pool(POOL_SIZE)

    def reset_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.pool = Pool(POOL_SIZE)

    @property
    def p(self) -> Pool:
        assert self.pool is not None
        return self.pool

    def fresh(self, what: str) -> tuple[str, str]:
        """A new bus name and a new directory for one run."""
        n = next(self.counter)
        path = os.path.join(self.tmpdir, f"{what}-{n}")
        os.makedirs(path)
        return f"{self.prefix}{n}", path

    def start_router(self, bus: str, **options: Any) -> Any:
        import shmq

        router = shmq.Router(bus, **options)
        self.routers.append(router)
        router.start()
        return router

    def stop_router(self, router: Any) -> None:
        router.stop()
        with contextlib.suppress(ValueError):
            self.routers.remove(router)

    def start_redis(self, directory: str, appendfsync: str) -> RedisServer:
        server = RedisServer(directory, appendfsync)
        self.servers.append(server)
        return server

    def stop_redis(self, server: RedisServer) -> None:
        server.stop()
        with contextlib.suppress(ValueError):
            self.servers.remove(server)

    def stop_process(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.stopped.add(pid)

    def resume_process(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self.stopped.discard(pid)

    def cleanup(self) -> None:
        for pid in list(self.stopped):
            self.resume_process(pid)
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        for router in list(self.routers):
            with contextlib.suppress(Exception):
                self.stop_router(router)
        for server in list(self.servers):
            with contextlib.suppress(Exception):
                self.stop_redis(server)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir("/dev/shm"):
                if entry.startswith("shmq.bus." + self.prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join("/dev/shm", entry))
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.prober.cleanup()

    # -- 1. durable publish throughput -----------------------------------------------------

    def publish_cell(self, impl: str, size: int, mode: str) -> dict[str, Any]:
        cfg = self.cfg
        batch = 1 if mode == "always" else BATCH[size]
        if mode == "always":
            cal_n = cfg.cal_n["always"]
        else:
            cal_n = max(batch * 8, cfg.cal_n["batched"] // (1 if size == SMALL else 16))
        cal = self.publish_run(impl, size, mode, batch, cal_n // batch * batch)  # sizes n; discarded
        n = clamp(cal["rate"] * cfg.target_s, batch * 8, cfg.max_bytes // size)
        n = max(batch, n // batch * batch)
        runs = [self.publish_run(impl, size, mode, batch, n) for _ in range(cfg.runs)]
        out = median_of(runs, "rate")
        out["n"] = n
        out["batch"] = batch
        return out

    def publish_run(self, impl: str, size: int, mode: str, batch: int, n: int) -> dict[str, Any]:
        """One run in a fresh data directory / database / server: warm up, then n messages."""
        bus, path = self.fresh(f"{impl}-{size}-{mode}")
        warm = batch * 4 if batch > 1 else 20
        os.sync()  # earlier runs' dirty pages are not written back during this one
        try:
            if impl == "shmq":
                return self._publish_shmq(bus, path, size, mode, batch, n, warm)
            if impl == "sqlite":
                return self._publish_sqlite(path, size, mode, batch, n, warm)
            return self._publish_redis(path, size, mode, batch, n, warm)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _publish_shmq(
        self, bus: str, path: str, size: int, mode: str, batch: int, n: int, warm: int
    ) -> dict[str, Any]:
        import shmq

        router = self.start_router(bus, data_dir=path, durable=["bench.>"], fsync=mode)
        try:
            p = self.p
            p.call(0, "pub_open", {"bus": bus})
            p.call(0, "publish", {"bus": bus, "size": size, "n": warm, "batch": batch, "appended": warm})
            syncs0 = shmq.bus_stats(bus).syncs
            cpu0, w0 = bench_pubsub.proc_cpu(router.pid), time.monotonic()
            arg = {"bus": bus, "size": size, "n": n, "batch": batch, "appended": warm + n}
            r = p.call(0, "publish", arg, timeout=120 + n * 1e-3)
            window = time.monotonic() - w0
            router_cpu = bench_pubsub.proc_cpu(router.pid) - cpu0
            stats = shmq.bus_stats(bus)
            p.call(0, "pub_close")
        finally:
            self.stop_router(router)
        wall = r["t_end"] - r["t0"]
        return {
            "rate": r["count"] / wall,
            "count": r["count"],
            "wall_s": wall,
            "publish_s": r["t_sent"] - r["t0"],
            "syncs": stats.syncs - syncs0,
            "log_bytes": stats.log_bytes,
            "log_error": stats.log_error,
            "cores": {"client": r["cpu_s"] / wall, "server": router_cpu / window},
        }

    def _publish_sqlite(
        self, path: str, size: int, mode: str, batch: int, n: int, warm: int
    ) -> dict[str, Any]:
        p = self.p
        p.call(0, "sqlite_open", {"path": os.path.join(path, "bench.db"), "synchronous": SQLITE_SYNC[mode]})
        try:
            p.call(0, "sqlite_insert", {"size": size, "n": warm, "batch": batch})
            r = p.call(0, "sqlite_insert", {"size": size, "n": n, "batch": batch}, timeout=120 + n * 1e-3)
        finally:
            p.call(0, "sqlite_close")
        wall = r["t_end"] - r["t0"]
        return {
            "rate": r["count"] / wall,
            "count": r["count"],
            "wall_s": wall,
            "cores": {"client": r["cpu_s"] / wall, "server": 0.0},
        }

    def _publish_redis(
        self, path: str, size: int, mode: str, batch: int, n: int, warm: int
    ) -> dict[str, Any]:
        server = self.start_redis(path, REDIS_FSYNC[mode])
        try:
            p = self.p
            p.call(0, "redis_open", {"sock": server.sock})
            p.call(0, "redis_xadd", {"size": size, "n": warm, "batch": batch})
            cpu0, w0 = bench_pubsub.proc_cpu(server.pid), time.monotonic()
            r = p.call(0, "redis_xadd", {"size": size, "n": n, "batch": batch}, timeout=120 + n * 1e-3)
            window = time.monotonic() - w0
            server_cpu = bench_pubsub.proc_cpu(server.pid) - cpu0
            p.call(0, "redis_close")
        finally:
            self.stop_redis(server)
        wall = r["t_end"] - r["t0"]
        return {
            "rate": r["count"] / wall,
            "count": r["count"],
            "wall_s": wall,
            "cores": {"client": r["cpu_s"] / wall, "server": server_cpu / window},
        }

    # -- 2. group commit -------------------------------------------------------------------

    def group_cell(self, impl: str, writers: int, router_wait: str = "adaptive") -> dict[str, Any]:
        runs = [self.group_run(impl, writers, router_wait) for _ in range(self.cfg.group_runs)]
        return median_of(runs, "rate")

    def sync_floor(self) -> dict[str, Any]:
        """The disk's own cost of a durable write: one process, a 128-byte record (shmq's record of a
        64 B message on topic bench.t) into a preallocated mmap'ed file, then fdatasync."""
        runs = []
        for _ in range(self.cfg.group_runs):
            _, path = self.fresh("floor")
            try:
                arg = {"path": os.path.join(path, "floor.seg"), "size": 128, "duration": self.cfg.group_s / 2}
                r = self.p.call(0, "sync_floor", arg, timeout=60)
            finally:
                shutil.rmtree(path, ignore_errors=True)
            r["rate"] = r["count"] / (r["t_end"] - r["t0"])
            runs.append(r)
        return median_of(runs, "rate")

    def group_run(self, impl: str, writers: int, router_wait: str = "adaptive") -> dict[str, Any]:
        """`writers` processes, each one durable message at a time for group_s seconds."""
        import shmq

        bus, path = self.fresh(f"group-{impl}-{writers}")
        p, ws = self.p, list(range(writers))
        router: Any = None
        server: RedisServer | None = None
        os.sync()
        try:
            if impl == "shmq":
                router = self.start_router(
                    bus, data_dir=path, durable=["bench.>"], fsync="always", wait=router_wait
                )
                p.all(ws, "pub_open", {"bus": bus}, timeout=60)
                p.all(ws, "publish", {"bus": bus, "size": SMALL, "n": 20, "batch": 1}, timeout=60)
                cmd, server_pid = "publish", router.pid
            elif impl == "sqlite":
                db = os.path.join(path, "bench.db")
                p.call(0, "sqlite_open", {"path": db, "synchronous": "FULL"})  # creates the table
                p.all(ws[1:], "sqlite_open", {"path": db, "synchronous": "FULL"}, timeout=60)
                p.all(ws, "sqlite_insert", {"size": SMALL, "n": 20, "batch": 1}, timeout=60)
                cmd, server_pid = "sqlite_insert", None
            else:
                server = self.start_redis(path, "always")
                p.all(ws, "redis_open", {"sock": server.sock}, timeout=60)
                p.all(ws, "redis_xadd", {"size": SMALL, "n": 20, "batch": 1}, timeout=60)
                cmd, server_pid = "redis_xadd", server.pid
            syncs0 = shmq.bus_stats(bus).syncs if impl == "shmq" else 0
            cpu0 = bench_pubsub.proc_cpu(server_pid)
            t_go = time.monotonic() + 0.2  # every writer starts at once
            arg = {"bus": bus, "size": SMALL, "batch": 1, "t_go": t_go, "duration": self.cfg.group_s}
            results = p.all(ws, cmd, arg, timeout=60 + 2 * self.cfg.group_s)
            window = max(r["t_end"] for r in results) - t_go
            server_cpu = bench_pubsub.proc_cpu(server_pid) - cpu0
            syncs = shmq.bus_stats(bus).syncs - syncs0 if impl == "shmq" else 0
            close = {"shmq": "pub_close", "sqlite": "sqlite_close", "redis": "redis_close"}[impl]
            p.all(ws, close, {}, timeout=60)
        finally:
            if router is not None:
                self.stop_router(router)
            if server is not None:
                self.stop_redis(server)
            shutil.rmtree(path, ignore_errors=True)
        total = sum(r["count"] for r in results)
        return {
            "rate": total / window,
            "count": total,
            "per_writer": [r["count"] for r in results],
            "wall_s": window,
            "syncs": syncs,
            "cores": {
                "client": sum(r["cpu_s"] for r in results) / window,
                "server": server_cpu / window if server_pid else 0.0,
            },
        }

    # -- 3. replay -------------------------------------------------------------------------

    def replay_cells(self, impl: str) -> dict[str, dict[str, Any]]:
        """Fill a log / table / stream with n 64 B records, then read it all back, several times."""
        import shmq

        cfg, p = self.cfg, self.p
        n = cfg.replay_n if impl != "redis" else cfg.replay_redis_n
        n = n // BATCH[SMALL] * BATCH[SMALL]
        bus, path = self.fresh(f"replay-{impl}")
        fill = {"bus": bus, "size": SMALL, "n": n, "batch": BATCH[SMALL]}
        try:
            if impl == "shmq":
                router = self.start_router(bus, data_dir=path, durable=["bench.>"], fsync="never")
                try:
                    p.call(0, "pub_open", {"bus": bus})
                    p.call(0, "publish", {**fill, "appended": n}, timeout=300)
                    p.call(0, "pub_close")
                    runs = []
                    for _ in range(cfg.replay_runs):
                        cpu0, sleeps0 = bench_pubsub.proc_cpu(router.pid), shmq.bus_stats(bus).sleeps
                        r = p.call(1, "replay", {"bus": bus, "n": n, "max_messages": 4096}, timeout=300)
                        r["server_cpu_s"] = bench_pubsub.proc_cpu(router.pid) - cpu0
                        r["sleeps"] = shmq.bus_stats(bus).sleeps - sleeps0
                        runs.append(r)
                    raw = [
                        p.call(1, "logread", {"dir": os.path.join(path, "log"), "max_records": 4096}, 300)
                        for _ in range(cfg.replay_runs)
                    ]
                finally:
                    self.stop_router(router)
                return {
                    "replay": summarize_reads(runs, n, "t_last"),
                    "logread": summarize_reads(raw, n, "t_end"),
                }
            if impl == "sqlite":
                db = os.path.join(path, "bench.db")
                p.call(0, "sqlite_open", {"path": db, "synchronous": "OFF"})
                p.call(0, "sqlite_insert", fill, timeout=300)
                p.call(0, "sqlite_close")
                p.call(1, "sqlite_open", {"path": db, "synchronous": "OFF"})
                try:
                    runs = [p.call(1, "sqlite_read", {"chunk": 4096}, 300) for _ in range(cfg.replay_runs)]
                finally:
                    p.call(1, "sqlite_close")
                return {"replay": summarize_reads(runs, n, "t_end")}
            server = self.start_redis(path, "no")
            try:
                p.call(0, "redis_open", {"sock": server.sock})
                p.call(0, "redis_xadd", fill, timeout=300)
                p.call(0, "redis_close")
                p.call(1, "redis_open", {"sock": server.sock})
                runs = []
                for _ in range(cfg.replay_runs):
                    cpu0 = bench_pubsub.proc_cpu(server.pid)
                    r = p.call(1, "redis_read", {"chunk": 4096}, 300)
                    r["server_cpu_s"] = bench_pubsub.proc_cpu(server.pid) - cpu0
                    runs.append(r)
                p.call(1, "redis_close")
            finally:
                self.stop_redis(server)
            return {"replay": summarize_reads(runs, n, "t_end")}
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # -- 4. spill and drain ----------------------------------------------------------------

    def spill_cell(self) -> dict[str, Any]:
        import shmq

        cfg, p = self.cfg, self.p
        n = cfg.spill_bytes // SPILL_MSG
        batch = 8
        n = n // batch * batch
        total = n * SPILL_MSG
        bus, path = self.fresh("spill")
        spill_root = os.path.join(path, "spill")
        sub_pid = p.pids[1]
        router = self.start_router(bus, spill_dir=spill_root)
        runs = []
        try:
            p.call(0, "pub_open", {"bus": bus, "capacity": 4 << 20})
            pub = {"bus": bus, "size": SPILL_MSG, "n": n, "batch": batch, "flush": True}
            p.call(0, "publish", {**pub, "n": batch})  # warm-up: the topic exists, the ring is mapped
            for _ in range(cfg.spill_runs):
                run: dict[str, Any] = {"bytes": total, "messages": n}
                # (a) no subscriber: the router takes the messages and drops them (no route)
                r = p.call(0, "publish", pub, timeout=300)
                run["none_bps"] = total / (r["t_end"] - r["t0"])
                # (b) a subscriber that reads along (on_full="spill" too)
                sub = {"bus": bus, "on_full": "spill", "capacity": cfg.sub_capacity}
                p.call(1, "sub_open", sub)
                p.send(1, "consume", {"n": n, "max_messages": 64})
                r = p.call(0, "publish", pub, timeout=300)
                c = p.recv(1, 300)
                run["running_bps"] = total / (r["t_end"] - r["t0"])
                run["running_spilled"] = shmq.bus_stats(bus).spilled
                # (c) the same subscriber SIGSTOPped: what its ring cannot hold is spilled
                p.send(1, "consume", {"n": n, "max_messages": 64, "timeout": 300})
                time.sleep(0.05)  # it is waiting in recv_many
                spilled0 = shmq.bus_stats(bus).spilled
                self.stop_process(sub_pid)
                try:
                    r = p.call(0, "publish", pub, timeout=300)
                    stats = shmq.bus_stats(bus)
                    (sub_stats,) = stats.subscribers
                    run["stopped_bps"] = total / (r["t_end"] - r["t0"])
                    run["spilled_messages"] = stats.spilled - spilled0
                    run["spill_bytes"] = sub_stats.spill_bytes
                    run["ring_messages"] = sub_stats.depth_messages
                    run["spill_files"] = sorted(
                        os.path.relpath(os.path.join(d, f), spill_root)
                        for d, _, files in os.walk(spill_root)
                        for f in files
                    )
                    t_cont = time.monotonic()
                finally:
                    self.resume_process(sub_pid)
                c = p.recv(1, 300)
                run["drained_bytes"] = c["bytes"]
                run["drain_s"] = c["t_last"] - t_cont
                run["drain_bps"] = c["bytes"] / run["drain_s"]
                # The spill directory of that subscriber goes once it is drained.
                t_gone = time.monotonic()
                while os.listdir(spill_root) and time.monotonic() - t_gone < 5:
                    time.sleep(0.005)
                left = os.listdir(spill_root)
                run["spill_dir_left"] = left
                run["spill_dir_gone_after_s"] = None if left else max(0.0, time.monotonic() - c["t_last"])
                p.call(1, "sub_close")
                runs.append(run)
            p.call(0, "pub_close")
        finally:
            self.stop_router(router)
            shutil.rmtree(path, ignore_errors=True)
        out = median_of(runs, "drain_bps")
        for key in ("none_bps", "running_bps", "stopped_bps"):
            out[key] = statistics.median(r[key] for r in runs)
            out["runs_" + key] = [r[key] for r in runs]
        out["spill_dir_left"] = [x for r in runs for x in r["spill_dir_left"]]
        out["runs"] = runs
        return out


def summarize_reads(runs: list[dict[str, Any]], n: int, end: str) -> dict[str, Any]:
    for r in runs:
        if r["count"] != n:
            raise BenchError(f"read {r['count']} records of {n}")
        wall = r[end] - r["t0"]
        r["rate"] = r["count"] / wall
        cpu = r.get("cpu_measured_s", r["cpu_s"])
        r["cores"] = {"client": cpu / wall, "server": r.get("server_cpu_s", 0.0) / wall}
        if "t_first" in r:
            r["first_after_s"] = r["t_first"] - r["t0"]
    out = median_of(runs, "rate")
    out["n"] = n
    return out


# ---------------------------------------------------------------------------
# Rows and targets
# ---------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    busy: str
    unit: str = "rate"  # "rate" (msg/s), "group", "spill_pub", "drain"
    impls: tuple[str, ...] = IMPLS
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    load: dict[str, float] | None = None


def fmt_rate(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f} M/s"
    if v >= 1e5:
        return f"{v / 1e3:.0f} k/s"
    if v >= 1e4:
        return f"{v / 1e3:.1f} k/s"
    return f"{v:,.0f}/s"


def fmt_gbps(v: float) -> str:
    return f"{v / 1e9:.2f} GB/s"


def fmt_times(x: float) -> str:
    return (f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:,.0f}") + TIMES


def fmt_runs(values: list[float], fmt: Callable[[float], str]) -> str:
    """' (min-max)' of several runs, the unit once if both share it."""
    if len(values) < 2:
        return ""
    lo, hi = fmt(min(values)), fmt(max(values))
    lo_num, _, lo_unit = lo.partition(" ")
    if lo_unit and hi.endswith(" " + lo_unit):
        lo = lo_num
    elif lo.endswith("/s") and hi.endswith("/s"):
        lo = lo[:-2]
    return f" ({lo}-{hi})"


def build_rows(cfg: Config) -> list[Row]:
    rows: list[Row] = []
    for size in (SMALL, LARGE):
        sz = "64 B" if size == SMALL else "4 KiB"
        b = BATCH[size]
        rows.append(
            Row(
                f"s_pub{size}",
                f"**Durable publish, {sz} payloads, 1 publisher** (msg/s until the router appended "
                f"everything; median of {cfg.runs} runs (min-max))",
                "",
            )
        )
        rows.append(
            Row(
                f"pub{size}_never",
                f'fsync="never" (the OS writes back); publish_many of {b}; SQLite: synchronous=OFF, a '
                f"transaction per {b}; Redis: appendfsync no, a pipeline of {b}",
                "shmq 2 (publisher, router); SQLite 1; Redis 2 (client, server)",
            )
        )
        rows.append(
            Row(
                f"pub{size}_interval",
                f'fsync="interval" (fdatasync every 100 ms); publish_many of {b}; SQLite: synchronous='
                f"NORMAL (WAL: syncs at checkpoints); Redis: appendfsync everysec",
                "shmq 2 (+ the router's flusher thread, asleep between syncs); SQLite 1; Redis 2",
            )
        )
        rows.append(
            Row(
                f"pub{size}_always",
                'fsync="always": one publish at a time, each returns once its record is on disk; '
                "SQLite: synchronous=FULL, a transaction per row; Redis: appendfsync always, one XADD "
                "per call",
                "0-1: the publisher sleeps on a futex until its sync; the router's forwarder spins "
                "≤ 50 µs then sleeps; its flusher blocks in fdatasync (peers alike: they wait for the disk)",
            )
        )
    rows.append(
        Row(
            "s_group",
            f'**Group commit, fsync="always", 64 B, one message at a time per writer** (aggregate '
            f"msg/s over {cfg.group_s:g} s; median of {cfg.group_runs} runs (min-max))",
            "",
        )
    )
    rows.append(
        Row(
            "group1",
            "1 publisher process; SQLite: FULL, 1 process; Redis: always, 1 client",
            "as above: 0-1 spinning",
            unit="group",
        )
    )
    rows.append(
        Row(
            "group1_spin",
            '↳ the same with Router(wait="spin"): its forwarder never sleeps, so a publish does not '
            "wait for it to wake up",
            "1 spinning (the router's forwarder)",
            unit="group",
            impls=("shmq",),
        )
    )
    rows.append(
        Row(
            f"group{GROUP}",
            f"{GROUP} publisher processes at once (ratio to 1 publisher; records per fdatasync); "
            f"SQLite: FULL, {GROUP} processes; Redis: always, {GROUP} clients",
            f"{GROUP} writers, each asleep while its record is synced; the router's forwarder and "
            "flusher threads",
            unit="group",
        )
    )
    rows.append(
        Row(
            "s_replay",
            f"**Replay, 64 B records, in the page cache** (msg/s; median of {cfg.replay_runs} runs "
            f"(min-max); {cfg.replay_n:,} records, Redis {cfg.replay_redis_n:,})",
            "",
        )
    )
    rows.append(
        Row(
            "replay",
            'a new Subscriber(start="earliest") reads the whole log with recv_many(4096) (from the '
            "constructor to the last message); SQLite: SELECT ... ORDER BY seq, fetchmany(4096); "
            "Redis: XRANGE COUNT 4096",
            "shmq 2 (the router reading the log, the subscriber); SQLite 1; Redis 2",
        )
    )
    rows.append(
        Row(
            "logread",
            'raw: shmq._native._ring.LogReader(dir/"log").read(4096) in a loop (tuples, CRC checked)',
            "1",
            impls=("shmq",),
        )
    )
    gib = cfg.spill_bytes / (1 << 30)
    amount = f"{gib:g} GiB" if gib >= 1 else f"{cfg.spill_bytes >> 20} MiB"
    rows.append(
        Row(
            "s_spill",
            f'**Spill: a Subscriber(on_full="spill", capacity={cfg.sub_capacity >> 20} MiB), {amount} in '
            f"64 KiB messages** (publish_many of 8; GB/s = 10^9 B/s; median of {cfg.spill_runs} runs)",
            "",
        )
    )
    rows.append(
        Row(
            "spill_pub",
            "publisher's rate until the router took everything: no subscriber → a subscriber reading "
            "along → that subscriber SIGSTOPped (its messages spill to disk)",
            "2 (publisher, router) → 3 (+ the subscriber) → 2 (the subscriber stopped)",
            unit="spill_pub",
            impls=("shmq",),
        )
    )
    rows.append(
        Row(
            "spill_drain",
            "SIGCONT: drain rate into the subscriber (from SIGCONT to its last message), and the "
            "spill directory afterwards",
            "2 (router, subscriber)",
            unit="drain",
            impls=("shmq",),
        )
    )
    return rows


@dataclass
class Target:
    key: str
    text: str
    check: Callable[[dict[str, Row]], tuple[bool | None, str]]


def cell(rows: dict[str, Row], key: str, impl: str = "shmq") -> dict[str, Any] | None:
    c = rows[key].cells.get(impl) if key in rows else None
    return c if c and "error" not in c else None


def target_publish(rows: dict[str, Row]) -> tuple[bool | None, str]:
    c, sq = cell(rows, "pub64_never"), cell(rows, "pub64_never", "sqlite")
    if c is None:
        return None, "not measured"
    v = c["rate"]
    parts = [f"{fmt_rate(v)} = {fmt_times(v / 1e6)} the 1 M msg/s"]
    ok = v >= 1e6
    if sq is not None:
        ratio = v / sq["rate"]
        parts.append(
            f"{fmt_times(ratio)} SQLite-WAL synchronous=OFF ({fmt_rate(sq['rate'])}; needs ≥ 10{TIMES})"
        )
        ok = ok and ratio >= 10
    else:
        parts.append("SQLite not measured")
    return ok, "; ".join(parts)


def target_group(rows: dict[str, Row]) -> tuple[bool | None, str]:
    one, many = cell(rows, "group1"), cell(rows, f"group{GROUP}")
    if one is None or many is None:
        return None, "not measured"
    ratio = many["rate"] / one["rate"]
    return ratio >= 5, (
        f"{GROUP} publishers {fmt_rate(many['rate'])} / 1 publisher {fmt_rate(one['rate'])} = "
        f"{fmt_times(ratio)} (needs ≥ 5{TIMES})"
    )


def target_replay(rows: dict[str, Row]) -> tuple[bool | None, str]:
    c = cell(rows, "replay")
    if c is None:
        return None, "not measured"
    return c["rate"] >= 3e6, f"{fmt_rate(c['rate'])} = {fmt_times(c['rate'] / 3e6)} the 3 M msg/s"


def target_drain(rows: dict[str, Row]) -> tuple[bool | None, str]:
    c = cell(rows, "spill_drain")
    if c is None:
        return None, "not measured"
    v = c["drain_bps"]
    text = f"{fmt_gbps(v)} = {fmt_times(v / 1e9)} the 1 GB/s, backlog {c['bytes'] / (1 << 20):,.0f} MiB"
    ok = v >= 1e9
    if c["spill_dir_left"]:
        ok = False
        text += f"; the spill directory was NOT removed: {c['spill_dir_left']}"
    return ok, text


TARGETS = [
    Target(
        "pub64_never",
        f'durable publish, 64 B, fsync="never": ≥ 1 M msg/s and ≥ 10{TIMES} SQLite-WAL inserts',
        target_publish,
    ),
    Target(
        f"group{GROUP}",
        f'fsync="always", {GROUP} publishers: group commit ≥ 5{TIMES} one fsync per message',
        target_group,
    ),
    Target("replay", 'replay (Subscriber(start="earliest")): ≥ 3 M msg/s', target_replay),
    Target("spill_drain", "a spilled backlog (1 GB in the full run) drains at ≥ 1 GB/s", target_drain),
]


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def short(row: Row, c: dict[str, Any]) -> str:
    if "error" in c:
        return f"error: {c['error']}"
    if row.unit in ("rate", "group"):
        text = f"{fmt_rate(c['rate'])} (runs: {', '.join(fmt_rate(v) for v in c['runs_rate'])})"
        if c.get("syncs"):
            text += f", {c['count'] / c['syncs']:.1f} records per fdatasync"
        return text
    if row.unit == "spill_pub":
        return " -> ".join(fmt_gbps(c[k]) for k in ("none_bps", "running_bps", "stopped_bps"))
    return f"{fmt_gbps(c['drain_bps'])}, spill dir left: {c['spill_dir_left'] or 'nothing'}"


def run_all(bench: Bench, rows: list[Row], meter: bench_pubsub.LoadMeter, sections: set[str]) -> None:
    by_key = {r.key: r for r in rows}
    impls = [i for i in IMPLS if i in bench.impls and i not in bench.missing]
    loads: dict[str, list[dict[str, float]]] = {}

    bench.seed_probes()

    def measure(keys: list[str], impl: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run one cell (fn returns a cell per row key) and record it in its rows."""
        probe = bench.settled_probe()
        before = meter.snapshot()
        try:
            result = fn()
        except BenchError as exc:
            result = {key: {"error": str(exc)} for key in keys}
            if exc.detail:
                log(exc.detail)
            bench.reset_pool()
        load = meter.between(before, meter.snapshot())
        for key in keys:
            row = by_key[key]
            c = dict(result[key])
            c["load"] = load
            c["probe_ns"] = probe
            row.cells[impl] = c
            loads.setdefault(key, []).append(load)
            log(
                f"  {key:13} {impl:7} {short(row, c)}  "
                f"[{load['wall_s']:.1f} s, other processes {load['other_pct']:.0f} % of a core"
                + (f", C spin probe {probe / 1e3:.2f} µs]" if probe else "]")
            )

    if "publish" in sections:
        for size in (SMALL, LARGE):
            for mode in MODES:
                key = f"pub{size}_{mode}"
                for impl in impls:
                    measure(
                        [key], impl, lambda k=key, i=impl, s=size, m=mode: {k: bench.publish_cell(i, s, m)}
                    )
    if "group" in sections:
        try:
            bench.floor = bench.sync_floor()
            log(f"  disk floor: {fmt_rate(bench.floor['rate'])} (mmap write + fdatasync, one process)")
        except BenchError as exc:
            bench.floor = {"error": str(exc)}
            bench.reset_pool()
        for writers in (1, GROUP):
            key = f"group{writers}"
            for impl in impls:
                measure([key], impl, lambda k=key, i=impl, w=writers: {k: bench.group_cell(i, w)})
            if writers == 1 and "shmq" in impls:
                measure(["group1_spin"], "shmq", lambda: {"group1_spin": bench.group_cell("shmq", 1, "spin")})
    if "replay" in sections:
        for impl in impls:
            keys = ["replay", "logread"] if impl == "shmq" else ["replay"]
            measure(keys, impl, lambda i=impl: bench.replay_cells(i))
    if "spill" in sections and "shmq" in impls:
        measure(
            ["spill_pub", "spill_drain"],
            "shmq",
            lambda: dict.fromkeys(("spill_pub", "spill_drain"), bench.spill_cell()),
        )
    for key, ls in loads.items():
        by_key[key].load = bench_queue.combine(ls)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def fmt_cell(row: Row, impl: str, c: dict[str, Any], rows: dict[str, Row]) -> str:
    if row.unit in ("rate", "group"):
        text = fmt_rate(c["rate"]) + fmt_runs(c["runs_rate"], fmt_rate)
        if row.key == f"group{GROUP}":
            one = cell(rows, "group1", impl)
            if one is not None:
                text += f"; {fmt_times(c['rate'] / one['rate'])} 1 writer"
        if row.key.endswith("_always") or row.unit == "group":
            text += f"; {1e6 / c['rate']:,.0f} µs each" if row.key != f"group{GROUP}" else ""
        if impl == "shmq" and c.get("syncs"):
            if row.key.endswith("_interval"):
                text += f"; {c['syncs']} fdatasyncs in {c['wall_s']:.2f} s"
            else:
                text += f"; {c['count'] / c['syncs']:.1f} records per fdatasync"
        if impl == "shmq" and row.key == "replay":
            text += f"; the router slept {c['sleeps']:,} times"
            text += f"; first message after {c['first_after_s'] * 1e3:.1f} ms"
        return text
    if row.unit == "spill_pub":
        none, running, stopped = c["none_bps"], c["running_bps"], c["stopped_bps"]
        return (
            f"{fmt_gbps(none)} → {fmt_gbps(running)} → {fmt_gbps(stopped)} (spilling: "
            f"{stopped / running - 1:+.0%} vs a reading subscriber, {stopped / none - 1:+.0%} vs none)"
        )
    runs = c["runs_drain_bps"]
    text = fmt_gbps(c["drain_bps"]) + fmt_runs(runs, fmt_gbps)
    spilled = c["spill_bytes"]
    text += (
        f"; {spilled / (1 << 20):,.0f} MiB spilled ({c['spilled_messages']:,} messages, "
        f"{len(c['spill_files'])} segment files), {c['ring_messages']} in the ring; "
    )
    if c["spill_dir_left"]:
        text += f"spill dir NOT removed: {c['spill_dir_left']}"
    else:
        text += (
            f"spill dir removed ({(c['spill_dir_gone_after_s'] or 0) * 1e3:.0f} ms after the last message)"
        )
    return text


def value_of(row: Row, c: dict[str, Any] | None) -> float | None:
    if not c or "error" in c or row.unit not in ("rate", "group"):
        return None
    return float(c["rate"])


def fmt_cores(c: dict[str, Any] | None) -> str:
    if not c or "error" in c or "cores" not in c:
        return ""
    return f"{c['cores']['client']:.2f} / {c['cores']['server']:.2f}"


def all_probes(rows: list[Row]) -> list[float]:
    return [c["probe_ns"] for r in rows for c in r.cells.values() if c.get("probe_ns")]


def render(rows: list[Row], bench: Bench) -> str:
    by_key = {r.key: r for r in rows}
    typical = bench_pubsub.probe_reference(all_probes(rows))
    header = ["Scenario (shmq; SQLite; Redis)", "Busy / spinning processes (2 cores)", "shmq"]
    header += [PEER_NAMES[p] for p in PEERS] + [f"shmq vs {PEER_NAMES[p].split()[0]}" for p in PEERS]
    header += ["CPU, cores: shmq client(s) / router; SQLite; Redis client(s) / server"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row.key.startswith("s_"):
            lines.append("| " + row.label + " |" + " |" * (len(header) - 1))
            continue
        texts: dict[str, str] = {}
        for impl in IMPLS:
            c = row.cells.get(impl)
            if impl in bench.missing:
                texts[impl] = "not available"
            elif impl not in bench.impls:
                texts[impl] = "skipped"
            elif impl not in row.impls or c is None:
                texts[impl] = "—"
            elif "error" in c:
                texts[impl] = f"error: {c['error']}"[:80]
            else:
                texts[impl] = fmt_cell(row, impl, c, by_key)
                if c.get("probe_ns") and typical and c["probe_ns"] > bench_pubsub.SLOW_PROBE * typical:
                    texts[impl] += "†"
        ratios = []
        shmq_v = value_of(row, row.cells.get("shmq"))
        for p in PEERS:
            peer_v = value_of(row, row.cells.get(p))
            ratios.append(fmt_ratio(shmq_v / peer_v) if shmq_v and peer_v else "—")
        cores = "; ".join(
            (fmt_cores(row.cells.get(i)) if i != "sqlite" else fmt_cores(row.cells.get(i)).split(" /")[0])
            or "—"
            for i in IMPLS
            if i in row.impls
        )
        lines.append("| " + " | ".join([row.label, row.busy, *texts.values(), *ratios, cores]) + " |")
    return "\n".join(lines)


NOTES = """\
Notes
- Every publish run starts from a fresh data directory (shmq), database (SQLite) or redis-server
  (Redis) after os.sync(), with a short warm-up (the topic registered, the rings mapped), and is
  sized by a calibration run to about {target_s:g} s (at most {max_mib:,} MiB of payload). Rates are
  messages / (the publisher's clock after the last call returned, or for shmq after bus_stats()
  showed every message appended - polled every 0.5 ms - minus its clock before the first call).
- Durability of each mode: shmq "never" and SQLite OFF and Redis "no" leave the writing back to the
  OS (a crash of the machine can lose recent data; a crash of the process cannot, except SQLite OFF
  which may corrupt on power loss). shmq "interval" syncs every 100 ms; SQLite NORMAL in WAL mode
  syncs the WAL only at checkpoints; Redis everysec once a second. "always": nothing is acknowledged
  before it is on disk (fdatasync; SQLite's FULL syncs the WAL at each commit; Redis fsyncs before
  it replies).
- shmq's record on disk: a 16-byte log header (length, CRC-32C, seq, time) and the 40-byte message
  header with the topic, then the payload. SQLite rows carry (seq, topic, time_ns, payload); Redis
  stream entries an ID (time-seq) and one field "d" with the payload.
- SQLite runs inside the publishing process (no server): its figures are one process; Redis has a
  server (redis-server 1 thread + background fsync thread) and the redis-py client, which spends
  most of the client's CPU building commands.
- CPU: CPU seconds / wall seconds of the measured run: "client" is the publishing process(es) (for
  group commit, summed over the writers), "router" / "server" the shmq router or redis-server; 1.00
  is one core; the machine has 2.
- The router runs wait="adaptive" (the default): its forwarder spins up to 50 µs after its last
  message, then sleeps on a futex; fsync="always" adds a flusher thread that calls fdatasync back
  to back while records wait (group commit), "interval" one that wakes every 100 ms.
"""


def machine_facts(root: str) -> dict[str, Any]:
    facts = bench_queue.machine_facts()
    for key in ("pyzmq", "faster-fifo"):
        facts.pop(key, None)
    facts["sqlite"] = sqlite3.sqlite_version
    facts["redis_server"] = redis_version() if shutil.which("redis-server") else "not installed"
    try:
        import redis

        facts["redis_py"] = redis.__version__
    except ImportError:
        facts["redis_py"] = "not installed"
    mnt, fstype, dev = mount_of(root)
    facts["data_fs"] = f"{fstype} on {dev} (mounted at {mnt})"
    return facts


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

SECTIONS = ("publish", "group", "replay", "spill")


def section_of(key: str) -> str:
    key = key.removeprefix("s_")
    if key.startswith("pub"):
        return "publish"
    if key.startswith("group"):
        return "group"
    if key in ("replay", "logread"):
        return "replay"
    return "spill"


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (~15 s): fewer, shorter runs")
    ap.add_argument("--json", metavar="FILE", help="also save the raw results as JSON")
    ap.add_argument("--only", metavar="IMPLS", help=f"comma-separated subset of {', '.join(IMPLS)}")
    ap.add_argument("--sections", metavar="NAMES", help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--dir", metavar="DIR", help="where the temporary data directory goes (a real disk)")
    args = ap.parse_args(argv)
    impls = tuple(args.only.split(",")) if args.only else IMPLS
    if unknown := set(impls) - set(IMPLS):
        ap.error(f"unknown implementation(s): {', '.join(sorted(unknown))}")
    sections = set(args.sections.split(",")) if args.sections else set(SECTIONS)
    if unknown := sections - set(SECTIONS):
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    cfg = QUICK if args.quick else FULL
    rows = [r for r in build_rows(cfg) if section_of(r.key) in sections]

    root = data_root(args.dir)
    facts = machine_facts(root)
    started = datetime.datetime.now().astimezone()
    python = sys.executable
    if python.startswith(bench_queue.ROOT + os.sep):
        python = os.path.relpath(python, bench_queue.ROOT)
    command = shlex.join([python, *sys.argv])
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(cfg, impls, root)
    log(
        f"shmq persistence benchmark ({'quick' if args.quick else 'full'} run), {facts['nproc']} CPUs, "
        f"data in {bench.tmpdir} ({facts['data_fs']}); missing: {bench.missing or 'none'}"
    )
    meter = bench_pubsub.LoadMeter()
    try:
        bench.start_pool()
        run_all(bench, rows, meter, sections)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log("interrupted: cleaning up")
        return 130
    finally:
        bench.cleanup()
    load = meter.between(meter.start, meter.snapshot())
    by_key = {r.key: r for r in rows}
    noisy = [r for r in rows if r.load and r.load["wall_s"] >= 1 and r.load["other_pct"] > 10]

    print(f"shmq persistence benchmarks, {started:%Y-%m-%d %H:%M %Z}, `{command}` ({load['wall_s']:.0f} s)")
    print(
        f"machine: {facts['nproc']} CPUs, {facts['cpu_model']}, Linux {facts['kernel']}, "
        f"Python {facts['python']}; "
        f"shmq {facts['shmq']}, SQLite {facts['sqlite']}, redis-server {facts['redis_server']} "
        f"(redis-py {facts['redis_py']})"
    )
    print(f"shmq commit {facts['shmq_commit']}; data on {facts['data_fs']}")
    if facts["extension_warning"]:
        print(f"WARNING: {facts['extension_warning']}")
    for impl, why in bench.missing.items():
        print(f"{impl}: not available ({why})")
    print(
        f"other processes on the machine used {load['other_pct']:.1f} % of one core on average during the "
        f"run (hypervisor steal {load['steal_pct']:.1f} %)"
    )
    print(
        f'Spinning: {facts["nproc"]} cores here. The router uses wait="adaptive" (spins ≤ 50 µs after its '
        "last message, then sleeps), so it is busy only while messages flow; at most 3 processes are busy "
        f'at once in any row (publisher, router, subscriber), and in the fsync="always" rows nobody spins: '
        f"the {GROUP} publishers sleep while the disk works."
    )
    print()
    print(render(rows, bench))
    floor = bench.floor
    if floor and "error" not in floor:
        print()
        print(
            f"The disk itself (group commit's reference): one process writing a 128-byte record into a "
            f"preallocated mmap'ed file and calling fdatasync, as the router's log does: "
            f"{fmt_rate(floor['rate'])}{fmt_runs(floor['runs_rate'], fmt_rate)} = "
            f"{1e6 / floor['rate']:,.0f} µs per durable write."
        )
    elif floor:
        print(f"The disk itself: error: {floor['error']}")
    print()
    print("Targets")
    verdicts = []
    for t in TARGETS:
        ok, text = t.check(by_key)
        verdict = "met" if ok else "NOT MET" if ok is not None else "not measured"
        verdicts.append({"key": t.key, "target": t.text, "met": ok, "verdict": verdict, "measured": text})
        print(f"- {t.text}: **{verdict}** ({text})")
    print()
    if noisy:
        print("Rows (of 1 s or more) measured while other processes used over 10 % of a core:")
        for r in noisy:
            assert r.load is not None
            print(f"- {r.key}: {r.load['other_pct']:.0f} % of a core over {r.load['wall_s']:.1f} s")
    else:
        print("No row (of 1 s or more) ran while other processes used over 10 % of a core.")
    probes = all_probes(rows)
    if probes:
        typical = bench_pubsub.probe_reference(probes)
        slow = [
            f"{r.key} ({impl})"
            for r in rows
            for impl, c in r.cells.items()
            if c.get("probe_ns") and c["probe_ns"] > bench_pubsub.SLOW_PROBE * typical
        ]
        print(
            f"Cross-CPU probe (bench_queue.py's C busy-spin ping-pong p50, before each cell): median "
            f"{statistics.median(probes) / 1e3:.2f} µs, range {min(probes) / 1e3:.2f}-"
            f"{max(probes) / 1e3:.2f} µs, first quartile {typical / 1e3:.2f} µs."
        )
        if slow:
            print(
                f"† Cells measured in the host's slow vCPU placement (probe over {bench_pubsub.SLOW_PROBE}x "
                f"that, even after waiting up to {bench.cfg.settle_s:g} s): {', '.join(slow)}."
            )
    elif bench.prober.probe_error:
        print(f"No cross-CPU probe: {bench.prober.probe_error}")
    print()
    print(NOTES.format(target_s=cfg.target_s, max_mib=cfg.max_bytes >> 20))
    if args.json:
        data = {
            "date": started.isoformat(),
            "command": command,
            "machine": facts,
            "other_load": load,
            "config": dataclasses.asdict(cfg),
            "missing": bench.missing,
            "rows": [
                {"key": r.key, "label": r.label, "busy": r.busy, "load": r.load, "cells": r.cells}
                for r in rows
                if not r.key.startswith("s_")
            ],
            "targets": verdicts,
            "disk_floor": bench.floor,
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
