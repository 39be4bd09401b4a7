"""Segment mapping: both the creator's and an attacher's mapping are populated up front."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import shmq
from shmq._segment import segment_path

pytestmark = pytest.mark.timeout(60)


def resident_kib(path: str) -> list[int]:
    """Rss (KiB) of every mapping of `path` in this process, from /proc/self/smaps."""
    sizes: list[int] = []
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0] if line.strip() else ""
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and first == "Rss:":
                sizes.append(int(line.split()[1]))
    return sizes


def test_mappings_are_populated(make_queue: Callable[..., shmq.Queue]) -> None:
    """The ring's first lap must not page-fault every 4 KiB (a ~10 µs stall each in a VM, right in
    the latency percentiles users measure): every page is mapped when the queue is opened."""
    capacity = 1 << 20
    q = make_queue(capacity=capacity, kind="spsc")
    other = shmq.Queue(q.name)
    try:
        sizes = resident_kib(segment_path(q.name))
        assert len(sizes) == 2, sizes  # creator and attacher
        whole = (capacity + shmq._native._ring.HEADER_SIZE) // 1024
        assert sizes == [whole, whole]
    finally:
        other.close()
