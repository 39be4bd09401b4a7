"""`shmq router`, `shmq pub`, `shmq sub` (and `shmq ls` on a bus), each run as a real process."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from shmq.cli import header_value
from shmq.testing import list_segments, remove_segment, unique_name

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CLI = [sys.executable, "-m", "shmq.cli"]
WAIT_S = 20.0  # the longest any step may take before the test fails (never reached when all is well)


def run_cli(
    *args: str, input: str | bytes | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the command to completion (killed at the timeout); stdout and stderr as text."""
    data = input.encode() if isinstance(input, str) else input
    result = subprocess.run(
        [*CLI, *args],
        input=data,
        stdin=None if data is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        env=ENV,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    )


class Proc:
    """A CLI process running in the background, its output read line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [*CLI, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        self.lines: dict[str, queue.Queue[str | None]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr))
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str, stream: IO[bytes] | None) -> None:
        assert stream is not None
        for raw in stream:
            line = raw.decode("utf-8").rstrip("\n")
            self.seen[name].append(line)
            self.lines[name].put(line)
        self.lines[name].put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_line(self, stream: str, contains: str, timeout: float = WAIT_S) -> str:
        """The next line of `stream` containing `contains`; fails at the timeout or at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines[stream].get(timeout=max(left, 0.001))
            except queue.Empty:
                pytest.fail(f"no {contains!r} on {stream} within {timeout} s; seen {self.seen}")
            if line is None:
                pytest.fail(
                    f"{stream} ended without {contains!r}; exit {self.popen.poll()}, seen {self.seen}"
                )
            if contains in line:
                return line

    def finish(self, timeout: float = WAIT_S) -> tuple[int, list[str], list[str]]:
        """Wait for the exit: (exit code, stdout lines, stderr lines)."""
        code = self.popen.wait(timeout)
        for reader in self.readers:
            reader.join(timeout)
        return code, self.seen["stdout"], self.seen["stderr"]

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Proc]]:
    """Start CLI processes; every one still running after the test is stopped (SIGTERM, then SIGKILL)."""
    procs: list[Proc] = []

    def start(*args: str) -> Proc:
        proc = Proc(*args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.popen.poll() is None:
            proc.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
        proc.kill()


def bus_segments(bus: str) -> list[str]:
    """The bus segment and the client rings of `bus` left in /dev/shm."""
    return [n for n in list_segments(f"bus.{bus}") if n == f"bus.{bus}" or n.startswith(f"bus.{bus}.")]


@pytest.fixture
def bus() -> Iterator[str]:
    """A unique bus name; whatever segments of it a failed test left are removed afterwards."""
    name = unique_name("cli")
    yield name
    for segment in bus_segments(name):
        remove_segment(segment)


def start_router(spawn: Callable[..., Proc], bus: str, *options: str) -> Proc:
    router = spawn("router", bus, *options)
    line = router.wait_line("stdout", "serving")
    assert line == f"shmq router: serving bus {bus!r} (pid {router.pid}); Ctrl-C to stop"
    return router


def start_sub(spawn: Callable[..., Proc], bus: str, *args: str) -> Proc:
    """`shmq sub -v ...`, returned once it is subscribed (so what is published next reaches it)."""
    sub = spawn("sub", bus, *args, "-v")
    sub.wait_line("stderr", "shmq sub: subscribed to")
    return sub


def received(sub: Proc) -> list[dict[str, Any]]:
    """The JSON lines of a finished `sub --json`, with the timing fields checked and removed."""
    code, out, err = sub.finish()
    assert code == 0, err
    rows = [json.loads(line) for line in out]
    now = time.monotonic_ns()
    for row in rows:
        timestamp, latency = row.pop("timestamp_ns"), row.pop("latency_ns")
        assert isinstance(timestamp, int) and 0 < timestamp < now
        assert isinstance(latency, int) and 0 <= latency < WAIT_S * 1e9
    return rows


def stop(proc: Proc, signum: int = signal.SIGTERM) -> tuple[int, list[str], list[str]]:
    proc.signal(signum)
    return proc.finish()


# -- router ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_router_stops_cleanly_on_a_signal(spawn: Callable[..., Proc], bus: str, signum: int) -> None:
    """The router prints its ready line, serves, and on SIGTERM/SIGINT exits 0 leaving no segment."""
    router = start_router(spawn, bus)
    assert bus_segments(bus) == [f"bus.{bus}"]
    code, out, err = stop(router, signum)
    assert code == 0, err
    assert out == [
        f"shmq router: serving bus {bus!r} (pid {router.pid}); Ctrl-C to stop",
        f"shmq router: stopped serving bus {bus!r}",
    ]
    assert err == []
    assert bus_segments(bus) == []


def test_router_stopped_while_clients_are_attached_leaves_nothing(
    spawn: Callable[..., Proc], bus: str
) -> None:
    """Stopping the router under a live subscriber: exit 0; the subscriber then ends cleanly too."""
    router = start_router(spawn, bus)
    sub = start_sub(spawn, bus, "t.>")
    assert stop(router)[0] == 0
    left = bus_segments(bus)
    assert len(left) == 1 and left[0].startswith(f"bus.{bus}.s."), left  # only the sub's own ring
    code, _, err = stop(sub, signal.SIGINT)
    assert code == 0, err
    assert bus_segments(bus) == []


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3])
def test_router_signalled_during_start_up_leaves_nothing(bus: str, delay: float) -> None:
    """SIGTERM at any moment of start-up: the process ends (exit 0 once it got going) and no segment
    of the bus is left behind."""
    proc = Proc("router", bus)
    try:
        time.sleep(delay)
        proc.signal(signal.SIGTERM)
        code, _, err = proc.finish()
        assert code in (0, -signal.SIGTERM), err
        assert "Traceback" not in "\n".join(err)
        assert bus_segments(bus) == []
    finally:
        proc.kill()


