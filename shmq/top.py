"""`shmq top`: a live terminal view of every queue and bus on this machine.

Each refresh reads `observe.machine_snapshot()` (shared memory only; routers and clients are not
disturbed) and shows the rates since the previous one: messages and bytes in and out, depth and
fill, drops, spills, lag and publish-to-receive latency percentiles of every subscriber that
records them (``Subscriber(record_latency=...)``), and whether routers, publishers, subscribers
and queue creators are alive. Rendering is rich's; keys are read from the terminal in cbreak
mode, so ``q`` quits without Enter.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shmq import observe
from shmq._errors import ShmqError
from shmq.latency import format_ns

QUIT_KEYS = ("q", "Q")


def take(only: str | None, previous: dict[str, Any] | None) -> dict[str, Any]:
    """A machine snapshot (or one of `only`), with rates since `previous` when there is one."""
    current = observe.machine_snapshot(only)
    return current if previous is None else observe.machine_rates(previous, current)


# -- formatting -----------------------------------------------------------------------------------


def _si(value: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (+ unit); None -> '-' (no rate yet: the row is new)."""
    if value is None:
        return "-"
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}{unit}"
    return f"{value:.0f}{unit}" if value == int(value) else f"{value:.3g}{unit}"


def _duration(ns: float | None) -> str:
    return "-" if ns is None else format_ns(ns)


def _alive(alive: bool) -> Text:
    return Text("yes", style="green") if alive else Text("NO", style="bold red")


def _count(value: int, warn: bool = True) -> Text:
    """A counter, red when it is not zero and zero is the healthy value."""
    return Text(f"{value:,}", style="bold red" if warn and value else "")


# -- the view -------------------------------------------------------------------------------------


def _queues_table(queues: list[dict[str, Any]]) -> Table:
    table = Table(title="queues", title_justify="left", expand=False)
    table.add_column("name", overflow="fold")  # (a name cut short would be no use)
    table.add_column("kind")
    for column in ("in/s", "out/s", "in B/s", "out B/s", "depth", "fill %"):
        table.add_column(column, justify="right")
    for column in ("creator", "attached", "dead claims"):
        table.add_column(column, justify="right")
    for q in queues:
        attached = q["attached"]
        table.add_row(
            q["name"],
            q["kind"],
            _si(q.get("put_per_s")),
            _si(q.get("got_per_s")),
            _si(q.get("bytes_put_per_s"), "B"),
            _si(q.get("bytes_got_per_s"), "B"),
            f"{q['depth_messages']:,}",
            Text(f"{q['fill_pct']:.1f}", style="bold yellow" if q["fill_pct"] > 90 else ""),
            Text.assemble(str(q["creator_pid"]), " ", _alive(q["creator_alive"])),
            f"{sum(a['alive'] for a in attached)}/{len(attached)}",
            _count(q["dead_producer_claims"] + q["dead_consumer_messages"]),
        )
    return table


def _bus_view(bus: dict[str, Any]) -> RenderableType:
    router = Text.assemble(
        f"bus {bus['bus']}",
        f"  router pid {bus['router_pid']} ",
        _alive(bus["router_alive"]),
        f"  routed {_si(bus.get('messages_per_s'))}/s ({_si(bus.get('bytes_per_s'), 'B')}/s)",
        f"  deliveries {_si(bus.get('deliveries_per_s'))}/s",
        "  drops ",
        _count(bus["drops"]),
        f"  stalls {bus['stalls']:,}",
        f"  spilled {bus['spilled']:,}" if bus["spilled"] else "",
        Text(f"  log error errno {bus['log_error']}", style="bold red") if bus["log_error"] else "",
        style="bold",
    )
    publishers = Table(title="publishers", title_justify="left")
    for column in ("pid", "alive", "state", "published/s", "published", "queued", "stalls"):
        publishers.add_column(column, justify="right")
    for p in bus["publishers"]:
        publishers.add_row(
            str(p["pid"]),
            _alive(p["alive"]),
            p["state"],
            _si(p.get("published_per_s")),
            f"{p['published']:,}",
            f"{p['depth_messages']:,}",
            f"{p['stalls']:,}",
        )
    subscribers = Table(title="subscribers", title_justify="left")
    for column in ("pid", "alive", "patterns", "group", "on_full", "recv/s", "lag", "drops", "spilled"):
        left = column in ("patterns", "group", "on_full")
        subscribers.add_column(column, justify="left" if left else "right")
    for column in ("p50", "p99", "p99.9", "max"):
        subscribers.add_column(column, justify="right")
    for s in bus["subscribers"]:
        latency = s["latency_ns"] or {}
        subscribers.add_row(
            str(s["pid"]),
            _alive(s["alive"]),
            " ".join(s["patterns"]) + (f" where {s['where']}" if s["where"] else ""),
            s["group"] or "",
            s["on_full"],
            _si(s.get("received_per_s")),
            f"{s['lag']:,}",
            _count(s["drops"]),
            f"{s['spilled']:,}",
            *(_duration(latency.get(key)) for key in ("p50", "p99", "p999", "max")),
        )
    return Group(router, publishers, subscribers)


def _recorders_table(recorders: list[dict[str, Any]]) -> Table:
    table = Table(title="latency recorders", title_justify="left")
    for column in ("name", "creator", "count", "p50", "p90", "p99", "p99.9", "max"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for r in recorders:
        latency = r["latency_ns"] or {}
        table.add_row(
            r["name"],
            str(r["creator_pid"]),
            f"{latency.get('count', 0):,}",
            *(_duration(latency.get(key)) for key in ("p50", "p90", "p99", "p999", "max")),
        )
    return table


def render(view: dict[str, Any], interval: float, error: str = "") -> RenderableType:
    """The whole screen for one snapshot (`view`, from `take`)."""
    title = Text.assemble(
        ("shmq top", "bold"),
        f"  {time.strftime('%H:%M:%S')}  {len(view['queues'])} queues, {len(view['buses'])} buses",
        f"  every {interval:g} s  (q quits)",
    )
    parts: list[RenderableType] = [title]
    if error:
        parts.append(Text(error, style="bold red"))
    if view["queues"]:
        parts.append(_queues_table(view["queues"]))
    parts.extend(_bus_view(bus) for bus in view["buses"])
    if view["recorders"]:
        parts.append(_recorders_table(view["recorders"]))
    for problem in view["problems"]:
        parts.append(Text(f"{problem['name']}: {problem['problem']}", style="yellow"))
    if not (view["queues"] or view["buses"] or view["recorders"] or view["problems"]):
        parts.append(Text("no shmq queues or buses on this machine"))
    return Group(*parts)


# -- the live loop ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode (keys arrive without Enter, echo off) while inside; yields its fd, or
    None when stdin is not a terminal (then only Ctrl-C or SIGTERM stop the view)."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, timeout: float) -> bool:
    """Wait up to `timeout` s for a key; True if it was a quit key."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready and os.read(fd, 1).decode(errors="replace") in QUIT_KEYS:
            return True
    return False


def live(only: str | None, interval: float, console: Console) -> None:
    """Refresh the view every `interval` s until q (or Ctrl-C, which the caller handles)."""
    view = take(only, None)
    error = ""
    first = render(view, interval)
    with _keys() as fd, Live(first, console=console, screen=True, auto_refresh=False) as screen:
        while not _quit_pressed(fd, interval):
            try:
                view, error = take(only, view), ""
            except ShmqError as exc:  # the one it watches is gone (the last view stays)
                error = f"{only}: {exc}"
            screen.update(render(view, interval, error), refresh=True)
