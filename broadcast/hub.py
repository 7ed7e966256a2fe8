"""The registry of joined clients: the one place where broadcast order is decided.

Every frame is appended to every client's outbox while the lock is held,
so all clients see one order. Appending never blocks (it is a list append
and, at most, a wake-up of a writer), which is what makes holding a lock
across the whole fan-out cheap and safe.
"""

from __future__ import annotations

import threading


class Hub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Joined connections in join order, as an immutable tuple so that a
        # broadcast iterates without copying; rebuilt only on join and leave.
        self._members: tuple = ()

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
                behind = [m for m in self._members if not m.outbox.put(frame)]
            else:
                behind = [m for m in self._members if m is not skip and not m.outbox.put(frame)]
        # Outside the lock: eviction takes each connection's protocol lock.
        for conn in behind:
            conn.evict_slow_consumer()
