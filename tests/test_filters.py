"""The where= filter language: parsing, canonical text, evaluation, postfix programs, errors.

Table tests pin the grammar, the trees, the truth tables (missing headers, mismatched types)
and the exact error positions. Hypothesis checks the properties: generated trees survive
str -> parse; `matches` agrees with a reference evaluator written here from the documented
semantics, and with a tiny stack machine running `to_postfix()`; arbitrary and mutated text
only ever raises InvalidFilter.
"""

from __future__ import annotations

import builtins
import enum
import math
import pickle
import re
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import shmq
from shmq import filters
from shmq.filters import (
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_LIST,
    And,
    Compare,
    Filter,
    In,
    Instruction,
    Node,
    Not,
    Or,
    Value,
    compile_filter,
)

pytestmark = pytest.mark.timeout(60)

MISSING = object()


def tree(text: str) -> Node:
    return compile_filter(text).tree


def c(field: str, op: Any, literal: Value) -> Compare:
    return Compare(field, op, literal)


# -- parsing: text -> tree ------------------------------------------------------

PARSES: list[tuple[str, Node]] = [
    ("venue == 'XNAS'", c("venue", "==", "XNAS")),
    ('venue=="XNAS"', c("venue", "==", "XNAS")),
    ("a != 1", c("a", "!=", 1)),
    ("a < 1.5", c("a", "<", 1.5)),
    ("a <= -2", c("a", "<=", -2)),
    ("a > 1e3", c("a", ">", 1000.0)),
    ("a >= -1.5E-2", c("a", ">=", -0.015)),
    ("a >= 2e+2", c("a", ">=", 200.0)),
    ("a == 007", c("a", "==", 7)),
    ("a == -0", c("a", "==", 0)),
    ("flag == true", c("flag", "==", True)),
    ("flag != FALSE", c("flag", "!=", False)),
    ("md.venue == 'X'", c("md.venue", "==", "X")),
    ("content-type == 'json'", c("content-type", "==", "json")),
    ("_x9.y-z == 1", c("_x9.y-z", "==", 1)),
    ("`content type` == 'json'", c("content type", "==", "json")),
    ("`and` == 1", c("and", "==", 1)),
    ("`a\\`b\\\\c` == 1", c("a`b\\c", "==", 1)),
    ("`ünï` == 1", c("ünï", "==", 1)),
    ("a == 'it\\'s'", c("a", "==", "it's")),
    ('a == "say \\"hi\\""', c("a", "==", 'say "hi"')),
    ("a == 'tab\\tnl\\ncr\\rbs\\\\'", c("a", "==", "tab\tnl\ncr\rbs\\")),
    ("a == 'x\\`y'", c("a", "==", "x`y")),
    ("a == ''", c("a", "==", "")),
    ("a == 'ünï\x00'", c("a", "==", "ünï\x00")),
    ("a == 'two\nlines'", c("a", "==", "two\nlines")),
    ("100 < price", c("price", ">", 100)),
    ("100 <= price", c("price", ">=", 100)),
    ("'X' == venue", c("venue", "==", "X")),
    ("true != flag", c("flag", "!=", True)),
    ("side in ('B', 'S')", In("side", ("B", "S"))),
    ("side in ['B']", In("side", ("B",))),
    ("side in ('B',)", In("side", ("B",))),
    ("side in (1, 'B', true, 2.5)", In("side", (1, "B", True, 2.5))),
    ("side not in ('B')", In("side", ("B",), negated=True)),
    ("side NOT IN [1, 2,]", In("side", (1, 2), negated=True)),
    ("not a == 1", Not(c("a", "==", 1))),
    ("not not a == 1", Not(Not(c("a", "==", 1)))),
    ("not a in (1)", Not(In("a", (1,)))),
    ("a == 1 and b == 2", And((c("a", "==", 1), c("b", "==", 2)))),
    ("a == 1 AND b == 2 And c == 3", And((c("a", "==", 1), c("b", "==", 2), c("c", "==", 3)))),
    ("a == 1 or b == 2 or c == 3", Or((c("a", "==", 1), c("b", "==", 2), c("c", "==", 3)))),
    # precedence: or < and < not < comparison
    (
        "a == 1 or b == 2 and c == 3",
        Or((c("a", "==", 1), And((c("b", "==", 2), c("c", "==", 3))))),
    ),
    (
        "a == 1 and b == 2 or c == 3",
        Or((And((c("a", "==", 1), c("b", "==", 2))), c("c", "==", 3))),
    ),
    (
        "not a == 1 and b == 2",
        And((Not(c("a", "==", 1)), c("b", "==", 2))),
    ),
    (
        "not (a == 1 and b == 2)",
        Not(And((c("a", "==", 1), c("b", "==", 2)))),
    ),
    (
        "(a == 1 or b == 2) and c == 3",
        And((Or((c("a", "==", 1), c("b", "==", 2))), c("c", "==", 3))),
    ),
    # parentheses are kept as written: no flattening across them
    (
        "(a == 1 and b == 2) and c == 3",
        And((And((c("a", "==", 1), c("b", "==", 2))), c("c", "==", 3))),
    ),
    ("((((a == 1))))", c("a", "==", 1)),
    ("\t a\n==\r\n1 \f", c("a", "==", 1)),
    # keywords are whole words only: these are header names
    ("and.x == 1", c("and.x", "==", 1)),
    ("notes == 1", c("notes", "==", 1)),
    ("in-x == 1", c("in-x", "==", 1)),
    ("truex == 1", c("truex", "==", 1)),
    ("x-1 == 1", c("x-1", "==", 1)),
    ("a>-1", c("a", ">", -1)),
    ("a in(1,-2)", In("a", (1, -2))),
    ("a=='x'and b=='y'", And((c("a", "==", "x"), c("b", "==", "y")))),
    (
        "venue == 'XNAS' and price > 100.5 and side in ('B', 'S')",
        And((c("venue", "==", "XNAS"), c("price", ">", 100.5), In("side", ("B", "S")))),
    ),
]


