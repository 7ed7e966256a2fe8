"""The registry of joined clients: the one place where broadcast order is decided.

Every frame is appended to every client's outbox while the lock is held,
so all clients see one order. Appending never blocks (it is a list append
and, at most, a wake-up of a writer), which is what makes holding a lock
across the whole fan-out cheap and safe. When the writers fall behind, it
is the publishers who wait (``wait_writers``), after the fan-out and outside
the lock, never the fan-out itself.
"""

from __future__ import annotations

import threading
import time

from ..net.outbox import EVICTED

# Longest a reader is held back, after one read, for clients that our
# writers have not caught up with; past it, it reads on. A client whose
# socket stalls is evicted long before (outbox.STALLED_AFTER_S).
BACKPRESSURE_MAX_S = 5.0
# How often a held-back reader looks whether a client it waits for stalled.
BACKPRESSURE_POLL_S = 0.1


class Hub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Joined connections in join order, as an immutable tuple so that a
        # broadcast iterates without copying; rebuilt only on join and leave.
        self._members: tuple = ()
        # Members that went over their bound while their socket took data;
        # swapped out whole by wait_writers, under _lock.
        self._behind: list = []

    def __len__(self) -> int:
        return len(self._members)

    def join(self, conn, first: list[bytes]) -> int:
        """Add ``conn``, whose outbox gets ``first`` (the 101) before any broadcast."""
        with self._lock:
            conn.outbox.put_control(first, closing=False)
            self._members += (conn,)
            return len(self._members)

    def leave(self, conn) -> int:
        """Remove ``conn`` if present; returns the new count."""
        with self._lock:
            self._members = tuple(m for m in self._members if m is not conn)
            return len(self._members)

    def broadcast(self, frame: bytes, skip=None) -> None:
        """Queue ``frame`` for every member but ``skip``, all in one order."""
        with self._lock:
            if skip is None:
                over = [(m, s) for m in self._members if (s := m.outbox.put(frame))]
            else:
                over = [(m, s) for m in self._members if m is not skip and (s := m.outbox.put(frame))]
            if over:
                self._behind += [m for m, state in over if state != EVICTED]
        # Outside the lock: eviction takes each connection's protocol lock.
        for conn, state in over:
            if state == EVICTED:
                conn.evict_slow_consumer()

    def wait_writers(self, reader) -> None:
        """Hold ``reader`` back until the clients our writers are behind on catch up.

        This is how a publisher faster than the fan-out is slowed down, and
        a client that pings without reading stops being parsed: its next
        read waits. A client that stalls meanwhile is evicted, not waited for.
        """
        if not self._behind and not reader.outbox.over():
            return
        with self._lock:
            behind, self._behind = self._behind, []
        deadline = time.monotonic() + BACKPRESSURE_MAX_S
        for conn in dict.fromkeys([*behind, reader]):
            while not conn.outbox.wait(min(BACKPRESSURE_POLL_S, deadline - time.monotonic())):
                if conn.outbox.stalled():
                    conn.evict_slow_consumer()
                    break
                if time.monotonic() >= deadline:
                    return
