"""The broadcast server's composition root: configuration, logging, and the wiring of its layers.

The engine (net/) accepts connections and drives the protocol; the chat
(chat/) decides who joins, names messages and keeps the rooms; the bus
(bus/) carries messages to the rooms of this node, or of every node round
Redis. Only this module knows all three.

Threads: one acceptor, one reader per connection (``Connection.run``), a
small pool of writers (``outbox``), and one ticker for keepalive and
deadlines. The main thread only waits for SIGINT or SIGTERM, and a second
one once the shutdown has begun.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
import uuid
from typing import NoReturn

from . import __version__, logs, web
from .bus.local import LocalBus
from .bus.redis import RedisBus, RedisUnavailable
from .chat import admission
from .chat.app import ROOMS_PATH, ChatApp
from .chat.rooms import Rooms, RoomSettings
from .config import ServerConfig, parse_server_args
from .metrics import CONTENT_TYPE, Metrics
from .net.connection import WIRE_LOG
from .net.http import Reply
from .net.listener import Listener
from .net.tls import server_context

log = logging.getLogger(__name__)

# Readers only block in recv; a small stack lets 10,000 of them fit without
# reserving 80 GB of address space at the 8 MiB default.
THREAD_STACK_BYTES = 256 * 1024
# The cyclic collector looks at its youngest objects once this many more
# have been made than freed (CPython's default is 700). Each client keeps
# ~27 of them, so a burst of connects met the default every ~26 clients,
# and a full collection (every object, under the GIL: 100 ms at 6,000
# clients) every ~2,600; at this, 10,000 connect without one, and the
# collector's share of a connect falls by two thirds.
GC_YOUNG_THRESHOLD = 5000
# How long a thread waiting for the GIL sleeps before it asks the holder to
# let go (CPython's default is 5 ms). Each waiter wakes this often, and
# glibc's condition variable serialises every such wake-up: when thousands
# of clients dropped at once, their readers all woke for the GIL and spent
# it on those wake-ups instead of running. 5,000 leaving took 9-60 s at
# 5 ms; at 100 ms they left in about 2 s, but 3 test runs in 16 still
# stalled past 15 s; at 1 s, 16 in 16 left within seconds. No thread of
# ours holds the GIL that long: each lets go at its next system call.
SWITCH_INTERVAL_S = 1.0
# Taken with sigwait(), never by a handler: blocked before the first thread
# starts, so that every thread inherits the block and the kernel keeps them
# pending until one is waited for. A handler runs only when the main thread
# runs Python, and one that set the Event the main thread waited on could
# land inside that Event's own wait: a SIGTERM right after clients
# connected was lost in about 1 start in 9 under load: the server hung on.
SHUTDOWN_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
# Load balancers' health check, on the WebSocket port.
HEALTH_PATH = "/healthz"
# Prometheus's default scrape path, on the WebSocket port unless --metrics-port moves it.
METRICS_PATH = "/metrics"


class Server:
    def __init__(self, config: ServerConfig) -> None:
        """Raises OSError (ssl.SSLError among them) if the TLS certificate cannot be loaded."""
        self.config = config
        tls = server_context(config.certfile, config.keyfile) if config.certfile else None
        self.node_id = uuid.uuid4().hex[:12]
        self.metrics = Metrics(__version__, self.node_id)
        settings = RoomSettings(config.history_size, config.history_bytes, config.history_ttl,
                                config.allow_duplicate_names)
        self.rooms = Rooms(settings, config.max_rooms, config.history_total_bytes)
        if config.redis_url:
            self.bus = RedisBus(self.rooms, config.redis_url, config.redis_channel, self.node_id,
                                self.metrics.redis_publish_seconds, self.metrics.redis_lost_messages,
                                history=config.history_size,
                                retention_s=config.redis_retention, presence_ttl_s=config.presence_ttl)
            self.rooms.feed = self.bus
        else:
            self.bus = LocalBus(self.rooms)
        self.policy = admission.Policy(config.token, config.require_username)
        app = ChatApp(self.policy, self.rooms, self.bus)
        if config.redis_url:
            self.bus.on_name_lost = app.name_lost
        routes = {HEALTH_PATH: self._health, ROOMS_PATH: _json(app.room_list), ROOMS_PATH + "/": _json(app.room_info)}
        if not config.no_metrics and config.metrics_port is None:
            routes[METRICS_PATH] = self._metrics
        if not config.no_web:
            routes.update(web.routes())
        self.listener = Listener(config, app, routes, tls, self.metrics)
        self.metrics.watch(self.listener.traffic, lambda: len(self.rooms), lambda: self.rooms.budget.used,
                           lambda: self.bus.state)

    def _health(self, request) -> Reply:
        """For load balancers: 503 takes a node cut off from Redis out of rotation."""
        state = self.bus.state
        body = {"connections": self.rooms.online(), "node": self.node_id, "redis": state}
        healthy = state in ("ok", "off") and not self.listener.full()
        return Reply(200 if healthy else 503, "application/json", (json.dumps(body) + "\n").encode())

    def _metrics(self, request) -> Reply:
        """Prometheus text; behind --token as the WebSocket is, since it tells who is busy and how much."""
        admission.authorize(request.path, request.headers, self.policy)  # Refused: 401
        return Reply(200, CONTENT_TYPE, self.metrics.render())

    def listen(self) -> None:
        """Bind and listen, and say where; raises OSError (port in use, bad host)."""
        listener = self.listener
        listener.listen()
        url = f"{'wss' if listener.tls else 'ws'}://{self._netloc()}{admission.WS_PATH}"
        log.info("listening on %s", url, extra={"event": "listening", "url": url})
        if not self.config.no_web:
            page = f"{'https' if listener.tls else 'http'}://{self._netloc()}/"
            log.info("chat page at %s", page, extra={"event": "page", "url": page})
        self._log_exposure(url)

    def _netloc(self) -> str:
        """Where the listener listens, as a URL has it (an IPv6 host in brackets)."""
        host, port = self.listener.address
        return f"[{host}]:{port}" if self.listener.ipv6 else f"{host}:{port}"

    def serve_metrics(self) -> None:
        """Say where /metrics is, after ``listen``; start its own listener if it has one (raises OSError)."""
        c = self.config
        if c.no_metrics:
            log.info("metrics: off")
            return
        if c.metrics_port is None:
            url = f"{'https' if self.listener.tls else 'http'}://{self._netloc()}{METRICS_PATH}"
            log.info("metrics on %s, token %s", url, "on" if c.token else "off",
                     extra={"event": "metrics", "url": url})
            return
        host, port = self.metrics.serve(c.metrics_host, c.metrics_port)
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}{METRICS_PATH}"
        log.info("metrics on %s, no token", url, extra={"event": "metrics", "url": url})
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("the metrics listener answers anyone who reaches %s: keep it off the public network", url)

    def _log_exposure(self, url: str) -> None:
        """Say in one line who can reach this node, and warn when that is anyone, in clear."""
        c = self.config
        tls = self.listener.tls
        origins = ", ".join(c.allowed_origin) if c.allowed_origin else "any origin"
        log.info("exposure: %s, TLS %s, token %s, origins: %s",
                 url, "on" if tls else "off", "on" if c.token else "off", origins)
        if not ipaddress.ip_address(self.listener.address[0]).is_loopback and not (tls or c.token):
            log.warning("listening beyond loopback with neither --token nor TLS: "
                        "anyone who can reach %s can join and read every message", url)

    def start(self) -> None:
        self.listener.start()

    def shutdown(self, timeout: float) -> None:
        """Stop accepting, close every client with 1001 after what it is owed, wait, disconnect the bus."""
        deadline = time.monotonic() + timeout
        self.listener.shutdown(deadline)
        self.bus.close(deadline)  # a frozen Redis cannot stretch the shutdown
        log.info("stopped")


def _json(handler):
    """A route answering with ``handler(request)``'s dict as JSON (it raises Refused to refuse)."""
    def route(request) -> Reply:
        return Reply(200, "application/json", (json.dumps(handler(request)) + "\n").encode())
    return route


