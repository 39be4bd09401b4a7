"""The ``shmq`` command.

Queues: ``shmq ls``, ``shmq rm``, ``shmq demo``. Pub/sub: ``shmq router`` (run a bus's router in
the foreground), ``shmq pub`` (publish from the command line or stdin), ``shmq sub`` (print what
arrives, as text or JSON lines). Durable log: ``shmq log inspect`` (check a router's log, its
segments and damage; exit 1 if damaged), ``shmq log dump`` (print its records).

Exit codes: 0 success; 1 the operation failed (no router, a second router, a timeout, the router
did not take every message; ``shmq log inspect``: the log is damaged); 2 bad input (click's usage
errors, and a bad bus name, topic, pattern, ``--where`` filter or header, a directory that holds
no log); 130 ``shmq pub`` or ``shmq log dump`` interrupted (what pub published before is flushed
first). Errors are one ``shmq <command>: ...`` message on stderr, never a traceback.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from datetime import datetime
from typing import Any, NoReturn

import click

from shmq import _bus, observe
from shmq._bus import BusStats, bus_stats
from shmq._errors import (
    AlreadyExists,
    ArgumentTypeError,
    Full,
    InvalidArgument,
    InvalidFilter,
    InvalidTopic,
    MessageDecodeError,
    NotFound,
    RouterUnavailable,
    ShmqError,
)
from shmq._segment import SegmentInfo, abandoned, process_started_by, read_info, segment_path
from shmq.bench import bench_command
from shmq.latency import format_ns
from shmq.log import LogEntry, LogReport, LogSegment, inspect_log, read_log, wall_time
from shmq.pubsub import Message, Publisher, Subscriber
from shmq.queue import WAITS
from shmq.testing import list_segments, remove_segment

#: Exit codes (see the module docstring).
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def creator_alive(info: SegmentInfo) -> bool:
    """True if the process that created the segment still runs (a reused pid does not count)."""
    return process_started_by(info.creator_pid, info.created_ns)


def fail(command: str, message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Say what went wrong on stderr, as ``shmq <command>: <message>``, and exit with `code`."""
    click.echo(f"shmq {command}: {message}", err=True)
    raise SystemExit(code)


def usage_code(exc: ShmqError) -> int:
    """Bad input (a name, topic, pattern, filter or header) is a usage error; the rest a failure."""
    return EXIT_USAGE if isinstance(exc, ValueError | TypeError) else EXIT_FAILED


@click.group()
@click.version_option(package_name="shmq")
def main() -> None:
    """shmq: shared-memory message queues and pub/sub. Segments live in /dev/shm as shmq.<name>.

    Exit codes: 0 success, 1 failure (no router, a timeout, ...), 2 bad input.
    """


@main.command()
@click.option("--seconds", default=5.0, show_default=True, help="How long the feed publishes.")
@click.option("--rate", default=20_000, show_default=True, help="Ticks per second the feed publishes.")
@click.option(
    "--queue",
    "queue_demo",
    is_flag=True,
    help="Run the queue demo instead: ping-pong and throughput beside multiprocessing.Queue.",
)
@click.option("--rounds", default=50_000, show_default=True, help="--queue: ping-pong round trips per row.")
@click.option(
    "--messages", default=1_000_000, show_default=True, help="--queue: messages per throughput row."
)
def demo(seconds: float, rate: int, queue_demo: bool, rounds: int, messages: int) -> None:
    """Market data through a router to wildcard, filtered, conflating and queue-group subscribers:
    latency percentiles and correctness checks (--queue: the queue demo)."""
    from shmq import demo as demo_module

    if queue_demo:
        argv = ["--queue", "--rounds", str(rounds), "--messages", str(messages)]
    else:
        argv = ["--seconds", str(seconds), "--rate", str(rate)]
    raise SystemExit(demo_module.main(argv))


# -- ls and rm ---------------------------------------------------------------------------------------