@pytest.mark.parametrize(("text", "expected"), PARSES, ids=[t for t, _ in PARSES])
def test_parse_gives_tree(text: str, expected: Node) -> None:
    f = compile_filter(text)
    assert f.tree == expected
    assert f.text == text
    # and the canonical text gives the same tree again
    assert tree(str(f)) == expected


CANONICAL = [
    ("a==1", "a == 1"),
    ("A  ==  'x'", "A == 'x'"),
    ('a == "q\'\\""', "a == 'q\\'\"'"),
    ("a == 'tab\\t'", "a == 'tab\\t'"),
    ("a == 1E3", "a == 1000.0"),
    ("a == 1e22", "a == 1e+22"),
    ("a == -0.0", "a == -0.0"),
    ("100 < price", "price > 100"),
    ("x IN [1,2,]", "x in (1, 2)"),
    ("x Not In ['a']", "x not in ('a')"),
    ("flag == TRUE", "flag == true"),
    ("NOT (a == 1 AND b == 2)", "not (a == 1 and b == 2)"),
    ("((a == 1) or (b == 2))", "a == 1 or b == 2"),
    ("a == 1 or (b == 2 and c == 3)", "a == 1 or b == 2 and c == 3"),
    ("(a == 1 or b == 2) and c == 3", "(a == 1 or b == 2) and c == 3"),
    ("(a == 1 and b == 2) and c == 3", "(a == 1 and b == 2) and c == 3"),
    ("not (not a == 1)", "not not a == 1"),
    ("`plain` == 1", "plain == 1"),
    ("`In` == 1", "`In` == 1"),
    ("`a b` == 1", "`a b` == 1"),
    ("`9lives` == 1", "`9lives` == 1"),
    ("`nl\\n` == 1", "`nl\\n` == 1"),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL)
def test_canonical_text(text: str, canonical: str) -> None:
    f = compile_filter(text)
    assert str(f) == canonical
    assert str(f.tree) == canonical
    assert repr(f) == f"Filter({canonical!r})"
    assert str(compile_filter(canonical)) == canonical


def test_keyword_headers_need_backquotes_in_any_case() -> None:
    for word in ["and", "OR", "Not", "in", "TRUE", "false"]:
        f = compile_filter(f"`{word}` == 1")
        assert f.tree == c(word, "==", 1)
        assert str(f) == f"`{word}` == 1"
        assert f.matches({word: 1})


def test_literal_types_are_part_of_tree_equality() -> None:
    trees = [c("x", "==", 1), c("x", "==", 1.0), c("x", "==", True)]
    assert len(set(trees)) == 3
    assert trees[0] != trees[1] != trees[2] != trees[0]
    assert In("x", (1,)) != In("x", (True,)) != In("x", (1.0,))
    assert tree("x == 1") != tree("x == 1.0")
    assert hash(tree("x in (1, 'a')")) == hash(In("x", (1, "a")))
    assert Compare("x", "==", 1) != "x == 1"


# -- evaluation -------------------------------------------------------------------

NAN = float("nan")


class Side(enum.StrEnum):
    BUY = "B"


class Qty(enum.IntEnum):
    TEN = 10


