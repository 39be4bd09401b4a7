"""Who is attached to a ring: the attachment table in its header (ring.h has the layout).

Every handle on a ring (a `Queue`, a pub/sub client's ring, the router's side of it) holds an
entry naming its process for good: the pid plus the process's start time (clock ticks since
boot, field 22 of /proc/<pid>/stat), so a pid the kernel has since given to another process does
not pass for the one that attached. `shmq ls` lists the entries, `shmq gc` removes segments whose
every participant is dead, and `Queue(create=True)` replaces a segment that only dead processes
used.

Entries are claimed with a CAS on the owner word (shmq_attach_claim) and freed with a CAS on the
same identity, so freeing a dead owner's entry can never free a live one's. When the table is full
the dead owners' entries are freed and the claim tried again; a handle that still finds no room
counts itself in `untracked`, and a segment with untracked handles is never called dead.

A queue handle also publishes its open claims in its entry (`Ring._track`), which is what lets a
waiter turn a dead process's claim into padding (ring.c, shmq_recover); a handle without an entry
makes that recovery refuse, as it cannot tell its claims from a dead process's.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import weakref
from dataclasses import dataclass
from typing import Any

from shmq._native import _ring

ROLE_CREATOR, ROLE_USER, ROLE_ROUTER = 1, 2, 3
ROLE_NAMES = {ROLE_CREATOR: "creator", ROLE_USER: "user", ROLE_ROUTER: "router"}
_PID_BITS = 22  # pid_max is at most 2**22 on Linux
_PID_MASK = (1 << _PID_BITS) - 1
_ENTRY = struct.Struct("<QIIQ")  # owner, role, flags, attached_ns (then the claim bounds)


def start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None if it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it
    # start after the last ')'. Field 3 is the state, field 22 the start time.
    fields = raw[raw.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def identity(pid: int) -> int | None:
    """The owner word for process `pid` (None if it is not running)."""
    ticks = start_ticks(pid)
    return None if ticks is None else (ticks << _PID_BITS) | (pid & _PID_MASK)


def owner_pid(owner: int) -> int:
    return owner & _PID_MASK


def owner_alive(owner: int) -> bool:
    """Whether the process an owner word names still runs (the same process, not a reused pid)."""
    return bool(owner) and identity(owner_pid(owner)) == owner


@dataclass(frozen=True)
class Attachment:
    """One entry of a ring's attachment table."""

    pid: int
    role: str  #: creator, user (attached by name) or router (its side of a client's ring)
    attached_ns: int  #: time.time_ns() when it attached
    alive: bool  #: the same process still runs (a reused pid is not counted)


def attachments(mapping: Any) -> list[Attachment]:
    """The entries in use, read without locking (a snapshot; entries may come and go)."""
    found = []
    for i in range(_ring.ATTACH_SLOTS):
        owner, role, _, attached_ns = _ENTRY.unpack_from(
            mapping, _ring.OFF_ATTACH + i * _ring.ATTACH_SLOT_SIZE
        )
        if owner:
            found.append(
                Attachment(
                    owner_pid(owner), ROLE_NAMES.get(role, "attaching"), attached_ns, owner_alive(owner)
                )
            )
    return found


def untracked(mapping: Any) -> int:
    """Handles attached without an entry (the table was full when they came)."""
    return int(struct.unpack_from("<Q", mapping, _ring.OFF_UNTRACKED)[0])


def free_dead_entries(mapping: Any) -> int:
    """Free the entries of processes that are gone; returns how many."""
    freed = 0
    for i in range(_ring.ATTACH_SLOTS):
        (owner,) = struct.unpack_from("<Q", mapping, _ring.OFF_ATTACH + i * _ring.ATTACH_SLOT_SIZE)
        if owner and not owner_alive(owner) and _ring.attach_release(mapping, i, owner):
            freed += 1
    return freed


class Registration:
    """This process's entry in one ring's table, held while a handle is open."""

    __slots__ = ("__weakref__", "_handle", "_index", "_mapping", "_owner", "_pid", "_role")

    def __init__(self, mapping: Any, role: int, handle: _ring.Ring | None = None) -> None:
        """`handle` (a ring handle, held weakly) is told the entry taken, now and again in a
        forked child, so that it publishes its claims there (`Ring._track`)."""
        self._mapping = mapping
        self._role = role
        self._handle = None if handle is None else weakref.ref(handle)
        self._index = -1
        self._owner = 0
        self._pid = 0
        self._claim()
        _open.add(self)

    @property
    def index(self) -> int:
        """The entry this process holds (-1: the table was full, counted untracked)."""
        return self._index

    def _claim(self) -> None:
        pid = os.getpid()
        # (no /proc, as in some sandboxes: no identity to record, so count ourselves untracked,
        # which keeps gc from ever calling the segment abandoned)
        owner = identity(pid) or 0
        index = -1
        if owner:
            index = _ring.attach_claim(self._mapping, owner, self._role, time.time_ns())
            if index < 0 and free_dead_entries(self._mapping):
                index = _ring.attach_claim(self._mapping, owner, self._role, time.time_ns())
        if index < 0:
            _ring.attach_untracked(self._mapping, 1)
        self._index, self._owner, self._pid = index, owner, pid
        handle = None if self._handle is None else self._handle()
        if handle is not None and not handle.closed:
            handle._track(index)

    def _after_fork(self) -> None:
        # The child is a participant of its own (it inherited the handle); the parent's
        # entry stays the parent's.
        if self._pid:
            self._claim()

    def close(self) -> None:
        """Give the entry back (only the process that claimed it; idempotent)."""
        if not self._pid or self._pid != os.getpid():
            return
        try:
            if self._index >= 0:
                _ring.attach_release(self._mapping, self._index, self._owner)
            else:
                _ring.attach_untracked(self._mapping, -1)
        except ValueError:
            pass  # the mapping was closed first: the entry reads as dead once this process is gone
        self._pid = 0
        _open.discard(self)


_open: weakref.WeakSet[Registration] = weakref.WeakSet()


def _reclaim_in_child() -> None:
    for registration in list(_open):
        with contextlib.suppress(ValueError, OSError):  # (its mapping was closed meanwhile)
            registration._after_fork()


os.register_at_fork(after_in_child=_reclaim_in_child)
