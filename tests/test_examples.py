"""Every example under examples/ runs end to end and leaves no segment behind; so does the demo."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

import shmq
from shmq import demo
from shmq.testing import list_segments

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").rglob("*.py"))

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

# Examples checked beyond their exit status: the arguments to run them with (short runs) and
# lines their output must contain.
CHECKED: dict[str, tuple[list[str], list[str]]] = {
    "examples/market_data/run.py": (
        ["--seconds", "1.5", "--rate", "4000"],
        [
            "board joined late: snapshot of 12 topics",
            "strategy saw exactly the ('AAPL', 'MSFT') ticks, in order: yes",
            "board ends on the feed's last price of every topic: yes",
        ],
    ),
    "examples/work_queue/run.py": (
        ["--jobs", "1500"],
        [
            "killed worker 1 (SIGKILL): the router hands its",
            "results: 1,500 of 1,500 jobs done, 0 twice",
            "the dead worker's ring was drained and removed (router)",
            "ok: every job done exactly once, nothing lost with the killed worker",
        ],
    ),
}


def run_python(args: list[str], timeout: float = 100) -> tuple[subprocess.Popen[str], str, str]:
    """Run `python ARGS` from the repository root; (process, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
    return proc, stdout, stderr


def own_segments(pid: int) -> list[str]:
    """unique_name() embeds the creating pid: these are exactly that process's segments (and the
    rings of its buses, whose names start with the bus name)."""
    return sorted(n for n in list_segments() if f"-{pid}-" in n)


def test_examples_exist() -> None:
    """The examples folder is not silently empty (the parametrized test would pass vacuously)."""
    assert len(EXAMPLES) >= 5
    found = {str(p.relative_to(ROOT)) for p in EXAMPLES}
    assert set(CHECKED) <= found, set(CHECKED) - found
    for folder in ("market_data", "work_queue"):
        assert (ROOT / "examples" / folder / "README.md").is_file()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_runs(path: Path) -> None:
    """The example exits 0, prints what it should, and the segments it created are gone afterwards."""
    args, expected = CHECKED.get(str(path.relative_to(ROOT)), ([], []))
    proc, stdout, stderr = run_python([str(path), *args])
    assert proc.returncode == 0, f"{path.name} failed:\n{stdout}\n{stderr}"
    assert stderr == "", stderr
    for line in expected:
        assert line in stdout, f"{line!r} not in the output of {path.name}:\n{stdout}"
    leaked = own_segments(proc.pid)
    assert not leaked, f"{path.name} left segments behind: {leaked}"


def test_demo_short_run() -> None:
    """The main job, short: the latency table has a row per subscriber and every check holds."""
    proc, stdout, stderr = run_python(["-m", "shmq.demo", "--seconds", "2"])
    assert proc.returncode == 0, f"{stdout}\n{stderr}"
    assert stderr == "", stderr
    assert "published 40,000 ticks in" in stdout, stdout
    header = re.search(r"^subscriber +received +drops +p50 +p90 +p99 +p99\.9 +max$", stdout, re.M)
    assert header, stdout
    rows = {}
    for spec in demo.SUBSCRIBERS:
        match = re.search(rf"^{re.escape(spec.name)} +([\d,]+) +([\d,]+)( +[\d.]+){{5}}$", stdout, re.M)
        assert match, f"no row for {spec.name}:\n{stdout}"
        rows[spec.name] = (int(match[1].replace(",", "")), int(match[2].replace(",", "")))
    assert rows["wildcard"] == (40_000, 0)
    assert rows["conflating"][1] > 0  # it is too slow for the feed on purpose
    assert sum(rows[f"risk#{i}"][0] for i in (1, 2, 3)) > 0
    assert "bus totals (shmq.bus_stats): 40,000 messages (" in stdout
    for fragment in (
        "ok   wildcard: got 40,000 of 40,000 ticks, each exactly once and in order on every topic",
        "ok   filtered: got ",
        "ok   conflating: ends with the last tick of each of 60 topics",
        "ok   risk group: ",
        "ok   cleanup: no segment left in /dev/shm",
        f"all {len(re.findall(r'^  ok   ', stdout, re.M))} checks passed",
    ):
        assert fragment in stdout, f"{fragment!r} not in:\n{stdout}"
    assert "FAIL" not in stdout
    assert not own_segments(proc.pid)


def test_queue_demo_still_runs() -> None:
    """``--queue``: the ping-pong and throughput demo, beside multiprocessing.Queue."""
    proc, stdout, stderr = run_python(["-m", "shmq.demo", "--queue", "--rounds", "300", "--messages", "3000"])
    assert proc.returncode == 0, stderr
    for fragment in ("p50", "p99.9", "shmq spsc, wait=spin", "multiprocessing.Queue", "put_many/get_many"):
        assert fragment in stdout, stdout


# -- the demo's checks catch what they should (no processes: synthetic results) -----------------


def record(cls: type[T], **given: Any) -> T:
    """A statistics record with the `given` fields, zero or empty elsewhere (new fields welcome)."""
    empty = {"int": 0, "float": 0.0, "bool": False, "str": ""}
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = str(f.type)
        default = () if kind.startswith("tuple") else None if "None" in kind else empty[kind]
        values[f.name] = given.get(f.name, default)
    return cls(**values)


def fake_run(ticks: int = 3000) -> tuple[dict[str, Any], dict[str, dict[str, Any]], shmq.BusStats]:
    """A feed log and subscriber results as a flawless run would report them."""
    log = demo.make_ticks(ticks, seed=3)
    topic, price = demo.tick_topics(log), demo.tick_prices(log)
    seq = np.zeros(ticks, np.int64)
    for t in range(len(demo.TOPICS)):
        rows = topic == t
        seq[rows] = np.arange(1, rows.sum() + 1)
    feed = {"topic": topic, "seq": seq, "price": price}

    def sub(rows: Any, drops: int = 0, filtered: int = 0) -> dict[str, Any]:
        delivered = int(np.count_nonzero(rows))
        stats = record(shmq.SubscriberStats, delivered=delivered, drops=drops, filtered=filtered)
        return {"topic": topic[rows], "seq": seq[rows], "latency_ns": seq[rows], "stats": stats, "bad": 0}

    everything = np.ones(ticks, bool)
    xnas = topic // len(demo.SYMBOLS) == demo.VENUES.index("XNAS")
    wanted = (price > 100) & xnas
    last = np.zeros(ticks, bool)
    for t in range(len(demo.TOPICS)):
        last[np.flatnonzero(topic == t)[-1:]] = True
    xnys = np.flatnonzero(topic // len(demo.SYMBOLS) == demo.VENUES.index("XNYS"))
    subs = {
        "wildcard": {**sub(everything), "checked": ticks},
        "filtered": sub(wanted, filtered=ticks - int(wanted.sum())),
        "conflating": sub(last, drops=ticks - int(last.sum())),
    }
    for i in range(3):
        member = np.zeros(ticks, bool)
        member[xnys[i::3]] = True
        subs[f"risk#{i + 1}"] = sub(member)
    delivered = sum(s["stats"].delivered for s in subs.values())
    drops = subs["conflating"]["stats"].drops
    totals = record(shmq.BusStats, messages=ticks, deliveries=delivered, drops=drops)
    return feed, subs, totals


def failed(checks: list[demo.Check]) -> list[str]:
    return [c.text.split(":")[0] for c in checks if not c.ok]


def test_demo_checks_pass_on_a_flawless_run() -> None:
    feed, subs, totals = fake_run()
    assert failed(demo.check_market_demo(feed, subs, totals, [])) == []


def cut(result: dict[str, Any], index: int, duplicate: bool = False) -> dict[str, Any]:
    """The result with one message removed (or the message at `index` received twice)."""
    out = dict(result)
    for key in ("topic", "seq"):
        arr = result[key]
        out[key] = np.insert(arr, index, arr[index]) if duplicate else np.delete(arr, index)
    return out


@pytest.mark.parametrize(
    ("name", "change", "expect"),
    [
        ("wildcard", lambda r: cut(r, 100), ["wildcard", "bus"]),
        ("wildcard", lambda r: cut(r, 100, duplicate=True), ["wildcard"]),
        ("filtered", lambda r: cut(r, 5), ["filtered", "bus"]),
        ("conflating", lambda r: cut(r, -1), ["conflating", "conflating", "bus"]),
        ("risk#2", lambda r: cut(r, 7, duplicate=True), ["risk group"]),
        ("risk#1", lambda r: {**r, "bad": 1}, ["risk group"]),
    ],
)
def test_demo_checks_catch_a_flaw(name: str, change: Any, expect: list[str]) -> None:
    feed, subs, totals = fake_run()
    flawed = change(subs[name])
    if len(flawed["seq"]) < len(subs[name]["seq"]):  # what the router would have counted too
        stats = flawed["stats"]
        flawed["stats"] = dataclasses.replace(stats, delivered=stats.delivered - 1)
    subs[name] = flawed
    assert failed(demo.check_market_demo(feed, subs, totals, [])) == expect


def test_demo_checks_report_leftover_segments() -> None:
    feed, subs, totals = fake_run()
    assert failed(demo.check_market_demo(feed, subs, totals, ["bus.x"])) == ["cleanup"]