def _is_bus_segment(name: str) -> bool:
    """True if `name` is a bus segment (a router's: statistics and doorbell), by its magic number."""
    if not name.startswith("bus."):
        return False
    try:
        with open(segment_path(name), "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and _bus.u64(head, _bus.OFF_MAGIC) == _bus.BUS_MAGIC


def _bus_row(name: str) -> dict[str, Any]:
    """An ``ls --json`` row for a bus segment: the keys of a queue's row, and the bus's own."""
    bus = name[len("bus.") :]
    path = segment_path(name)
    try:
        st = os.stat(path)
        size, owner_uid, mode = st.st_size, st.st_uid, st.st_mode & 0o777
    except OSError:
        size = owner_uid = mode = 0
    row: dict[str, Any] = {
        "name": name,
        "path": path,
        "size": size,
        "valid": False,
        "problem": "",
        "kind": "bus",
        "capacity": 0,
        "creator_pid": 0,
        "created_ns": 0,
        "depth_messages": 0,
        "depth_bytes": 0,
        "owner_uid": owner_uid,
        "mode": mode,
        "creator_alive": False,
        "bus": bus,
    }
    try:
        stats: BusStats = bus_stats(bus)
    except (ShmqError, OSError) as exc:
        row["problem"] = str(exc)
        return row
    row.update(
        valid=True,
        creator_pid=stats.router_pid,
        created_ns=stats.started_ns,
        creator_alive=stats.router_alive,
        depth_messages=sum(p.depth_messages for p in stats.publishers)
        + sum(s.depth_messages for s in stats.subscribers),
        depth_bytes=sum(p.depth_bytes for p in stats.publishers)
        + sum(s.depth_bytes for s in stats.subscribers),
        router_pid=stats.router_pid,
        router_alive=stats.router_alive,
        publishers=len(stats.publishers),
        subscribers=len(stats.subscribers),
        topics=len(stats.topics) + stats.untracked_topics,
        messages=stats.messages,
        deliveries=stats.deliveries,
        drops=stats.drops,
    )
    if not stats.router_alive:
        row["problem"] = "its router is gone (remove it with `shmq rm`, or start a router on the bus)"
    return row


def _queue_row(info: SegmentInfo) -> dict[str, Any]:
    return {**asdict(info), "creator_alive": creator_alive(info)}


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per segment, for scripts.")
def list_command(as_json: bool) -> None:
    """List every shmq segment on this machine.

    Queues (and the rings of pub/sub clients, bus.<BUS>.p.* and bus.<BUS>.s.*) show their kind,
    capacity, depth and creator; a bus segment (bus.<BUS>, made by `shmq router BUS`) shows kind
    "bus", its router's pid and whether it runs, and its publisher, subscriber and topic counts.
    """
    rows: list[dict[str, Any]] = []
    for name in list_segments():
        if _is_bus_segment(name):
            rows.append(_bus_row(name))
            continue
        try:
            rows.append(_queue_row(read_info(name)))
        except ShmqError as exc:
            click.echo(f"{name}: {exc}", err=True)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo("no shmq segments")
        return
    click.echo(
        f"{'NAME':40} {'KIND':5} {'CAPACITY':>10} {'QUEUED':>8} {'CREATOR':>8} {'ALIVE':5} "
        f"{'ATTACHED':>8} CREATED"
    )
    for row in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created_ns"] / 1e9))
        kind = row["kind"] if row["valid"] else "BAD"
        alive = "yes" if row["creator_alive"] else "no"
        capacity = "-" if row["kind"] == "bus" else row["capacity"]
        # live/all entries of the ring's attachment table (+N: handles it had no room for)
        attached = row.get("attached", [])
        live = f"{sum(a['alive'] for a in attached)}/{len(attached)}" if row["kind"] != "bus" else "-"
        if row.get("untracked"):
            live += f"+{row['untracked']}"
        line = (
            f"{row['name']:40} {kind:5} {capacity:>10} {row['depth_messages']:>8} "
            f"{row['creator_pid']:>8} {alive:5} {live:>8} {created}"
        )
        if row["kind"] == "bus" and row["valid"]:
            line += (
                f"  (router of bus {row['bus']!r}: {row['publishers']} publishers, "
                f"{row['subscribers']} subscribers, {row['topics']} topics, {row['messages']} messages)"
            )
        click.echo(line + (f"  ({row['problem']})" if row["problem"] else ""))


@main.command("stat")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds between the two reads the rates come from (0: one read, no rates).",
)
def stat_command(name: str, as_json: bool, interval: float) -> None:
    """Statistics of one queue or bus (NAME: a queue, else a bus), with rates over --interval."""
    try:
        row = observe.stat(name, interval)
    except ShmqError as exc:
        fail("stat", str(exc), usage_code(exc))
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    if as_json:
        click.echo(json.dumps(row, default=list))
    else:
        click.echo(_stat_text(row))


def _rate(row: dict[str, Any], key: str, unit: str = "/s") -> str:
    return f" ({row[key]:,.1f}{unit})" if key in row and row[key] is not None else ""


def _latency_text(latency: dict[str, Any] | None) -> str:
    if not latency or not latency["count"]:
        return ""
    p50, p99, p999, most = (format_ns(latency[k]) for k in ("p50", "p99", "p999", "max"))
    return f"; latency p50 {p50}, p99 {p99}, p99.9 {p999}, max {most}"


