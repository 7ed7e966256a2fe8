"""Abuse limits that need state: a per-connection message rate, per-address connection counts.

Also how the server advertises its limits in the handshake response, so that
a client can refuse an oversized line and pace itself instead of being
closed with 1009 or 1008.
"""

from __future__ import annotations

import time

# Handshake response headers: "max-message-size=BYTES; rate=MSGS_PER_SEC; burst=MSGS"
# (0 means no limit), and how many are in the room, counting the one joining.
LIMITS_HEADER = "Broadcast-Limits"
ONLINE_HEADER = "Broadcast-Online"


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
