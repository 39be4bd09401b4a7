"""shmq: message queues between processes on one machine, through shared memory.

How the layers stack (bottom up):

  shmq/_native/ring.c      the ring engine in C11: claim, commit, read, release,
                           futex wait/wake. No Python, no allocation.
  shmq/_native/_ringmodule.c
                           the CPython binding: `Ring`, zero-copy slots, timeouts,
                           the GIL released while waiting, codes -> exceptions.
  shmq/_segment.py         naming and lifecycle of /dev/shm segments.
  shmq/queue.py            `Queue`, the public face (subclasses `Ring`), pickling,
                           objects, statistics; shmq/_async.py for asyncio.
  shmq/_native/bus.c       pub/sub in C: message format, filters, the router's
                           forwarding loop; _pubsub.c binds it (Message, Forwarder).
  shmq/topics.py, filters.py, _wire.py
                           topic patterns, where= filters, their byte formats.
  shmq/router.py           the router process (`Router`, `serve`): control plane.
  shmq/pubsub.py           `Publisher`, `Subscriber`: the clients of a bus.
  shmq/_bus.py             the bus segment, statistics, the control protocol.
  shmq/_native/hist.c      latency histograms (HDR layout, shared memory);
                           shmq/latency.py is `LatencyRecorder`.
  shmq/observe.py          snapshots and rates of queues and buses (shmq stat,
                           shmq top: shmq/top.py).
  shmq/cli.py              the `shmq` command.

docs/ARCHITECTURE.md has the byte layouts and the memory-ordering argument.
"""

from shmq import testing
from shmq._bus import BusStats, PublisherStats, SubscriberStats, TopicStats, bus_stats
from shmq._errors import (
    AlreadyExists,
    ArgumentTypeError,
    Closed,
    CorruptSegment,
    Empty,
    Full,
    IncompatibleSegment,
    InvalidArgument,
    InvalidFilter,
    InvalidTopic,
    LogWriteError,
    MessageDecodeError,
    MessageTooLarge,
    MessageTypeError,
    NotDurable,
    NotFound,
    PermissionDenied,
    RouterUnavailable,
    ShmqError,
)
from shmq._errors import native_error_classes as _native_error_classes
from shmq._native import _ring
from shmq.acl import Acl
from shmq.latency import LatencyRecorder, LatencySummary
from shmq.pubsub import Message, Publisher, Subscriber
from shmq.queue import Queue, QueueStats
from shmq.router import Router

_ring.set_error_classes(_native_error_classes())

__version__ = "0.1.0"

__all__ = [
    "Acl",
    "AlreadyExists",
    "ArgumentTypeError",
    "BusStats",
    "Closed",
    "CorruptSegment",
    "Empty",
    "Full",
    "IncompatibleSegment",
    "InvalidArgument",
    "InvalidFilter",
    "InvalidTopic",
    "LatencyRecorder",
    "LatencySummary",
    "LogWriteError",
    "Message",
    "MessageDecodeError",
    "MessageTooLarge",
    "MessageTypeError",
    "NotDurable",
    "NotFound",
    "PermissionDenied",
    "Publisher",
    "PublisherStats",
    "Queue",
    "QueueStats",
    "Router",
    "RouterUnavailable",
    "ShmqError",
    "Subscriber",
    "SubscriberStats",
    "TopicStats",
    "__version__",
    "bus_stats",
    "testing",
]
