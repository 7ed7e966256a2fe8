"""What the engine tells whoever counts its events (the server's metrics), as a port.

As with ``net.app``, the policy comes in from the composition root: the
engine calls a ``Meter`` at its rare events and keeps the hot path's
tallies (frames queued, bytes sent and received, messages) as plain
integers, each written by one thread or under a lock it already holds,
handed out as a ``Traffic`` snapshot when someone asks. So the engine
imports nothing that counts (broadcast/metrics.py), a fan-out to 10,000
members takes no extra lock per member, and no read takes a lock that
every reader shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Why a joined client left, as ``Meter.closed`` names it: a fixed vocabulary,
# never the client's own text, so that a label set stays bounded.
CLOSE_CLASSES = (
    "client",  # the client sent a close frame first
    "protocol",  # the library failed the connection: a bad frame (1002), bad UTF-8 (1007), too big (1009)
    "slow_consumer", "rate_limit", "keepalive", "busy", "shutdown",  # we closed it, for that
    "server",  # we closed it for a reason not listed above
    "lost", "write_timeout", "shutdown_timeout",  # no closing handshake: code 1006
)


class Meter(Protocol):
    """Called from readers, writers and the acceptor; each call must be cheap and never block."""

    def refused(self, status: int) -> None:
        """A request that wanted a WebSocket was answered with HTTP ``status`` instead."""

    def closed(self, code: int, reason: str) -> None:
        """A joined client left, with close ``code`` (1006 if none) and a reason of CLOSE_CLASSES."""

    def evicted(self) -> None:
        """A slow consumer was closed with 1008 and its backlog dropped."""


@dataclass(frozen=True)
class Traffic:
    """The listener's state and running totals, read at once."""

    joined: int
    opening: int  # accepted, still in their opening handshake
    queued_bytes: int  # owed to clients, in every outbox
    delivered: int  # data frames queued to clients since start
    sent_bytes: int  # written to sockets since start, TLS records included
    received_bytes: int  # read from clients' sockets since start, after TLS
    messages: int  # whole messages from clients since start, within their rate limit
