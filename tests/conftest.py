"""Shared fixtures: unique names, guaranteed segment cleanup, a leak check."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator

import pytest

import shmq
from shmq.testing import list_segments, remove_segment, unique_name

# Spawned children import this package fresh: the realistic case for users.
CTX = multiprocessing.get_context("spawn")


@pytest.fixture
def name() -> Iterator[str]:
    """A unique queue name whose segment is removed after the test, pass or fail."""
    n = unique_name()
    yield n
    remove_segment(n)


@pytest.fixture
def make_queue() -> Iterator[Callable[..., shmq.Queue]]:
    """Factory for created queues; every one is closed and unlinked after the test."""
    made: list[shmq.Queue] = []

    def make(**kwargs: object) -> shmq.Queue:
        q = shmq.Queue(unique_name(), create=True, **kwargs)  # type: ignore[arg-type]
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()
        remove_segment(q.name)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Fails the session if tests of this process left shmq segments behind."""
    before = set(list_segments("test-"))
    yield
    leaked = set(list_segments("test-")) - before
    for n in leaked:
        remove_segment(n)
    assert not leaked, f"tests leaked shared-memory segments: {sorted(leaked)}"
