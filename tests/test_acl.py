"""Security: peer credentials, the default policy, ACL files (shmq/acl.py), segment modes.

Routers are real child processes (shmq.Router spawns one). The second-user tests create a system
user, fork a child of this test process and drop to that user (the interpreter's files under
/root are not readable by it, so it could not start a fresh Python), and remove the user again.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import json
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmq
from shmq import _bus
from shmq.acl import Acl, PeerCredentials, default_admits, pattern_covers, patterns_overlap
from shmq.testing import unique_name
from shmq.topics import matches
from tests import _pubsub_workers as pw
from tests._workers import wait_until

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0  # bound for anything that should happen at once
ROOT = Path(__file__).resolve().parent.parent
ROOT_PEER = PeerCredentials(pid=1, uid=0, gid=0, groups=frozenset({0}))


@pytest.fixture
def bus() -> Iterator[str]:
    name = unique_name("acl")
    with pw.no_leaks(name):
        yield name


def write_acl(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bus.acl"
    path.write_text(text)
    return path


def started(bus: str, **options: Any) -> shmq.Router:
    return shmq.Router(bus, **options).start()


@contextlib.contextmanager
def running(bus: str, **options: Any) -> Iterator[shmq.Router]:
    """A router for the block; stopped (once its clients are gone) however the block ends."""
    router = started(bus, **options)
    try:
        yield router
    finally:
        stop(router)


def stop(router: shmq.Router) -> None:
    pw.settle(router.bus)
    router.stop()


# -- parsing ---------------------------------------------------------------------------------------------


def test_a_good_file_parses_into_rules_in_order() -> None:
    root_group = grp.getgrgid(0).gr_name
    acl = Acl.parse(
        "# who may do what\n"
        "\n"
        "allow publish user:root orders.> md.*.AAPL   # two patterns: two rules\n"
        f"deny  subscribe group:{root_group} orders.secret.>\n"
        "allow any user:4242 >\n"
        "   allow   subscribe   *   >   \n",
        source="test.acl",
    )
    assert [(r.line, r.verdict, r.kind, r.id, r.pattern) for r in acl.rules] == [
        (3, "allow", "user", 0, "orders.>"),
        (3, "allow", "user", 0, "md.*.AAPL"),
        (4, "deny", "group", 0, "orders.secret.>"),
        (5, "allow", "user", 4242, ">"),
        (6, "allow", "*", -1, ">"),
    ]
    assert acl.rules[0].actions == {"publish"}
    assert acl.rules[3].actions == {"publish", "subscribe"}
    assert acl.rules[4].text == "allow subscribe * >"  # comments and extra blanks gone


def test_an_empty_file_denies_everything() -> None:
    acl = Acl.parse("# nothing yet\n")
    assert not acl.check_publish(ROOT_PEER, "a").allowed
    assert not acl.check_subscribe(ROOT_PEER, ">").allowed
    assert not acl.may(ROOT_PEER, "publish")


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("allow publish user:root\n", 1, "VERDICT ACTION WHO PATTERN"),
        ("# ok\nalow publish user:root a\n", 2, "'allow' or 'deny'"),
        ("\n\nallow pub user:root a\n", 3, "'publish', 'subscribe' or 'any'"),
        ("allow publish root a\n", 1, "user:NAME"),
        ("allow publish user: a\n", 1, "user:NAME"),
        ("allow publish team:x a\n", 1, "user:NAME"),
        ("allow publish user:root a\nallow publish user:no-such-user-shmq a\n", 2, "no user named"),
        ("allow publish group:no-such-group-shmq a\n", 1, "no group named"),
        ("allow publish user:root a.>.b\n", 1, "bad pattern 'a.>.b'"),
        ("allow publish user:root a b..c\n", 1, "bad pattern 'b..c'"),
    ],
)
def test_a_bad_file_names_the_line_and_the_problem(text: str, line: int, what: str) -> None:
    with pytest.raises(shmq.InvalidArgument) as info:
        Acl.parse(text, source="bad.acl")
    assert f"bad.acl line {line}:" in str(info.value)
    assert what in str(info.value)


def test_a_missing_file_is_an_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(shmq.InvalidArgument, match="cannot read the ACL file"):
        Acl.load(tmp_path / "missing.acl")


def test_router_checks_its_options_in_the_caller(bus: str, tmp_path: Path) -> None:
    bad = write_acl(tmp_path, "allow publish user:root a\ndeny everything\n")
    with pytest.raises(shmq.InvalidArgument, match="line 2"):
        shmq.Router(bus, acl=bad)
    for mode in (0o700, 0o400, 0o1666, -1, True, "600"):
        with pytest.raises(shmq.InvalidArgument, match="mode"):
            shmq.Router(bus, mode=mode)
        with pytest.raises(shmq.InvalidArgument, match="mode"):
            shmq.Publisher(bus, mode=mode)  # type: ignore[arg-type]
        with pytest.raises(shmq.InvalidArgument, match="mode"):
            shmq.Subscriber(bus, ">", mode=mode)  # type: ignore[arg-type]


# -- pattern coverage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outer", "inner", "covers", "overlap"),
    [
        (">", "a", True, True),
        (">", "a.*.>", True, True),
        ("a.>", "a", False, False),
        ("a.>", "a.b", True, True),
        ("a.>", "a.>", True, True),
        ("a.>", "a.*.c", True, True),
        ("a.*", "a.>", False, True),
        ("a.*", "a.b", True, True),
        ("a.b", "a.*", False, True),
        ("a.*.c", "a.b.*", False, True),
        ("a.b", "a.c", False, False),
        ("a.*", "a.b.c", False, False),
        ("*.>", ">", False, True),  # '>' also matches one-token topics, '*.>' does not
        ("*", ">", False, True),
        ("a.b.>", "a.>", False, True),
    ],
)
def test_pattern_coverage_examples(outer: str, inner: str, covers: bool, overlap: bool) -> None:
    assert pattern_covers(outer, inner) is covers
    assert patterns_overlap(outer, inner) is overlap
    assert patterns_overlap(inner, outer) is overlap


_tokens = st.sampled_from(["a", "b", "*"])


@st.composite
def patterns(draw: Any) -> str:
    tokens = draw(st.lists(_tokens, min_size=0, max_size=3))
    if not tokens or draw(st.booleans()):
        tokens.append(">")
    return ".".join(tokens)


def topics_up_to(length: int) -> list[str]:
    """Every topic of 1..length tokens over a, b and c (c: any token no pattern names)."""
    return [".".join(t) for n in range(1, length + 1) for t in itertools.product("abc", repeat=n)]


_TOPICS = topics_up_to(5)  # longer than any pattern drawn, plus one: enough for a counterexample


@settings(max_examples=400, deadline=None)
@given(patterns(), patterns())
def test_pattern_coverage_agrees_with_matching_every_topic(outer: str, inner: str) -> None:
    inside = [t for t in _TOPICS if matches(inner, t)]
    assert pattern_covers(outer, inner) == all(matches(outer, t) for t in inside)
    assert patterns_overlap(outer, inner) == any(matches(outer, t) for t in inside)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), patterns()), min_size=0, max_size=5), patterns())
def test_an_allowed_subscription_receives_only_allowed_topics(
    rules: list[tuple[bool, str]], pattern: str
) -> None:
    acl = Acl.parse("".join(f"{'allow' if a else 'deny'} any * {p}\n" for a, p in rules))
    if acl.check_subscribe(ROOT_PEER, pattern).allowed:
        for topic in _TOPICS:
            if matches(pattern, topic):
                assert acl.check_publish(ROOT_PEER, topic).allowed, (topic, rules)


@settings(max_examples=200, deadline=None)
@given(st.booleans(), patterns(), patterns())
def test_one_rule_decides_exactly_the_patterns_it_covers(allow: bool, rule: str, pattern: str) -> None:
    acl = Acl.parse(f"{'allow' if allow else 'deny'} subscribe * {rule}\n")
    assert acl.check_subscribe(ROOT_PEER, pattern).allowed == (allow and pattern_covers(rule, pattern))


def test_first_match_wins_for_topics_and_patterns() -> None:
    acl = Acl.parse(
        "allow any user:0 orders.secret.audit\ndeny any user:0 orders.secret.>\nallow any user:0 orders.>\n",
        source="f",
    )
    assert acl.check_publish(ROOT_PEER, "orders.secret.audit").allowed
    decision = acl.check_publish(ROOT_PEER, "orders.secret.keys")
    assert not decision.allowed
    assert decision.rule is not None and decision.rule.line == 2
    assert acl.check_publish(ROOT_PEER, "orders.eu").allowed
    assert acl.check_subscribe(ROOT_PEER, "orders.secret.audit").allowed
    assert acl.check_subscribe(ROOT_PEER, "orders.eu.>").allowed
    refused = acl.check_subscribe(ROOT_PEER, "orders.>")
    assert not refused.allowed and refused.rule is not None and refused.rule.line == 2
    assert "would receive topics that rule denies" in refused.reason


def test_users_and_groups_match_by_kernel_ids() -> None:
    peer = PeerCredentials(pid=5, uid=1234, gid=50, groups=frozenset({50, 60}))
    acl = Acl.parse("allow publish group:60 a\nallow publish user:1234 b\nallow publish group:70 c\n")
    assert acl.check_publish(peer, "a").allowed  # a supplementary group counts
    assert acl.check_publish(peer, "b").allowed
    assert not acl.check_publish(peer, "c").allowed
    assert default_admits(PeerCredentials(1, 0, 0, frozenset()), owner_uid=1000)
    assert default_admits(PeerCredentials(1, 1000, 5, frozenset()), owner_uid=1000)
    assert not default_admits(PeerCredentials(1, 1001, 5, frozenset()), owner_uid=1000)


# -- a router with an ACL ---------------------------------------------------------------------------------


def test_publish_is_checked_per_topic_against_the_rules(bus: str, tmp_path: Path) -> None:
    path = write_acl(
        tmp_path,
        "deny publish user:root orders.secret.>\n"
        "allow publish user:root orders.>\n"
        "allow subscribe user:root >\n",
    )
    with running(bus, acl=path), shmq.Subscriber(bus, ">") as sub, shmq.Publisher(bus) as pub:
        assert pub.publish("orders.eu", b"1") == 1
        with pytest.raises(shmq.PermissionDenied) as denied:
            pub.publish("orders.secret.keys", b"no")
        assert "'orders.secret.keys'" in str(denied.value)
        assert f'{path} line 1: "deny publish user:root orders.secret.>"' in str(denied.value)
        with pytest.raises(shmq.PermissionDenied, match=r"no rule in .* allows") as unmatched:
            pub.publish_many("md.x", [b"no"])
        assert "'md.x'" in str(unmatched.value)
        with pytest.raises(PermissionError):  # the builtin it also is
            pub.publish("orders.secret.keys", b"again")  # refused every time, not only the first
        assert pub.publish("orders.us", b"2") == 1
        assert pub.stats().published == 2  # nothing of the refused ones was written
        got = [sub.recv(timeout=WAIT_S) for _ in range(2)]
        assert [(m.topic, m.data) for m in got] == [("orders.eu", b"1"), ("orders.us", b"2")]


def test_the_router_drops_a_refused_topic_of_a_client_that_skips_the_check(bus: str, tmp_path: Path) -> None:
    path = write_acl(tmp_path, "allow publish user:root ok.>\nallow subscribe user:root >\n")
    with running(bus, acl=path), shmq.Subscriber(bus, ">") as sub, shmq.Publisher(bus) as pub:
        pub._publish_rules = None  # as a client that does not check would
        pub.publish("secret.x", b"refused")
        pub.publish("ok.y", b"allowed")
        # Same publisher, so in order: had the first been routed it would come first.
        first = sub.recv(timeout=WAIT_S)
        assert (first.topic, first.data) == ("ok.y", b"allowed")
        assert [t.topic for t in shmq.bus_stats(bus).topics] == ["ok.y"]
        pub.publish("ok.z", b"still routed")  # the publisher carries on with allowed topics
        assert sub.recv(timeout=WAIT_S).topic == "ok.z"


def test_subscribe_needs_every_pattern_covered(bus: str, tmp_path: Path) -> None:
    path = write_acl(
        tmp_path,
        "deny subscribe user:root orders.secret.>\n"
        "allow subscribe user:root orders.>\n"
        "allow publish user:root >\n",
    )
    with running(bus, acl=path):
        with pytest.raises(shmq.PermissionDenied) as overlap:
            shmq.Subscriber(bus, ["orders.eu", "orders.*.>"])
        assert "'orders.*.>'" in str(overlap.value) and "line 1" in str(overlap.value)
        with pytest.raises(shmq.PermissionDenied, match=r"'md\.>'") as uncovered:
            shmq.Subscriber(bus, "md.>")
        assert "no rule in" in str(uncovered.value)
        with pytest.raises(shmq.PermissionDenied, match=r"'>'"):
            shmq.Subscriber(bus, ">", group="g")
        with shmq.Subscriber(bus, ["orders.eu.>", "orders.us"]) as sub, shmq.Publisher(bus) as pub:
            pub.publish("orders.us", b"x")
            assert sub.recv(timeout=WAIT_S).topic == "orders.us"
            assert {s.uid for s in shmq.bus_stats(bus).subscribers} == {os.geteuid()}


def test_a_user_with_no_publish_rule_is_refused_at_hello(bus: str, tmp_path: Path) -> None:
    path = write_acl(tmp_path, "allow subscribe user:root >\ndeny publish user:root >\n")
    with running(bus, acl=path):
        with pytest.raises(shmq.PermissionDenied, match="may not publish"):
            shmq.Publisher(bus)
        with shmq.Subscriber(bus, ">"):
            pass


def test_groups_come_from_the_kernel(bus: str, tmp_path: Path) -> None:
    group = grp.getgrgid(os.getegid()).gr_name
    acl = write_acl(tmp_path, f"allow any group:{group} >\n")
    with running(bus, acl=acl), shmq.Subscriber(bus, "a.>"), shmq.Publisher(bus) as pub:
        pub.publish("a.b", b"")
        stats = shmq.bus_stats(bus)
        assert [(p.pid, p.uid, p.gid) for p in stats.publishers] == [
            (os.getpid(), os.geteuid(), os.getegid())
        ]


def test_a_second_hello_in_the_same_read_is_not_a_second_client(bus: str) -> None:
    """The router read the connection's kind once per read, so two hellos arriving together
    made two publishers reading one ring."""
    router = started(bus)
    ring = shmq.Queue(f"bus.{bus}.p.{os.getpid()}.99", create=True, kind="spsc", capacity=4096)
    try:
        link = _bus.connect(bus, WAIT_S)
        try:
            hello = {
                "op": "hello",
                "version": _bus.PROTOCOL_VERSION,
                "role": "publisher",
                "ring": ring.name,
                "pid": os.getpid(),
                "publisher_id": 7,
            }
            line = json.dumps(hello).encode() + b"\n"
            link.sock.sendall(line + line)
            reply = link.receive()
            assert reply is not None and reply["ok"] is True, reply
            time.sleep(0.2)  # (room for a second reply or a second publisher, which must not come)
            assert len(shmq.bus_stats(bus).publishers) == 1
        finally:
            link.close()
    finally:
        ring.close()
        ring.unlink()
        stop(router)


def test_a_publisher_refused_by_the_next_router_says_why(bus: str, tmp_path: Path) -> None:
    """A router restarted with an ACL that refuses a connected publisher: its next publish used
    to wait for a router and raise RouterUnavailable ("no router is serving bus"); it says what
    the router said instead."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    first = started(bus, acl=write_acl(tmp_path, f"allow any user:{user} >\n"))
    with shmq.Publisher(bus) as pub:
        pub.publish("a.b", b"one", timeout=WAIT_S)
        stop(first)
        second = started(bus, acl=write_acl(tmp_path, f"allow subscribe user:{user} >\n"))
        try:
            with pytest.raises(shmq.PermissionDenied, match="publish"):
                pub.publish("a.c", b"two", timeout=WAIT_S)
        finally:
            second.stop()  # (not stop(): settling waits for a publisher that is never let in)


