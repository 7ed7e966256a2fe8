"""Rooms of joined clients: the one place where broadcast order is decided.

A room owns its members: they join and leave only here, and it reaches them
only through the engine's ``Member`` port. Every frame is appended once to
the room's feed for its protocol (net.app.Feed), which each member's
outbox follows, while the lock is held, so all clients see one order and a
message costs the room one append, not one per member. Appending never
blocks (a list append and, at most, a wake-up of the writers of members
that had caught up), which is what makes holding a lock across it cheap and
safe. Each time a feed's segment fills, the room looks at its members'
bounds: when the writers fall behind, it is the publishers who wait
(``wait_writers``), after the fan-out and outside the lock, never the
fan-out itself; a member whose socket stalled is evicted.

A message is encoded once per protocol under that lock, where its id is
decided: one plain frame and one structured frame (a structured joiner's
``history`` frames are encoded from the kept text as it joins). Plain and structured
members are kept apart, each protocol with its own feed; joining and
leaving cost the same however many are in the room. A joiner's history is
queued in the same locked step as it joins, so between history and live
nothing is missing and nothing comes twice.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from websockets.frames import Frame, Opcode

from ..net.app import EVICTED, Feed, Refused
from . import structured
from .history import Entry, History, HistoryBudget, text_of
from ..ids import MessageId, format_id, new_epoch
from .names import DEFAULT_ROOM
from .presence import NameTaken, Presence, Seated

# Longest a reader is held back, after one read, for clients that our
# writers have not caught up with; past it, it reads on. A client whose
# socket stalls is evicted long before (outbox.STALLED_AFTER_S).
BACKPRESSURE_MAX_S = 5.0
# How often a held-back reader looks whether a client it waits for stalled.
BACKPRESSURE_POLL_S = 0.1

# What the bus carries, besides the bytes: a message is kept and numbered, a notice is neither.
MESSAGE, JOIN, LEAVE = "message", "join", "leave"
_NOTICES = {JOIN: structured.join, LEAVE: structured.leave}
_TEXT = Opcode.TEXT
# A room that cannot open, or a name that cannot be claimed, while Redis does not answer.
REDIS_UNAVAILABLE = "redis unavailable, try again"
# The reasons of a gap object: for people, not programs.
GAP_TRIMMED = "history does not reach back that far"
GAP_RESTARTED = "history restarted"
GAP_AHEAD = "that id is past the room's last message"
GAP_LOST = "this server was cut off from its other nodes, or fell behind them, past what Redis keeps"


def _frame(opcode: Opcode, payload: bytes) -> bytes:
    return Frame(opcode, payload).serialize(mask=False)


def text_frame(text: str) -> bytes:
    """One structured object as the frame a member is sent."""
    return _frame(_TEXT, text.encode())


@dataclass(frozen=True)
class RoomSettings:
    """The operator's per-room bounds, from the configuration."""

    history_size: int = 100
    history_bytes: int = 1024 * 1024
    history_ttl_s: float = 0.0
    allow_duplicate_names: bool = False


