"""Latency measurement: `LatencyRecorder`, an HDR histogram of nanosecond samples.

Recording is constant time and allocation-free (~70 ns per `record()` call from Python, ~8 ns per
sample through `record_many()`), memory is bounded (270 KB at the default range of 1 ns to 1 hour
with 3 significant figures), and percentiles are HdrHistogram's to the same precision: a value
is reported as the highest value of its bucket, within 10**-figures of it (0.1 % by default).
The C core is shmq/_native/hist.c; docs/ARCHITECTURE.md, "Latency histograms", says why it is
not the hdrhistogram package (whose record is pure Python: 1.3 µs per sample measured here).

A recorder can live in shared memory under a name: `LatencyRecorder("md-feed", create=True)` in
the process that records, `LatencyRecorder("md-feed")` in any other to read it (or record into
it too: recording is a few atomic adds). Merge recorders of several processes with `merge()`.

Coordinated omission: when samples come from a sender that should have sent at a fixed rate,
`record_corrected(ns, interval_ns)` also records the sends a stall held back (each waited one
interval less), so a stall shows as the latency it caused instead of as one slow sample.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shmq._errors import AlreadyExists, ArgumentTypeError, InvalidArgument, NotFound
from shmq._native import _ring
from shmq._segment import Segment, set_mode, validate_mode

DEFAULT_HIGHEST_NS = 3_600_000_000_000  #: one hour
DEFAULT_SIGNIFICANT_FIGURES = 3
SEGMENT_PREFIX = "lat."  #: a named recorder's segment is /dev/shm/shmq.lat.<name>
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)
_CLOSED = _ring.Histogram.__new__(_ring.Histogram)  # every method raises Closed


def format_ns(ns: float) -> str:
    """A latency in nanoseconds, in the unit that suits it: '850ns', '12.3µs', '4.56ms', '1.2s'."""
    if ns < 1_000:
        return f"{ns:.0f}ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.3g}µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.3g}ms"
    return f"{ns / 1e9:.3g}s"


@dataclass(frozen=True)
class LatencySummary:
    """What `LatencyRecorder.summary()` reports; every figure is in nanoseconds."""

    count: int
    mean: float
    min: int
    p50: int
    p90: int
    p99: int
    p999: int
    p9999: int
    max: int

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class LatencyRecorder:
    """An HDR histogram of latencies in nanoseconds (see the module docstring).

    ``LatencyRecorder()`` is private to this process. ``LatencyRecorder(name, create=True)``
    makes a shared one (owner-only unless `mode` says otherwise); ``LatencyRecorder(name)``
    attaches to it from another process. `highest_ns` and `significant_figures` fix the range and
    precision when it is made; a sample above `highest_ns` is recorded as `highest_ns` and counted
    in `clamped`.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        create: bool = False,
        highest_ns: int = DEFAULT_HIGHEST_NS,
        significant_figures: int = DEFAULT_SIGNIFICANT_FIGURES,
        mode: int = 0o600,
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise ArgumentTypeError(f"a latency recorder's name is a str, got {type(name).__name__}")
        self._name = name
        self._segment: Segment | None = None
        self._owner = False
        if name is None or create:
            size = _ring.hist_size(highest_ns, significant_figures)
            if not size:
                raise InvalidArgument(
                    f"a latency recorder needs highest_ns >= 2 and significant_figures 1 to 5, got "
                    f"highest_ns={highest_ns}, significant_figures={significant_figures}"
                )
            if name is None:
                memory: Any = bytearray(size)
            else:
                validate_mode(mode)
                try:
                    self._segment = Segment.create(SEGMENT_PREFIX + name, size, mode)
                except AlreadyExists:
                    raise AlreadyExists(
                        f"a latency recorder {name!r} exists already; open it with "
                        f"LatencyRecorder({name!r}), or pick another name"
                    ) from None
                set_mode(SEGMENT_PREFIX + name, mode)
                self._owner = True
                memory = self._segment.mapping
            try:
                self._hist = _ring.Histogram(
                    memory, highest_ns, significant_figures, os.getpid(), time.time_ns()
                )
            except BaseException:
                self._discard()
                raise
        else:
            try:
                self._segment = Segment.attach(SEGMENT_PREFIX + name, _ring.HIST_HEADER)
            except NotFound:
                raise NotFound(
                    f"no latency recorder {name!r}; make it with LatencyRecorder({name!r}, create=True)"
                ) from None
            try:
                self._hist = _ring.Histogram(self._segment.mapping)
            except BaseException:
                self._segment.close()
                raise
        self._bind()

    def _bind(self) -> None:
        # The hot methods are the C ones themselves: no Python frame per sample.
        self.record = self._hist.record  # type: ignore[method-assign,assignment]
        self.record_many = self._hist.record_many  # type: ignore[method-assign,assignment]
        self.record_corrected = self._hist.record_corrected  # type: ignore[method-assign,assignment]

    # -- recording ------------------------------------------------------------------------------

    def record(self, ns: int) -> None:
        """Record one sample (ns >= 0)."""
        self._hist.record(ns)

    def record_many(self, samples: Iterable[int] | Any) -> int:
        """Record many samples: an int64 buffer (array('q'), a numpy int64 array) or any iterable
        of ints; returns how many."""
        return int(self._hist.record_many(samples))

    def record_corrected(self, ns: int, expected_interval_ns: int) -> None:
        """Record a sample from a fixed-rate sender that meant to send every
        `expected_interval_ns`: a sample longer than that also records the sends it held back
        (coordinated omission, corrected as HdrHistogram does)."""
        self._hist.record_corrected(ns, expected_interval_ns)

    def merge(self, other: LatencyRecorder) -> None:
        """Add every sample of `other` (same range and precision) to this recorder."""
        if not isinstance(other, LatencyRecorder):
            raise InvalidArgument(f"merge() takes a LatencyRecorder, got {type(other).__name__}")
        self._hist.add(other._hist)

    def reset(self) -> None:
        self._hist.reset()

    # -- reading --------------------------------------------------------------------------------

    def percentile(self, p: float) -> int:
        """The latency (ns) that `p` % of the samples did not exceed; 0 with no sample."""
        return int(self._hist.percentile(p))

    def summary(self) -> LatencySummary:
        c = self._hist.counters()
        count = int(c["count"])
        p50, p90, p99, p999, p9999 = (self.percentile(p) for p in PERCENTILES)
        return LatencySummary(
            count=count,
            mean=c["sum"] / count if count else 0.0,
            min=int(c["min"]),
            p50=p50,
            p90=p90,
            p99=p99,
            p999=p999,
            p9999=p9999,
            max=int(c["max"]),
        )

    @property
    def count(self) -> int:
        return int(self._hist.counters()["count"])

    @property
    def clamped(self) -> int:
        """Samples above `highest_ns` that this handle recorded as `highest_ns`."""
        return int(self._hist.counters()["clamped"])

    @property
    def highest_ns(self) -> int:
        return int(self._hist.counters()["highest"])

    @property
    def significant_figures(self) -> int:
        return int(self._hist.counters()["significant_figures"])

    @property
    def name(self) -> str | None:
        return self._name

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop using it here; a named recorder stays for the others (see `unlink`)."""
        self._hist = _CLOSED  # (releases the buffer before the unmap)
        self._bind()
        if self._segment is not None:
            self._segment.close()

    def unlink(self) -> None:
        """Remove a named recorder's name; processes that have it open keep their view."""
        if self._name is not None:
            Segment.unlink(SEGMENT_PREFIX + self._name)

    def _discard(self) -> None:
        if self._segment is not None:
            self._segment.close()
            if self._owner and self._name is not None:
                Segment.unlink(SEGMENT_PREFIX + self._name)

    def __enter__(self) -> LatencyRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close; the creating handle of a named recorder also unlinks it."""
        self.close()
        if self._owner:
            with contextlib.suppress(NotFound):
                self.unlink()

    def __repr__(self) -> str:
        s = self.summary()
        where = f" name={self._name!r}" if self._name else ""
        return f"<shmq.LatencyRecorder{where} count={s.count} p50={s.p50} p99={s.p99} max={s.max} ns>"
