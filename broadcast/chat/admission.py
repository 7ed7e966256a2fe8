"""Who may open a WebSocket, decided from the HTTP request alone.

Kept free of sockets and threads so the rules can be read, and tested, as
rules. The RFC 6455 mechanics (key, version, upgrade headers, Origin) stay
with websockets' ``ServerProtocol.accept``, in the engine; ``Refused`` and
``request_target`` are the engine's boundary (net/app.py), shared by both.
"""

from __future__ import annotations

import hmac
import http
import unicodedata
from dataclasses import dataclass
from urllib.parse import parse_qs

from ..net.app import Refused, request_target
from ..ids import BadId, MessageId, parse_id
from .names import DEFAULT_ROOM, WS_PATH, RoomPathError, room_from_path

MAX_NAME_CHARS = 32
# Control, format (bidi overrides, zero-width) and line/paragraph separators
# would let one name rewrite or hide the lines around it.
_FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}
# Letters and symbols that render as nothing (Hangul and Braille fillers,
# invisible vowels): their categories (Lo, So, Mn) pass the test above, so a
# name made of them would show as blank, like whitespace does.
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u17b4\u17b5")


@dataclass(frozen=True)
class Policy:
    """The operator's access rules, from the server's configuration."""

    token: str | None = None
    require_username: bool = False


@dataclass(frozen=True)
class Admission:
    username: str | None
    room: str = DEFAULT_ROOM
    history: int | None = None  # ?history=N: how many past messages to replay; None: the protocol's default
    since: MessageId | None = None  # ?since=ID: recover what came after it
    session: str | None = None  # ?session=TOKEN: take a name over from a former connection


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid username, or None if it is."""
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        return f"must be 1 to {MAX_NAME_CHARS} characters"
    if all(_blank(ch) for ch in name):
        return "must contain a visible character"
    if _blank(name[0]) or _blank(name[-1]):
        return "must not start or end with whitespace"
    if any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in name):
        return "must not contain control or formatting characters"
    return None


def _blank(ch: str) -> bool:
    return ch.isspace() or ch in _INVISIBLE


def _bearer(value: str) -> str | None:
    """The credentials of a ``Bearer`` Authorization value; schemes are case-insensitive (RFC 9110 11.1)."""
    scheme, _, credentials = value.partition(" ")
    return credentials.strip(" ") if scheme.lower() == "bearer" else None


def _authorized(token: str, headers, query: dict[str, list[str]]) -> bool:
    """A bearer header or ``?token=``, compared in constant time."""
    presented = [c for c in map(_bearer, headers.get_all("Authorization")) if c is not None]
    presented += query.get("token", [])
    if len(presented) != 1:
        return False
    return hmac.compare_digest(presented[0].encode(), token.encode())


def _query(target) -> dict[str, list[str]]:
    try:
        return parse_qs(target.query, keep_blank_values=True, strict_parsing=False,
                        errors="strict", max_num_fields=16)
    except (ValueError, UnicodeDecodeError):
        raise Refused(http.HTTPStatus.BAD_REQUEST, "malformed query string") from None


def _check_token(headers, query: dict[str, list[str]], policy: Policy) -> None:
    if policy.token is not None and not _authorized(policy.token, headers, query):
        raise Refused(http.HTTPStatus.UNAUTHORIZED, "missing or invalid token",
                      (("WWW-Authenticate", 'Bearer realm="broadcast"'),))


def authorize(path: str, headers, policy: Policy) -> None:
    """For the plain HTTP routes that show who is where: the same token as the WebSocket, or Refused."""
    _check_token(headers, _query(request_target(path, headers)), policy)


def _one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    if values is None:
        return None
    if len(values) > 1:
        raise Refused(http.HTTPStatus.BAD_REQUEST, f"invalid {key}: given more than once")
    return values[0]


def _history(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isascii() or not text.isdigit():
        raise Refused(http.HTTPStatus.BAD_REQUEST, "invalid history: must be a whole number of messages")
    return int(text)


def _since(text: str | None) -> MessageId | None:
    if text is None:
        return None
    try:
        return parse_id(text)
    except BadId as exc:
        raise Refused(http.HTTPStatus.BAD_REQUEST, f"invalid since: {exc}") from None


def admit(path: str, headers, policy: Policy) -> Admission:
    """Check the request target and credentials; raise Refused, or say who is joining which room."""
    target = request_target(path, headers)
    try:
        room = room_from_path(target.path)
    except RoomPathError as exc:
        raise Refused(exc.status, exc.reason) from None
    query = _query(target)
    _check_token(headers, query, policy)
    extra = dict(room=room, history=_history(_one(query, "history")), since=_since(_one(query, "since")),
                 session=_one(query, "session"))
    names = query.get("username")
    if names is None:
        if policy.require_username:
            raise Refused(http.HTTPStatus.BAD_REQUEST, "username required: connect to /ws?username=NAME")
        return Admission(None, **extra)
    if len(names) > 1:
        raise Refused(http.HTTPStatus.BAD_REQUEST, "invalid username: given more than once")
    problem = name_problem(names[0])
    if problem:
        raise Refused(http.HTTPStatus.BAD_REQUEST, f"invalid username: {problem}")
    return Admission(names[0], **extra)
