"""The router's persistence tier: its options, the data directory, durable subscription state,
retention and the flusher thread (the log itself is C: shmq/_native/log.c).

A data directory ``DIR`` holds:

* ``LOCK``: flock'ed by the router using it (one router per data directory);
* ``log/<base_seq>.seg``: the durable log's segments (docs/ARCHITECTURE.md has the layout);
* ``durable/<name>.sub``: one 4 KiB state file per durable subscription (below);
* ``spill/``: spill files of subscribers with ``on_full="spill"`` (unless ``spill_dir`` is set),
  one directory per subscriber, removed when drained.

A durable subscription's state file (little-endian)::

    0   u64 magic "SHMQSUB1"
    8   u32 version (1)
    12  u32 pid of the subscriber using it (0: none)
    16  u64 acked       written by the subscriber: every record up to here is acknowledged
    24  u64 delivered   written by the router: the last record committed to its ring
    32  u64 start_seq   where the subscription started
    40  u64 created_ns  time.time_ns()
    48  u64 intent_end  written by the router before each commit: the ring position it reaches
    56  u64 intent_seq  ... and the last record it carries (after intent_end; see delivered_to)
    64  ring name of the subscriber using it (128 bytes, NUL padded)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shmq._errors import AlreadyExists, ArgumentTypeError, InvalidArgument
from shmq._native import _ring
from shmq.topics import validate_pattern

log = logging.getLogger("shmq.router")

FSYNC_POLICIES = ("never", "interval", "always")
FSYNC_CODES = {"never": 0, "interval": 1, "always": 2}
DEFAULT_SEGMENT_BYTES = 64 << 20
DEFAULT_FSYNC_INTERVAL_MS = 100
SPILL_SEGMENT_BYTES = 64 << 20

STATE_MAGIC = int.from_bytes(b"SHMQSUB1", "little")
STATE_SIZE = 4096
STATE_OFF_PID, STATE_OFF_ACKED, STATE_OFF_DELIVERED, STATE_OFF_START = 12, 16, 24, 32
STATE_OFF_CREATED, STATE_OFF_INTENT_END, STATE_OFF_INTENT_SEQ, STATE_OFF_RING = 40, 48, 56, 64
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class Persistence:
    """A router's persistence options, checked."""

    data_dir: Path | None = None
    durable: tuple[str, ...] = ()
    fsync: str = "interval"
    fsync_interval_ms: int = DEFAULT_FSYNC_INTERVAL_MS
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    retain_bytes: int | None = None
    retain_seconds: float | None = None
    spill_dir: Path | None = None
    max_spill_bytes: int | None = None

    @property
    def log_dir(self) -> Path | None:
        return None if self.data_dir is None else self.data_dir / "log"

    def spill_root(self, bus: str) -> Path:
        if self.spill_dir is not None:
            return self.spill_dir
        if self.data_dir is not None:
            return self.data_dir / "spill"
        return Path(tempfile.gettempdir()) / f"shmq-spill-{os.getuid()}" / bus


def _positive_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        limit = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise InvalidArgument(f"{name} must be {limit}, got {value}")
    return value


