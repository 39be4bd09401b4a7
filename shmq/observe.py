"""Snapshots of queues and buses and the rates between two of them: what `shmq stat` prints for
one, `shmq top` refreshes for all of them, and `shmq export` serves to Prometheus. Everything is
read from shared memory; a bus is read without disturbing its router, a queue by attaching to it
for the moment of the read, a subscriber's latency recorder by mapping it read-only.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import psutil

from shmq._bus import bus_stats, validate_bus
from shmq._errors import NotFound, ShmqError
from shmq._segment import list_segment_names, process_started_by, read_info, segment_path
from shmq.latency import SEGMENT_PREFIX as LATENCY_PREFIX
from shmq.latency import LatencyRecorder
from shmq.queue import Queue

#: counters turned into per-second rates (queue fields; bus top-level fields)
QUEUE_RATES = {
    "messages_put": "put_per_s",
    "messages_got": "got_per_s",
    "bytes_put": "bytes_put_per_s",
    "bytes_got": "bytes_got_per_s",
}
BUS_RATES = {
    "messages": "messages_per_s",
    "bytes": "bytes_per_s",
    "deliveries": "deliveries_per_s",
    "drops": "drops_per_s",
}


def snapshot(name: str) -> dict[str, Any]:
    """The state of queue `name`, or of bus `name` if there is no such queue (NotFound if neither)."""
    if os.path.exists(segment_path(name)) and read_info(name).kind in ("spsc", "mpsc", "mpmc"):
        return _queue_snapshot(name)
    validate_bus(name)
    try:
        stats = bus_stats(name)
    except NotFound:
        raise NotFound(f"no queue or bus named {name!r} (shmq ls lists what there is)") from None
    row = dataclasses.asdict(stats)
    row["type"] = "bus"
    row["at_ns"] = time.monotonic_ns()
    for publisher in row["publishers"]:
        publisher["alive"] = psutil.pid_exists(publisher["pid"])
    for subscriber in row["subscribers"]:
        subscriber["alive"] = psutil.pid_exists(subscriber["pid"])
        subscriber["latency_ns"] = latency_summary(subscriber["latency"])
    return row


def latency_summary(recorder: str | None) -> dict[str, Any] | None:
    """The summary (ns) of the named LatencyRecorder, or None if there is none (or it is gone)."""
    if recorder is None:
        return None
    try:
        handle = LatencyRecorder(recorder)
    except (ShmqError, OSError):
        return None
    try:
        return handle.summary().as_dict()
    finally:
        handle.close()


def _queue_snapshot(name: str) -> dict[str, Any]:
    info = read_info(name)
    q = Queue(name)
    try:
        stats = dataclasses.asdict(q.stats())
    finally:
        q.close()
    stats.update(
        type="queue",
        at_ns=time.monotonic_ns(),
        fill_pct=round(100.0 * stats["depth_bytes"] / stats["capacity"], 2) if stats["capacity"] else 0.0,
        creator_pid=info.creator_pid,
        creator_alive=process_started_by(info.creator_pid, info.created_ns),
        # (without this process's own entry, taken for the read)
        attached=[
            {"pid": a.pid, "role": a.role, "alive": a.alive} for a in info.attached if a.pid != os.getpid()
        ],
    )
    return stats


def with_rates(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """`after` with per-second rates of its counters since `before` (same queue or bus)."""
    seconds = max(1e-9, (after["at_ns"] - before["at_ns"]) / 1e9)
    out = dict(after)
    out["interval_s"] = round(seconds, 3)
    fields = QUEUE_RATES if after["type"] == "queue" else BUS_RATES
    for counter, rate in fields.items():
        out[rate] = round(max(0, after[counter] - before[counter]) / seconds, 1)
    if after["type"] == "bus":
        for key, counter, rate in (
            ("publishers", "published", "published_per_s"),
            ("subscribers", "received", "received_per_s"),
        ):
            earlier = {(c["pid"], c["ring"]): c[counter] for c in before[key]}
            rows = []
            for client in after[key]:
                row = dict(client)
                was = earlier.get((client["pid"], client["ring"]))
                row[rate] = None if was is None else round(max(0, client[counter] - was) / seconds, 1)
                rows.append(row)
            out[key] = rows
    return out


def stat(name: str, interval: float) -> dict[str, Any]:
    """A snapshot of `name`; with interval > 0, two of them that far apart, and the rates."""
    first = snapshot(name)
    if interval <= 0:
        return first
    time.sleep(interval)
    return with_rates(first, snapshot(name))


def _client_ring(name: str) -> bool:
    """A pub/sub client's ring (bus.<bus>.p.* or bus.<bus>.s.*): shown under its bus, not as a queue."""
    parts = name.split(".")
    return len(parts) >= 4 and parts[0] == "bus" and parts[-3] in ("p", "s")


def machine_snapshot(only: str | None = None) -> dict[str, Any]:
    """Every queue and bus on this machine (or only the one named `only`), and every named latency
    recorder that no subscriber owns: {"at_ns", "queues", "buses", "recorders", "problems"}.
    Segments that vanish between the listing and the read are skipped; unreadable ones are
    listed in "problems" (name and why)."""
    queues: list[dict[str, Any]] = []
    buses: list[dict[str, Any]] = []
    recorders: list[dict[str, Any]] = []
    problems: list[dict[str, str]] = []
    if only is not None:
        row = snapshot(only)
        (queues if row["type"] == "queue" else buses).append(row)
    else:
        for name in list_segment_names():
            try:
                info = read_info(name)
                if not info.valid:
                    problems.append({"name": name, "problem": info.problem})
                elif info.kind == "bus":
                    buses.append(snapshot(name[len("bus.") :]))
                elif info.kind == "latency":
                    recorders.append({"name": name[len(LATENCY_PREFIX) :], "creator_pid": info.creator_pid})
                elif not _client_ring(name):
                    queues.append(_queue_snapshot(name))
            except NotFound:
                continue  # removed meanwhile
            except (ShmqError, OSError) as exc:
                problems.append({"name": name, "problem": str(exc)})
    owned = {s["latency"] for bus in buses for s in bus["subscribers"]}
    recorders = [r for r in recorders if r["name"] not in owned]
    for recorder in recorders:
        recorder["latency_ns"] = latency_summary(recorder["name"])
    return {
        "at_ns": time.monotonic_ns(),
        "queues": queues,
        "buses": buses,
        "recorders": recorders,
        "problems": problems,
    }


def machine_rates(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """`after` with every queue's and bus's rates since `before` (rows that were not in `before`
    have no rates yet)."""
    out = dict(after)
    for key, ident in (("queues", "name"), ("buses", "bus")):
        earlier = {row[ident]: row for row in before[key]}
        out[key] = [
            with_rates(earlier[row[ident]], row) if row[ident] in earlier else row for row in after[key]
        ]
    return out
