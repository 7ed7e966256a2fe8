"""One node alone: a message goes straight to its room."""

from __future__ import annotations

from websockets.frames import Opcode


class LocalBus:
    state = "off"  # no Redis: for /healthz

    def __init__(self, rooms) -> None:
        self._rooms = rooms

    def publish(self, room: str, opcode: Opcode, payload: bytes, skip: int | None = None,
                sender: str | None = None, kind: str = "message", refused=None) -> None:
        """Deliver to every member of ``room`` except member id ``skip`` (a joiner or leaver).

        Returns None: the sender's own copy is in its outbox already, so
        there is nothing to settle, and nothing is ever ``refused``. A room
        its last member just left may be gone: then there is no one to tell.
        """
        target = self._rooms.get(room)
        if target is not None:
            target.deliver(opcode, payload, skip, sender, kind)

    def settle(self, pending: object) -> None:
        """Nothing is ever in flight here."""

    def check(self) -> None:
        """Nothing to reach."""

    def start(self) -> None:
        """Nothing to subscribe to."""

    def close(self, deadline: float) -> None:
        """Nothing to disconnect from."""
