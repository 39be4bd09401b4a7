"""shmq against the queues a user would pick instead, measured in one run and printed as one table.

Run (from the repository root; `.venv/bin/pip install -e ".[bench]"` installs the peers):

    .venv/bin/python benchmarks/bench_queue.py                  # full run, ~2-4 minutes
    .venv/bin/python benchmarks/bench_queue.py --quick          # smoke run, ~45 s
    .venv/bin/python benchmarks/bench_queue.py --json out.json  # also save the raw results

Implementations (columns): shmq (spsc rings unless a row says otherwise), multiprocessing.Queue,
multiprocessing.Pipe (the default duplex Pipe(), send_bytes/recv_bytes), faster-fifo (raw bytes:
dumps=identity, loads=bytes, nothing pickled; put_many/get_many in batch rows) and pyzmq (a PAIR
socket over ipc:// in a temporary directory; single messages). A peer that is not installed shows
"not installed". Every measurement runs in two fresh processes started with the multiprocessing
"spawn" context (peers.py has their loops); the parent creates the channels, sends commands and
sleeps while they run. gc is disabled in the workers while they measure.

What is measured (benchmarks/README.md has the details and the last results):

* Round trip, 64 B. Process A times each ``put(msg); get()`` with time.perf_counter_ns (the two
  clock reads, ~0.1 µs, included); process B echoes with ``put(get())``. A warm-up run is
  discarded, then one run of >= 50 000 round trips when busy-polling (5 000 - 50 000, ~1.5 s, when
  blocking), reported as p50 / p99 / p99.9 / max. wait="spin": both processes busy-poll (the peers
  loop on their non-blocking call), so two processes spin on the two cores. wait="adaptive" (the
  default): spin up to 50 µs, then sleep. wait="block": both sleep in the kernel between
  messages, as the peers' blocking calls do; run with free placement, both processes pinned to
  CPU 0, and pinned to CPUs 0 and 1.
* C reference (c_pingpong.c, built at run time with gcc -O2 together with shmq/_native/ring.c
  into benchmarks/.build/): the same ping-pong through the same ring code without Python,
  spinning and blocking, and a bare futex hand-off: the floor of any blocking hand-off here.
* Idle waiter: CPU time (time.process_time) of a process blocked in get() on an empty queue,
  in % of one core.
* One-way throughput, 64 B / 4 KiB / 1 MiB. A sends n messages as fast as it can, B receives
  them; rate = n / (B's clock after the last - A's clock before the first), CLOCK_MONOTONIC
  being one clock for both. Warm-up runs size n to ~0.3 s; the table shows the median (and
  range) of 5 runs. Single: put(bytes) / get() (a new bytes object per message). Batch:
  put_many(list) / get_many(). 1 MiB copy-in/copy-out: A copies a prepared numpy array into
  put_view() (Pipe: send_bytes, zmq: send), B copies get_view() into a reused buffer (Pipe:
  recv_bytes_into, zmq: recv(copy=False) and a copy).

Ratios: throughput shmq / peer, latency peer p50 / shmq p50. Every row says how many processes
spin. The run also reports how much CPU other processes used meanwhile (from /proc/stat minus
our own), since anything else running on a 2-core machine disturbs spinning benchmarks.

Cleanup: shmq segments are created by the parent and removed at exit, also on Ctrl-C or
SIGTERM; workers ignore SIGINT and are terminated by the parent; the ipc directory is deleted;
the C reference uses an anonymous shared mapping and its child dies with its parent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NATIVE = os.path.join(ROOT, "shmq", "_native")
BUILD = os.path.join(HERE, ".build")
CTX = multiprocessing.get_context("spawn")
KiB, MiB = 1 << 10, 1 << 20
PEERS = peers.IMPLS[1:]
TIMES = "\u00d7"  # the multiplication sign


class BenchError(Exception):
    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class Config:
    rtt_budget_s: float  # aim of one measured latency run (bounded by the min/max counts)
    rtt_spin_min: int
    rtt_spin_max: int
    rtt_block_min: int
    rtt_block_max: int
    rtt_spin_warmup: int
    rtt_block_warmup: int
    tput_s: float  # aim of one measured throughput run
    repeats: int  # throughput runs per cell (the median is shown)
    idle_s: float
    c_spin_n: int
    c_block_n: int


FULL = Config(1.5, 50_000, 1_000_000, 5_000, 50_000, 5_000, 1_000, 0.3, 5, 3.0, 1_000_000, 20_000)
QUICK = Config(0.2, 3_000, 200_000, 1_000, 10_000, 500, 200, 0.1, 1, 1.0, 200_000, 5_000)


# ---------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------


class Workers:
    """Spawned worker processes of one scenario, driven over control pipes."""

    def __init__(self, impl: str, spec: dict[str, Any], channels: peers.Channels, roles: tuple[str, ...]):
        self.procs: dict[str, Any] = {}
        self.ctrl: dict[str, Any] = {}
        self.channels = channels
        try:
            for role in roles:
                parent_end, child_end = CTX.Pipe()
                proc = CTX.Process(
                    target=peers.worker,
                    args=(role, impl, spec, channels.handles[role], child_end),
                    name=f"bench-{impl}-{role}",
                    daemon=True,
                )
                # The child inherits the blocked SIGINT and ignores it before unblocking it, so a
                # Ctrl-C during its start-up reaches only us (we terminate it and clean up).
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    proc.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                child_end.close()
                self.procs[role], self.ctrl[role] = proc, parent_end
            channels.after_start()
            for role in roles:
                self.recv(role, 60.0)
        except BaseException:
            self.close()
            raise

    def send(self, arg: Any) -> None:
        for role in sorted(self.ctrl, reverse=True):  # B (receiver) first
            self.ctrl[role].send(("run", arg))

    def recv(self, role: str, timeout: float) -> Any:
        conn = self.ctrl[role]
        if not conn.poll(timeout):
            raise BenchError(f"worker {role} gave no answer within {timeout:.0f} s")
        try:
            status, value = conn.recv()
        except EOFError:
            proc = self.procs[role]
            proc.join(1)
            raise BenchError(f"worker {role} died (exit code {proc.exitcode})") from None
        if status == "error":
            raise BenchError(value.strip().splitlines()[-1], value)
        return value

    def run(self, arg: Any, timeout: float) -> dict[str, Any]:
        self.send(arg)
        deadline = time.monotonic() + timeout
        return {role: self.recv(role, max(1.0, deadline - time.monotonic())) for role in self.ctrl}

    def counters(self) -> dict[str, int] | None:
        """shmq's shared wait/wake counters (cumulative), None for the peers."""
        return self.channels.stats() if self.channels.stats else None

    def close(self) -> None:
        for conn in self.ctrl.values():
            with contextlib.suppress(Exception):
                conn.send(("quit", None))
        for proc in self.procs.values():
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for conn in self.ctrl.values():
            conn.close()
        self.procs.clear()
        self.ctrl.clear()


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


