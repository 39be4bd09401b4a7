"""shmq pub/sub through the router against pyzmq PUB/SUB and iceoryx2, in one run, one table.

Run (from the repository root; `.venv/bin/pip install -e ".[bench]"` installs the peers):

    .venv/bin/python benchmarks/bench_pubsub.py                  # full run, ~2-3 minutes
    .venv/bin/python benchmarks/bench_pubsub.py --quick          # smoke run, ~10-15 s
    .venv/bin/python benchmarks/bench_pubsub.py --json out.json  # also save the raw results

Implementations (columns): shmq (`shmq.Publisher` -> `shmq.Router` -> `shmq.Subscriber`, a fresh
router for every cell), pyzmq (PUB bound to ipc://, SUB sockets connected, default high-water
marks: lossy by design, losses counted) and iceoryx2 (publish-subscribe over shared memory, no
broker; lossless: no safe overflow, RetryUntilDelivered). A peer that is not installed shows
"not installed". Every message is 64 bytes; peers get the same message counts as shmq.

What is measured (benchmarks/README.md, section "Pub/sub", has the details and the last results):

* One-way latency, publish -> receive. The publisher sends one message every 25 µs at fixed
  intended times and stamps each with its intended and its actual send time; the subscriber
  takes time.monotonic_ns() when it has the message. Shown from the intended send time (no
  coordinated omission: a late send counts), and from the publish call (shmq: msg.timestamp_ns;
  peers: the clock read just before send). Variants: router and subscriber wait="spin" with a
  publisher that sleeps until each send time; everything spinning (3 spinners on 2 cores);
  publisher and subscriber in one process (2 spinners: the router and that process);
  wait="adaptive" (peers block), and adaptive at one message per 500 µs (the waiters sleep).
* Fan-out 1 -> 1, 4, 8 subscribers, lossless (on_full="block"): the publisher calls
  publish_many with batches of 256, subscribers recv_many; per-subscriber rate = messages / (the
  subscriber's clock after the last - the publisher's clock before the first), the slowest
  subscriber shown, losses counted exactly. 1 -> 1 is the router forwarding rate.
* Isolation: 1 publisher, 3 subscribers; two fast ones (on_full="block") and a third with
  on_full = drop / drop_oldest / conflate, first running, then SIGSTOPped; the fast ones' rate
  with and without the stall (median of alternating runs).

Every row says how many processes spin or run busy: the machine has 2 cores. The run reports how
much CPU other processes used meanwhile (the box is shared), probes the host's cross-CPU latency
before each cell (and waits up to 20 s for its slow vCPU placement to pass, as bench_queue.py does),
and reports the CPU each of our processes used (cores = CPU seconds / wall seconds).

Cleanup: the workers are terminated (SIGCONT first) and routers stopped at exit, also on Ctrl-C or
SIGTERM, and every /dev/shm/shmq.bus.pbench-<pid>-* segment is removed; zmq's ipc sockets live in
a temporary directory that is deleted; iceoryx2 ports and nodes are released by the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import bench_queue
import pubsub_peers as pp
from bench_queue import TIMES, BenchError, fmt_ratio, fmt_us, log

CTX = bench_queue.CTX
IMPLS = pp.IMPLS
PEERS = pp.PEERS
MAX_SUBS = 8
# The cross-CPU probe (bench_queue.py's C busy-spin ping-pong p50) reads ~0.26 µs here normally,
# ~0.85 µs when the host places the two vCPUs badly, and sometimes ~0.13 µs (better than normal). A
# probe over SLOW_PROBE x the first quartile of the probes so far is the slow placement.
SLOW_PROBE = 2.5


def probe_reference(probes: list[float]) -> float:
    return sorted(probes)[len(probes) // 4] if probes else 0.0


@dataclass(frozen=True)
class Config:
    lat_n: int  # messages per latency run
    lat_runs: int  # runs per latency cell: the run with the median p50 is shown, and the p50 range
    lat_interval_ns: int
    loop_interval_ns: int  # the one-process loop: above every implementation's one-way latency
    lat_warmup: int
    slow_n: int  # messages of the slow (500 µs) adaptive run
    slow_interval_ns: int
    fan_n: dict[int, int]  # subscribers -> messages per fan-out run (the same for every impl)
    fan_runs: int
    stall_n: int
    stall_pairs: int  # alternating (running, stalled) pairs
    batch: int
    settle_s: float  # longest wait for the host's slow vCPU placement to pass, per cell


FULL = Config(
    lat_n=20_000,
    lat_runs=3,
    lat_interval_ns=25_000,
    loop_interval_ns=50_000,
    lat_warmup=2_000,
    slow_n=2_000,
    slow_interval_ns=500_000,
    fan_n={1: 2_000_000, 4: 1_000_000, 8: 500_000},
    fan_runs=3,
    stall_n=1_000_000,
    stall_pairs=3,
    batch=256,
    settle_s=bench_queue.SETTLE_WAIT_S,
)
QUICK = Config(
    lat_n=600,
    lat_runs=1,
    lat_interval_ns=25_000,
    loop_interval_ns=50_000,
    lat_warmup=100,
    slow_n=40,
    slow_interval_ns=500_000,
    fan_n={1: 20_000, 4: 10_000, 8: 5_000},
    fan_runs=1,
    stall_n=20_000,
    stall_pairs=1,
    batch=256,
    settle_s=0.0,
)


# ---------------------------------------------------------------------------
# Worker pool
# ---------------------------------------------------------------------------


class Pool:
    """Long-lived spawned workers (pubsub_peers.worker), reused by every cell: worker 0 publishes,
    workers 1..8 subscribe. bench_persist.py reuses it with its own worker function."""

    def __init__(self, size: int, target: Any = None, name: str = "pbench") -> None:
        target = pp.worker if target is None else target
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.pids: list[int] = []
        try:
            for i in range(size):
                parent_end, child_end = CTX.Pipe()
                proc = CTX.Process(target=target, args=(child_end,), name=f"{name}-{i}", daemon=True)
                # The child inherits the blocked SIGINT and ignores it before unblocking it.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    proc.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                child_end.close()
                self.procs.append(proc)
                self.conns.append(parent_end)
            for i in range(size):
                self.pids.append(int(self.recv(i, 60.0)))
        except BaseException:
            self.close()
            raise

    def send(self, i: int, cmd: str, arg: Any = None) -> None:
        try:
            self.conns[i].send((cmd, arg))
        except OSError as exc:  # the worker is gone
            raise BenchError(f"worker {i} cannot be reached: {exc}") from None

    def recv(self, i: int, timeout: float) -> Any:
        conn = self.conns[i]
        deadline = time.monotonic() + timeout
        while not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise BenchError(f"worker {i} gave no answer within {timeout:.0f} s")
            dead = self._dead(i)
            if dead is not None:
                raise BenchError(f"worker {dead} died (exit code {self.procs[dead].exitcode})")
        try:
            status, value = conn.recv()
        except EOFError:
            self.procs[i].join(1)
            raise BenchError(f"worker {i} died (exit code {self.procs[i].exitcode})") from None
        if status == "error":
            raise BenchError(value.strip().splitlines()[-1], value)
        return value

    def _dead(self, i: int) -> int | None:
        """A worker whose death means worker i will never answer: a cell needs all of them."""
        return next((k for k, proc in enumerate(self.procs) if k != i and not proc.is_alive()), None)

    def call(self, i: int, cmd: str, arg: Any = None, timeout: float = 30.0) -> Any:
        self.send(i, cmd, arg)
        return self.recv(i, timeout)

    def close(self) -> None:
        for proc in self.procs:
            if proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("quit", None))
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for conn in self.conns:
            conn.close()
        self.procs.clear()
        self.conns.clear()


# ---------------------------------------------------------------------------
# One cell: a router (shmq), a publisher and subscribers in the pool's workers
# ---------------------------------------------------------------------------


def proc_cpu(pid: int | None) -> float:
    """CPU seconds of a live process, all its threads, to the nanosecond (/proc/PID/task/*/schedstat;
    psutil's tick-based figure if that is not there)."""
    if pid is None:
        return 0.0
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError):
        pass
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return float(t.user + t.system)


class Cell:
    """The endpoints of one measurement. Worker 0 is the publisher (or, with loop=True, both
    publisher and subscriber); workers 1..n_subs are subscribers. sub_specs overrides the spec
    of some subscribers (the stalled one's on_full)."""

    def __init__(
        self,
        bench: Bench,
        impl: str,
        spec: dict[str, Any],
        n_subs: int,
        *,
        loop: bool = False,
        router_wait: str = "adaptive",
        sub_specs: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        self.bench = bench
        assert bench.pool is not None
        self.pool: Pool = bench.pool
        self.impl = impl
        self.n = bench.next_id()
        self.name = bench.channel_name(impl, self.n)
        self.router: Any = None
        self.opened: list[int] = []
        self.subs = [] if loop else list(range(1, n_subs + 1))
        self.loop = loop
        base = {**spec, "impl": impl, "name": self.name, "topic": f"bench.t{self.n}", "subscribers": n_subs}
        try:
            if impl == "shmq":
                import shmq

                self.router = shmq.Router(self.name, wait=router_wait)
                bench.live.append(self.router.stop)
                self.router.start()
            self.specs = {0: {**base, "role": "loop" if loop else "pub"}}
            for s in self.subs:
                self.specs[s] = {**base, **(sub_specs or {}).get(s, {}), "role": "sub"}
            self._open([0])  # first: zmq's PUB binds the address the subscribers connect to
            self._open(self.subs)
        except BaseException:
            self.close()
            raise

    def _open(self, workers: list[int]) -> None:
        self.opened.extend(workers)
        self.all(workers, "open", lambda w: self.specs[w], timeout=30.0)

    def all(self, workers: list[int], cmd: str, arg: Any, timeout: float) -> dict[int, Any]:
        """Send a command to several workers at once, then collect their answers."""
        for w in workers:
            self.pool.send(w, cmd, arg(w) if callable(arg) else arg)
        deadline = time.monotonic() + timeout
        return {w: self.pool.recv(w, max(1.0, deadline - time.monotonic())) for w in workers}

    def leave(self, worker: int) -> None:
        """Close one subscriber (it leaves the bus)."""
        self.opened.remove(worker)
        self.pool.call(worker, "close", None, timeout=15.0)

    def rejoin(self, worker: int) -> None:
        self._open([worker])
        self.sync()

    def close(self) -> None:
        try:
            self.all([w for w in self.opened if w != 0], "close", None, timeout=15.0)
            if 0 in self.opened:
                self.pool.call(0, "close", None, timeout=15.0)
        except BenchError:
            self.bench.reset_pool()  # a worker is stuck or dead: start afresh
        finally:
            self.opened.clear()
            if self.router is not None:
                self.router.stop()
                with contextlib.suppress(ValueError):
                    self.bench.live.remove(self.router.stop)
                self.router = None

    def router_cpu(self) -> float:
        return proc_cpu(self.router.pid) if self.router is not None else 0.0

    def bus_counters(self) -> dict[str, int]:
        if self.impl != "shmq":
            return {}
        import shmq

        s = shmq.bus_stats(self.name)
        return {k: getattr(s, k) for k in ("messages", "deliveries", "drops", "stalls", "sleeps")}

    # -- streams ---------------------------------------------------------------------------

    def stream(self, n: int, batch: int, subs: list[int] | None = None) -> dict[str, Any]:
        """The publisher sends n messages as fast as it can; each subscriber in `subs` counts
        them until the end marker. Then every subscriber in `subs` is drained."""
        subs = self.subs if subs is None else subs
        pool = self.pool
        timeout = 120.0 + n * 2e-5
        cpu0, counters0 = self.router_cpu(), self.bus_counters()
        w0 = time.monotonic()
        for s in subs:
            pool.send(s, "consume", {})
        pool.send(0, "publish", {"n": n, "batch": batch})
        try:
            results = {s: pool.recv(s, timeout) for s in subs}
        finally:
            pool.send(0, "stop")
        pub = pool.recv(0, 30.0)
        window = time.monotonic() - w0  # what the CPU figures are divided by
        router_cpu = self.router_cpu() - cpu0
        counters = self.bus_counters()
        self.all(subs, "drain", {"idle_s": 0.02}, timeout=60.0)
        t0 = pub["t0"]
        t_end = max((r["t_last"] for r in results.values()), default=t0)
        wall = max(1e-9, (t_end - t0) / 1e9)
        per_sub = {
            s: {
                "count": r["count"],
                "lost": n - r["count"],
                "msgs_per_s": r["count"] / max(1e-9, (r["t_last"] - t0) / 1e9),
                "cpu_s": r["cpu_s"],
            }
            for s, r in results.items()
        }
        out: dict[str, Any] = {
            "n": n,
            "wall_s": wall,
            "publisher_send_s": (pub["t_sent"] - t0) / 1e9,
            "per_subscriber": per_sub,
            "min_msgs_per_s": min(v["msgs_per_s"] for v in per_sub.values()) if per_sub else 0.0,
            "lost": sum(v["lost"] for v in per_sub.values()),
            "cores": {
                "publisher": pub["cpu_s"] / window,
                "router": router_cpu / window,
                "subscribers": sum(v["cpu_s"] for v in per_sub.values()) / window,
            },
        }
        if counters:
            out["bus_counters"] = {k: counters[k] - counters0[k] for k in counters}
        return out

    def sync(self) -> None:
        """End markers until every subscriber saw one: connected (zmq's subscriptions travel
        in the background), then drained."""
        self.stream(0, 1)

    # -- latency ---------------------------------------------------------------------------

    def paced(self, n: int, interval_ns: int, pacing: str) -> dict[str, Any]:
        pool = self.pool
        timeout = 60.0 + 4 * n * interval_ns / 1e9
        cpu0, counters0 = self.router_cpu(), self.bus_counters()
        t0 = time.monotonic()
        (sub,) = self.subs
        pool.send(sub, "latency", {"n": n})
        pool.send(0, "pace", {"n": n, "interval_ns": interval_ns, "pacing": pacing})
        try:
            result: dict[str, Any] = pool.recv(sub, timeout)
        finally:
            pool.send(0, "stop")
        pub = pool.recv(0, 30.0)
        wall = time.monotonic() - t0
        counters = self.bus_counters()
        router_cpu = self.router_cpu() - cpu0
        pool.call(sub, "drain", {"idle_s": 0.02}, timeout=60.0)
        result["n_sent"] = n
        result["lost"] = n - result["count"]
        result["publisher_late"] = pub["late_by_over_an_interval"]
        result["cores"] = {
            "publisher": pub["cpu_s"] / wall,
            "router": router_cpu / wall,
            "subscribers": result["cpu_s"] / wall,
        }
        if counters:
            result["bus_counters"] = {k: counters[k] - counters0[k] for k in counters}
        return result

    def looped(self, n: int, interval_ns: int) -> dict[str, Any]:
        cpu0, counters0 = self.router_cpu(), self.bus_counters()
        t0 = time.monotonic()
        arg = {"n": n, "interval_ns": interval_ns}
        result = dict(self.pool.call(0, "loop", arg, 60 + 4 * n * 1e-9 * interval_ns))
        wall = time.monotonic() - t0
        counters = self.bus_counters()
        result["lost"] = 0
        result["cores"] = {
            "publisher": result["cpu_s"] / wall,  # publisher and subscriber: one process
            "router": (self.router_cpu() - cpu0) / wall,
            "subscribers": 0.0,
        }
        if counters:
            result["bus_counters"] = {k: counters[k] - counters0[k] for k in counters}
        return result


# ---------------------------------------------------------------------------
# The bench: cells per row
# ---------------------------------------------------------------------------


class Bench:
    def __init__(self, cfg: Config, impls: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.impls = impls
        self.prefix = f"pbench-{os.getpid()}-"
        self.counter = itertools.count()
        self.tmpdir = tempfile.mkdtemp(prefix="shmq-pbench-")
        self.live: list[Callable[[], None]] = []
        self.missing = {impl: why for impl in impls if (why := pp.availability(impl))}
        self.pool: Pool | None = None
        self.prober = bench_queue.Bench(bench_queue.QUICK, ("shmq",))
        self.stopped: set[int] = set()  # pids we SIGSTOPped and have not resumed yet
        self.probes: list[float] = []

    def settled_probe(self) -> float | None:
        """Probe; while it reads the host's slow vCPU placement, wait (up to cfg.settle_s) for it to
        pass, so that cells are measured in the same host state; the ones it never left get a †."""
        p = self.prober.probe()
        if p is None:
            return None
        self.probes.append(p)
        deadline = time.monotonic() + self.cfg.settle_s
        while p > SLOW_PROBE * probe_reference(self.probes) and time.monotonic() < deadline:
            time.sleep(2.0)
            p = self.prober.probe() or p
            self.probes.append(p)
        return p

    def start_pool(self) -> None:
        self.pool = Pool(1 + MAX_SUBS)

    def reset_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.pool = Pool(1 + MAX_SUBS)

    def next_id(self) -> int:
        return next(self.counter)

    def channel_name(self, impl: str, n: int) -> str:
        if impl == "shmq":
            return f"{self.prefix}{n}"  # the bus: /dev/shm/shmq.bus.<it> and its client rings
        if impl == "pyzmq":
            return f"ipc://{os.path.join(self.tmpdir, str(n))}.sock"
        return f"pbench/{os.getpid()}/{n}"

    @contextlib.contextmanager
    def cell(self, impl: str, spec: dict[str, Any], n_subs: int, **kw: Any) -> Iterator[Cell]:
        c = Cell(self, impl, spec, n_subs, **kw)
        try:
            yield c
        finally:
            c.close()

    def cleanup(self) -> None:
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for fn in reversed(self.live):
            with contextlib.suppress(Exception):
                fn()
        self.live.clear()
        if self.pool is not None:
            self.pool.close()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir("/dev/shm"):
                if entry.startswith("shmq.bus." + self.prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join("/dev/shm", entry))
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.prober.cleanup()
        if "iceoryx2" in self.impls and "iceoryx2" not in self.missing:
            # A worker killed with an iceoryx2 port open leaves its node's files (/tmp/iceoryx2,
            # /dev/shm/iox2_*); a new node removes those of dead nodes.
            with contextlib.suppress(Exception):
                import iceoryx2 as iox2

                iox2.set_log_level(iox2.LogLevel.Error)
                node = (
                    iox2.NodeBuilder.new()
                    .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
                    .create(iox2.ServiceType.Ipc)
                )
                node.try_cleanup_dead_nodes()
                del node

    # -- latency ---------------------------------------------------------------------------

    def latency(self, impl: str, wait: str, pacing: str, interval_ns: int, n: int) -> dict[str, Any]:
        spec = {"wait": wait, "pub_wait": wait}
        with self.cell(impl, spec, 1, router_wait=wait) as c:
            c.sync()
            c.paced(min(n, self.cfg.lat_warmup), interval_ns, pacing)  # warm-up, discarded
            return median_run([c.paced(n, interval_ns, pacing) for _ in range(self.cfg.lat_runs)])

    def loop_latency(self, impl: str, n: int) -> dict[str, Any]:
        spec = {"wait": "spin", "pub_wait": "spin"}
        with self.cell(impl, spec, 0, loop=True, router_wait="spin") as c:
            iv = self.cfg.loop_interval_ns
            c.looped(min(n, self.cfg.lat_warmup), iv)  # warm-up, discarded
            return median_run([c.looped(n, iv) for _ in range(self.cfg.lat_runs)])

    # -- fan-out ---------------------------------------------------------------------------

    def fanout(self, impl: str, k: int) -> dict[str, Any]:
        cfg = self.cfg
        n = cfg.fan_n[k]
        spec = {"wait": "adaptive", "on_full": "block", "batch": cfg.batch}
        with self.cell(impl, spec, k) as c:
            c.sync()
            c.stream(max(cfg.batch, n // 4), cfg.batch)  # warm-up, discarded
            runs = [c.stream(n, cfg.batch) for _ in range(cfg.fan_runs)]
        return summarize_runs(runs)

    # -- isolation -------------------------------------------------------------------------

    def stall(self, impl: str, policy: str) -> dict[str, Any]:
        cfg = self.cfg
        n = cfg.stall_n
        spec: dict[str, Any] = {"wait": "adaptive", "on_full": "block", "batch": cfg.batch}
        if impl == "iceoryx2":
            spec["lossy"] = True  # safe overflow: the oldest sample is overwritten (drop_oldest)
        fast, slow = [1, 2], 3
        with self.cell(impl, spec, 3, sub_specs={slow: {"on_full": policy}}) as c:
            assert self.pool is not None
            pid = self.pool.pids[slow]
            c.sync()
            c.stream(max(cfg.batch, n // 4), cfg.batch)  # warm-up, discarded
            running: list[dict[str, Any]] = []
            stalled: list[dict[str, Any]] = []
            absent: list[dict[str, Any]] = []
            for _ in range(cfg.stall_pairs):
                running.append(c.stream(n, cfg.batch))
                os.kill(pid, signal.SIGSTOP)
                self.stopped.add(pid)
                try:
                    stalled.append(c.stream(n, cfg.batch, subs=fast))
                finally:
                    os.kill(pid, signal.SIGCONT)
                    self.stopped.discard(pid)
                drained = self.pool.call(slow, "drain", {"idle_s": 0.05}, timeout=60.0)
                stalled[-1]["stalled_subscriber_drained"] = drained["drained"]
                # The same two without a third subscriber at all: what the stall costs them beyond
                # the core the stopped process no longer takes.
                c.leave(slow)
                absent.append(c.stream(n, cfg.batch, subs=fast))
                c.rejoin(slow)
        for r in running + stalled + absent:  # the rate of the fast ones only
            fast_rates = [r["per_subscriber"][s]["msgs_per_s"] for s in fast]
            r["fast_min_msgs_per_s"] = min(fast_rates)
            r["fast_lost"] = sum(r["per_subscriber"][s]["lost"] for s in fast)
        base = statistics.median(r["fast_min_msgs_per_s"] for r in running)
        hit = statistics.median(r["fast_min_msgs_per_s"] for r in stalled)
        alone = statistics.median(r["fast_min_msgs_per_s"] for r in absent)
        return {
            "n": n,
            "running": running,
            "stalled": stalled,
            "absent": absent,
            "base_msgs_per_s": base,
            "stalled_msgs_per_s": hit,
            "absent_msgs_per_s": alone,
            "change": hit / base - 1 if base else float("nan"),
            "change_vs_absent": hit / alone - 1 if alone else float("nan"),
            "fast_lost": sum(r["fast_lost"] for r in running + stalled + absent),
            "stalled_drops": sum(r.get("bus_counters", {}).get("drops", 0) for r in stalled),
            "cores": statistics_cores(stalled),
        }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The latency run with the median p50 (from the intended send time), with every run's p50s."""
    ordered = sorted(runs, key=lambda r: r["intended"]["p50"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["runs"] = len(runs)
    for key in ("intended", "actual", "timestamp"):
        if key in out:
            out[f"runs_p50_{key}"] = [r[key]["p50"] for r in runs]
    return out


def statistics_cores(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("publisher", "router", "subscribers")
    return {k: statistics.median(r["cores"][k] for r in runs) for k in keys} if runs else {}


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["min_msgs_per_s"] for r in runs]
    median = statistics.median(rates)
    mid = min(runs, key=lambda r: abs(r["min_msgs_per_s"] - median))
    return {
        "n": runs[0]["n"],
        "runs_min_msgs_per_s": rates,
        "min_msgs_per_s": median,
        "lost": sum(r["lost"] for r in runs),
        "sent": sum(r["n"] * len(r["per_subscriber"]) for r in runs),
        "cores": mid["cores"],
        "runs": runs,
    }


# ---------------------------------------------------------------------------
# Rows and targets
# ---------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    unit: str  # "lat" (percentiles; `field` says which), "fan" (msg/s), "stall"
    spinning: str
    run: Callable[[Bench, str], dict[str, Any]] | None = None
    impls: tuple[str, ...] = IMPLS
    source: str = ""  # another row whose cells this row shows (a different field)
    fields: dict[str, str] = field(default_factory=dict)  # impl -> latency field ("intended" default)
    target: tuple[str, Callable[[dict[str, Any]], tuple[bool, str]]] | None = None
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    load: dict[str, float] | None = None

    def field_of(self, impl: str) -> str:
        return self.fields.get(impl, "intended")


def fmt_times(x: float) -> str:
    return (f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:,.0f}") + TIMES


def lat_target(limit_ns: float) -> Callable[[dict[str, Any]], tuple[bool, str]]:
    def check(cell: dict[str, Any]) -> tuple[bool, str]:
        p50 = cell["intended"]["p50"]
        if p50 <= limit_ns:
            return True, "met"
        return False, f"MISSED by {fmt_times(p50 / limit_ns)} (p50 {fmt_us(p50)} µs)"

    return check


def rate_target(limit: float, lossless: bool) -> Callable[[dict[str, Any]], tuple[bool, str]]:
    def check(cell: dict[str, Any]) -> tuple[bool, str]:
        v = cell["min_msgs_per_s"]
        problems = []
        if v < limit:
            problems.append(f"{v / limit:.0%} of the rate")
        if lossless and cell["lost"]:
            problems.append(f"{cell['lost']:,} lost")
        if not problems:
            return True, f"met ({fmt_times(v / limit)} the target)"
        return False, "MISSED: " + ", ".join(problems)

    return check


def stall_target(limit: float) -> Callable[[dict[str, Any]], tuple[bool, str]]:
    def check(cell: dict[str, Any]) -> tuple[bool, str]:
        change = cell["change"]
        problems = []
        if abs(change) >= limit:
            problems.append(f"changed {change:+.1%}")
        if cell["fast_lost"]:
            problems.append(f"the fast ones lost {cell['fast_lost']:,}")
        text = ", ".join(problems) if problems else f"{change:+.1%}"
        text += f"; vs the 3rd absent: {cell['change_vs_absent']:+.1%}"
        return (not problems), ("met (" + text + ")" if not problems else "MISSED: " + text)

    return check


def build_rows(cfg: Config) -> list[Row]:
    iv = cfg.lat_interval_ns / 1000
    slow_iv = cfg.slow_interval_ns / 1000

    def lat(wait: str, pacing: str, interval_ns: int, n: int) -> Callable[[Bench, str], dict[str, Any]]:
        return lambda b, impl: b.latency(impl, wait, pacing, interval_ns, n)

    def fan(k: int) -> Callable[[Bench, str], dict[str, Any]]:
        return lambda b, impl: b.fanout(impl, k)

    def stall(policy: str) -> Callable[[Bench, str], dict[str, Any]]:
        return lambda b, impl: b.stall(impl, policy)

    from_call = {"shmq": "timestamp", "pyzmq": "actual", "iceoryx2": "actual"}
    spin3 = ("p50 ≤ 3 µs", lat_target(3000.0))
    rows = [
        Row(
            "s_lat",
            f"**One-way latency, publish → receive, 64 B, one message every {iv:g} µs** "
            "(µs: p50 / p99 / p99.9, from the intended send time)",
            "",
            "",
        ),
        Row(
            "lat_spin",
            '3 processes; router and subscriber wait="spin"; the publisher sleeps until each send '
            "time (peers: the subscriber busy-polls)",
            "lat",
            f"shmq 2 (router, subscriber) + the publisher waking every {iv:g} µs; peers 1 + the publisher",
            lat("spin", "sleep", cfg.lat_interval_ns, cfg.lat_n),
        ),
        Row(
            "lat_spin_call",
            "↳ measured from the publish call (shmq: msg.timestamp_ns; peers: the clock read before send)",
            "lat",
            "",
            source="lat_spin",
            fields=from_call,
        ),
        Row(
            "lat_spin_all",
            "↳ the publisher busy-waits for each send time too: spin everywhere",
            "lat",
            "shmq 3 on 2 cores; peers 2",
            lat("spin", "spin", cfg.lat_interval_ns, cfg.lat_n),
            target=spin3,
        ),
        Row(
            "lat_loop",
            "publisher and subscriber in one process (busy-wait for the send time, publish, spin in "
            f'recv), one message every {cfg.loop_interval_ns / 1000:g} µs; router wait="spin"',
            "lat",
            "shmq 2 (router, the client); peers 1",
            lambda b, impl: b.loop_latency(impl, cfg.lat_n),
            target=spin3,
        ),
        Row(
            "lat_loop_call",
            "↳ measured from the publish call",
            "lat",
            "",
            source="lat_loop",
            fields=from_call,
        ),
        Row(
            "lat_adaptive",
            'wait="adaptive" (the default; router and subscriber); peers block (iceoryx2: an event '
            "listener, one notification per message); the publisher sleeps",
            "lat",
            f"shmq 0-2 (spin ≤ 50 µs after each message: at one every {iv:g} µs they rarely sleep); peers 0",
            lat("adaptive", "sleep", cfg.lat_interval_ns, cfg.lat_n),
        ),
        Row(
            "lat_slow",
            f"↳ one message every {slow_iv:g} µs: the adaptive waiters sleep between messages",
            "lat",
            "0",
            lat("adaptive", "sleep", cfg.slow_interval_ns, cfg.slow_n),
        ),
        Row(
            "s_fan",
            f'**Router forwarding and fan-out, 64 B, lossless** (shmq on_full="block", publish_many '
            f"batches of {cfg.batch} / recv_many, adaptive waits): msg/s of the slowest subscriber, "
            "median of runs (min-max); messages lost",
            "",
            "",
        ),
        Row(
            "fan1",
            "1 publisher → 1 subscriber: router forwarding rate",
            "fan",
            "shmq 3 busy (publisher, router, subscriber); peers 2",
            fan(1),
            target=("≥ 5 M msg/s", rate_target(5e6, lossless=True)),
        ),
        Row(
            "fan4",
            "1 → 4 subscribers",
            "fan",
            "shmq 6 busy on 2 cores; peers 5",
            fan(4),
            target=("each subscriber ≥ 900k msg/s, 0 lost", rate_target(9e5, lossless=True)),
        ),
        Row("fan8", "1 → 8 subscribers", "fan", "shmq 10 busy on 2 cores; peers 9", fan(8)),
        Row(
            "s_stall",
            "**Isolation: 1 publisher, 3 subscribers, a stalled one** (SIGSTOP): msg/s of the slower of "
            'the 2 fast subscribers (on_full="block"), with the 3rd running → SIGSTOPped (change; and '
            "with no 3rd subscriber at all)",
            "",
            "",
        ),
        Row(
            "stall_drop",
            '3rd subscriber on_full="drop" (pyzmq: every SUB drops at its high-water mark)',
            "stall",
            "shmq 5 busy → 4 (the 3rd stopped)",
            stall("drop"),
            impls=("shmq", "pyzmq"),
            target=("change < 10 %, 0 lost", stall_target(0.10)),
        ),
        Row(
            "stall_drop_oldest",
            '3rd on_full="drop_oldest" (iceoryx2: safe overflow, every subscriber)',
            "stall",
            "shmq 5 busy → 4",
            stall("drop_oldest"),
            impls=("shmq", "iceoryx2"),
            target=("change < 10 %, 0 lost", stall_target(0.10)),
        ),
        Row(
            "stall_conflate",
            '3rd on_full="conflate" (no peer has it)',
            "stall",
            "shmq 5 busy → 4",
            stall("conflate"),
            impls=("shmq",),
            target=("change < 10 %, 0 lost", stall_target(0.10)),
        ),
    ]
    return rows


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


class LoadMeter:
    """CPU that other processes (the rest of the machine) used while we measured: /proc/stat's busy
    time minus ours (this process, its reaped children, and its live descendants: the worker pool
    and the routers), in % of one core; and the hypervisor's steal time."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self.snapshot()

    def snapshot(self) -> tuple[float, float, float, float]:
        import psutil

        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = v
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            ru = resource.getrusage(who)
            own += ru.ru_utime + ru.ru_stime
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                own += t.user + t.system
        busy = (user + nice + system + irq + softirq) / self.hz
        return time.monotonic(), busy, steal / self.hz, own

    between = staticmethod(bench_queue.LoadMeter.between)


def short(row: Row, cell: dict[str, Any]) -> str:
    if "error" in cell:
        return f"error: {cell['error']}"
    if row.unit == "lat":
        p = cell["intended"]
        return (
            f"p50 {p['p50'] / 1e3:.2f} µs, p99.9 {p['p999'] / 1e3:.1f} µs (n={p['n']}, {cell['lost']} lost)"
        )
    if row.unit == "fan":
        return f"{cell['min_msgs_per_s'] / 1e6:.3f} M msg/s per subscriber, lost {cell['lost']:,}"
    return (
        f"{cell['base_msgs_per_s'] / 1e6:.3f} -> {cell['stalled_msgs_per_s'] / 1e6:.3f} M msg/s "
        f"({cell['change']:+.1%}; 3rd absent {cell['absent_msgs_per_s'] / 1e6:.3f}), "
        f"fast ones lost {cell['fast_lost']}"
    )


def run_all(bench: Bench, rows: list[Row], meter: LoadMeter) -> None:
    for row in rows:
        if row.run is None:
            continue
        loads = []
        for impl in row.impls:
            if impl not in bench.impls or impl in bench.missing:
                continue
            probe = bench.settled_probe()
            before = meter.snapshot()
            try:
                cell = row.run(bench, impl)
            except BenchError as exc:
                cell = {"error": str(exc)}
                if exc.detail:
                    log(exc.detail)
                bench.reset_pool()
            load = meter.between(before, meter.snapshot())
            cell["load"] = load
            cell["probe_ns"] = probe
            row.cells[impl] = cell
            loads.append(load)
            probe_text = f", C spin probe {probe / 1e3:.2f} µs" if probe else ""
            log(
                f"  {row.key:18} {impl:9} {short(row, cell)}  "
                f"[{load['wall_s']:.1f} s, other processes {load['other_pct']:.0f} % of a core{probe_text}]"
            )
        row.load = bench_queue.combine(loads)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def fmt_rate(v: float) -> str:
    return f"{v / 1e6:.2f} M/s" if v >= 1e5 else f"{v / 1e3:.0f} k/s"


def cell_of(row: Row, impl: str, by_key: dict[str, Row]) -> dict[str, Any] | None:
    source = by_key.get(row.source, row) if row.source else row
    return source.cells.get(impl)


def fmt_cell(row: Row, impl: str, cell: dict[str, Any], typical_probe: float) -> str:
    if row.unit == "lat":
        p = cell.get(row.field_of(impl))
        if not p or not p.get("n"):
            return "—"
        text = " / ".join(fmt_us(p[k]) for k in ("p50", "p99", "p999"))
        runs = cell.get(f"runs_p50_{row.field_of(impl)}") or []
        if len(runs) > 1:
            text += f" (p50 of {len(runs)} runs: {fmt_us(min(runs))}-{fmt_us(max(runs))})"
        if cell.get("lost"):
            text += f" ({cell['lost']:,} lost)"
    elif row.unit == "fan":
        runs = cell["runs_min_msgs_per_s"]
        text = fmt_rate(cell["min_msgs_per_s"])
        if len(runs) > 1:
            text += f" ({min(runs) / 1e6:.2f}-{max(runs) / 1e6:.2f})"
        lost, sent = cell["lost"], cell["sent"]
        text += f", {lost:,} lost" if not lost else f", {lost / sent:.1%} lost"
    else:
        text = (
            f"{cell['base_msgs_per_s'] / 1e6:.2f} → {cell['stalled_msgs_per_s'] / 1e6:.2f} M/s "
            f"({cell['change']:+.1%}; 3rd absent: {cell['absent_msgs_per_s'] / 1e6:.2f})"
        )
        if cell["fast_lost"]:
            text += f", fast ones lost {cell['fast_lost']:,}"
        if impl == "shmq":
            text += f"; stalled one: {cell['stalled_drops']:,} drops"
    probe = cell.get("probe_ns")
    if probe and typical_probe and probe > SLOW_PROBE * typical_probe:
        text += "†"
    return text


def value_of(row: Row, impl: str, cell: dict[str, Any] | None) -> float | None:
    if not cell or "error" in cell:
        return None
    if row.unit == "lat":
        p = cell.get(row.field_of(impl)) or {}
        return float(p["p50"]) if "p50" in p else None
    if row.unit == "fan":
        return float(cell["min_msgs_per_s"])
    return None


def fmt_cores(cell: dict[str, Any] | None) -> str:
    if not cell or "error" in cell or "cores" not in cell:
        return ""
    c = cell["cores"]
    return f"{c['publisher']:.2f} / {c['router']:.2f} / {c['subscribers']:.2f}"


def render(rows: list[Row], bench: Bench) -> tuple[str, list[dict[str, Any]], float]:
    by_key = {r.key: r for r in rows}
    probes = [c["probe_ns"] for r in rows for c in r.cells.values() if c.get("probe_ns")]
    typical = probe_reference(probes)
    header = ["Scenario", "Spinning / busy processes", "shmq", "Target (shmq)", "Met?", *PEERS]
    header += [f"shmq vs {p}" for p in PEERS]
    header.append("shmq CPU, cores (pub / router / subs)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts: list[dict[str, Any]] = []
    parent = ""
    for row in rows:
        if row.key.startswith("s_"):
            lines.append("| " + row.label + " |" + " |" * (len(header) - 1))
            continue
        if not row.label.startswith("↳"):
            parent = row.label
        texts: dict[str, str] = {}
        for impl in IMPLS:
            cell = cell_of(row, impl, by_key)
            if impl in bench.missing:
                texts[impl] = "not installed"
            elif impl not in bench.impls:
                texts[impl] = "skipped"
            elif impl not in (by_key[row.source].impls if row.source else row.impls) or cell is None:
                texts[impl] = "—"
            elif "error" in cell:
                texts[impl] = f"error: {cell['error']}"[:70]
            else:
                texts[impl] = fmt_cell(row, impl, cell, typical)
        target, verdict = "", ""
        shmq_cell = cell_of(row, "shmq", by_key)
        if row.target is not None:
            target = row.target[0]
            if shmq_cell and "error" not in shmq_cell:
                met, verdict = row.target[1](shmq_cell)
            else:
                met, verdict = False, "not measured"
            verdicts.append(
                {
                    "row": row.key,
                    "label": f"{parent} {row.label}" if row.label.startswith("↳") else row.label,
                    "target": target,
                    "verdict": verdict,
                    "met": met,
                    "shmq": texts["shmq"],
                }
            )
        ratios = []
        shmq_v = value_of(row, "shmq", shmq_cell)
        for p in PEERS:
            peer_v = value_of(row, p, cell_of(row, p, by_key))
            if shmq_v and peer_v:
                ratios.append(fmt_ratio(peer_v / shmq_v if row.unit == "lat" else shmq_v / peer_v))
            else:
                ratios.append("—")
        cells = [row.label, row.spinning, texts["shmq"], target, verdict, *(texts[p] for p in PEERS)]
        cells += ratios
        cells.append("" if row.source else fmt_cores(shmq_cell))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), verdicts, typical


NOTES = """\
Notes
- Latency: the publisher sends at fixed intended times (start + i x interval) and stamps each
  message with its intended and its actual send time; the subscriber reads time.monotonic_ns() once
  it has the message. "From the intended send time" counts a late send (no coordinated omission);
  "from the publish call" is shmq's msg.timestamp_ns (stamped inside publish) and, for the peers,
  the clock read just before send. The publisher paces by sleeping (timer slack 1 ns) unless the
  row says it busy-waits. shmq goes publisher → router → subscriber; pyzmq and iceoryx2 have no
  router (zmq's I/O threads move the bytes; iceoryx2 hands over shared memory directly).
- Peers' waiting: "spin" rows busy-poll (zmq recv(NOBLOCK), iceoryx2 receive()); the others block
  (zmq recv(); iceoryx2 waits on an event listener, the publisher notifying once per message,
  or once per batch of 256 when streaming).
- Fan-out and isolation: every run sends the same n to every implementation; rate per subscriber =
  messages it received / (its clock at the end marker - the publisher's clock before the first
  send). zmq PUB/SUB drops at its high-water marks (1000 messages each side, the defaults): its
  rate counts what arrived, its loss is shown in %. iceoryx2 is lossless there (no safe overflow,
  RetryUntilDelivered, subscriber buffers of 8192 samples, one notification per 256 samples).
  shmq rings are 1 MiB (about 8,000 such messages).
- Isolation rows: median of alternating runs with the 3rd subscriber running and SIGSTOPped
  (SIGCONT after each run, then it is drained); "change" compares the slower fast subscriber.
- CPU: CPU seconds / wall seconds of our processes during the measured run (the median run for
  fan-out; the stalled runs for isolation): 1.00 is one core; the machine has 2.
- † measured while the cross-CPU probe (a C busy-spin ping-pong before every cell) read over 2.5x
  the first quartile of all probes even after waiting up to 20 s: the host had placed the two vCPUs
  so that cache lines cross between them ~3x slower.
"""


def machine_facts() -> dict[str, Any]:
    facts = bench_queue.machine_facts()
    if not facts["extension_warning"]:  # bench_queue checks the ring sources; pub/sub has its own
        with contextlib.suppress(ImportError, OSError):
            import shmq._native._ring as ext

            built = os.path.getmtime(ext.__file__)
            sources = [os.path.join(bench_queue.NATIVE, f) for f in ("bus.c", "bus.h", "_pubsub.c")]
            if any(os.path.getmtime(f) > built for f in sources if os.path.exists(f)):
                facts["extension_warning"] = (
                    f"{ext.__file__} is older than its sources: rebuild it "
                    "(python setup.py build_ext --inplace)"
                )
    facts.pop("faster-fifo", None)
    facts["iceoryx2"] = pp.version("iceoryx2")
    if facts.get("pyzmq") != "not installed":
        with contextlib.suppress(ImportError):
            import zmq

            facts["libzmq"] = zmq.zmq_version()
    return facts


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (~10-15 s): fewer, shorter runs")
    ap.add_argument("--json", metavar="FILE", help="also save the raw results as JSON")
    ap.add_argument("--only", metavar="IMPLS", help=f"comma-separated subset of {', '.join(IMPLS)}")
    ap.add_argument("--rows", metavar="KEYS", help="comma-separated subset of row keys (for debugging)")
    args = ap.parse_args(argv)
    impls = tuple(args.only.split(",")) if args.only else IMPLS
    unknown = set(impls) - set(IMPLS)
    if unknown:
        ap.error(f"unknown implementation(s): {', '.join(sorted(unknown))}")
    cfg = QUICK if args.quick else FULL
    rows = build_rows(cfg)
    if args.rows:
        keep = set(args.rows.split(","))
        rows = [r for r in rows if r.key in keep or r.key.startswith("s_") or r.source in keep]

    facts = machine_facts()
    started = datetime.datetime.now().astimezone()
    python = sys.executable
    if python.startswith(bench_queue.ROOT + os.sep):
        python = os.path.relpath(python, bench_queue.ROOT)
    command = shlex.join([python, *sys.argv])
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(cfg, impls)
    log(
        f"shmq pub/sub benchmark ({'quick' if args.quick else 'full'} run), {facts['nproc']} CPUs, "
        f"{facts['cpu_model']}; missing: {bench.missing or 'none'}"
    )
    meter = LoadMeter()
    try:
        bench.start_pool()
        run_all(bench, rows, meter)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log("interrupted: cleaning up")
        return 130
    finally:
        bench.cleanup()
    load = meter.between(meter.start, meter.snapshot())
    noisy = [r for r in rows if r.load and r.load["wall_s"] >= 1 and r.load["other_pct"] > 10]

    table, verdicts, typical = render(rows, bench)
    print(f"shmq pub/sub benchmarks, {started:%Y-%m-%d %H:%M %Z}, `{command}` ({load['wall_s']:.0f} s)")
    print(
        f"machine: {facts['nproc']} CPUs, {facts['cpu_model']}, Linux {facts['kernel']}, "
        f"Python {facts['python']}; shmq {facts['shmq']}, pyzmq {facts['pyzmq']}"
        + (f" (libzmq {facts['libzmq']})" if facts.get("libzmq") else "")
        + f", iceoryx2 {facts['iceoryx2']}"
    )
    print(f"shmq commit {facts['shmq_commit']}")
    if facts["extension_warning"]:
        print(f"WARNING: {facts['extension_warning']}")
    print(
        f"other processes on the machine used {load['other_pct']:.1f} % of one core on average during the "
        f"run (hypervisor steal {load['steal_pct']:.1f} %)"
    )
    for impl, why in bench.missing.items():
        print(f"{impl}: {why} (pip install -e '.[bench]')")
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
    probes = [c["probe_ns"] for r in rows for c in r.cells.values() if c.get("probe_ns")]
    if probes:
        slow = [
            f"{r.key} ({impl})"
            for r in rows
            for impl, c in r.cells.items()
            if c.get("probe_ns") and c["probe_ns"] > SLOW_PROBE * typical
        ]
        print(
            f"Cross-CPU probe (C busy-spin ping-pong p50, taken before each cell): median "
            f"{statistics.median(probes) / 1e3:.2f} µs, range {min(probes) / 1e3:.2f}-"
            f"{max(probes) / 1e3:.2f} µs, first quartile {typical / 1e3:.2f} µs."
        )
        if slow:
            print(f"† Cells measured in the slow placement (over {SLOW_PROBE}x that): {', '.join(slow)}.")
    elif bench.prober.probe_error:
        print(f"No cross-CPU probe: {bench.prober.probe_error}")
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
                if not r.key.startswith("s_") and not r.source
            ],
            "targets": verdicts,
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
