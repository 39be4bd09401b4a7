"""Smoke test of benchmarks/bench_pubsub.py: the quick run (~10-15 s) finishes, prints the table with
every row, measures every shmq cell without an error, writes its JSON, and leaves no segment behind.

The numbers are not checked: this machine is shared and small (2 cores), and the quick run is far too
short to mean anything. Peers that are not installed (the test extra does not install pyzmq or
iceoryx2) show "not installed" and do not fail the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_pubsub.py")


@pytest.mark.timeout(45)
def test_quick_run_prints_the_table(tmp_path: os.PathLike[str]) -> None:
    out = os.path.join(tmp_path, "pubsub.json")
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--quick", "--json", out],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        table, log = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the script cleans up on SIGTERM
            proc.communicate(timeout=20)
    assert proc.returncode == 0, log[-4000:]
    assert "| Scenario | Spinning / busy processes | shmq |" in table
    for label in (
        "One-way latency, publish → receive, 64 B",
        "router forwarding rate",
        "1 → 4 subscribers",
        "1 → 8 subscribers",
        '3rd subscriber on_full="drop"',
        '3rd on_full="drop_oldest"',
        '3rd on_full="conflate"',
        "Targets",
    ):
        assert label in table, label

    with open(out) as f:
        data = json.load(f)
    keys = {row["key"] for row in data["rows"]}
    assert {"lat_spin", "lat_spin_all", "lat_loop", "fan1", "fan4", "fan8", "stall_drop"} <= keys
    for row in data["rows"]:
        cell = row["cells"].get("shmq")
        assert cell is not None, row["key"]
        assert "error" not in cell, (row["key"], cell["error"])
    assert {t["row"] for t in data["targets"]} >= {"lat_spin_all", "lat_loop", "fan1", "fan4"}

    # Every bus, publisher ring and subscriber ring of the run was removed.
    leftovers = [e for e in os.listdir("/dev/shm") if e.startswith(f"shmq.bus.pbench-{proc.pid}-")]
    assert leftovers == []
