"""The broadcast server: accept connections, relay every message to everyone, stop gracefully.

Threads: one acceptor, one reader per connection (``Connection.run``), a
small pool of writers (``outbox``), and one ticker for keepalive and
deadlines. The main thread only waits for SIGINT or SIGTERM.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
import uuid

from websockets.frames import CloseCode, Opcode

from . import logs
from .bus.base import LocalBus
from .bus.redis import RedisBus, RedisUnavailable
from .chat import admission as handshake
from .chat.rooms import Hub
from .config import parse_server_args
from .net.connection import Connection
from .net.limits import LIMITS_HEADER, ONLINE_HEADER, AddressCounts, ByteBudget, limits_header
from .net.outbox import WriterPool
from .net.tls import TLSTransport, server_context
from .net.transport import PlainTransport

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
# File descriptors kept out of the clients' share: the listener, stdio,
# the writers' epoll and wake-up sockets, Redis connections, log files.
FD_RESERVE = 64
# Connections still in their opening handshake may take at most this share
# of the descriptors, so that they can never crowd out joined clients.
OPENING_FD_SHARE = 4
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
        # Those of self._conns that have not joined (yet), under the same lock.
        self._opening: set[Connection] = set()
        self._opening_per_ip = AddressCounts()
        self.max_opening, self.max_joined = _connection_caps(config)
        self.partial_budget = ByteBudget(config.max_pending_bytes)
        self._conns_changed = threading.Condition()
        self._stopping = False
        self._listener: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    # Lifecycle (main thread).

    def listen(self) -> None:
        """Bind and listen; raises OSError (port in use, bad host).

        An IPv6 literal listens on IPv6, ``::`` on IPv4 too where the OS
        allows; anything else (a name included) binds IPv4, as before.
        """
        host = self.config.host
        ipv6 = _is_ipv6(host)
        listener = socket.create_server(
            (host, self.config.port), backlog=LISTEN_BACKLOG,
            family=socket.AF_INET6 if ipv6 else socket.AF_INET,
            dualstack_ipv6=ipv6 and ipaddress.ip_address(host).is_unspecified and socket.has_dualstack_ipv6(),
        )
        self._listener = listener
        self.address = listener.getsockname()[:2]
        bound = f"[{self.address[0]}]" if ipv6 else self.address[0]
        url = f"{'wss' if self.tls else 'ws'}://{bound}:{self.address[1]}{handshake.WS_PATH}"
        log.info("listening on %s", url)
        self._log_exposure(url)

    def _log_exposure(self, url: str) -> None:
        """Say in one line who can reach this node, and warn when that is anyone, in clear."""
        c = self.config
        origins = ", ".join(c.allowed_origin) if c.allowed_origin else "any origin"
        log.info("exposure: %s, TLS %s, token %s, origins: %s",
                 url, "on" if self.tls else "off", "on" if c.token else "off", origins)
        if not ipaddress.ip_address(self.address[0]).is_loopback and not (self.tls or c.token):
            log.warning("listening beyond loopback with neither --token nor TLS: "
                        "anyone who can reach %s can join and read every message", url)

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
            conn.drop("shutdown timeout")
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
            with self._conns_changed:
                crowded = self._crowded_locked(addr[0])
            if crowded:
                # Before a thread or a protocol is spent on it: a flood costs an accept.
                log.info("refused %s: %s", peer, crowded)
                sock.close()
                continue
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
                self._opening.add(conn)
                self._opening_per_ip.add(conn.ip)
            try:
                threading.Thread(target=conn.run, name=f"conn-{peer}", daemon=True).start()
            except RuntimeError as exc:  # out of threads
                log.error("cannot serve %s: %s", peer, exc)
                self.forget(conn)
                transport.close()

    def _crowded_locked(self, ip: str) -> str | None:
        """Why a new connection from ``ip`` cannot even start its handshake, if it cannot."""
        assert self._conns_changed._is_owned()
        if len(self._opening) >= self.max_opening:
            return "too many connections in their opening handshake"
        per_ip = self.config.max_handshakes_per_ip
        if per_ip and self._opening_per_ip[ip] >= per_ip:
            return "too many connections in their opening handshake from this address"
        return None

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
        limit_per_ip = self.config.max_connections_per_ip
        try:
            if handshake.request_target(request.path, request.headers).path == HEALTH_PATH:
                return self._health(protocol)
            admission = handshake.admit(request.path, request.headers, self.policy)
            if self._full():
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
            c = self.config
            response.headers[LIMITS_HEADER] = limits_header(c.max_message_size, c.rate_limit, c.rate_burst)
            response.headers[ONLINE_HEADER] = str(len(self.hub) + 1)  # counting the one joining
            conn.username = admission.username
            if admission.username is not None:
                conn.prefix = f"[{admission.username}] ".encode()
        else:
            # The library's reason names the header at fault and its value:
            # for a refused Origin, the origin itself.
            log.info("refused %s: %d %s", conn.peer, response.status_code, protocol.handshake_exc)
        return response

    def _full(self) -> bool:
        """No room for one more joined client; what /healthz and admission both go by."""
        return len(self._conns) - len(self._opening) >= self.max_joined

    def _health(self, protocol):
        """For load balancers: 503 takes a node cut off from Redis out of rotation."""
        state = self.bus.state
        body = {"connections": len(self.hub), "node": self.node_id, "redis": state}
        healthy = state in ("ok", "off") and not self._full()
        response = protocol.reject(200 if healthy else 503, json.dumps(body) + "\n")
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    def arrive(self, conn: Connection, response: list[bytes]) -> None:
        """Join the hub as the 101 ``response`` is queued; called under ``conn.lock``."""
        conn.joined = True
        with self._conns_changed:
            self._opened_locked(conn)
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
            if conn in self._opening:
                self._opened_locked(conn)
            self._conns_changed.notify_all()

    def _opened_locked(self, conn: Connection) -> None:
        """``conn`` no longer counts against the handshake limits (joined or gone)."""
        assert self._conns_changed._is_owned()
        self._opening.remove(conn)
        self._opening_per_ip.remove(conn.ip)

    def relay(self, conn: Connection, opcode, payload: bytes) -> int | None:
        """A whole message arrived: attribute it and send it to everyone.

        Returns what ``bus.settle`` takes to wait for the sender's own copy,
        or None when it is already in the sender's outbox.
        """
        if opcode is Opcode.TEXT and conn.prefix:
            payload = conn.prefix + payload
        return self.bus.publish(opcode, payload)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False  # a name: bound as IPv4


def _connection_caps(config) -> tuple[int, int]:
    """How many connections may be opening and joined at once, within the open-files limit.

    Past the limit accept() fails and the acceptor can do nothing but retry,
    so we stop short of it: joined clients beyond it get 503, opening ones
    beyond theirs are closed at accept.
    """
    fds = max(2, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE)
    max_opening = max(1, fds // OPENING_FD_SHARE)
    if config.max_handshakes:
        max_opening = min(max_opening, config.max_handshakes)
    max_joined = fds - max_opening
    if config.max_connections > max_joined:
        log.warning("--max-connections %d is more than the open-files limit allows; "
                    "admitting at most %d (raise ulimit -n for more)", config.max_connections, max_joined)
    else:
        max_joined = config.max_connections
    return max_opening, max_joined


def _raise_open_file_limit() -> None:
    """Each client is a file descriptor; take all the kernel allows us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    config = parse_server_args(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(message)s")
    logs.install()
    # websockets logs every open and close at INFO; ours already does, once.
    logging.getLogger("broadcast.wire").setLevel(max(logging.WARNING, logging.getLevelName(config.log_level)))
    for warning in config.config_warnings:
        log.warning("%s", warning)
    _raise_open_file_limit()
    threading.stack_size(THREAD_STACK_BYTES)

    try:
        server = Server(config)
    except OSError as exc:
        log.error("cannot load TLS certificate %s: %s", config.certfile, exc)
        return 2
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            # A second signal: the operator does not want to wait.
            log.warning("received %s again, exiting without waiting for clients", name)
            os._exit(1)
        stop.set()
        log.info("received %s, shutting down", name)

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


if __name__ == "__main__":
    sys.exit(main())