class Room:
    def __init__(self, name: str, settings: RoomSettings, budget: HistoryBudget,
                 clock: Callable[[], float] = time.monotonic, feed=None) -> None:
        self.name = name
        # Across nodes (bus.redis.RedisBus), or None: the room's order, ids, names and presence
        # are shared through it, and it delivers every message in here (``deliver`` with its id).
        self.feed = feed
        self._settings = settings
        self._clock = clock
        # Guards the members, the feeds' appends, _behind, history and presence.
        self.lock = threading.Lock()
        # Members by protocol (dicts as ordered sets), and the feed each protocol's members follow.
        self._plain: dict = {}
        self._structured: dict = {}
        self._plain_feed = Feed()
        self._structured_feed = Feed()
        # Members that went over their bound while their socket took data;
        # swapped out whole by wait_writers, under lock.
        self._behind: list = []
        self._budget = budget
        self.history = self._new_history(new_epoch(), 0)
        self.presence = Presence(name, settings.allow_duplicate_names)  # keyed by the chat's sessions
        # On one node, the names the room's order has announced: joins less
        # leaves, as delivered (a duplicate name counts once per holder). A
        # presence lists these, not the seats, so that it and the notices
        # after it add up: a name is seated at admission, before its join
        # notice, and a joiner told of it by both would count it twice.
        self._heard: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._plain) + len(self._structured)

    def _new_history(self, epoch: str, last_seq: int) -> History:
        settings = self._settings
        return History(epoch, self.lock, self._budget, size=settings.history_size,
                       max_bytes=settings.history_bytes, ttl_s=settings.history_ttl_s, clock=self._clock,
                       last_seq=last_seq)

    def _restart_history_locked(self, epoch: str, last_seq: int) -> None:
        """Across nodes: the room's history is Redis's, under its epoch (which changes if Redis lost the room)."""
        assert self.lock.locked()
        self.history.close()
        self.history = self._new_history(epoch, last_seq)

    def restore_locked(self, epoch: str, last_seq: int, messages: list) -> None:
        """Take the room's history from Redis as the room opens: (seq, ts, sender, payload), oldest first."""
        assert self.lock.locked()
        self._restart_history_locked(epoch, messages[0][0] - 1 if messages else last_seq)
        for seq, ts, sender, payload in messages:
            plain = _frame(_TEXT, payload)
            self._keep_locked(seq, ts, sender, payload, plain)

    def join(self, member, structured_: bool, history: int | None, since: MessageId | None,
             token: str | None = None, joining: str | None = None) -> int:
        """Add ``member``, whose 101 and catch-up are queued (``accept``) before any broadcast can reach it.

        ``history``: how many past messages to replay (None: all for a
        structured member, none for a plain one); ``since``: the last id the
        client saw, to recover from; ``token``: its session token, for its
        presence object alone (structured only); ``joining``: the name its
        own join notice, which skips it, is about to announce.
        """
        others = self.elsewhere() if structured_ else None  # for its presence; Redis I/O, so before the lock
        with self.lock:
            member.accept()
            evicted = False
            for frame in self._catch_up_locked(structured_, history, since, token, joining, others):
                if member.send(frame) == EVICTED:
                    evicted = True
                    break
            if structured_:
                self._structured[member] = None
                member.follow(self._structured_feed, member.id)
            else:
                self._plain[member] = None
                member.follow(self._plain_feed, member.id)
            online = len(self)
        if evicted:
            member.evict()
        return online

    def _catch_up_locked(self, structured_: bool, history: int | None, since: MessageId | None,
                         token: str | None, joining: str | None,
                         others: tuple[list[str], int] | None) -> list[bytes]:
        """What a joiner is owed before anything live: (gap,) history, then presence (structured only)."""
        assert self.lock.locked()
        kept = self.history
        if history is None:
            history = kept.size if structured_ else 0
        frames = []
        entries = None
        if since is not None:
            recovery = kept.since(since.epoch, since.seq)
            if recovery.missed == 0:
                entries = recovery.entries
            elif structured_:
                if recovery.missed is None:
                    reason = GAP_RESTARTED if since.epoch != kept.epoch else GAP_AHEAD
                else:
                    reason = GAP_TRIMMED
                frames.append(text_frame(structured.gap(kept.last_id, self.name, time.time(),
                                                        recovery.missed, reason)))
            if recovery.missed is not None:
                entries = recovery.entries
        if entries is None:
            entries = kept.last(history)
        if structured_:
            epoch, name = kept.epoch, self.name
            frames += [text_frame(structured.history(format_id(epoch, e.seq), name, e.ts, e.sender, e.text))
                       for e in entries]
            frames.append(self.presence_frame_locked(others, token, joining))
        else:
            frames += [entry.plain for entry in entries]
        return frames

    def presence_frame_locked(self, others: tuple[list[str], int], token: str | None = None,
                              joining: str | None = None) -> bytes:
        """A presence object for one member; ``token`` only in the joiner's own (never shared).

        It is where the member stands in the room's order: with the join and
        leave notices it gets after it, it adds up to who is here. ``joining``
        is the member's own name, whose notice it will not get; ``others``,
        what ``elsewhere`` found.
        """
        assert self.lock.locked()
        if self.feed is None:
            users = list(self._heard.elements())
            if joining is not None:
                users.append(joining)
            users.sort()
            anonymous = self.presence.anonymous
        else:
            # Across nodes the names come from Redis's keys, which the
            # stream's notices do not bound: the two agree once both land.
            users, anonymous = self.who_locked(others)
        return text_frame(structured.presence(self.history.last_id, self.name, time.time(), users, anonymous,
                                              token))

    def elsewhere(self) -> tuple[list[str], int]:
        """Who is in the room on the other nodes: (names, anonymous count); nobody on one node.

        Asked of Redis, so with no lock held: under the room's lock, a
        presence request (or a GET /rooms/ROOM, or a join) held every
        delivery into the room for its round trips, up to a second each
        while Redis stalled. While Redis does not answer it is nobody.
        """
        if self.feed is None:
            return [], 0
        try:
            return self.feed.elsewhere(self.name)
        except ConnectionError:
            return [], 0

    def who_locked(self, others: tuple[list[str], int]) -> tuple[list[str], int]:
        """Who is in the room, this node's seats and ``others`` (from ``elsewhere``): (sorted names, anonymous)."""
        assert self.lock.locked()
        names, anonymous = others
        return sorted(self.presence.names() + names), self.presence.anonymous + anonymous

    def share_presence(self, freed: tuple[str, str] | None = None) -> None:
        """Across nodes: free the (name, token) that left, and write who is here now; no lock held (Redis I/O)."""
        if self.feed is None:
            return
        if freed is not None:
            self.feed.release(self.name, *freed)
        with self.lock:
            users, anonymous = self.presence.names(), self.presence.anonymous
        self.feed.seated(self.name, users, anonymous)

    def tell(self, member, frame: bytes) -> None:
        """Queue ``frame`` (an answer to its own request) for ``member`` alone, in the room's order."""
        with self.lock:
            state = member.send(frame)
        if state == EVICTED:
            member.evict()

    def tell_presence(self, member) -> None:
        others = self.elsewhere()
        with self.lock:
            state = member.send(self.presence_frame_locked(others))
        if state == EVICTED:
            member.evict()

    def leave(self, member, session) -> int:
        """Remove ``member`` and its seat if present; returns the new count."""
        with self.lock:
            self._plain.pop(member, None)
            self._structured.pop(member, None)
            member.follow(None, member.id)  # what it was sent before goes; nothing after
            freed = self.presence.remove(session)
            online = len(self)
        self.share_presence(freed)
        return online

    def deliver(self, opcode: Opcode, payload: bytes, skip: int | None = None,
                sender: str | None = None, kind: str = MESSAGE, id: MessageId | None = None,
                ts: float | None = None) -> None:
        """Give every member but the one whose id is ``skip`` this message or notice, all in one order.

        ``payload`` is what a plain client gets, byte for byte ("[Alice] hi",
        "* Alice joined"); ``sender`` names who said it (its prefix is stripped
        for structured clients). Binary is relayed as it is to both and kept
        nowhere; a text message gets the next id and is kept in history.
        Across nodes, Redis gave the message its ``id`` and ``ts`` already;
        one whose SEQ this room has had (a stream read again) is dropped.
        """
        over_budget = False
        with self.lock:
            if opcode is not _TEXT:
                plain = shared = _frame(opcode, payload)
            else:
                plain = _frame(_TEXT, payload)
                ts = time.time() if ts is None else ts
                if kind == MESSAGE:
                    if id is not None and id.epoch != self.history.epoch:
                        self._restart_history_locked(id.epoch, id.seq - 1)
                    seq = self.history.next_seq if id is None else id.seq
                    try:
                        over_budget = self._keep_locked(seq, ts, sender, payload, plain)
                    except ValueError:
                        return
                    shared = text_frame(structured.message(format_id(self.history.epoch, seq), self.name, ts,
                                                           sender, text_of(payload, sender))) \
                        if self._structured else b""
                else:
                    shared = text_frame(_NOTICES[kind](self.history.last_id, self.name, ts, sender))
                    if self.feed is None:
                        self._hear_locked(kind, sender)
            over = self._append_locked(plain, shared, skip)
        if over:  # rarely: a feed's segment filled
            self._evict(over)
        if over_budget:
            self._budget.enforce()

    def lost(self, missed: int | None) -> None:
        """Across nodes: tell every member, in the room's order, that messages went past this node.

        ``missed`` of them were trimmed from the stream before this node
        read them (bus.streams); None: Redis lost the room, whose history
        restarts. A structured member gets a ``gap``, a plain one a line.
        """
        reason = GAP_RESTARTED if missed is None else GAP_LOST
        with self.lock:
            gap = structured.gap(self.history.last_id, self.name, time.time(), missed, reason)
            over = self._append_locked(text_frame("* " + structured.gap_line(missed, reason)), text_frame(gap), None)
        self._evict(over)

    def _append_locked(self, plain: bytes, shared: bytes, skip: int | None) -> list:
        """Append a frame to each protocol's feed; the members that went over their bound, with their state."""
        assert self.lock.locked()
        over = []
        if self._plain and self._plain_feed.append(plain, skip):
            over += self._over_locked(self._plain)
        if self._structured and self._structured_feed.append(shared, skip):
            over += self._over_locked(self._structured)
        if over:
            self._behind += [m for m, state in over if state != EVICTED]
        return over

    @staticmethod
    def _evict(over: list) -> None:
        """Outside the lock: eviction takes each connection's protocol lock."""
        for member, state in over:
            if state == EVICTED:
                member.evict()

    def _hear_locked(self, kind: str, name: str) -> None:
        """Count a join or leave notice of ``name`` as it takes its place in the order."""
        assert self.lock.locked()
        heard = self._heard
        if kind == JOIN:
            heard[name] += 1
        elif heard[name] > 1:
            heard[name] -= 1
        else:
            del heard[name]

    def _keep_locked(self, seq: int, ts: float, sender: str | None, payload: bytes, plain: bytes) -> bool:
        """Keep text message ``seq``; True if the node is over its history budget."""
        assert self.lock.locked()
        return self.history.append(Entry(seq, ts, sender, plain, payload))

    def _over_locked(self, members: dict) -> list:
        """The members past their bound, with their state (BEHIND or EVICTED): a feed's segment just filled."""
        assert self.lock.locked()
        return [(m, s) for m in members if (s := m.check())]

    def wait_writers(self, reader) -> None:
        """Hold ``reader`` back until the clients our writers are behind on catch up.

        This is how a publisher faster than the fan-out is slowed down, and
        a client that pings without reading stops being parsed: its next
        read waits. A client that stalls meanwhile is evicted, not waited for.
        """
        if not self._behind and not reader.behind():
            return
        with self.lock:
            behind, self._behind = self._behind, []
        deadline = time.monotonic() + BACKPRESSURE_MAX_S
        for member in dict.fromkeys([*behind, reader]):
            while not member.wait_sent(min(BACKPRESSURE_POLL_S, deadline - time.monotonic())):
                if member.stalled():
                    member.evict()
                    break
                if time.monotonic() >= deadline:
                    return

    def idle_locked(self) -> bool:
        """No one in it or seated, and no history left: the room may go."""
        assert self.lock.locked()
        return not self._plain and not self._structured and not len(self.presence) and not self.history.expire()

    def summary(self) -> dict:
        """For ``GET /rooms/ROOM``: who is here, by name, and how many anonymous."""
        others = self.elsewhere()
        with self.lock:
            users, anonymous = self.who_locked(others)
        return {"room": self.name, "users": users, "anonymous": anonymous}