def test_a_topic_used_under_a_laxer_router_is_checked_again(bus: str, tmp_path: Path) -> None:
    """A topic the publisher used before a router restart went straight to the new router,
    which refused it and dropped the messages while publish() returned as if all was well."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    first = started(bus, acl=write_acl(tmp_path, f"allow any user:{user} >\n"))
    with shmq.Subscriber(bus, "ok.>") as sub, shmq.Publisher(bus) as pub:
        pub.publish("secret.x", b"1", timeout=WAIT_S)
        pub.publish("ok.x", b"1", timeout=WAIT_S)
        assert sub.recv(timeout=WAIT_S).data == b"1"
        stop(first)
        strict = f"deny publish user:{user} secret.>\nallow any user:{user} >\n"
        second = started(bus, acl=write_acl(tmp_path, strict))
        try:
            # Reconnected first (a publish while disconnected asks _prepare anyway).
            assert wait_until(lambda: pub._link.generation == 2 and pub.connected, WAIT_S)  # type: ignore[attr-defined]
            with pytest.raises(shmq.PermissionDenied, match="secret"):
                pub.publish("secret.x", b"2", timeout=WAIT_S)
            pub.publish("ok.x", b"2", timeout=WAIT_S)
            got = sub.recv(timeout=WAIT_S)
            assert (got.topic, got.data, got.seq) == ("ok.x", b"2", 2)
            assert pub.last_seqs() == {"secret.x": 1, "ok.x": 2}
        finally:
            stop(second)


def test_a_hello_claiming_another_pid_is_refused(bus: str) -> None:
    with running(bus):
        link = _bus.connect(bus, WAIT_S)
        try:
            link.send(
                {
                    "op": "hello",
                    "version": _bus.PROTOCOL_VERSION,
                    "role": "publisher",
                    "ring": f"bus.{bus}.p.{os.getpid() + 1}.1",
                    "pid": os.getpid() + 1,
                }
            )
            reply = link.receive()
        finally:
            link.close()
        assert reply is not None and reply["ok"] is False
        assert reply["error"] == "PermissionDenied"
        assert f"the kernel says pid {os.getpid()}" in reply["message"]


def test_modes_of_the_bus_segment_and_the_rings(bus: str) -> None:
    def mode_of(name: str) -> int:
        return stat.S_IMODE(os.stat(f"/dev/shm/shmq.{name}").st_mode)

    old_umask = os.umask(0o077)  # a strict umask must not narrow an explicit mode
    try:
        router = started(bus, mode=0o660)
    finally:
        os.umask(old_umask)
    try:
        assert mode_of(f"bus.{bus}") == 0o660
        with shmq.Publisher(bus) as plain, shmq.Publisher(bus, mode=0o666) as shared:
            assert mode_of(plain.ring_name) == 0o600
            assert mode_of(shared.ring_name) == 0o666
        with shmq.Subscriber(bus, ">", mode=0o640) as sub:
            assert mode_of(sub.ring_name) == 0o640
    finally:
        stop(router)
    default = started(bus)
    try:
        assert mode_of(f"bus.{bus}") == 0o600
    finally:
        stop(default)


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_modes_of_the_data_dir_the_log_and_the_state_files(bus: str, tmp_path: Path, mode: int) -> None:
    """The router's files follow its mode as its segments do: the durable log, the state file of
    a durable subscription, a spilling subscriber's files and the LOCK are `mode` exactly (owner
    only by default), and the directories it makes get the matching x bits."""
    data = tmp_path / "data"
    old_umask = os.umask(0o077)  # a strict umask must not narrow an explicit mode
    try:
        router = started(bus, mode=mode, data_dir=str(data), durable=["d.>"])
    finally:
        os.umask(old_umask)
    try:
        with (
            shmq.Subscriber(bus, "d.>", durable="keep") as keep,
            shmq.Subscriber(bus, "d.>", on_full="spill", capacity=4096) as spill,
            shmq.Publisher(bus) as pub,
        ):
            for _ in range(200):  # 20 KB for a 4 KiB ring that nobody reads: the rest spills
                pub.publish("d.x", bytes(100), timeout=10)
            assert keep.recv(timeout=10).data == bytes(100)
            assert wait_until(lambda: any(p.is_file() for p in (data / "spill").rglob("*")), 10)
            assert spill.recv(timeout=10).data == bytes(100)
            made = list(data.rglob("*"))
            files = [p for p in made if p.is_file()]
            dirs = [data, *(p for p in made if p.is_dir())]
            assert {p.name for p in files} >= {"LOCK", "keep.sub"}
            assert any(p.parent.name == "log" for p in files)
            for path in files:
                assert stat.S_IMODE(path.stat().st_mode) == mode, path
            for path in dirs:
                assert stat.S_IMODE(path.stat().st_mode) == mode | (mode & 0o444) >> 2, path
    finally:
        stop(router)


# -- the CLI ----------------------------------------------------------------------------------------------


CLI = [sys.executable, "-m", "shmq.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--acl", "{bad}"], "line 2: a rule starts with 'allow' or 'deny'"),
        (["--acl", "{missing}"], "cannot read the ACL file"),
        (["--mode", "9z"], "--mode is octal"),
        (["--mode", "700"], "mode must give the owner read and write"),
    ],
)
def test_cli_router_refuses_a_bad_acl_or_mode(tmp_path: Path, options: list[str], expected: str) -> None:
    bad = write_acl(tmp_path, "allow any user:root >\npermit any user:root >\n")
    args = [o.format(bad=bad, missing=tmp_path / "missing.acl") for o in options]
    result = subprocess.run(
        [*CLI, "router", unique_name("acl"), *args], capture_output=True, text=True, timeout=30, env=ENV
    )
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr


def test_cli_router_serves_with_an_acl_and_a_mode(bus: str, tmp_path: Path) -> None:
    path = write_acl(tmp_path, "allow any user:root >\n")
    proc = subprocess.Popen(
        [*CLI, "router", bus, "--acl", str(path), "--mode", "0o640"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        assert "serving bus" in proc.stdout.readline()
        assert stat.S_IMODE(os.stat(f"/dev/shm/shmq.bus.{bus}").st_mode) == 0o640
        with shmq.Subscriber(bus, "x.>") as sub, shmq.Publisher(bus) as pub:
            pub.publish("x.y", b"via the CLI router")
            assert sub.recv(timeout=WAIT_S).data == b"via the CLI router"
        pw.settle(bus)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


# -- a second user ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_user() -> Iterator[pwd.struct_passwd]:
    """A system user made for these tests (removed afterwards); skips unless root with useradd."""
    if os.geteuid() != 0:
        pytest.skip("creating a second user needs root")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel are not installed")
    name = f"shmqtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)


def run_as(
    user: pwd.struct_passwd, work: Callable[[], dict[str, Any]], timeout: float = 30.0
) -> dict[str, Any]:
    """Run `work` in a forked child as `user`; its result, or {"error": class, "message": text}."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        result: dict[str, Any] = {}
        try:
            os.close(read_fd)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(int(timeout))  # its own bound: it dies rather than outlive the test
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            result = work()
        except BaseException as exc:
            result = {"error": type(exc).__name__, "message": str(exc)}
        finally:
            try:
                os.write(write_fd, json.dumps(result).encode())
            finally:
                os._exit(0)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout)
        raw = os.read(read_fd, 1 << 16) if ready else b""
    finally:
        os.close(read_fd)
        if not raw:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert raw, f"the child running as {user.pw_name} did not answer within {timeout} s"
    return dict(json.loads(raw))


