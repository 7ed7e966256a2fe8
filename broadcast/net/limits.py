"""Abuse limits that need state: a message rate, per-address connection counts, a memory budget.

Also how the server advertises its limits in the handshake response, so that
a client can refuse an oversized line and pace itself instead of being
closed with 1009 or 1008.
"""

from __future__ import annotations

import ctypes
import threading
import time

# Handshake response header: "max-message-size=BYTES; rate=MSGS_PER_SEC; burst=MSGS" (0 means no limit).
LIMITS_HEADER = "Broadcast-Limits"


def limits_header(max_message_size: int, rate: float, burst: int) -> str:
    return f"max-message-size={max_message_size}; rate={rate:g}; burst={burst}"


def parse_limits_header(value: str) -> tuple[int, float, int]:
    """(max_message_size, rate, burst) from ``limits_header``'s text; ValueError if malformed."""
    fields = dict(part.strip().partition("=")[::2] for part in value.split(";"))
    return int(fields["max-message-size"]), float(fields["rate"]), int(fields["burst"])


class TokenBucket:
    """Allows ``rate`` messages a second on average and ``burst`` at once.

    Refilled lazily from the clock on each message, so an idle connection
    costs nothing.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class AddressCounts:
    """Open connections per client IP address; the caller holds the lock."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def add(self, ip: str) -> int:
        count = self._counts.get(ip, 0) + 1
        self._counts[ip] = count
        return count

    def remove(self, ip: str) -> None:
        count = self._counts[ip] - 1
        if count:
            self._counts[ip] = count
        else:
            del self._counts[ip]

    def __getitem__(self, ip: str) -> int:
        return self._counts.get(ip, 0)


class ByteBudget:
    """Bytes that all connections together may hold of unfinished messages; 0 is no limit.

    Connections take and give back under ``_lock``, from their reader threads.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, delta: int) -> bool:
        """Count ``delta`` more bytes (fewer if negative); False, counting nothing, past the limit."""
        with self._lock:
            used = self.used + delta
            if delta > 0 and self.limit and used > self.limit:
                return False
            self.used = used
            return True


try:
    _trim = ctypes.CDLL(None).malloc_trim
except AttributeError:  # not glibc: its allocator gives memory back itself, or never
    _trim = None


def give_back_memory() -> None:
    """Return freed heap to the OS; glibc otherwise keeps it for the process's life."""
    if _trim is not None:
        _trim(0)
