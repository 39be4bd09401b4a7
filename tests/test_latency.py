"""LatencyRecorder: percentiles against known sample sets (exact to the histogram's documented
precision), coordinated-omission correction, merging, and a recorder shared between processes
(recorded into by several at once, read by another, cleaned up by `shmq gc` once its creator is
gone)."""

from __future__ import annotations

import array
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hdrh.histogram import HdrHistogram
from hypothesis import given, settings
from hypothesis import strategies as st

import shmq
from shmq._segment import read_info
from shmq.testing import remove_segment, unique_name
from tests import _pubsub_workers as pw
from tests.conftest import CTX
from tests.test_cli import run_cli

pytestmark = pytest.mark.timeout(120)


def exact_percentile(samples: list[int], p: float) -> int:
    """The sample at HdrHistogram's rank for p: round(p% of n), at least the first."""
    ordered = sorted(samples)
    rank = max(1, int(p * len(ordered) / 100 + 0.5))
    return ordered[rank - 1]


def reported(rec: shmq.LatencyRecorder, value: int) -> int:
    """What the recorder reports for a percentile whose exact sample is `value`: the highest value
    of its bucket (the documented precision: within 10**-figures of it)."""
    return int(rec._hist.equivalent_range(value)[1])


@pytest.fixture
def name() -> Iterator[str]:
    n = unique_name("lat")
    yield n
    remove_segment(shmq.latency.SEGMENT_PREFIX + n)


def test_percentiles_of_a_known_sample_set() -> None:
    rec = shmq.LatencyRecorder()
    samples = list(range(1, 100_001))  # 1 ns .. 100 µs, one of each
    assert rec.record_many(samples) == len(samples)
    for p in (0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0):
        exact = exact_percentile(samples, p)
        got = rec.percentile(p)
        assert got == (reported(rec, exact) if p else int(rec._hist.equivalent_range(exact)[0]))
        assert exact <= got <= exact * 1.001 + 1 or p == 0
    s = rec.summary()
    assert (s.count, s.min, s.max) == (100_000, 1, 100_000)
    assert s.mean == pytest.approx(50_000.5)
    assert s.p50 == rec.percentile(50) and s.p9999 == rec.percentile(99.99)


@given(
    samples=st.lists(st.integers(0, 10**12), min_size=1, max_size=300),
    figures=st.integers(1, 4),
    p=st.floats(0.001, 100.0),
)
@settings(max_examples=200, deadline=None)
def test_any_percentile_is_the_exact_one_to_the_stated_precision(
    samples: list[int], figures: int, p: float
) -> None:
    rec = shmq.LatencyRecorder(highest_ns=10**12, significant_figures=figures)
    rec.record_many(samples)
    exact = exact_percentile(samples, p)
    got = rec.percentile(p)
    assert got == reported(rec, exact)
    assert exact <= got <= exact + exact / 10**figures + 1  # a bucket is at most 10**-figures wide


@given(
    samples=st.lists(st.integers(0, 3600 * 10**9), min_size=1, max_size=200),
    figures=st.integers(1, 4),
)
@settings(max_examples=100, deadline=None)
def test_percentiles_are_hdrhistograms(samples: list[int], figures: int) -> None:
    """The same buckets as the hdrhistogram package (the reference implementation's layout), so
    the same percentiles, min and max for the same samples."""
    rec = shmq.LatencyRecorder(significant_figures=figures)
    ref = HdrHistogram(1, shmq.latency.DEFAULT_HIGHEST_NS, figures)
    rec.record_many(samples)
    for v in samples:
        ref.record_value(v)
    for p in (0.0, 10.0, 50.0, 90.0, 99.0, 99.9, 100.0):
        assert rec.percentile(p) == ref.get_value_at_percentile(p), p
    assert (rec.summary().min, rec.summary().max) == (min(samples), max(samples))


