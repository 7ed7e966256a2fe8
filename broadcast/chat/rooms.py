"""Rooms of joined clients: the one place where broadcast order is decided.

A room owns its members: they join and leave only here, and it reaches them
only through the engine's ``Member`` port. Every frame is appended to every
member's outbox (``Member.send``, the outbox's own bound method) while the
lock is held,
so all clients see one order. Appending never blocks (it is a list append
and, at most, a wake-up of a writer), which is what makes holding a lock
across the whole fan-out cheap and safe. When the writers fall behind, it
is the publishers who wait (``wait_writers``), after the fan-out and outside
the lock, never the fan-out itself.
"""

from __future__ import annotations

import threading
import time

from ..net.app import EVICTED
from .names import DEFAULT_ROOM

# Longest a reader is held back, after one read, for clients that our
# writers have not caught up with; past it, it reads on. A client whose
# socket stalls is evicted long before (outbox.STALLED_AFTER_S).
BACKPRESSURE_MAX_S = 5.0
# How often a held-back reader looks whether a client it waits for stalled.
BACKPRESSURE_POLL_S = 0.1


class Room:
    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        # Members in join order, as dict keys: joining and leaving cost O(1),
        # where rebuilding a tuple made connecting 10,000 clients O(N^2).
        self._joined: dict = {}
        # The broadcasts' immutable snapshot of _joined, so that a broadcast
        # iterates without copying; rebuilt by the first broadcast after a
        # join or leave (None until then).
        self._members: tuple | None = ()
        # Members that went over their bound while their socket took data;
        # swapped out whole by wait_writers, under _lock.
        self._behind: list = []

    def __len__(self) -> int:
        return len(self._joined)

    def join(self, member) -> int:
        """Add ``member``, whose 101 is queued (``accept``) before any broadcast can reach it."""
        with self._lock:
            member.accept()
            self._joined[member] = None
            self._members = None
            return len(self._joined)

    def leave(self, member) -> int:
        """Remove ``member`` if present; returns the new count."""
        with self._lock:
            self._joined.pop(member, None)
            self._members = None
            return len(self._joined)

    def broadcast(self, frame: bytes, skip: int | None = None) -> None:
        """Queue ``frame`` for every member but the one whose id is ``skip``, all in one order."""
        with self._lock:
            members = self._members
            if members is None:
                members = self._members = tuple(self._joined)
            if skip is None:
                over = [(m, s) for m in members if (s := m.send(frame))]
            else:
                over = [(m, s) for m in members if m.id != skip and (s := m.send(frame))]
            if over:
                self._behind += [m for m, state in over if state != EVICTED]
        # Outside the lock: eviction takes each connection's protocol lock.
        for member, state in over:
            if state == EVICTED:
                member.evict()

    def wait_writers(self, reader) -> None:
        """Hold ``reader`` back until the clients our writers are behind on catch up.

        This is how a publisher faster than the fan-out is slowed down, and
        a client that pings without reading stops being parsed: its next
        read waits. A client that stalls meanwhile is evicted, not waited for.
        """
        if not self._behind and not reader.behind():
            return
        with self._lock:
            behind, self._behind = self._behind, []
        deadline = time.monotonic() + BACKPRESSURE_MAX_S
        for member in dict.fromkeys([*behind, reader]):
            while not member.wait_sent(min(BACKPRESSURE_POLL_S, deadline - time.monotonic())):
                if member.stalled():
                    member.evict()
                    break
                if time.monotonic() >= deadline:
                    return


class Rooms(dict):
    """Every room by name; the home of rooms. Today only the default room exists, made at start.

    A dict itself, so that the bus's lookup on every message costs no Python call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.default = self[DEFAULT_ROOM] = Room(DEFAULT_ROOM)

    def online(self) -> int:
        """Members of all rooms, for /healthz."""
        return sum(len(room) for room in self.values())