TRUTH: list[tuple[str, dict[str, object], bool]] = [
    ("venue == 'XNAS'", {"venue": "XNAS"}, True),
    ("venue == 'XNAS'", {"venue": "xnas"}, False),
    ("venue == 'XNAS'", {}, False),
    ("venue != 'XNAS'", {"venue": "BATS"}, True),
    ("venue != 'XNAS'", {}, False),  # missing: every test is False, != too
    ("not venue == 'XNAS'", {}, True),  # ... but not of a test is True
    ("venue != 'XNAS'", {"venue": 1}, False),  # mismatched kinds: False, != too
    ("not venue == 'XNAS'", {"venue": 1}, True),
    ("price > 100.5", {"price": 101}, True),
    ("price > 100.5", {"price": 100.5}, False),
    ("price >= 100.5", {"price": 100.5}, True),
    ("price == 100", {"price": 100.0}, True),  # int and float mix
    ("price == 100.0", {"price": 100}, True),
    ("price < 2", {"price": 2**70}, False),
    ("price == 9007199254740993", {"price": 9007199254740992.0}, False),  # exact, not via float
    ("price > 100", {"price": "200"}, False),  # no coercion
    ("price != 100", {"price": "100"}, False),
    ("price < 'b'", {"price": 1}, False),
    ("name < 'b'", {"name": "a"}, True),
    ("name < 'b'", {"name": "B"}, True),  # code point order: 'B' < 'b'
    ("name >= 'b'", {"name": "ba"}, True),
    ("name < 'b'", {"name": ""}, True),
    ("name == 'é'", {"name": "é"}, True),
    ("flag == true", {"flag": True}, True),
    ("flag == true", {"flag": 1}, False),  # bool is not a number
    ("flag != true", {"flag": 1}, False),
    ("flag != true", {"flag": False}, True),
    ("n == 1", {"n": True}, False),
    ("n != 1", {"n": True}, False),
    ("n >= 0", {"n": False}, False),
    ("n == 0", {"n": None}, False),  # other types match nothing
    ("n != 0", {"n": None}, False),
    ("n != 'a'", {"n": b"a"}, False),
    ("n in ('a', 0)", {"n": None}, False),
    ("n not in ('a', 0)", {"n": None}, False),
    ("n == 1", {"n": NAN}, False),  # NaN follows IEEE 754
    ("n != 1", {"n": NAN}, True),
    ("n < 1", {"n": NAN}, False),
    ("n not in (1, 2)", {"n": NAN}, True),
    ("n in (1, 2)", {"n": NAN}, False),
    ("side == 'B'", {"side": Side.BUY}, True),  # subclasses keep their kind
    ("qty > 5", {"qty": Qty.TEN}, True),
    ("side in ('B', 'S')", {"side": "S"}, True),
    ("side in ('B', 'S')", {"side": "X"}, False),
    ("side in ('B', 'S')", {}, False),
    ("side not in ('B', 'S')", {"side": "X"}, True),
    ("side not in ('B', 'S')", {"side": "B"}, False),
    ("side not in ('B', 'S')", {}, False),  # missing
    ("not side in ('B', 'S')", {}, True),
    ("side not in ('B', 'S')", {"side": 1}, False),  # no literal of its kind
    ("side not in ('B', 1)", {"side": "X"}, True),  # one literal of its kind is enough
    ("side not in ('B', 1)", {"side": 2.0}, True),
    ("side not in ('B', 1)", {"side": 1.0}, False),
    ("side not in ('B', 1)", {"side": True}, False),
    ("side in (1, 2)", {"side": 2.0}, True),
    ("side in (1, 2)", {"side": True}, False),
    ("side in (true)", {"side": 1}, False),
    ("side in (true)", {"side": True}, True),
    ("side in (0.0)", {"side": -0.0}, True),
    ("a == 1 and b == 2", {"a": 1, "b": 2}, True),
    ("a == 1 and b == 2", {"a": 1}, False),
    ("a == 1 or b == 2", {"b": 2}, True),
    ("a == 1 or b == 2", {}, False),
    ("not (a == 1 or b == 2)", {}, True),
    ("a == 1 and b == 2 and c == 3 and d == 4", {"a": 1, "b": 2, "c": 3, "d": 4}, True),
    ("a == 1 and b == 2 and c == 3 and d == 4", {"a": 1, "b": 2, "c": 3}, False),
    ("a == 1 or b == 2 or c == 3 or d == 4", {"d": 4}, True),
    ("a == 1 or b == 2 or c == 3 or d == 4", {"e": 4}, False),
    ("md.venue == 'X'", {"md.venue": "X"}, True),
    ("md.venue == 'X'", {"md": {"venue": "X"}}, False),  # dots are part of the name
    ("`a b` == 1", {"a b": 1}, True),
    (
        "venue == 'XNAS' and price > 100.5 and side in ('B', 'S')",
        {"venue": "XNAS", "price": 101, "side": "B", "other": 1},
        True,
    ),
    (
        "venue == 'XNAS' and price > 100.5 and side in ('B', 'S')",
        {"venue": "XNAS", "price": 101, "side": "b"},
        False,
    ),
]


@pytest.mark.parametrize(("text", "headers", "expected"), TRUTH)
def test_truth_table(text: str, headers: dict[str, object], expected: bool) -> None:
    f = compile_filter(text)
    assert f.matches(headers) is expected
    assert reference(f.tree, headers) is expected
    assert run_postfix(f.to_postfix(), headers) is expected
    assert compile_filter(str(f)).matches(headers) is expected


def test_matches_takes_any_mapping() -> None:
    f = compile_filter("a == 1 and b in ('x')")
    assert f.matches(types.MappingProxyType({"a": 1, "b": "x"}))
    assert not f.matches(types.MappingProxyType({"a": 1}))


def test_fields() -> None:
    f = compile_filter("a == 1 and (b in (1) or not `c d` != 'x') and a < 5")
    assert f.fields == frozenset({"a", "b", "c d"})
    assert compile_filter("x == 1").fields == {"x"}


def test_postfix_program_shape() -> None:
    f = compile_filter("venue == 'XNAS' and not (price > 1 or side not in ('B', 2))")
    assert f.to_postfix() == (
        ("field", "venue"),
        ("const", "XNAS"),
        ("op", "=="),
        ("field", "price"),
        ("const", 1),
        ("op", ">"),
        ("field", "side"),
        ("not in", ("B", 2)),
        ("or",),
        ("not",),
        ("and",),
    )
    assert compile_filter("a == 1 and b == 2 and c == 3").to_postfix()[-5:] == (
        ("and",),
        ("field", "c"),
        ("const", 3),
        ("op", "=="),
        ("and",),
    )


