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

Publishes are batched: one publisher thread takes every message queued
since its last round trip and appends them all in one (streams.publish_many),
in the order they were queued, so each sender's order and Redis's order of
the room are kept while a burst pays one round trip, not one per message.
A caller that passes ``refused`` does not wait for Redis: it is called back,
from the publisher thread, for a message Redis did not take. One that does
not waits for the answer and gets Unavailable, as before the batching.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

from websockets.frames import Opcode

from .streams import (
    COMMAND_TIMEOUT_S,
    PRESENCE_TTL_S,
    RETAIN_S,
    Entry,
    StreamsBus,
    Unavailable,
)

log = logging.getLogger(__name__)

# A closing client's close reply waits at most this long for the echo of its
# last message round Redis; past it the close goes first (the echo, already
# in the stream, still reaches every other client in order).
ECHO_WAIT_S = 2.0
# The stream keeps at least this many entries per room (or --history-size,
# if larger), however old: a node cut off from Redis for longer than
# --redis-retention still catches up on this many.
STREAM_ENTRIES = 1000
# Publishes queued for the publisher thread hold at most this many payload
# bytes; a sender past it waits (its connection reads no more meanwhile),
# so a stalled Redis holds a few MiB here, not all that clients send.
QUEUED_MAX_BYTES = 4 * 2**20
# One round trip appends at most this many: one script's run (Redis runs
# nothing else meanwhile) stays short, its reply small, and a long queue is
# answered in steps.
PIPELINE_MAX_MSGS = 512
# A publish that waits for its answer (no ``refused``) gives up after this:
# a round trip takes at most COMMAND_TIMEOUT_S for the pool and as much for
# the reply, behind at most a few full batches; it may still be appended.
ANSWER_WAIT_S = 5 * COMMAND_TIMEOUT_S
# A sender waits this long at most for room in the queue: a round trip's
# worth of COMMAND_TIMEOUT_S, twice; still full past it, Redis is stalled.
QUEUE_WAIT_S = 2 * COMMAND_TIMEOUT_S
_OPS = {Opcode.TEXT: b"text", Opcode.BINARY: b"binary"}
_OPCODES = {name: op for op, name in _OPS.items()}
MESSAGE = "message"  # the kind of a text message (chat.rooms' name for it); any other kind is a notice

RedisUnavailable = Unavailable  # what check() and publish() raise


