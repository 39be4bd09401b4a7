"""Who may use a bus: peer credentials, the default policy, and ACL files (`Router(bus, acl=PATH)`).

Peer credentials
----------------
The router's control socket lives in the abstract Unix namespace, which has no file and so no
file permissions: any process on the machine can connect to it. What the router trusts instead is
the kernel: for every connection it reads ``SO_PEERCRED`` (the pid, uid and gid of the process
that connected) and ``SO_PEERGROUPS`` (its supplementary groups). A client cannot forge them. The
pid a client claims in its hello must be the kernel's, or the hello is refused.

The default policy (no ACL)
---------------------------
Without an ACL, only processes running as the router's own user, and root, may connect; everyone
else is refused with `PermissionDenied` at hello. Nothing is open by default.

ACL files
---------
One rule a line; ``#`` starts a comment; blank lines are ignored::

    # VERDICT  ACTION     WHO             PATTERN...
    allow      publish    user:alice      orders.>
    deny       subscribe  user:bob        orders.secret.>
    allow      subscribe  group:ops       >
    allow      any        user:1001       md.*.AAPL md.*.MSFT
    allow      any        user:root       >

* VERDICT is ``allow`` or ``deny``.
* ACTION is ``publish``, ``subscribe``, or ``any`` (both).
* WHO is ``user:NAME``, ``user:UID``, ``group:NAME``, ``group:GID`` or ``*`` (everyone). Names are
  looked up (pwd, grp) when the file is read, at router start; a numeric id needs no account. A
  process is in ``group:G`` when G is its gid or one of its supplementary groups.
* PATTERN is one or more topic patterns (``*`` one token, ``>`` the rest; see shmq.topics); a
  line with several patterns is the same as one line per pattern, in order.

Rules are read top to bottom and **the first rule that applies decides**; when none applies, the
answer is no. With an ACL the file is the whole policy: the router's own user and root get only
what it grants them (``allow any user:root >`` gives root everything).

* **Publishing** topic T: the first rule for ``publish`` (or ``any``) whose WHO includes the
  publisher and whose pattern matches T decides. A publisher with no ``allow`` rule for
  ``publish`` at all is refused at hello.
* **Subscribing** with pattern S: S is allowed only if every topic it can match is allowed, which
  is checked on patterns, not topics: the first applicable rule whose pattern *covers* S (every
  topic S matches, it matches too) decides; a ``deny`` rule that merely *overlaps* S (some topic
  matches both) refuses S, since S would receive topics that rule denies; an ``allow`` rule that
  only overlaps S decides nothing (it cannot vouch for the rest of S). This is conservative: it
  never admits a pattern that could receive a denied topic, and it may refuse one that a
  redundant rule set would, topic by topic, allow.

A syntax error, an unknown user or group, or a bad pattern raises `InvalidArgument` naming the
file, the line number and what is wrong.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shmq._errors import InvalidArgument, InvalidTopic
from shmq.topics import TAIL, matches, validate_pattern

__all__ = [
    "Acl",
    "Decision",
    "PeerCredentials",
    "Rule",
    "first_match",
    "pattern_covers",
    "patterns_overlap",
    "peer_credentials",
]

Action = Literal["publish", "subscribe"]
ACTIONS: dict[str, frozenset[str]] = {
    "publish": frozenset({"publish"}),
    "subscribe": frozenset({"subscribe"}),
    "any": frozenset({"publish", "subscribe"}),
}
VERDICTS = ("allow", "deny")
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python 3.11 lacks the name
_UCRED = struct.Struct("3i")


# -- peer credentials -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCredentials:
    """Who is at the other end of a Unix socket, as the kernel says."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  #: gid and supplementary groups

    def describe(self) -> str:
        """'user alice (uid 1001)', for messages."""
        return f"user {_user_name(self.uid)} (uid {self.uid})"


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The credentials of the process that connected `sock` (SO_PEERCRED, SO_PEERGROUPS)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCredentials(pid, uid, gid, frozenset({gid, *_peer_groups(sock, uid, gid)}))