def _raise_open_file_limit() -> None:
    """Each client is a file descriptor; take all the kernel allows us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the server until a signal; the process ends here, with the code ``_serve`` returns.

    It ends with ``os._exit``, once stderr is flushed: finalizing
    the interpreter would free every connection's objects one by one, for
    the exit to drop them anyway (1.6 s after 19,000 clients).
    """
    config = parse_server_args(argv)
    logs.setup(config.log_level, config.log_format)
    code = _serve(config)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(config: ServerConfig) -> int:
    # Before any thread: a supervisor may signal as soon as it reads the
    # listening line, and the default SIGTERM action would skip the shutdown.
    # Ignored ones are taken back first: a shell starts a background job
    # with SIGINT ignored, and an ignored signal may be dropped, not kept
    # pending: "python server.py &" then "kill -INT" left it running.
    for shutdown_signal in SHUTDOWN_SIGNALS:
        signal.signal(shutdown_signal, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
    # websockets logs every open and close at INFO; ours already does, once.
    WIRE_LOG.setLevel(max(logging.WARNING, logging.getLevelName(config.log_level)))
    for warning in config.config_warnings:
        log.warning("%s", warning)
    _raise_open_file_limit()
    threading.stack_size(THREAD_STACK_BYTES)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    try:
        server = Server(config)
    except OSError as exc:
        log.error("cannot load TLS certificate %s: %s", config.certfile, exc)
        return 2
    try:
        server.bus.check()
    except RedisUnavailable as exc:
        if not config.redis_optional:
            log.error("cannot reach %s", exc)
            return 1
        log.warning("cannot reach %s; rooms open once it is back", exc)
    server.bus.start()
    try:
        server.listen()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        return 1
    try:
        server.serve_metrics()
    except OSError as exc:
        log.error("cannot listen for metrics on %s:%d: %s", config.metrics_host, config.metrics_port,
                  exc.strerror or exc)
        return 1

    server.start()
    log.info("received %s, shutting down", signal.Signals(signal.sigwait(SHUTDOWN_SIGNALS)).name)
    threading.Thread(target=_exit_on_second_signal, name="signals", daemon=True).start()
    server.shutdown(config.shutdown_timeout)
    return 0


def _exit_on_second_signal() -> NoReturn:
    """A second signal during the shutdown: the operator does not want to wait."""
    name = signal.Signals(signal.sigwait(SHUTDOWN_SIGNALS)).name
    logs.last_words(log, logging.WARNING, f"received {name} again, exiting without waiting for clients")
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