# -- the Filter object ------------------------------------------------------------


def test_filter_equality_is_by_tree_not_spelling() -> None:
    a = compile_filter("a==1 AND b=='x'")
    b = compile_filter('a == 1 and b == "x"')
    assert a == b and hash(a) == hash(b) and a.text != b.text
    assert a != compile_filter("a == 1 and b == 'y'")
    assert len({a, b}) == 1


def test_filter_is_frozen_and_pickles_as_its_text() -> None:
    f = compile_filter("a in (1, 'x') and not b == true")
    with pytest.raises(AttributeError):
        f.text = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        f.tree.operands = ()  # type: ignore[misc, union-attr]
    g = pickle.loads(pickle.dumps(f))
    assert g == f and g.text == f.text and g.matches({"a": "x", "b": False})


def test_compile_filter_entry_points() -> None:
    f = compile_filter("a == 1")
    assert compile_filter(f) is f
    assert Filter.parse("a == 1") == f
    assert filters.Filter is shmq.filters.Filter
    with pytest.raises(shmq.ArgumentTypeError, match="must be a str, not bytes"):
        compile_filter(b"a == 1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Filter.parse(None)  # type: ignore[arg-type]


def test_from_tree_renders_and_validates() -> None:
    t = And((c("a b", "==", 1), Not(Or((In("in", (True, "x")), c("y", "<", -2.5))))))
    f = Filter.from_tree(t)
    assert f.tree == t
    assert f.text == "`a b` == 1 and not (`in` in (true, 'x') or y < -2.5)"
    deep: Node = c("x", "==", 1)
    for _ in range(MAX_DEPTH + 1):
        deep = Not(deep)
    with pytest.raises(shmq.InvalidFilter, match="nesting too deep"):
        Filter.from_tree(deep)
    with pytest.raises(shmq.ArgumentTypeError):
        Filter.from_tree("a == 1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Compare("x", "=", 1), "unknown comparison operator '='"),  # type: ignore[arg-type]
        (lambda: Compare("x", "<", True), "true and false compare only with == and !="),
        (lambda: Compare("", "==", 1), "cannot be empty"),
        (lambda: Compare(1, "==", 1), "must be a str, not int"),  # type: ignore[arg-type]
        (lambda: Compare("x", "==", None), "not NoneType"),  # type: ignore[arg-type]
        (lambda: Compare("x", "==", Qty.TEN), "not Qty"),
        (lambda: Compare("x", "==", math.inf), "must be finite"),
        (lambda: Compare("x", "==", math.nan), "must be finite"),
        (lambda: Compare("x", "==", 2**63), "must fit in 64 bits"),
        (lambda: In("x", ()), "holds 1 to 1024 literals, not 0"),
        (lambda: In("x", (0,) * (MAX_LIST + 1)), "not 1025"),
        (lambda: In("x", (b"x",)), "not bytes"),  # type: ignore[arg-type]
        (lambda: In("x", (1,), 1), "negated must be a bool"),  # type: ignore[arg-type]
        (lambda: And((c("x", "==", 1),)), "at least 2 operands, not 1"),
        (lambda: Or(()), "at least 2 operands, not 0"),
        (lambda: And((c("x", "==", 1), "x == 1")), "must be filter nodes, not str"),  # type: ignore[arg-type]
        (lambda: Not("x"), "must be a filter node, not str"),  # type: ignore[arg-type]
    ],
)
def test_nodes_validate_themselves(make: Any, message: str) -> None:
    with pytest.raises(shmq.InvalidFilter, match=re.escape(message)) as info:
        make()
    assert info.value.position == -1


def test_nodes_accept_lists_and_store_tuples() -> None:
    assert In("x", [1, 2]).values == (1, 2)  # type: ignore[arg-type]
    assert And([c("x", "==", 1), c("y", "==", 2)]).operands == (c("x", "==", 1), c("y", "==", 2))  # type: ignore[arg-type]
    assert Compare("x", "==", -(2**63)).literal == -(2**63)


def test_no_eval_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("eval/exec/compile called")

    with monkeypatch.context() as patch:
        for name in ("eval", "exec", "compile", "__import__"):
            patch.setattr(builtins, name, forbidden)
        f = Filter.parse("__import__ == 'os' or a in (1, 'x') and not b < 2.5")
        matched = f.matches({"__import__": "os"})
        str(f), f.to_postfix()
    assert matched
    source = Path(filters.__file__).read_text(encoding="utf-8")
    for banned in ("eval(", "exec(", "literal_eval", "compile(", "import ast"):
        assert banned not in source.replace("re.compile(", "")


# -- errors -----------------------------------------------------------------------