def test_second_router_is_refused(spawn: Callable[..., Proc], bus: str) -> None:
    """A second router on a live bus exits 1 naming the running one; the first keeps serving."""
    router = start_router(spawn, bus)
    second = run_cli("router", bus)
    assert second.returncode == 1
    assert second.stdout == ""
    assert second.stderr == (
        f"shmq router: a router is already running on bus {bus!r} (pid {router.pid}); stop it first "
        "(Ctrl-C, or kill its pid), or pick another bus name\n"
    )
    sub = start_sub(spawn, bus, "t", "--count", "1", "--json")
    assert run_cli("pub", bus, "t", "still served").returncode == 0
    assert [r["data"] for r in received(sub)] == ["still served"]
    assert stop(router)[0] == 0
    assert bus_segments(bus) == []


def test_router_verbose_logs_clients(spawn: Callable[..., Proc], bus: str) -> None:
    """-v logs subscribers and publishers arriving and leaving on stderr."""
    router = start_router(spawn, bus, "-v", "--wait", "block", "--max-publishers", "4", "--no-last-value")
    sub = start_sub(spawn, bus, "t", "--count", "1")
    assert run_cli("pub", bus, "t", "x").returncode == 0
    assert sub.finish()[0] == 0
    router.wait_line("stderr", "subscriber 1 left")
    code, _, err = stop(router)
    assert code == 0
    text = "\n".join(err)
    assert re.search(rf"shmq\.router: bus {re.escape(repr(bus))}: subscriber 1 \(pid {sub.pid}\)", text), text
    assert "publisher 2 (pid" in text and "attached" in text, text


def test_router_rejects_bad_options(bus: str) -> None:
    assert run_cli("router", bus, "--wait", "sometimes").returncode == 2
    assert run_cli("router", bus, "--max-topics", "0").returncode == 2
    bad = run_cli("router", "has space")
    assert bad.returncode == 2 and bad.stderr.startswith("shmq router: bus name 'has space' contains"), bad
    assert "Traceback" not in bad.stderr