def publish_once(bus: str) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        pub = shmq.Publisher(bus, connect_timeout=WAIT_S)
        try:
            seq = pub.publish("shared.hello", b"from another user", timeout=WAIT_S)
            try:
                pub.publish("private.x", b"no", timeout=WAIT_S)
                refused = ""
            except shmq.PermissionDenied as exc:
                refused = str(exc)
            return {"seq": seq, "refused": refused, "uid": os.getuid()}
        finally:
            pub.close(linger=WAIT_S)

    return work


def subscribe_once(bus: str, pattern: str) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        shmq.Subscriber(bus, pattern, connect_timeout=WAIT_S).close()
        return {"subscribed": pattern}

    return work


def hello_with_ring(bus: str, ring: str) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        link = _bus.connect(bus, WAIT_S)
        try:
            link.send(
                {
                    "op": "hello",
                    "version": _bus.PROTOCOL_VERSION,
                    "role": "publisher",
                    "ring": ring,
                    "pid": os.getpid(),
                    "publisher_id": 7,
                }
            )
            return link.receive() or {}
        finally:
            link.close()

    return work


@pytest.mark.timeout(120)
def test_another_user_is_refused_without_an_acl(bus: str, other_user: pwd.struct_passwd) -> None:
    with running(bus, mode=0o666):  # it may open the bus segment; the router still says no
        result = run_as(other_user, publish_once(bus))
        assert result["error"] == "PermissionDenied", result
        assert f"uid {other_user.pw_uid}" in result["message"]
        assert "without an ACL only the router's user" in result["message"]
        assert run_as(other_user, subscribe_once(bus, ">"))["error"] == "PermissionDenied"