ERRORS = [
    # (text, position, message start)
    ("", 0, "unexpected end of expression at position 0: expected a header name, a literal, 'not' or '('"),
    ("   ", 3, "unexpected end of expression at position 3"),
    ("venue", 5, "unexpected end of expression at position 5: expected a comparison operator, 'in' or"),
    ("venue ==", 8, "unexpected end of expression at position 8: expected a literal"),
    ("venue == and price > 1", 9, "unexpected 'and' at position 9: expected a literal"),
    ("venue == 'XNAS' and", 19, "unexpected end of expression at position 19: expected a header name"),
    ("venue == 'XNAS' AND OR x == 1", 20, "unexpected 'OR' at position 20"),
    ("a < b < c", 6, "comparisons do not chain at position 6: join them with 'and'"),
    ("a < 1 < 2", 6, "comparisons do not chain at position 6"),
    ("1 < a < 2", 6, "comparisons do not chain at position 6"),
    ("1 < 2 < a", 6, "comparisons do not chain at position 6"),
    ("a == 1 == true", 7, "comparisons do not chain at position 7"),
    ("(a == 1) == 2", 9, "comparisons do not chain at position 9"),
    ("a in (1) < 2", 9, "comparisons do not chain at position 9"),
    ("a == b", 5, "cannot compare two header names at position 5"),
    ("1 == 2", 5, "cannot compare two literals at position 5"),
    ("'x'", 3, "unexpected end of expression at position 3: expected a comparison operator after"),
    ("1 in (1)", 0, "'in' needs a header name on its left at position 0"),
    ("'a' not in ('a')", 0, "'not' needs a header name on its left at position 0"),
    ("flag < true", 7, "'<' does not apply to true at position 7: booleans take only == and !="),
    ("FALSE >= flag", 0, "'>=' does not apply to FALSE at position 0"),
    ("x = 1", 2, "unexpected character '=' at position 2: use '==' to compare"),
    ("x == 1 && y == 2", 7, "unexpected character '&' at position 7: use 'and'"),
    ("x == 1 || y == 2", 7, "unexpected character '|' at position 7: use 'or'"),
    ("!x == 1", 0, "unexpected character '!' at position 0: use 'not' or '!='"),
    ("x <> 1", 3, "unexpected '>' at position 3: expected a literal"),
    ("x == $1", 5, "unexpected character '$' at position 5"),
    ("x == 1\x00", 6, "unexpected character U+0000 at position 6"),
    ("x == ٣", 5, "unexpected character '٣' at position 5"),  # only ASCII digits
    ("ünï == 1", 0, "unexpected character 'ü' at position 0"),
    ("x == -y", 5, "unexpected character '-' at position 5"),
    ("x == .5", 5, "unexpected character '.' at position 5"),
    ("x == +5", 5, "unexpected character '+' at position 5"),
    ("x == 1.", 5, "malformed number at position 5: '1.' runs into '.'"),
    ("x == 1.2.3", 5, "malformed number at position 5"),
    ("x == 1e", 5, "malformed number at position 5"),
    ("x == 1_000", 5, "malformed number at position 5"),
    ("x == 1and y == 2", 5, "malformed number at position 5"),
    ("x == 9223372036854775808", 5, "number out of range at position 5: 9223372036854775808 does not fit"),
    ("x == -9223372036854775809", 5, "number out of range at position 5"),
    ("x == 1" + "0" * 4000, 5, "number out of range at position 5"),
    ("x == 1e309", 5, "number out of range at position 5: 1e309 is too large for a float"),
    ("x == 'abc", 5, "unterminated string at position 5: no closing ' after it"),
    ('x == "abc\\"', 5, 'unterminated string at position 5: no closing " after it'),
    ("x == 'abc\\", 5, "unterminated string at position 5"),
    ("`abc == 1", 0, "unterminated header name at position 0: no closing ` after it"),
    ("x == 'a\\qb'", 7, "unknown escape '\\q' at position 7: escapes are"),
    ("x == 'a\\x41'", 7, "unknown escape '\\x' at position 7"),
    ("`` == 1", 0, "empty header name at position 0"),
    ("x in ()", 6, "empty list at position 6: 'in' needs at least one literal"),
    ("x not in []", 10, "empty list at position 10: 'in' needs at least one literal"),
    ("x in 1", 5, "unexpected number 1 at position 5: expected '(' or '[' to start the list after 'in'"),
    ("x in 'a'", 5, "unexpected string 'a' at position 5"),
    ("x in (1, 2]", 10, "unexpected ']' at position 10: expected ',' or ')'"),
    ("x in [1 2]", 8, "unexpected number 2 at position 8: expected ',' or ']'"),
    ("x in (1,,2)", 8, "unexpected ',' at position 8: expected a literal"),
    ("x in (,)", 6, "unexpected ',' at position 6: expected a literal"),
    ("x in (y)", 6, "'y' in a list at position 6: a list holds literals only"),
    ("x in (`y`)", 6, "the header name `y` in a list at position 6"),
    ("x in ((1))", 6, "unexpected '(' at position 6: expected a literal"),
    ("x in (1", 7, "unexpected end of expression at position 7: expected ',' or ')'"),
    ("x not == 1", 6, "unexpected '==' at position 6: expected 'in' after 'x' not"),
    ("x not", 5, "unexpected end of expression at position 5: expected 'in' after 'x' not"),
    (
        "x is 1",
        2,
        "unexpected 'is' at position 2: expected a comparison operator, 'in' or 'not in' after 'x'",
    ),
    ("x == 1 y == 2", 7, "unexpected 'y' at position 7: expected 'and', 'or' or the end"),
    ("x == 1)", 6, "unexpected ')' at position 6: expected 'and', 'or' or the end"),
    (
        "(x == 1",
        7,
        "unexpected end of expression at position 7: expected 'and', 'or' or ')' to close the '('",
    ),
    (
        "((x == 1)",
        9,
        "unexpected end of expression at position 9: expected 'and', 'or' or ')' to close the '('",
    ),
    ("()", 1, "unexpected ')' at position 1: expected a header name"),
    ("not", 3, "unexpected end of expression at position 3"),
    ("x == not", 5, "unexpected 'not' at position 5: expected a literal"),
    ("and == 1", 0, "unexpected 'and' at position 0"),
    ("x == true false", 10, "unexpected 'false' at position 10: expected 'and', 'or' or the end"),
]


