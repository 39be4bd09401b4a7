"""The byte formats pub/sub shares between Python and C: headers and filter programs.

The router evaluates `where=` filters in C (bus.c) on encoded headers; these tests hold the C
stack machine to the documented semantics (the reference evaluator of test_filters.py) and feed
the C parsers arbitrary bytes, which must never crash them.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import shmq
from shmq._native import _ring
from shmq._wire import encode_filter, encode_headers
from shmq.filters import Filter, Node
from tests.test_filters import FEW_LITERALS, FEW_NAMES, FEW_TREE, reference

NAN = float("nan")
ENCODABLE = st.one_of(
    FEW_LITERALS, st.sampled_from([NAN, math.inf, -math.inf, 1 + 2**60, 2**63 - 1, -(2**63)])
)
HEADERS = st.dictionaries(FEW_NAMES, ENCODABLE, max_size=4)


@given(FEW_TREE, st.lists(HEADERS, min_size=1, max_size=8))
@settings(max_examples=400)
def test_native_filter_agrees_with_reference(tree: Node, many_headers: list[dict[str, Any]]) -> None:
    program = encode_filter(Filter.from_tree(tree))
    assert _ring.filter_check(program)
    for headers in many_headers:
        assert _ring.filter_eval(program, encode_headers(headers)) is reference(tree, headers), headers


@given(HEADERS)
def test_headers_round_trip(headers: dict[str, Any]) -> None:
    assert_headers_round_trip(headers)


def assert_headers_round_trip(headers: dict[str, Any]) -> None:
    """`headers` encoded and decoded is `headers`: same keys, types and values (NaN as NaN)."""
    decoded = _ring.decode_headers(encode_headers(headers))
    assert decoded.keys() == headers.keys()
    for key, value in headers.items():
        got = decoded[key]
        assert type(got) is type(value)
        assert got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got))


@pytest.mark.parametrize(
    ("text", "headers", "expected"),
    [
        # exact int/float comparison, as Python does it (2**53 + 1 is not a double)
        ("x == 9007199254740993", {"x": 9007199254740992.0}, False),
        ("x < 9007199254740993", {"x": 9007199254740992.0}, True),
        ("x > 1e300", {"x": 2**63 - 1}, False),
        ("x < -1e300", {"x": -(2**63)}, False),
        ("x != 1", {"x": NAN}, True),
        ("x == 1 or x != 1", {"x": NAN}, True),
        ("x < 1", {"x": NAN}, False),
        # kinds: bool is not a number, strings compare by code point
        ("x == 1", {"x": True}, False),
        ("x == true", {"x": True}, True),
        ("s < 'é'", {"s": "z"}, True),
        ("s in ('a', 1)", {"s": 1.0}, True),
        ("s not in ('a', 'b')", {"s": 1}, False),
        # numpy values are stored as the Python numbers they equal
        (
            "n > 4 and f < 1.5 and b == true",
            {"n": np.int64(5), "f": np.float32(1.25), "b": np.bool_(True)},
            True,
        ),
    ],
)
def test_native_filter_cases(text: str, headers: dict[str, Any], expected: bool) -> None:
    assert _ring.filter_eval(encode_filter(Filter.parse(text)), encode_headers(headers)) is expected


def test_duplicate_header_keys_last_wins_like_a_dict() -> None:
    # A dict cannot hold a key twice, but the wire can: the C lookup and the decoder agree.
    raw = encode_headers({"a": 1}) + encode_headers({"a": 2})
    assert _ring.decode_headers(raw) == {"a": 2}
    assert _ring.filter_eval(encode_filter(Filter.parse("a == 2")), raw)


@pytest.mark.parametrize(
    ("headers", "error", "text"),
    [
        ({"a": None}, shmq.ArgumentTypeError, "header 'a' has a value of type NoneType"),
        ({"a": [1]}, shmq.ArgumentTypeError, "str, int, float or bool"),
        ({"a": b"x"}, shmq.ArgumentTypeError, "value of type bytes"),
        ({"a": 2**63}, shmq.InvalidArgument, "does not fit in a signed 64-bit integer"),
        ({1: "x"}, shmq.ArgumentTypeError, "header names must be str"),
        ({"": "x"}, shmq.InvalidArgument, "1 to 255 bytes"),
        ({"k" * 256: "x"}, shmq.InvalidArgument, "1 to 255 bytes"),
        ({"a": "x" * 70000}, shmq.InvalidArgument, "longer than the limit of 65535"),
        ({f"k{i}": "x" * 1000 for i in range(70)}, shmq.InvalidArgument, "more than the limit of 65535"),
    ],
)
def test_bad_headers_say_why(headers: dict[Any, Any], error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        encode_headers(headers)


def test_headers_must_be_a_mapping() -> None:
    with pytest.raises(shmq.ArgumentTypeError, match="headers must be a dict"):
        encode_headers([("a", 1)])  # type: ignore[arg-type]


# -- the C parsers take arbitrary bytes without crashing ---------------------------------------


@given(st.binary(max_size=64))
@example(b"\x06\x00\x00\x00\x00\x00\x80\x01\x00\x00")  # text that is not UTF-8 (CI found it)
@settings(max_examples=500)
def test_fuzz_header_decoder(raw: bytes) -> None:
    try:
        decoded = _ring.decode_headers(raw)
    except shmq.CorruptSegment:
        return
    except shmq.MessageDecodeError:
        return  # well-formed entries whose text is not UTF-8
    assert isinstance(decoded, dict)


@given(st.binary(max_size=64), st.binary(max_size=32))
@settings(max_examples=500)
def test_fuzz_filter_programs(program: bytes, headers: bytes) -> None:
    if not _ring.filter_check(program):
        with pytest.raises(shmq.InvalidArgument):
            _ring.filter_eval(program, b"")
        return
    try:
        result = _ring.filter_eval(program, headers)
    except shmq.CorruptSegment:
        return
    assert result in (True, False)


@given(FEW_TREE, st.data())
@settings(max_examples=200)
def test_fuzz_mutated_programs(tree: Node, data: st.DataObject) -> None:
    program = bytearray(encode_filter(Filter.from_tree(tree)))
    for _ in range(data.draw(st.integers(1, 3))):
        if program:
            program[data.draw(st.integers(0, len(program) - 1))] = data.draw(st.integers(0, 255))
    if _ring.filter_check(bytes(program)):
        assert _ring.filter_eval(bytes(program), encode_headers({"a": 1, "b": "x"})) in (True, False)


def test_message_pickles_and_views_without_copy() -> None:
    msg = _ring._make_message("md.X.A", b"payload", 7, 123, encode_headers({"p": 1.5}), 99, 1)
    clone = pickle.loads(pickle.dumps(msg))
    assert clone == msg
    assert (clone.topic, clone.data, clone.seq, clone.timestamp_ns, clone.headers) == (
        "md.X.A",
        b"payload",
        7,
        123,
        {"p": 1.5},
    )
    assert clone.publisher_id == 99 and clone.last_value is True
    view = msg.view()
    assert view.readonly and view.obj is msg.data  # the message's own bytes: no copy
    assert msg.headers is not msg.headers  # a fresh dict each time: the message stays as received
