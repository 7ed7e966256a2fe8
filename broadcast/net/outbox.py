"""Per-client bounded send buffers, and the few writer threads that drain them.

This is gorilla's writePump, reshaped for Python threads: a broadcast only
appends bytes to each client's ``Outbox`` and never touches a socket, so one
slow or dead client cannot delay anyone else. A small, fixed pool of
``Writer`` threads sends with non-blocking syscalls, joining whatever backlog
a client has into one send, and parks clients whose socket is full in an
epoll set instead of parking a thread on each of them.

A room's broadcast does not touch its members' outboxes either: it appends
the frame once to a ``Feed``, and each outbox that follows the feed takes
whatever it has not sent yet when its writer flushes it. So a message costs
the room one append however many follow it, and each client one slice and
one join per send, however many messages it catches up on.
"""

from __future__ import annotations

import collections
import itertools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

from .app import BEHIND, EVICTED, QUEUED, Feed, Segment
from .transport import Transport

log = logging.getLogger(__name__)

# What Outbox.flush tells its writer.
FLUSHED = 0  # nothing left to send
AGAIN = 1  # more arrived while sending: requeue behind the others, for fairness
BLOCKED = 2  # the socket is full: wait until it is writable
GONE = 3  # the connection is finished: forget it and close its socket

# A socket that has taken nothing for this long has stopped taking data; a
# client reading at full speed empties it within milliseconds, even when one
# send of a big backlog fills it, but a busy machine may not run it for a
# second or so.
STALLED_AFTER_S = 2.0
# What one queued control chunk costs beyond its bytes (object header, list
# slot): pongs are 2 bytes, so counting bytes alone would let a pinger owe
# twenty times more memory than --send-queue-bytes.
CHUNK_OVERHEAD_BYTES = 64


