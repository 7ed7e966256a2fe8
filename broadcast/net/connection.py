"""One client connection: its reader thread, driving websockets' Sans-I/O protocol.

The reader is gorilla's readPump: the only thread that reads this socket and
feeds ``ServerProtocol``, but for a request that is in already when the
connection is accepted, which the acceptor may answer (``open_now``) before
the reader starts, as gorilla's HTTP handler upgrades before it starts the
pumps. Other threads (the ticker's keepalive, eviction,
shutdown) may also ask the protocol to send a ping or a close; ``lock``
serialises all use of the protocol object and keeps its output in order in
the outbox. Data frames to the client never pass through the protocol: a
room shares one encoded frame among all its members.

The connection owns its fields; the application gets only the ``Member``
port (net/app.py) and keeps its own state in ``session``.

Field           | threads that touch it                             | lock
----------------|---------------------------------------------------|------------------------------
protocol        | reader; ticker (ping, fail); any (close, evict)   | lock; but the reader reads its own
                |                                                   | parse buffer's size (_hold) outside
outbox          | reader, ticker, rooms' publishers, writer         | outbox.lock; put_control (protocol
                |                                                   | output) also under lock, put not
joined          | reader writes; ticker reads                       | lock for writes; the ticker's
                |                                                   | unlocked read is at most a tick stale
session, label, | reader writes once, before the member is shared;  | lock (written once)
subprotocol     | any reads after                                   |
why,            | reader, ticker (open timeout), shutdown,          | lock for writes; a read without it
close_code,     | evicting publishers                               | sees one whole string or another
close_class     |                                                   |
_ping           | reader (pong) and ticker (ping) write             | lock for writes; the ticker's
                |                                                   | unlocked read is at most a tick stale
_ping_at        | ticker                                            | lock (written with _ping)
_close_by       | reader, ticker, shutdown write; ticker reads      | lock for writes; as _ping for reads
_open_by        | set at accept; reader clears it on joining;       | lock for the write; as _ping for
                | ticker reads                                      | reads
_response       | reader writes; accept() (inside app.opened) reads | lock
_partial, _opcode, _held, _unechoed, _bucket | reader only          | none
_answered, _early | reader only                             | none
received_bytes, | reader writes; a metrics scrape reads            | none: one writer, and a read sees
messages        |                                                   | one whole int or the next
ticker_entry    | the ticker, and whoever calls _watch             | the ticker's lock

Where a row says reader, the acceptor may stand in for it, in ``open_now``,
before the reader's thread starts: starting the thread orders the two.

Lock order, outermost first: ``conn.lock`` -> the room's lock -> ``outbox.lock``
-> the TLS lock; ``conn.lock`` -> the listener's lock; the ticker's lock
under any of them, as a leaf. No code takes an
outer lock while holding an inner one: a room evicts its slow members after
releasing its lock, because eviction takes ``conn.lock``.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import OPEN, SEND_EOF

from .app import Refused, request_target
from .http import refusal, respond, route
from .limits import LIMITS_HEADER, TokenBucket, give_back_memory
from .outbox import Outbox
from .protocol import BroadcastProtocol
from .stack import give_back_stack
from .transport import Transport

log = logging.getLogger(__name__)
# websockets' own log of each connection; quieter than ours (see server.main).
WIRE_LOG = logging.getLogger(__name__ + ".wire")

_TEXT, _BINARY, _CONT, _PONG, _CLOSE = (
    Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG, Opcode.CLOSE)

# How long we wait for the peer to finish a closing handshake (or to read a
# rejection) before dropping the TCP connection; a well-behaved client needs
# one round trip.
CLOSE_TIMEOUT_S = 5.0
# An evicted slow consumer's socket is full, so its close frame rarely gets
# through; it gets this long to take it before the connection is dropped.
EVICT_GRACE_S = 1.0
# Requests bigger than this are refused before they are parsed further: the
# HTTP parser bounds each line (8 KiB) and the header count, not the total.
MAX_HANDSHAKE_BYTES = 64 * 1024
# Why a connection ended when nothing more precise is known: the peer went away.
CONNECTION_LOST = "connection lost"
# The refusal lines of a connection cut before any answer: the ticker's
# --open-timeout, and a TLS handshake that failed (or that it cut short).
OPEN_TIMED_OUT = "opening handshake timed out"
TLS_FAILED = "TLS handshake failed or timed out"
# A connection that lets go of this much of an unfinished message (it left,
# or was refused) asks the allocator to return free memory to the OS: glibc
# keeps freed heap, so 500 such leavers would leave us hundreds of MiB bigger.
TRIM_AFTER_BYTES = 64 * 1024
# The close class (net/meter.py) of each reason we close or drop a client
# for; a reason not listed here is "server".
_CLOSE_CLASSES = {
    "slow consumer": "slow_consumer",
    "rate limit exceeded": "rate_limit",
    "keepalive ping timeout": "keepalive",
    "server busy: too many unfinished messages": "busy",
    "server shutting down": "shutdown",
    CONNECTION_LOST: "lost",
    "write timeout": "write_timeout",
    "shutdown timeout": "shutdown_timeout",
}


class Connection:
    """One client; implements the ``Member`` port (net/app.py) for the rooms it joins."""

    def __init__(self, listener, id: int, transport: Transport, ip: str, peer: str) -> None:
        config = listener.config
        self._listener = listener  # the owner of the connection set, limits and budget
        self._app = listener.app
        self._meter = listener.meter
        self.id = id
        self.transport = transport
        self.ip = ip
        self.peer = peer
        self.lock = threading.Lock()
        self.protocol = BroadcastProtocol(
            origins=listener.origins,
            subprotocols=list(self._app.subprotocols),
            max_size=config.max_message_size or None,
            logger=WIRE_LOG,
        )
        self._ticker = listener.ticker
        # The ticker's entry for this connection (net/ticker.py), under its lock.
        self.ticker_entry: list | tuple | None = None
        self.outbox = outbox = Outbox(transport, listener.writers.pick(), config.send_queue_bytes,
                                      on_block=self._watch if config.write_timeout else None)
        # The port's queries are the outbox's bound methods: a fan-out costs
        # one call per member, as when rooms reached into the outbox.
        self.send = outbox.put
        self.follow = outbox.follow
        self.check = outbox.check
        self.behind = outbox.over
        self.wait_sent = outbox.wait
        self.stalled = outbox.stalled
        self.session: object = None  # the application's, from its Admit
        self.subprotocol: str | None = None  # negotiated in the 101, written with session
        self.label = f"anonymous@{peer}"  # for log lines; the application names it at admission
        self.joined = False
        self._response: list[bytes] = []  # the 101, until accept() queues it
        # Tallies for the metrics, summed when scraped (Listener.traffic): a
        # counter shared by every reader took a lock per read, and when
        # thousands of clients dropped at once, their readers queued on it.
        self.received_bytes = 0  # read from the socket: until answered, all of it the opening request
        self.messages = 0  # whole messages, within the rate limit
        self._answered = False  # the request got its 101 or a refusal
        self._early: list[Frame] | None = None  # frames behind the request, once it got its 101
        self._bucket = TokenBucket(config.rate_limit, config.rate_burst) if config.rate_limit else None
        self.why = CONNECTION_LOST  # for the disconnect log line
        # The same, for the metrics and the JSON log: the close code (1006 if
        # none was exchanged) and its class, never the client's text.
        self.close_code = CloseCode.ABNORMAL_CLOSURE
        self.close_class = _CLOSE_CLASSES[CONNECTION_LOST]
        # Message being reassembled from fragments (already checked by the
        # protocol), in one buffer: a list of parts costs ~70 bytes a fragment.
        self._partial = bytearray()
        self._opcode = None
        self._held = 0  # bytes of unfinished messages counted in the listener's budget
        # The bus's handle on this client's last message while it may still
        # be on its way back to the client (round Redis); see _settle.
        self._unechoed = None
        # Keepalive, opening and closing deadlines, read by the ticker; one
        # made sooner is told to it (_watch). The
        # ticker, not a socket timeout, ends an opening handshake that runs
        # out of time: a timeout costs two system calls to set and clear and
        # a poll() before every read, each a hand-off of the GIL while
        # hundreds of clients dial at once.
        self._ping: bytes | None = None
        self._ping_at = now = time.monotonic()
        self._close_by: float | None = None
        self._open_by = now + config.open_timeout if config.open_timeout else None

    # Acceptor thread, before the reader's exists.

    def open_now(self) -> None:
        """Answer the opening handshake now if the whole request is in already; else leave it to the reader.

        The acceptor calls it only when the application answers without
        waiting on the network. A request is usually in by the time its
        connection is accepted, and answered here it costs no thread a turn
        at the GIL to parse it. What came in of a request not yet whole
        stays in the protocol, for the reader to go on from.
        """
        data = self.transport.recv_ready()
        if data:
            self._answered = self._take(data)

    def give_up(self, why: str) -> None:
        """No thread could be started for it: hang up now, leaving its room if it joined one."""
        self.abort(why)
        self._leave()
        if not self.outbox.hang_up():
            self.outbox.release()  # the writer closes the socket
        self._listener.forget(self)

    # Reader thread.

    def run(self) -> None:
        try:
            if self._answered or self._open():
                early = self._early
                if early is None:
                    # Refused: keep reading until the client hangs up, so that it
                    # gets the response rather than a reset; the open timeout bounds this.
                    self._read_loop()
                else:
                    self._handle(early)
                    with self.lock:
                        self._push_locked()  # the early frames' pongs or close, after their messages
                        # A close behind the request was answered just now: the server hangs up first.
                        closed = self.protocol.close_rcvd is not None
                    if not closed:
                        self._read_loop()
        except Exception:
            log.exception("error on connection from %s", self.peer, extra={"event": "error", "peer": self.peer})
        finally:
            self._leave()
            self._let_go()
            if not self.outbox.hang_up():
                # What the client is still owed (a close frame, the echo of its
                # last message) goes out before the socket does, within bounds.
                self.outbox.drain(CLOSE_TIMEOUT_S)
                self.outbox.release()
            self._listener.forget(self)

    def _open(self) -> bool:
        """Read the request until it is answered; False if the client left, or the ticker cut it, first."""
        if not self.transport.handshake():
            log.info("refused %s: %s", self.peer, TLS_FAILED,
                     extra={"event": "refused", "peer": self.peer, "reason": TLS_FAILED})
            return False
        while True:
            data = self.transport.recv()
            if not data:
                if self.why is OPEN_TIMED_OUT:  # the ticker's, not a client that went away
                    log.info("refused %s: %s", self.peer, OPEN_TIMED_OUT,
                             extra={"event": "refused", "peer": self.peer, "reason": OPEN_TIMED_OUT})
                return False
            if self._take(data):
                give_back_stack()  # the handshake went deeper than the reads will
                return True

    def _take(self, data: bytes) -> bool:
        """Take ``data`` of the opening request; True once it is answered, with the 101 or a refusal.

        Once answered, ``_early`` holds the frames a hasty client sent right
        behind its request (parsed with it), or None if it did not open.
        """
        self.received_bytes += len(data)
        with self.lock:
            if self.received_bytes > MAX_HANDSHAKE_BYTES:
                self._refuse_locked(Refused(431, "request headers too large"))
                return True
            self.protocol.receive_data(data)
            events = self.protocol.events_received()
            if not events:
                if self.protocol.close_expected():
                    self._refuse_malformed_locked()
                    return True
                return False
            response = self._answer_locked(events[0])  # frames behind the request wait for the response
            self.protocol.send_response(response)
            if response.status_code != 101:
                self._push_locked()
                return True
            early = self._early_frames_locked()
        if self.joined:
            self._app.ready(self)
            self._early = early
        return True

    def _answer_locked(self, request):
        """Answer the opening handshake: a plain HTTP route, a refusal, or the 101."""
        assert self.lock.locked()
        protocol = self.protocol
        try:
            target = request_target(request.path, request.headers)
            handler = route(self._listener.routes, target.path)
            if handler is not None:
                return respond(handler(request))  # a route may raise Refused too
            verdict = self._app.admit(request, self.peer)
            if isinstance(verdict, Refused):
                raise verdict
            try:
                self._listener.check_capacity(self)
            except Refused:
                self._app.abandon(verdict.session)
                raise
        except Refused as refused:
            self._log_refused(int(refused.status), refused.reason)
            return refusal(refused)
        response = protocol.accept(request)
        if response.status_code == 101:
            response.headers[LIMITS_HEADER] = self._listener.limits
            for name, value in verdict.headers:
                response.headers[name] = value
            self.session = verdict.session
            self.subprotocol = protocol.subprotocol
            self.label = verdict.label
        else:
            self._app.abandon(verdict.session)
            # The library's reason names the header at fault and its value:
            # for a refused Origin, the origin itself.
            self._log_refused(response.status_code, str(protocol.handshake_exc))
        return response

    def _log_refused(self, status: int, reason: str) -> None:
        """One line and one count for a WebSocket request answered with ``status``."""
        self._meter.refused(status)
        log.info("refused %s: %d %s", self.peer, status, reason,
                 extra={"event": "refused", "peer": self.peer, "status": status, "reason": reason})

    def _early_frames_locked(self) -> list[Frame]:
        """Parse what came right behind the request, and join unless it failed the connection.

        The 101 is taken before the frames are parsed, so a pong owed to an
        early ping follows it. A client whose first frames are invalid gets
        the 101 and its close, and never joins: nobody hears of it.
        """
        assert self.lock.locked()
        protocol = self.protocol
        response = protocol.data_to_send()
        protocol.receive_data(b"")  # resume the parser held by _FramesAfterResponse
        early = protocol.events_received()
        if protocol.state is not OPEN and protocol.close_rcvd is None:
            log.info("refused %s: closed by server: %s", self.peer, protocol.close_sent,
                     extra={"event": "refused", "peer": self.peer, "code": protocol.close_sent.code,
                            "reason": "protocol"})
            self._app.abandon(self.session)
            self.outbox.put_control(response, closing=True)
            self._push_locked()
            return []
        # Joined in the same step as the 101 is queued (accept(), called by
        # the room under its lock): nothing broadcast after the client sees
        # 101 can pass it by.
        self.joined = True
        self._open_by = None
        self._watch()  # keepalive from now on
        self._listener.opened(self)
        self._response = response
        self._app.opened(self)
        return early

    def accept(self) -> None:
        """Queue the 101; the room calls it under its lock, inside app.opened, inside ``lock``."""
        assert self.lock.locked()
        self.outbox.put_first(self._response)
        self._response = []

    def _refuse_malformed_locked(self) -> None:
        """The parser gave up on the request; say why, to the log and to the client."""
        assert self.lock.locked()
        problem = self.protocol.handshake_exc
        writes = self.protocol.data_to_send()
        if writes == [SEND_EOF]:  # no response, unlike a too-long line's 414 or 431
            writes.insert(0, refusal(Refused(400, "malformed HTTP request")).serialize())
        status = int(writes[0].split(b" ", 2)[1])  # the library's "HTTP/1.1 414 ...", or ours
        self._meter.refused(status)
        log.info("refused %s: malformed request: %s", self.peer, problem.__cause__ or problem,
                 extra={"event": "refused", "peer": self.peer, "status": status, "reason": "malformed request"})
        self.outbox.put_control(writes, closing=True)
        self._push_locked()  # nothing left to move: it sets the close deadline

    def _refuse_locked(self, refused: Refused) -> None:
        assert self.lock.locked()
        self._meter.refused(refused.status)
        self.protocol.send_response(refusal(refused))
        self._push_locked()

    def _read_loop(self) -> None:
        protocol = self.protocol
        while True:
            data = self.transport.recv()
            self.received_bytes += len(data)
            with self.lock:
                if data:
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()
                events = protocol.events_received()
                owed = bool(protocol.writes)  # replies to this read's last frames
            self._handle(events)
            self._hold(len(self._partial) + len(protocol.reader.buffer))
            if owed:
                self._settle()  # they follow the sender's own last message
            if self.session is not None:  # the application's backpressure is for whom it admitted
                self._app.wait_writers(self)
            with self.lock:
                # After relaying: a message that came with a close frame is
                # echoed to its sender before the close is answered.
                self._push_locked()
                done = protocol.close_rcvd is not None and protocol.close_sent is not None
            if not data or done:
                return  # the closing handshake is complete: the server hangs up first

    def _handle(self, events: list) -> None:
        """Frames, and the protocol's replies owed before the next one (see BroadcastProtocol)."""
        for event in events:
            if type(event) is list:
                self._settle()
                with self.lock:  # pongs only: a close ends the read
                    queued = self.outbox.put_control(event, closing=False)
                    if not queued:
                        self._evict_locked()  # it pings without reading: a slow consumer
                if not queued:
                    break
            elif not self._on_frame(event):
                break

    def _settle(self) -> None:
        """Wait (bounded) until the client's own last message is in its outbox.

        Round Redis, the echo comes back on another thread; what the
        protocol answers next (a pong, the close reply) must follow it,
        and a client leaving its room would miss it.
        """
        if self._unechoed is not None:
            self._app.settle(self._unechoed)
            self._unechoed = None

    def _on_frame(self, frame: Frame) -> bool:
        """Handle one incoming frame; False once the connection has failed."""
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if frame.fin:
                return self._deliver(opcode, frame.data)
            self._opcode = opcode
            self._partial += frame.data
        elif opcode is _CONT:
            self._partial += frame.data
            if frame.fin:
                payload = bytes(self._partial)
                self._partial = bytearray()
                return self._deliver(self._opcode, payload)
        elif opcode is _PONG:
            with self.lock:
                if frame.data == self._ping:
                    self._ping = None
                    self._watch()  # the next ping may be due before the ticker looks
        elif opcode is _CLOSE:
            with self.lock:
                if self.protocol.close_rcvd_then_sent:
                    self.why = f"closed by client: {self.protocol.close_rcvd}"
                    self.close_code, self.close_class = self.protocol.close_rcvd.code, "client"
            self._settle()
            self._leave()  # before the close is answered: once it is, the client is gone
        return True

    def _leave(self) -> None:
        """Leave the room once: the reader and a shutdown that gave up on it may race here."""
        with self.lock:
            joined, self.joined = self.joined, False
            sent = self.protocol.close_sent
            if joined and self.why == CONNECTION_LOST and sent is not None:
                # The library's parser closed on its own (1002, 1007, 1009).
                self.why = f"closed by server: {sent}"
                self.close_code, self.close_class = sent.code, "protocol"
        if joined:
            self._meter.closed(self.close_code, self.close_class)
            self._app.closed(self, self.why)

    def _hold(self, held: int) -> None:
        """Count what this connection holds of unfinished messages in the server's budget.

        Past the budget it is refused with 1013 and what it held is let go;
        everyone else keeps chatting.
        """
        if held == self._held:
            return
        budget = self._listener.budget
        if budget.take(held - self._held):
            self._held = held
            return
        self.fail(CloseCode.TRY_AGAIN_LATER, "server busy: too many unfinished messages")
        self._let_go()

    def _let_go(self) -> None:
        """Free the unfinished message, for good (refused or gone); a big one goes back to the OS."""
        held = self._held
        self._partial = bytearray()
        self._hold(0)
        if held >= TRIM_AFTER_BYTES:
            give_back_memory()

    def _deliver(self, opcode, payload: bytes) -> bool:
        if self._bucket is not None and not self._bucket.take():
            self.fail(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
            return False
        self.messages += 1
        self._unechoed = self._app.message(self, opcode, payload)
        return True

    # Any thread.

    def _push_locked(self) -> None:
        """Move protocol output to the outbox, in order; caller holds ``lock``."""
        assert self.lock.locked()
        protocol = self.protocol
        writes = protocol.data_to_send()
        if writes and not self.outbox.put_control(writes, closing=protocol.state is not OPEN):
            self._evict_locked()
        if self._close_by is None and protocol.close_expected():
            self._close_by = time.monotonic() + CLOSE_TIMEOUT_S
            self._watch()

    def close(self, code: int, reason: str) -> None:
        """Start a closing handshake after the messages already queued."""
        with self.lock:
            if self.protocol.state is OPEN:
                self.why = f"closed by server: {code} {reason}"
                self.close_code, self.close_class = code, _CLOSE_CLASSES.get(reason, "server")
                self.protocol.send_close(code, reason)
                self._push_locked()
            elif self._close_by is None:
                self._close_by = time.monotonic()  # never opened: just drop it
                self._watch()

    def fail(self, code: int, reason: str) -> None:
        """Close at once with ``code``; a closing handshake already under way wins."""
        with self.lock:
            self._fail_locked(code, reason)

    def _fail_locked(self, code: int, reason: str) -> None:
        assert self.lock.locked()
        if self.protocol.state is not OPEN:
            return
        self.why = f"failed: {code} {reason}"
        self.close_code, self.close_class = code, _CLOSE_CLASSES.get(reason, "server")
        log.warning("closing %s: %d %s", self.label, code, reason,
                    extra={"event": "closing", "peer": self.peer, "code": int(code), "reason": self.close_class})
        self.protocol.fail(code, reason)
        self._push_locked()

    def evict(self) -> None:
        """The outbox overflowed and dropped its backlog; say why and go."""
        with self.lock:
            self._evict_locked()

    def _evict_locked(self) -> None:
        assert self.lock.locked()
        if self.protocol.state is OPEN:  # once: a closing connection is past evicting
            self._meter.evicted()
        self._fail_locked(CloseCode.POLICY_VIOLATION, "slow consumer")
        grace = time.monotonic() + EVICT_GRACE_S
        if self._close_by is not None and grace < self._close_by:
            self._close_by = grace
            self._watch()

    def abort(self, why: str) -> None:
        """Hang up with no closing handshake, for ``why``."""
        self._ended_without_close(why)
        self.transport.abort()

    def _ended_without_close(self, why: str) -> None:
        """Record ``why`` the connection ends with no close frame exchanged (1006), for its disconnect line."""
        with self.lock:
            self.why = why
            self.close_code, self.close_class = CloseCode.ABNORMAL_CLOSURE, _CLOSE_CLASSES.get(why, "server")

    def drop(self, why: str) -> None:
        """Log the departure now, for ``why``: the process is exiting, and its exit closes the socket.

        The reader is left asleep: waking thousands of them at once, to be
        told what the exit does anyway, cost seconds past the deadline.
        """
        self._ended_without_close(why)
        self._leave()

    def _watch(self) -> None:
        """A deadline may have come sooner: have the ticker look by then."""
        self._ticker.watch(self)

    def next_check(self, ping_interval: float, ping_timeout: float, write_timeout: float) -> float | None:
        """When ``tick`` next has something to do, as things stand; None: nothing until they change.

        It reads what ``tick`` reads, the same way; whoever makes one of
        these times sooner calls ``_watch`` after.
        """
        close_by = self._close_by
        checks = [t for t in (self._open_by, close_by) if t is not None]
        if close_by is None:
            blocked_since = self.outbox.blocked_since
            if write_timeout and blocked_since is not None:
                checks.append(blocked_since + write_timeout)
            if ping_interval and self.joined:
                if self._ping is None:
                    checks.append(self._ping_at + ping_interval)
                elif ping_timeout:
                    checks.append(self._ping_at + ping_timeout)
        return min(checks, default=None)

    def tick(self, now: float, ping_interval: float, ping_timeout: float, write_timeout: float) -> None:
        """Enforce deadlines; called by the ticker thread, when ``next_check`` said."""
        if self._open_by is not None and now >= self._open_by:
            with self.lock:
                self.why = OPEN_TIMED_OUT  # for the reader's refusal line
            self.transport.abort()  # the opening handshake ran out of time, wherever it is
            return
        if self._close_by is not None:
            if now >= self._close_by:
                self.transport.abort()  # why it closes was said when the close began
            return
        blocked_since = self.outbox.blocked_since
        if write_timeout and blocked_since is not None and now - blocked_since > write_timeout:
            log.warning("dropping %s: nothing written for %.1f s", self.label, now - blocked_since)
            self.abort("write timeout")
            with self.lock:
                self._close_by = now  # dropped once: later ticks only repeat the abort
            return
        if not ping_interval or not self.joined:
            return
        if self._ping is None:
            if now - self._ping_at >= ping_interval:
                with self.lock:
                    if self.protocol.state is OPEN:
                        self._ping = os.urandom(4)
                        self._ping_at = now
                        self.protocol.send_ping(self._ping)
                        self._push_locked()
        elif ping_timeout and now - self._ping_at > ping_timeout:
            with self.lock:
                self._fail_locked(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                # The peer is presumably gone: give the writer one tick to put the
                # close frame on the wire, then hang up without waiting for an answer.
                self._close_by = now
