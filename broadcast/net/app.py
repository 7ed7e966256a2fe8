"""The boundary between the engine and the application it serves.

Like websockets' ``process_request`` and ``handler``, the policy comes in as
calls the engine makes (``Application``), and the application reaches a
joined connection only through a narrow port (``Member``), as gorilla's hub
reaches a client only through its send channel. Neither writes the other's
fields: the application keeps its per-connection state in its own object
(``Admit.session``), which the engine stores and hands back, unread.

The ``Feed`` a room broadcasts through is here too: the room appends to it,
the engine's outboxes read it. Both sides may import this module, and chat/
and bus/ import nothing else of net/.
"""

from __future__ import annotations

import http
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import SplitResult, urlsplit

# What Member.send tells a room (falsy when all is well: the room's loop tests it).
QUEUED = 0
BEHIND = 1  # over the bound while its socket takes data: the writers are behind, slow the publisher
EVICTED = 2  # over the bound with its socket stuck: a slow consumer, backlog dropped


class Refused(Exception):
    """The request is answered with ``status`` and ``reason`` instead of a WebSocket."""

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


@dataclass(frozen=True)
class Admit:
    """The application takes the connection: its state, its name in log lines, extra response headers."""

    session: object
    label: str
    headers: tuple[tuple[str, str], ...] = ()


def request_target(path: str, headers) -> SplitResult:
    """The parsed request target, once the request is one HTTP/1.1 can route; else Refused.

    A proxy routes on Host and a browser always sends exactly one: none, or
    two that a proxy and this server might read differently, is a 400
    (RFC 9112 3.2). Both sides route on it: the engine its plain HTTP
    routes, the application its WebSocket paths.
    """
    if len(headers.get_all("Host")) != 1:
        raise Refused(http.HTTPStatus.BAD_REQUEST, "exactly one Host header required")
    try:
        return urlsplit(path)
    except ValueError:  # "//[" reads as an unterminated IPv6 authority
        raise Refused(http.HTTPStatus.BAD_REQUEST, "malformed request target") from None


class Member(Protocol):
    """A joined connection, as a room sees it.

    A room's broadcast reaches it through the ``Feed`` (below) it
    ``follow``s: one append per message, however many follow; ``send`` is
    for frames to it alone. The calls are the outbox's own bound methods.
    """

    id: int  # stable for the process's life, unlike id(): what the bus names a sender by
    ip: str
    peer: str
    label: str  # who it is, for log lines: the application's Admit.label once admitted
    session: object  # the application's, from Admit
    subprotocol: str | None  # what the handshake negotiated of the application's ``subprotocols``
    close_code: int  # once it has left: the close code (1006 if none), for log fields
    close_class: str  # and why, as one of net.meter.CLOSE_CLASSES

    def send(self, frame: bytes) -> int:
        """Queue one encoded data frame: QUEUED, BEHIND or EVICTED (then call ``evict``, outside locks)."""

    def follow(self, feed, member: int) -> None:
        """Be sent what ``feed`` gets from now on, but frames that skip ``member`` (None: stop); under the room lock."""

    def check(self) -> int:
        """Where it stands against its bound, as ``send`` answers, for frames it got through its feed."""

    def accept(self) -> None:
        """Queue the handshake response; a room calls it under its lock as it adds the member."""

    def evict(self) -> None:
        """Close as a slow consumer (1008); takes the connection's lock."""

    def close(self, code: int, reason: str) -> None:
        """Start a closing handshake after the messages already queued."""

    def behind(self) -> bool:
        """Over its bound: the writers owe it more than it may be owed."""

    def wait_sent(self, timeout: float) -> bool:
        """Wait until back under its bound; False on timeout."""

    def stalled(self) -> bool:
        """Its socket has taken nothing for a while: waiting on it is pointless."""