class Rooms(dict):
    """Every room by name: made by its first joiner, gone once it has neither members nor history.

    A dict itself, so that the bus's lookup on every message costs no Python
    call. ``_lock`` guards making and removing rooms (writes to the dict);
    lock order: ``_lock``, then a room's lock.
    """

    def __init__(self, settings: RoomSettings = RoomSettings(), max_rooms: int = 10_000,
                 history_total_bytes: int = 64 * 1024 * 1024, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.settings = settings
        self._clock = clock  # for history's TTL
        self.max_rooms = max_rooms
        self.budget = HistoryBudget(history_total_bytes)
        self._lock = threading.Lock()
        self.feed = None  # across nodes: the bus that shares rooms through Redis (bus.redis.RedisBus)

    @property
    def default(self) -> Room | None:
        """The Go original's one room, if it exists now."""
        return self.get(DEFAULT_ROOM)

    def seat(self, name: str, session, username: str | None, token: str | None) -> tuple[Room, Seated]:
        """Seat ``session`` in room ``name``, making the room if need be.

        Raises Refused 503 past ``max_rooms`` and presence's NameTaken for a
        name held by someone else; under the room's lock, so two Alices
        cannot both pass. Across nodes the name is claimed in Redis too, and
        a ``token`` that holds it there (a resume from another node) takes
        it over; a room opens only while Redis answers (else 503).
        """
        with self._lock:
            room = self.get(name)
            if room is None:
                if len(self) >= self.max_rooms:
                    self._sweep_locked()
                if len(self) >= self.max_rooms:
                    raise Refused(503, "too many rooms")
                room = self[name] = Room(name, self.settings, self.budget, self._clock, self.feed)
                if self.feed is not None:
                    self._open_locked(room)
            seated = self._seat_locked(room, session, username, token)
        room.share_presence()
        return room, seated

    def _open_locked(self, room: Room) -> None:
        assert self._lock.locked()
        with room.lock:
            try:
                self.feed.open_locked(room)
            except ConnectionError:
                room.history.close()
                del self[room.name]
                raise Refused(503, REDIS_UNAVAILABLE) from None

    def _seat_locked(self, room: Room, session, username: str | None, token: str | None) -> Seated:
        assert self._lock.locked()
        shared = self.feed is not None and username is not None and not self.settings.allow_duplicate_names
        claimed = None
        try:
            if shared and token and self.feed.claim(room.name, username, token):
                claimed = token  # a resume: its token holds the name on whichever node it was
            with room.lock:
                seated = room.presence.add(session, username, token, claimed)
            if shared and claimed is None and not self.feed.claim(room.name, username, seated.token):
                with room.lock:
                    room.presence.remove(session)
                raise NameTaken(username, room.name)
        except ConnectionError:
            with room.lock:
                room.presence.remove(session)
            raise Refused(503, REDIS_UNAVAILABLE) from None
        return seated

    def unseat(self, room: Room, session) -> None:
        """Give the seat back (a refused or closed handshake); the room goes if that left it idle."""
        with self._lock:
            with room.lock:
                freed = room.presence.remove(session)
                if room.idle_locked() and self.get(room.name) is room:
                    self._remove_locked(room)
        room.share_presence(freed)

    def _remove_locked(self, room: Room) -> None:
        assert self._lock.locked() and room.lock.locked()
        room.history.close()
        del self[room.name]
        if self.feed is not None:
            self.feed.closed(room.name)

    def _sweep_locked(self) -> None:
        """Remove every room left idle (its history expired or shed while no one was in it)."""
        assert self._lock.locked()
        for room in list(self.values()):
            with room.lock:
                if room.idle_locked():
                    self._remove_locked(room)

    def listing(self) -> list[dict]:
        """For ``GET /rooms``: every room with someone in it or history here, or members on another node,
        with its counts, by name.

        The other nodes' rooms are asked of Redis with no lock held; while
        it does not answer, the list is this node's alone.
        """
        others: dict[str, tuple[int, int]] = {}
        if self.feed is not None:
            try:
                others = self.feed.rooms_elsewhere()
            except ConnectionError:
                pass
        with self._lock:
            self._sweep_locked()
            here = list(self.values())
        counts = dict(others)
        for room in here:
            with room.lock:
                presence = room.presence
                named, anonymous = counts.get(room.name, (0, 0))
                counts[room.name] = (named + len(presence) - presence.anonymous, anonymous + presence.anonymous)
        return [{"room": name, "users": named, "anonymous": anonymous}
                for name, (named, anonymous) in sorted(counts.items())]

    def online(self) -> int:
        """Members of all rooms, for /healthz."""
        return sum(len(room) for room in list(self.values()))
