"""`shmq bench` (shmq/bench.py): every scenario in a short run across real processes, fixed-rate
sending, a stall shown as latency, --json, --plot, --compare with multiprocessing, bad input,
Ctrl-C, and no segment left behind.

No check here is a wall-clock latency threshold (the machine is small and shared): counts must
match what the sender reports, percentiles must be ordered, rates positive, a fixed-rate sender
cannot beat its schedule, and an injected stall is a lower bound of the latency it causes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from shmq import bench
from shmq.cli import main
from tests.conftest import session_segments

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--duration", "0.3", "--warmup", "0.1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Every segment a run makes (queues, buses, client rings, latency recorders) is gone after it."""
    before = set(session_segments())
    yield
    left = set(session_segments()) - before
    assert not left, f"shmq bench left segments behind: {sorted(left)}"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["bench", *args], catch_exceptions=False)


def run_json(tmp_path: Path, *args: str) -> tuple[Result, dict[str, Any]]:
    out = tmp_path / "bench.json"
    result = invoke(*args, "--json", str(out))
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


def cell(data: dict[str, Any], impl: str = "shmq", size: int = 64) -> dict[str, Any]:
    (found,) = [r for r in data["results"] if r["impl"] == impl and r["size"] == size]
    return found


def assert_ordered(latency: dict[str, Any]) -> None:
    keys = ("min", "p50", "p90", "p99", "p999", "p9999", "max")
    values = [latency[k] for k in keys]
    assert values == sorted(values), dict(zip(keys, values, strict=True))
    assert latency["min"] > 0
    assert latency["min"] <= latency["mean"] <= latency["max"]
    spectrum = [ns for _, ns in latency["spectrum"]]
    assert spectrum == sorted(spectrum)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.timeout(60)
def test_latency_ping_pong_counts_every_message(tmp_path: Path) -> None:
    result, data = run_json(tmp_path, "latency", *SHORT)
    shmq = cell(data)
    assert shmq["status"] == "ok"
    assert shmq["sent"] > 100
    assert shmq["received"] == shmq["sent"] == shmq["latency"]["count"]
    assert_ordered(shmq["latency"])
    assert shmq["msgs_per_s"] > 0
    # The JSON holds what was printed: the table itself, and its numbers.
    assert data["table"] in result.output
    assert f"{shmq['latency']['count']:,}" in result.output
    assert data["settings"]["scenario"] == "latency" and data["settings"]["rate"] is None
    assert data["machine"]["cpu_count"] == os.cpu_count()
    assert data["shmq_version"]
    assert "ping-pong" in result.output and "Busy processes" in result.output


@pytest.mark.timeout(60)
def test_fixed_rate_sends_on_schedule(tmp_path: Path) -> None:
    rate, duration = 2000, 0.5
    result, data = run_json(
        tmp_path, "latency", "--rate", str(rate), "--duration", str(duration), "--warmup", "0.1"
    )
    shmq = cell(data)
    due = round(rate * duration)
    assert shmq["due"] == due
    assert shmq["sent"] == due  # a sender this slow keeps up, even on a busy machine
    assert shmq["received"] == shmq["sent"] == shmq["latency"]["count"]
    assert_ordered(shmq["latency"])
    # The schedule is a lower bound on the time the run takes: the last message was due at
    # (due - 1) / rate; the sender gives up at twice the duration.
    assert (due - 1) / rate <= shmq["elapsed_s"] < 2 * duration + 1.0
    assert 0 < shmq["msgs_per_s"] <= rate * 1.01
    assert "late sends" in result.output and "intended send time" in result.output


@pytest.mark.timeout(60)
def test_a_stall_during_a_fixed_rate_run_shows_as_latency() -> None:
    """The receiver sleeps 150 ms halfway through: every message due meanwhile is measured from
    its due time, so the tail holds the stall (it would hide as one slow sample otherwise)."""
    stall_ms, rate = 150, 1000
    config = bench.BenchConfig("latency", rate=rate, duration=0.6, warmup=0.1, inject_stall_ms=stall_ms)
    report = bench.run(config)
    (shmq,) = report.results
    assert shmq.ok and shmq.latency is not None
    assert shmq.received == shmq.sent == round(0.6 * rate)
    # The k-th message due after the stall began waited at least stall - k ms: the top 1 % (6 of
    # 600) waited at least stall - 6 ms, the worst nearly the whole stall.
    assert shmq.latency.max >= (stall_ms - 2) * 1_000_000
    assert shmq.latency.p99 >= (stall_ms - 10) * 1_000_000
    assert "shmq" in report.table