class Application(Protocol):
    """What the engine calls, from a connection's reader thread (or, with ``answers_at_once``, the acceptor's)."""

    # Offered to clients in order of preference; one who asks for none of them gets none.
    subprotocols: tuple[str, ...]
    # Whether admit, opened and ready never wait on the network: then the
    # acceptor itself may answer a request that is in already (Connection.open_now).
    answers_at_once: bool

    def admit(self, request, peer: str) -> Admit | Refused:
        """Take or refuse a WebSocket request; under the connection's lock, so it must not block."""

    def abandon(self, session: object) -> None:
        """An admitted request will not open after all (a later refusal, a failed handshake)."""

    def opened(self, member: Member) -> None:
        """The 101 is due: join, calling ``member.accept()`` under the room's lock.

        Under the connection's lock, so that nothing the engine queues
        (an early pong, a keepalive ping) can pass the 101.
        """

    def ready(self, member: Member) -> None:
        """Joined, outside every lock: announce, which may wait on the bus."""

    def message(self, member: Member, opcode, payload: bytes) -> object | None:
        """A whole message arrived; returns what ``settle`` takes, or None if nothing is in flight."""

    def settle(self, pending: object) -> None:
        """Return (bounded) once a message ``message`` returned for is in its sender's outbox.

        What the engine sends next (a pong, the close reply) must follow it.
        """

    def wait_writers(self, member: Member) -> None:
        """After each read: hold the reader back while the writers are behind (backpressure)."""

    def closed(self, member: Member, why: str) -> None:
        """The member left (close frame, failure, hang-up), once; ``why`` is for the log."""


# A feed is kept in segments of at most this many frames or bytes; the room
# checks its followers' bounds each time one fills, so a client can be at
# most one segment (plus one message) past --send-queue-bytes before it is
# found, and a segment every follower has passed is freed as a whole.
SEGMENT_FRAMES = 256
SEGMENT_BYTES = 64 * 1024


class Segment:
    """A run of a feed's frames; ``next`` is set once it is full, after its last frame."""

    __slots__ = ("frames", "ends", "bytes", "skips", "next")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        # The feed's byte count after each frame, appended before it: a follower
        # learns what it took from one lookup, not by measuring every frame.
        self.ends: list[int] = []
        self.bytes = 0
        self.skips: dict[int, int] | None = None  # frame index -> the one member id it is not for
        self.next: Segment | None = None


class Feed:
    """One room's frames for one protocol, appended once and read by every follower at its own pace.

    Appends happen under the owner's lock (the room's). Followers read
    without it: a list slice and an attribute are whole under the GIL, and
    a reader that sees ``next`` set sees every frame of the segment before
    it. Only the tail is held here: a segment all followers have passed is
    garbage. ``idle`` holds the followers with nothing left to send, which
    the next append wakes; a follower adds itself before its last look, so
    either it sees the new frame or the append sees it.
    """

    __slots__ = ("tail", "bytes", "idle")

    def __init__(self) -> None:
        self.tail = Segment()
        self.bytes = 0  # all ever appended: a follower's backlog is this less what it took
        self.idle: dict = {}  # outboxes (net.outbox.Outbox), as an ordered set; one that leaves takes itself out

    def append(self, frame: bytes, skip: int | None = None) -> bool:
        """Add ``frame`` for every follower but member ``skip``; True when a segment filled (check the bounds)."""
        tail = self.tail
        if skip is not None:
            if tail.skips is None:
                tail.skips = {}
            tail.skips[len(tail.frames)] = skip
        size = len(frame)
        self.bytes += size
        tail.ends.append(self.bytes)
        tail.frames.append(frame)
        tail.bytes += size
        full = len(tail.frames) >= SEGMENT_FRAMES or tail.bytes >= SEGMENT_BYTES
        if full:
            segment = Segment()
            tail.next = segment
            self.tail = segment
        if self.idle:
            idle, self.idle = self.idle, {}
            for outbox in list(idle):  # a copy: an outbox closing on another thread may take itself out
                outbox.wake()
        return full