def test_record_many_takes_buffers_and_iterables_and_refuses_what_is_not_a_sample() -> None:
    rec = shmq.LatencyRecorder()
    assert rec.record_many(array.array("q", [1, 2, 3])) == 3
    assert rec.record_many(np.array([4, 5], dtype=np.int64)) == 2
    assert rec.record_many(iter([6])) == 1
    assert rec.count == 6
    with pytest.raises(shmq.InvalidArgument, match="negative"):
        rec.record(-1)
    with pytest.raises(shmq.InvalidArgument, match="sample 1 is negative"):
        rec.record_many(np.array([7, -8], dtype=np.int64))
    with pytest.raises(shmq.ArgumentTypeError):
        rec.record_many(np.array([1.5], dtype=np.float64))
    with pytest.raises(shmq.ArgumentTypeError):
        rec.record("12")  # type: ignore[arg-type]
    with pytest.raises(shmq.InvalidArgument):
        rec.percentile(101)
    assert rec.count == 7  # (the 7 before the negative one)


def test_samples_above_the_range_are_clamped_and_counted() -> None:
    rec = shmq.LatencyRecorder(highest_ns=1_000_000)
    rec.record_many([10, 2_000_000, 5_000_000])
    assert rec.clamped == 2 and rec.count == 3
    assert rec.summary().max == 1_000_000


def test_an_empty_recorder_reports_zeros() -> None:
    s = shmq.LatencyRecorder().summary()
    assert (s.count, s.mean, s.min, s.p50, s.p9999, s.max) == (0, 0.0, 0, 0, 0, 0)


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(shmq.InvalidArgument, match="significant_figures"):
        shmq.LatencyRecorder(significant_figures=6)
    with pytest.raises(shmq.InvalidArgument):
        shmq.LatencyRecorder(highest_ns=1)


def test_coordinated_omission_is_corrected_as_hdrhistogram_does() -> None:
    """A sender meant to send every 100 µs stalled for 1 ms: the one sample it measured stands for
    the ten sends the stall held back, waiting 1 ms, 900 µs, ..., 100 µs."""
    fixed = shmq.LatencyRecorder()
    for _ in range(90):
        fixed.record_corrected(20_000, 100_000)  # on time: recorded as is
    fixed.record_corrected(1_000_000, 100_000)
    assert fixed.count == 100
    naive = shmq.LatencyRecorder()
    naive.record_many([20_000] * 90 + [1_000_000])
    assert naive.percentile(95) == reported(naive, 20_000)  # the stall hides
    assert fixed.percentile(95) >= 500_000  # and shows once corrected


def test_merge_is_the_recorder_of_all_the_samples() -> None:
    rng = random.Random(1)
    parts = [[int(rng.lognormvariate(10, 2)) for _ in range(5000)] for _ in range(3)]
    recs = [shmq.LatencyRecorder() for _ in parts]
    for rec, part in zip(recs, parts, strict=True):
        rec.record_many(part)
    whole = shmq.LatencyRecorder()
    whole.record_many([v for part in parts for v in part])
    merged = shmq.LatencyRecorder()
    for rec in recs:
        merged.merge(rec)
    assert merged.summary() == whole.summary()
    with pytest.raises(shmq.InvalidArgument, match="different ranges"):
        merged.merge(shmq.LatencyRecorder(significant_figures=2))


def test_a_closed_recorder_says_so() -> None:
    rec = shmq.LatencyRecorder()
    rec.close()
    with pytest.raises(shmq.Closed):
        rec.record(1)
    with pytest.raises(shmq.Closed):
        rec.summary()


# -- shared between processes ---------------------------------------------------------------------


def record_into(name: str, start: int, count: int) -> None:
    with shmq.LatencyRecorder(name) as rec:
        for v in range(start, start + count):
            rec.record(v)


