"""Where a message goes once a client has sent it: the seam between one node and many.

``LocalBus`` hands it straight to this node's hub. ``redis_bus.RedisBus``
sends it round through Redis first, so that every node, this one included,
delivers the same messages in the one order Redis gives them.
"""

from __future__ import annotations

from websockets.frames import Frame, Opcode


def encode(opcode: Opcode, payload: bytes) -> bytes:
    """One unmasked frame, built once and shared by every recipient."""
    return Frame(opcode, payload).serialize(mask=False)


class LocalBus:
    state = "off"  # no Redis: for /healthz

    def __init__(self, hub) -> None:
        self._hub = hub

    def publish(self, opcode: Opcode, payload: bytes, skip=None) -> None:
        """Deliver to every local client except ``skip`` (a joiner or leaver).

        Returns None: the sender's own copy is in its outbox already, so
        there is nothing to settle.
        """
        self._hub.broadcast(encode(opcode, payload), skip)

    def check(self) -> None:
        """Nothing to reach."""

    def start(self) -> None:
        """Nothing to subscribe to."""

    def close(self, deadline: float) -> None:
        """Nothing to disconnect from."""
