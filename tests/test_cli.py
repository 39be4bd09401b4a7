"""The `shmq` command, run as a real process: ls, rm and demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import shmq
from shmq._segment import segment_path

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "shmq.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def listed(name: str) -> dict[str, Any]:
    result = run_cli("ls", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    matching = [r for r in rows if r["name"] == name]
    assert len(matching) == 1, rows
    return matching[0]


def test_ls_reports_a_live_queue(name: str) -> None:
    """ls --json shows kind, capacity, depth and that the creator (this process) is alive."""
    with shmq.Queue(name, create=True, capacity=4096, kind="spsc") as q:
        q.put(b"one", timeout=1)
        q.put(b"two", timeout=1)
        row = listed(name)
        assert (row["kind"], row["capacity"], row["depth_messages"]) == ("spsc", 4096, 2)
        assert (row["creator_pid"], row["creator_alive"], row["valid"]) == (os.getpid(), True, True)
        assert row["mode"] == 0o600
        text = run_cli("ls").stdout
        assert name in text and "spsc" in text


def test_ls_reports_a_dead_creator(name: str) -> None:
    """A queue whose creator has exited is listed with creator_alive false."""
    code = f"import shmq; shmq.Queue({name!r}, create=True, capacity=4096).close()"
    subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    row = listed(name)
    assert row["creator_alive"] is False


def test_ls_explains_a_damaged_segment(name: str) -> None:
    """A segment that is not a shmq ring is listed with the reason, not a crash."""
    with open(segment_path(name), "wb") as f:
        f.write(b"\xff" * 8192)
    row = listed(name)
    assert row["valid"] is False and "magic" in row["problem"]


def test_rm_removes_and_reports_missing(name: str) -> None:
    """rm removes the segment (attached handles keep working); a missing name exits 1 saying so."""
    with shmq.Queue(name, create=True, capacity=4096) as q:
        result = run_cli("rm", name)
        assert result.returncode == 0, result.stderr
        assert not os.path.exists(segment_path(name))
        q.put(b"still works", timeout=1)
        assert q.get(timeout=1) == b"still works"
        missing = run_cli("rm", name)
        assert missing.returncode == 1 and f"no segment named {name!r}" in missing.stderr


def test_demo_prints_its_tables() -> None:
    """The main job (the market-data demo) runs end to end, short, and passes its checks."""
    result = run_cli("demo", "--seconds", "1", timeout=110)
    assert result.returncode == 0, result.stderr
    for fragment in ("market-data demo", "p99.9", "wildcard", "risk#3", "checks passed"):
        assert fragment in result.stdout, result.stdout


def test_demo_queue_prints_its_tables() -> None:
    result = run_cli("demo", "--queue", "--rounds", "300", "--messages", "3000", timeout=110)
    assert result.returncode == 0, result.stderr
    for fragment in ("p50", "p99.9", "shmq spsc, wait=spin", "multiprocessing.Queue", "put_many/get_many"):
        assert fragment in result.stdout, result.stdout