def test_a_named_recorder_is_recorded_by_several_processes_and_read_by_another(name: str) -> None:
    with shmq.LatencyRecorder(name, create=True) as rec:
        workers = [CTX.Process(target=record_into, args=(name, 1 + i * 20_000, 20_000)) for i in range(3)]
        for p in workers:
            p.start()
        rec.record_many(range(60_001, 80_001))  # and this process at the same time
        for p in workers:
            p.join(60)
            assert p.exitcode == 0
        reader = shmq.LatencyRecorder(name)
        try:
            s = reader.summary()
            assert (s.count, s.min, s.max) == (80_000, 1, 80_000)  # no sample lost to a race
            assert s.p50 == reported(reader, 40_000)
            assert os.stat(f"/dev/shm/shmq.lat.{name}").st_mode & 0o777 == 0o600
        finally:
            reader.close()
    assert not os.path.exists(f"/dev/shm/shmq.lat.{name}")  # the creator's with-block unlinked it


def test_attaching_to_a_missing_recorder_says_how_to_make_it(name: str) -> None:
    with pytest.raises(shmq.NotFound, match="create=True"):
        shmq.LatencyRecorder(name)
    with shmq.LatencyRecorder(name, create=True), pytest.raises(shmq.AlreadyExists, match="open it with"):
        shmq.LatencyRecorder(name, create=True)
    with pytest.raises(shmq.ArgumentTypeError):
        shmq.LatencyRecorder(42)  # type: ignore[arg-type]


def make_and_die(name: str) -> None:
    rec = shmq.LatencyRecorder(name, create=True)
    rec.record(123)
    os._exit(0)  # gone without closing: the segment stays


def test_shmq_ls_lists_a_recorder_and_gc_removes_it_once_its_creator_is_gone(name: str) -> None:
    child = CTX.Process(target=make_and_die, args=(name,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    info = read_info(f"lat.{name}")
    assert info.kind == "latency" and info.valid and info.creator_pid == child.pid
    with shmq.LatencyRecorder(name) as left:  # still readable
        assert left.summary().count == 1
    result = run_cli("gc", "--yes", f"lat.{name}")
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(f"/dev/shm/shmq.lat.{name}"), result.stdout


# -- Subscriber(record_latency=...) -------------------------------------------------------------


def publish_numbered(bus: str, count: int) -> None:
    with shmq.Publisher(bus) as pub:
        for n in range(count):
            pub.publish("lat.x", n.to_bytes(4, "little"), timeout=30)
        assert pub.flush(30)


def read_count(name: str, out: str) -> None:
    with shmq.LatencyRecorder(name) as rec:
        s = rec.summary()
    with open(out, "w") as f:
        f.write(f"{s.count} {s.max}")


def test_a_subscriber_records_publish_to_receive_latency(tmp_path: Path) -> None:
    """record_latency="name": every message a publisher process sent is recorded once, on the
    publisher's clock, and another process reads the recorder while the subscriber lives; after
    the subscriber closes, its recorder is still readable here and its name is gone."""
    bus, rec_name = unique_name("latps"), unique_name("latsub")
    count = 500
    with pw.no_leaks(bus), shmq.Router(bus):
        with shmq.Subscriber(bus, "lat.>", record_latency=rec_name) as sub:
            publisher = CTX.Process(target=publish_numbered, args=(bus, count))
            publisher.start()
            got = [int.from_bytes(sub.recv(timeout=30).data, "little") for _ in range(count)]
            publisher.join(60)
            assert publisher.exitcode == 0 and got == list(range(count))
            assert sub.latency is not None
            s = sub.latency.summary()
            assert s.count == count and 0 < s.p50 <= s.max
            out = str(tmp_path / "count")
            reader = CTX.Process(target=read_count, args=(rec_name, out))
            reader.start()
            reader.join(60)
            assert reader.exitcode == 0
            assert Path(out).read_text() == f"{count} {s.max}"
        assert sub.latency.summary().count == count  # still readable after close
        assert not os.path.exists(f"/dev/shm/shmq.lat.{rec_name}")
        with shmq.Subscriber(bus, "lat.>") as plain:
            assert plain.latency is None
        with pytest.raises(shmq.ArgumentTypeError):
            shmq.Subscriber(bus, "lat.>", record_latency=1)  # type: ignore[arg-type]
