"""`where=` content filters over message headers: a small, safe expression language.

A subscriber passes ``where="venue == 'XNAS' and price > 100.5 and side in ('B', 'S')"``;
`compile_filter` turns the text into a `Filter` once, at subscribe time, and the router calls
``Filter.matches(headers)`` per message. The text is read by a hand-written tokenizer and a
recursive-descent parser into an immutable tree of frozen dataclasses; nothing is ever handed
to `eval`, `compile` or `ast`.

Grammar (EBNF; whitespace is any of space, tab, newline, CR, FF, VT, between tokens)::

    filter      = or_expr END
    or_expr     = and_expr { "or" and_expr }
    and_expr    = not_expr { "and" not_expr }
    not_expr    = "not" not_expr | primary
    primary     = "(" or_expr ")" | test
    test        = name compare_op literal
                | literal compare_op name           (flipped: 100 < price is price > 100)
                | name [ "not" ] "in" list
    compare_op  = "==" | "!=" | "<" | "<=" | ">" | ">="
    list        = "(" literal { "," literal } [ "," ] ")"
                | "[" literal { "," literal } [ "," ] "]"
    name        = IDENT | "`" { char | escape } "`"
    literal     = STRING | NUMBER | "true" | "false"
    IDENT       = [A-Za-z_][A-Za-z0-9_.-]*          (not a keyword)
    STRING      = "'" { char | escape } "'" | '"' { char | escape } '"'
    escape      = "\\\\" | "\\'" | '\\"' | "\\`" | "\\n" | "\\t" | "\\r"
    NUMBER      = [-] digits [ "." digits ] [ ("e" | "E") [ "+" | "-" ] digits ]   (ASCII digits)

* Precedence, loosest first: ``or``, ``and``, ``not``, then the tests. ``not a == 1`` is
  ``not (a == 1)``. A chain of one operator is one n-ary node (``a and b and c`` is
  ``And((a, b, c))``); parentheses are kept as written (``(a and b) and c`` nests).
* Comparisons do not chain: ``a < b < c`` is an error (join them with ``and``). A test
  compares one header with one literal: two header names, or two literals, are an error.
* Keywords (``and or not in true false``) are case-insensitive: ``AND``, ``Not In``, ``TRUE``
  work, and `str()` writes them in lower case. Header names are case-sensitive. A header
  whose name is not an IDENT (a space, a leading digit, non-ASCII letters), or is a keyword in
  any case (``and``, ``IN``, ``True``), is written in backquotes, which take any characters and
  the same escapes as strings:  `content type` == 'json'  or  `in` == 1. An empty name is an
  error.
* A NUMBER with a ``.`` or an exponent is a float, otherwise an int (leading zeros are
  allowed: ``007`` is 7; there is no leading ``+``, ``.5`` or ``5.``). Ints must fit in a signed
  64-bit integer and floats must be finite (so a native evaluator can hold every literal); a
  number running straight into a name character (``1x``, ``1.``, ``1.2.3``) is an error.
* A list holds 1 to 1024 literals (types may be mixed); ``x in (1)`` is a one-item list.

Semantics (headers map str to str | int | float | bool):

* A missing header makes every test on it False: ``x == 1``, ``x != 1``, ``x in (...)`` and
  ``x not in (...)`` are all False when there is no ``x``; so ``not x == 1`` is True then. Note
  the difference between ``x != 1`` / ``x not in (...)`` (the header must be there) and
  ``not x == 1`` / ``not x in (...)`` (also true when it is absent).
* Values fall into three kinds: numbers (int and float, mixed freely, compared exactly as
  Python does, NaN following IEEE 754), strings (compared by code point) and booleans (bool is
  NOT a number here: ``flag == 1`` is False for ``flag=True``). A test whose header value and
  literal are of different kinds is False, every operator included, ``!=`` too:
  ``price != 'x'`` is False for ``price=3``. Values of any other type (None, bytes, ...) are
  of no kind and match nothing.
* ``true`` and ``false`` take only ``==`` and ``!=``; ``flag < true`` is a syntax error.
* ``x in L`` is True when x equals (same kind) some literal of L. ``x not in L`` is True when x
  is present, L holds at least one literal of x's kind, and x equals none of them; for a list
  of one kind that is ``x != l1 and x != l2 ...``.

Limits: an expression is at most 4096 characters; nesting is at most 64 levels, counting each
open ``(`` and each ``not`` around a point; a list holds at most 1024 literals; a header name has
at most 255 bytes in UTF-8 (as in headers themselves). Anything beyond
is an `InvalidFilter`, never a RecursionError.

Errors: every problem in the text raises `InvalidFilter` with ``.expression`` and ``.position``
(0-based character offset; the length of the text for an unexpected end). The message names
the problem and the position and shows the line of the expression with a caret under it::

    unexpected 'and' at position 9: expected a literal
      venue == and price > 1
               ^

`str(filter)` (and `str(node)`) is a canonical text that parses back to an equal tree: keywords
in lower case, single spaces, strings in single quotes, floats as `repr` writes them, and only
the parentheses the tree needs. Trees compare equal only if their literals have the same types
(``x == 1``, ``x == 1.0`` and ``x == true`` are three different trees).

`Filter.to_postfix` flattens the tree into a program for a stack machine, for a native
evaluator: ``("field", name)`` pushes the header's value (or "missing"), ``("const", literal)``
pushes a literal, ``("op", op)`` pops a literal and a value and pushes the test's result,
``("in", values)`` / ``("not in", values)`` pop a value and push the test's result, and
``("and",)`` / ``("or",)`` / ``("not",)`` pop one or two booleans and push the result (an
n-ary And/Or becomes a left-to-right chain of binary ones; nothing short-circuits).

`Filter` is frozen, hashable and equal to another filter when their trees are equal (however
the texts were spelled); it pickles as its text. `Filter.fields` is the set of header names
it reads; the tree's nodes validate themselves when built in code, and `Filter.from_tree`
makes a filter of such a tree (rendering it and parsing the text, so the limits apply).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeAlias

from shmq._errors import ArgumentTypeError, InvalidFilter

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_LIST",
    "MAX_NAME_BYTES",
    "And",
    "Compare",
    "Filter",
    "In",
    "Instruction",
    "Node",
    "Not",
    "Op",
    "Or",
    "Value",
    "compile_filter",
]

MAX_LENGTH = 4096  #: characters in an expression
MAX_DEPTH = 64  #: open parentheses and `not`s around any point
MAX_LIST = 1024  #: literals in an `in` list
MAX_NAME_BYTES = 255  #: UTF-8 bytes of a header name (as in headers on the wire)

Value: TypeAlias = str | int | float | bool
Op: TypeAlias = Literal["==", "!=", "<", "<=", ">", ">="]

_OPS: dict[str, Op] = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_FLIPPED: dict[Op, Op] = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false"})
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
_IDENT_START = frozenset(_LETTERS)
_DIGITS = frozenset("0123456789")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER = re.compile(r"-?([0-9]+)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_AFTER_NUMBER_BAD = frozenset(_LETTERS + "0123456789.")
_SPACE = frozenset(" \t\n\r\f\v")
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "`": "`", "n": "\n", "t": "\t", "r": "\r"}
_HINTS = {"=": "use '==' to compare", "&": "use 'and'", "|": "use 'or'", "!": "use 'not' or '!='"}


# -- the tree -----------------------------------------------------------------


def _problem(message: str) -> InvalidFilter:
    return InvalidFilter(message, expression="", position=-1)


def _check_field(name: object) -> None:
    if not isinstance(name, str):
        raise _problem(f"a header name must be a str, not {type(name).__name__}")
    if not name:
        raise _problem("a header name cannot be empty")
    if _name_bytes(name) > MAX_NAME_BYTES:
        raise _problem(f"a header name has at most {MAX_NAME_BYTES} bytes in UTF-8: {name[:20]!r}...")


def _name_bytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogatepass"))


def _check_literal(value: object) -> None:
    # Exact types only: a subclass (IntEnum, numpy.float64) would not survive a round trip.
    kind = type(value)
    if isinstance(value, float) and kind is float:
        if not math.isfinite(value):
            raise _problem(f"a float literal must be finite, not {value!r}")
    elif isinstance(value, int) and kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise _problem(f"an int literal must fit in 64 bits, {value} does not")
    elif kind is not str and kind is not bool:
        raise _problem(f"a literal must be a str, int, float or bool, not {kind.__name__}")


def _typed(value: Value) -> tuple[type, Value]:
    # Literals compare by type too: 1, 1.0 and True are equal in Python, not here.
    return (type(value), value)


@dataclass(frozen=True, eq=False)
class Compare:
    """``field op literal``: one header against one literal."""

    field: str
    op: Op
    literal: Value

    def __post_init__(self) -> None:
        _check_field(self.field)
        if self.op not in _OPS:
            raise _problem(f"unknown comparison operator {self.op!r}")
        _check_literal(self.literal)
        if type(self.literal) is bool and self.op not in ("==", "!="):
            raise _problem(f"true and false compare only with == and !=, not {self.op}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Compare):
            return NotImplemented
        return (self.field, self.op, _typed(self.literal)) == (other.field, other.op, _typed(other.literal))

    def __hash__(self) -> int:
        return hash((Compare, self.field, self.op, _typed(self.literal)))

    def __str__(self) -> str:
        return _render(self)


@dataclass(frozen=True, eq=False)
class In:
    """``field in (values)``, or ``field not in (values)`` when `negated`."""

    field: str
    values: tuple[Value, ...]
    negated: bool = False

    def __post_init__(self) -> None:
        _check_field(self.field)
        if not isinstance(self.values, tuple):
            object.__setattr__(self, "values", tuple(self.values))
        if not 1 <= len(self.values) <= MAX_LIST:
            raise _problem(f"an 'in' list holds 1 to {MAX_LIST} literals, not {len(self.values)}")
        for value in self.values:
            _check_literal(value)
        if type(self.negated) is not bool:
            raise _problem(f"negated must be a bool, not {type(self.negated).__name__}")

    def _key(self) -> tuple[object, ...]:
        return (self.field, tuple(_typed(v) for v in self.values), self.negated)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, In):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((In, *self._key()))

    def __str__(self) -> str:
        return _render(self)


def _check_operands(cls: str, operands: tuple[object, ...]) -> None:
    if len(operands) < 2:
        raise _problem(f"{cls} needs at least 2 operands, not {len(operands)}")
    for operand in operands:
        if not isinstance(operand, _NODE_TYPES):
            raise _problem(f"{cls} operands must be filter nodes, not {type(operand).__name__}")


@dataclass(frozen=True)
class And:
    """True when every operand is (two or more)."""

    operands: tuple[Node, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.operands, tuple):
            object.__setattr__(self, "operands", tuple(self.operands))
        _check_operands("And", self.operands)

    def __str__(self) -> str:
        return _render(self)


@dataclass(frozen=True)
class Or:
    """True when any operand is (two or more)."""

    operands: tuple[Node, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.operands, tuple):
            object.__setattr__(self, "operands", tuple(self.operands))
        _check_operands("Or", self.operands)

    def __str__(self) -> str:
        return _render(self)


@dataclass(frozen=True)
class Not:
    """True when the operand is not."""

    operand: Node

    def __post_init__(self) -> None:
        if not isinstance(self.operand, _NODE_TYPES):
            raise _problem(f"Not's operand must be a filter node, not {type(self.operand).__name__}")

    def __str__(self) -> str:
        return _render(self)


Node: TypeAlias = Compare | In | And | Or | Not
_NODE_TYPES = (Compare, In, And, Or, Not)

Instruction: TypeAlias = (
    tuple[Literal["field"], str]
    | tuple[Literal["const"], Value]
    | tuple[Literal["op"], Op]
    | tuple[Literal["in", "not in"], tuple[Value, ...]]
    | tuple[Literal["and", "or", "not"]]
)


# -- canonical text -------------------------------------------------------------


def _quote(text: str, quote: str) -> str:
    out = text.replace("\\", "\\\\").replace(quote, "\\" + quote)
    return quote + out.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + quote


def _render_name(name: str) -> str:
    if _IDENT.fullmatch(name) and name.lower() not in _KEYWORDS:
        return name
    return _quote(name, "`")


def _render_literal(value: Value) -> str:
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is str:
        return _quote(value, "'")
    return repr(value)  # int, or float: repr is exact and always has '.' or 'e'


def _render(node: Node) -> str:
    """The canonical text of a tree; parsing it gives an equal tree."""
    if isinstance(node, Compare):
        return f"{_render_name(node.field)} {node.op} {_render_literal(node.literal)}"
    if isinstance(node, In):
        keyword = "not in" if node.negated else "in"
        values = ", ".join(_render_literal(v) for v in node.values)
        return f"{_render_name(node.field)} {keyword} ({values})"
    if isinstance(node, And):
        return " and ".join(_wrap(o, (And, Or)) for o in node.operands)
    if isinstance(node, Or):
        return " or ".join(_wrap(o, (Or,)) for o in node.operands)
    return "not " + _wrap(node.operand, (And, Or))


def _wrap(node: Node, needs_parens: tuple[type, ...]) -> str:
    text = _render(node)
    return f"({text})" if isinstance(node, needs_parens) else text


# -- tokens -------------------------------------------------------------------

# Token kinds: "name", "literal", "op", "kw" (lower-cased keyword), "(", ")", "[", "]", ",", "end".


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    value: Any  # the name, the literal, the operator or the keyword
    pos: int
    source: str  # the token's text, for messages

    def describe(self) -> str:
        source = _shown(self.source)
        if self.kind == "end":
            return "end of expression"
        if self.kind == "literal" and type(self.value) is str:
            return f"string {source}"
        if self.kind == "literal" and type(self.value) is not bool:
            return f"number {source}"
        if self.kind == "name" and source.startswith("`"):
            return f"the header name {source}"
        return f"'{source}'"


def _shown(source: str, limit: int = 40) -> str:
    """Source text quoted in a message: one line, control characters escaped, long text cut."""
    if len(source) > limit:
        source = source[: limit - 3] + "..."
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in source)


def _pointer(text: str, pos: int) -> str:
    """The line of `text` holding `pos`, and a caret under `pos` (long lines are cut)."""
    if pos == len(text) and "\n" in text[len(text.rstrip()) :]:
        pos = len(text.rstrip())  # an unexpected end after a newline: point past the last token
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    line = text[start : end if end >= 0 else len(text)]
    col = pos - start
    width = 100
    if len(line) > width:
        lo = max(0, min(col - width // 2, len(line) - width))
        cut = line[lo : lo + width]
        prefix = "..." if lo > 0 else ""
        suffix = "..." if lo + width < len(line) else ""
        line, col = prefix + cut + suffix, col - lo + len(prefix)
    line = "".join(c if c.isprintable() else " " for c in line)
    return f"  {line}\n  {' ' * col}^"


def _fail(text: str, pos: int, problem: str, detail: str = "") -> NoReturn:
    message = f"{problem} at position {pos}" + (f": {detail}" if detail else "")
    raise InvalidFilter(f"{message}\n{_pointer(text, pos)}", expression=text, position=pos)


def _tokens(text: str) -> Iterator[_Token]:
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif c in _IDENT_START:
            m = _IDENT.match(text, i)
            assert m is not None
            word = m.group()
            lower = word.lower()
            if lower in ("true", "false"):
                yield _Token("literal", lower == "true", i, word)
            elif lower in _KEYWORDS:
                yield _Token("kw", lower, i, word)
            else:
                _check_name_length(text, i, word)
                yield _Token("name", word, i, word)
            i = m.end()
        elif c in _DIGITS or (c == "-" and i + 1 < n and text[i + 1] in _DIGITS):
            token, i = _number(text, i)
            yield token
        elif c in "'\"`":
            value, end = _string(text, i)
            if c == "`":
                if not value:
                    _fail(text, i, "empty header name", "a header name needs at least one character")
                _check_name_length(text, i, value)
                yield _Token("name", value, i, text[i:end])
            else:
                yield _Token("literal", value, i, text[i:end])
            i = end
        elif text.startswith(("==", "!=", "<=", ">="), i):
            yield _Token("op", _OPS[text[i : i + 2]], i, text[i : i + 2])
            i += 2
        elif c in "<>":
            yield _Token("op", _OPS[c], i, c)
            i += 1
        elif c in "()[],":
            yield _Token(c, c, i, c)
            i += 1
        else:
            shown = repr(c) if c.isprintable() else f"U+{ord(c):04X}"
            _fail(text, i, f"unexpected character {shown}", _HINTS.get(c, ""))
    yield _Token("end", None, n, "")


def _check_name_length(text: str, i: int, name: str) -> None:
    # Headers on the wire have names of at most 255 bytes: a longer one could never match, and
    # the router's program could not hold it.
    if _name_bytes(name) > MAX_NAME_BYTES:
        _fail(text, i, "header name too long", f"at most {MAX_NAME_BYTES} bytes in UTF-8")


def _number(text: str, i: int) -> tuple[_Token, int]:
    m = _NUMBER.match(text, i)
    assert m is not None  # the caller saw an ASCII digit, or '-' and one
    end = m.end()
    if end < len(text) and text[end] in _AFTER_NUMBER_BAD:
        _fail(text, i, "malformed number", f"{text[i : end + 1]!r} runs into {text[end]!r}")
    source = m.group()
    value: int | float
    if m.group(2) or m.group(3):
        value = float(source)
        if not math.isfinite(value):
            _fail(text, i, "number out of range", f"{source} is too large for a float")
    else:
        # Compare digit counts before calling int(): no huge conversions.
        digits = m.group(1).lstrip("0")
        value = 0 if not digits else (int(source) if len(digits) <= 19 else _INT_MAX + 1)
        if not _INT_MIN <= value <= _INT_MAX:
            _fail(text, i, "number out of range", f"{source} does not fit in a signed 64-bit integer")
    return _Token("literal", value, i, source), end


def _string(text: str, start: int) -> tuple[str, int]:
    """Read a quoted string or name starting at `start`; return its value and end offset."""
    quote = text[start]
    out: list[str] = []
    i, n = start + 1, len(text)
    while i < n:
        c = text[i]
        if c == quote:
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= n:
                break
            escaped = _ESCAPES.get(text[i + 1])
            if escaped is None:
                _fail(
                    text,
                    i,
                    f"unknown escape '{_shown(text[i : i + 2])}'",
                    "escapes are \\\\ \\' \\\" \\` \\n \\t \\r",
                )
            out.append(escaped)
            i += 2
        else:
            out.append(c)
            i += 1
    what = "header name" if quote == "`" else "string"
    _fail(text, start, f"unterminated {what}", f"no closing {quote} after it")


# -- the parser -------------------------------------------------------------------

_START = "a header name, a literal, 'not' or '('"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = list(_tokens(text))
        self.i = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        if tok.kind != "end":
            self.i += 1
        return tok

    def is_kw(self, word: str) -> bool:
        tok = self.tokens[self.i]
        return tok.kind == "kw" and tok.value == word

    def fail(self, tok: _Token, problem: str, detail: str = "") -> NoReturn:
        _fail(self.text, tok.pos, problem, detail)

    def unexpected(self, tok: _Token, expected: str) -> NoReturn:
        self.fail(tok, f"unexpected {tok.describe()}", f"expected {expected}")

    def enter(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(tok, "nesting too deep", f"at most {MAX_DEPTH} levels of '(' and 'not'")

    def parse(self) -> Node:
        node = self.or_expr()
        self.expect_after_operand("end", "'and', 'or' or the end")
        return node

    def not_chained(self) -> None:
        """Fail if the next token is a comparison operator: `a < b < c` does not chain."""
        tok = self.peek()
        if tok.kind == "op":
            self.fail(tok, "comparisons do not chain", "join them with 'and': 'a < b and b < c'")

    def expect_after_operand(self, kind: str, expected: str) -> None:
        self.not_chained()
        tok = self.take()
        if tok.kind != kind:
            self.unexpected(tok, expected)

    def or_expr(self) -> Node:
        operands = [self.and_expr()]
        while self.is_kw("or"):
            self.take()
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_expr(self) -> Node:
        operands = [self.not_expr()]
        while self.is_kw("and"):
            self.take()
            operands.append(self.not_expr())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def not_expr(self) -> Node:
        if not self.is_kw("not"):
            return self.primary()
        self.enter(self.take())
        node = Not(self.not_expr())
        self.depth -= 1
        return node

    def primary(self) -> Node:
        tok = self.take()
        if tok.kind == "(":
            self.enter(tok)
            node = self.or_expr()
            self.expect_after_operand(")", f"'and', 'or' or ')' to close the '(' at position {tok.pos}")
            self.depth -= 1
            return node
        if tok.kind == "name":
            return self.test_on(tok)
        if tok.kind == "literal":
            return self.flipped_test(tok)
        self.unexpected(tok, _START)

    def test_on(self, name: _Token) -> Node:
        tok = self.take()
        if tok.kind == "op":
            literal = self.take()
            if literal.kind == "name":
                self.not_chained()
                self.fail(literal, "cannot compare two header names", "the right side must be a literal")
            if literal.kind != "literal":
                self.unexpected(literal, "a literal")
            return self.compare(name.value, tok.value, literal)
        if tok.kind == "kw" and tok.value == "in":
            return In(name.value, self.values(tok), False)
        if tok.kind == "kw" and tok.value == "not":
            in_tok = self.take()
            if not (in_tok.kind == "kw" and in_tok.value == "in"):
                self.unexpected(in_tok, f"'in' after {name.describe()} not")
            return In(name.value, self.values(in_tok), True)
        self.unexpected(tok, f"a comparison operator, 'in' or 'not in' after {name.describe()}")

    def flipped_test(self, literal: _Token) -> Node:
        tok = self.take()
        if tok.kind == "kw" and tok.value in ("in", "not"):
            self.fail(literal, f"'{tok.source}' needs a header name on its left", "not a literal")
        if tok.kind != "op":
            self.unexpected(tok, f"a comparison operator after {literal.describe()}")
        name = self.take()
        if name.kind == "literal":
            self.not_chained()
            self.fail(name, "cannot compare two literals", "one side must be a header name")
        if name.kind != "name":
            self.unexpected(name, "a header name")
        return self.compare(name.value, _FLIPPED[tok.value], literal, written=tok.value)

    def compare(self, field: str, op: Op, literal: _Token, written: str = "") -> Compare:
        if type(literal.value) is bool and op not in ("==", "!="):
            self.fail(
                literal,
                f"'{written or op}' does not apply to {literal.source}",
                "booleans take only == and !=",
            )
        return Compare(field, op, literal.value)

    def values(self, in_tok: _Token) -> tuple[Value, ...]:
        opening = self.take()
        if opening.kind not in ("(", "["):
            self.unexpected(opening, f"'(' or '[' to start the list after '{in_tok.source}'")
        closing = ")" if opening.kind == "(" else "]"
        out: list[Value] = []
        while True:
            tok = self.take()
            if tok.kind == closing and out:
                break
            if tok.kind == closing:
                self.fail(tok, "empty list", f"'{in_tok.source}' needs at least one literal")
            if tok.kind == "name":
                self.fail(tok, f"{tok.describe()} in a list", "a list holds literals only")
            if tok.kind != "literal":
                self.unexpected(tok, "a literal")
            if len(out) == MAX_LIST:
                self.fail(tok, "list too long", f"at most {MAX_LIST} literals")
            out.append(tok.value)
            sep = self.take()
            if sep.kind == closing:
                break
            if sep.kind != ",":
                self.unexpected(sep, f"',' or '{closing}'")
        return tuple(out)


# -- evaluation -------------------------------------------------------------------

_MISSING = object()
_Test: TypeAlias = Callable[[Mapping[str, object]], bool]


def _build(node: Node) -> _Test:
    """A closure evaluating `node`: the tree is walked once, here, not per message."""
    if isinstance(node, Compare):
        return _build_compare(node)
    if isinstance(node, In):
        return _build_in(node)
    if isinstance(node, Not):
        inner = _build(node.operand)
        return lambda h: not inner(h)
    tests = tuple(_build(o) for o in node.operands)
    if isinstance(node, And):
        if len(tests) == 2:
            a, b = tests
            return lambda h: a(h) and b(h)
        if len(tests) == 3:
            a, b, c = tests
            return lambda h: a(h) and b(h) and c(h)
        return lambda h: all(t(h) for t in tests)
    if len(tests) == 2:
        a, b = tests
        return lambda h: a(h) or b(h)
    if len(tests) == 3:
        a, b, c = tests
        return lambda h: a(h) or b(h) or c(h)
    return lambda h: any(t(h) for t in tests)


def _build_compare(node: Compare) -> _Test:
    key, cmp, lit = node.field, _CMP[node.op], node.literal
    if type(lit) is str:

        def test(h: Mapping[str, object]) -> bool:
            v = h.get(key, _MISSING)
            return isinstance(v, str) and cmp(v, lit)

    elif type(lit) is bool:

        def test(h: Mapping[str, object]) -> bool:
            v = h.get(key, _MISSING)
            return type(v) is bool and cmp(v, lit)

    else:

        def test(h: Mapping[str, object]) -> bool:
            v = h.get(key, _MISSING)
            return isinstance(v, (int, float)) and type(v) is not bool and cmp(v, lit)

    return test


def _build_in(node: In) -> _Test:
    key, negated = node.field, node.negated
    strs = frozenset(v for v in node.values if type(v) is str)
    nums = frozenset(v for v in node.values if type(v) is int or type(v) is float)
    bools = frozenset(v for v in node.values if type(v) is bool)

    def test(h: Mapping[str, object]) -> bool:
        v = h.get(key, _MISSING)
        if isinstance(v, str):
            same_kind: frozenset[Value] = strs
        elif type(v) is bool:
            same_kind = bools
        elif isinstance(v, (int, float)):
            same_kind = nums
        else:
            return False
        if negated:
            return bool(same_kind) and v not in same_kind
        return v in same_kind

    return test


def _postfix(node: Node, out: list[Instruction]) -> None:
    if isinstance(node, Compare):
        out += [("field", node.field), ("const", node.literal), ("op", node.op)]
    elif isinstance(node, In):
        out += [("field", node.field), ("not in" if node.negated else "in", node.values)]
    elif isinstance(node, Not):
        _postfix(node.operand, out)
        out.append(("not",))
    else:
        joiner: Instruction = ("and",) if isinstance(node, And) else ("or",)
        _postfix(node.operands[0], out)
        for operand in node.operands[1:]:
            _postfix(operand, out)
            out.append(joiner)


def _fields(node: Node) -> Iterator[str]:
    if isinstance(node, (Compare, In)):
        yield node.field
    elif isinstance(node, Not):
        yield from _fields(node.operand)
    else:
        for operand in node.operands:
            yield from _fields(operand)


# -- the public face ------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Filter:
    """A parsed ``where=`` filter: the source text and its tree.

    Make one with `Filter.parse` (or `compile_filter`) from text, or `Filter.from_tree`.
    Filters are equal when their trees are (the text's spelling does not matter), hashable,
    and pickle as their text.
    """

    text: str = field(compare=False)
    tree: Node
    fields: frozenset[str] = field(init=False, compare=False)  #: the header names the filter reads
    _test: _Test = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", frozenset(_fields(self.tree)))
        object.__setattr__(self, "_test", _build(self.tree))

    @classmethod
    def parse(cls, text: str) -> Filter:
        """Parse `text`; raise `InvalidFilter` pointing at the first problem."""
        if not isinstance(text, str):
            raise ArgumentTypeError(f"a filter expression must be a str, not {type(text).__name__}")
        if len(text) > MAX_LENGTH:
            _fail(text, MAX_LENGTH, "expression too long", f"at most {MAX_LENGTH} characters")
        return cls(text, _Parser(text).parse())

    @classmethod
    def from_tree(cls, tree: Node) -> Filter:
        """The filter of a tree built in code; its text is the canonical form (limits apply)."""
        if not isinstance(tree, _NODE_TYPES):
            raise ArgumentTypeError(f"a filter tree must be a node, not {type(tree).__name__}")
        return cls.parse(_render(tree))

    def matches(self, headers: Mapping[str, object]) -> bool:
        """Whether a message with these headers passes the filter."""
        return self._test(headers)

    def to_postfix(self) -> tuple[Instruction, ...]:
        """The tree as a flat stack-machine program (see the module docstring)."""
        out: list[Instruction] = []
        _postfix(self.tree, out)
        return tuple(out)

    def __str__(self) -> str:
        return _render(self.tree)

    def __repr__(self) -> str:
        return f"Filter({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (compile_filter, (self.text,))


def compile_filter(where: str | Filter) -> Filter:
    """Parse a ``where=`` expression (a `Filter` is returned as it is)."""
    if isinstance(where, Filter):
        return where
    return Filter.parse(where)
