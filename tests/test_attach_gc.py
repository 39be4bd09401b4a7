"""Who is attached to a ring, `shmq ls` showing it, `shmq gc`, and `Queue(create=True)` over a
name that dead processes left behind. Participants are real processes, killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmq
from shmq import _attach
from shmq._native import _ring
from shmq._segment import abandoned, read_info, segment_path
from shmq.testing import list_segments, remove_segment, unique_name
from tests.test_cli import listed, run_cli

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
WAIT_S = 20.0

pytestmark = pytest.mark.timeout(120)


class Holders:
    """Child processes that run `code`, say "ready" on stdout, then wait to be killed."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, code: str) -> subprocess.Popen[str]:
        script = code + "\nimport sys, time\nprint('ready', flush=True)\ntime.sleep(3600)\n"
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # (bounded by the test's timeout)
        assert line.strip() == "ready", f"child exited with {proc.wait(timeout=WAIT_S)}"
        return proc

    def kill(self, proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None or (proc.stdout is not None and not proc.stdout.closed):
                self.kill(proc)


@pytest.fixture
def holders() -> Iterator[Holders]:
    made = Holders()
    try:
        yield made
    finally:
        made.close()


def entries(q: shmq.Queue) -> list[_attach.Attachment]:
    return _attach.attachments(q._segment.mapping)


def test_the_table_names_every_participant_and_sees_them_die(name: str, holders: Holders) -> None:
    with shmq.Queue(name, create=True, capacity=4096) as q:
        child = holders.start(f"import shmq; q = shmq.Queue({name!r})")
        assert sorted((a.pid, a.role, a.alive) for a in entries(q)) == sorted(
            [(os.getpid(), "creator", True), (child.pid, "user", True)]
        )
        row = listed(name)
        assert [(a["pid"], a["alive"]) for a in row["attached"]] == [(os.getpid(), True), (child.pid, True)]
        assert "2/2" in run_cli("ls").stdout
        holders.kill(child)
        assert [(a.pid, a.alive) for a in entries(q)] == [(os.getpid(), True), (child.pid, False)]
        assert "1/2" in run_cli("ls").stdout
        assert abandoned(read_info(name)) == "", "its creator still uses it"


def test_a_closed_handle_leaves_the_table(name: str) -> None:
    with shmq.Queue(name, create=True, capacity=4096) as q:
        other = shmq.Queue(name)
        assert len(entries(q)) == 2
        other.close()
        other.close()  # (idempotent: it must not free someone else's entry)
        assert [a.role for a in entries(q)] == ["creator"]


def test_a_reused_pid_is_not_taken_for_the_process_that_attached(name: str) -> None:
    """An entry whose pid runs but whose start time is another one's reads as dead."""
    with shmq.Queue(name, create=True, capacity=4096) as q:
        me = _attach.identity(os.getpid())
        assert me is not None
        impostor = me + (1 << 22)  # the same pid, started one clock tick later
        assert _ring.attach_claim(q._segment.mapping, impostor, _attach.ROLE_USER, 0) >= 0
        assert sorted(a.alive for a in entries(q)) == [False, True]
        assert _attach.free_dead_entries(q._segment.mapping) == 1
        assert [a.role for a in entries(q)] == ["creator"]


def test_a_forked_child_is_a_participant_of_its_own(name: str) -> None:
    with shmq.Queue(name, create=True, capacity=4096) as q:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what the table says, then leave without cleanup
            pids = sorted(a.pid for a in entries(q))
            os.write(write, json.dumps(pids).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            seen = json.loads(f.read())
        os.waitpid(pid, 0)
        assert seen == sorted([os.getpid(), pid])
        assert [(a.pid, a.alive) for a in entries(q)] == [(os.getpid(), True), (pid, False)]


def test_a_full_table_frees_dead_entries_then_counts_untracked(name: str) -> None:
    with shmq.Queue(name, create=True, capacity=4096) as q:
        me = _attach.identity(os.getpid())
        assert me is not None
        dead = [me + (k << 22) for k in range(1, _ring.ATTACH_SLOTS)]  # pids "reused": all dead
        for owner in dead:
            assert _ring.attach_claim(q._segment.mapping, owner, _attach.ROLE_USER, 0) >= 0
        assert _ring.attach_claim(q._segment.mapping, me, _attach.ROLE_USER, 0) == -1  # full
        with shmq.Queue(name) as other:  # frees the dead entries and takes one
            assert sorted(a.alive for a in entries(other)) == [True, True]
        # Now fill it with live entries (this process's own identity, many times over).
        while _ring.attach_claim(q._segment.mapping, me, _attach.ROLE_USER, 0) >= 0:
            pass
        extra = shmq.Queue(name)
        try:
            assert _attach.untracked(q._segment.mapping) == 1
            row = listed(name)
            assert row["untracked"] == 1
        finally:
            extra.close()
        assert _attach.untracked(q._segment.mapping) == 0


def test_gc_removes_what_only_dead_processes_used_and_keeps_the_rest(holders: Holders) -> None:
    dead, in_use, creator_alive = unique_name(), unique_name(), unique_name()
    try:
        victim = holders.start(f"import shmq; shmq.Queue({dead!r}, create=True, capacity=4096)")
        holders.kill(victim)
        user = holders.start(
            f"import shmq; shmq.Queue({in_use!r}, create=True, capacity=4096); q = shmq.Queue({in_use!r})"
        )
        assert user.pid
        # closed, not unlinked: its creator (this process) may come back to it
        shmq.Queue(creator_alive, create=True, capacity=4096).close()
        names = (dead, in_use, creator_alive)  # (gc only these: others' segments are not ours to judge)
        dry = run_cli("gc", *names)
        assert dry.returncode == 0, dry.stderr
        assert f"would remove {dead}: every process that used it is gone (pid {victim.pid})" in dry.stdout
        assert in_use not in dry.stdout and creator_alive not in dry.stdout
        assert dead in list_segments(), "a dry run removed something"
        done = run_cli("gc", "--yes", *names)
        assert f"removed {dead}" in done.stdout
        assert dead not in list_segments()
        assert {in_use, creator_alive} <= set(list_segments())
        holders.kill(user)  # the creator and the attacher both gone now
        assert f"removed {in_use}" in run_cli("gc", "--yes", *names).stdout
    finally:
        for n in (dead, in_use, creator_alive):
            remove_segment(n)


def test_a_name_left_by_a_killed_creator_can_be_created_again(
    name: str, holders: Holders, caplog: pytest.LogCaptureFixture
) -> None:
    victim = holders.start(
        f"import shmq; q = shmq.Queue({name!r}, create=True, capacity=4096); q.put(b'stale', timeout=1)"
    )
    holders.kill(victim)
    with shmq.Queue(name, create=True, capacity=8192) as q:
        assert q.capacity == 8192 and q.qsize() == 0
    assert any("replaced the segment left behind" in r.getMessage() for r in caplog.records)


def test_a_name_in_use_is_not_replaced(name: str, holders: Holders) -> None:
    user = holders.start(f"import shmq; q = shmq.Queue({name!r}, create=True, capacity=4096)")
    assert user.pid
    with pytest.raises(shmq.AlreadyExists):
        shmq.Queue(name, create=True, capacity=4096)


def test_two_processes_replacing_the_same_stale_name_make_one_queue(name: str, holders: Holders) -> None:
    victim = holders.start(f"import shmq; shmq.Queue({name!r}, create=True, capacity=4096)")
    holders.kill(victim)
    code = (
        "import sys, shmq\n"
        "try:\n"
        f"    q = shmq.Queue({name!r}, create=True, capacity=4096)\n"
        "except shmq.AlreadyExists:\n"
        "    print('exists', flush=True)\n"
        "else:\n"
        "    print('created', flush=True)\n"
        "sys.stdin.read()\n"  # (alive, holding its queue, until the test has every answer)
    )
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV
        )
        for _ in range(4)
    ]
    try:
        outcomes = sorted(p.stdout.readline().strip() for p in racers if p.stdout is not None)
    finally:
        for p in racers:
            p.communicate(timeout=WAIT_S)
    # One of them replaced the stale segment; the others found that one in use. A racer that
    # removed the queue another had just made would leave it holding a segment nobody can find.
    assert outcomes == ["created", "exists", "exists", "exists"], outcomes