@pytest.mark.timeout(120)
def test_another_user_is_accepted_with_a_rule(
    bus: str, other_user: pwd.struct_passwd, tmp_path: Path
) -> None:
    name = other_user.pw_name
    path = write_acl(tmp_path, f"allow publish user:{name} shared.>\nallow any user:root >\n")
    with running(bus, acl=path, mode=0o666), shmq.Subscriber(bus, ">") as sub:
        result = run_as(other_user, publish_once(bus))
        assert result == {"seq": 1, "refused": result["refused"], "uid": other_user.pw_uid}
        assert "'private.x'" in result["refused"] and "no rule in" in result["refused"]
        msg = sub.recv(timeout=WAIT_S)
        assert (msg.topic, msg.data) == ("shared.hello", b"from another user")
        refused = run_as(other_user, subscribe_once(bus, "shared.>"))
        assert refused["error"] == "PermissionDenied" and "'shared.>'" in refused["message"], refused


@pytest.mark.timeout(120)
def test_another_user_cannot_hand_the_router_a_ring_it_does_not_own(
    bus: str, other_user: pwd.struct_passwd, tmp_path: Path
) -> None:
    path = write_acl(tmp_path, f"allow publish user:{other_user.pw_name} >\nallow any user:root >\n")
    with running(bus, acl=path, mode=0o666), shmq.Publisher(bus) as mine:
        reply = run_as(other_user, hello_with_ring(bus, mine.ring_name))
        assert reply["ok"] is False and reply["error"] == "PermissionDenied", reply
        assert "belongs to uid 0" in reply["message"]
        assert len(shmq.bus_stats(bus).publishers) == 1
