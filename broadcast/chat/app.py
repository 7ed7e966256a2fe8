"""The chat, as the engine's application: who may join which room, what a name adds, and the notices.

The engine calls ``ChatApp`` (the ``net.app.Application`` calls) and hands
it ``Member`` ports; the chat keeps what it knows of a client in its
``Session`` and never writes a connection's fields. Messages go to the bus,
which delivers them into the rooms.

A name is seated in its room at admission, under the room's lock, so that a
second Alice is refused with 409 before any 101; the seat is given back if
the handshake goes no further (``abandon``) or when the client leaves.
"""

from __future__ import annotations

import http
import logging
import time

from websockets.frames import Opcode

from ..net.app import Admit, Member, Refused, request_target
from . import admission, structured
from ..ids import MessageId
from .history import prefix
from .presence import REPLACED_CODE, REPLACED_REASON, NameTaken
from .rooms import JOIN, LEAVE, Room, Rooms, text_frame

log = logging.getLogger(__name__)

# Handshake response header: how many are in the room, counting the one joining.
ONLINE_HEADER = "Broadcast-Online"
# Handshake response header: the token that lets a reconnecting client keep its name (?session=).
SESSION_HEADER = "Broadcast-Session"
ROOMS_PATH = "/rooms"
# What a client is told when its message cannot go round Redis (no secret in it: no URL).
NOT_SENT = "not sent: the server is cut off from its other nodes; try again"  # GET: every room and its counts; GET /rooms/ROOM: who is in it


class Session:
    """What the chat knows of one client, from its handshake on; written by its reader thread only."""

    __slots__ = ("username", "prefix", "room", "history", "since", "structured", "member", "replaces",
                 "replaced", "token")

    def __init__(self, username: str | None, history: int | None, since: MessageId | None) -> None:
        self.username = username
        self.prefix = prefix(username)  # "[NAME] ", what the server puts before a named client's text
        self.room: Room | None = None  # set once seated
        self.history = history
        self.since = since
        self.structured = False  # broadcast.v1, known once the 101 is built
        self.member: Member | None = None  # once opened: what a resume closes
        self.replaces: Session | None = None  # the former connection this one takes its name from
        self.replaced = False  # taken over: it leaves without a notice (another thread sets it, once)
        self.token: str | None = None  # its session token (named only): a secret, sent to it alone