def _stat_text(row: dict[str, Any]) -> str:
    if row["type"] == "queue":
        lines = [
            f"queue {row['name']} ({row['kind']}, {row['capacity']:,} bytes), "
            f"creator pid {row['creator_pid']} {'alive' if row['creator_alive'] else 'gone'}",
            f"  depth {row['depth_messages']:,} messages, {row['depth_bytes']:,} bytes "
            f"({row['fill_pct']} % full)",
            f"  put {row['messages_put']:,}{_rate(row, 'put_per_s')}, {row['bytes_put']:,} bytes"
            f"{_rate(row, 'bytes_put_per_s', ' B/s')}",
            f"  got {row['messages_got']:,}{_rate(row, 'got_per_s')}, {row['bytes_got']:,} bytes"
            f"{_rate(row, 'bytes_got_per_s', ' B/s')}",
            f"  sleeps: put {row['put_waits']:,}, get {row['get_waits']:,}; deferred commits "
            f"{row['deferred_commits']:,}; dead producers' claims {row['dead_producer_claims']:,}, "
            f"dead consumers' messages {row['dead_consumer_messages']:,}",
        ]
        attached = ", ".join(
            f"{a['pid']} {a['role']} {'alive' if a['alive'] else 'dead'}" for a in row["attached"]
        )
        lines.append(f"  attached: {attached or 'nobody else'}")
        return "\n".join(lines)
    lines = [
        f"bus {row['bus']}: router pid {row['router_pid']} {'alive' if row['router_alive'] else 'GONE'}",
        f"  routed {row['messages']:,} messages{_rate(row, 'messages_per_s')}, {row['bytes']:,} bytes"
        f"{_rate(row, 'bytes_per_s', ' B/s')}; "
        f"deliveries {row['deliveries']:,}{_rate(row, 'deliveries_per_s')}; "
        f"drops {row['drops']:,}{_rate(row, 'drops_per_s')}; stalls {row['stalls']:,}",
        f"  publishers ({len(row['publishers'])}):",
    ]
    for p in row["publishers"]:
        lines.append(
            f"    pid {p['pid']} {p['state']}: published {p['published']:,}{_rate(p, 'published_per_s')}, "
            f"queued {p['depth_messages']:,}, stalls {p['stalls']:,}"
        )
    lines.append(f"  subscribers ({len(row['subscribers'])}):")
    for sub in row["subscribers"]:
        group = f" group {sub['group']}" if sub["group"] else ""
        lines.append(
            f"    pid {sub['pid']} {' '.join(sub['patterns'])}{group} ({sub['on_full']}, {sub['state']}): "
            f"received {sub['received']:,}{_rate(sub, 'received_per_s')}, lag {sub['lag']:,}, "
            f"drops {sub['drops']:,}{_latency_text(sub['latency_ns'])}"
        )
    return "\n".join(lines)


@main.command("top")
@click.argument("name", required=False)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes (and, with --once, between the two reads the rates come from).",
)
@click.option("--once", is_flag=True, help="Print one view (with rates over --interval) and exit.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of the view: with --once one object.")
def top_command(name: str | None, interval: float, once: bool, as_json: bool) -> None:
    """A live view of every queue and bus on this machine (or only NAME, a queue or bus).

    Rates in and out, bytes/s, depth and fill, drops, spills, lag, each subscriber's latency
    percentiles (subscribers made with record_latency), and whether routers, publishers,
    subscribers and queue creators are alive. Refreshes in place; q quits. --once prints one
    view for scripts (--once --json: one JSON object); --json alone prints one object per
    refresh, a line each.
    """
    from rich.console import Console

    from shmq import top

    if not (once or as_json or sys.stdout.isatty()):
        fail("top", "the live view needs a terminal; for scripts use --once, --json or both", EXIT_USAGE)
    try:
        with _sigterm_interrupts():
            if not (once or as_json):
                top.live(name, interval, Console())
                return
            view = top.take(name, None)
            while True:
                time.sleep(interval)
                view = top.take(name, view)
                if as_json:
                    click.echo(json.dumps(view, default=list))
                else:
                    Console().print(top.render(view, interval))
                if once:
                    return
                sys.stdout.flush()
    except ShmqError as exc:
        fail("top", str(exc), usage_code(exc))
    except KeyboardInterrupt:
        return  # (Ctrl-C or SIGTERM: the way out of a refreshing view without q)


@main.command("gc")
@click.argument("patterns", nargs=-1)
@click.option("--yes", is_flag=True, help="Remove them; without it, only print what would go.")
def gc_command(patterns: tuple[str, ...], yes: bool) -> None:
    """Remove segments that only dead processes used (all of them, or those whose names match a
    PATTERN: shell-style, e.g. 'jobs*' or 'bus.prices*').

    A ring goes when no running process holds an entry in its attachment table (pids are checked
    with their start time, so a reused pid does not count), no handle attached without an entry,
    and its creator is gone; a bus segment goes when its router is gone; a segment its creator
    never finished goes after 10 s. Without --yes it prints what it would remove and changes
    nothing. Segments of other users that this user cannot read are skipped, and said so.
    """
    found = 0
    for name in list_segments():
        if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        try:
            info = read_info(name)
        except ShmqError as exc:
            click.echo(f"skipped {name}: {exc}", err=True)
            continue
        reason = abandoned(info)
        if not reason:
            continue
        found += 1
        if not yes:
            click.echo(f"would remove {name}: {reason}")
        elif remove_segment(name):
            click.echo(f"removed {name}: {reason}")
    if not found:
        click.echo("nothing to remove: every segment has a live participant")
    elif not yes:
        click.echo(f"{found} segment(s) would be removed; run `shmq gc --yes` to remove them")


@main.command("rm")
@click.argument("names", nargs=-1, required=True)
def remove_command(names: tuple[str, ...]) -> None:
    """Remove segments by name. Attached processes keep working; new ones cannot attach."""
    missing = [n for n in names if not remove_segment(n)]
    for n in missing:
        click.echo(f"shmq: no segment named {n!r}", err=True)
    raise SystemExit(1 if missing else 0)


# -- pub/sub -----------------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Inside: SIGTERM raises KeyboardInterrupt like Ctrl-C does, so clients close cleanly."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log_to_stderr(logger: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log = logging.getLogger(logger)
    log.addHandler(handler)
    log.setLevel(logging.INFO)