@pytest.mark.parametrize(("text", "position", "message"), ERRORS, ids=[repr(e[0][:30]) for e in ERRORS])
def test_errors_point_at_the_position(text: str, position: int, message: str) -> None:
    with pytest.raises(shmq.InvalidFilter) as info:
        compile_filter(text)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, shmq.ShmqError)
    assert err.position == position
    assert err.expression == text
    assert str(err).startswith(message), str(err)
    check_caret(err)


def check_caret(err: shmq.InvalidFilter) -> None:
    """The message ends with the line of the expression and a caret under the position."""
    text, pos = err.expression, err.position
    lines = str(err).split("\n")
    assert len(lines) == 3
    assert lines[0].startswith("") and f" at position {pos}" in lines[0]
    shown, caret = lines[1], lines[2]
    assert caret.endswith("^") and set(caret[:-1]) <= {" "}
    col = len(caret) - 1
    if pos == len(text) and "\n" in text[len(text.rstrip()) :]:
        pos = len(text.rstrip())  # shown just past the last token
    line_start = text.rfind("\n", 0, pos) + 1
    line_end = text.find("\n", pos)
    line = text[line_start : line_end if line_end >= 0 else len(text)]
    if len(line) <= 100:
        printable = "".join(ch if ch.isprintable() else " " for ch in line)
        assert shown == "  " + printable
        assert col == 2 + pos - line_start
    else:  # a window of a long line, cut with '...'
        assert "..." in shown and len(shown) <= 2 + 3 + 100 + 3
        assert 2 <= col <= len(shown)


def test_error_message_exact_shape() -> None:
    with pytest.raises(shmq.InvalidFilter) as info:
        compile_filter("venue == and price > 1")
    assert str(info.value) == (
        "unexpected 'and' at position 9: expected a literal\n  venue == and price > 1\n           ^"
    )
    with pytest.raises(shmq.InvalidFilter) as info:
        compile_filter("a < b < c")
    assert str(info.value) == (
        "comparisons do not chain at position 6: join them with 'and': 'a < b and b < c'\n"
        "  a < b < c\n"
        "        ^"
    )


def test_error_in_a_multi_line_expression_shows_its_line() -> None:
    text = "venue == 'XNAS'\n  and\tprice >> 1\n  and side == 'B'"
    with pytest.raises(shmq.InvalidFilter) as info:
        compile_filter(text)
    assert info.value.position == text.index(">>") + 1
    assert str(info.value).split("\n")[1:] == ["    and price >> 1", "               ^"]


def test_unexpected_end_after_a_newline_points_past_the_last_token() -> None:
    text = "venue == 'XNAS' and\n  price >\n\n"
    with pytest.raises(shmq.InvalidFilter) as info:
        compile_filter(text)
    assert info.value.position == len(text)
    assert str(info.value).split("\n")[1:] == ["    price >", "           ^"]


def test_error_in_a_long_line_shows_a_window() -> None:
    text = " and ".join(f"a{i} == {i}" for i in range(200)) + " and b === 1"
    with pytest.raises(shmq.InvalidFilter) as info:
        compile_filter(text)
    err = info.value
    assert err.position == len(text) - 3
    shown, caret = str(err).split("\n")[1:]
    assert shown.startswith("  ...") and shown.endswith("b === 1")
    assert shown[len(caret) - 1] == "="
    check_caret(err)


# -- limits -----------------------------------------------------------------------


def test_length_limit() -> None:
    ok = "x == '" + "a" * (MAX_LENGTH - 7) + "'"
    assert len(ok) == MAX_LENGTH
    compile_filter(ok)
    with pytest.raises(shmq.InvalidFilter, match="expression too long at position 4096") as info:
        compile_filter(ok + " ")
    assert info.value.position == MAX_LENGTH
    check_caret(info.value)