@pytest.mark.timeout(60)
def test_throughput_one_row_per_size(tmp_path: Path) -> None:
    result, data = run_json(
        tmp_path, "throughput", *SHORT, "--size", "64", "--size", "4096", "--kind", "mpmc"
    )
    assert data["settings"]["sizes"] == [64, 4096] and data["settings"]["kind"] == "mpmc"
    for size in (64, 4096):
        shmq = cell(data, size=size)
        assert shmq["sent"] > 0
        assert shmq["received"] == shmq["sent"]
        assert shmq["msgs_per_s"] > 0
        assert shmq["bytes_per_s"] == pytest.approx(shmq["msgs_per_s"] * size)
        assert shmq["latency"] is None
        assert sum(rate for _, rate in shmq["timeline"]) * 0.05 == pytest.approx(shmq["received"])
        assert f"{shmq['received']:,}" in result.output
    assert "msgs/s" in result.output and "MB/s" in result.output


@pytest.mark.timeout(60)
def test_fanout_every_subscriber_gets_every_message(tmp_path: Path) -> None:
    result, data = run_json(tmp_path, "fanout", *SHORT, "--subscribers", "2", "--rate", "3000")
    shmq = cell(data)
    assert shmq["sent"] == shmq["due"] == round(3000 * 0.3)
    assert [s["index"] for s in shmq["subscribers"]] == [1, 2]
    for sub in shmq["subscribers"]:
        assert sub["received"] == shmq["sent"]  # on_full="block": lossless
        assert sub["latency"]["count"] == sub["received"]
        assert_ordered(sub["latency"])
        assert sub["msgs_per_s"] > 0
    assert shmq["received"] == 2 * shmq["sent"] == shmq["latency"]["count"]
    assert_ordered(shmq["latency"])
    assert "all" in result.output and "subscriber" in result.output


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args",
    [
        ["latency", "--rate", "2000", "--peer", "mp.Pipe"],  # two spectra over a timeline
        ["throughput"],  # no latency: the timeline alone
    ],
)
def test_plot_writes_a_png(tmp_path: Path, args: list[str]) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    result = invoke(*args, *SHORT, "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert f"plot: {plot}" in result.output
    assert_png(plot)


@pytest.mark.timeout(90)
def test_compare_with_multiprocessing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (plays a peer that is not installed, whatever this machine has)
    monkeypatch.setitem(bench._MODULES, "faster-fifo", "shmq_no_such_module")
    result, data = run_json(
        tmp_path, "throughput", *SHORT, "--peer", "mp.Pipe", "--peer", "mp.Queue", "--peer", "faster-fifo"
    )
    assert [r["impl"] for r in data["results"]] == ["shmq", "mp.Queue", "mp.Pipe", "faster-fifo"]
    for impl in ("shmq", "mp.Queue", "mp.Pipe"):
        r = cell(data, impl)
        assert r["status"] == "ok", r["note"]
        assert r["received"] == r["sent"] > 0 and r["msgs_per_s"] > 0
    assert cell(data, "faster-fifo")["status"] == "not installed"
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    for impl in ("mp.Queue", "mp.Pipe"):
        ratio = cell(data, "shmq")["msgs_per_s"] / cell(data, impl)["msgs_per_s"]
        shown = lines[impl].split()[-1]
        assert shown.endswith(bench.TIMES)
        assert float(shown[:-1].replace(",", "")) == pytest.approx(ratio, rel=0.06, abs=0.06)
    assert "not installed" in lines["faster-fifo"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["latency", "--size", "0"], "message size"),
        (["latency", "--size", "8"], "message size"),
        (["throughput", "--size", "4096", "--capacity", "4096"], "raise --capacity"),
        (["throughput", "--capacity", "1000"], "power of two"),
        (["latency", "--rate", "0"], "rate"),
        (["fanout", "--rate", "-10"], "rate"),
        (["latency", "--duration", "0"], "duration"),
        (["throughput", "--duration", "-1"], "duration"),
        (["latency", "--warmup", "-1"], "warm-up"),
        (["fanout", "--subscribers", "0"], "at least 1 subscriber"),
        (["latency", "--subscribers", "2"], "fanout"),
        (["fanout", "--kind", "spsc"], "--kind"),
        (["latency", "--inject-stall", "-5"], "stall"),
        (["sideways"], "sideways"),
        (["latency", "--peer", "redis"], "redis"),
    ],
)
def test_bad_input_is_a_usage_error(args: list[str], says: str) -> None:
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "p50" not in result.output  # nothing ran


@pytest.mark.timeout(30)
def test_plot_without_matplotlib_fails_before_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = CliRunner().invoke(main, ["bench", "latency", "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "pip install 'shmq[plot]'" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "x.png").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_removes_everything(signum: int) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM mid-run:
    exit code 130 and nothing left in /dev/shm, the fan-out's router and client rings included."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # (a shell starts background jobs with SIGINT ignored, and Python keeps it so: undo that)
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from shmq.cli import main; main()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "bench", "fanout", "--subscribers", "2", "--duration", "20"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        # Wait until the subscribers' rings exist: the run is under way.
        while sum(".s." in n for n in session_segments()) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "p50" not in out
