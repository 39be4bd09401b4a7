"""`shmq top`: the machine-wide view, read while other processes produce, publish and subscribe
(values must agree with what they sent and received), and the live view driven in a real
terminal (tmux): it renders, refreshes in place and quits on `q`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import shmq
from shmq.testing import unique_name
from tests import _pubsub_workers as pw
from tests import _workers as w
from tests.conftest import CTX
from tests.test_cli import ROOT, run_cli

pytestmark = pytest.mark.timeout(120)


def publish_until(bus: str, stop: str, out: str) -> None:
    """Publish numbered messages at a modest pace until `stop` exists; write how many to `out`."""
    with shmq.Publisher(bus) as pub:
        n = 0
        while not os.path.exists(stop):
            pub.publish("top.x", n.to_bytes(4, "little"), timeout=30)
            n += 1
            if n % 20 == 0:
                time.sleep(0.002)
        assert pub.flush(30)
    Path(out).write_text(str(n))


def subscribe_until(bus: str, ready: str, stop: str, out: str) -> None:
    """Subscribe with record_latency=True; after `stop` exists, drain, write how many messages
    came, then stay (so a view can read the recorder) until `out` is removed."""
    with shmq.Subscriber(bus, "top.>", record_latency=True) as sub:
        Path(ready).write_text(sub.latency.name if sub.latency and sub.latency.name else "")
        received = 0
        while not os.path.exists(stop):
            received += len(sub.recv_many(1024, timeout=0.05))
        while batch := sub.recv_many(1024, timeout=0.5):  # (the publisher's last ones)
            received += len(batch)
        Path(out).write_text(str(received))
        deadline = time.monotonic() + 60
        while os.path.exists(out) and time.monotonic() < deadline:
            time.sleep(0.01)


def top_json(*extra: str) -> dict[str, Any]:
    result = run_cli("top", "--once", "--json", *extra)
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert isinstance(view, dict)
    return view


def test_top_once_json_agrees_with_the_traffic(tmp_path: Path) -> None:
    """A queue fed by a producer process, a bus with a publisher process and a latency-recording
    subscriber process, and a named recorder: one `top --once --json` while they run shows rates,
    a final one agrees exactly with what each side counted."""
    queue_name, bus, recorder_name = unique_name("topq"), unique_name("topb"), unique_name("topr")
    stop, ready = str(tmp_path / "stop"), str(tmp_path / "ready")
    published_file, received_file = str(tmp_path / "published"), str(tmp_path / "received")
    q = shmq.Queue(queue_name, create=True, kind="mpsc", capacity=1 << 20, wait="block")
    recorder = shmq.LatencyRecorder(recorder_name, create=True)
    recorder.record_many([1_000, 2_000, 3_000])
    sent = 10_000  # (paced: for two seconds or more)
    producer = CTX.Process(target=w.paced_producer, args=(queue_name, "block", 0, sent, 50, 0.01))
    consumed = threading.Event()

    def consume() -> None:  # (so the producer never waits on a full ring)
        got = 0
        while got < sent and not Path(stop).exists():
            got += len(q.get_many(1024, timeout=0.05))
        consumed.set()

    consumer = threading.Thread(target=consume)
    publisher = CTX.Process(target=publish_until, args=(bus, stop, published_file))
    subscriber = CTX.Process(target=subscribe_until, args=(bus, ready, stop, received_file))
    try:
        with pw.no_leaks(bus), shmq.Router(bus):
            subscriber.start()
            pw.wait_for_file(ready)
            latency_name = Path(ready).read_text()
            producer.start()
            consumer.start()
            publisher.start()
            assert w.wait_until(lambda: q.stats().messages_put > 0, 30)
            assert w.wait_until(lambda: shmq.bus_stats(bus).messages > 0, 30)

            view = top_json("--interval", "0.5")
            (row,) = [r for r in view["queues"] if r["name"] == queue_name]
            assert row["kind"] == "mpsc" and 0 < row["messages_got"] <= row["messages_put"] < sent
            assert row["put_per_s"] > 0 and row["put_per_s"] * row["interval_s"] <= row["messages_put"]
            assert row["got_per_s"] > 0 and row["bytes_put_per_s"] > row["put_per_s"]
            assert {"pid": producer.pid, "role": "user", "alive": True} in row["attached"]
            assert not [r for r in view["queues"] if r["name"].startswith(f"bus.{bus}.")]  # (under the bus)
            (b,) = [r for r in view["buses"] if r["bus"] == bus]
            assert b["router_alive"] and b["messages_per_s"] > 0
            (pub,) = [p for p in b["publishers"] if p["pid"] == publisher.pid]
            assert pub["alive"] and pub["published_per_s"] > 0
            (sub,) = b["subscribers"]
            assert sub["pid"] == subscriber.pid and sub["alive"] and sub["latency"] == latency_name
            assert sub["latency_ns"]["count"] > 0
            assert 0 < sub["latency_ns"]["p50"] <= sub["latency_ns"]["p99"] <= sub["latency_ns"]["max"]
            (rec,) = [r for r in view["recorders"] if r["name"] == recorder_name]
            assert rec["latency_ns"]["count"] == 3 and rec["latency_ns"]["max"] == 3_000

            producer.join(60)
            assert consumed.wait(30)
            Path(stop).touch()
            pw.wait_for_file(published_file)
            pw.wait_for_file(received_file)
            published, received = int(Path(published_file).read_text()), int(Path(received_file).read_text())
            assert published == received > 0
            pw.settle(bus)
            view = top_json("--interval", "0.1", bus)  # (only the bus)
            assert view["queues"] == [] and len(view["buses"]) == 1
            (b,) = view["buses"]
            assert b["messages"] == published and b["messages_per_s"] == 0
            (sub,) = b["subscribers"]
            assert sub["received"] == received and sub["lag"] == 0
            assert sub["latency_ns"]["count"] == received  # every message recorded once
            text = run_cli("stat", bus, "--interval", "0").stdout
            assert f"received {received:,}" in text and "latency p50 " in text
            Path(received_file).unlink()  # (lets the subscriber go)
            subscriber.join(60)
            assert subscriber.exitcode == 0 and publisher.exitcode == 0 and producer.exitcode == 0
        assert not os.path.exists(f"/dev/shm/shmq.lat.{latency_name}")  # gone with its subscriber
        row = top_json("--interval", "0.1", queue_name)["queues"][0]
        assert row["messages_put"] == row["messages_got"] == sent and row["put_per_s"] == 0
    finally:
        Path(stop).touch()
        Path(received_file).unlink(missing_ok=True)
        if consumer.is_alive():
            consumer.join(30)
        w.stop_all([producer, publisher, subscriber])
        q.close()
        q.unlink()
        recorder.__exit__(None, None, None)


def test_top_json_without_once_streams_a_line_per_refresh() -> None:
    name = unique_name("tops")
    with shmq.Queue(name, create=True) as q:
        try:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            args = [sys.executable, "-m", "shmq.cli", "top", "--json", "--interval", "0.1", name]
            with subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env) as top:
                assert top.stdout is not None
                first = json.loads(top.stdout.readline())
                q.put(b"x")
                second = json.loads(top.stdout.readline())
                while second["queues"][0]["messages_put"] == 0:  # (the put raced the read)
                    second = json.loads(top.stdout.readline())
                top.send_signal(signal.SIGTERM)
                assert top.wait(30) == 0
            assert first["queues"][0]["messages_put"] == 0 and second["queues"][0]["messages_put"] == 1
        finally:
            q.unlink()


def test_the_live_view_wants_a_terminal() -> None:
    result = run_cli("top")
    assert result.returncode == 2 and "needs a terminal" in result.stderr


def test_top_of_nothing_says_so() -> None:
    result = run_cli("top", "--once", "--interval", "0.1", unique_name("none"))
    assert result.returncode == 1  # (as `shmq stat`: nothing to watch is a failure, not bad usage)
    assert "no queue or bus named" in result.stderr


# -- the live view in a real terminal ------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket) running one command in a 200x50 window."""

    def __init__(self, command: str) -> None:
        self.socket = unique_name("tmux")
        self._run("new-session", "-d", "-s", "top", "-x", "200", "-y", "50", "-c", str(ROOT), command)

    def _run(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", "top")

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", "top", *keys)

    def wait_for(self, predicate: Any, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            assert time.monotonic() < deadline, f"the screen never showed what was expected:\n{screen}"
            time.sleep(0.05)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def queue_depth(screen: str, name: str) -> int | None:
    """The depth column of queue `name`'s row in the view, if it shows one."""
    for line in screen.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 8 and cells[1] == name:
            return int(cells[7].replace(",", ""))
    return None


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt install tmux)")
def test_the_live_view_renders_refreshes_and_quits_on_q() -> None:
    name = unique_name("topt")
    with shmq.Queue(name, create=True) as q:
        q.put_many([b"x"] * 5)
        command = (
            # (a tmux server started without a terminal may pass COLUMNS=80: the window's own size counts)
            f"env -u COLUMNS -u LINES PYTHONPATH={ROOT} {sys.executable} -m shmq.cli top --interval 0.2; "
            "echo TOP-EXITED-$?; sleep 60"
        )
        terminal = Tmux(command)
        try:
            screen = terminal.wait_for(lambda s: queue_depth(s, name) == 5)
            assert "shmq top" in screen and "(q quits)" in screen
            q.put_many([b"y"] * 7)  # the next refresh shows them, in place
            screen = terminal.wait_for(lambda s: queue_depth(s, name) == 12)
            assert screen.count("shmq top") == 1
            terminal.keys("q")
            screen = terminal.wait_for(lambda s: "TOP-EXITED-" in s, timeout=10)
            assert "TOP-EXITED-0" in screen
        finally:
            terminal.kill()
            q.unlink()