class Outbox:
    """Bytes owed to one client, in order, bounded in size.

    They are what it is sent alone (``put``, ``put_control``) and what the
    room's feed it follows brings, which stays in the feed, shared, until
    the writer takes it: a frame sent alone first takes in all the feed had
    before it, so the two keep one order. Only its writer sends, so bytes
    can never interleave; ``scheduled`` is true while the outbox sits in
    its writer's ready queue or epoll set, which is what keeps it there at
    most once.
    """

    __slots__ = (
        "transport", "writer", "limit", "lock", "chunks", "_queued", "head",
        "scheduled", "closing", "eof", "half_close", "dead", "registered", "blocked_since",
        "drained", "caught_up", "frames", "feed", "segment", "index", "fed", "member", "on_block",
    )

    def __init__(self, transport: Transport, writer: Writer, limit: int,
                 on_block: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.writer = writer
        self.limit = limit
        # Called, under lock, when a socket that had taken everything so far
        # fills: its owner's write timeout starts (it takes no lock of ours).
        self.on_block = on_block
        self.lock = threading.Lock()
        self.chunks: list[bytes] = []  # not yet handed to the transport
        self._queued = 0  # bytes in chunks
        self.head: bytes | memoryview = b""  # encoded, partly sent
        self.scheduled = False
        self.closing = False  # a close frame is queued or the client is evicted
        self.eof = False  # half-close once everything is sent
        self.half_close = False  # eof reached the transport; shut down after head
        self.dead = False  # the reader is done; the socket can go
        self.registered = False  # in the writer's epoll set (writer thread only)
        self.blocked_since: float | None = None  # socket full since then
        self.drained: threading.Event | None = None  # set when idle; for drain()
        self.caught_up: threading.Event | None = None  # set when back under the bound; for wait()
        self.frames = 0  # data frames queued, for the metrics (under lock)
        # The feed followed (under lock): where in it we are, and how many of its bytes we took.
        self.feed: Feed | None = None
        self.segment: Segment | None = None
        self.index = 0
        self.fed = 0
        self.member: int | None = None  # whose frames these are, for the feed's skips

    def put(self, frame: bytes) -> int:
        """Queue one data frame for this client alone; QUEUED, or BEHIND or EVICTED past the bound.

        Admit-then-bound: a frame is refused only to a client already more
        than ``limit`` behind when it arrives, so any message the server
        accepts fits, whatever the limit. Past the bound, a client whose
        socket has stalled is evicted, its backlog dropped at once so that
        it holds no memory while its close frame waits. One whose socket
        still takes data is only waiting for our writers: it keeps the
        frame, and the room slows the publisher.
        """
        with self.lock:
            if self.closing:
                return QUEUED
            if self.feed is not None:
                self._pull_locked()  # what the room sent before goes first
            queued = self._queued + len(frame)
            state = QUEUED
            if self._owed() > self.limit:
                if self._stalled_locked():
                    return EVICTED
                state = BEHIND
            self.chunks.append(frame)
            self._queued = queued
            self.frames += 1
            if self.scheduled:
                return state
            self.scheduled = True
        self.writer.schedule(self)
        return state

    def put_control(self, writes: list[bytes], closing: bool) -> bool:
        """Queue protocol output (pong, close, handshake response); False to evict.

        It goes through even after ``closing``: that is how the close frame
        follows the messages still owed. ``b""`` asks for a half-close.
        Everything else counts against the bound like a message, so a client
        that pings without reading is a slow consumer; on False its backlog
        is gone and the caller fails the connection.
        """
        with self.lock:
            if self.dead:
                return True
            if self.feed is not None:
                self._pull_locked()
            # One chunk per call: a read full of pings owes one object, not thousands.
            data = b"".join(writes)
            if not writes[-1]:
                self.eof = True
            if data:
                queued = self._queued + len(data) + CHUNK_OVERHEAD_BYTES
                if not (closing or self.closing) and queued + len(self.head) > self.limit \
                        and self._stalled_locked():
                    return False
                self.chunks.append(data)
                self._queued = queued
            if closing:
                self._detach_locked()  # the close frame is the last thing sent
            self.closing = self.closing or closing
            if self.scheduled:
                return True
            self.scheduled = True
        self.writer.schedule(self)
        return True

    def put_first(self, writes: list[bytes]) -> None:
        """Send a new connection's handshake response from the calling thread, before anything else.

        Nothing is queued yet and no writer holds the outbox, so sending at
        once cannot reorder anything, and it saves waking a writer (two
        hand-offs of the GIL) per connect. What the socket does not take,
        the writer sends, as for ``put_control``.
        """
        with self.lock:
            if self.scheduled or self.chunks or self.head or self.feed is not None:
                idle = False
            else:
                idle = True
                data = self.transport.encode(b"".join(writes))
                try:
                    sent = self.transport.send_first(data)
                except OSError:
                    sent = 0  # the peer is gone; the writer finds out and the reader after it
                self.writer.sent_first(sent)
                if sent == len(data):
                    return
                self.head = memoryview(data)[sent:]
                self.scheduled = True
        if idle:
            self.writer.schedule(self)
        else:
            self.put_control(writes, closing=False)

    def _stalled_locked(self) -> bool:
        """Past the bound: if the socket has stalled, drop the backlog and say so."""
        assert self.lock.locked()
        blocked_since = self.blocked_since
        if blocked_since is None or time.monotonic() - blocked_since < STALLED_AFTER_S:
            return False
        self.closing = True
        self.chunks.clear()
        self._queued = 0
        self._detach_locked()
        self._catch_up_locked()
        return True

    def follow(self, feed: Feed | None, member: int) -> None:
        """Be sent all that ``feed`` gets from now on (None: no more), under the room's lock.

        What the old feed had already is still sent, before anything queued later.
        """
        with self.lock:
            if self.feed is not None:
                self._pull_locked()
            self._detach_locked()
            if feed is None or self.closing:
                return
            self.feed = feed
            self.segment = feed.tail
            self.index = len(feed.tail.frames)
            self.fed = feed.bytes
            self.member = member
            if not self.scheduled:
                feed.idle[self] = None

    def wake(self) -> None:
        """The feed has more: have the writer send it, unless it is on its way already."""
        with self.lock:
            if self.scheduled or self.feed is None:
                return
            self.scheduled = True
        self.writer.schedule(self)

    def _pull_locked(self) -> None:
        """Move what the feed has past our place into ``chunks``, minus frames not for us."""
        assert self.lock.locked()
        segment, index, member = self.segment, self.index, self.member
        while True:
            following = segment.next  # read first: once it is set, the slice below is final
            frames = segment.frames[index:]
            if frames:
                start, index = index, index + len(frames)
                end = segment.ends[index - 1]  # appended before the frame, so there
                skips = segment.skips
                if skips is not None and member in skips.values():
                    frames = [f for i, f in enumerate(frames, start) if skips.get(i) != member]
                    self._queued += sum(map(len, frames))
                else:
                    self._queued += end - self.fed
                self.fed = end
                self.chunks += frames
                self.frames += len(frames)
            if following is None:
                break
            segment, index = following, 0
        self.segment, self.index = segment, index

    def _more_locked(self) -> bool:
        """The feed has frames past our place."""
        assert self.lock.locked()
        segment = self.segment
        return segment.next is not None or len(segment.frames) > self.index

    def _detach_locked(self) -> None:
        """Follow the feed no more; it holds nothing of ours, and we no longer hold its old segments."""
        assert self.lock.locked()
        if self.feed is not None:
            self.feed.idle.pop(self, None)
            self.feed = self.segment = None

    @property
    def queued(self) -> int:
        """Bytes not yet handed to the transport: its own queue and the feed past its place (for the metrics)."""
        feed = self.feed
        return self._queued if feed is None else self._queued + feed.bytes - self.fed

    def _owed(self) -> int:
        """Bytes this client is owed: ``queued`` and the unsent head."""
        return self.queued + len(self.head)

    def check(self) -> int:
        """A follower's standing against its bound, for the room: QUEUED, BEHIND or EVICTED (as ``put``)."""
        if self._owed() <= self.limit:  # without the lock, as a cheap first look
            return QUEUED
        with self.lock:
            if self.closing or self._owed() <= self.limit:
                return QUEUED
            return EVICTED if self._stalled_locked() else BEHIND

    def wait(self, timeout: float) -> bool:
        """Wait until this client is back under its bound; False if still over it."""
        with self.lock:
            if self.closing or self._owed() <= self.limit:
                return True
            if self.caught_up is None:
                self.caught_up = threading.Event()
            caught_up = self.caught_up
        return caught_up.wait(timeout)

    def over(self) -> bool:
        """Past the bound now; read without the lock, as a cheap first look."""
        return self._owed() > self.limit

    def stalled(self) -> bool:
        """Over the bound with a stalled socket: evict (the caller does)."""
        with self.lock:
            if self.closing or self._owed() <= self.limit:
                return False
            return self._stalled_locked()

    def _catch_up_locked(self) -> None:
        assert self.lock.locked()
        if self.caught_up is not None:
            self.caught_up.set()
            self.caught_up = None

    def drain(self, timeout: float) -> None:
        """Wait until all that is queued is sent, the socket fails, or ``timeout``."""
        with self.lock:
            if not self.scheduled or self.dead:
                return
            if self.drained is None:
                self.drained = threading.Event()
            drained = self.drained
        drained.wait(timeout)

    def hang_up(self) -> bool:
        """The reader's last step, once all that is owed is sent: shut the socket from its thread.

        Leaving the half-close and the close to the writer cost a disconnect
        two hand-offs to it and one back, each of the GIL, and a shutdown of
        thousands of clients waited on them. With nothing left to send, no
        writer holds the socket (only one that still has bytes parks it in
        epoll), so closing it here races with nobody; a writer that still
        has the outbox queued finds it dead and closes nothing twice.
        Returns False if something is still owed (TLS's close_notify
        included): then ``drain`` and ``release``, as before.
        """
        with self.lock:
            if self.dead or self.chunks or self.head or (self.feed is not None and self._more_locked()):
                return False
            half_close = self.eof or self.half_close
            if self.eof:
                self.eof = False
                tail = self.transport.finish()
                if tail:
                    self.head, self.half_close = tail, True
                    if not self.scheduled:
                        self.scheduled = True
                        self.writer.schedule(self)
                    return False
            self.dead = self.closing = True
            self.half_close = False
            self._detach_locked()
            self._catch_up_locked()
        if half_close:
            self.transport.shutdown_write()
        self.transport.close()
        return True

    def release(self) -> None:
        """The reader is done: drop what is owed and let the writer close."""
        with self.lock:
            self.dead = True
            self.closing = True
            self.chunks.clear()
            self._queued = 0
            self._detach_locked()
            self._catch_up_locked()
        self.writer.schedule(self)

    def flush(self) -> int:
        """Send what the socket takes now. Writer thread only."""
        transport = self.transport
        with self.lock:
            if self.dead:
                return GONE
            if self.feed is not None:
                self._pull_locked()
            if self.chunks:
                chunks = self.chunks
                data = transport.encode(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                chunks.clear()
                self._queued = 0
                self.head = bytes(self.head) + data if self.head else data
            if self.eof and not self.head:
                self.eof = False
                self.half_close = True
                self.head = transport.finish()
            head = self.head
            if not head:
                if self.half_close:
                    self.half_close = False
                    transport.shutdown_write()
                return self._idle()
        try:
            sent = transport.send_nowait(head)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # The peer is gone. Wake the reader, which releases us.
            transport.abort()
            with self.lock:
                self.closing = True
                self.chunks.clear()
                self._queued = 0
                self.head = b""
                self._detach_locked()
                self._catch_up_locked()
                return self._idle()  # nothing more can be sent: drain() must not wait
        self.writer.sent_bytes += sent  # only this writer's thread adds to it
        with self.lock:
            if self.caught_up is not None and self._owed() - sent <= self.limit:
                self._catch_up_locked()
            if sent == len(head):
                self.head = b""
                self.blocked_since = None
                more = self.chunks or self.eof or self.half_close
                return AGAIN if more else self._idle()
            self.head = memoryview(head)[sent:]
            was_blocked = self.blocked_since is not None
            if sent or not was_blocked:
                self.blocked_since = time.monotonic()
            if not was_blocked and self.on_block is not None:
                self.on_block()  # a partial send only moves the timeout later
            return BLOCKED

    def _idle(self) -> int:
        feed = self.feed
        if feed is not None:
            feed.idle[self] = None  # before the last look, so the next append cannot miss us
            if self._more_locked():
                return AGAIN
        self.scheduled = False
        if self.drained is not None:
            self.drained.set()
        return FLUSHED


class Writer:
    """One thread that sends for many outboxes."""

    def __init__(self, name: str) -> None:
        self._ready: collections.deque[Outbox] = collections.deque()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._sleeping = False
        self.sent_bytes = 0  # for the metrics; its own thread writes it, others only read
        # For the metrics too: what readers sent for this writer's outboxes
        # (Outbox.put_first), under _first_lock.
        self._first_bytes = 0
        self._first_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def schedule(self, outbox: Outbox) -> None:
        """Hand an outbox to this writer, waking it only if it sleeps.

        The writer sets ``_sleeping`` before its last look at the queue, so
        either it sees this append or we see it asleep and wake it.
        """
        self._ready.append(outbox)
        if self._sleeping:
            self._sleeping = False
            try:
                self._wake_w.send(b"\0")
            except BlockingIOError:
                pass  # a wake-up is already pending

    def sent_first(self, nbytes: int) -> None:
        """Count bytes a reader sent itself for one of our outboxes."""
        with self._first_lock:
            self._first_bytes += nbytes

    def sent(self) -> int:
        """Bytes written to sockets for this writer's outboxes, by it or by their readers."""
        return self.sent_bytes + self._first_bytes

    def _run(self) -> None:
        ready = self._ready
        select = self._selector.select
        while True:
            while ready:
                self._flush(ready.popleft())
            self._sleeping = True
            if ready:
                self._sleeping = False
                continue
            events = select()
            self._sleeping = False
            for key, _ in events:
                outbox = key.data
                if outbox is None:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                self._selector.unregister(key.fileobj)
                outbox.registered = False
                self._flush(outbox)

    def _flush(self, outbox: Outbox) -> None:
        try:
            state = outbox.flush()
        except Exception:
            # A bug must cost one connection, not every client of this writer.
            log.exception("writer failed on %s", outbox.transport.peer)
            outbox.transport.abort()
            return
        if state == FLUSHED:
            return
        if state == AGAIN:
            self._ready.append(outbox)
        elif state == BLOCKED:
            if not outbox.registered:
                self._selector.register(outbox.transport, selectors.EVENT_WRITE, outbox)
                outbox.registered = True
        else:  # GONE
            if outbox.registered:
                self._selector.unregister(outbox.transport)
                outbox.registered = False
            outbox.transport.close()


class WriterPool:
    """A fixed set of writers; each new connection goes to the next one."""

    def __init__(self, size: int) -> None:
        self._writers = [Writer(f"writer-{i}") for i in range(size)]
        self._next = itertools.cycle(self._writers)

    def pick(self) -> Writer:
        return next(self._next)

    def sent_bytes(self) -> int:
        return sum(writer.sent() for writer in self._writers)
