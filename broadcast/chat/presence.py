"""Who is in one room on this node, and which connection holds each name.

A name is unique per room unless the operator allows duplicates. Each named
connection gets a session token; a client that reconnects with it takes its
name over from its own former connection, which may still look alive (its
TCP connection not yet known to be dead). That former connection is handed
back for the caller to close with REPLACED_CODE, so a resume is never refused
as a duplicate of itself. Not thread-safe: the room's lock guards it, and
``add`` runs at admission under that lock so that two Alices cannot both pass.
"""

from __future__ import annotations

import hmac
import secrets
from typing import NamedTuple

SESSION_TOKEN_BYTES = 16  # 128 random bits: a token is a credential for a name
REPLACED_CODE = 4000  # application range (RFC 6455 7.4.2): not an error, a handover
REPLACED_REASON = "replaced by a new connection"


class NameTaken(ValueError):
    """Another connection holds the name; ``reason`` is the 409's text (no token in it)."""

    def __init__(self, name: str, room: str) -> None:
        self.reason = f"name {name} is taken in room {room}"
        super().__init__(self.reason)


class Seated(NamedTuple):
    """The outcome of ``add``: the session token to give the client (None when anonymous),
    and the former connection it replaces (None when there is none)."""

    token: str | None
    replaced: object | None


class _Seat:
    __slots__ = ("name", "token")  # no repr: the token is a secret

    def __init__(self, name: str, token: str) -> None:
        self.name = name
        self.token = token


class Presence:
    """The members of room ``room`` on this node; a member is any hashable object (a connection)."""

    def __init__(self, room: str, allow_duplicate_names: bool = False) -> None:
        self.room = room
        self.allow_duplicate_names = allow_duplicate_names
        self._seats: dict[object, _Seat] = {}
        self._holders: dict[str, list[object]] = {}  # name -> its members, in join order
        self._anonymous: set[object] = set()

    def __len__(self) -> int:
        return len(self._seats) + len(self._anonymous)

    @property
    def anonymous(self) -> int:
        return len(self._anonymous)

    def names(self) -> list[str]:
        """Every named member's name, sorted by code point (a duplicate name once per holder)."""
        return sorted(seat.name for seat in self._seats.values())

    def is_taken(self, name: str) -> bool:
        return name in self._holders

    def add(self, member: object, name: str | None, session: str | None = None,
            claimed: str | None = None) -> Seated:
        """Seat ``member``; NameTaken if ``name`` is held and ``session`` is not its holder's token.

        A matching ``session`` moves the name and its token to ``member``. A
        session that matches nothing is ignored (the former connection's node
        may have restarted): the name, if free, gets a fresh token, or
        ``claimed``, a token that already holds the name across nodes.
        """
        if name is None:
            self._anonymous.add(member)
            return Seated(None, None)
        former = self._holder_of(name, session) if session else None
        if former is not None:
            token = self._seats[former].token
            self.remove(former)
        elif name in self._holders and not self.allow_duplicate_names:
            raise NameTaken(name, self.room)
        else:
            token = claimed or secrets.token_urlsafe(SESSION_TOKEN_BYTES)
        self._seats[member] = _Seat(name, token)
        self._holders.setdefault(name, []).append(member)
        return Seated(token, former)

    def remove(self, member: object) -> tuple[str, str] | None:
        """Unseat ``member``; its (name, token), to free across nodes, or None if it held none.

        A no-op if it is not seated (a replaced connection closing later).
        """
        self._anonymous.discard(member)
        seat = self._seats.pop(member, None)
        if seat is None:
            return None
        holders = self._holders[seat.name]
        holders.remove(member)
        if not holders:
            del self._holders[seat.name]
        return seat.name, seat.token

    def holders(self, name: str) -> list[object]:
        """The members holding ``name`` here, in join order."""
        return list(self._holders.get(name, ()))

    def _holder_of(self, name: str, session: str) -> object | None:
        """The member holding ``name`` with token ``session``, compared in constant time."""
        for member in self._holders.get(name, ()):
            if hmac.compare_digest(self._seats[member].token.encode(), session.encode()):
                return member
        return None