# -- pub and sub -------------------------------------------------------------------------------------


def test_pub_message_and_stdin_lines_reach_sub_as_json(spawn: Callable[..., Proc], bus: str) -> None:
    """A message argument, --count, and stdin lines (LF, CRLF, empty, unterminated) arrive in order."""
    start_router(spawn, bus)
    sub = start_sub(spawn, bus, "md.>", "--count", "7", "--json")
    first = run_cli("pub", bus, "md.a", "héllo wörld", "--count", "2", "-v")
    assert (first.returncode, first.stdout, first.stderr) == (0, "1\n2\n", "")
    lines = run_cli("pub", bus, "md.b", input=b"one\ntwo\r\n\nlast without newline")
    assert (lines.returncode, lines.stdout, lines.stderr) == (0, "", "")
    dash = run_cli("pub", bus, "md.a", "-", "-v", input=b"from dash\n")
    assert (dash.returncode, dash.stdout) == (0, "1\n")  # a new publisher numbers from 1

    def row(topic: str, seq: int, data: str) -> dict[str, Any]:
        return {"topic": topic, "seq": seq, "headers": {}, "data": data}

    assert received(sub) == [
        row("md.a", 1, "héllo wörld"),
        row("md.a", 2, "héllo wörld"),
        row("md.b", 1, "one"),
        row("md.b", 2, "two"),
        row("md.b", 3, ""),
        row("md.b", 4, "last without newline"),
        row("md.a", 1, "from dash"),
    ]


def test_headers_are_typed_and_where_selects_by_them(spawn: Callable[..., Proc], bus: str) -> None:
    """-H values become int/float/bool/str, --header-str keeps a str, and --where filters on them."""
    start_router(spawn, bus)
    everything = start_sub(spawn, bus, "o.*", "--count", "3", "--json")
    xnas = start_sub(spawn, bus, "o.*", "--count", "2", "--json", "--where", "venue == 'XNAS' and qty >= 100")
    typed = ["-H", "qty=100", "-H", "px=1.5", "-H", "live=TRUE", "-H", "neg=-7", "--header-str", "id=007"]
    for topic, venue, qty in (("o.a", "XNAS", "100"), ("o.b", "ARCX", "500"), ("o.c", "XNAS", "250")):
        result = run_cli(
            "pub", bus, topic, f"{venue} {qty}", "-H", f"venue={venue}", *typed, "-H", f"qty={qty}"
        )
        assert result.returncode == 0, result.stderr

    def headers(venue: str, qty: int) -> dict[str, Any]:
        return {"qty": qty, "px": 1.5, "live": True, "neg": -7, "id": "007", "venue": venue}

    assert received(everything) == [
        {"topic": "o.a", "seq": 1, "headers": headers("XNAS", 100), "data": "XNAS 100"},
        {"topic": "o.b", "seq": 1, "headers": headers("ARCX", 500), "data": "ARCX 500"},
        {"topic": "o.c", "seq": 1, "headers": headers("XNAS", 250), "data": "XNAS 250"},
    ]
    assert [(r["topic"], r["data"]) for r in received(xnas)] == [("o.a", "XNAS 100"), ("o.c", "XNAS 250")]


def test_text_output_and_binary_payloads(spawn: Callable[..., Proc], bus: str) -> None:
    """Text lines show topic, seq, latency in µs, headers and the payload (a bytes literal if binary);
    --json gives binary payloads as base64."""
    start_router(spawn, bus)
    text = start_sub(spawn, bus, "t.*", "--count", "3")
    as_json = start_sub(spawn, bus, "t.*", "--count", "3", "--json")
    assert run_cli("pub", bus, "t.a", "plain words").returncode == 0
    assert run_cli("pub", bus, "t.b", "-H", "k=v", input=b"\xff\x00bin\n").returncode == 0
    assert run_cli("pub", bus, "t.c", "tab\there").returncode == 0
    code, out, err = text.finish()
    assert code == 0, err
    latency = r"latency=\d+\.\dµs"
    assert re.fullmatch(rf"t\.a seq=1 {latency} plain words", out[0]), out
    assert re.fullmatch(rf't\.b seq=1 {latency} \{{"k": "v"\}} b\'\\xff\\x00bin\'', out[1]), out
    assert re.fullmatch(rf"t\.c seq=1 {latency} tab\there", out[2]), out
    assert len(out) == 3
    rows = received(as_json)
    assert rows[1] == {
        "topic": "t.b",
        "seq": 1,
        "headers": {"k": "v"},
        "data": "/wBiaW4=",
        "encoding": "base64",
    }