def test_gc_removes_a_client_ring_left_when_router_and_client_both_died(holders: Holders) -> None:
    bus = unique_name("gc")
    router = shmq.Router(bus).start()
    try:
        client = holders.start(f"import shmq; sub = shmq.Subscriber({bus!r}, 'a.>')")
        rings = list_segments(f"bus.{bus}.s.")
        assert len(rings) == 1
        assert router.pid is not None
        os.kill(router.pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while router.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        holders.kill(client)
        result = run_cli("gc", "--yes", f"bus.{bus}*")
        assert f"removed {rings[0]}" in result.stdout, result.stdout + result.stderr
        assert f"removed bus.{bus}:" in result.stdout, result.stdout
        assert list_segments(f"bus.{bus}") == []
    finally:
        router.stop()
        for n in list_segments(f"bus.{bus}"):
            remove_segment(n)


def test_mode_lets_other_users_in_deliberately_and_only_then(name: str) -> None:
    with shmq.Queue(name, create=True, capacity=4096) as q:
        assert os.stat(segment_path(name)).st_mode & 0o777 == 0o600
    old = os.umask(0o077)  # (a umask must not narrow what the caller asked for)
    try:
        with shmq.Queue(name, create=True, capacity=4096, mode=0o660) as q:
            assert os.stat(segment_path(name)).st_mode & 0o777 == 0o660
            q.put(b"x", timeout=1)
    finally:
        os.umask(old)
    for bad in (0o400, 0o777, -1, "0660"):
        with pytest.raises(shmq.InvalidArgument):
            shmq.Queue(name, create=True, capacity=4096, mode=bad)  # type: ignore[arg-type]