class ChatApp:
    subprotocols = (structured.SUBPROTOCOL,)

    def __init__(self, policy: admission.Policy, rooms: Rooms, bus) -> None:
        self.policy = policy
        self.rooms = rooms
        self.bus = bus  # delivers into the same rooms
        # Without Redis nothing in admitting a client waits on a round trip.
        self.answers_at_once = rooms.feed is None

    def admit(self, request, peer: str) -> Admit | Refused:
        try:
            asked = admission.admit(request.path, request.headers, self.policy)
        except Refused as refused:
            return refused
        username = asked.username
        session = Session(username, asked.history, asked.since)
        try:
            room, seated = self.rooms.seat(asked.room, session, username, asked.session)
        except Refused as refused:
            return refused
        except NameTaken as taken:
            return Refused(http.HTTPStatus.CONFLICT, taken.reason)
        session.room = room
        session.replaces = seated.replaced
        session.token = seated.token
        online = (ONLINE_HEADER, str(len(room) + 1))  # counting the one joining
        headers = (online, (SESSION_HEADER, seated.token)) if seated.token else (online,)
        return Admit(session, f"{username or 'anonymous'}@{peer}", headers)

    def abandon(self, session: Session) -> None:
        self.rooms.unseat(session.room, session)

    def opened(self, member: Member) -> None:
        session = member.session
        session.member = member
        session.structured = member.subprotocol == structured.SUBPROTOCOL
        announcing = session.username if session.replaces is None else None  # as ``ready`` does
        online = session.room.join(member, session.structured, session.history, session.since, session.token,
                                   announcing)
        log.info("connect %s (%d online), room %s", member.label, online, session.room.name,
                 extra={"event": "connect", "peer": member.peer, "user": session.username,
                        "room": session.room.name, "online": online})

    def ready(self, member: Member) -> None:
        session = member.session
        former = session.replaces
        if former is not None:
            # A resume: the name never left the room, so nobody hears of it coming or going.
            former.replaced = True
            if former.member is not None:
                former.member.close(REPLACED_CODE, REPLACED_REASON)
        elif session.username:
            self._announce(session.room.name, f"* {session.username} joined", skip=member.id,
                           sender=session.username, kind=JOIN)

    def _announce(self, room: str, notice: str, **how) -> None:
        """Publish a notice; across nodes, while Redis does not answer, it is lost (logged), not queued."""
        try:
            self.bus.publish(room, Opcode.TEXT, notice.encode(), **how)
        except ConnectionError as exc:
            log.info("notice %r in room %s not sent: %s", notice, room, exc)

    def message(self, member: Member, opcode, payload: bytes) -> object | None:
        """Attribute the message and send it to the room; what ``settle`` takes, or None."""
        session = member.session
        if opcode is Opcode.TEXT and session.structured:
            text = payload.decode()
            try:
                request = structured.parse_client_frame(text)
            except structured.BadFrame as bad:
                session.room.tell(member, text_frame(structured.error(session.room.name, time.time(),
                                                                      bad.reason)))
                return None
            if isinstance(request, structured.PresenceRequest):
                session.room.tell_presence(member)
                return None
            if request.text is not text:  # a message object: its text is the message
                payload = request.text.encode()
        if opcode is Opcode.TEXT and session.prefix:
            payload = session.prefix + payload
        try:
            return self.bus.publish(session.room.name, opcode, payload, sender=session.username,
                                    refused=lambda: self._refuse(member))
        except ConnectionError:
            self._refuse(member)
            return None

    def _refuse(self, member: Member) -> None:
        """Across nodes, Redis gives the one order; without it the message is refused, never
        delivered here now and in another order elsewhere later."""
        session = member.session
        room = session.room
        notice = (structured.error(room.name, time.time(), NOT_SENT) if session.structured
                  else f"* {NOT_SENT}")
        room.tell(member, text_frame(notice))
        log.info("refused a message of %s: %s", member.label, NOT_SENT)

    def settle(self, pending: object) -> None:
        self.bus.settle(pending)

    def wait_writers(self, member: Member) -> None:
        member.session.room.wait_writers(member)

    def closed(self, member: Member, why: str) -> None:
        session = member.session
        room = session.room
        online = room.leave(member, session)
        log.info("disconnect %s: %s (%d online), room %s", member.label, why, online, room.name,
                 extra={"event": "disconnect", "peer": member.peer, "user": session.username,
                        "room": room.name, "code": int(member.close_code),
                        "reason": member.close_class, "online": online})
        if session.username and not session.replaced:
            self._announce(room.name, f"* {session.username} left", sender=session.username, kind=LEAVE)
        self.rooms.unseat(room, session)

    def name_lost(self, room_name: str, name: str) -> None:
        """Across nodes, a resume elsewhere took ``name`` over: close its former connection here (4000)."""
        room = self.rooms.get(room_name)
        if room is None:
            return
        with room.lock:
            holders = room.presence.holders(name)
        for session in holders:
            session.replaced = True  # the name never left the room: no leave notice
            if session.member is not None:
                session.member.close(REPLACED_CODE, REPLACED_REASON)

    # Plain HTTP routes (the composition root serves them as JSON).

    def room_list(self, request) -> dict:
        """``GET /rooms``: every room with its counts."""
        admission.authorize(request.path, request.headers, self.policy)
        return {"rooms": self.rooms.listing()}

    def room_info(self, request) -> dict:
        """``GET /rooms/ROOM``: who is in ROOM; 404 for a room that does not exist."""
        admission.authorize(request.path, request.headers, self.policy)
        name = request_target(request.path, request.headers).path[len(ROOMS_PATH) + 1:]
        room = self.rooms.get(name)
        if room is None:
            raise Refused(http.HTTPStatus.NOT_FOUND, "no such room")
        return room.summary()