def test_sub_lines_arrive_live(spawn: Callable[..., Proc], bus: str) -> None:
    """Each message is printed (and flushed into the pipe) as it arrives, not when sub exits."""
    start_router(spawn, bus)
    sub = start_sub(spawn, bus, "live")
    for n in range(3):
        assert run_cli("pub", bus, "live", f"m{n}").returncode == 0
        assert sub.wait_line("stdout", f"m{n}").endswith(f" m{n}")
    code, out, err = stop(sub, signal.SIGINT)
    assert code == 0, err
    assert len(out) == 3
    assert err[-1] == "shmq sub: received 3, dropped 0 (router's count)"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sub_signal_exits_0_and_removes_its_ring(spawn: Callable[..., Proc], bus: str, signum: int) -> None:
    router = start_router(spawn, bus)
    sub = start_sub(spawn, bus, "x.>")
    assert len(bus_segments(bus)) == 2  # the bus and the subscriber's ring
    code, out, err = stop(sub, signum)
    assert (code, out) == (0, []), err
    assert stop(router)[0] == 0
    assert bus_segments(bus) == []


def test_sub_timeout(spawn: Callable[..., Proc], bus: str) -> None:
    """--timeout without --count ends quietly (exit 0); before --count is reached it is exit 1."""
    start_router(spawn, bus)
    quiet = run_cli("sub", bus, "nothing.here", "--timeout", "0.3")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    assert run_cli("pub", bus, "one", "only").returncode == 0
    short = run_cli("sub", bus, "one", "--last-value", "--count", "2", "--timeout", "0.5", "--json")
    assert short.returncode == 1
    assert [json.loads(line)["data"] for line in short.stdout.splitlines()] == ["only"]
    assert short.stderr == "shmq sub: no message for 0.5 s; got 1 of 2\n"


def test_last_value(spawn: Callable[..., Proc], bus: str) -> None:
    """--last-value first delivers the newest message of each matching topic, marked as such."""
    start_router(spawn, bus)
    assert run_cli("pub", bus, "px.a", "-", input="1\n2\n3\n").returncode == 0
    assert run_cli("pub", bus, "px.b", "b1").returncode == 0
    result = run_cli("sub", bus, "px.*", "--last-value", "--count", "2", "--json")
    assert result.returncode == 0, result.stderr
    rows = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda r: r["topic"])
    assert [(r["topic"], r["seq"], r["data"], r.get("last_value")) for r in rows] == [
        ("px.a", 3, "3", True),
        ("px.b", 1, "b1", True),
    ]
    text = run_cli("sub", bus, "px.b", "--last-value", "--count", "1")
    assert re.fullmatch(r"px\.b seq=1 latency=\d+\.\dµs last-value b1\n", text.stdout), text


def test_group_members_share_the_messages(spawn: Callable[..., Proc], bus: str) -> None:
    """Two members of a --group get every message exactly once between them."""
    start_router(spawn, bus)
    members = [start_sub(spawn, bus, "jobs", "--group", "workers", "--json") for _ in range(2)]
    assert run_cli("pub", bus, "jobs", "-", input="".join(f"{n}\n" for n in range(20))).returncode == 0
    deadline = time.monotonic() + WAIT_S
    while sum(len(m.seen["stdout"]) for m in members) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    for member in members:
        member.signal(signal.SIGINT)
    seqs = sorted(row["seq"] for member in members for row in received(member))
    assert seqs == list(range(1, 21))


