"""shmq's exceptions: one base, and a builtin beside it wherever one fits.

The native core returns result codes; `shmq/_native/_ringmodule.c:raise_code`
is the only place that turns them into these classes.
"""

from __future__ import annotations

import queue as _queue

__all__ = [
    "AlreadyExists",
    "ArgumentTypeError",
    "Closed",
    "CorruptSegment",
    "Empty",
    "Full",
    "IncompatibleSegment",
    "InvalidArgument",
    "InvalidFilter",
    "InvalidTopic",
    "MessageDecodeError",
    "MessageTooLarge",
    "MessageTypeError",
    "NotFound",
    "PermissionDenied",
    "RouterUnavailable",
    "ShmqError",
]


class ShmqError(Exception):
    """Base class of every error shmq raises on purpose."""


class Full(ShmqError, _queue.Full):
    """The ring has no room for the message within the timeout (also `queue.Full`)."""


class Empty(ShmqError, _queue.Empty):
    """No message arrived within the timeout (also `queue.Empty`)."""


class MessageTooLarge(ShmqError, ValueError):
    """The message is larger than the queue's `max_message`; nothing was written."""


class MessageTypeError(ShmqError, TypeError):
    """The message is not a C-contiguous buffer (bytes, bytearray, memoryview, numpy array)."""


class InvalidArgument(ShmqError, ValueError):
    """An argument is out of range: capacity, kind, wait strategy, timeout, name."""


class ArgumentTypeError(ShmqError, TypeError):
    """An argument has the wrong type (a str timeout, a float size, a bytes object for put_many)."""


class MessageDecodeError(ShmqError, ValueError):
    """A message could not be decoded: get_obj() took one that put_obj() did not write, or a
    message's headers hold text that is not UTF-8 (a damaged or hostile publisher). The message
    is consumed."""


class InvalidTopic(ShmqError, ValueError):
    """A topic or subscription pattern is malformed; the message names the bad token."""

    def __init__(self, message: str, *, topic: str = "", token: str = "", index: int = -1) -> None:
        super().__init__(message)
        self.topic = topic  #: the whole topic or pattern
        self.token = token  #: the offending token ("" if the problem is the whole string)
        self.index = index  #: its position among the dot-separated tokens, -1 if none


class InvalidFilter(ShmqError, ValueError):
    """A where= filter expression does not parse; the message points at the position."""

    def __init__(self, message: str, *, expression: str = "", position: int = -1) -> None:
        super().__init__(message)
        self.expression = expression  #: the whole expression
        self.position = position  #: 0-based character offset of the problem, -1 if none


class NotFound(ShmqError, FileNotFoundError):
    """No segment has that name (attach with create=True to make one)."""


class AlreadyExists(ShmqError, FileExistsError):
    """A segment with that name exists already (attach with create=False, or unlink it)."""


class PermissionDenied(ShmqError, PermissionError):
    """The segment exists but this process may not open it."""


class RouterUnavailable(ShmqError, ConnectionError):
    """No router is serving the bus (not started, stopped, or restarting) within the timeout
    (also `ConnectionError`). Start one with ``shmq router BUS`` or ``shmq.Router(BUS)``."""


class LogWriteError(ShmqError, OSError):
    """The router could not write its durable log (a full disk, a file size limit, an I/O error;
    also `OSError`, with its errno). Nothing is lost: durable messages wait in their publishers'
    rings and the router retries; free space (or raise the limit) and they go on."""


class NotDurable(ShmqError, TimeoutError):
    """``fsync="always"``: the message was published but the router did not confirm it on disk
    within the timeout (also `TimeoutError`). It stays queued and is written when the router can;
    publish with a longer timeout, or check the router's log for why."""


class CorruptSegment(ShmqError):
    """The segment's bytes are not a valid shmq ring: wrong magic, bad size, damaged frames."""


class IncompatibleSegment(ShmqError, ValueError):
    """The segment is a valid ring of another layout version, kind or capacity than asked for."""


class Closed(ShmqError, ValueError):
    """The queue was closed by this process (like `multiprocessing.Queue`, also `ValueError`)."""


def native_error_classes() -> dict[str, type[BaseException]]:
    """The classes the native core raises, by the names it knows them by."""
    return {
        "ShmqError": ShmqError,
        "Full": Full,
        "Empty": Empty,
        "MessageTooLarge": MessageTooLarge,
        "CorruptSegment": CorruptSegment,
        "IncompatibleSegment": IncompatibleSegment,
        "Closed": Closed,
        "MessageTypeError": MessageTypeError,
        "InvalidArgument": InvalidArgument,
        "ArgumentTypeError": ArgumentTypeError,
        "MessageDecodeError": MessageDecodeError,
    }
