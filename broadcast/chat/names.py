"""Which room a WebSocket request asks for, from its path.

A room name is a path segment and a Redis key part, and it is echoed in
every structured frame without escaping, so it is kept to a small ASCII set
that needs no percent-encoding, no JSON escaping and no quoting anywhere.
Names are case-sensitive: ``Lobby`` and ``lobby`` are two rooms.
"""

from __future__ import annotations

import http
import re

WS_PATH = "/ws"  # the Go original's path, which joins DEFAULT_ROOM
DEFAULT_ROOM = "lobby"
MAX_ROOM_CHARS = 64  # long enough for a slug or a UUID, short enough for a log line
_ROOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ROOM_CHARS = re.compile(r"[A-Za-z0-9_.-]*")


class RoomPathError(ValueError):
    """The path names no room: answer ``status`` with ``reason`` instead of a WebSocket.

    Admission maps it one to one onto its own refusal
    (``Refused(err.status, err.reason)``): 404 for a path outside ``/ws``,
    400 ``invalid room name: ...`` for a bad name under it.
    """

    def __init__(self, status: http.HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def room_problem(name: str) -> str | None:
    """Why ``name`` is not a valid room name, or None if it is."""
    if not 1 <= len(name) <= MAX_ROOM_CHARS:
        return f"must be 1 to {MAX_ROOM_CHARS} characters"
    if not _ROOM_CHARS.fullmatch(name):
        return "may contain only A-Z a-z 0-9 _ . -"
    if not _ROOM.fullmatch(name):
        return "must start with a letter or digit"
    return None


def room_from_path(path: str) -> str:
    """The room that the request path (no query string) joins; else RoomPathError.

    The path is taken as sent, not percent-decoded: a valid name never needs
    encoding, so a ``%`` can only spell a name that would be refused anyway
    or a second spelling of one, and one name has one spelling.
    """
    if path == WS_PATH:
        return DEFAULT_ROOM
    head, slash, room = path.partition("/ws/")
    if head or not slash:
        raise RoomPathError(http.HTTPStatus.NOT_FOUND, f"no WebSocket at {path}; use {WS_PATH} or {WS_PATH}/ROOM")
    problem = room_problem(room)
    if problem:
        raise RoomPathError(http.HTTPStatus.BAD_REQUEST, f"invalid room name: {problem}")
    return room