def test_ls_shows_the_bus(spawn: Callable[..., Proc], bus: str) -> None:
    """ls knows a bus segment: kind bus, the router's pid and liveness, publishers and subscribers."""
    router = start_router(spawn, bus)
    start_sub(spawn, bus, "a")
    start_sub(spawn, bus, "b")
    assert run_cli("pub", bus, "a", "x").returncode == 0
    deadline = time.monotonic() + WAIT_S
    while True:  # the router forgets a publisher that left at its next housekeeping (100 ms)
        listing = run_cli("ls", "--json")
        assert listing.returncode == 0, listing.stderr
        rows = {r["name"]: r for r in map(json.loads, listing.stdout.splitlines())}
        row = rows[f"bus.{bus}"]
        if row["publishers"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (row["kind"], row["valid"], row["problem"], row["bus"]) == ("bus", True, "", bus)
    assert (row["router_pid"], row["router_alive"], row["creator_pid"], row["creator_alive"]) == (
        router.pid,
        True,
        router.pid,
        True,
    )
    assert (row["publishers"], row["subscribers"], row["topics"], row["messages"]) == (0, 2, 1, 1)
    rings = [r for name, r in rows.items() if name.startswith(f"bus.{bus}.s.")]
    assert len(rings) == 2 and all(r["kind"] == "spsc" and r["valid"] for r in rings)
    text = run_cli("ls").stdout
    line = next(line for line in text.splitlines() if line.startswith(f"bus.{bus} "))
    assert re.search(rf"\bbus\s+-\s+\d+\s+{router.pid} yes ", line), line
    assert f"(router of bus {bus!r}: 0 publishers, 2 subscribers, 1 topics, 1 messages)" in line, line
    assert "BAD" not in line


def test_ls_shows_a_dead_router_and_a_new_router_takes_over(spawn: Callable[..., Proc], bus: str) -> None:
    """After a router is SIGKILLed, ls says so; the next `shmq router` replaces the stale segment."""
    router = start_router(spawn, bus)
    router.kill()
    row = next(
        r for r in map(json.loads, run_cli("ls", "--json").stdout.splitlines()) if r["name"] == f"bus.{bus}"
    )
    assert (row["kind"], row["router_alive"], row["router_pid"]) == ("bus", False, router.pid)
    assert "router is gone" in row["problem"]
    again = start_router(spawn, bus)
    sub = start_sub(spawn, bus, "t", "--count", "1", "--json")
    assert run_cli("pub", bus, "t", "after restart").returncode == 0
    assert [r["data"] for r in received(sub)] == ["after restart"]
    code, _, err = stop(again)
    assert code == 0
    assert any("replacing the bus segment left by router pid" in line for line in err), err
    assert bus_segments(bus) == []


# -- failures ----------------------------------------------------------------------------------------


def test_no_router(bus: str) -> None:
    """pub and sub without a router: exit 1 with one line saying how to start one, soon, nothing left."""
    start = time.monotonic()
    pub = run_cli("pub", bus, "t", "lost")
    assert time.monotonic() - start < 10  # the default --connect-timeout is 2 s
    sub = run_cli("sub", bus, "t", "--connect-timeout", "0.2")
    for result, command in ((pub, "pub"), (sub, "sub")):
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr == (
            f"shmq {command}: no router is serving bus {bus!r}; start one with `shmq router {bus}` "
            f"or shmq.Router({bus!r}).start()\n"
        )
    assert bus_segments(bus) == []


def test_bad_topic_pattern_and_filter(bus: str) -> None:
    """Bad input exits 2 with the reason (a filter's with its caret line) before looking for a router."""
    topic = run_cli("pub", bus, "md..x", "m")
    assert topic.returncode == 2 and topic.stderr.startswith("shmq pub: ") and "md..x" in topic.stderr, topic
    assert len(topic.stderr.splitlines()) == 1
    wildcard = run_cli("pub", bus, "md.*", "m")
    assert wildcard.returncode == 2 and "md.*" in wildcard.stderr, wildcard
    pattern = run_cli("sub", bus, "md.>.x")
    assert pattern.returncode == 2 and pattern.stderr.startswith("shmq sub: bad pattern: "), pattern
    where = run_cli("sub", bus, "md.>", "--where", "venue == and price > 1")
    assert where.returncode == 2
    assert where.stderr == (
        "shmq sub: bad --where filter: unexpected 'and' at position 9: expected a literal\n"
        "  venue == and price > 1\n"
        "           ^\n"
    )
    for result in (topic, wildcard, pattern, where):
        assert result.stdout == "" and "Traceback" not in result.stderr
    assert bus_segments(bus) == []


def test_bad_arguments(bus: str) -> None:
    header = run_cli("pub", bus, "t", "m", "-H", "novalue")
    assert (header.returncode, header.stderr) == (2, "shmq pub: bad header: 'novalue' is not KEY=VALUE\n")
    huge = run_cli("pub", bus, "t", "m", "-H", f"n={1 << 64}")
    assert huge.returncode == 2 and "64-bit" in huge.stderr, huge
    controller, terminal = pty.openpty()
    try:  # no MESSAGE, and stdin a terminal: say what is missing rather than wait for typing
        no_message = subprocess.run(
            [*CLI, "pub", bus, "t"], stdin=terminal, capture_output=True, text=True, timeout=30, env=ENV
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert (no_message.returncode, no_message.stderr) == (
        2,
        "shmq pub: give a MESSAGE, or - to publish each line of stdin\n",
    )
    conflate_group = run_cli("sub", bus, "t", "--group", "g", "--on-full", "conflate")
    assert conflate_group.returncode == 2 and "cannot be used with group=" in conflate_group.stderr
    assert run_cli("sub", bus).returncode == 2  # a pattern is required
    assert run_cli("sub", bus, "t", "--count", "0").returncode == 2
    assert bus_segments(bus) == []


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-7", -7),
        ("007", 7),
        ("1.5", 1.5),
        ("2e-3", 2e-3),
        ("true", True),
        ("False", False),
        ("XNAS", "XNAS"),
        ("", ""),
        ("1_000", "1_000"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("1e999", "1e999"),
        (" 1", " 1"),
        ("+1", "+1"),
        ("١٢", "١٢"),  # Arabic-Indic digits: not a number to where= either
        ("a=b", "a=b"),
    ],
)
def test_header_values(text: str, value: object) -> None:
    """--header values read as where= literals do: int, float, bool, else the text unchanged."""
    parsed = header_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_pub_streams_stdin_lines_as_they_come(spawn: Callable[..., Proc], bus: str) -> None:
    """`tail -f log | shmq pub BUS T`: each line is published as it arrives, not at EOF; Ctrl-C then
    exits 130 once what was published is routed."""
    start_router(spawn, bus)
    sub = start_sub(spawn, bus, "log", "--json")
    pub = subprocess.Popen(
        [*CLI, "pub", bus, "log", "-v"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV
    )
    try:
        assert pub.stdin is not None and pub.stdout is not None
        for n in range(1, 4):
            pub.stdin.write(f"line {n}\n".encode())
            pub.stdin.flush()
            assert pub.stdout.readline() == f"{n}\n".encode()  # -v: published, stdin still open
            assert json.loads(sub.wait_line("stdout", f"line {n}"))["seq"] == n
        pub.send_signal(signal.SIGINT)
        assert pub.wait(WAIT_S) == 130
    finally:
        if pub.poll() is None:
            pub.kill()
        pub.wait(10)
        for stream in (pub.stdin, pub.stdout):
            if stream is not None:
                stream.close()
    assert stop(sub, signal.SIGTERM)[0] == 0
    assert [n for n in bus_segments(bus) if ".p." in n] == []
