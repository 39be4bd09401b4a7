"""Shared fixtures: unique names, guaranteed segment cleanup, a leak check."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Callable, Iterator

import pytest

import shmq
from shmq.testing import SESSION_ENV, list_segments, remove_segment, unique_name

# Spawned children import this package fresh: the realistic case for users.
CTX = multiprocessing.get_context("spawn")

# Every name made by unique_name() in this session, here or in a child process
# (children inherit the environment), carries this token.
SESSION = uuid.uuid4().hex[:10]
os.environ[SESSION_ENV] = SESSION


def session_segments() -> list[str]:
    return [n for n in list_segments() if f"-{SESSION}-" in n]


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if this session left shared-memory segments behind (and remove them)."""
    leaked = session_segments()
    for n in leaked:
        remove_segment(n)
    if leaked:
        print(f"\nshmq: the test session leaked {len(leaked)} shared-memory segment(s): {leaked[:10]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
