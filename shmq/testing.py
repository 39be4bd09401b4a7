"""Helpers for tests and examples that create queues."""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import Iterator

from shmq._segment import SEGMENT_PREFIX, SHM_DIR, Segment

_counter = itertools.count()


def unique_name(prefix: str = "test") -> str:
    """A queue name no other process or test will pick: prefix, pid, counter, random."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


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
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    start = SEGMENT_PREFIX + prefix
    return sorted(e[len(SEGMENT_PREFIX) :] for e in entries if e.startswith(start))


@contextlib.contextmanager
def cleanup(*names: str) -> Iterator[None]:
    """Remove these segments on exit, whatever happened inside."""
    try:
        yield
    finally:
        for name in names:
            remove_segment(name)