@main.command("router")
@click.argument("bus")
@click.option(
    "--wait",
    type=click.Choice(list(WAITS)),
    default="adaptive",
    show_default=True,
    help="How the router waits for messages: adaptive spins ~50 µs then sleeps; spin burns a core.",
)
@click.option("--max-publishers", type=click.IntRange(1, 1 << 20), default=256, show_default=True)
@click.option("--max-subscribers", type=click.IntRange(1, 1 << 20), default=256, show_default=True)
@click.option(
    "--max-topics",
    type=click.IntRange(1, 1 << 20),
    default=16384,
    show_default=True,
    help="Topics with statistics (more are routed, without them).",
)
@click.option(
    "--no-last-value",
    is_flag=True,
    help="Do not keep each topic's newest message (for subscribers that ask with --last-value).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Directory for the durable log, durable subscriptions and spill files.",
)
@click.option(
    "--durable",
    "durable",
    multiple=True,
    metavar="PATTERN",
    help="Log every message on matching topics before routing it (repeatable; needs --data-dir).",
)
@click.option(
    "--fsync",
    type=click.Choice(["never", "interval", "always"]),
    default="interval",
    show_default=True,
    help="When the log reaches the disk: the OS decides, every --fsync-interval-ms, or before "
    "publish returns (group commit).",
)
@click.option("--fsync-interval-ms", type=click.IntRange(1, 3_600_000), default=100, show_default=True)
@click.option("--segment-bytes", type=click.IntRange(4096, 1 << 40), default=64 << 20, show_default=True)
@click.option(
    "--retain-bytes", type=click.IntRange(min=1), help="Remove whole old segments beyond this size."
)
@click.option(
    "--retain-seconds", type=click.FloatRange(min=0, min_open=True), help="Remove segments older than this."
)
@click.option(
    "--spill-dir",
    type=click.Path(file_okay=False),
    help="Where on_full='spill' subscribers spill (default DATA_DIR/spill, else a temporary directory).",
)
@click.option(
    "--max-spill-bytes", type=click.IntRange(min=1), help="Per subscriber (default: half the free space)."
)
@click.option(
    "--acl",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Who may publish and subscribe to what (format: shmq/acl.py). Without it only this user "
    "and root may connect.",
)
@click.option(
    "--mode",
    default="600",
    show_default=True,
    metavar="OCTAL",
    help="Permission bits of the bus segment, e.g. 660 to let a shared group's clients open it.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log clients arriving and leaving (to stderr).")
def router_command(
    bus: str,
    wait: str,
    max_publishers: int,
    max_subscribers: int,
    max_topics: int,
    no_last_value: bool,
    data_dir: str | None,
    durable: tuple[str, ...],
    fsync: str,
    fsync_interval_ms: int,
    segment_bytes: int,
    retain_bytes: int | None,
    retain_seconds: float | None,
    spill_dir: str | None,
    max_spill_bytes: int | None,
    acl: str | None,
    mode: str,
    verbose: bool,
) -> None:
    """Run the router of BUS in the foreground until Ctrl-C or SIGTERM.

    Prints one line once publishers and subscribers can connect (scripts can wait for it), and
    one when it stopped; it removes its bus segment on the way out (exit code 0). A second router
    on a bus that has one exits with code 1.
    """
    from shmq.router import serve

    if verbose:
        _log_to_stderr("shmq.router")
    # Until serve() installs its own handlers, a signal is remembered and replayed once it has:
    # stopping then is a clean stop, not a death that leaves the bus segment behind.
    pending: list[int] = []

    def remember(signum: int, frame: Any) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}

    def ready() -> None:
        click.echo(f"shmq router: serving bus {bus!r} (pid {os.getpid()}); Ctrl-C to stop")
        if pending:
            os.kill(os.getpid(), pending[0])

    try:
        serve(
            bus,
            wait=wait,
            max_publishers=max_publishers,
            max_subscribers=max_subscribers,
            max_topics=max_topics,
            last_value=not no_last_value,
            data_dir=data_dir,
            durable=durable,
            fsync=fsync,
            fsync_interval_ms=fsync_interval_ms,
            segment_bytes=segment_bytes,
            retain_bytes=retain_bytes,
            retain_seconds=retain_seconds,
            spill_dir=spill_dir,
            max_spill_bytes=max_spill_bytes,
            acl=acl,
            mode=_octal_mode(mode),
            ready=ready,
        )
    except AlreadyExists as exc:
        fail("router", str(exc))
    except ShmqError as exc:
        fail("router", str(exc), usage_code(exc))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo(f"shmq router: stopped serving bus {bus!r}")


def _octal_mode(text: str) -> int:
    """--mode as chmod writes it: 660, 0660 or 0o660 (checked by validate_mode in serve)."""
    digits = text.removeprefix("0o")
    if not digits or any(c not in "01234567" for c in digits):
        raise InvalidArgument(f"--mode is octal permission bits such as 600, 660 or 666, got {text!r}")
    return int(digits, 8)