class RedisBus:
    """Rooms delivered from their Redis streams, with history, presence and names shared by every node."""

    def __init__(self, rooms, url: str, prefix: str, node_id: str, publish_seconds=None, lost_messages=None, *,
                 history: int = 0, retention_s: float = RETAIN_S, presence_ttl_s: float = PRESENCE_TTL_S) -> None:
        self._rooms = rooms  # name -> room, with .deliver(...) and .lost(...)
        self.node_id = node_id
        self._node = node_id.encode()
        self.history = history  # messages a room's history holds here, fetched when a room opens
        self.streams = StreamsBus(url, node_id, self._on_entry, self._on_gap, on_name_lost=self._on_name_lost,
                                  on_read=self._on_read, prefix=prefix, max_entries=max(STREAM_ENTRIES, history),
                                  retain_s=retention_s, presence_ttl_s=presence_ttl_s)
        self.url = self.streams.url
        self._publish_seconds = publish_seconds  # a histogram (metrics), or None
        self._lost_messages = lost_messages  # a counter (metrics), or None
        self._mids = itertools.count(1)  # next() is atomic: a node's own publishes, told apart
        # _lock guards _unechoed; its condition tells settle() an own message came back.
        self._lock = threading.Condition()
        self._unechoed: set[int] = set()
        # Own messages delivered since the stream reader's last read: settle()
        # hears of them all at once, after it (stream reader thread only).
        self._heard: list[bytes] = []
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
        # _sending guards _queued, _queued_bytes and _busy; it wakes the
        # publisher thread, and the senders waiting for room in the queue.
        self._sending = threading.Condition()
        self._queued: list[_Queued] = []
        self._queued_bytes = 0
        self._busy = False  # a batch is on its way to Redis: the next one waits, so it cannot pass
        self._publisher = threading.Thread(target=self._publish_loop, name="redis-publisher", daemon=True)

    @property
    def state(self) -> str:
        """For /healthz: "ok" while the stream reader's reads are answered, else "reconnecting"."""
        return self.streams.state

    def check(self) -> None:
        self.streams.check()

    def start(self) -> None:
        self.streams.start()
        self._writer.start()
        self._publisher.start()

    def close(self, deadline: float) -> None:
        """Send what is queued and stop writing, then leave presence and free the names held, by ``deadline``."""
        self._stop.set()
        for wake in (self._writes, self._sending):
            with wake:
                wake.notify_all()
        for thread in (self._publisher, self._writer):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        self.streams.close(deadline)

    # Reader threads.

    def publish(self, room: str, opcode: Opcode, payload: bytes, skip: int | None = None,
                sender: str | None = None, kind: str = MESSAGE,
                refused: Callable[[], None] | None = None) -> int:
        """Queue for ``room``'s stream; what ``settle`` takes.

        With ``refused``, return at once and call it (from the publisher
        thread) if Redis does not take the message; without, wait for Redis's
        answer. Unavailable if it did not take it, or if the queue stayed
        full (Redis stalled) or the bus is closing.
        """
        mid = next(self._mids)
        # Bytes already: redis-py takes bytes as they are, and encodes anything else in Python.
        fields = {"op": _OPS[opcode], "data": payload, "kind": kind.encode(), "ts": repr(time.time()).encode(),
                  "node": self._node, "mid": b"%d" % mid}
        if sender is not None:
            fields["from"] = sender.encode()
        if skip is not None:
            fields["skip"] = b"%d" % skip
        queued = _Queued(room, fields, opcode is Opcode.TEXT and kind == MESSAGE, mid, len(payload), refused,
                         None if refused else threading.Event())
        with self._lock:
            self._unechoed.add(mid)
        with self._sending:
            room_left = self._sending.wait_for(
                lambda: not self._queued or self._queued_bytes + queued.size <= QUEUED_MAX_BYTES
                or self._stop.is_set(), QUEUE_WAIT_S)
            if self._stop.is_set() or not room_left:
                self._echoed(mid)
                raise Unavailable(f"redis {self.url}: " + ("closing" if room_left else "queue to Redis full"))
            # A sender that waits, finding nothing queued or on its way, sends on its own thread:
            # the hop to the publisher thread would only add to its wait.
            direct = queued.answered is not None and not self._queued and not self._busy
            if direct:
                self._busy = True
            else:
                self._queued.append(queued)
                self._queued_bytes += queued.size
                if len(self._queued) == 1:  # else the publisher is awake, or busy and looks again after
                    self._sending.notify_all()
        if direct:
            self._send([queued])
        elif queued.answered is not None and not queued.answered.wait(ANSWER_WAIT_S):
            self._echoed(mid)
            raise Unavailable(f"redis {self.url}: no answer within {ANSWER_WAIT_S:.0f} s")
        if queued.error is not None:
            raise Unavailable(str(queued.error))
        return mid

    def _publish_loop(self) -> None:
        """Append what is queued, in order, a batch at a time; answer each sender; until closed and empty."""
        while True:
            with self._sending:
                self._sending.wait_for(lambda: (self._queued and not self._busy)
                                       or (self._stop.is_set() and not self._queued))
                if not self._queued:
                    return
                batch = self._queued[:PIPELINE_MAX_MSGS]
                del self._queued[:PIPELINE_MAX_MSGS]
                self._queued_bytes -= sum(q.size for q in batch)
                self._busy = True
                self._sending.notify_all()  # room in the queue for the senders waiting
            self._send(batch)

    def _send(self, batch: list[_Queued]) -> None:
        """Append ``batch`` in one round trip (holding ``_busy``, so nothing passes it), then answer each sender."""
        try:
            answers = self.streams.publish_many([(q.room, q.fields, q.message) for q in batch])
        except Unavailable as exc:
            answers = [exc] * len(batch)
        finally:
            with self._sending:
                self._busy = False
                self._sending.notify_all()
        now = time.monotonic()
        for queued, answer in zip(batch, answers, strict=True):
            if self._publish_seconds is not None and not isinstance(answer, Unavailable):
                self._publish_seconds.observe(now - queued.started)
            if isinstance(answer, Unavailable):
                queued.error = answer
                if queued.refused is not None:
                    try:
                        queued.refused()
                    except Exception:  # the caller's callback failed: the others are still answered
                        log.exception("refusing a message of room %s failed", queued.room)
                self._echoed(queued.mid)  # no echo is coming; the refusal is queued before settle returns
            if queued.answered is not None:
                queued.answered.set()

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

    def rooms_elsewhere(self) -> dict[str, tuple[int, int]]:
        """The rooms the other nodes have members in: name -> (named, anonymous); Unavailable likewise."""
        return self.streams.rooms(others=True)

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
            self._heard.append(fields["mid"])

    def _on_read(self) -> None:
        """The entries of a read are delivered: those of them that were ours are echoed."""
        heard, self._heard = self._heard, []
        if heard:
            with self._lock:
                self._unechoed.difference_update(map(int, heard))
                self._lock.notify_all()

    def _echoed(self, mid: int) -> None:
        """Own message ``mid`` is delivered here, or never will be: ``settle`` waits no more for it."""
        with self._lock:
            self._unechoed.discard(mid)
            self._lock.notify_all()

    def _on_gap(self, room: str, epoch: str, missed: int | None) -> None:
        if missed is None:
            log.warning("redis %s lost room %s: its history restarts under a new epoch", self.url, room)
        else:
            log.warning("room %s: %d messages went past this node while it was cut off from Redis, or behind, "
                        "past the stream's reach (--redis-retention)", room, missed)
            if self._lost_messages is not None:
                self._lost_messages.inc(missed)
        joined = self._rooms.get(room)
        if joined is not None:
            joined.lost(missed)  # its clients hear of it where it happened, before the entry after it

    def _on_name_lost(self, room: str, name: str) -> None:
        self.on_name_lost(room, name)


class _Queued:
    """A publish waiting for the publisher thread, and then its answer."""

    __slots__ = ("room", "fields", "message", "mid", "size", "refused", "answered", "error", "started")

    def __init__(self, room: str, fields: dict, message: bool, mid: int, size: int,
                 refused: Callable[[], None] | None, answered: threading.Event | None) -> None:
        self.room = room
        self.fields = fields
        self.message = message  # a text message (a SEQ, history), else a note
        self.mid = mid
        self.size = size  # payload bytes, counted in QUEUED_MAX_BYTES
        self.refused = refused
        self.answered = answered  # set once answered, for a sender that waits
        self.error: Unavailable | None = None  # why Redis did not take it
        self.started = time.monotonic()  # for the publish-time histogram


def _sender(entry: Entry) -> str | None:
    sender = entry.fields.get("from")
    return None if sender is None else sender.decode()
