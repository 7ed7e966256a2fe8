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

    def members(self) -> tuple:
        return self._members

    def join(self, conn, notice: bytes | None) -> int:
        """Add ``conn``; the others get ``notice``. Returns the new count."""
        with self._lock:
            behind = self._fan_out(notice, conn) if notice else ()
            self._members += (conn,)
            count = len(self._members)
        self._evict(behind)
        return count

    def leave(self, conn, notice: bytes | None) -> int:
        """Remove ``conn`` if present; the others get ``notice``."""
        with self._lock:
            if conn not in self._members:
                return len(self._members)
            self._members = tuple(m for m in self._members if m is not conn)
            behind = self._fan_out(notice, None) if notice else ()
            count = len(self._members)
        self._evict(behind)
        return count

    def broadcast(self, frame: bytes) -> None:
        with self._lock:
            behind = self._fan_out(frame, None)
        self._evict(behind)

    def _fan_out(self, frame: bytes, skip) -> list:
        return [m for m in self._members if m is not skip and not m.outbox.put(frame)]

    @staticmethod
    def _evict(behind) -> None:
        # Outside the lock: eviction takes each connection's protocol lock.
        for conn in behind:
            conn.evict_slow_consumer()
