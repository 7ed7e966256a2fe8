"""The chat, as the engine's application: who may join, what a name adds, and the notices.

The engine calls ``ChatApp`` (the ``net.app.Application`` calls) and hands
it ``Member`` ports; the chat keeps what it knows of a client in its
``Session`` and never writes a connection's fields. Messages go to the bus,
which delivers them into the rooms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from websockets.frames import Opcode

from ..net.app import Admit, Member, Refused
from . import admission
from .rooms import Room, Rooms

log = logging.getLogger(__name__)

# Handshake response header: how many are in the room, counting the one joining.
ONLINE_HEADER = "Broadcast-Online"


@dataclass(frozen=True)
class Session:
    """What the chat knows of one client, from its handshake on."""

    username: str | None
    prefix: bytes  # "[NAME] ", what the server puts before a named client's text; b"" if anonymous
    room: Room


class ChatApp:
    def __init__(self, policy: admission.Policy, rooms: Rooms, bus) -> None:
        self.policy = policy
        self.rooms = rooms
        self.bus = bus  # delivers into the same rooms

    def admit(self, request, peer: str) -> Admit | Refused:
        try:
            username = admission.admit(request.path, request.headers, self.policy).username
        except Refused as refused:
            return refused
        room = self.rooms.default
        prefix = f"[{username}] ".encode() if username is not None else b""
        online = (ONLINE_HEADER, str(len(room) + 1))  # counting the one joining
        return Admit(Session(username, prefix, room), f"{username or 'anonymous'}@{peer}", (online,))

    def opened(self, member: Member) -> None:
        online = member.session.room.join(member)
        log.info("connect %s (%d online)", member.label, online,
                 extra={"event": "connect", "peer": member.peer, "user": member.session.username,
                        "room": member.session.room.name, "online": online})

    def ready(self, member: Member) -> None:
        session = member.session
        if session.username:
            self.bus.publish(session.room.name, Opcode.TEXT, f"* {session.username} joined".encode(),
                             skip=member.id)

    def message(self, member: Member, opcode, payload: bytes) -> object | None:
        """Attribute the message and send it to the room; what ``settle`` takes, or None."""
        session = member.session
        if opcode is Opcode.TEXT and session.prefix:
            payload = session.prefix + payload
        return self.bus.publish(session.room.name, opcode, payload)

    def settle(self, pending: object) -> None:
        self.bus.settle(pending)

    def wait_writers(self, member: Member) -> None:
        member.session.room.wait_writers(member)

    def closed(self, member: Member, why: str) -> None:
        session = member.session
        online = session.room.leave(member)
        log.info("disconnect %s: %s (%d online)", member.label, why, online,
                 extra={"event": "disconnect", "peer": member.peer, "user": session.username,
                        "room": session.room.name, "code": int(member.close_code),
                        "reason": member.close_class, "online": online})
        if session.username:
            self.bus.publish(session.room.name, Opcode.TEXT, f"* {session.username} left".encode())