@pytest.mark.parametrize(
    "build",
    [
        lambda n: "(" * n + "x == 1" + ")" * n,
        lambda n: "not " * n + "x == 1",
        lambda n: "(not " * (n // 2) + "not " * (n % 2) + "x == 1" + ")" * (n // 2),
        lambda n: "".join(f"(a{i} == 1 or " for i in range(n)) + "x == 1" + ")" * n,
    ],
    ids=["parens", "nots", "mixed", "or-chains"],
)
def test_depth_limit(build: Any) -> None:
    f = compile_filter(build(MAX_DEPTH))
    assert f.matches({"x": 1}) == (build(MAX_DEPTH).count("not ") % 2 == 0)
    assert compile_filter(str(f)) == f
    f.to_postfix()
    with pytest.raises(shmq.InvalidFilter, match="nesting too deep at position") as info:
        compile_filter(build(MAX_DEPTH + 1))
    check_caret(info.value)


@pytest.mark.parametrize("n", [MAX_DEPTH + 1, 500, MAX_LENGTH])
def test_very_deep_nesting_is_invalid_filter_not_recursion_error(n: int) -> None:
    for text in ["(" * n, "not " * n, "(" * n + "x == 1" + ")" * n, "[" * n, "x in " + "(" * n]:
        with pytest.raises(shmq.InvalidFilter):
            compile_filter(text[:MAX_LENGTH])


def test_deep_nesting_works_with_little_stack_left() -> None:
    # A subscriber may subscribe from deep in its own call stack.
    import sys

    text = "(" * MAX_DEPTH + "not " * 0 + "x == 1" + ")" * MAX_DEPTH

    def nested(k: int) -> Filter:
        return compile_filter(text) if k == 0 else nested(k - 1)

    assert nested(sys.getrecursionlimit() - 400).matches({"x": 1})


def test_list_limit() -> None:
    items = ", ".join("1" for _ in range(MAX_LIST))
    assert compile_filter(f"x in ({items})").tree == In("x", (1,) * MAX_LIST)
    text = f"x in ({items}, 2)"
    with pytest.raises(shmq.InvalidFilter, match="list too long") as info:
        compile_filter(text)
    assert info.value.position == text.index("2")


def test_long_flat_chains_and_worst_cases_are_fast() -> None:
    chain = " and ".join(f"a == {i % 10}" for i in range(MAX_LENGTH // 11))
    worst = [
        chain,
        chain.replace(" and ", " or "),
        "(" * MAX_LENGTH,
        "'" + "\\'" * (MAX_LENGTH // 2 - 1),
        "x in (" + "1," * (MAX_LENGTH // 2 - 3),
        "a" * MAX_LENGTH,
        "1" * MAX_LENGTH,
        "x == " + "9" * (MAX_LENGTH - 5),
    ]
    start = time.perf_counter()
    for text in worst:
        try:
            f = compile_filter(text[:MAX_LENGTH])
        except shmq.InvalidFilter:
            continue
        f.matches({"a": 3})
        assert compile_filter(str(f)) == f
    assert time.perf_counter() - start < 2.0


# -- a reference evaluator, from the documented semantics -------------------------


def kind(value: object) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def compare(value: object, op: str, literal: Value) -> bool:
    if value is MISSING or kind(value) is None or kind(value) != kind(literal):
        return False
    v: Any = value
    if op == "==":
        return bool(v == literal)
    if op == "!=":
        return bool(v != literal)
    if op == "<":
        return bool(v < literal)
    if op == "<=":
        return bool(v <= literal)
    if op == ">":
        return bool(v > literal)
    assert op == ">="
    return bool(v >= literal)


def membership(value: object, values: tuple[Value, ...], negated: bool) -> bool:
    hit = any(compare(value, "==", x) for x in values)
    if not negated:
        return hit
    comparable = value is not MISSING and any(kind(x) == kind(value) is not None for x in values)
    return comparable and not hit


def reference(node: Node, headers: Mapping[str, object]) -> bool:
    if isinstance(node, Compare):
        return compare(headers.get(node.field, MISSING), node.op, node.literal)
    if isinstance(node, In):
        return membership(headers.get(node.field, MISSING), node.values, node.negated)
    if isinstance(node, Not):
        return not reference(node.operand, headers)
    results = [reference(o, headers) for o in node.operands]
    return all(results) if isinstance(node, And) else any(results)


def run_postfix(program: tuple[Instruction, ...], headers: Mapping[str, object]) -> bool:
    """A stack machine for `Filter.to_postfix()` programs."""
    stack: list[Any] = []
    for instruction in program:
        ins: tuple[Any, ...] = instruction
        code = ins[0]
        if code == "field":
            stack.append(headers.get(ins[1], MISSING))
        elif code == "const":
            stack.append(ins[1])
        elif code == "op":
            literal = stack.pop()
            stack.append(compare(stack.pop(), ins[1], literal))
        elif code in ("in", "not in"):
            stack.append(membership(stack.pop(), ins[1], code == "not in"))
        elif code == "not":
            stack.append(not stack.pop())
        else:
            right, left = stack.pop(), stack.pop()
            assert isinstance(left, bool) and isinstance(right, bool)
            stack.append(left and right if code == "and" else left or right)
    assert len(stack) == 1
    result = stack[0]
    assert isinstance(result, bool)
    return result


# -- generated trees ----------------------------------------------------------------

IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,8}", fullmatch=True)
KEYWORD = st.sampled_from(["and", "or", "not", "in", "true", "false"]).flatmap(
    lambda w: st.sampled_from([w, w.upper(), w.capitalize()])
)
ANY_NAME = st.one_of(IDENT, KEYWORD, st.text(min_size=1, max_size=8))
ANY_LITERAL: st.SearchStrategy[Value] = st.one_of(
    st.text(max_size=8),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
OPS = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])

# Narrow pools, so that generated headers often hit generated tests.
FEW_NAMES = st.sampled_from(["a", "b", "md.venue", "x y"])
FEW_LITERALS: st.SearchStrategy[Value] = st.one_of(
    st.sampled_from(["", "a", "b", "B", "é"]),
    st.integers(-2, 2),
    st.sampled_from([-1.5, -0.0, 0.0, 1.0, 2.5]),
    st.booleans(),
)
FEW_VALUES = st.one_of(FEW_LITERALS, st.sampled_from([None, b"a", NAN, 2**70, math.inf, 1 + 2**60]))
HEADERS = st.dictionaries(FEW_NAMES, FEW_VALUES, max_size=4)


def compare_nodes(names: st.SearchStrategy[str], literals: st.SearchStrategy[Value]) -> Any:
    @st.composite
    def build(draw: st.DrawFn) -> Compare:
        literal = draw(literals)
        op: Any = draw(st.sampled_from(["==", "!="])) if isinstance(literal, bool) else draw(OPS)
        return Compare(draw(names), op, literal)

    return build()


def trees(names: st.SearchStrategy[str], literals: st.SearchStrategy[Value]) -> st.SearchStrategy[Node]:
    leaves = st.one_of(
        compare_nodes(names, literals),
        st.builds(In, names, st.lists(literals, min_size=1, max_size=4).map(tuple), st.booleans()),
    )

    def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        many = st.lists(children, min_size=2, max_size=4).map(tuple)
        return st.one_of(st.builds(And, many), st.builds(Or, many), st.builds(Not, children))

    return st.recursive(leaves, extend, max_leaves=12)


ANY_TREE = trees(ANY_NAME, ANY_LITERAL)
FEW_TREE = trees(FEW_NAMES, FEW_LITERALS)


def depth(node: Node) -> int:
    if isinstance(node, (Compare, In)):
        return 1
    if isinstance(node, Not):
        return 1 + depth(node.operand)
    return 1 + max(depth(o) for o in node.operands)


@given(ANY_TREE)
@settings(max_examples=300)
def test_round_trip_canonical_text(t: Node) -> None:
    assume(depth(t) <= MAX_DEPTH // 2 and len(str(t)) <= MAX_LENGTH)
    f = compile_filter(str(t))
    assert f.tree == t
    assert str(f) == str(t)
    assert Filter.from_tree(t) == f
    assert f.fields == set(fields_of(t))


def fields_of(node: Node) -> list[str]:
    if isinstance(node, (Compare, In)):
        return [node.field]
    if isinstance(node, Not):
        return fields_of(node.operand)
    return [name for o in node.operands for name in fields_of(o)]


@given(FEW_TREE, st.lists(HEADERS, min_size=1, max_size=8))
@settings(max_examples=300)
def test_matches_agrees_with_reference_and_postfix(t: Node, many_headers: list[dict[str, object]]) -> None:
    f = Filter.from_tree(t)
    program = f.to_postfix()
    for headers in many_headers:
        expected = reference(t, headers)
        assert f.matches(headers) is expected
        assert run_postfix(program, headers) is expected


@given(compare_nodes(FEW_NAMES, FEW_LITERALS), HEADERS)
def test_flipped_comparison_means_the_same(node: Compare, headers: dict[str, object]) -> None:
    name = filters._render_name(node.field)
    literal = filters._render_literal(node.literal)
    flipped = compile_filter(f"{literal} {filters._FLIPPED[node.op]} {name}")
    assert flipped.tree == node
    assert flipped.matches(headers) is reference(node, headers)


# -- fuzzing: only InvalidFilter, ever ------------------------------------------------


def parse_or_invalid(text: str) -> None:
    try:
        f = compile_filter(text)
    except shmq.InvalidFilter as err:
        assert err.expression == text
        assert 0 <= err.position <= len(text)
        check_caret(err)
    else:
        assert compile_filter(str(f)) == f
        f.matches({})
        f.to_postfix()


PIECES = st.sampled_from(
    [" ", "a", "b.c", "`x y`", "and", "OR", "not", "in", "true", "(", ")", "[", "]", ",", "==", "!=",
     "<", "<=", ">", ">=", "=", "!", "'s'", '"d"', "'", '"', "`", "\\", "1", "-2.5e3", "-", ".", "e",
     "\n", "\t", "\x00", "é"]
)  # fmt: skip


@given(st.text(max_size=80))
@settings(max_examples=300)
def test_fuzz_arbitrary_text(text: str) -> None:
    parse_or_invalid(text)


@given(st.lists(PIECES, max_size=30).map("".join))
@settings(max_examples=500)
def test_fuzz_grammar_pieces(text: str) -> None:
    parse_or_invalid(text)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = str(draw(ANY_TREE))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 3)))
        insert = draw(st.one_of(st.just(""), PIECES, st.text(max_size=2)))
        text = text[:i] + insert + text[j:]
    return text


@given(mutated())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_expressions(text: str) -> None:
    parse_or_invalid(text[: MAX_LENGTH + 10])


@given(
    st.lists(st.sampled_from(["(", "not ", "( not ", "[", "x in ("]), min_size=1, max_size=8),
    st.integers(65, 1500),
)
def test_fuzz_deep_nesting(prefixes: list[str], n: int) -> None:
    text = "".join(prefixes[i % len(prefixes)] for i in range(n))
    text = (text + "x == 1" + ")" * n)[:MAX_LENGTH]
    with pytest.raises(shmq.InvalidFilter) as info:
        compile_filter(text)
    assert 0 <= info.value.position <= len(text)
    if set(prefixes) <= {"(", "not ", "( not "}:
        assert str(info.value).startswith("nesting too deep at position")
