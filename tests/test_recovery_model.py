"""Stateful model test of dead-claim recovery (ring.c shmq_recover; ARCHITECTURE "Dead processes").

A Queue handle in this process is the live side. Dead processes are played by writing the
shared cursors the way a process that then died would have: a "ghost put" moves tail_claim over
a claim and scribbles in it (a producer killed mid-write), a "ghost get" (mpmc) moves head_claim
over the next messages (a consumer killed holding them). Live claims are an open put_view and an
open get_view of this handle, and puts that were deferred behind a ghost. `Ring._recover_now()`
runs the recovery a waiter would run after a stall.

The model predicts, after every step: what get() returns, what each recovery clears, and the
counters (messages put and got, dead_producer_claims, dead_consumer_messages). Recovery must pad
every ghost claim up to the first live claim and no further, commit the deferred claims behind,
release ghost-taken frames up to a live read view and not that view, and never make a live
claim's bytes readable or reusable before it is handed over.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import shmq
from shmq._native import _ring
from shmq.testing import remove_segment, unique_name

pytestmark = pytest.mark.timeout(120)

CAPACITY = 1 << 16  # roomy: no wrap, never full, so every outcome below is the model's to predict
DEFERRED_SLOTS = 16
SETTINGS = settings(
    max_examples=80, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PAYLOADS = st.binary(min_size=0, max_size=48)


def frame_size(n: int) -> int:
    return (8 + n + 7) & ~7


@dataclass
class Claim:
    """A producer claim, in tail order."""

    kind: str  #: "msg" (a put), "view" (this handle's put_view), "ghost" (a dead producer's)
    payload: bytes = b""
    state: str = "open"  #: open, ready (deferred), committed, padded (recovered), abandoned


@dataclass
class Frame:
    """A committed message (or an abandoned view's padding), in read order."""

    payload: bytes | None  #: None: padding
    state: str = "unread"  #: unread, ghost (taken by a dead consumer), view (leased), released


@dataclass
class Model:
    claims: list[Claim] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    committed: int = 0  #: claims[:committed] are committed (tail_commit is past them)
    messages_put: int = 0
    messages_got: int = 0
    dead_producer_claims: int = 0
    dead_consumer_messages: int = 0

    def commit_prefix(self) -> None:
        """tail_commit moves over every claim handed over in turn (run_deferred)."""
        while self.committed < len(self.claims) and self.claims[self.committed].state in (
            "ready",
            "committed",
        ):
            self.publish(self.claims[self.committed])

    def publish(self, c: Claim) -> None:
        c.state = "committed"
        self.committed += 1
        if c.kind == "ghost":
            return
        if c.kind == "view" and c.payload is None:  # abandoned
            self.frames.append(Frame(None))
            return
        self.frames.append(Frame(c.payload))
        self.messages_put += 1

    def deferred(self) -> int:
        return sum(c.state == "ready" for c in self.claims)

    def recover_commits(self) -> int:
        rounds = 0
        while rounds < 4 and self.committed < len(self.claims):
            first = self.claims[self.committed]
            if first.kind != "ghost":
                break  # a live claim (an open view) is next: its owner commits it
            while self.committed < len(self.claims) and self.claims[self.committed].kind == "ghost":
                self.claims[self.committed].state = "padded"
                self.committed += 1
            self.dead_producer_claims += 1
            rounds += 1
            self.commit_prefix()
        return rounds

    def first_unreleased(self) -> int:
        i = 0
        while i < len(self.frames) and self.frames[i].state == "released":
            i += 1
        return i

    def recover_reads(self) -> int:
        start = self.first_unreleased()
        taken = 0
        for f in self.frames[start:]:
            if f.state == "view":
                break  # a live lease: recovery goes up to it, not past
            if f.state == "ghost":
                f.state = "released"
                taken += f.payload is not None
            elif f.state == "unread":
                break  # (never claimed: head_claim is here)
        self.dead_consumer_messages += taken
        self.messages_got += taken
        return 1 if taken else 0  # (padding is only ever taken with the message after it)

    def next_unread(self) -> int | None:
        for i, f in enumerate(self.frames):
            if f.state == "unread" and f.payload is not None:
                return i
        return None

    def take_through(self, i: int, state: str) -> None:
        """A reader claims from head_claim through message i: padding before it goes with it."""
        for f in self.frames[: i + 1]:
            if f.state == "unread":
                f.state = state if f.payload is not None else ("ghost" if state == "ghost" else "released")
        self.frames[i].state = state


class RecoveryMachine(RuleBasedStateMachine):
    kind = "mpmc"

    def __init__(self) -> None:
        super().__init__()
        self.name = unique_name("rm")
        self.q = shmq.Queue(self.name, create=True, kind=self.kind, capacity=CAPACITY, wait="block")  # type: ignore[arg-type]
        self.m = self.q._segment.mapping
        self.model = Model()
        self.put_view: _ring.WriteSlot | None = None
        self.view_claim: Claim | None = None
        self.read_view: _ring.ReadSlot | None = None
        self.read_view_payload = b""
        self.rng = random.Random(0)
        self.put_view_at = self.read_view_at = 0

    def teardown(self) -> None:
        try:
            # (dropped, not abandoned: a destructor hands the claim over without waiting, so a
            # failure that left the commit cursor past it cannot also hang the teardown)
            self.put_view = None
            if self.read_view is not None:
                self.read_view.release()
            self.q.close()
        finally:
            remove_segment(self.name)

    def cursor(self, off: int) -> int:
        return int(struct.unpack_from("<Q", self.m, off)[0])

    def set_cursor(self, off: int, value: int) -> None:
        struct.pack_into("<Q", self.m, off, value)

    # -- producers ----------------------------------------------------------------------------

    @precondition(lambda self: self.put_view is None and self.model.deferred() < DEFERRED_SLOTS)
    @rule(payload=PAYLOADS)
    def put(self, payload: bytes) -> None:
        self.q.put(payload, timeout=0)  # commits in turn, or defers at once behind an open claim
        self.model.claims.append(Claim("msg", payload, "ready"))
        self.model.commit_prefix()

    @rule(n=st.integers(0, 48), scribble=st.booleans())
    def ghost_put(self, n: int, scribble: bool) -> None:
        """A producer claims n bytes, perhaps writes some of them, and dies."""
        t = self.cursor(_ring.OFF_TAIL_CLAIM)
        size = frame_size(n)
        if scribble:
            off = _ring.HEADER_SIZE + t % CAPACITY
            self.m[off : off + size] = self.rng.randbytes(size)
        self.set_cursor(_ring.OFF_TAIL_CLAIM, t + size)
        self.model.claims.append(Claim("ghost"))

    @precondition(lambda self: self.put_view is None)
    @rule(n=st.integers(0, 48))
    def open_put_view(self, n: int) -> None:
        self.put_view_at = self.cursor(_ring.OFF_TAIL_CLAIM)
        self.put_view = self.q.put_view(n, timeout=0)
        self.view_claim = Claim("view", bytes(range(n)))
        self.model.claims.append(self.view_claim)
        self.put_view.__enter__()[:] = self.view_claim.payload

    def _ghost_before_view(self) -> bool:
        assert self.view_claim is not None
        index = next(i for i, c in enumerate(self.model.claims) if c is self.view_claim)
        return any(c.kind == "ghost" and c.state == "open" for c in self.model.claims[:index])

    @precondition(lambda self: self.put_view is not None and not self._ghost_before_view())
    @rule(deliver=st.booleans())
    def close_put_view(self, deliver: bool) -> None:
        """(Only once no dead claim is before it: otherwise its exit would wait for recovery.)"""
        assert self.put_view is not None and self.view_claim is not None
        if deliver:
            self.put_view.__exit__(None, None, None)
        else:
            self.put_view.abandon()
            self.view_claim.payload = None  # type: ignore[assignment]
        self.view_claim.state = "ready"
        self.model.commit_prefix()
        self.put_view = self.view_claim = None

    # -- consumers ----------------------------------------------------------------------------

    @rule()
    def get(self) -> None:
        i = self.model.next_unread()
        if i is None:
            with pytest.raises(shmq.Empty):
                self.q.get(timeout=0)
            for f in self.model.frames:  # trailing padding is released by the empty read
                if f.state == "unread":
                    f.state = "released"
            return
        assert self.q.get(timeout=0) == self.model.frames[i].payload
        self.model.take_through(i, "released")
        self.model.messages_got += 1

    @precondition(lambda self: self.kind == "mpmc")
    @rule(k=st.integers(1, 3))
    def ghost_get(self, k: int) -> None:
        """A consumer claims the next k messages (and any padding on the way) and dies."""
        pos, end = self.cursor(_ring.OFF_HEAD_CLAIM), self.cursor(_ring.OFF_TAIL_COMMIT)
        last = None
        while k and pos < end:
            length, state = struct.unpack_from("<II", self.m, _ring.HEADER_SIZE + pos % CAPACITY)
            pos += frame_size(length)
            if state & 0xFF == _ring.FRAME_MSG:
                k -= 1
                last = self.model.next_unread()
                assert last is not None
                self.model.take_through(last, "ghost")
        if last is not None:
            self.set_cursor(_ring.OFF_HEAD_CLAIM, pos)

    @precondition(lambda self: self.kind == "mpmc" and self.read_view is None)
    @rule()
    def open_get_view(self) -> None:
        i = self.model.next_unread()
        if i is None:
            return
        self.read_view_at = self.cursor(_ring.OFF_HEAD_CLAIM)
        self.read_view = self.q.get_view(timeout=0)
        self.read_view_payload = bytes(self.read_view.__enter__())
        assert self.read_view_payload == self.model.frames[i].payload
        self.model.take_through(i, "view")

    @precondition(lambda self: self.read_view is not None)
    @rule()
    def close_get_view(self) -> None:
        assert self.read_view is not None
        self.read_view.__exit__(None, None, None)
        self.read_view = None
        for f in self.model.frames:
            if f.state == "view":
                f.state = "released"
                self.model.messages_got += 1

    # -- recovery -----------------------------------------------------------------------------

    @rule()
    def recover(self) -> None:
        expected = self.model.recover_commits()
        if self.kind == "mpmc":
            expected += self.model.recover_reads()
        assert self.q._recover_now() == expected

    @invariant()
    def counters_match(self) -> None:
        st_ = self.q.stats()
        m = self.model
        assert (st_.messages_put, st_.messages_got) == (m.messages_put, m.messages_got)
        assert (st_.dead_producer_claims, st_.dead_consumer_messages) == (
            m.dead_producer_claims,
            m.dead_consumer_messages,
        )
        # A live claim is never recovered: nothing commits past an open put_view, nothing is
        # released past an open get_view, and the leased bytes stay as they were.
        if self.put_view is not None:
            assert self.cursor(_ring.OFF_TAIL_COMMIT) <= self.put_view_at
        if self.read_view is not None:
            assert self.cursor(_ring.OFF_HEAD_RELEASE) <= self.read_view_at
            assert bytes(self.read_view) == self.read_view_payload


class MpscRecoveryMachine(RecoveryMachine):
    kind = "mpsc"


@pytest.mark.parametrize("machine", [RecoveryMachine, MpscRecoveryMachine], ids=["mpmc", "mpsc"])
def test_recovery_against_the_model(machine: type[RecoveryMachine]) -> None:
    run_state_machine_as_test(machine, settings=SETTINGS)
