"""The ``shmq`` command."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import click
import psutil

from shmq._errors import ShmqError
from shmq._segment import SegmentInfo, read_info
from shmq.testing import list_segments, remove_segment


def creator_alive(info: SegmentInfo) -> bool:
    """True if the process that created the segment still runs (a reused pid does not count)."""
    try:
        started = psutil.Process(info.creator_pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
    # A process started after the segment was created cannot be its creator.
    return bool(started <= info.created_ns / 1e9 + 1.0)


@click.group()
@click.version_option(package_name="shmq")
def main() -> None:
    """shmq: shared-memory message queues. Segments live in /dev/shm as shmq.<name>."""


@main.command()
@click.option("--rounds", default=50_000, show_default=True, help="Ping-pong round trips per row.")
@click.option("--messages", default=1_000_000, show_default=True, help="Messages per throughput row.")
def demo(rounds: int, messages: int) -> None:
    """Ping-pong latency and throughput between two processes, beside multiprocessing.Queue."""
    from shmq import demo as demo_module

    raise SystemExit(demo_module.main(["--rounds", str(rounds), "--messages", str(messages)]))


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per segment, for scripts.")
def list_command(as_json: bool) -> None:
    """List every shmq segment on this machine."""
    infos = []
    for name in list_segments():
        try:
            infos.append(read_info(name))
        except ShmqError as exc:
            click.echo(f"{name}: {exc}", err=True)
    if as_json:
        for info in infos:
            click.echo(json.dumps({**asdict(info), "creator_alive": creator_alive(info)}))
        return
    if not infos:
        click.echo("no shmq segments")
        return
    click.echo(f"{'NAME':40} {'KIND':5} {'CAPACITY':>10} {'QUEUED':>8} {'CREATOR':>8} {'ALIVE':5} CREATED")
    for info in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created_ns / 1e9))
        kind = info.kind if info.valid else "BAD"
        alive = "yes" if creator_alive(info) else "no"
        line = (
            f"{info.name:40} {kind:5} {info.capacity:>10} {info.depth_messages:>8} "
            f"{info.creator_pid:>8} {alive:5} {created}"
        )
        click.echo(line + (f"  ({info.problem})" if info.problem else ""))


@main.command("rm")
@click.argument("names", nargs=-1, required=True)
def remove_command(names: tuple[str, ...]) -> None:
    """Remove segments by name. Attached processes keep working; new ones cannot attach."""
    missing = [n for n in names if not remove_segment(n)]
    for n in missing:
        click.echo(f"shmq: no segment named {n!r}", err=True)
    raise SystemExit(1 if missing else 0)


if __name__ == "__main__":
    main()