_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def header_value(text: str) -> str | int | float | bool:
    """A ``--header`` value: an int, a float, true/false as a bool, else the text as a str.

    Numbers are read as a ``where=`` filter reads its literals (``42``, ``-7``, ``1.5``, ``2e-3``;
    not ``nan``, ``inf``, ``1_000`` or `` 1``, which stay strings); true and false in any case.
    """
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        number = float(text)
        return number if math.isfinite(number) else text
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _split_header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE")
    return key, value


def _parse_headers(typed: tuple[str, ...], strings: tuple[str, ...]) -> dict[str, object]:
    headers: dict[str, object] = {}
    for item in typed:
        key, value = _split_header(item)
        headers[key] = header_value(value)
    for item in strings:
        key, value = _split_header(item)
        headers[key] = value
    return headers


def _stdin_lines() -> Iterator[bytes]:
    """Each line of stdin as bytes, without its line ending (\\n or \\r\\n)."""
    for line in sys.stdin.buffer:
        if line.endswith(b"\n"):
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        yield line


@main.command("pub")
@click.argument("bus")
@click.argument("topic")
@click.argument("message", required=False)
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    metavar="KEY=VALUE",
    help="A header (repeatable). VALUE becomes an int, a float, a bool (true/false) or else a str.",
)
@click.option(
    "--header-str",
    "string_headers",
    multiple=True,
    metavar="KEY=VALUE",
    help="A header whose VALUE stays a str, whatever it looks like (e.g. --header-str id=007).",
)
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Publish each message N times.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds a publish may wait for room (a slow on_full=block subscriber) or for a router that "
    "went away, and the final flush may wait for the router to take everything.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds to wait for the router at start.",
)
@click.option("-v", "--verbose", is_flag=True, help="Print each message's sequence number.")
def pub_command(
    bus: str,
    topic: str,
    message: str | None,
    headers: tuple[str, ...],
    string_headers: tuple[str, ...],
    count: int,
    timeout: float,
    connect_timeout: float,
    verbose: bool,
) -> None:
    """Publish MESSAGE (UTF-8) on TOPIC of BUS; with - (or no MESSAGE and stdin not a terminal),
    publish each line of stdin as one message, without its line ending.

    \b
    Headers (for subscribers' --where filters), -H KEY=VALUE: VALUE is read as
      an int        42, -7
      a float       1.5, 2e-3
      a bool        true, false (any case)
      else a str    XNAS, 1_000, nan
    --header-str KEY=VALUE keeps VALUE a str (--header-str id=007 is '007', not 7).

    Prints nothing unless -v (then each sequence number). Waits until the router has taken every
    message before exiting. Exits 1 if no router runs on BUS or a message could not be
    published within --timeout, 2 on a bad topic or header, 130 on Ctrl-C (after flushing).
    """
    try:
        parsed = _parse_headers(headers, string_headers)
    except click.BadParameter as exc:
        fail("pub", f"bad header: {exc.message}", EXIT_USAGE)
    if message is None and (sys.stdin is None or sys.stdin.isatty()):
        fail("pub", "give a MESSAGE, or - to publish each line of stdin", EXIT_USAGE)
    from shmq.topics import validate_topic

    try:  # check what the user typed before connecting: bad input is not a missing router
        validate_topic(topic)
        _bus.validate_bus(bus)
        _wire_check(parsed)
    except ShmqError as exc:
        fail("pub", str(exc), usage_code(exc))
    with _sigterm_interrupts():
        try:
            publisher = Publisher(bus, connect_timeout=connect_timeout)
        except KeyboardInterrupt:
            raise SystemExit(EXIT_INTERRUPTED) from None
        except ShmqError as exc:
            fail("pub", str(exc), usage_code(exc))
        published = 0
        code = 0
        try:
            payloads: Iterator[bytes] = (
                iter((message.encode("utf-8", "surrogateescape"),))
                if message is not None and message != "-"
                else _stdin_lines()
            )
            for payload in payloads:
                for _ in range(count):
                    seq = publisher.publish(topic, payload, headers=parsed or None, timeout=timeout)
                    published += 1
                    if verbose:
                        click.echo(str(seq))
        except KeyboardInterrupt:
            code = EXIT_INTERRUPTED
        except (Full, RouterUnavailable) as exc:
            code = EXIT_FAILED
            click.echo(f"shmq pub: {exc} ({published} published before)", err=True)
        except ShmqError as exc:
            code = usage_code(exc)
            click.echo(f"shmq pub: {exc}", err=True)
        finally:
            if not _close_publisher(publisher, timeout) and not code:
                code = EXIT_FAILED
    raise SystemExit(code)


def _wire_check(headers: dict[str, object]) -> None:
    """Raise what publishing these headers would (a key too long, an int beyond 64 bits)."""
    from shmq._wire import encode_headers

    encode_headers(headers)


def _close_publisher(publisher: Publisher, timeout: float) -> bool:
    """Wait for the router to take everything, then detach; False (and say so) if it did not."""
    try:
        if publisher.connected and publisher.flush(timeout):
            return True
        left = publisher.stats().depth_messages
        if left:
            click.echo(
                f"shmq pub: the router did not take {left} message(s) within {timeout} s; they are lost",
                err=True,
            )
        return not left
    finally:
        quiet = logging.getLogger("shmq.pubsub")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its "closing with N messages" warning: said above already
        try:
            publisher.close(linger=0)
        finally:
            quiet.setLevel(level)


