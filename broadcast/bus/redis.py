"""Several servers, the same rooms: every message goes round through one Redis pub/sub channel.

A node publishes what its clients send and delivers only what comes back
from the channel, its own messages included. Redis gives one order to all
subscribers, so every client of every node sees the same order, and since
nothing received is ever published again, no message can loop.

The envelope on the channel is bus/envelope.py's. ``node`` and ``seq`` name
a message once and for all: a publish that timed out may still have reached
Redis, so it is retried under the same id, and every node delivers an id once.

Exactly once for the sender: each node keeps its own messages that have
not come back yet (``_pending``). One that comes back is delivered from the
channel, in Redis's order. One the channel lost (the subscription broke
while it was published) is found by a sync: a node's watchdog publishes
``op: sync`` every WATCHDOG_INTERVAL_S, and Redis relays in order, so an
own message published before the sync and still pending when the sync
returns never will; it is then delivered locally. The same round trip
tells /healthz whether Redis answers at all.

While Redis is unreachable or stalled the node delivers its own clients'
messages locally, so they keep chatting among themselves, and retries with
capped exponential backoff; ``state`` says which it is doing, for /healthz.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from websockets.frames import Opcode

from ..redact import redact_url
from . import envelope

log = logging.getLogger(__name__)

# One attempt to publish waits at most this long for Redis.
PUBLISH_TIMEOUT_S = 1.0
# A reader thread retries its client's message (same id, so never twice)
# for this long before delivering it locally instead: a Redis stall shorter
# than this costs a delay, not the room's order.
PUBLISH_DEADLINE_S = 2.5
# Between two attempts, so a refused connection does not spin.
PUBLISH_RETRY_PAUSE_S = 0.05
# Connections shared by all reader threads for publishing; a burst beyond
# this waits (up to PUBLISH_TIMEOUT_S) rather than opening more.
PUBLISH_CONNECTIONS = 8
# How often the listener wakes to notice shutdown.
LISTEN_POLL_S = 0.25
# At start, how long the server waits for its subscription before taking
# clients anyway (Redis is slow, or --redis-optional and unreachable).
SUBSCRIBE_WAIT_S = 2.0
# Reconnect delays double from the first to the cap, so delivery resumes
# within about a second of Redis coming back, and a long outage costs
# one attempt a second.
RECONNECT_FIRST_S = 0.05
RECONNECT_CAP_S = 1.0
# The watchdog's sync goes round Redis this often; when none has come back
# for WATCHDOG_TIMEOUT_S, Redis is "stalled" (/healthz 503, delivery local).
WATCHDOG_INTERVAL_S = 0.5
WATCHDOG_TIMEOUT_S = 2.0
# A closing client's close reply waits at most this long for the echo of its
# last message; then the echo is delivered locally, still before the close.
ECHO_WAIT_S = 2.0
# Per origin node, how far back an id may arrive late (reordered by
# concurrent publishers, or retried) and still be told apart from a repeat.
DEDUP_WINDOW = 4096
# Origin nodes remembered for deduplication; a restarted node has a new id.
MAX_ORIGINS = 256


class RedisUnavailable(Exception):
    pass


class _Pending:
    """An own message on its way round Redis."""

    __slots__ = ("room", "delivery", "published")

    def __init__(self, room: str, delivery: tuple) -> None:
        self.room = room
        # Room.deliver's arguments: opcode, payload, skip (the member id of a
        # joiner that must not get its own notice), sender, kind.
        self.delivery = delivery
        self.published = False  # Redis has acknowledged it


class _Origin:
    """Which ids of one other node this node has delivered: all up to ``top`` but ``gaps``."""

    __slots__ = ("top", "gaps")

    def __init__(self, seq: int) -> None:
        self.top = seq - 1  # a node joining late never gets what came before
        self.gaps: set[int] = set()

    def first_time(self, seq: int) -> bool:
        if seq > self.top:
            if seq - self.top <= DEDUP_WINDOW:
                self.gaps.update(range(self.top + 1, seq))
            self.top = seq
            if len(self.gaps) > DEDUP_WINDOW:
                self.gaps = {g for g in self.gaps if g > seq - DEDUP_WINDOW}
            return True
        if seq in self.gaps:
            self.gaps.remove(seq)
            return True
        return False


class RedisBus:
    def __init__(self, rooms, url: str, channel: str, node_id: str) -> None:
        self._rooms = rooms  # name -> room, and .default for envelopes that name none
        self.url = redact_url(url)  # for log lines and errors: the password never reaches them
        self.channel = channel
        self.node_id = node_id
        self._seqs = itertools.count(1)  # next() is atomic: ids never repeat
        self._syncs = itertools.count(1)
        # _lock guards _pending, _resolve and _origins; its condition tells
        # settle() that an own message has been delivered.
        self._lock = threading.Condition()
        self._pending: dict[int, _Pending] = {}
        self._resolve: dict[int, list[int]] = {}  # sync number -> ids published before it
        self._origins: collections.OrderedDict[str, _Origin] = collections.OrderedDict()
        self._listening = False  # subscribed now (listener only writes it)
        self._heard_at = 0.0  # monotonic time our last sync came back
        no_retry = Retry(ExponentialBackoff(), 0)  # we own retrying
        self._client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            url, max_connections=PUBLISH_CONNECTIONS, timeout=PUBLISH_TIMEOUT_S,
            socket_timeout=PUBLISH_TIMEOUT_S, socket_connect_timeout=PUBLISH_TIMEOUT_S,
            retry=no_retry,
        ))
        self._listen_client = redis.Redis.from_url(
            url, socket_connect_timeout=PUBLISH_TIMEOUT_S, socket_timeout=PUBLISH_TIMEOUT_S,
            retry=no_retry,
        )
        self._backoff = ExponentialBackoff(cap=RECONNECT_CAP_S, base=RECONNECT_FIRST_S)
        self._failures = 0  # reconnect attempts in the current outage (listener only)
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="redis-listener", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="redis-watchdog", daemon=True)

    @property
    def state(self) -> str:
        """For /healthz and publish: "ok", "stalled" (no answer lately) or "reconnecting"."""
        if not self._listening:
            return "reconnecting"
        if time.monotonic() - self._heard_at > WATCHDOG_TIMEOUT_S:
            return "stalled"
        return "ok"

    def check(self) -> None:
        """Raise RedisUnavailable unless Redis answers now.

        The caller reports the failure, so the listener counts this outage
        as already told and does not log it again.
        """
        try:
            self._client.ping()
        except redis.RedisError as exc:
            self._failures = 1
            raise RedisUnavailable(f"{self.url}: {exc}") from None

    def start(self) -> None:
        """Subscribe before the server takes clients, so none misses the room."""
        self._listener.start()
        self._watchdog.start()
        self._subscribed.wait(SUBSCRIBE_WAIT_S)

    def close(self, deadline: float) -> None:
        """Unsubscribe and close every Redis connection, by ``deadline`` (monotonic) at the latest.

        A frozen Redis must not hold the shutdown past --shutdown-timeout:
        the threads are daemons, and every socket has a timeout.
        """
        self._stop.set()
        for thread in (self._listener, self._watchdog):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._client.connection_pool.disconnect()  # a pool passed in is not closed for us
        self._listen_client.close()

    # Reader threads.

    def publish(self, room: str, opcode: Opcode, payload: bytes, skip: int | None = None,
                sender: str | None = None, kind: str = "message") -> int | None:
        """Send round Redis; the id to settle() on, or None if delivered here already."""
        if self.state == "ok":
            seq = next(self._seqs)
            data = envelope.encode(self.node_id, seq, room, opcode, payload, sender, kind)
            pending = _Pending(room, (opcode, payload, skip, sender, kind))
            with self._lock:
                self._pending[seq] = pending
            deadline = time.monotonic() + PUBLISH_DEADLINE_S
            while True:
                try:
                    self._client.publish(self.channel, data)
                except redis.RedisError as exc:
                    if time.monotonic() + PUBLISH_RETRY_PAUSE_S >= deadline or self._stop.is_set():
                        log.debug("publish %d failed: %s; delivering it locally", seq, exc)
                        self._deliver_own(seq)
                        return None
                    self._stop.wait(PUBLISH_RETRY_PAUSE_S)
                    continue
                with self._lock:
                    pending.published = True  # the watchdog's next sync can now account for it
                return seq
        self._deliver_to(room, (opcode, payload, skip, sender, kind))
        return None

    def settle(self, seq: int) -> None:
        """Return once own message ``seq`` has been delivered here, waiting at most ECHO_WAIT_S.

        A sender's close reply must follow its own last message: when Redis
        does not bring it back in time, it is delivered locally, once.
        """
        with self._lock:
            self._lock.wait_for(lambda: seq not in self._pending, ECHO_WAIT_S)
        self._deliver_own(seq)

    def _deliver_own(self, seq: int) -> None:
        """Deliver own message ``seq`` unless someone already has: the pop decides, under the lock."""
        with self._lock:
            pending = self._pending.pop(seq, None)
            self._lock.notify_all()
        if pending is not None:
            self._deliver_to(pending.room, pending.delivery)

    def _deliver_to(self, name: str, delivery: tuple) -> None:
        room = self._rooms.get(name)
        if room is not None:  # its last member may have left meanwhile
            room.deliver(*delivery)

    # Watchdog thread.

    def _watch(self) -> None:
        stalled = False  # as last logged
        while not self._stop.wait(WATCHDOG_INTERVAL_S):
            if stalled != (self.state == "stalled"):
                stalled = not stalled
                if stalled:
                    log.error("redis %s answers nothing for %.0f s; delivering locally until it does",
                              self.url, WATCHDOG_TIMEOUT_S)
                else:
                    log.info("redis %s answers again", self.url)
            sync = next(self._syncs)
            with self._lock:
                published = [seq for seq, p in self._pending.items() if p.published]
                if published:
                    self._resolve[sync] = published
            try:
                self._client.publish(self.channel, envelope.encode_sync(self.node_id, sync))
            except redis.RedisError as exc:
                log.debug("watchdog sync failed: %s", exc)
                with self._lock:
                    self._resolve.pop(sync, None)

    # Listener thread.

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self._listen_client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                self._pump(pubsub)
            except Exception as exc:  # RedisError, or a bug: either way, reconnect
                if not isinstance(exc, redis.RedisError):
                    log.exception("redis listener failed")
                elif self._failures == 0:  # one error line per outage
                    log.error("redis %s unreachable: %s; delivering locally until it is back",
                              self.url, exc)
                self._listening = False
                self._failures += 1
                self._deliver_published()
                self._stop.wait(self._backoff.compute(self._failures))
            finally:
                self._close_pubsub(pubsub)

    def _pump(self, pubsub) -> None:
        """Deliver from the channel until shutdown, or until Redis fails."""
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=LISTEN_POLL_S)
            if message is None:
                continue
            if message["type"] == "subscribe":
                if self._failures:
                    log.info("redis %s is back; cross-node delivery resumed", self.url)
                    self._failures = 0
                self._heard_at = time.monotonic()
                self._listening = True
                self._subscribed.set()
            elif message["type"] == "message":
                self._deliver(message["data"])

    def _deliver_published(self) -> None:
        """The subscription broke: own messages Redis took may never come back; deliver them now."""
        with self._lock:
            published = [seq for seq, p in self._pending.items() if p.published]
        for seq in published:
            self._deliver_own(seq)

    def _deliver(self, data: bytes) -> None:
        message = envelope.decode(data)
        if message is None:
            log.warning("ignoring a malformed message on channel %s", self.channel)
            return
        node, seq, opcode = message.node, message.seq, message.opcode
        if node == self.node_id and seq is not None:
            if opcode is None:
                self._synced(seq)
            else:
                self._deliver_own(seq)  # dropped if already delivered (a retry, or a fallback)
        elif opcode is not None and (seq is None or self._first_time(node, seq)):
            room = self._rooms.default if message.room is None else self._rooms.get(message.room)
            if room is not None:  # a room no client of this node is in
                room.deliver(opcode, message.payload, None, message.sender, message.kind)

    def _synced(self, sync: int) -> None:
        """Our sync came back: Redis answers, and what it took before the sync is in."""
        self._heard_at = time.monotonic()
        with self._lock:
            lost = []
            for done in [s for s in self._resolve if s <= sync]:
                lost += self._resolve.pop(done)
        for seq in lost:
            self._deliver_own(seq)

    def _first_time(self, node: str, seq: int) -> bool:
        with self._lock:
            origin = self._origins.get(node)
            if origin is None:
                origin = self._origins[node] = _Origin(seq)
                if len(self._origins) > MAX_ORIGINS:
                    self._origins.popitem(last=False)
            else:
                self._origins.move_to_end(node)
            return origin.first_time(seq)

    def _close_pubsub(self, pubsub) -> None:
        try:
            if self._stop.is_set() and pubsub.subscribed:
                pubsub.unsubscribe(self.channel)
                log.info("unsubscribed from redis channel %s", self.channel)
        except redis.RedisError:
            pass
        pubsub.close()
