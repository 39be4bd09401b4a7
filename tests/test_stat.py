"""`shmq stat NAME`: one queue or bus, read while traffic flows from other processes; the values
must agree with what was sent (counts only grow, rates are positive while producers run and
bounded by what they sent, the participants listed are the live ones)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

import shmq
from shmq.testing import unique_name
from tests import _pubsub_workers as pw
from tests import _workers as w
from tests.conftest import CTX
from tests.test_cli import run_cli

pytestmark = pytest.mark.timeout(120)


def publish_until(bus: str, stop: str) -> None:
    """Publish small messages at a modest pace until `stop` exists."""
    with shmq.Publisher(bus) as pub:
        n = 0
        while not os.path.exists(stop):
            pub.publish("st.x", n.to_bytes(4, "little"), timeout=30)
            n += 1
            if n % 50 == 0:
                time.sleep(0.005)


def stat(name: str, *extra: str) -> dict[str, object]:
    result = run_cli("stat", name, "--json", *extra)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert isinstance(row, dict)
    return row


def test_stat_of_a_queue_with_a_producer_running(name: str) -> None:
    q = shmq.Queue(name, create=True, kind="mpsc", capacity=1 << 20, wait="block")
    producer = CTX.Process(target=w.paced_producer, args=(name, "block", 0, 100_000, 100, 0.01))
    stop = threading.Event()

    def consume() -> None:  # (so the producer never waits on a full ring)
        while not stop.is_set():
            q.get_many(1024, timeout=0.05)

    consumer = threading.Thread(target=consume)
    try:
        producer.start()
        consumer.start()
        assert w.wait_until(lambda: q.stats().messages_got > 0, 30)
        row = stat(name, "--interval", "0.5")
        assert row["type"] == "queue" and row["kind"] == "mpsc" and row["capacity"] == 1 << 20
        assert 0 < row["messages_got"] <= row["messages_put"] <= 100_000
        assert row["put_per_s"] > 0 and row["got_per_s"] > 0
        assert row["put_per_s"] * row["interval_s"] <= row["messages_put"]  # a rate of what was sent
        assert row["fill_pct"] == pytest.approx(100 * row["depth_bytes"] / row["capacity"], abs=0.01)
        assert {"pid": producer.pid, "role": "user", "alive": True} in row["attached"]
        assert row["creator_pid"] == os.getpid() and row["creator_alive"] is True
        text = run_cli("stat", name, "--interval", "0")
        assert text.returncode == 0 and f"queue {name} (mpsc, 1,048,576 bytes)" in text.stdout
    finally:
        stop.set()
        if consumer.is_alive():
            consumer.join(10)
        w.stop_all([producer])
        q.close()


def test_stat_of_a_bus_with_a_publisher_and_a_subscriber(tmp_path: Path) -> None:
    bus = unique_name("st")
    stop = str(tmp_path / "stop")
    with pw.no_leaks(bus), shmq.Router(bus), shmq.Subscriber(bus, "st.>") as sub:
        publisher = CTX.Process(target=publish_until, args=(bus, stop))
        try:
            publisher.start()
            sub.recv(timeout=30)
            row = stat(bus, "--interval", "0.5")
            assert row["type"] == "bus" and row["router_alive"] is True
            assert row["messages"] > 0 and row["messages_per_s"] > 0
            (pub,) = [p for p in row["publishers"] if p["pid"] == publisher.pid]  # type: ignore[union-attr]
            assert pub["state"] == "live" and pub["published_per_s"] > 0
            (mine,) = row["subscribers"]  # type: ignore[misc]
            assert mine["pid"] == os.getpid() and mine["patterns"] == ["st.>"]
            text = run_cli("stat", bus, "--interval", "0")
            assert text.returncode == 0 and f"bus {bus}: router pid" in text.stdout
            assert f"pid {publisher.pid} live" in text.stdout
        finally:
            Path(stop).touch()
            publisher.join(30)
            w.stop_all([publisher])
        while True:  # (drain, so the publisher's last messages do not wait on a full ring)
            try:
                sub.recv(timeout=0.2)
            except shmq.Empty:
                break
        pw.settle(bus)


def test_stat_of_nothing_says_so() -> None:
    result = run_cli("stat", unique_name("none"), "--interval", "0")
    assert result.returncode != 0
    assert "no queue or bus named" in result.stderr
