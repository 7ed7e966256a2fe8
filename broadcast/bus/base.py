"""What every bus offers.

``local.LocalBus`` hands a message straight to this node's room.
``redis.RedisBus`` sends it round its room's Redis stream first, so that
every node, this one included, delivers the same messages in the one order
and under the ids Redis gives them. A bus delivers into rooms
(``rooms[name].deliver(opcode, payload, skip, sender, kind)``, where the
room numbers, encodes and keeps it; round Redis with ``id`` and ``ts`` too),
given to it as an object; it imports neither the engine nor the chat beyond
the ids (broadcast.ids).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from websockets.frames import Opcode


class Bus(Protocol):
    state: str  # for /healthz: "off" (no Redis), "ok" or "reconnecting"

    def publish(self, room: str, opcode: Opcode, payload: bytes, skip: int | None = None,
                sender: str | None = None, kind: str = "message",
                refused: Callable[[], None] | None = None) -> object | None:
        """Deliver to every member of ``room`` on every node, except member id ``skip`` (a joiner).

        ``payload`` is the plain-text rendering ("[Alice] hi", "* Alice
        joined"); ``sender`` and ``kind`` ("message", "join", "leave") let the
        room build the structured object from it.

        Returns what ``settle`` takes to wait for the sender's own copy, or
        None when it is already in the sender's outbox. Raises a
        ConnectionError when it cannot deliver in the one order now (Redis
        unreachable): the caller refuses the message with a notice. Given
        ``refused``, it may return before it knows (Redis's answer is a
        round trip away), and calls ``refused()`` instead, from another
        thread, if the message was not taken after all.
        """

    def settle(self, pending: object) -> None:
        """Return (bounded) once the message ``publish`` returned ``pending`` for is delivered here."""

    def check(self) -> None:
        """Raise if the bus cannot be reached now."""

    def start(self) -> None:
        """Subscribe, before the server takes clients."""

    def close(self, deadline: float) -> None:
        """Disconnect by ``deadline`` (monotonic)."""
