"""Several servers, one room: every message goes round through one Redis pub/sub channel.

A node publishes what its clients send and delivers only what comes back
from the channel, its own messages included. Redis gives one order to all
subscribers, so every client of every node sees the same order, and since
nothing received is ever published again, no message can loop.

The envelope on the channel is one JSON header line, then the payload bytes::

    {"v": 1, "node": "3f2a9c1e4b7d", "op": "text", "skip": 17}\\n[Alice] hi

``op`` is ``text`` or ``binary``; the payload is the message exactly as
clients get it, already attributed. ``skip``, when not null, names a
connection of the origin node that must not get it (a joiner does not see
its own "joined" notice).

While Redis is unreachable the node delivers its own clients' messages
locally, so they keep chatting among themselves, and retries with capped
exponential backoff; ``state`` says which it is doing, for /healthz.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from websockets.frames import Opcode

from .bus import encode
from .redact import redact_url

log = logging.getLogger("broadcast.redis")

ENVELOPE_VERSION = 1
# A reader thread publishing its client's message waits at most this long
# for Redis before the message is delivered locally instead.
PUBLISH_TIMEOUT_S = 1.0
# Connections shared by all reader threads for publishing; a burst beyond
# this waits (up to PUBLISH_TIMEOUT_S) rather than opening more.
PUBLISH_CONNECTIONS = 8
# How often the listener wakes to notice shutdown or a failed publish.
LISTEN_POLL_S = 0.25
# At start, how long the server waits for its subscription before taking
# clients anyway (Redis is slow, or --redis-optional and unreachable).
SUBSCRIBE_WAIT_S = 2.0
# Reconnect delays double from the first to the cap, so delivery resumes
# within about a second of Redis coming back, and a long outage costs
# one attempt a second.
RECONNECT_FIRST_S = 0.05
RECONNECT_CAP_S = 1.0

_OPS = {Opcode.TEXT: "text", Opcode.BINARY: "binary"}
_OPCODES = {name: op for op, name in _OPS.items()}


class RedisUnavailable(Exception):
    pass


class RedisBus:
    def __init__(self, hub, url: str, channel: str, node_id: str) -> None:
        self._hub = hub
        self.url = redact_url(url)  # for log lines and errors: the password never reaches them
        self.channel = channel
        self.node_id = node_id
        self.state = "reconnecting"  # then "ok"; read by /healthz
        # Joiners awaiting their own notice, by id; weak so a notice lost
        # with Redis cannot keep a connection alive.
        self._joiners: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        no_retry = Retry(ExponentialBackoff(), 0)  # our listener owns reconnecting
        self._client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            url, max_connections=PUBLISH_CONNECTIONS, timeout=PUBLISH_TIMEOUT_S,
            socket_timeout=PUBLISH_TIMEOUT_S, socket_connect_timeout=PUBLISH_TIMEOUT_S,
            retry=no_retry,
        ))
        self._listen_client = redis.Redis.from_url(
            url, socket_connect_timeout=PUBLISH_TIMEOUT_S, retry=no_retry,
        )
        self._backoff = ExponentialBackoff(cap=RECONNECT_CAP_S, base=RECONNECT_FIRST_S)
        self._failures = 0  # reconnect attempts in the current outage (listener only)
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="redis-listener", daemon=True)

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
        self._subscribed.wait(SUBSCRIBE_WAIT_S)

    def close(self) -> None:
        """Unsubscribe and close every Redis connection (graceful shutdown)."""
        self._stop.set()
        self._listener.join(LISTEN_POLL_S * 4 + PUBLISH_TIMEOUT_S)
        self._client.connection_pool.disconnect()  # a pool passed in is not closed for us
        self._listen_client.close()

    # Reader threads.

    def publish(self, opcode: Opcode, payload: bytes, skip=None) -> None:
        if self.state == "ok":
            header = {"v": ENVELOPE_VERSION, "node": self.node_id, "op": _OPS[opcode],
                      "skip": None if skip is None else id(skip)}
            if skip is not None:
                self._joiners[id(skip)] = skip
            try:
                self._client.publish(self.channel, json.dumps(header).encode() + b"\n" + payload)
                return
            except redis.RedisError as exc:
                if self.state == "ok":
                    self.state = "reconnecting"  # the listener logs and reconnects
                    log.debug("publish failed: %s", exc)
        self._hub.broadcast(encode(opcode, payload), skip)

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
                self.state = "reconnecting"
                self._failures += 1
                self._stop.wait(self._backoff.compute(self._failures))
            finally:
                self._close_pubsub(pubsub)

    def _pump(self, pubsub) -> None:
        """Deliver from the channel until shutdown, or until Redis fails."""
        subscribed = False
        while not self._stop.is_set():
            if subscribed and self.state != "ok":
                raise redis.ConnectionError("a publish failed")  # reconnect, then resume
            message = pubsub.get_message(timeout=LISTEN_POLL_S)
            if message is None:
                continue
            if message["type"] == "subscribe":
                subscribed = True
                if self._failures:
                    log.info("redis %s is back; cross-node delivery resumed", self.url)
                    self._failures = 0
                self.state = "ok"
                self._subscribed.set()
            elif message["type"] == "message":
                self._deliver(message["data"])

    def _deliver(self, data: bytes) -> None:
        try:
            head, _, payload = data.partition(b"\n")
            header = json.loads(head)
            opcode = _OPCODES[header["op"]]
            node, skip_id = header["node"], header["skip"]
            if skip_id is not None and type(skip_id) is not int:
                raise TypeError("skip must be a connection id")
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed message on channel %s", self.channel)
            return
        skip = self._joiners.pop(skip_id, None) if node == self.node_id and skip_id else None
        self._hub.broadcast(encode(opcode, payload), skip)

    def _close_pubsub(self, pubsub) -> None:
        try:
            if self._stop.is_set() and pubsub.subscribed:
                pubsub.unsubscribe(self.channel)
                log.info("unsubscribed from redis channel %s", self.channel)
        except redis.RedisError:
            pass
        pubsub.close()