def persistence(
    data_dir: str | os.PathLike[str] | None = None,
    durable: Any = (),
    fsync: str = "interval",
    fsync_interval_ms: int = DEFAULT_FSYNC_INTERVAL_MS,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    retain_bytes: int | None = None,
    retain_seconds: float | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
    max_spill_bytes: int | None = None,
) -> Persistence:
    """Check a router's persistence options; raises InvalidArgument saying what to change."""
    if isinstance(durable, str):
        durable = (durable,)
    patterns = tuple(validate_pattern(p) for p in durable)
    if patterns and data_dir is None:
        raise InvalidArgument("durable topics need a data directory: pass data_dir= (--data-dir DIR)")
    if fsync not in FSYNC_POLICIES:
        raise InvalidArgument(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
    _positive_int("fsync_interval_ms", fsync_interval_ms, 1, 3_600_000)
    _positive_int("segment_bytes", segment_bytes, _ring.LOG_MIN_SEGMENT, 1 << 40)
    if retain_bytes is not None:
        _positive_int("retain_bytes", retain_bytes, 1)
    if retain_seconds is not None and (
        isinstance(retain_seconds, bool)
        or not isinstance(retain_seconds, (int, float))
        or retain_seconds <= 0
    ):
        raise InvalidArgument(f"retain_seconds must be a positive number, got {retain_seconds!r}")
    if max_spill_bytes is not None:
        _positive_int("max_spill_bytes", max_spill_bytes, 1)
    return Persistence(
        data_dir=None if data_dir is None else Path(data_dir).absolute(),
        durable=patterns,
        fsync=fsync,
        fsync_interval_ms=fsync_interval_ms,
        segment_bytes=segment_bytes,
        retain_bytes=retain_bytes,
        retain_seconds=None if retain_seconds is None else float(retain_seconds),
        spill_dir=None if spill_dir is None else Path(spill_dir).absolute(),
        max_spill_bytes=max_spill_bytes,
    )


def default_max_spill_bytes(directory: Path) -> int:
    """Half of the free space where spill files go: a stalled subscriber cannot fill the disk."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return max(shutil.disk_usage(probe).free // 2, 1 << 20)


def dir_mode(mode: int) -> int:
    """A directory's bits for files of `mode`: x wherever r is (0o600 -> 0o700, 0o660 -> 0o770)."""
    return mode | (mode & 0o444) >> 2


def make_dir(path: Path, mode: int) -> None:
    """mkdir -p; the directories it creates get exactly dir_mode(mode) (the umask may narrow it),
    directories already there are left as they are."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(dir_mode(mode))
            os.chmod(directory, dir_mode(mode))


def create_file(path: Path, flags: int, mode: int) -> int:
    """Open `path`, creating it with exactly `mode` if it is not there; returns the descriptor."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return os.open(path, flags)
    os.fchmod(fd, mode)  # exactly: the umask may have narrowed it
    return fd


class DataDir:
    """A router's hold on its data directory (an exclusive flock on DIR/LOCK)."""

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        """`mode`: permission bits of the files made here (directories get the matching x bits)."""
        self.path = path
        self.mode = mode
        for sub in ("", "log", "durable"):
            make_dir(path / sub, mode)
        self._lock_fd = create_file(path / "LOCK", os.O_RDWR | os.O_CLOEXEC, mode)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            holder = (path / "LOCK").read_text().strip() or "?"
            raise AlreadyExists(
                f"data directory {path} is in use by another router (pid {holder}); stop it, or "
                "give this router its own --data-dir"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def state_path(self, name: str) -> Path:
        return self.path / "durable" / f"{name}.sub"

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # (closing releases the flock)
            self._lock_fd = -1


def last_delivered(stored: int, intent_end: int, intent_seq: int, ring_tail_commit: int | None) -> int:
    """The last log seq a log-fed ring got. `stored` is written after each commit, the intent
    (`intent_end`, `intent_seq`) before it (bus.c, commit_output): a router that died in between
    left `stored` behind, and the ring's tail_commit reaching `intent_end` says the commit
    happened. `ring_tail_commit` None: the ring is gone, so count what may have reached it."""
    if intent_seq > stored and (ring_tail_commit is None or ring_tail_commit >= intent_end):
        return intent_seq
    return stored


def validate_durable_name(name: object) -> str:
    if not isinstance(name, str):
        raise ArgumentTypeError(f"durable must be a str name, got {type(name).__name__}")
    if not name or len(name) > 100 or not all(c.isalnum() or c in "._-" for c in name) or name[0] == ".":
        raise InvalidArgument(
            f"durable name {name!r}: use 1 to 100 letters, digits and . _ - (not starting with '.')"
        )
    return name


class DurableState:
    """A durable subscription's state file, mapped (by the router, and by its subscriber for acks)."""

    def __init__(self, path: Path, *, create_start: int | None = None, mode: int = 0o600) -> None:
        self.path = path
        if create_start is not None:
            fd = create_file(path, os.O_RDWR | os.O_CLOEXEC, mode)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fresh = os.fstat(fd).st_size == 0
            if fresh:
                if create_start is None:
                    raise InvalidArgument(f"{path} is empty: not a durable subscription state")
                os.ftruncate(fd, STATE_SIZE)
            self.mapping = mmap.mmap(fd, STATE_SIZE)
        finally:
            os.close(fd)
        if fresh:
            _U32.pack_into(self.mapping, 8, 1)
            _U64.pack_into(self.mapping, STATE_OFF_START, create_start or 1)
            _U64.pack_into(self.mapping, STATE_OFF_CREATED, time.time_ns())
            _U64.pack_into(self.mapping, 0, STATE_MAGIC)
        elif _U64.unpack_from(self.mapping, 0)[0] != STATE_MAGIC:
            self.mapping.close()
            raise InvalidArgument(f"{path} is not a shmq durable subscription state file")
        self.fresh = fresh

    def get(self, off: int) -> int:
        return int(_U64.unpack_from(self.mapping, off)[0])

    def put(self, off: int, value: int) -> None:
        _U64.pack_into(self.mapping, off, value)

    @property
    def acked(self) -> int:
        return self.get(STATE_OFF_ACKED)

    @property
    def delivered(self) -> int:
        return self.get(STATE_OFF_DELIVERED)

    def delivered_to(self, ring_tail_commit: int | None) -> int:
        """The last seq the subscription's ring got (see last_delivered)."""
        return last_delivered(
            self.delivered, self.get(STATE_OFF_INTENT_END), self.get(STATE_OFF_INTENT_SEQ), ring_tail_commit
        )

    @property
    def start_seq(self) -> int:
        return self.get(STATE_OFF_START)

    @property
    def pid(self) -> int:
        return int(_U32.unpack_from(self.mapping, STATE_OFF_PID)[0])

    @property
    def ring(self) -> str:
        return bytes(self.mapping[STATE_OFF_RING : STATE_OFF_RING + 128]).split(b"\0", 1)[0].decode()

    def claim(self, pid: int, ring: str) -> None:
        _U32.pack_into(self.mapping, STATE_OFF_PID, pid)
        raw = ring.encode()[:127]
        self.mapping[STATE_OFF_RING : STATE_OFF_RING + 128] = raw + bytes(128 - len(raw))

    def release(self) -> None:
        _U32.pack_into(self.mapping, STATE_OFF_PID, 0)

    def ack(self, seq: int) -> None:
        """Cumulative: only ever moves forward (the subscriber is the only writer)."""
        if seq > self.acked:
            self.put(STATE_OFF_ACKED, seq)

    def flush(self) -> None:
        self.mapping.flush()

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.mapping.close()


def apply_retention(
    forwarder: Any, log_dir: Path, retain_bytes: int | None, retain_seconds: float | None
) -> int:
    """Remove whole old segments beyond the byte or age limits; returns how many went."""
    bases = _ring.log_segments(str(log_dir))
    if len(bases) < 2:
        return 0
    sizes = []
    for base in bases:
        try:
            sizes.append((log_dir / f"{base:020d}.seg").stat().st_size)
        except FileNotFoundError:
            sizes.append(0)
    keep_from = 0  # index of the oldest segment to keep; the active (last) one always stays
    if retain_bytes is not None:
        total = sum(sizes)
        while keep_from < len(bases) - 1 and total > retain_bytes:
            total -= sizes[keep_from]
            keep_from += 1
    if retain_seconds is not None:
        cutoff = time.time_ns() - int(retain_seconds * 1e9)
        while keep_from < len(bases) - 1:
            # A segment's newest record is older than the next segment's first one.
            first_of_next = _ring.LogReader(str(log_dir), bases[keep_from + 1]).read(1)
            if not first_of_next or first_of_next[0][1] >= cutoff:
                break
            keep_from += 1
    if keep_from == 0:
        return 0
    removed = int(forwarder.log_remove_before(bases[keep_from]))
    if removed:
        log.info(
            "log %s: retention removed %d segments (records before %d)", log_dir, removed, bases[keep_from]
        )
    return removed


class Flusher(threading.Thread):
    """Syncs the log: every interval ("interval"), or back to back as records come ("always":
    group commit: one fdatasync covers every publisher that appended meanwhile)."""

    def __init__(self, forwarder: Any, policy: str, interval_ms: int, on_error: Any) -> None:
        super().__init__(name="shmq-flusher", daemon=True)
        self.forwarder, self.policy, self.interval = forwarder, policy, interval_ms / 1000
        self.on_error = on_error
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.policy == "always":
                    self.forwarder.sync(0.1)
                else:
                    self.stopping.wait(self.interval)
                    self.forwarder.sync(0)
            except OSError as exc:
                self.on_error(exc)
                self.stopping.wait(0.1)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5.0)