def _json_value(value: object) -> object:
    """A header value as strict JSON has it (NaN and the infinities become strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _text(data: bytes) -> str | None:
    """The payload as text if it is UTF-8 with no control characters (tab aside), else None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(c != "\t" and not c.isprintable() for c in text):
        return None
    return text


def _payload_text(data: bytes) -> str:
    """A payload on a text line: as text if it is printable UTF-8, else as a bytes literal."""
    text = _text(data)
    return repr(data) if text is None else text


def _json_headers(headers: Mapping[str, object]) -> dict[str, object]:
    return {k: _json_value(v) for k, v in headers.items()}


def _json_data(row: dict[str, object], data: bytes) -> None:
    """Put the payload in a JSON row: "data" as text if it is UTF-8, else base64 with
    "encoding": "base64"."""
    try:
        row["data"] = data.decode("utf-8")
    except UnicodeDecodeError:
        row["data"] = base64.b64encode(data).decode("ascii")
        row["encoding"] = "base64"


def format_json(msg: Message, latency_ns: int) -> str:
    """One JSON object: topic, seq, timestamp_ns, latency_ns, headers, data (and encoding: base64
    when the payload is not UTF-8; last_value: true for a topic's newest message replayed)."""
    row: dict[str, object] = {
        "topic": msg.topic,
        "seq": msg.seq,
        "timestamp_ns": msg.timestamp_ns,
        "latency_ns": latency_ns,
        "headers": _json_headers(msg.headers),
    }
    _json_data(row, msg.data)
    if msg.last_value:
        row["last_value"] = True
    return json.dumps(row, allow_nan=False)


def format_text(msg: Message, latency_ns: int) -> str:
    """``TOPIC seq=N latency=12.3µs [last-value] [{headers}] PAYLOAD`` on one line: the payload as
    text if it is printable UTF-8, else as a bytes literal (b'\\x00...')."""
    parts = [msg.topic, f"seq={msg.seq}", f"latency={latency_ns / 1000:.1f}µs"]
    if msg.last_value:
        parts.append("last-value")
    if msg.headers:
        parts.append(json.dumps(_json_headers(msg.headers), allow_nan=False))
    parts.append(_payload_text(msg.data))
    return " ".join(parts)


def _tolerant_stdout() -> None:
    """Text that stdout's encoding cannot carry (a topic in a latin-1 terminal) is escaped."""
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]


