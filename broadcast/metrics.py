"""The server's Prometheus metrics, in a private registry: what ``/metrics`` and ``--metrics-port`` serve.

prometheus-client writes the text format; this module only decides what is
counted. Events come in through hooks: ``Metrics`` is the engine's
``net.meter.Meter``, and the Redis bus times its publishes with
``redis_publish_seconds`` and counts what went past it in
``redis_lost_messages``. What is a state rather than an event
(connections, rooms, history and queued bytes, the Redis state), and the
tallies the engine keeps on its hot path (frames delivered, bytes sent and
received, messages), are read from their owners when scraped, by
``_Snapshot``, so counting costs the fan-out nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest, \
    start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .net.meter import Traffic

# What /metrics answers with.
CONTENT_TYPE = CONTENT_TYPE_LATEST
# A publish to a Redis on the same host or LAN takes 0.1-1 ms, and a stall
# runs into bus/redis.py's one-second timeout: the buckets span both.
REDIS_PUBLISH_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Every value bus.state takes, so that each is a series from the start.
REDIS_STATES = ("off", "ok", "stalled", "reconnecting")


class Metrics:
    """The counters the engine calls (``net.meter.Meter``), and the registry to serve."""

    def __init__(self, version: str, node_id: str) -> None:
        self.registry = registry = CollectorRegistry()
        Info("broadcast_build", "This server: its version and node id (the node's in /healthz and on Redis).",
             registry=registry).info({"version": version, "node": node_id})
        self._refusals = Counter(
            "broadcast_handshake_refusals", "WebSocket requests answered with an HTTP error instead of 101.",
            ["status"], registry=registry)
        self._closes = Counter(
            "broadcast_closes", "Joined clients that left, by close code (1006: none) and reason class.",
            ["code", "reason"], registry=registry)
        self._evictions = Counter(
            "broadcast_evictions", "Slow consumers closed with 1008, their backlog dropped.", registry=registry)
        self.redis_publish_seconds = Histogram(
            "broadcast_redis_publish_seconds", "Time Redis took to take one client message (--redis-url).",
            buckets=REDIS_PUBLISH_BUCKETS_S, registry=registry)
        self.redis_lost_messages = Counter(
            "broadcast_redis_lost_messages", "Messages trimmed from their room's Redis stream before this node "
            "read them; its clients were told with a gap (--redis-url).", registry=registry)

    # net.meter.Meter: called at rare events (a refusal, a close, an eviction), from any thread.

    def refused(self, status: int) -> None:
        self._refusals.labels(str(int(status))).inc()

    def closed(self, code: int, reason: str) -> None:
        self._closes.labels(str(int(code)), reason).inc()

    def evicted(self) -> None:
        self._evictions.inc()

    # Wiring, by the composition root.

    def watch(self, traffic: Callable[[], Traffic], rooms: Callable[[], int], history_bytes: Callable[[], int],
              redis_state: Callable[[], str]) -> None:
        """Read the engine's traffic, the rooms, their history's bytes and the bus's state at each scrape."""
        self.registry.register(_Snapshot(traffic, rooms, history_bytes, redis_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve on a listener of its own, in a daemon thread; where it listens. Raises OSError."""
        httpd, _thread = start_http_server(port, host, registry=self.registry)
        return httpd.server_address[:2]


class _Snapshot:
    """A custom collector: values read from their owners when scraped, not counted as they change."""

    def __init__(self, traffic: Callable[[], Traffic], rooms: Callable[[], int], history_bytes: Callable[[], int],
                 redis_state: Callable[[], str]) -> None:
        self._traffic = traffic
        self._rooms = rooms
        self._history_bytes = history_bytes
        self._redis_state = redis_state

    def collect(self):
        traffic = self._traffic()
        yield GaugeMetricFamily("broadcast_connections", "Joined clients.", value=traffic.joined)
        yield GaugeMetricFamily("broadcast_handshakes", "Connections still in their opening handshake.",
                                value=traffic.opening)
        yield GaugeMetricFamily("broadcast_rooms", "Rooms on this node.", value=self._rooms())
        yield GaugeMetricFamily("broadcast_history_bytes", "Bytes all rooms' history holds on this node.",
                                value=self._history_bytes())
        yield GaugeMetricFamily("broadcast_queued_bytes", "Bytes owed to clients, in all their outboxes.",
                                value=traffic.queued_bytes)
        yield CounterMetricFamily("broadcast_messages_delivered", "Data frames queued to clients (one per member).",
                                  value=traffic.delivered)
        yield CounterMetricFamily("broadcast_sent_bytes", "Bytes written to clients' sockets, TLS records included.",
                                  value=traffic.sent_bytes)
        yield CounterMetricFamily("broadcast_received_bytes", "Bytes read from clients' sockets, after TLS.",
                                  value=traffic.received_bytes)
        yield CounterMetricFamily("broadcast_messages_received", "Whole messages from clients, within their rate limit.",
                                  value=traffic.messages)
        state = self._redis_state()
        family = GaugeMetricFamily("broadcast_redis_state", "1 for the bus's state now: off (no --redis-url), "
                                   "ok, stalled or reconnecting.", labels=["state"])
        for name in REDIS_STATES:
            family.add_metric([name], 1 if name == state else 0)
        yield family
