"""What every bus offers, and the one encoding of a frame they all deliver.

``local.LocalBus`` hands a message straight to this node's room.
``redis.RedisBus`` sends it round through Redis first, so that every node,
this one included, delivers the same messages in the one order Redis gives
them. A bus delivers into rooms (``rooms[name].broadcast(frame, skip)``),
given to it as an object; it imports neither the engine nor the chat.
"""

from __future__ import annotations

from typing import Protocol

from websockets.frames import Frame, Opcode


def encode(opcode: Opcode, payload: bytes) -> bytes:
    """One unmasked frame, built once and shared by every recipient."""
    return Frame(opcode, payload).serialize(mask=False)


class Bus(Protocol):
    state: str  # for /healthz: "off" (no Redis), "ok", "stalled" or "reconnecting"

    def publish(self, room: str, opcode: Opcode, payload: bytes, skip: int | None = None) -> object | None:
        """Deliver to every member of ``room`` on every node, except member id ``skip`` (a joiner).

        Returns what ``settle`` takes to wait for the sender's own copy, or
        None when it is already in the sender's outbox.
        """

    def settle(self, pending: object) -> None:
        """Return (bounded) once the message ``publish`` returned ``pending`` for is delivered here."""

    def check(self) -> None:
        """Raise if the bus cannot be reached now."""

    def start(self) -> None:
        """Subscribe, before the server takes clients."""

    def close(self, deadline: float) -> None:
        """Disconnect by ``deadline`` (monotonic)."""
