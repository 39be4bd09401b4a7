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

import fcntl
import mmap
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from shmq._attach import Attachment, Registration, attachments, untracked
from shmq._errors import AlreadyExists, CorruptSegment, InvalidArgument, NotFound, PermissionDenied

if TYPE_CHECKING:
    from shmq._native import _ring

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


def validate_mode(mode: object) -> int:
    """Return `mode` if it can be a segment's permission bits, else raise InvalidArgument saying why.

    The owner must keep read and write (it maps the segment read-write); the others may have read
    and write too; execute, setuid, setgid and sticky bits mean nothing for shared memory."""
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise InvalidArgument(f"mode must be an int such as 0o600 or 0o660, got {mode!r}")
    if mode & ~0o666 or mode & 0o600 != 0o600:
        raise InvalidArgument(
            f"mode must give the owner read and write and nothing but read and write to anyone "
            f"(0o600, 0o640, 0o660, 0o666...), got {oct(mode) if mode >= 0 else mode}"
        )
    return mode


def set_mode(name: str, mode: int) -> None:
    """Give a segment exactly `mode` (the umask narrowed what os.open created)."""
    os.chmod(segment_path(name), mode)


# Fault the whole segment into this process's page tables when mapping it. Otherwise
# the ring's first lap takes a page fault every 4 KiB (every 57 frames of 64 B),
# ~10 us each in a VM: a stall in exactly the latency percentiles users measure.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _map(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, _MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)


class Segment:
    """A mapped segment: `close()` unmaps it, `unlink(name)` removes the name."""

    __slots__ = ("created", "mapping", "name", "path", "registration", "size")

    def __init__(self, name: str, mapping: mmap.mmap, size: int, created: bool) -> None:
        self.name = name
        self.path = segment_path(name)
        self.mapping = mapping
        self.size = size
        self.created = created
        self.registration: Registration | None = None

    def register(self, role: int, handle: _ring.Ring | None = None) -> None:
        """Enter this process in the ring's attachment table (a ring segment only) until close();
        `handle` then publishes its claims in the entry (see `Registration`)."""
        if self.registration is None:
            self.registration = Registration(self.mapping, role, handle)

    def keep_registration(self) -> None:
        """Leave this process's entry in place when closing (it is freed once the process is
        gone): a claim of ours is still open, and recovery must keep taking it for a live one."""
        self.registration = None

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
    def create_or_replace(cls, name: str, size: int, mode: int = 0o600) -> tuple[Segment, str]:
        """Create the segment; if the name is taken by a segment only dead processes used (see
        `abandoned`), remove that one first. Returns the segment and why one was replaced ("")."""
        try:
            return cls.create(name, size, mode), ""
        except AlreadyExists:
            path = segment_path(name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return cls.create(name, size, mode), ""
        try:
            # The lock makes one replacer of many; each checks that the name still means the
            # file it locked (another replacer may have put a new segment there meanwhile).
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            reason = abandoned(read_info(name)) if same else ""
            if not reason:
                return cls.create(name, size, mode), ""  # (raises AlreadyExists if it is in use)
            os.unlink(path)
            return cls.create(name, size, mode), reason
        finally:
            os.close(fd)

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
                    f"queue {name!r}: segment {path} is {size} bytes, smaller than a shmq header "
                    f"({min_size}); "
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
        if self.registration is not None:
            self.registration.close()
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
    attached: tuple[Attachment, ...] = ()  #: the ring's attachment table (shmq/_attach.py)
    untracked: int = 0  #: handles attached without an entry (the table was full)


_KIND_NAMES = {1: "spsc", 2: "mpsc", 3: "mpmc"}


def read_info(name: str) -> SegmentInfo:
    """Peek at a segment's header (read-only; never changes the segment)."""
    from shmq._native import _ring

    path = segment_path(validate_name(name))
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(_ring.HEADER_SIZE)
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
    if len(head) >= _ring.HIST_HEADER and u64(0) == _ring.HIST_MAGIC:  # a LatencyRecorder's
        version = u32(8)
        return SegmentInfo(
            name=name,
            path=path,
            size=st.st_size,
            valid=version == _ring.HIST_VERSION,
            problem="" if version == _ring.HIST_VERSION else f"histogram layout version {version}",
            kind="latency",
            capacity=st.st_size,
            creator_pid=u64(64),
            created_ns=u64(72),
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
    whole = not problem and len(head) >= _ring.HEADER_SIZE
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
        attached=tuple(attachments(head)) if whole else (),
        untracked=untracked(head) if whole else 0,
    )


def list_segment_names(prefix: str = "") -> list[str]:
    """Names (without the ``shmq.`` prefix) of the shmq segments on this machine, sorted."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    start = SEGMENT_PREFIX + prefix
    return sorted(e[len(SEGMENT_PREFIX) :] for e in entries if e.startswith(start))


def process_started_by(pid: int, when_ns: int, slack_ns: int = 1_000_000_000) -> bool:
    """True if process `pid` runs (not a zombie) and started by `when_ns` + `slack_ns` (so a reused
    pid, started later, does not pass for the process that made something at `when_ns`)."""
    try:
        process = psutil.Process(pid)
        started, zombie = process.create_time(), process.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
    # (create_time has a resolution of a clock tick, and it is derived from the boot time)
    return bool(started * 1e9 <= when_ns + slack_ns) and not zombie


#: A segment that was never finished (no magic) is left alone this long: its creator may be mid-way.
UNFINISHED_GRACE_S = 10.0


def abandoned(info: SegmentInfo) -> str:
    """Why only dead processes used this segment ("" if anyone may still use it, or if it is not
    shmq's to judge). The rule of `shmq gc` and of `Queue(create=True)` over an existing name."""
    if info.kind == "bus":
        if not info.valid or process_started_by(info.creator_pid, info.created_ns):
            return ""
        return f"its router (pid {info.creator_pid}) is gone"
    if info.kind == "latency":  # (readers are not tracked: a dead creator leaves it to gc)
        if not info.valid or process_started_by(info.creator_pid, info.created_ns):
            return ""
        return f"the latency recorder's creator (pid {info.creator_pid}) is gone"
    if not info.valid:
        if info.problem == "never finished by its creator":
            age = time.time() - os.stat(info.path).st_mtime if os.path.exists(info.path) else 0.0
            return f"never finished by its creator ({age:.0f} s old)" if age > UNFINISHED_GRACE_S else ""
        return ""  # not a shmq ring (another program's segment under the prefix), or another version
    if any(a.alive for a in info.attached) or info.untracked:
        return ""
    if process_started_by(info.creator_pid, info.created_ns):
        return ""  # its creator runs, and may attach again by name
    pids = sorted({a.pid for a in info.attached} | {info.creator_pid})
    return "every process that used it is gone (pid " + ", ".join(map(str, pids)) + ")"