def _peer_groups(sock: socket.socket, uid: int, gid: int) -> list[int]:
    for size in (4 * 256, 4 * 65536):  # NGROUPS_MAX is 65536; nearly everyone has a handful
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break  # an old kernel: fall back to the group database
        return list(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        return []


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# -- patterns --------------------------------------------------------------------------------------


def pattern_covers(outer: str, inner: str) -> bool:
    """Whether every topic `inner` matches, `outer` matches too (both are valid patterns)."""
    outer_tokens, inner_tokens = outer.split("."), inner.split(".")
    for i, token in enumerate(outer_tokens):
        if token == TAIL:
            return i < len(inner_tokens)  # '>' takes one or more of whatever inner has left
        if i >= len(inner_tokens):
            return False  # outer needs more tokens than inner's topics have
        other = inner_tokens[i]
        if other == TAIL:
            return False  # inner's topics grow without bound; outer's (no '>' here) do not
        if token != "*" and token != other:
            return False  # a literal covers only itself, not another literal nor '*'
    return len(outer_tokens) == len(inner_tokens)


def patterns_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both patterns."""
    a_tokens, b_tokens = a.split("."), b.split(".")
    for i in range(max(len(a_tokens), len(b_tokens))):
        x = a_tokens[i] if i < len(a_tokens) else None
        y = b_tokens[i] if i < len(b_tokens) else None
        if x == TAIL:
            return y is not None
        if y == TAIL:
            return x is not None
        if x is None or y is None:
            return False
        if x != "*" and y != "*" and x != y:
            return False
    return True


# -- rules -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One pattern of one ACL line."""

    line: int
    verdict: str  #: "allow" or "deny"
    actions: frozenset[str]
    who: str  #: as written: "user:alice", "group:100", "*"
    kind: str  #: "user", "group" or "*"
    id: int  #: the uid or gid (-1 for "*")
    pattern: str
    text: str  #: the whole line, comments and extra blanks removed

    @property
    def allows(self) -> bool:
        return self.verdict == "allow"

    def applies_to(self, peer: PeerCredentials, action: str) -> bool:
        if action not in self.actions:
            return False
        if self.kind == "user":
            return peer.uid == self.id
        if self.kind == "group":
            return self.id in peer.groups
        return True

    def describe(self, source: str) -> str:
        return f'{source} line {self.line}: "{self.text}"'


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: Rule | None  #: the rule that decided; None when no rule applied (denied)
    reason: str  #: for the user: what decided, and what to do about a refusal


def first_match(rules: Iterable[tuple[bool, str, str]], topic: str) -> tuple[bool, str] | None:
    """(allowed, description) of the first (allows, pattern, description) whose pattern matches."""
    for allows, pattern, description in rules:
        if matches(pattern, topic):
            return allows, description
    return None


class Acl:
    """A parsed ACL file: `Acl.load(path)` or `Acl.parse(text)` (grammar in the module docstring)."""

    def __init__(self, rules: Sequence[Rule], source: str) -> None:
        self.rules = tuple(rules)
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Acl:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read the ACL file {os.fspath(path)}: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"the ACL file {os.fspath(path)} is not UTF-8 text: {exc}") from None
        return cls.parse(text, source=os.fspath(path))

    @classmethod
    def parse(cls, text: str, source: str = "<acl>") -> Acl:
        rules: list[Rule] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            words = raw.split("#", 1)[0].split()
            if words:
                rules.extend(_parse_line(words, number, source))
        return cls(rules, source)

    def __repr__(self) -> str:
        return f"<shmq.acl.Acl {self.source} ({len(self.rules)} rules)>"

    def rules_for(self, peer: PeerCredentials, action: Action) -> list[Rule]:
        return [r for r in self.rules if r.applies_to(peer, action)]

    def may(self, peer: PeerCredentials, action: Action) -> bool:
        """Whether any rule could let `peer` do `action` (else its hello is refused at once)."""
        return any(r.allows for r in self.rules_for(peer, action))

    def check_publish(self, peer: PeerCredentials, topic: str) -> Decision:
        for rule in self.rules_for(peer, "publish"):
            if matches(rule.pattern, topic):
                return self._decided(rule, f"publishing on {topic!r}")
        return Decision(
            False,
            None,
            f"no rule in {self.source} allows {peer.describe()} to publish on {topic!r} (rules are read "
            f'top to bottom, the first that applies decides; add one such as "allow publish '
            f'{self._who(peer)} {topic}")',
        )

    def check_subscribe(self, peer: PeerCredentials, pattern: str) -> Decision:
        for rule in self.rules_for(peer, "subscribe"):
            if pattern_covers(rule.pattern, pattern):
                return self._decided(rule, f"subscribing to {pattern!r}")
            if not rule.allows and patterns_overlap(rule.pattern, pattern):
                return Decision(
                    False,
                    rule,
                    f"subscribing to {pattern!r} is denied by {rule.describe(self.source)}: the pattern "
                    "would receive topics that rule denies; subscribe to narrower patterns",
                )
        return Decision(
            False,
            None,
            f"no rule in {self.source} allows {peer.describe()} to subscribe to {pattern!r} (a rule's "
            'pattern must cover the whole subscription pattern; add one such as "allow subscribe '
            f'{self._who(peer)} {pattern}")',
        )

    def _decided(self, rule: Rule, what: str) -> Decision:
        verb = "allowed" if rule.allows else "denied"
        return Decision(rule.allows, rule, f"{what} is {verb} by {rule.describe(self.source)}")

    @staticmethod
    def _who(peer: PeerCredentials) -> str:
        name = _user_name(peer.uid)
        return f"user:{name}" if name != str(peer.uid) else f"user:{peer.uid}"