def counter_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {k: after[k] - before[k] for k in after}


class Bench:
    def __init__(self, cfg: Config, impls: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.impls = impls
        self.prefix = f"bench-{os.getpid()}-"
        self.counter = itertools.count()
        self.tmpdir = tempfile.mkdtemp(prefix="shmq-bench-")
        self.live: list[Callable[[], None]] = []  # cleanups of what is open now
        self.missing = {impl: why for impl in impls if (why := peers.availability(impl))}
        self.probe_error = ""
        self.typical_probe = 0.0  # median probe of the run, set by render()
        self.best_probe = 0.0  # fastest probe so far: the host's normal placement

    def name(self) -> str:
        return f"{self.prefix}{next(self.counter)}"

    @contextlib.contextmanager
    def workers(self, impl: str, spec: dict[str, Any], roles: tuple[str, ...] = ("A", "B")) -> Any:
        channels = peers.make_channels(impl, spec, CTX, self.name, self.tmpdir)
        self.live.append(channels.cleanup)
        try:
            w = Workers(impl, spec, channels, roles)
            self.live.append(w.close)
            try:
                yield w
            finally:
                w.close()
                self.live.remove(w.close)
        finally:
            channels.cleanup()
            self.live.remove(channels.cleanup)

    def cleanup(self) -> None:
        for fn in reversed(self.live):
            with contextlib.suppress(Exception):
                fn()
        self.live.clear()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir("/dev/shm"):
                if entry.startswith("shmq." + self.prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join("/dev/shm", entry))
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    # -- round trip ----------------------------------------------------------

    def rtt(self, impl: str, spec: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        blocking = spec["wait"] == "block" or (impl != "shmq" and not spec.get("poll"))
        warm = cfg.rtt_block_warmup if blocking else cfg.rtt_spin_warmup
        lo, hi = (cfg.rtt_block_min, cfg.rtt_block_max) if blocking else (cfg.rtt_spin_min, cfg.rtt_spin_max)
        with self.workers(impl, spec) as w:
            first = w.run(warm, timeout=60 + warm * 2e-3)["A"]
            n = clamp(int(cfg.rtt_budget_s * 1e9 / first["mean"]), lo, hi)
            before = w.counters()
            result = w.run(n, timeout=60 + 20 * n * first["mean"] * 1e-9)["A"]
            counters = counter_delta(before, w.counters())
        result["warmup"] = warm
        if counters:
            result["shmq_counters"] = counters
        return result

    # -- throughput ----------------------------------------------------------

    def tput(self, impl: str, spec: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        batch = spec.get("batch", 1)
        size = spec["size"]

        def rounded(n: int) -> int:
            return max(batch, n // batch * batch)

        with self.workers(impl, spec) as w:

            def once(n: int, rate_guess: float) -> tuple[float, dict[str, Any]]:
                r = w.run(n, timeout=60 + 20 * n / rate_guess)
                return n * 1e9 / (r["B"]["t1"] - r["A"]["t0"]), r

            n0 = rounded(max(1, int(2 * MiB / size)) if size >= KiB else 20_000)
            rate, _ = once(n0, 1000.0)  # first contact: also warms up both sides
            rate, _ = once(rounded(max(n0, int(rate * cfg.tput_s / 4))), rate)  # warm-up
            n = rounded(max(n0, int(rate * cfg.tput_s)))
            before = w.counters()
            runs = [once(n, rate) for _ in range(cfg.repeats)]
            counters = counter_delta(before, w.counters())
        rates = [r for r, _ in runs]
        median = statistics.median(rates)
        result: dict[str, Any] = {
            "n": n,
            "runs_msgs_per_s": rates,
            "msgs_per_s": median,
            "bytes_per_s": median * size,
        }
        per_call = [r["B"].get("messages_per_get_many") for _, r in runs]
        if per_call[0] is not None:
            result["messages_per_get_many"] = statistics.median(per_call)
        if counters:
            result["shmq_counters"] = counters  # summed over the measured runs
        return result

    # -- idle ------------------------------------------------------------------

    def idle(self, jobs: list[tuple[str, str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """Runs all idle waiters at once (they sleep, so they do not disturb each other)."""
        out: dict[str, dict[str, Any]] = {}
        with contextlib.ExitStack() as stack:
            running = []
            for key, impl, spec in jobs:
                try:
                    running.append((key, stack.enter_context(self.workers(impl, spec, roles=("B",)))))
                except BenchError as exc:
                    out[key] = {"error": str(exc)}
            for _, w in running:
                w.send(self.cfg.idle_s)
            for key, w in running:
                try:
                    out[key] = w.recv("B", 60 + 2 * self.cfg.idle_s)
                except BenchError as exc:
                    out[key] = {"error": str(exc)}
        return out

    # -- C reference ------------------------------------------------------------

    def c_binary(self) -> str:
        exe = os.path.join(BUILD, "c_pingpong")
        sources = [os.path.join(HERE, "c_pingpong.c"), os.path.join(NATIVE, "ring.c")]
        inputs = [*sources, os.path.join(NATIVE, "ring.h")]
        if os.path.exists(exe) and all(os.path.getmtime(exe) >= os.path.getmtime(s) for s in inputs):
            return exe
        os.makedirs(BUILD, exist_ok=True)
        cc = os.environ.get("CC", "gcc")
        cmd = [cc, "-O2", "-std=c11", "-Wall", "-Wextra", "-I", NATIVE, "-o", exe, *sources]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise BenchError(f"{cc} not found") from None
        except subprocess.CalledProcessError as exc:
            raise BenchError(f"{shlex.join(cmd)} failed", exc.stderr) from None
        return exe

    def c_run(self, mode: str, n: int, placement: str) -> dict[str, Any]:
        warm = max(1_000, n // 10)
        cmd = [self.c_binary(), mode, str(n), str(warm), placement]
        try:
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        except subprocess.CalledProcessError as exc:
            raise BenchError(f"c_pingpong {mode} failed: {exc.stderr.strip()}") from None
        except subprocess.TimeoutExpired:
            raise BenchError(f"c_pingpong {mode} timed out") from None
        return dict(json.loads(proc.stdout))

    def probe(self) -> float | None:
        """p50 of a short C busy-spin ping-pong (ns): how fast cache lines cross between the two
        CPUs right now. On this VM it moves between ~0.25 and ~0.85 µs as the host places the vCPUs."""
        if self.probe_error:
            return None
        try:
            return float(self.c_run("spin", 20_000, "free")["p50"])
        except BenchError as exc:
            self.probe_error = str(exc)
            log(f"no C probe: {exc}")
            return None

    def settled_probe(self, max_wait_s: float | None = None) -> float | None:
        """Probe; while it reads the host's slow vCPU placement (over SLOW_PROBE x the fastest
        probe so far), wait for it to pass, up to max_wait_s. Cells are then measured in the same
        host state, and the ones it never left get a † in the table."""
        deadline = time.monotonic() + (SETTLE_WAIT_S if max_wait_s is None else max_wait_s)
        p = self.probe()
        while (
            p is not None
            and self.best_probe
            and p > SLOW_PROBE * self.best_probe
            and time.monotonic() < deadline
        ):
            time.sleep(2.0)
            p = self.probe()
        if p is not None:
            self.best_probe = min(self.best_probe or p, p)
        return p


SETTLE_WAIT_S = 20.0  # the longest a cell waits for the host to leave its slow state


# ---------------------------------------------------------------------------
# Rows and targets
# ---------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    unit: str  # "lat" (ns percentiles), "msgs" (msg/s), "bytes" (B/s), "pct"
    spinning: str
    run: Callable[[Bench, str], dict[str, Any]] | None = None  # measures one impl
    impls: tuple[str, ...] = peers.IMPLS
    borrow: dict[str, tuple[str, str]] = field(default_factory=dict)  # impl -> (row key, marker)
    target: tuple[str, Callable[[float, dict[str, Row]], tuple[float, bool]]] | None = None
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    section: str = ""
    load: dict[str, float] | None = None  # other processes' CPU while the row ran

    def value(self, impl: str) -> float | None:
        cell = self.cells.get(impl) or {}
        if self.unit == "lat":
            return cell.get("p50")
        if self.unit == "msgs":
            return cell.get("msgs_per_s")
        if self.unit == "bytes":
            return cell.get("bytes_per_s")
        return cell.get("core_percent")


def at_most(limit_ns: float) -> Callable[[float, dict[str, Row]], tuple[float, bool]]:
    return lambda v, rows: (limit_ns, v <= limit_ns)


def at_least(limit: float) -> Callable[[float, dict[str, Row]], tuple[float, bool]]:
    return lambda v, rows: (limit, v >= limit)


def rtt_spin_target(v: float, rows: dict[str, Row]) -> tuple[float, bool]:
    p999 = rows["rtt_spin"].cells["shmq"]["p999"]
    return 1000.0, v <= 1000.0 and p999 <= 10_000.0


def rtt_block_target(key: str) -> Callable[[float, dict[str, Row]], tuple[float, bool]]:
    """p50 ≤ 0.8 of mp.Pipe's blocking p50 in the same placement."""

    def check(v: float, rows: dict[str, Row]) -> tuple[float, bool]:
        pipe = rows[key].value("mp.Pipe")
        if pipe is None:
            return float("nan"), False
        return 0.8 * pipe, v <= 0.8 * pipe

    return check


def build_rows(bench: Bench) -> list[Row]:
    def spec_of(**kw: Any) -> dict[str, Any]:
        spec = {"ring": "spsc", "capacity": MiB, "wait": "adaptive", "size": 64}
        spec.update(kw)
        return spec

    def rtt(wait: str, poll: bool, cpus: tuple[int, int] | None = None, ring: str = "spsc") -> Any:
        def run(b: Bench, impl: str) -> dict[str, Any]:
            return b.rtt(
                impl, spec_of(kind="rtt", wait=wait, ring=ring, cpus=cpus, poll=poll and impl != "shmq")
            )

        return run

    def tput(size: int, mode: str, batch: int = 1, wait: str = "adaptive", ring: str = "spsc") -> Any:
        capacity = 8 * MiB if size >= MiB else MiB

        def run(b: Bench, impl: str) -> dict[str, Any]:
            spec = spec_of(
                kind="tput", size=size, mode=mode, batch=batch, ring=ring, wait=wait, capacity=capacity
            )
            return b.tput(impl, spec)

        return run

    def c_ref(mode: str, placement: str) -> Any:
        def run(b: Bench, impl: str) -> dict[str, Any]:
            return b.c_run(mode, b.cfg.c_spin_n if mode == "spin" else b.cfg.c_block_n, placement)

        return run

    only = ("shmq",)

    def borrow(key: str, impls: tuple[str, ...], marker: str) -> dict[str, tuple[str, str]]:
        return {p: (key, marker) for p in impls}

    no_batch = ("mp.Queue", "mp.Pipe", "pyzmq")
    spin_rtt = ("p50 ≤ 1 µs, p99.9 ≤ 10 µs", rtt_spin_target)
    busy, spinning = "2 busy (shmq: adaptive)", "2 busy (shmq: spin)"
    cpu0, cpu01 = (0, 0), (0, 1)
    rows = [
        Row("s_rtt", "**Round trip, 64 B** (µs: p50 / p99 / p99.9 / max)", "", ""),
        Row(
            "rtt_spin",
            'busy-poll: shmq wait="spin"; peers loop on their non-blocking call',
            "lat",
            "2",
            rtt("spin", poll=True),
            target=spin_rtt,
        ),
        Row(
            "rtt_spin_mpmc",
            '↳ shmq kind="mpmc" (the default kind)',
            "lat",
            "2",
            rtt("spin", poll=True, ring="mpmc"),
            impls=only,
        ),
        Row(
            "c_spin",
            "C reference: ring.c spsc, busy-spin, no Python",
            "lat",
            "2",
            c_ref("spin", "free"),
            impls=only,
        ),
        Row(
            "rtt_adaptive",
            'shmq wait="adaptive" (the default); peers: blocking call²',
            "lat",
            "2 (each spins ≤ 50 µs, then sleeps)",
            rtt("adaptive", poll=False),
            impls=only,
            borrow=borrow("rtt_block", PEERS, "²"),
            target=("p50 ≤ 2 µs", at_most(2000.0)),
        ),
        Row(
            "rtt_block",
            'blocking: shmq wait="block"; peers: blocking call; free placement',
            "lat",
            "0",
            rtt("block", poll=False),
            target=(f"p50 ≤ 0.8{TIMES} mp.Pipe", rtt_block_target("rtt_block")),
        ),
        Row(
            "rtt_block_1cpu",
            "↳ both processes pinned to CPU 0",
            "lat",
            "0",
            rtt("block", False, cpus=cpu0),
            target=(f"p50 ≤ 0.8{TIMES} mp.Pipe", rtt_block_target("rtt_block_1cpu")),
        ),
        Row(
            "rtt_block_2cpu",
            "↳ pinned to CPUs 0 and 1",
            "lat",
            "0",
            rtt("block", False, cpus=cpu01),
            target=(f"p50 ≤ 0.8{TIMES} mp.Pipe", rtt_block_target("rtt_block_2cpu")),
        ),
        Row(
            "c_block",
            "C reference: ring.c wait=block, no Python; free placement",
            "lat",
            "0",
            c_ref("block", "free"),
            impls=only,
        ),
        Row("c_block_1cpu", "↳ both on CPU 0", "lat", "0", c_ref("block", "pin"), impls=only),
        Row("c_block_2cpu", "↳ on CPUs 0 and 1", "lat", "0", c_ref("block", "split"), impls=only),
        Row(
            "c_futex",
            "C futex hand-off floor (store, FUTEX_WAKE, FUTEX_WAIT); free placement",
            "lat",
            "0",
            c_ref("futex", "free"),
            impls=only,
        ),
        Row("c_futex_1cpu", "↳ both on CPU 0", "lat", "0", c_ref("futex", "pin"), impls=only),
        Row("c_futex_2cpu", "↳ on CPUs 0 and 1", "lat", "0", c_ref("futex", "split"), impls=only),
        Row(
            "s_idle",
            "**Idle waiter** (CPU of a process blocked in get() on an empty queue, % of a core)",
            "",
            "",
        ),
        Row(
            "idle_adaptive",
            'shmq wait="adaptive"; peers: blocking get / poll',
            "pct",
            "0",
            target=("< 1 %", lambda v, rows: (1.0, v < 1.0)),
        ),
        Row("idle_block", 'shmq wait="block"', "pct", "0", impls=only),
        Row("idle_spin", 'shmq wait="spin"', "pct", "1", impls=only),
        Row("s_tput", "**One-way throughput**, process A → process B", "", ""),
        Row(
            "t64", "64 B, put / get", "msgs", busy, tput(64, "single"), target=("≥ 3 M msg/s", at_least(3e6))
        ),
        Row(
            "t64_spin",
            '↳ shmq wait="spin"³',
            "msgs",
            spinning,
            tput(64, "single", wait="spin"),
            impls=only,
            borrow=borrow("t64", PEERS, "³"),
            target=("≥ 3 M msg/s", at_least(3e6)),
        ),
        Row(
            "t64_batch",
            "64 B, put_many / get_many, batches of 256¹",
            "msgs",
            busy,
            tput(64, "batch", 256),
            impls=("shmq", "faster-fifo"),
            borrow=borrow("t64", no_batch, "¹"),
            target=("≥ 10 M msg/s", at_least(10e6)),
        ),
        Row(
            "t64_batch_spin",
            '↳ shmq wait="spin"³',
            "msgs",
            spinning,
            tput(64, "batch", 256, wait="spin"),
            impls=only,
            borrow={**borrow("t64", no_batch, "¹"), "faster-fifo": ("t64_batch", "³")},
            target=("≥ 10 M msg/s", at_least(10e6)),
        ),
        Row(
            "t64_mpmc",
            '64 B, put / get, shmq kind="mpmc" (the default kind)',
            "msgs",
            busy,
            tput(64, "single", ring="mpmc"),
            impls=only,
        ),
        Row(
            "t64_batch_mpmc",
            '64 B, put_many / get_many, shmq kind="mpmc"',
            "msgs",
            busy,
            tput(64, "batch", 256, ring="mpmc"),
            impls=only,
        ),
        Row(
            "t4k",
            "4 KiB, put / get",
            "msgs",
            busy,
            tput(4 * KiB, "single"),
            target=("≥ 1.5 M msg/s", at_least(1.5e6)),
        ),
        Row(
            "t4k_spin",
            '↳ shmq wait="spin"³',
            "msgs",
            spinning,
            tput(4 * KiB, "single", wait="spin"),
            impls=only,
            borrow=borrow("t4k", PEERS, "³"),
            target=("≥ 1.5 M msg/s", at_least(1.5e6)),
        ),
        Row(
            "t4k_batch",
            "4 KiB, put_many / get_many, batches of 64¹",
            "msgs",
            busy,
            tput(4 * KiB, "batch", 64),
            impls=("shmq", "faster-fifo"),
            borrow=borrow("t4k", no_batch, "¹"),
            target=("≥ 1.5 M msg/s", at_least(1.5e6)),
        ),
        Row(
            "t4k_batch_spin",
            '↳ shmq wait="spin"³',
            "msgs",
            spinning,
            tput(4 * KiB, "batch", 64, wait="spin"),
            impls=only,
            borrow={**borrow("t4k", no_batch, "¹"), "faster-fifo": ("t4k_batch", "³")},
            target=("≥ 1.5 M msg/s", at_least(1.5e6)),
        ),
        Row("t1m", "1 MiB, put / get", "bytes", busy, tput(MiB, "single")),
        Row(
            "t1m_spin",
            '↳ shmq wait="spin"³',
            "bytes",
            spinning,
            tput(MiB, "single", wait="spin"),
            impls=only,
            borrow=borrow("t1m", PEERS, "³"),
        ),
        Row(
            "t1m_batch",
            "1 MiB, put_many / get_many, batches of 4¹",
            "bytes",
            busy,
            tput(MiB, "batch", 4),
            impls=("shmq", "faster-fifo"),
            borrow=borrow("t1m", no_batch, "¹"),
        ),
        Row(
            "t1m_view",
            "1 MiB, put_view / get_view: a copy in, a copy out¹",
            "bytes",
            busy,
            tput(MiB, "view"),
            impls=("shmq", "mp.Pipe", "pyzmq"),
            borrow=borrow("t1m", ("mp.Queue", "faster-fifo"), "¹"),
            target=("≥ 8 GB/s", at_least(8e9)),
        ),
        Row(
            "t1m_view_spin",
            '↳ shmq wait="spin"³',
            "bytes",
            spinning,
            tput(MiB, "view", wait="spin"),
            impls=only,
            borrow={
                **borrow("t1m", ("mp.Queue", "faster-fifo"), "¹"),
                "mp.Pipe": ("t1m_view", "³"),
                "pyzmq": ("t1m_view", "³"),
            },
            target=("≥ 8 GB/s", at_least(8e9)),
        ),
    ]
    section = ""
    for row in rows:
        if row.key.startswith("s_"):
            section = row.key
        row.section = section
    return rows


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def short(cell: dict[str, Any], unit: str) -> str:
    if "error" in cell:
        return f"error: {cell['error']}"
    if unit == "lat":
        return f"p50 {cell['p50'] / 1e3:.2f} µs, p99.9 {cell['p999'] / 1e3:.2f} µs (n={cell['n']})"
    if unit == "msgs":
        return f"{cell['msgs_per_s'] / 1e6:.2f} M msg/s (n={cell['n']})"
    if unit == "bytes":
        return f"{cell['bytes_per_s'] / 1e9:.2f} GB/s (n={cell['n']})"
    return f"{cell['core_percent']:.3f} % of a core"


class LoadMeter:
    """CPU used by other processes (the rest of the machine) while we measure.

    /proc/stat's busy time minus our own CPU time (this process and its reaped
    children, i.e. every worker and C run), in % of one core; and the hypervisor's
    steal time. Tick-based (10 ms), so meaningful over a second or more."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self.snapshot()

    def snapshot(self) -> tuple[float, float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = v
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            ru = resource.getrusage(who)
            own += ru.ru_utime + ru.ru_stime
        busy = (user + nice + system + irq + softirq) / self.hz
        return time.monotonic(), busy, steal / self.hz, own

    @staticmethod
    def between(
        a: tuple[float, float, float, float], b: tuple[float, float, float, float]
    ) -> dict[str, float]:
        wall = max(b[0] - a[0], 1e-9)
        other = max(0.0, (b[1] - a[1]) - (b[3] - a[3]))
        return {"wall_s": wall, "other_pct": 100 * other / wall, "steal_pct": 100 * (b[2] - a[2]) / wall}


# Measured first, back to back, so that shmq's busy-poll figures and the C reference they are
# compared with see the same machine state (this VM's cross-CPU latency changes over minutes).
EARLY = (("c_spin", "shmq"), ("rtt_spin", "shmq"), ("rtt_spin_mpmc", "shmq"), ("rtt_adaptive", "shmq"))


def combine(loads: list[dict[str, float]]) -> dict[str, float] | None:
    """Wall-time weighted mean of several LoadMeter.between() results."""
    wall = sum(x["wall_s"] for x in loads)
    if not loads or wall <= 0:
        return None
    mean = {k: sum(x[k] * x["wall_s"] for x in loads) / wall for k in ("other_pct", "steal_pct")}
    return {"wall_s": wall, **mean}


def run_all(bench: Bench, rows: list[Row], meter: LoadMeter) -> None:
    by_key = {r.key: r for r in rows}
    runnable = {r.key for r in rows if r.run is not None}
    cells = [(k, i) for k, i in EARLY if k in runnable]
    cells += [(r.key, i) for r in rows if r.run is not None for i in r.impls if (r.key, i) not in EARLY]
    cells = [(k, i) for k, i in cells if i in bench.impls and i not in bench.missing]
    idle_rows = [r for r in rows if r.key.startswith("idle_")]
    if idle_rows:  # the idle waiters run where their section is in the table
        order = {r.key: n for n, r in enumerate(rows)}
        last_idle = order[idle_rows[-1].key]
        at = next((n for n, (k, _) in enumerate(cells) if order[k] > last_idle), len(cells))
        cells.insert(at, ("idle", ""))
    loads: dict[str, list[dict[str, float]]] = {}
    for key, impl in cells:
        if key == "idle":
            run_idle(bench, idle_rows, meter)
            continue
        row = by_key[key]
        probe = bench.settled_probe()
        before = meter.snapshot()
        assert row.run is not None
        try:
            row.cells[impl] = row.run(bench, impl)
        except BenchError as exc:
            row.cells[impl] = {"error": str(exc)}
            if exc.detail:
                log(exc.detail)
        load = meter.between(before, meter.snapshot())
        row.cells[impl]["load"] = load
        row.cells[impl]["probe_ns"] = probe
        loads.setdefault(key, []).append(load)
        probe_text = f", C spin probe {probe / 1e3:.2f} µs" if probe else ""
        log(
            f"  {key:18} {impl:12} {short(row.cells[impl], row.unit)}  "
            f"[{load['wall_s']:.1f} s, other processes {load['other_pct']:.0f} % of a core{probe_text}]"
        )
    for key, row_loads in loads.items():
        by_key[key].load = combine(row_loads)


def run_idle(bench: Bench, idle_rows: list[Row], meter: LoadMeter) -> None:
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for row in idle_rows:
        wait = row.key.split("_", 1)[1]
        for impl in row.impls:
            if impl in bench.impls and impl not in bench.missing:
                spec = {"kind": "idle", "ring": "spsc", "capacity": MiB, "wait": wait, "size": 64}
                jobs.append((f"{row.key}|{impl}", impl, spec))
    log(f"idle waiters ({len(jobs)} at once, {bench.cfg.idle_s:.0f} s) ...")
    before = meter.snapshot()
    results = bench.idle(jobs)
    load = meter.between(before, meter.snapshot())
    by_key = {r.key: r for r in idle_rows}
    for key, cell in results.items():
        rkey, impl = key.split("|")
        by_key[rkey].cells[impl] = cell
        by_key[rkey].load = load
        log(f"  {rkey:18} {impl:12} {short(cell, 'pct')}")


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def fmt_us(ns: float) -> str:
    us = ns / 1e3
    return f"{us:.2f}" if us < 10 else f"{us:.1f}" if us < 100 else f"{us:,.0f}"


def fmt_value(row: Row, cell: dict[str, Any]) -> str:
    if row.unit == "lat":
        return " / ".join(fmt_us(cell[k]) for k in ("p50", "p99", "p999", "max"))
    if row.unit in ("msgs", "bytes"):
        # per: from msg/s to the unit shown (M msg/s, or GB/s for the 1 MiB rows)
        if row.unit == "msgs":
            per, unit = 1e-6, "M/s"
        else:
            per, unit = cell["bytes_per_s"] / cell["msgs_per_s"] / 1e9, "GB/s"
        runs = [r * per for r in cell["runs_msgs_per_s"]]
        text = f"{cell['msgs_per_s'] * per:.2f} {unit}"
        if len(runs) > 1:
            text += f" ({min(runs):.2f}-{max(runs):.2f})"
        return text
    return f"{cell['core_percent']:.2f} %"


def fmt_target_value(row: Row, v: float) -> str:
    if row.unit == "lat":
        return f"{fmt_us(v)} µs"
    if row.unit == "msgs":
        return f"{v / 1e6:.2f} M/s"
    if row.unit == "bytes":
        return f"{v / 1e9:.2f} GB/s"
    return f"{v:.2f} %"


def fmt_ratio(r: float) -> str:
    def num(x: float) -> str:
        return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:,.0f}"

    return f"{num(r)}{TIMES} faster" if r >= 1 else f"{num(1 / r)}{TIMES} slower"


@dataclass
class Resolved:
    text: str
    value: float | None = None
    cell: dict[str, Any] | None = None


def resolve(row: Row, impl: str, by_key: dict[str, Row], bench: Bench) -> Resolved:
    if impl in bench.missing:
        return Resolved("not installed")
    if impl not in bench.impls:
        return Resolved("skipped")
    source, marker = row, ""
    if impl in row.borrow:
        key, marker = row.borrow[impl]
        if key not in by_key:  # --rows left it out
            return Resolved("—")
        source = by_key[key]
    elif impl not in row.impls:
        return Resolved("—")
    cell = source.cells.get(impl)
    if cell is None:
        return Resolved("—")
    if "error" in cell:
        return Resolved(f"error: {cell['error']}"[:60])
    slow = (
        cell.get("probe_ns") and bench.typical_probe and cell["probe_ns"] > SLOW_PROBE * bench.typical_probe
    )
    return Resolved(fmt_value(row, cell) + marker + ("†" if slow else ""), source.value(impl), cell)


SLOW_PROBE = 1.6  # cells measured while the probe read more than this times its median get a †


# C reference row -> the Python row it is the floor of
C_PAIRS = {
    "c_spin": "rtt_spin",
    "c_block": "rtt_block",
    "c_block_1cpu": "rtt_block_1cpu",
    "c_block_2cpu": "rtt_block_2cpu",
    "c_futex": "rtt_block",
    "c_futex_1cpu": "rtt_block_1cpu",
    "c_futex_2cpu": "rtt_block_2cpu",
}


def evaluate(row: Row, by_key: dict[str, Row]) -> tuple[str, str, bool | None]:
    """(target text, verdict text, met)"""
    if row.key in C_PAIRS and C_PAIRS[row.key] in by_key:
        v, py = row.value("shmq"), by_key[C_PAIRS[row.key]].value("shmq")
        if v and py:
            return f"(shmq from Python: {py / v:.2f}{TIMES} this p50)", "", None
    if row.target is None:
        return "", "", None
    text, check = row.target
    v = row.value("shmq")
    if v is None:
        return text, "not measured", False
    limit, met = check(v, by_key)
    if row.key.startswith("rtt_block"):
        text = f"p50 ≤ 0.8{TIMES} mp.Pipe = {fmt_us(limit)} µs"
    if met:
        return text, "met", True
    if row.key == "rtt_spin" and v <= limit:
        p999 = row.cells["shmq"]["p999"]
        return text, f"MISSED: p99.9 {fmt_us(p999)} µs > 10 µs", False
    if row.unit in ("lat", "pct"):
        return text, f"MISSED by {v / limit:.2f}{TIMES} ({fmt_target_value(row, v)})", False
    return text, f"MISSED: {v / limit:.0%} of target", False


def render(rows: list[Row], bench: Bench) -> tuple[str, list[dict[str, Any]]]:
    by_key = {r.key: r for r in rows}
    probes = [c["probe_ns"] for r in rows for c in r.cells.values() if c.get("probe_ns")]
    bench.typical_probe = statistics.median(probes) if probes else 0.0
    header = ["Scenario", "Spinning processes", "shmq", "Target (shmq) / note", "Met?", *PEERS]
    header += [f"shmq vs {p}" for p in PEERS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts: list[dict[str, Any]] = []
    parent = ""
    for row in rows:
        if row.key.startswith("s_"):
            lines.append("| " + row.label + " |" + " |" * (len(header) - 1))
            continue
        if not row.label.startswith("↳"):
            parent = row.label
        full_label = f"{parent} {row.label}" if row.label.startswith("↳") else row.label
        shmq = resolve(row, "shmq", by_key, bench)
        target, verdict, met = evaluate(row, by_key)
        if met is not None:
            verdicts.append(
                {
                    "row": row.key,
                    "label": full_label,
                    "target": target,
                    "verdict": verdict,
                    "met": met,
                    "shmq": shmq.text,
                }
            )
        cells = [row.label, row.spinning, shmq.text, target, verdict]
        ratios = []
        for p in PEERS:
            peer = resolve(row, p, by_key, bench)
            cells.append(peer.text)
            if shmq.value and peer.value and row.unit != "pct":
                r = peer.value / shmq.value if row.unit == "lat" else shmq.value / peer.value
                ratios.append(fmt_ratio(r))
            else:
                ratios.append("—")
        cells += ratios
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), verdicts


NOTES = """\
Notes
- Latency cells: p50 / p99 / p99.9 / max in µs per round trip (64 B each way, timed in process A
  with perf_counter_ns, two clock reads included); latency ratios compare p50.
- Throughput cells: median of the runs (min-max in brackets); ratios compare the medians. Single:
  A calls put(bytes) per message, B calls get() and gets a new bytes object per message. Batch:
  put_many(list of the same bytes object) / get_many() (faster-fifo: get_many(max_messages_to_get=1024),
  shmq: get_many() with its default max_messages=1024). "2 busy": A and B both run flat out; shmq waits
  adaptive (spin up to 50 µs, then sleep) or spin. With 2 cores, spinning processes compete for them.
- ¹ No batch (or zero-copy) API: the peer's single-message figure for the same size is repeated.
  1 MiB copy-in/copy-out row: shmq copies a prepared numpy array into put_view() and stamps a sequence
  number, B copies get_view() into a reused buffer; mp.Pipe: send_bytes(array) / recv_bytes_into(buffer);
  pyzmq: send(array) / recv(copy=False) and a copy into a reused buffer. B checks the last stamp.
- ² Peers have no adaptive mode: their blocking figure (the "blocking" row) is repeated.
- ³ Peers have no spin mode: their figure from the row above is repeated (ratios are against it).
- Busy-poll peers: mp.Pipe loops on poll() then recv_bytes(); mp.Queue and faster-fifo loop on
  get_nowait(); pyzmq loops on recv(zmq.NOBLOCK). faster-fifo sends raw bytes (dumps=identity,
  loads=bytes); mp.Queue pickles (it cannot do otherwise). pyzmq: PAIR over ipc://, single messages
  only (send_multipart makes one multi-part message, not a batch); SNDHWM/RCVHWM = 8 for 1 MiB messages.
- Placement: "free" lets the scheduler place the two processes (on this VM it sometimes keeps them on
  one CPU, so free results can be bimodal); pinned rows use os.sched_setaffinity. A blocking hand-off
  between CPUs needs a cross-CPU wake-up (an IPI, expensive in this VM); on one CPU it is a context switch.
- † The cross-CPU probe (a 20 000 round-trip C busy-spin ping-pong run before every cell) read over 1.6x
  its median even after waiting up to 20 s for it to recover: the host had placed the two vCPUs so
  that cache lines cross between them ~3x slower.
  Everything that hands cache lines between the two processes is then slower, shmq's fast paths most.
- Capacities: shmq rings and faster-fifo buffers 1 MiB (8 MiB for 1 MiB messages); mp.Queue unbounded.
"""


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "shmq"):
        commit += " (shmq/ has uncommitted changes)"
    stale = ""
    try:
        import shmq._native._ring as ext

        built = os.path.getmtime(ext.__file__)
        sources = [os.path.join(NATIVE, f) for f in ("ring.c", "ring.h", "_ringmodule.c")]
        if any(os.path.getmtime(f) > built for f in sources if os.path.exists(f)):
            stale = (
                f"{ext.__file__} is older than its sources: rebuild it (python setup.py build_ext --inplace)"
            )
    except ImportError as exc:
        stale = f"cannot import the extension: {exc}"
    return {
        "shmq_commit": commit,
        "extension_warning": stale,
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "shmq": version("shmq"),
        "pyzmq": version("pyzmq"),
        "faster-fifo": version("faster-fifo"),
    }


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (~30-40 s): fewer, shorter runs")
    ap.add_argument("--json", metavar="FILE", help="also save the raw results as JSON")
    ap.add_argument("--only", metavar="IMPLS", help=f"comma-separated subset of {', '.join(peers.IMPLS)}")
    ap.add_argument("--rows", metavar="KEYS", help="comma-separated subset of row keys (for debugging)")
    args = ap.parse_args(argv)
    impls = tuple(args.only.split(",")) if args.only else peers.IMPLS
    unknown = set(impls) - set(peers.IMPLS)
    if unknown:
        ap.error(f"unknown implementation(s): {', '.join(sorted(unknown))}")
    cfg = QUICK if args.quick else FULL

    facts = machine_facts()
    started = datetime.datetime.now().astimezone()
    python = sys.executable
    if python.startswith(ROOT + os.sep):
        python = os.path.relpath(python, ROOT)
    command = shlex.join([python, *sys.argv])
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(cfg, impls)
    rows = build_rows(bench)
    if args.rows:
        keep = set(args.rows.split(","))
        rows = [r for r in rows if r.key in keep or r.key.startswith("s_")]
    log(
        f"shmq benchmark ({'quick' if args.quick else 'full'} run), {facts['nproc']} CPUs, "
        f"{facts['cpu_model']}; missing: {bench.missing or 'none'}"
    )
    meter = LoadMeter()
    try:
        run_all(bench, rows, meter)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log("interrupted: cleaning up")
        return 130
    finally:
        bench.cleanup()
    load = meter.between(meter.start, meter.snapshot())
    noisy = [r for r in rows if r.load and r.load["wall_s"] >= 1 and r.load["other_pct"] > 10]

    table, verdicts = render(rows, bench)
    print(f"shmq benchmarks, {started:%Y-%m-%d %H:%M %Z}, `{command}` ({load['wall_s']:.0f} s)")
    print(
        f"machine: {facts['nproc']} CPUs, {facts['cpu_model']}, Linux {facts['kernel']}, "
        f"Python {facts['python']}; shmq {facts['shmq']}, pyzmq {facts['pyzmq']}, "
        f"faster-fifo {facts['faster-fifo']}"
    )
    print(f"shmq commit {facts['shmq_commit']}")
    if facts["extension_warning"]:
        print(f"WARNING: {facts['extension_warning']}")
    print(
        f"other processes on the machine used {load['other_pct']:.1f} % of one core on average during the "
        f"run (hypervisor steal {load['steal_pct']:.1f} %)"
    )
    print()
    print(table)
    print()
    print("Targets")
    for v in verdicts:
        print(f"- {v['label']}: {v['target']}: {v['verdict']} ({v['shmq']})")
    print()
    if noisy:
        print("Rows (of 1 s or more) measured while other processes used over 10 % of a core:")
        for r in noisy:
            assert r.load is not None
            print(f"- {r.key}: {r.load['other_pct']:.0f} % of a core over {r.load['wall_s']:.1f} s")
    else:
        print("No row (of 1 s or more) ran while other processes used over 10 % of a core.")
    probes = [(r.key, i, c["probe_ns"]) for r in rows for i, c in r.cells.items() if c.get("probe_ns")]
    if probes:
        values = [p for _, _, p in probes]
        typical = statistics.median(values)
        slow = [f"{k}" + ("" if i == "shmq" else f" ({i})") for k, i, p in probes if p > SLOW_PROBE * typical]
        print(
            f"Cross-CPU probe (C busy-spin ping-pong p50, taken before each cell): median "
            f"{typical / 1e3:.2f} µs, range {min(values) / 1e3:.2f}-{max(values) / 1e3:.2f} µs."
        )
        if slow:
            print(f"† Cells measured while it read over {SLOW_PROBE}x its median: {', '.join(slow)}.")
    print()
    print(NOTES)
    if args.json:
        data = {
            "date": started.isoformat(),
            "command": command,
            "machine": facts,
            "other_load": load,
            "config": dataclasses.asdict(cfg),
            "rows": [
                {
                    "key": r.key,
                    "label": r.label,
                    "unit": r.unit,
                    "spinning": r.spinning,
                    "load": r.load,
                    "cells": r.cells,
                }
                for r in rows
                if not r.key.startswith("s_")
            ],
            "targets": verdicts,
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
