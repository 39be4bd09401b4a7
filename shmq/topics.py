"""Topics and subscription patterns for pub/sub, and `TopicIndex`, the router's subscription table.

Grammar
-------
A **topic** names what a message is about: 1 to `MAX_TOKENS` (32) *tokens* joined by single dots,
at most `MAX_TOPIC_BYTES` (255) bytes in UTF-8, e.g. ``md.XNAS.AAPL``. A token is one or more
characters, each printable and none of them ``.``, white space (of any script), a control or
other non-printable character (format characters such as U+200B ZERO WIDTH SPACE, surrogates,
unassigned code points), ``*`` or ``>``. Letters and digits of any script and every other
printable character are fine: ``$SYS.stats``, ``user@host``, ``a/b:c``, ``fx.EUR-USD``, ``prix.été``.
Topics are compared as exact strings: case-sensitive, no Unicode normalisation (a composed ``é``
and ``e`` + a combining accent are different tokens).

A **pattern** selects topics. Its tokens are literal tokens as above, or exactly ``*`` (matches
exactly one token), or exactly ``>`` as the *last* token (matches one or more trailing tokens).
So ``md.*.AAPL`` matches ``md.XNAS.AAPL`` but not ``md.AAPL``; ``md.>`` matches ``md.XNAS`` and
``md.XNAS.AAPL`` but not ``md`` itself; ``>`` alone matches every topic. A pattern without
wildcards is a concrete topic and matches only itself. The limits are the same as for topics.

Anything else raises `InvalidTopic` (a `ValueError`) whose message says what is wrong and what is
allowed, naming the offending token and its 0-based index; the exception carries them as
``.topic``, ``.token`` and ``.index`` (``token == ""`` and ``index == -1`` when the problem is the
whole string: empty, or too long). A topic that is not a `str` raises `ArgumentTypeError`
(a `TypeError`). Checks run in this order, and the first failure is reported: type, empty,
length in bytes, number of tokens, then each token from the left.

Why these limits: 255 bytes fits behind a one-byte length field (should the router's frame
header want one), and is the AMQP routing-key limit, so topics move between the two unchanged. 32 tokens is
ten times the depth of any real hierarchy (market data is ``md.<venue>.<symbol>``), and bounds the
depth of the trie and the work of one match.

TopicIndex
----------
A token trie. Each node has a dict of children by literal token, one optional ``*`` child, the set
of values whose pattern ends at that node, and the set of values whose pattern continues with
``>`` there (the ``>`` terminal: it needs no node of its own, since nothing may follow it).
`TopicIndex.match` walks the topic's tokens once, keeping the set of nodes reached so far (at
most the literal child and the ``*`` child of each); at every step it collects the ``>`` values
of the nodes it stands on, and at the end the values of the nodes where the topic ends. The cost
depends on the topic's depth and on how many distinct pattern prefixes match a prefix of it
(plus the size of the answer), never on the total number of subscriptions: the walk answers
``md.XNAS.S7`` in ~1.4 µs whether the table holds 10 symbols (50 subscriptions) or 100,000
(500,000 subscriptions).

A small cache sits in front of the trie, because it measured well: a dict from topic to answer,
emptied whenever an add or remove changes the index, and when it holds `CACHE_TOPICS` (4096)
topics or `CACHE_VALUES` (65536) values in all (emptied, not LRU: no bookkeeping on a hit). A hit
skips validation and the walk: ~0.15 µs instead of ~1.4 µs for a 3-token topic with a couple of
subscribers, ~0.5 µs instead of ~2.2 µs with a hundred (the answer is copied for the caller either
way). A miss costs ~0.5 µs more than no cache (storing a frozen copy), so a stream over more
distinct topics than the cache holds, or subscriptions changing between most publishes, run
~30 % slower than without it; market data (a bounded set of symbols, each published over and
over) is the case it is for. The cache holds references to the values, not copies; its memory is
bounded by the two limits. Validation of a topic is a precompiled regular expression for ASCII
topics (~0.3 µs); other topics take the character-by-character path (~1.4 µs).

The index holds (pattern, value) pairs as a set: adding a pair twice keeps one, and `remove`
says whether the pair was there. One value may be added under several patterns; `match` returns
each matching value once. Values must be hashable. The index is not locked: if threads mutate it
while others match, the caller provides the lock (a single-threaded router needs none).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Hashable
from typing import Generic, TypeVar

from shmq._errors import ArgumentTypeError, InvalidTopic

__all__ = [
    "CACHE_TOPICS",
    "CACHE_VALUES",
    "MAX_TOKENS",
    "MAX_TOPIC_BYTES",
    "TopicIndex",
    "is_wildcard",
    "matches",
    "validate_pattern",
    "validate_topic",
]

MAX_TOPIC_BYTES = 255  #: longest topic or pattern, in bytes of UTF-8
MAX_TOKENS = 32  #: most dot-separated tokens in a topic or pattern
CACHE_TOPICS = 4096  #: a TopicIndex's match cache is emptied when it holds this many topics ...
CACHE_VALUES = 65536  #: ... or this many values in all its answers

STAR = "*"  #: the pattern token matching exactly one token
TAIL = ">"  #: the last pattern token, matching one or more tokens

_ALLOWED = (
    "a token is letters, digits and printable characters such as _ - : / @ $ "
    "(no '.', white space or control characters)"
)

# The fast path for ASCII strings, which are nearly all topics: one fullmatch in C. A token is
# printable ASCII (0x21-0x7e) except '*' (0x2a), '.' (0x2e) and '>' (0x3e). Whatever it rejects
# goes to _diagnose, which finds the reason; whatever it accepts, _diagnose would accept too
# (tests/test_topics.py checks that).
_TOKEN = r"[\x21-\x29\x2b-\x2d\x2f-\x3d\x3f-\x7e]+"
_TOPIC_RE = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
_PATTERN_RE = re.compile(rf"(?:{_TOKEN}|\*)(?:\.(?:{_TOKEN}|\*))*(?:\.>)?|>")


def _validate(text: str, fast: re.Pattern[str], pattern: bool) -> str:
    # Fast path: one precompiled regex for ASCII text within the limits; anything else (and every
    # rejection) goes through the character-by-character check that writes the error message.
    if (
        type(text) is str
        and text.isascii()
        and len(text) <= MAX_TOPIC_BYTES
        and text.count(".") < MAX_TOKENS
        and fast.fullmatch(text)
    ):
        return text
    error = _diagnose(text, pattern=pattern)
    if error is not None:
        raise error
    return text


def validate_topic(topic: str) -> str:
    """Return `topic` if it is a valid concrete topic (no wildcards), else raise `InvalidTopic`.

    Not a str at all: `ArgumentTypeError`.
    """
    return _validate(topic, _TOPIC_RE, pattern=False)


def validate_pattern(pattern: str) -> str:
    """Return `pattern` if it is a valid subscription pattern, else raise `InvalidTopic`.

    A concrete topic is a valid pattern (it matches only itself). Not a str: `ArgumentTypeError`.
    """
    return _validate(pattern, _PATTERN_RE, pattern=True)


def is_wildcard(pattern: str) -> bool:
    """True if the (valid) pattern has a ``*`` or ``>`` token, so it may match other topics than itself."""
    return any(token in (STAR, TAIL) for token in validate_pattern(pattern).split("."))


def matches(pattern: str, topic: str) -> bool:
    """True if `topic` matches `pattern`; both are validated (`InvalidTopic` if either is not valid)."""
    wanted = validate_pattern(pattern).split(".")
    tokens = validate_topic(topic).split(".")
    if wanted[-1] == TAIL:
        del wanted[-1]
        if len(tokens) <= len(wanted):  # '>' needs at least one token
            return False
        del tokens[len(wanted) :]
    elif len(tokens) != len(wanted):
        return False
    return all(w in (STAR, t) for w, t in zip(wanted, tokens, strict=True))


def _diagnose(text: object, *, pattern: bool) -> InvalidTopic | None:
    """The error that explains why `text` is not a valid topic (pattern), or None if it is valid.

    The complete rules, character by character: the fast paths above only decide the common case.
    """
    what = "pattern" if pattern else "topic"
    if not isinstance(text, str):
        raise ArgumentTypeError(f"a {what} must be a str, got {type(text).__name__}")
    if not text:
        example = "'md.*.AAPL' or 'md.>'" if pattern else "'md.XNAS.AAPL'"
        return InvalidTopic(
            f"empty {what}: a {what} is 1 to {MAX_TOKENS} dot-separated tokens, e.g. {example}",
            topic=text,
        )
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TOPIC_BYTES:
        shown = text if len(text) <= 60 else text[:60] + "..."
        return InvalidTopic(
            f"{what} {shown!r} is {size} bytes in UTF-8; the limit is {MAX_TOPIC_BYTES}", topic=text
        )
    tokens = text.split(".")
    if len(tokens) > MAX_TOKENS:
        return InvalidTopic(
            f"{what} {text!r} has {len(tokens)} tokens; the limit is {MAX_TOKENS} "
            f"(token {MAX_TOKENS} is {tokens[MAX_TOKENS]!r})",
            topic=text,
            token=tokens[MAX_TOKENS],
            index=MAX_TOKENS,
        )
    last = len(tokens) - 1
    for index, token in enumerate(tokens):
        reason = _token_problem(token, pattern=pattern, last=index == last)
        if reason is None:
            continue
        if not token:
            where = "leading" if index == 0 else "trailing" if index == last else "doubled"
            message = (
                f"empty token (token {index}) in {what} {text!r}: a {where} dot; "
                "tokens are separated by single dots, with none at either end"
            )
        else:
            message = f"invalid token {token!r} (token {index}) in {what} {text!r}: {reason}"
        return InvalidTopic(message, topic=text, token=token, index=index)
    return None


def _token_problem(token: str, *, pattern: bool, last: bool) -> str | None:
    """Why `token` cannot stand in a topic (pattern), at the end or not; None if it can."""
    if not token:
        return "empty"
    if pattern:
        if token == STAR:
            return None
        if token == TAIL:
            return None if last else "'>' must be the last token (it matches one or more trailing tokens)"
    for char in token:
        if char in (STAR, TAIL):
            if pattern:
                return f"{char!r} must be a whole token"
            return (
                f"{char!r} is a wildcard, not allowed in a topic "
                "(wildcards belong in subscription patterns); " + _ALLOWED
            )
        if char.isspace():
            return f"white space ({char!r}) is not allowed; {_ALLOWED}"
        if not char.isprintable():
            kind = (
                "a control character" if unicodedata.category(char) == "Cc" else "a non-printable character"
            )
            return f"{kind} ({char!r}, U+{ord(char):04X}) is not allowed; {_ALLOWED}"
    return None


T = TypeVar("T", bound=Hashable)


class _Node(Generic[T]):
    """One trie node: the patterns that share the tokens on the path from the root to here."""

    __slots__ = ("children", "here", "rest", "star")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}  #: by literal token
        self.star: _Node[T] | None = None  #: the '*' child
        self.here: set[T] = set()  #: values whose pattern ends at this node
        self.rest: set[T] = set()  #: values whose pattern is this node's path + '>'

    def unused(self) -> bool:
        return not (self.here or self.rest or self.children or self.star is not None)


class TopicIndex(Generic[T]):
    """The router's subscription table: (pattern, value) pairs, looked up by topic.

    ``index.add("md.*.AAPL", sub)`` then ``index.match("md.XNAS.AAPL") == {sub}``. See the module
    docstring for the trie and the cost of a match.
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._patterns: dict[str, int] = {}  # pattern -> how many values it has (> 0)
        self._size = 0
        self._cache: dict[str, frozenset[T]] = {}  # topic -> answer, valid until the next change
        self._cached_values = 0

    def add(self, pattern: str, value: T) -> None:
        """Subscribe `value` to `pattern`. Adding a pair that is already there changes nothing."""
        tokens = validate_pattern(pattern).split(".")
        hash(value)  # an unhashable value fails here, before any node is made
        node = self._root
        tail = tokens[-1] == TAIL
        if tail:
            del tokens[-1]
        for token in tokens:
            if token == STAR:
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                node = child
        values = node.rest if tail else node.here
        if value in values:
            return
        values.add(value)
        self._forget()
        self._patterns[pattern] = self._patterns.get(pattern, 0) + 1
        self._size += 1

    def remove(self, pattern: str, value: T) -> bool:
        """Unsubscribe `value` from `pattern`; False if that pair was not in the index."""
        tokens = validate_pattern(pattern).split(".")
        tail = tokens[-1] == TAIL
        if tail:
            del tokens[-1]
        path: list[tuple[_Node[T], str]] = []  # (parent, token) for every node below the root
        node = self._root
        for token in tokens:
            child = node.star if token == STAR else node.children.get(token)
            if child is None:
                return False
            path.append((node, token))
            node = child
        values = node.rest if tail else node.here
        if value not in values:
            return False
        values.discard(value)
        self._forget()
        left = self._patterns[pattern] - 1
        if left:
            self._patterns[pattern] = left
        else:
            del self._patterns[pattern]
        self._size -= 1
        # Prune the nodes that no longer lead to any value, from the bottom up.
        while path and node.unused():
            parent, token = path.pop()
            if token == STAR:
                parent.star = None
            else:
                del parent.children[token]
            node = parent
        return True

    def match(self, topic: str) -> set[T]:
        """Every value subscribed to a pattern that matches `topic` (a new set, each value once)."""
        if type(topic) is str:  # only valid topics are cached; anything else is validated below
            hit = self._cache.get(topic)
            if hit is not None:
                return set(hit)
        tokens = validate_topic(topic).split(".")
        found: set[T] = set()
        nodes = [self._root]
        for token in tokens:
            reached: list[_Node[T]] = []
            for node in nodes:
                if node.rest:  # '>' here: this token and the rest, one or more of them
                    found |= node.rest
                child = node.children.get(token)
                if child is not None:
                    reached.append(child)
                if node.star is not None:
                    reached.append(node.star)
            if not reached:
                break
            nodes = reached
        else:
            for node in nodes:
                if node.here:
                    found |= node.here
        if len(self._cache) >= CACHE_TOPICS or self._cached_values + len(found) > CACHE_VALUES:
            self._forget()
        self._cache[topic] = frozenset(found)
        self._cached_values += len(found)
        return found

    def _forget(self) -> None:
        """Empty the match cache (the index changed, or the cache is full)."""
        self._cache.clear()
        self._cached_values = 0

    def patterns(self) -> list[str]:
        """The patterns that have at least one value, oldest first (one emptied and added again is new)."""
        return list(self._patterns)

    def __len__(self) -> int:
        """The number of (pattern, value) pairs."""
        return self._size

    def __repr__(self) -> str:
        return f"<TopicIndex: {self._size} subscriptions, {len(self._patterns)} patterns>"