def _parse_line(words: list[str], number: int, source: str) -> list[Rule]:
    where = f"{source} line {number}"
    if len(words) < 4:
        raise InvalidArgument(
            f"{where}: a rule is VERDICT ACTION WHO PATTERN... (e.g. 'allow publish user:alice orders.>'), "
            f"got {' '.join(words)!r}"
        )
    verdict, action, who, *patterns = words
    if verdict not in VERDICTS:
        raise InvalidArgument(f"{where}: a rule starts with 'allow' or 'deny', got {verdict!r}")
    if action not in ACTIONS:
        raise InvalidArgument(f"{where}: the action is 'publish', 'subscribe' or 'any', got {action!r}")
    kind, id_ = _parse_who(who, where)
    rules = []
    for pattern in patterns:
        try:
            validate_pattern(pattern)
        except InvalidTopic as exc:
            raise InvalidArgument(f"{where}: bad pattern {pattern!r}: {exc}") from None
        rules.append(Rule(number, verdict, ACTIONS[action], who, kind, id_, pattern, " ".join(words)))
    return rules


def _parse_who(who: str, where: str) -> tuple[str, int]:
    if who == "*":
        return "*", -1
    kind, sep, name = who.partition(":")
    if not sep or kind not in ("user", "group") or not name:
        raise InvalidArgument(
            f"{where}: WHO is user:NAME, user:UID, group:NAME, group:GID or '*', got {who!r}"
        )
    if name.isdigit():
        return kind, int(name)
    try:
        if kind == "user":
            return kind, pwd.getpwnam(name).pw_uid
        return kind, grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidArgument(
            f"{where}: there is no {kind} named {name!r} on this machine; create it first, or give "
            f"the numeric id ({kind}:1234)"
        ) from None


def default_admits(peer: PeerCredentials, owner_uid: int) -> bool:
    """The policy without an ACL: the router's own user and root."""
    return peer.uid in (owner_uid, 0)
