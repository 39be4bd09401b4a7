"""Smoke test of benchmarks/bench_persist.py: the quick run finishes, prints the table with every
row and the targets, measures every shmq cell without an error, writes its JSON, and leaves nothing
behind (no segment in /dev/shm, no temporary data directory).

The numbers are not checked: this machine is shared and small (2 cores), and the quick run is far
too short to mean anything. Redis is measured only where redis-server and the redis client are
installed; otherwise the run says "redis: not available (...)" and the test still passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_persist.py")


@pytest.mark.timeout(300)
def test_quick_run_prints_the_table(tmp_path: os.PathLike[str]) -> None:
    out = os.path.join(tmp_path, "persist.json")
    data_root = os.path.join(tmp_path, "data")
    os.makedirs(data_root)
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--quick", "--json", out, "--dir", data_root],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        table, log = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the script cleans up on SIGTERM
            proc.communicate(timeout=30)
    assert proc.returncode == 0, log[-4000:]
    assert "| Scenario (shmq; SQLite; Redis) |" in table
    for label in (
        "Durable publish, 64 B payloads",
        "Durable publish, 4 KiB payloads",
        'fsync="never"',
        'fsync="interval"',
        'fsync="always"',
        "Group commit",
        "8 publisher processes at once",
        "Replay",
        "LogReader",
        "Spill",
        "SIGCONT: drain rate",
        "Spinning:",
        "Targets",
    ):
        assert label in table, label

    with open(out) as f:
        data = json.load(f)
    if "redis" in data["missing"]:
        assert "redis: not available (" in table
    keys = {row["key"] for row in data["rows"]}
    expected = {f"pub{size}_{mode}" for size in (64, 4096) for mode in ("never", "interval", "always")}
    expected |= {"group1", "group8", "replay", "logread", "spill_pub", "spill_drain"}
    assert expected <= keys
    for row in data["rows"]:
        cell = row["cells"].get("shmq")
        assert cell is not None, row["key"]
        assert "error" not in cell, (row["key"], cell["error"])
    spill = next(r for r in data["rows"] if r["key"] == "spill_drain")["cells"]["shmq"]
    assert spill["spill_dir_left"] == []  # the spill files went once the subscriber drained them
    assert len(data["targets"]) == 4

    # Every bus and client ring of the run was removed, and so was the data directory.
    leftovers = [e for e in os.listdir("/dev/shm") if e.startswith(f"shmq.bus.persist-{proc.pid}-")]
    assert leftovers == []
    assert os.listdir(data_root) == []
