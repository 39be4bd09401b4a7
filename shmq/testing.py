"""Helpers for tests and examples that create queues."""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from shmq._errors import Empty
from shmq._segment import SEGMENT_PREFIX, SHM_DIR, Segment, list_segment_names

if TYPE_CHECKING:
    from shmq.queue import Queue

_counter = itertools.count()


#: Set by a test session (and inherited by the processes it starts) so that
#: every name it makes can be found again, e.g. to check for leaks.
SESSION_ENV = "SHMQ_TEST_SESSION"


def unique_name(prefix: str = "test") -> str:
    """A queue name no other process or test will pick: prefix, [session], pid, counter, random."""
    session = os.environ.get(SESSION_ENV)
    tag = f"{session}-" if session else ""
    return f"{prefix}-{tag}{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, SEGMENT_PREFIX + name))


def remove_segment(name: str) -> bool:
    """Unlink the segment if it exists; True if it did."""
    with contextlib.suppress(FileNotFoundError):
        Segment.unlink(name)
        return True
    return False


def list_segments(prefix: str = "") -> list[str]:
    """Names (without the ``shmq.`` prefix) of the shmq segments on this machine."""
    return list_segment_names(prefix)


@contextlib.contextmanager
def cleanup(*names: str) -> Iterator[None]:
    """Remove these segments on exit, whatever happened inside."""
    try:
        yield
    finally:
        for name in names:
            remove_segment(name)


def drain(q: Queue) -> list[bytes]:
    """Every message queued right now, without waiting."""
    out: list[bytes] = []
    while True:
        try:
            out.append(q.get_nowait())
        except Empty:
            return out
