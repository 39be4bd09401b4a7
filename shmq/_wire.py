"""Byte formats of pub/sub that Python writes and C reads: headers and filter programs.

The message layout itself is written by the native publisher (shmq/_native/bus.h documents it);
this module encodes the two variable parts that come from Python objects:

* **Headers** (``publish(..., headers={...})``): entries of ``u8 key_len, key, u8 type, value``
  with type 1 str (``u16`` length + UTF-8), 2 int (``i64``), 3 float (``f64``), 4 bool (``u8``).
  Keys are non-empty str of at most 255 UTF-8 bytes; values are str, int (64-bit), float or bool.
  ``numpy`` integers and floats are accepted and stored as the Python int or float they equal, so
  filters see them as numbers (``numpy.bool_`` as a bool).
* **Filter programs**: `Filter.to_postfix` as bytes for the router's stack machine (opcodes in
  bus.h).
"""

from __future__ import annotations

import numbers
import struct
from collections.abc import Mapping
from typing import Any

from shmq._errors import ArgumentTypeError, InvalidArgument
from shmq.filters import Filter, Value

__all__ = ["encode_filter", "encode_headers", "encode_value"]

T_STR, T_INT, T_FLOAT, T_BOOL = 1, 2, 3, 4
OP_FIELD, OP_CONST, OP_CMP, OP_IN, OP_AND, OP_OR, OP_NOT = 1, 2, 3, 4, 5, 6, 7
_CMP_CODES = {"==": 0, "!=": 1, "<": 2, "<=": 3, ">": 4, ">=": 5}
MAX_HEADERS_BYTES = 65535
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_U16 = struct.Struct("<H")
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1


def _normalise(key: str, value: object) -> Value:
    """The header value as one of the four wire kinds, or ArgumentTypeError saying why not."""
    if isinstance(value, (str, bool)):
        return value
    dtype = getattr(value, "dtype", None)
    if dtype is not None and getattr(dtype, "kind", "") == "b" and getattr(value, "ndim", 1) == 0:
        return bool(value)  # numpy.bool_ is not a bool subclass
    if isinstance(value, numbers.Integral):
        number = int(value)
        if not _INT_MIN <= number <= _INT_MAX:
            raise InvalidArgument(f"header {key!r}: {number} does not fit in a signed 64-bit integer")
        return number
    if isinstance(value, numbers.Real):
        return float(value)
    raise ArgumentTypeError(
        f"header {key!r} has a value of type {type(value).__name__}; header values must be str, int, "
        "float or bool (put anything else in the payload)"
    )


def encode_value(value: Value) -> bytes:
    """One typed value: the type byte and the data."""
    if isinstance(value, bool):
        return bytes((T_BOOL, 1 if value else 0))
    if isinstance(value, int):
        return bytes((T_INT,)) + _I64.pack(value)
    if isinstance(value, float):
        return bytes((T_FLOAT,)) + _F64.pack(value)
    data = value.encode("utf-8", "surrogatepass")
    if len(data) > 65535:
        raise InvalidArgument(f"a header string of {len(data)} bytes is longer than the limit of 65535")
    return bytes((T_STR,)) + _U16.pack(len(data)) + data


def encode_headers(headers: Mapping[str, object]) -> bytes:
    """Headers as the router and subscribers read them (b"" for none)."""
    if not isinstance(headers, Mapping):
        raise ArgumentTypeError(
            f"headers must be a dict of str to str/int/float/bool, not {type(headers).__name__}"
        )
    out = bytearray()
    for key, value in headers.items():
        if not isinstance(key, str):
            raise ArgumentTypeError(f"header names must be str, got {type(key).__name__} {key!r}")
        raw = key.encode("utf-8", "surrogatepass")
        if not 1 <= len(raw) <= 255:
            raise InvalidArgument(f"header name {key!r} must have 1 to 255 bytes in UTF-8")
        out += bytes((len(raw),)) + raw + encode_value(_normalise(key, value))
    if len(out) > MAX_HEADERS_BYTES:
        raise InvalidArgument(
            f"headers take {len(out)} bytes encoded, more than the limit of {MAX_HEADERS_BYTES}; "
            "put bulky data in the payload"
        )
    return bytes(out)


def encode_filter(where: Filter) -> bytes:
    """The filter's postfix program as the router's stack machine reads it."""
    out = bytearray()
    for instruction in where.to_postfix():
        op = instruction[0]
        arg: Any = instruction[1] if len(instruction) > 1 else None
        if op == "field":
            raw = str(arg).encode("utf-8", "surrogatepass")
            if not 1 <= len(raw) <= 255:
                raise InvalidArgument(f"header name {arg!r} in the filter must have 1 to 255 bytes")
            out += bytes((OP_FIELD, len(raw))) + raw
        elif op == "const":
            out += bytes((OP_CONST,)) + encode_value(arg)
        elif op == "op":
            out += bytes((OP_CMP, _CMP_CODES[str(arg)]))
        elif op in ("in", "not in"):
            values: tuple[Value, ...] = arg
            out += bytes((OP_IN, 1 if op == "not in" else 0)) + _U16.pack(len(values))
            for value in values:
                out += encode_value(value)
        elif op == "and":
            out.append(OP_AND)
        elif op == "or":
            out.append(OP_OR)
        else:
            out.append(OP_NOT)
    return bytes(out)
