"""Bind, accept, and keep the set of connections: the limits that hold before any thread is spent.

The acceptor refuses a connection that would pass the handshake caps at
accept, so that a flood costs an accept and no more. Where admitting
cannot wait on the network, it also answers a request that is in already
(``Connection.open_now``), before the connection's thread starts. ``_lock`` (a
Condition, so that shutdown can wait for the set to empty) guards
``_conns``, ``_per_ip``, ``_opening``, ``_opening_per_ip``, ``_stopping`` and
``_before``.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import resource
import socket
import threading
import time
from _thread import start_new_thread

from websockets.frames import CloseCode

from ..config import ServerConfig
from .app import Application, Refused
from .connection import Connection
from .http import Routes
from .limits import AddressCounts, ByteBudget, limits_header
from .meter import Meter, Traffic
from .outbox import WriterPool
from .ticker import Ticker
from .tls import TLSTransport
from .transport import PlainTransport

log = logging.getLogger(__name__)

# Pending connections the kernel may hold for us; a burst of clients waits
# there instead of being refused (Linux caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096
# Writers are mostly in send(), which releases the GIL; two keep the socket
# layer busy while a reader parses, more only add contention.
WRITER_THREADS = 2
# After accept() fails for lack of file descriptors, wait this long before
# trying again rather than spinning on the error.
ACCEPT_BACKOFF_S = 0.1
# File descriptors kept out of the clients' share: the listener, stdio,
# the writers' epoll and wake-up sockets, Redis connections, log files.
FD_RESERVE = 64
# Connections still in their opening handshake may take at most this share
# of the descriptors, so that they can never crowd out joined clients.
OPENING_FD_SHARE = 4
# At shutdown, closing handshakes in flight at once. All at once, thousands
# of readers woke together to the clients' replies and fought over the GIL:
# 19,000 clients took 21 s against a 5 s --shutdown-timeout, and 31 of them
# closed cleanly. In waves of this size the same machine closes about 2,500
# a second.
SHUTDOWN_WAVE = 128
# Longest a wave waits for room: clients that never answer a close frame
# (they are cut at CLOSE_TIMEOUT_S) must not hold back everyone else's.
SHUTDOWN_WAVE_WAIT_S = 0.05


class Listener:
    def __init__(self, config: ServerConfig, app: Application, routes: Routes, tls, meter: Meter) -> None:
        self.config = config
        self.app = app
        self.meter = meter
        self.routes = routes
        self.tls = tls  # an ssl.SSLContext for wss://, or None
        # Browsers always send Origin, so a missing one (None) is a non-browser
        # client, which cross-site hijacking cannot use.
        self.origins = [*config.allowed_origin, None] if config.allowed_origin else None
        self.limits = limits_header(config.max_message_size, config.rate_limit, config.rate_burst)
        self.writers = WriterPool(WRITER_THREADS)
        self.ticker = Ticker(config)
        # The acceptor answers requests that are in already (Connection.open_now):
        # not over TLS, whose handshake takes round trips, nor when admitting waits on Redis.
        self._answer_here = app.answers_at_once and tls is None
        self.budget = ByteBudget(config.max_pending_bytes)
        self.max_opening, self.max_joined = _connection_caps(config)
        self._lock = threading.Condition()
        self._conns: set[Connection] = set()  # accepted, handshaking or joined
        self._per_ip = AddressCounts()  # of _conns
        self._opening: set[Connection] = set()  # those of _conns that have not joined (yet)
        self._opening_per_ip = AddressCounts()
        self._stopping = False
        # What connections since forgotten tallied (frames delivered, bytes
        # received, messages): a counter never goes down.
        self._before = _Tallies()
        self._ids = itertools.count(1)  # next() is atomic: connection ids never repeat
        self._socket: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        self.ipv6 = _is_ipv6(config.host)

    # Main thread.

    def listen(self) -> None:
        """Bind and listen; raises OSError (port in use, bad host).

        An IPv6 literal listens on IPv6, ``::`` on IPv4 too where the OS
        allows; anything else (a name included) binds IPv4, as before.
        """
        host = self.config.host
        ipv6 = self.ipv6
        sock = socket.create_server(
            (host, self.config.port), backlog=LISTEN_BACKLOG,
            family=socket.AF_INET6 if ipv6 else socket.AF_INET,
            dualstack_ipv6=ipv6 and ipaddress.ip_address(host).is_unspecified and socket.has_dualstack_ipv6(),
        )
        self._socket = sock
        self.address = sock.getsockname()[:2]

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="acceptor", daemon=True).start()
        self.ticker.start()

    def shutdown(self, deadline: float) -> None:
        """Stop accepting, close every client with 1001 after what it is owed, wait until ``deadline``."""
        with self._lock:
            self._stopping = True
            conns = tuple(self._conns)
        try:
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._socket.close()
        log.info("shutting down: closing %d connection(s)", len(conns))
        self._close_in_waves(conns, deadline)
        with self._lock:
            self._lock.wait_for(lambda: not self._conns, deadline - time.monotonic())
            left = tuple(self._conns)
        for conn in left:
            conn.drop("shutdown timeout")
        if left:
            log.warning("shutdown timeout: dropped %d connection(s)", len(left))

    def _close_in_waves(self, conns: tuple[Connection, ...], deadline: float) -> None:
        """Close ``conns`` with 1001, about SHUTDOWN_WAVE in flight at a time, until ``deadline``.

        No connection is added once stopping, so those of ``conns`` still
        here are ``len(_conns)``: in flight are the started ones among them.
        A wave that finds no room within SHUTDOWN_WAVE_WAIT_S starts anyway:
        what holds the room then is clients that do not answer, and they
        wake no reader.
        """
        started = 0

        def in_flight() -> int:
            assert self._lock._is_owned()
            return started - (len(conns) - len(self._conns))

        while started < len(conns):
            with self._lock:
                wait = min(SHUTDOWN_WAVE_WAIT_S, deadline - time.monotonic())
                if wait <= 0:
                    return
                roomy = self._lock.wait_for(lambda: in_flight() < SHUTDOWN_WAVE, wait)
                room = SHUTDOWN_WAVE - in_flight() if roomy else SHUTDOWN_WAVE
            for conn in conns[started:started + room]:
                conn.close(CloseCode.GOING_AWAY, "server shutting down")
            started += room

    # Acceptor thread.

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self._socket.accept()
            except OSError as exc:
                if self._stopping:
                    return
                log.error("accept failed: %s", exc, extra={"event": "error"})
                time.sleep(ACCEPT_BACKOFF_S)
                continue
            peer = f"{addr[0]}:{addr[1]}"
            with self._lock:
                crowded = self._crowded_locked(addr[0])
            if crowded:
                # Before a thread or a protocol is spent on it: a flood costs an accept.
                log.info("refused %s: %s", peer, crowded,
                         extra={"event": "refused", "peer": peer, "reason": crowded})
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                transport = TLSTransport(sock, peer, self.tls)
            else:
                transport = PlainTransport(sock, peer)
            conn = Connection(self, next(self._ids), transport, addr[0], peer)
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                self._conns.add(conn)
                self._per_ip.add(conn.ip)
                self._opening.add(conn)
                self._opening_per_ip.add(conn.ip)
            self.ticker.watch(conn)  # its opening deadline
            if self._answer_here:
                try:
                    conn.open_now()
                except Exception:
                    log.exception("error on connection from %s", peer, extra={"event": "error", "peer": peer})
                    conn.abort("error")  # its thread finds the socket shut and cleans up
            try:
                # A bare thread, not a threading.Thread: Thread.start() waits until
                # the new thread runs, which serialised every connect on a GIL
                # hand-off, and its Thread, Event and Condition cost ~2.5 KiB a client.
                start_new_thread(conn.run, ())
            except RuntimeError as exc:  # out of threads
                log.error("cannot serve %s: %s", peer, exc, extra={"event": "error", "peer": peer})
                conn.give_up("out of threads")

    def _crowded_locked(self, ip: str) -> str | None:
        """Why a new connection from ``ip`` cannot even start its handshake, if it cannot."""
        assert self._lock._is_owned()
        if len(self._opening) >= self.max_opening:
            return "too many connections in their opening handshake"
        per_ip = self.config.max_handshakes_per_ip
        if per_ip and self._opening_per_ip[ip] >= per_ip:
            return "too many connections in their opening handshake from this address"
        return None

    # Any thread.

    def traffic(self) -> Traffic:
        """For the metrics, when scraped: a walk over every connection, without their locks."""
        with self._lock:
            conns = tuple(self._conns)
            opening = len(self._opening)
            total = self._before.copy()
            for conn in conns:
                total.add(conn)
        queued = sum(conn.outbox.queued + len(conn.outbox.head) for conn in conns)
        return Traffic(len(conns) - opening, opening, queued, total.delivered, self.writers.sent_bytes(),
                       total.received_bytes, total.messages)

    def full(self) -> bool:
        """No room for one more joined client; what /healthz and admission both go by."""
        with self._lock:
            return self._full_locked()

    def _full_locked(self) -> bool:
        assert self._lock._is_owned()
        return len(self._conns) - len(self._opening) >= self.max_joined

    # Connections' reader threads.

    def check_capacity(self, conn: Connection) -> None:
        """Raise Refused when the server, or ``conn``'s address, has no room for one more client."""
        limit_per_ip = self.config.max_connections_per_ip
        with self._lock:
            if self._full_locked():
                raise Refused(503, "server full, try again later")
            if limit_per_ip and self._per_ip[conn.ip] > limit_per_ip:
                raise Refused(429, "too many connections from your address")

    def opened(self, conn: Connection) -> None:
        """``conn`` joined: it no longer counts against the handshake limits."""
        with self._lock:
            self._opened_locked(conn)

    def forget(self, conn: Connection) -> None:
        self.ticker.forget(conn)
        with self._lock:
            self._conns.remove(conn)
            self._before.add(conn)  # released: it tallies no more
            self._per_ip.remove(conn.ip)
            if conn in self._opening:
                self._opened_locked(conn)
            self._lock.notify_all()

    def _opened_locked(self, conn: Connection) -> None:
        assert self._lock._is_owned()
        self._opening.remove(conn)
        self._opening_per_ip.remove(conn.ip)


class _Tallies:
    """Running totals of connections' tallies: of those gone, under the listener's lock, and at a scrape."""

    __slots__ = ("delivered", "messages", "received_bytes")

    def __init__(self) -> None:
        self.delivered = self.received_bytes = self.messages = 0

    def copy(self) -> _Tallies:
        tallies = _Tallies()
        tallies.delivered, tallies.received_bytes, tallies.messages = self.delivered, self.received_bytes, self.messages
        return tallies

    def add(self, conn: Connection) -> None:
        self.delivered += conn.outbox.frames
        self.received_bytes += conn.received_bytes
        self.messages += conn.messages


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False  # a name: bound as IPv4


def _connection_caps(config: ServerConfig) -> tuple[int, int]:
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