def _discard_stdout() -> None:
    """After a broken pipe: what is still buffered goes nowhere, so exiting does not fail again."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


@main.command("sub")
@click.argument("bus")
@click.argument("patterns", nargs=-1, required=True)
@click.option("--where", metavar="EXPR", help="Filter on headers, e.g. \"venue == 'XNAS' and px > 10\".")
@click.option("--group", metavar="NAME", help="Share the messages with the other members of this group.")
@click.option("-n", "--count", type=click.IntRange(min=1), help="Exit 0 after N messages.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    help="Stop when no message arrived for this many seconds: exit 0, or 1 if --count was not reached.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@click.option(
    "--on-full",
    type=click.Choice(list(_bus.POLICIES)),
    default="block",
    show_default=True,
    help="What the router does when this subscriber is behind and its ring is full.",
)
@click.option("--last-value", is_flag=True, help="First receive the newest message of every matching topic.")
@click.option(
    "--start",
    metavar="WHERE",
    help="Replay durable topics from the log first: earliest, latest, a log seq, or an ISO time.",
)
@click.option(
    "--durable",
    metavar="NAME",
    help="A durable subscription: resume after what an earlier `--durable NAME` acknowledged "
    "(each message is acknowledged once printed).",
)
@click.option(
    "--capacity",
    type=int,
    default=1 << 20,
    show_default=True,
    help="Ring size in bytes (a power of two).",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds to wait for the router at start.",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Say on stderr when subscribed (scripts can wait for that line), reconnections, and a summary.",
)
def sub_command(
    bus: str,
    patterns: tuple[str, ...],
    where: str | None,
    group: str | None,
    count: int | None,
    timeout: float | None,
    as_json: bool,
    on_full: str,
    last_value: bool,
    start: str | None,
    durable: str | None,
    capacity: int,
    connect_timeout: float,
    verbose: bool,
) -> None:
    """Print the messages of BUS whose topics match a PATTERN (* one token, > the rest), one line
    each, flushed as it arrives.

    \b
    Text:  TOPIC seq=N latency=12.3µs [last-value] [{headers as JSON}] PAYLOAD
           (PAYLOAD as text if it is printable UTF-8, else as a bytes literal b'...')
    JSON:  {"topic", "seq", "timestamp_ns", "latency_ns", "headers", "data"}, with
           "encoding": "base64" when the payload is not UTF-8 (data is then base64) and
           "last_value": true for a replayed last value.
    latency = time.monotonic_ns() on receipt - the publisher's timestamp_ns (one way).

    Ends with exit 0 after --count messages, on Ctrl-C or SIGTERM, or when --timeout passes with no
    message and no --count was given; exit 1 if --timeout passes before --count is reached or no
    router runs on BUS; 2 on a bad pattern or --where filter.
    """
    if verbose:
        _log_to_stderr("shmq.pubsub")
    _tolerant_stdout()
    received = 0
    with _sigterm_interrupts():
        try:
            subscriber = Subscriber(
                bus,
                list(patterns),
                where=where,
                group=group,
                on_full=on_full,
                capacity=capacity,
                last_value=last_value,
                start=_start_option(start),
                durable=durable,
                connect_timeout=connect_timeout,
            )
        except KeyboardInterrupt:
            raise SystemExit(0) from None
        except InvalidFilter as exc:
            fail("sub", f"bad --where filter: {exc}", EXIT_USAGE)
        except InvalidTopic as exc:
            fail("sub", f"bad pattern: {exc}", EXIT_USAGE)
        except ShmqError as exc:
            fail("sub", str(exc), usage_code(exc))
        code = 0
        try:
            if verbose:
                click.echo(f"shmq sub: subscribed to {list(patterns)} on bus {bus!r}", err=True)
            formatter = format_json if as_json else format_text
            while count is None or received < count:
                batch = subscriber.recv_many(
                    max_messages=1024 if count is None else min(1024, count - received), timeout=timeout
                )
                now = time.monotonic_ns()
                if not batch:  # only a timeout returns nothing
                    if count is not None:
                        click.echo(
                            f"shmq sub: no message for {timeout} s; got {received} of {count}", err=True
                        )
                        code = EXIT_FAILED
                    break
                for msg in batch:
                    try:
                        line = formatter(msg, now - msg.timestamp_ns)
                    except MessageDecodeError as exc:
                        # (one damaged message from a broken publisher does not end the stream)
                        line = ""
                        click.echo(f"shmq sub: {msg.topic} seq={msg.seq}: skipped, {exc}", err=True)
                    if line:
                        sys.stdout.write(line + "\n")
                        sys.stdout.flush()
                    received += 1
                    if durable is not None and msg.log_seq:
                        msg.ack()  # printed: acknowledged
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:  # the reader went away (| head): nothing more to say
            _discard_stdout()
        except ShmqError as exc:
            code = EXIT_FAILED
            click.echo(f"shmq sub: {exc}", err=True)
        finally:
            stats = None
            if verbose:
                with contextlib.suppress(ShmqError):
                    stats = subscriber.stats()
            subscriber.close()
        if stats is not None:
            click.echo(f"shmq sub: received {received}, dropped {stats.drops} (router's count)", err=True)
    raise SystemExit(code)


def _start_option(start: str | None) -> Any:
    """--start: earliest, latest, a log seq, or an ISO 8601 time."""
    if start is None or start in ("earliest", "latest"):
        return start
    if start.isdigit():
        return int(start)
    try:
        return datetime.fromisoformat(start)
    except ValueError:
        fail("sub", f"bad --start {start!r}: use earliest, latest, a log seq or an ISO time", EXIT_USAGE)


# -- the durable log ---------------------------------------------------------------------------------


@main.group("log")
def log_group() -> None:
    """Read a router's durable log: DIR is its data directory (--data-dir, data_dir=) or DIR/log.

    Safe while the router runs: both commands only read, and see what was written when they get
    there.
    """


def _iso(time_ns: int | None, timespec: str = "microseconds") -> str:
    """A wall-clock time in nanoseconds as ISO 8601 in local time with its UTC offset ("-": none)."""
    return "-" if time_ns is None else wall_time(time_ns).astimezone().isoformat(timespec=timespec)


def _log_failure(command: str, exc: ShmqError | OSError) -> NoReturn:
    """Exit for an error of shmq.log: 2 if DIR is no log or an option is bad, else 1."""
    if isinstance(exc, InvalidTopic):
        fail(command, f"bad --topic pattern: {exc}", EXIT_USAGE)
    if isinstance(exc, NotFound | InvalidArgument | ArgumentTypeError):
        fail(command, str(exc), EXIT_USAGE)
    fail(command, str(exc), EXIT_FAILED)


def _inspect_row(name: str, item: LogSegment | LogReport, damaged: int | str) -> str:
    first = "-" if item.first_seq is None else item.first_seq
    last = "-" if item.last_seq is None else item.last_seq
    return (
        f"{name:24} {item.size:>12} {item.records:>9} {first:>10} {last:>10} "
        f"{_iso(item.first_time_ns, 'milliseconds'):29} {_iso(item.last_time_ns, 'milliseconds'):29} "
        f"{damaged:>7}"
    )


@log_group.command("inspect")
@click.argument("directory", metavar="DIR")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: segments, totals and damage.")
def log_inspect_command(directory: str, as_json: bool) -> None:
    """Check every record of the log in DIR (its CRC-32C) and show each segment file: size, records,
    first and last seq and time, damaged ranges; then the totals, and where any damage is.

    \b
    Exit codes:
      0  no damage found
      1  damage found: a damaged record (bad checksum, torn write), a segment with a bad header,
         or sequence numbers missing between the oldest segment and the last record
         (segments removed by retention do not count); also when a segment cannot be read
      2  DIR does not exist or holds no log
    """
    try:
        report = inspect_log(directory)
    except (ShmqError, OSError) as exc:
        _log_failure("log inspect", exc)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        raise SystemExit(EXIT_FAILED if report.damaged else 0)
    count = len(report.segments)
    click.echo(f"log {report.path}: {count} segment{'' if count == 1 else 's'}")
    header = (
        f"{'SEGMENT':24} {'BYTES':>12} {'RECORDS':>9} {'FIRST SEQ':>10} {'LAST SEQ':>10} "
        f"{'FIRST TIME':29} {'LAST TIME':29} {'DAMAGED':>7}"
    )
    click.echo(header)
    for seg in report.segments:
        click.echo(_inspect_row(seg.name, seg, "HEADER" if seg.bad_header else seg.damaged_records))
    click.echo(_inspect_row("TOTAL", report, report.damaged_records + report.bad_segments))
    if report.damage:
        click.echo("damage (readers skip it):")
        for damage in report.damage:
            click.echo(f"  {damage.describe()}")
    if report.missing_records:
        click.echo(
            f"missing: {report.missing_records} sequence number(s) between "
            f"{report.segments[0].base_seq} and {report.last_seq} have no readable record"
        )
    if report.damaged:
        problems = [f"{report.damaged_records} damaged range(s), {report.damaged_bytes} bytes"]
        if report.bad_segments:
            problems.append(f"{report.bad_segments} segment(s) with a bad header")
        if report.missing_records:
            problems.append(f"{report.missing_records} record(s) missing")
        click.echo(f"DAMAGED: {'; '.join(problems)}")
        raise SystemExit(EXIT_FAILED)
    click.echo(f"ok: {report.records} records, no damage")


def _log_entry_text(entry: LogEntry) -> str:
    """``SEQ TIME TOPIC [{headers as JSON}] PAYLOAD``, the payload as `shmq sub` shows it."""
    parts = [str(entry.seq), _iso(entry.time_ns), entry.topic]
    if entry.headers:
        parts.append(json.dumps(_json_headers(entry.headers), allow_nan=False))
    parts.append(_payload_text(entry.data))
    return " ".join(parts)


def _log_entry_json(entry: LogEntry) -> str:
    row: dict[str, object] = {
        "seq": entry.seq,
        "time_ns": entry.time_ns,
        "time": _iso(entry.time_ns),
        "topic": entry.topic,
        "headers": _json_headers(entry.headers),
    }
    _json_data(row, entry.data)
    row.update(
        publisher_id=entry.publisher_id,
        publisher_seq=entry.publisher_seq,
        timestamp_ns=entry.timestamp_ns,
        segment=entry.segment,
        offset=entry.offset,
    )
    return json.dumps(row, allow_nan=False)


def _iso_option(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time (2026-11-21T08:57:34)") from None


@log_group.command("dump")
@click.argument("directory", metavar="DIR")
@click.option(
    "--topic", "pattern", metavar="PATTERN", help="Only records whose topic matches (md.*.AAPL, md.>)."
)
@click.option(
    "--from",
    "start",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="SEQ",
    help="Start at this log sequence number.",
)
@click.option(
    "--since",
    callback=_iso_option,
    metavar="TIME",
    help="Only records appended at or after TIME: ISO 8601 as dump prints it, local time unless it "
    "has an offset (2026-11-21T08:57:34, 2026-11-21T08:57:34.5+01:00).",
)
@click.option("-n", "--limit", type=click.IntRange(min=1), metavar="N", help="Stop after N records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record.")
def log_dump_command(
    directory: str,
    pattern: str | None,
    start: int,
    since: datetime | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """Print the records of the log in DIR, oldest first, one line each.

    \b
    Text:  SEQ TIME TOPIC [{headers as JSON}] PAYLOAD
           (TIME in ISO 8601, local; PAYLOAD as text if it is printable UTF-8, else as a bytes
           literal b'...', as `shmq sub` shows it)
    JSON:  {"seq", "time_ns", "time", "topic", "headers", "data", "publisher_id", "publisher_seq",
           "timestamp_ns", "segment", "offset"}, with "encoding": "base64" when the payload is
           not UTF-8 (data is then base64).

    Damaged records are skipped, and said so on stderr (`shmq log inspect DIR` shows them all).
    Exit codes: 0 done; 1 the log could not be read; 2 DIR does not exist or holds no log, or a
    bad --topic pattern; 130 Ctrl-C.
    """
    try:
        records = read_log(directory, start=start, topic=pattern, since=since)
    except (ShmqError, OSError) as exc:
        _log_failure("log dump", exc)
    _tolerant_stdout()
    formatter = _log_entry_json if as_json else _log_entry_text
    code = 0
    with records:
        try:
            for printed, entry in enumerate(records, 1):
                sys.stdout.write(formatter(entry) + "\n")
                if printed == limit:
                    break
            sys.stdout.flush()
        except KeyboardInterrupt:
            code = EXIT_INTERRUPTED
        except BrokenPipeError:  # the reader went away (| head): nothing more to say
            _discard_stdout()
        except (ShmqError, OSError) as exc:
            code = EXIT_FAILED
            click.echo(f"shmq log dump: {exc}", err=True)
    for damage in records.damage:
        click.echo(f"shmq log dump: skipped {damage.describe()}", err=True)
    raise SystemExit(code)


main.add_command(bench_command)


if __name__ == "__main__":
    main()
