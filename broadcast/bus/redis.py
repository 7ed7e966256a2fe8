"""Several servers, the same rooms: every frame goes round its room's Redis stream (bus/streams.py).

A node appends what its clients send to the room's stream and delivers
only what its stream reader brings back, its own messages included, so
every client of every node gets one order, Redis's, under the same
``EPOCH:SEQ`` ids. Nothing received is appended again, so nothing loops.

A text message takes the room's next SEQ in Redis and is kept in history;
a notice (join, leave) and a binary frame are notes: no SEQ, in no history,
in the same order all the same.

While Redis does not answer, ``publish`` raises Unavailable and the caller
refuses the client's message with a notice: a message is never delivered
locally first and in Redis's order later, so no two clients ever see two
orders. A publish that timed out may still have reached Redis; then every
node delivers it, in the stream's order, once.

The sender's own echo comes back on the reader thread; ``settle`` waits
for it (bounded by ECHO_WAIT_S), so the close reply that follows a
client's last message never passes it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

from websockets.frames import Opcode

from .streams import PRESENCE_TTL_S, Entry, StreamsBus, Unavailable

log = logging.getLogger(__name__)

# A closing client's close reply waits at most this long for the echo of its
# last message round Redis; past it the close goes first (the echo, already
# in the stream, still reaches every other client in order).
ECHO_WAIT_S = 2.0
# The stream keeps at least this many entries per room (or --history-size,
# if larger): how far back a node cut off from Redis catches up.
STREAM_ENTRIES = 1000
_OPS = {Opcode.TEXT: b"text", Opcode.BINARY: b"binary"}
_OPCODES = {name: op for op, name in _OPS.items()}
MESSAGE = "message"  # the kind of a text message (chat.rooms' name for it); any other kind is a notice

RedisUnavailable = Unavailable  # what check() and publish() raise


class RedisBus:
    """Rooms delivered from their Redis streams, with history, presence and names shared by every node."""

    def __init__(self, rooms, url: str, prefix: str, node_id: str, publish_seconds=None, *,
                 history: int = 0, presence_ttl_s: float = PRESENCE_TTL_S) -> None:
        self._rooms = rooms  # name -> room, with .deliver(...)
        self.node_id = node_id
        self._node = node_id.encode()
        self.history = history  # messages a room's history holds here, fetched when a room opens
        self.streams = StreamsBus(url, node_id, self._on_entry, self._on_gap, on_name_lost=self._on_name_lost,
                                  prefix=prefix, max_entries=max(STREAM_ENTRIES, history),
                                  presence_ttl_s=presence_ttl_s)
        self.url = self.streams.url
        self._publish_seconds = publish_seconds  # a histogram (metrics), or None
        self._mids = itertools.count(1)  # next() is atomic: a node's own publishes, told apart
        # _lock guards _unechoed; its condition tells settle() an own message came back.
        self._lock = threading.Condition()
        self._unechoed: set[int] = set()
        self.on_name_lost = lambda room, name: None  # the chat closes the former connection
        # Presence and freed names are written by one thread of their own, so
        # that a join or a leave never waits on Redis (a stalled one would hold
        # a reader, or the shutdown, for COMMAND_TIMEOUT_S per write).
        # _writes guards _members and _freed, and wakes the writer.
        self._writes = threading.Condition()
        self._members: dict[str, tuple[list[str], int]] = {}  # room -> this node's latest, not yet written
        self._freed: list[tuple[str, str, str]] = []  # (room, name, token) to release
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="redis-presence", daemon=True)

    @property
    def state(self) -> str:
        """For /healthz: "ok" while the stream reader's reads are answered, else "reconnecting"."""
        return self.streams.state

    def check(self) -> None:
        self.streams.check()

    def start(self) -> None:
        self.streams.start()
        self._writer.start()

    def close(self, deadline: float) -> None:
        """Stop writing, then leave presence and free the names still held (streams.close), by ``deadline``."""
        self._stop.set()
        with self._writes:
            self._writes.notify()
        if self._writer.is_alive():
            self._writer.join(max(0.0, deadline - time.monotonic()))
        self.streams.close(deadline)

    # Reader threads.

    def publish(self, room: str, opcode: Opcode, payload: bytes, skip: int | None = None,
                sender: str | None = None, kind: str = MESSAGE) -> int:
        """Append to ``room``'s stream; what ``settle`` takes. Unavailable if Redis does not answer."""
        mid = next(self._mids)
        fields = {"op": _OPS[opcode], "data": payload, "kind": kind, "ts": repr(time.time()),
                  "node": self._node, "mid": str(mid)}
        if sender is not None:
            fields["from"] = sender
        if skip is not None:
            fields["skip"] = str(skip)
        with self._lock:
            self._unechoed.add(mid)
        started = time.monotonic()
        try:
            self.streams.publish(room, fields, message=opcode is Opcode.TEXT and kind == MESSAGE)
        except Unavailable:
            with self._lock:
                self._unechoed.discard(mid)
            raise
        if self._publish_seconds is not None:
            self._publish_seconds.observe(time.monotonic() - started)
        return mid

    def settle(self, mid: int) -> None:
        """Return once own message ``mid`` is delivered here, or after ECHO_WAIT_S."""
        with self._lock:
            if not self._lock.wait_for(lambda: mid not in self._unechoed, ECHO_WAIT_S):
                log.info("own message %d not back from redis %s within %.0f s", mid, self.url, ECHO_WAIT_S)
            self._unechoed.discard(mid)

    # Rooms (chat.rooms.Rooms calls these as a room opens and closes, and as names come and go).

    def open_locked(self, room) -> None:
        """Follow ``room``'s stream; its last messages become the room's history here.

        Under the room's lock: the reader's first live entry for it waits for
        that history, so nothing between the two is missing or doubled.
        Unavailable if Redis does not answer (the joiner is refused).
        """
        replay = self.streams.follow(room.name, self.history)
        room.restore_locked(replay.epoch, replay.last_seq, [
            (e.id.seq, float(e.fields["ts"]), _sender(e), e.fields["data"]) for e in replay.entries])

    def closed(self, name: str) -> None:
        """The room is gone here; its stream stays in Redis for the other nodes."""
        self.streams.unfollow(name)

    def claim(self, room: str, name: str, token: str) -> bool:
        """Hold ``name`` in ``room`` on every node under ``token``; Unavailable if Redis does not answer."""
        return self.streams.claim(room, name, token)

    def release(self, room: str, name: str, token: str) -> None:
        """Free ``name`` for every node, soon (the presence writer does it)."""
        with self._writes:
            self._freed.append((room, name, token))
            self._writes.notify()

    def seated(self, room: str, users: list[str], anonymous: int) -> None:
        """This node's members of ``room`` now, for every node's presence, soon (the presence writer)."""
        with self._writes:
            self._members[room] = (users, anonymous)
            self._writes.notify()

    def _write_loop(self) -> None:
        """Write what ``seated`` and ``release`` left, the latest members of each room once."""
        while not self._stop.is_set():
            with self._writes:
                self._writes.wait_for(lambda: self._members or self._freed or self._stop.is_set())
                members, self._members = self._members, {}
                freed, self._freed = self._freed, []
            for room, name, token in freed:
                self.streams.release(room, name, token)
            for room, (users, anonymous) in members.items():
                self.streams.set_presence(room, users, anonymous)

    def elsewhere(self, room: str) -> tuple[list[str], int]:
        """The other nodes' members of ``room``: (names, anonymous); Unavailable if Redis does not answer."""
        return self.streams.presence(room, others=True)

    # Stream reader thread.

    def _on_entry(self, entry: Entry) -> None:
        fields = entry.fields
        own = fields.get("node") == self._node
        room = self._rooms.get(entry.room)
        if room is not None:
            skip = int(fields["skip"]) if own and "skip" in fields else None
            room.deliver(_OPCODES[fields["op"]], fields["data"], skip, _sender(entry), fields["kind"].decode(),
                         id=entry.id if entry.message else None, ts=float(fields["ts"]))
        if own:
            with self._lock:
                self._unechoed.discard(int(fields["mid"]))
                self._lock.notify_all()

    def _on_gap(self, room: str, epoch: str, missed: int | None) -> None:
        if missed is None:
            log.warning("redis %s lost room %s: its history restarts under a new epoch", self.url, room)
        else:
            log.warning("room %s: %d messages went past this node while it was cut off longer than the "
                        "stream's reach", room, missed)

    def _on_name_lost(self, room: str, name: str) -> None:
        self.on_name_lost(room, name)


def _sender(entry: Entry) -> str | None:
    sender = entry.fields.get("from")
    return None if sender is None else sender.decode()
