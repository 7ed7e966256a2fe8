"""The broadcast server: accept connections, relay every message to everyone, stop gracefully.

Threads: one acceptor, one reader per connection (``Connection.run``), a
small pool of writers (``outbox``), and one ticker for keepalive and
deadlines. The main thread only waits for SIGINT or SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

from websockets.frames import CloseCode, Opcode

from . import handshake
from .bus import LocalBus
from .config import parse_server_args
from .connection import Connection
from .hub import Hub
from .limits import AddressCounts
from .outbox import WriterPool
from .redis_bus import RedisBus, RedisUnavailable
from .tls import TLSTransport, server_context
from .transport import PlainTransport

log = logging.getLogger("broadcast.server")

# Pending connections the kernel may hold for us; a burst of clients waits
# there instead of being refused (Linux caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096
# Writers are mostly in send(), which releases the GIL; two keep the socket
# layer busy while a reader parses, more only add contention.
WRITER_THREADS = 2
# Readers only block in recv; a small stack lets 10,000 of them fit without
# reserving 80 GB of address space at the 8 MiB default.
THREAD_STACK_BYTES = 256 * 1024
# The ticker looks at deadlines at least this often.
TICK_MAX_S = 0.5
# After accept() fails for lack of file descriptors, wait this long before
# trying again rather than spinning on the error.
ACCEPT_BACKOFF_S = 0.1
# Load balancers' health check, on the WebSocket port.
HEALTH_PATH = "/healthz"


class Server:
    def __init__(self, config) -> None:
        """Raises OSError (ssl.SSLError among them) if the TLS certificate cannot be loaded."""
        self.config = config
        self.tls = server_context(config.certfile, config.keyfile) if config.certfile else None
        self.policy = handshake.Policy(config.token, config.require_username)
        # Browsers always send Origin, so a missing one (None) is a non-browser
        # client, which cross-site hijacking cannot use.
        self.origins = [*config.allowed_origin, None] if config.allowed_origin else None
        self.node_id = uuid.uuid4().hex[:12]
        self.hub = Hub()
        if config.redis_url:
            self.bus = RedisBus(self.hub, config.redis_url, config.redis_channel, self.node_id)
        else:
            self.bus = LocalBus(self.hub)
        self.writers = WriterPool(WRITER_THREADS)
        self.wire_log = logging.getLogger("broadcast.wire")
        self._conns: set[Connection] = set()  # accepted, handshaking or joined
        self._per_ip = AddressCounts()  # of self._conns, under the same lock
        self._conns_changed = threading.Condition()
        self._stopping = False
        self._listener: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    # Lifecycle (main thread).

    def listen(self) -> None:
        """Bind and listen; raises OSError (port in use, bad host)."""
        listener = socket.create_server(
            (self.config.host, self.config.port), backlog=LISTEN_BACKLOG
        )
        self._listener = listener
        self.address = listener.getsockname()[:2]
        scheme = "wss" if self.tls else "ws"
        log.info("listening on %s://%s:%d%s", scheme, *self.address, handshake.WS_PATH)

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="acceptor", daemon=True).start()
        threading.Thread(target=self._tick_loop, name="ticker", daemon=True).start()

    def shutdown(self, timeout: float) -> None:
        """Stop accepting, close every client with 1001 after what it is owed, wait."""
        deadline = time.monotonic() + timeout
        with self._conns_changed:
            self._stopping = True
            conns = tuple(self._conns)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        log.info("shutting down: closing %d connection(s)", len(conns))
        for conn in conns:
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
        with self._conns_changed:
            self._conns_changed.wait_for(lambda: not self._conns, deadline - time.monotonic())
            left = tuple(self._conns)
        for conn in left:
            conn.abort("shutdown timeout")
        if left:
            log.warning("shutdown timeout: dropped %d connection(s)", len(left))
        self.bus.close(deadline)  # a frozen Redis cannot stretch the shutdown
        log.info("stopped")

    # Acceptor and ticker threads.

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except OSError as exc:
                if self._stopping:
                    return
                log.error("accept failed: %s", exc)
                time.sleep(ACCEPT_BACKOFF_S)
                continue
            peer = f"{addr[0]}:{addr[1]}"
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                transport = TLSTransport(sock, peer, self.tls)
            else:
                transport = PlainTransport(sock, peer)
            conn = Connection(self, transport, addr[0], peer)
            with self._conns_changed:
                if self._stopping:
                    sock.close()
                    return
                self._conns.add(conn)
                self._per_ip.add(conn.ip)
            try:
                threading.Thread(target=conn.run, name=f"conn-{peer}", daemon=True).start()
            except RuntimeError as exc:  # out of threads
                log.error("cannot serve %s: %s", peer, exc)
                self.forget(conn)
                transport.close()

    def _tick_loop(self) -> None:
        c = self.config
        periods = [p / 4 for p in (c.ping_interval, c.ping_timeout, c.write_timeout) if p]
        period = max(0.01, min([TICK_MAX_S, *periods]))
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._conns_changed:
                conns = tuple(self._conns)
            for conn in conns:
                try:
                    conn.tick(now, c.ping_interval, c.ping_timeout, c.write_timeout)
                except Exception:  # keep every other connection's keepalive going
                    log.exception("ticker failed on %s", conn.label)
                    conn.abort("internal error")

    # Called by connections.

    def admit(self, conn: Connection, request):
        """Answer the opening handshake: a 101 response, or a refusal."""
        protocol = conn.protocol
        if urlsplit(request.path).path == HEALTH_PATH:
            return self._health(protocol)
        limit_per_ip = self.config.max_connections_per_ip
        try:
            admission = handshake.admit(request.path, request.headers, self.policy)
            if len(self._conns) > self.config.max_connections:
                raise handshake.Refused(503, "server full, try again later")
            if limit_per_ip and self._per_ip[conn.ip] > limit_per_ip:
                raise handshake.Refused(429, "too many connections from your address")
        except handshake.Refused as refusal:
            log.info("refused %s: %d %s", conn.peer, refusal.status, refusal.reason)
            response = protocol.reject(refusal.status, refusal.reason + "\n")
            for name, value in refusal.headers:
                response.headers[name] = value
            return response
        response = protocol.accept(request)
        if response.status_code == 101:
            conn.username = admission.username
            if admission.username is not None:
                conn.prefix = f"[{admission.username}] ".encode()
        else:
            log.info("refused %s: %d %s", conn.peer, response.status_code, response.reason_phrase)
        return response

    def _health(self, protocol):
        """For load balancers: 503 takes a node cut off from Redis out of rotation."""
        state = self.bus.state
        body = {"connections": len(self.hub), "node": self.node_id, "redis": state}
        response = protocol.reject(200 if state in ("ok", "off") else 503, json.dumps(body) + "\n")
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    def arrive(self, conn: Connection, response: list[bytes]) -> None:
        """Join the hub as the 101 ``response`` is queued; called under ``conn.lock``."""
        conn.joined = True
        online = self.hub.join(conn, response)
        log.info("connect %s (%d online)", conn.label, online)

    def announce(self, conn: Connection) -> None:
        if conn.username:
            self.bus.publish(Opcode.TEXT, f"* {conn.username} joined".encode(), skip=conn)

    def depart(self, conn: Connection) -> None:
        online = self.hub.leave(conn)
        log.info("disconnect %s: %s (%d online)", conn.label, conn.why, online)
        if conn.username:
            self.bus.publish(Opcode.TEXT, f"* {conn.username} left".encode())

    def forget(self, conn: Connection) -> None:
        with self._conns_changed:
            self._conns.remove(conn)
            self._per_ip.remove(conn.ip)
            self._conns_changed.notify_all()

    def relay(self, conn: Connection, opcode, payload: bytes) -> int | None:
        """A whole message arrived: attribute it and send it to everyone.

        Returns what ``bus.settle`` takes to wait for the sender's own copy,
        or None when it is already in the sender's outbox.
        """
        if opcode is Opcode.TEXT and conn.prefix:
            payload = conn.prefix + payload
        return self.bus.publish(opcode, payload)


def _raise_open_file_limit() -> None:
    """Each client is a file descriptor; take all the kernel allows us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    config = parse_server_args(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(message)s")
    # websockets logs every open and close at INFO; ours already does, once.
    logging.getLogger("broadcast.wire").setLevel(max(logging.WARNING, logging.getLevelName(config.log_level)))
    _raise_open_file_limit()
    threading.stack_size(THREAD_STACK_BYTES)

    try:
        server = Server(config)
    except OSError as exc:
        log.error("cannot load TLS certificate %s: %s", config.certfile, exc)
        return 2
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stop.is_set():
            os._exit(1)  # a second signal: the operator does not want to wait
        stop.set()
        log.info("received %s, shutting down", signal.Signals(signum).name)

    # Handlers first: a supervisor may signal as soon as it reads the
    # listening line, and the default SIGTERM action would skip the shutdown.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.bus.check()
    except RedisUnavailable as exc:
        if not config.redis_optional:
            log.error("cannot reach redis %s", exc)
            return 1
        log.warning("cannot reach redis %s; serving this node alone until it is back", exc)
    server.bus.start()
    try:
        server.listen()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        return 1

    server.start()
    stop.wait()
    server.shutdown(config.shutdown_timeout)
    return 0
