"""Snapshots of a queue or a bus and the rates between two of them: what `shmq stat` prints (and
what `shmq top` will refresh). Everything is read from shared memory; a bus is read without
disturbing its router, a queue by attaching to it for the moment of the read.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from shmq._bus import bus_stats, validate_bus
from shmq._errors import NotFound
from shmq._segment import process_started_by, read_info, segment_path
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
    return row


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
