"""Naming and lifecycle of shared-memory segments.

A segment is a POSIX shared-memory object, i.e. a file in /dev/shm, named
``shmq.<name>``: the same namespace `multiprocessing.shared_memory` uses, so
``SharedMemory("shmq.jobs")`` opens it too. We open it ourselves instead of
through `SharedMemory` because Python 3.11's resource tracker registers every
attachment and unlinks (or warns about) the segment when any attaching process
exits; a queue's lifetime belongs to its creator (`Queue.unlink()`), not to
whichever process happens to exit first.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

from shmq._errors import AlreadyExists, CorruptSegment, InvalidArgument, NotFound, PermissionDenied

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "shmq."
MAX_NAME_LENGTH = 200  # NAME_MAX is 255; leave room for the prefix and suffixes
ATTACH_GRACE_S = 1.0  # how long an attacher waits for a creator that is mid-creation


def validate_name(name: object) -> str:
    """Return `name` if it can name a segment, else raise InvalidArgument saying why."""
    if not isinstance(name, str):
        raise InvalidArgument(f"a queue name must be a str, got {type(name).__name__}")
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"a queue name must have 1 to {MAX_NAME_LENGTH} characters, got {len(name)}")
    bad = [c for c in name if c in "/\\\0" or not c.isprintable() or c.isspace()]
    if bad:
        raise InvalidArgument(
            f"queue name {name!r} contains {bad[0]!r}; use letters, digits and . _ - (no '/', no spaces)"
        )
    return name


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, SEGMENT_PREFIX + name)


# Fault the whole segment into this process's page tables when mapping it. Otherwise
# the ring's first lap takes a page fault every 4 KiB (every 57 frames of 64 B),
# ~10 us each in a VM: a stall in exactly the latency percentiles users measure.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _map(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, _MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)


class Segment:
    """A mapped segment: `close()` unmaps it, `unlink(name)` removes the name."""

    __slots__ = ("created", "mapping", "name", "path", "size")

    def __init__(self, name: str, mapping: mmap.mmap, size: int, created: bool) -> None:
        self.name = name
        self.path = segment_path(name)
        self.mapping = mapping
        self.size = size
        self.created = created

    @classmethod
    def create(cls, name: str, size: int, mode: int = 0o600) -> Segment:
        path = segment_path(validate_name(name))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            raise AlreadyExists(
                f"queue {name!r} exists already ({path}); attach with create=False, or remove it with "
                f"Queue({name!r}).unlink() if it is stale"
            ) from None
        except PermissionError as exc:
            raise PermissionDenied(f"cannot create {path}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, size)
            mapping = _map(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return cls(name, mapping, size, created=True)

    @classmethod
    def attach(cls, name: str, min_size: int) -> Segment:
        path = segment_path(validate_name(name))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(
                f"queue {name!r} does not exist ({path}); create it with Queue({name!r}, create=True)"
            ) from None
        except PermissionError as exc:
            raise PermissionDenied(f"cannot open {path}: {exc.strerror}; check its owner and mode") from None
        try:
            deadline = time.monotonic() + ATTACH_GRACE_S
            size = os.fstat(fd).st_size
            while size < min_size and time.monotonic() < deadline:
                time.sleep(0.001)  # the creator has not sized it yet
                size = os.fstat(fd).st_size
            if size < min_size:
                raise CorruptSegment(
                    f"segment {path} is {size} bytes, smaller than a shmq header ({min_size}); "
                    f"it is not a shmq ring or its creator died while creating it: unlink it"
                )
            mapping = _map(fd, size)
        finally:
            os.close(fd)
        # The creator stores the magic number last; give a creator that is still
        # writing the header the same grace period (the ring then validates it).
        while mapping[:8] == bytes(8) and time.monotonic() < deadline:
            time.sleep(0.001)
        return cls(name, mapping, size, created=False)

    def close(self) -> bool:
        """Unmap; False if something still uses the mapping (it is unmapped when that ends)."""
        try:
            self.mapping.close()
        except BufferError:
            return False
        return True

    @staticmethod
    def unlink(name: str) -> None:
        path = segment_path(validate_name(name))
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise NotFound(f"queue {name!r} does not exist ({path})") from None


@dataclass(frozen=True)
class SegmentInfo:
    """What a segment's header says, read without attaching to it."""

    name: str
    path: str
    size: int
    valid: bool  #: magic and version are shmq's
    problem: str  #: why not valid ("" when valid)
    kind: str  #: spsc, mpsc, mpmc, or bus (a router's bus segment)
    capacity: int  #: ring bytes (a bus segment: its size)
    creator_pid: int
    created_ns: int
    depth_messages: int
    depth_bytes: int
    owner_uid: int
    mode: int


_KIND_NAMES = {1: "spsc", 2: "mpsc", 3: "mpmc"}


def read_info(name: str) -> SegmentInfo:
    """Peek at a segment's header (read-only; never changes the segment)."""
    from shmq._native import _ring

    path = segment_path(validate_name(name))
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(1024)
    except FileNotFoundError:
        raise NotFound(f"queue {name!r} does not exist ({path})") from None
    except PermissionError as exc:
        raise PermissionDenied(f"cannot read {path}: {exc.strerror}") from None

    def u64(off: int) -> int:
        return int(struct.unpack_from("<Q", head, off)[0]) if len(head) >= off + 8 else 0

    def u32(off: int) -> int:
        return int(struct.unpack_from("<I", head, off)[0]) if len(head) >= off + 4 else 0

    from shmq._bus import BUS_MAGIC, BUS_VERSION

    problem = ""
    if len(head) >= 1024 and u64(0) == BUS_MAGIC:  # a router's bus segment (shmq/_bus.py)
        version = u32(8)
        return SegmentInfo(
            name=name,
            path=path,
            size=st.st_size,
            valid=version == BUS_VERSION,
            problem="" if version == BUS_VERSION else f"bus layout version {version}",
            kind="bus",
            capacity=st.st_size,
            creator_pid=u64(16),  # the router
            created_ns=u64(24),
            depth_messages=0,
            depth_bytes=0,
            owner_uid=st.st_uid,
            mode=st.st_mode & 0o777,
        )
    if len(head) < 1024:
        problem = f"only {st.st_size} bytes"
    elif u64(_ring.OFF_MAGIC) == 0:
        problem = "never finished by its creator"
    elif u64(_ring.OFF_MAGIC) != _ring.MAGIC:
        problem = "not a shmq ring (wrong magic)"
    elif u32(_ring.OFF_VERSION) != _ring.VERSION:
        problem = f"layout version {u32(_ring.OFF_VERSION)}, this shmq speaks {_ring.VERSION}"
    put, got = u64(_ring.OFF_TAIL_COMMIT + 8), u64(_ring.OFF_HEAD_RELEASE + 8)
    return SegmentInfo(
        name=name,
        path=path,
        size=st.st_size,
        valid=not problem,
        problem=problem,
        kind=_KIND_NAMES.get(u32(_ring.OFF_KIND), "?"),
        capacity=u64(_ring.OFF_CAPACITY),
        creator_pid=u64(_ring.OFF_CREATOR_PID),
        created_ns=u64(_ring.OFF_CREATED_NS),
        depth_messages=max(0, put - got),
        depth_bytes=max(0, u64(_ring.OFF_TAIL_COMMIT) - u64(_ring.OFF_HEAD_RELEASE)),
        owner_uid=st.st_uid,
        mode=st.st_mode & 0o777,
    )
