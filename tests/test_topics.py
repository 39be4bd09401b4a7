"""Topics, patterns and TopicIndex: the grammar as tables, matching and the index against references.

The references are written independently of shmq/topics.py: validity from Unicode categories, matching
as a regular expression built from the pattern, and the index as a brute-force scan of every
(pattern, value) pair.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from shmq import topics
from shmq._errors import ArgumentTypeError, InvalidTopic, ShmqError
from shmq.topics import (
    MAX_TOKENS,
    MAX_TOPIC_BYTES,
    TopicIndex,
    is_wildcard,
    matches,
    validate_pattern,
    validate_topic,
)

pytestmark = pytest.mark.timeout(60)

ALLOWED = "a token is letters, digits and printable characters such as _ - : / @ $"

VALID_TOPICS = [
    "md",
    "md.XNAS.AAPL",
    "fx.EUR-USD",
    "$SYS.stats",
    "user@host.a/b:c",
    "a_b.c-d.e:f.g/h.i@j.$k",
    "!#%&'()+,-/0123456789:;<=?@[\\]^_`{|}~",
    "prix.été",
    "日本.東京.7203",
    "x" * MAX_TOPIC_BYTES,
    "é" * 127 + "a",  # 255 bytes in 128 characters
    ".".join(["t"] * MAX_TOKENS),
]

# (topic, .token, .index, a piece of the message)
INVALID_TOPICS = [
    ("", "", -1, "empty topic: a topic is 1 to 32 dot-separated tokens"),
    (".", "", 0, "empty token (token 0) in topic '.': a leading dot"),
    ("a..b", "", 1, "empty token (token 1) in topic 'a..b': a doubled dot"),
    (".md", "", 0, "a leading dot"),
    ("md.", "", 1, "empty token (token 1) in topic 'md.': a trailing dot"),
    (
        "md.*",
        "*",
        1,
        "invalid token '*' (token 1) in topic 'md.*': '*' is a wildcard, not allowed in a topic",
    ),
    ("md.>", ">", 1, "'>' is a wildcard, not allowed in a topic"),
    (">", ">", 0, "'>' is a wildcard"),
    ("md.a*b", "a*b", 1, "invalid token 'a*b' (token 1) in topic 'md.a*b': '*' is a wildcard"),
    ("a>b.c", "a>b", 0, "'>' is a wildcard"),
    ("md.XNAS AAPL", "XNAS AAPL", 1, "white space (' ') is not allowed; " + ALLOWED),
    ("md.\tx", "\tx", 1, "white space ('\\t') is not allowed"),
    ("md.x\n", "x\n", 1, "white space ('\\n') is not allowed"),
    ("a\u00a0b", "a\u00a0b", 0, "white space ('\\xa0') is not allowed"),
    ("a.b\u2028", "b\u2028", 1, "white space"),
    ("md.a\x00", "a\x00", 1, "a control character ('\\x00', U+0000) is not allowed; " + ALLOWED),
    ("md.a\x7f", "a\x7f", 1, "a control character ('\\x7f', U+007F)"),
    ("md.\x1b[0m", "\x1b[0m", 1, "a control character ('\\x1b', U+001B)"),
    ("zero\u200bwidth", "zero\u200bwidth", 0, "a non-printable character ('\\u200b', U+200B)"),
    ("a.\ue000", "\ue000", 1, "a non-printable character ('\\ue000', U+E000)"),
    ("a.b.\ud800", "\ud800", 2, "a non-printable character ('\\ud800', U+D800)"),
    ("x" * (MAX_TOPIC_BYTES + 1), "", -1, "is 256 bytes in UTF-8; the limit is 255"),
    ("é" * 128, "", -1, "is 256 bytes in UTF-8; the limit is 255"),
    ("x" * 10_000, "", -1, "...' is 10000 bytes in UTF-8"),
    (".".join(["t"] * (MAX_TOKENS + 1)), "t", 32, "has 33 tokens; the limit is 32 (token 32 is 't')"),
    (".".join(f"t{i}" for i in range(40)), "t32", 32, "has 40 tokens; the limit is 32"),
    ("a.b c.d*e", "b c", 1, "white space"),  # the first bad token is the one reported
]

VALID_PATTERNS = [
    *VALID_TOPICS,
    "*",
    ">",
    "md.>",
    "md.*.AAPL",
    "*.*.*",
    "*.>",
    "md.XNAS.>",
    ".".join(["*"] * MAX_TOKENS),
    ".".join(["*"] * (MAX_TOKENS - 1) + [">"]),
]

INVALID_PATTERNS = [
    ("", "", -1, "empty pattern: a pattern is 1 to 32 dot-separated tokens, e.g. 'md.*.AAPL' or 'md.>'"),
    ("md..>", "", 1, "empty token (token 1) in pattern 'md..>': a doubled dot"),
    ("md.>.", ">", 1, "'>' must be the last token"),
    ("*.", "", 1, "a trailing dot"),
    ("md.a*b", "a*b", 1, "invalid token 'a*b' (token 1) in pattern 'md.a*b': '*' must be a whole token"),
    ("*x", "*x", 0, "invalid token '*x' (token 0) in pattern '*x': '*' must be a whole token"),
    ("md.x*", "x*", 1, "'*' must be a whole token"),
    ("md.**", "**", 1, "'*' must be a whole token"),
    ("md.>.x", ">", 1, "invalid token '>' (token 1) in pattern 'md.>.x': '>' must be the last token "),
    (">.md", ">", 0, "'>' must be the last token (it matches one or more trailing tokens)"),
    ("md.>.>", ">", 1, "'>' must be the last token"),
    ("md.>>", ">>", 1, "invalid token '>>' (token 1) in pattern 'md.>>': '>' must be a whole token"),
    ("md.a>", "a>", 1, "'>' must be a whole token"),
    ("*>", "*>", 0, "'*' must be a whole token"),
    ("md.* x", "* x", 1, "'*' must be a whole token"),
    ("md.a b.>", "a b", 1, "white space (' ') is not allowed"),
    ("md.\x00.>", "\x00", 1, "a control character"),
    ("*" * (MAX_TOPIC_BYTES + 1), "", -1, "is 256 bytes in UTF-8; the limit is 255"),
    (".".join(["*"] * MAX_TOKENS + [">"]), ">", 32, "has 33 tokens; the limit is 32"),
]


def check_error(
    exc: pytest.ExceptionInfo[InvalidTopic], text: str, token: str, index: int, piece: str
) -> None:
    err = exc.value
    assert isinstance(err, InvalidTopic)
    assert isinstance(err, ValueError)
    assert isinstance(err, ShmqError)
    assert err.topic == text
    assert err.token == token
    assert err.index == index
    assert piece in str(err)


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) is topic
    assert validate_pattern(topic) is topic  # a concrete topic is a pattern too
    assert not is_wildcard(topic)
    assert matches(topic, topic)


@pytest.mark.parametrize(("topic", "token", "index", "piece"), INVALID_TOPICS)
def test_invalid_topics(topic: str, token: str, index: int, piece: str) -> None:
    with pytest.raises(InvalidTopic) as exc:
        validate_topic(topic)
    check_error(exc, topic, token, index, piece)
    with pytest.raises(InvalidTopic):
        matches(">", topic)
    with pytest.raises(InvalidTopic):
        TopicIndex[int]().match(topic)


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) is pattern
    assert is_wildcard(pattern) == any(t in ("*", ">") for t in pattern.split("."))


@pytest.mark.parametrize(("pattern", "token", "index", "piece"), INVALID_PATTERNS)
def test_invalid_patterns(pattern: str, token: str, index: int, piece: str) -> None:
    with pytest.raises(InvalidTopic) as exc:
        validate_pattern(pattern)
    check_error(exc, pattern, token, index, piece)
    for call in (is_wildcard, lambda p: matches(p, "md"), lambda p: TopicIndex[int]().add(p, 1)):
        with pytest.raises(InvalidTopic):
            call(pattern)
    index_ = TopicIndex[int]()
    with pytest.raises(InvalidTopic):
        index_.remove(pattern, 1)


def test_the_contract_example_message() -> None:
    with pytest.raises(ValueError) as exc:
        validate_pattern("md.a*b")
    assert str(exc.value) == "invalid token 'a*b' (token 1) in pattern 'md.a*b': '*' must be a whole token"


def test_a_long_topic_is_shortened_in_the_message_but_kept_whole_on_the_exception() -> None:
    long = "md." + "x" * 1000
    with pytest.raises(InvalidTopic) as exc:
        validate_topic(long)
    assert len(str(exc.value)) < 200
    assert exc.value.topic == long


@pytest.mark.parametrize("bad", [b"md.x", None, 3, ["md"], ("md",)])
def test_a_topic_that_is_not_a_str_is_a_type_error(bad: Any) -> None:
    calls: list[Callable[[Any], object]] = [
        validate_topic,
        validate_pattern,
        is_wildcard,
        lambda t: matches(t, "md"),
        lambda t: matches("md", t),
        lambda t: TopicIndex[int]().match(t),
        lambda t: TopicIndex[int]().add(t, 1),
    ]
    for call in calls:
        with pytest.raises(ArgumentTypeError, match="must be a str, got") as exc:
            call(bad)
        assert isinstance(exc.value, TypeError)


def test_a_str_subclass_is_a_topic() -> None:
    class Name(str):
        pass

    assert validate_topic(Name("md.x")) == "md.x"
    index = TopicIndex[int]()
    index.add(Name("md.*"), 1)
    assert index.match(Name("md.x")) == {1}
    assert index.match("md.x") == {1}


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("md.*.AAPL", "md.XNAS.AAPL", True),
        ("md.*.AAPL", "md.AAPL", False),
        ("md.*.AAPL", "md.XNAS.MSFT", False),
        ("md.*.AAPL", "md.XNAS.AAPL.x", False),
        ("md.>", "md.XNAS", True),
        ("md.>", "md.XNAS.AAPL", True),
        ("md.>", "md", False),  # '>' needs at least one token
        ("md.>", "mdx.a", False),
        (">", "md", True),
        (">", "md.XNAS.AAPL", True),
        ("*", "md", True),
        ("*", "md.x", False),
        ("*.>", "md", False),
        ("*.>", "md.x", True),
        ("md.XNAS.AAPL", "md.XNAS.AAPL", True),
        ("md.XNAS.AAPL", "md.XNAS", False),
        ("md.XNAS", "md.XNAS.AAPL", False),
        ("MD.xnas", "md.XNAS", False),  # case-sensitive
        ("prix.e\u0301t\u0301e", "prix.été", False),  # no Unicode normalisation
        ("*.*.>", "a.b.c.d", True),
        ("*.*.>", "a.b", False),
    ],
)
def test_matches_examples(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected
    index = TopicIndex[str]()
    index.add(pattern, "v")
    assert index.match(topic) == ({"v"} if expected else set())


# --- generated: validity against an independent reference ------------------------------------

# Characters of every class the grammar knows: allowed ASCII and non-ASCII, the separator, the
# wildcards, white space, control and format characters.
ODD_CHARS = ["a", "b", "$", "é", "東", ".", "*", ">", " ", "\t", "\x00", "\x7f", "\u200b", "\u00a0"]


def reference_token_ok(token: str, *, pattern: bool, last: bool) -> bool:
    if pattern and (token == "*" or (token == ">" and last)):
        return True
    return bool(token) and all(unicodedata.category(c)[0] not in "CZ" and c not in ".*>" for c in token)


def reference_first_bad(text: str, *, pattern: bool) -> int | None:
    """The index of the first bad token of a short text (within the limits), None if all are good."""
    tokens = text.split(".")
    for i, token in enumerate(tokens):
        if not reference_token_ok(token, pattern=pattern, last=i == len(tokens) - 1):
            return i
    return None


@settings(max_examples=400, deadline=None)
@given(st.text(st.sampled_from(ODD_CHARS), min_size=1, max_size=12), st.booleans())
def test_validity_agrees_with_the_reference(text: str, pattern: bool) -> None:
    validate = validate_pattern if pattern else validate_topic
    bad = reference_first_bad(text, pattern=pattern)
    if bad is None:
        assert validate(text) is text
    else:
        with pytest.raises(InvalidTopic) as exc:
            validate(text)
        assert exc.value.index == bad
        assert exc.value.token == text.split(".")[bad]
        assert f"(token {bad})" in str(exc.value)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(), min_size=1, max_size=20))
def test_validity_of_any_characters_agrees_with_the_reference(text: str) -> None:
    bad = reference_first_bad(text, pattern=False)
    try:
        validate_topic(text)
    except InvalidTopic as err:
        assert err.index == bad
    else:
        assert bad is None


@settings(max_examples=400, deadline=None)
@given(st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=300), st.booleans())
def test_the_ascii_fast_path_agrees_with_the_full_check(text: str, pattern: bool) -> None:
    regex = topics._PATTERN_RE if pattern else topics._TOPIC_RE
    fast = len(text) <= MAX_TOPIC_BYTES and text.count(".") < MAX_TOKENS and regex.fullmatch(text) is not None
    assert fast == (topics._diagnose(text, pattern=pattern) is None)


# --- generated: matching against a regular expression -----------------------------------------

TOKENS = ["a", "b", "c"]
topic_tokens = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=5)
pattern_tokens = st.builds(
    lambda body, tail: [*body, ">"] if tail else body or ["*"],
    st.lists(st.sampled_from([*TOKENS[:2], "*"]), max_size=4),
    st.booleans(),
)


def reference_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(token))
    return re.compile(r"\.".join(parts))


@settings(max_examples=500, deadline=None)
@given(pattern_tokens, topic_tokens)
def test_matches_agrees_with_a_regex(pattern_parts: list[str], topic_parts: list[str]) -> None:
    pattern, topic = ".".join(pattern_parts), ".".join(topic_parts)
    assert matches(pattern, topic) == (reference_regex(pattern).fullmatch(topic) is not None)


@settings(max_examples=200, deadline=None)
@given(topic_tokens, topic_tokens)
def test_a_concrete_pattern_matches_only_itself(a: list[str], b: list[str]) -> None:
    assert matches(".".join(a), ".".join(b)) == (a == b)


# --- TopicIndex -------------------------------------------------------------------------------


def test_index_market_data() -> None:
    index = TopicIndex[str]()
    index.add("md.*.AAPL", "aapl-anywhere")
    index.add("md.>", "all-md")
    index.add("md.XNAS.AAPL", "nasdaq-aapl")
    index.add("md.XNAS.>", "nasdaq")
    index.add("news.>", "news")
    assert index.match("md.XNAS.AAPL") == {"aapl-anywhere", "all-md", "nasdaq-aapl", "nasdaq"}
    assert index.match("md.XNYS.AAPL") == {"aapl-anywhere", "all-md"}
    assert index.match("md.XNAS") == {"all-md"}
    assert index.match("md") == set()
    assert index.match("news.x.y.z") == {"news"}
    assert index.match("other") == set()
    assert len(index) == 5
    assert index.patterns() == ["md.*.AAPL", "md.>", "md.XNAS.AAPL", "md.XNAS.>", "news.>"]


def test_index_pairs_are_a_set() -> None:
    index = TopicIndex[str]()
    index.add("md.>", "s")
    index.add("md.>", "s")
    assert len(index) == 1
    index.add("md.*", "s")  # the same value under a second pattern
    index.add("md.x", "t")
    assert len(index) == 3
    assert index.match("md.x") == {"s", "t"}  # "s" matches twice, appears once
    assert index.remove("md.>", "s") is True
    assert index.remove("md.>", "s") is False
    assert index.match("md.x") == {"s", "t"}  # still there through md.*
    assert index.remove("md.*", "s") is True
    assert index.match("md.x") == {"t"}
    assert index.remove("md.x", "nobody") is False
    assert index.remove("no.such.path", "t") is False
    assert index.remove("md.x.>", "t") is False
    assert index.patterns() == ["md.x"]
    assert len(index) == 1


def test_index_prunes_empty_nodes() -> None:
    index = TopicIndex[int]()
    pairs = [("a.b.c", 1), ("a.*.c", 2), ("a.>", 3), ("a.b.>", 4), (">", 5), ("*", 6), ("a.b.c", 7)]
    for pattern, value in pairs:
        index.add(pattern, value)
    for pattern, value in pairs:
        assert index.remove(pattern, value)
    assert len(index) == 0
    assert not index
    assert index.patterns() == []
    assert index._root.unused()


def test_index_emptied_pattern_goes_to_the_end_of_patterns() -> None:
    index = TopicIndex[int]()
    index.add("a", 1)
    index.add("b", 1)
    index.remove("a", 1)
    index.add("a", 2)
    assert index.patterns() == ["b", "a"]


def test_index_unhashable_value_changes_nothing() -> None:
    index = TopicIndex[object]()
    with pytest.raises(TypeError):
        index.add("a.b.c", [])
    assert len(index) == 0
    assert index._root.unused()


def test_index_match_returns_a_new_set_each_time() -> None:
    index = TopicIndex[int]()
    index.add("a", 1)
    first = index.match("a")
    first.add(99)
    assert index.match("a") == {1}  # served from the cache, unharmed
    index.match("a").clear()
    assert index.match("a") == {1}


def test_index_cache_follows_changes() -> None:
    index = TopicIndex[int]()
    assert index.match("a.b") == set()
    index.add("a.*", 1)
    assert index.match("a.b") == {1}
    index.add("a.*", 1)  # no change
    index.add(">", 2)
    assert index.match("a.b") == {1, 2}
    index.remove("a.*", 1)
    assert index.match("a.b") == {2}
    index.remove("a.*", 1)  # not there: no change
    assert index.match("a.b") == {2}


def test_index_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topics, "CACHE_TOPICS", 3)
    monkeypatch.setattr(topics, "CACHE_VALUES", 10)
    index = TopicIndex[int]()
    for value in range(4):
        index.add(">", value)
    for i in range(20):
        assert index.match(f"t{i}") == {0, 1, 2, 3}
        assert len(index._cache) <= 3
        assert index._cached_values <= 10
        assert index._cached_values == sum(map(len, index._cache.values()))


def test_index_repr() -> None:
    index = TopicIndex[int]()
    index.add("a.>", 1)
    index.add("a.>", 2)
    assert repr(index) == "<TopicIndex: 2 subscriptions, 1 patterns>"


PATTERNS = st.builds(".".join, pattern_tokens)
TOPICS = st.builds(".".join, topic_tokens)
VALUES = st.integers(0, 3)


class IndexMachine(RuleBasedStateMachine):
    """TopicIndex under random adds and removes against the plain set of (pattern, value) pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.index = TopicIndex[int]()
        self.model: dict[str, set[int]] = {}  # pattern -> values, in first-added order

    @rule(pattern=PATTERNS, value=VALUES)
    def add(self, pattern: str, value: int) -> None:
        self.index.add(pattern, value)
        self.model.setdefault(pattern, set()).add(value)

    @rule(pattern=PATTERNS, value=VALUES)
    def remove_any(self, pattern: str, value: int) -> None:
        expected = value in self.model.get(pattern, set())
        assert self.index.remove(pattern, value) is expected
        if expected:
            self.drop(pattern, value)

    @rule(data=st.data())
    def remove_present(self, data: st.DataObject) -> None:
        pairs = sorted((p, v) for p, vs in self.model.items() for v in vs)
        if not pairs:
            return
        pattern, value = data.draw(st.sampled_from(pairs))
        assert self.index.remove(pattern, value) is True
        self.drop(pattern, value)

    def drop(self, pattern: str, value: int) -> None:
        self.model[pattern].discard(value)
        if not self.model[pattern]:
            del self.model[pattern]

    @rule(topic=TOPICS)
    def match(self, topic: str) -> None:
        expected = {v for p, vs in self.model.items() if reference_regex(p).fullmatch(topic) for v in vs}
        assert self.index.match(topic) == expected
        assert self.index.match(topic) == expected  # again, from the cache

    @invariant()
    def sizes(self) -> None:
        assert len(self.index) == sum(map(len, self.model.values()))
        assert self.index.patterns() == list(self.model)
        if not self.model:
            assert self.index._root.unused()


IndexMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_index_against_brute_force = IndexMachine.TestCase
