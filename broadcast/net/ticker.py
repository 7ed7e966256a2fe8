"""The keepalive and deadline thread: one for all connections, woken only by the deadlines that are due.

A connection tells the ticker when it next has something for it to do
(``watch``): its opening or closing deadline, its write timeout once its
socket is full, its next ping or the answer to its last. The ticker keeps
one entry per connection in a heap, by that time, and sleeps until the
first; it wakes at most once a ``period``, and then takes every entry that
is due, so a deadline is met at most a period late, as when the ticker
walked every connection once a period. That walk cost 1.3-1.7 us per
connection whatever it had to do: at 15,000 idle clients, 4 % of a core,
and the GIL for 20 ms at a time. Now an idle client with keepalive off
costs nothing after its opening deadline, and with keepalive on, its ping.

``_lock`` guards ``_heap`` and each connection's ``ticker_entry``; it is a
leaf: taken under a connection's or an outbox's lock, it is never held over
a call into one.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time

from ..config import ServerConfig

log = logging.getLogger(__name__)

# The ticker wakes at most once a period: a quarter of the shortest
# configured timeout or interval, so that lateness stays a small part of
# each, but at most TICK_MAX_S, so that thousands of pings due at once are
# sent in a few big batches, not one wake-up each ...
TICK_MAX_S = 0.5
# ... and at least this.
TICK_MIN_S = 0.01
# What ``ticker_entry`` holds once the connection is gone: it is never watched again.
GONE = ()


class Ticker:
    """Calls ``conn.tick`` when ``conn.next_check`` says; connections come in by ``watch``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        c = config
        periods = [p / 4 for p in (c.ping_interval, c.ping_timeout, c.write_timeout, c.open_timeout) if p]
        # Also how long after it a deadline enforced is enforced again, if
        # that did not end the connection (an abort wakes a reader, which
        # may not have finished yet).
        self.period = max(TICK_MIN_S, min([TICK_MAX_S, *periods]))
        self._lock = threading.Condition()
        # [when, id, conn]; a superseded entry's conn is None. Ids break ties,
        # so that connections are never compared.
        self._heap: list[list] = []
        self._woken = float("-inf")  # when _due last returned (the ticker's thread only)

    def start(self) -> None:
        threading.Thread(target=self._run, name="ticker", daemon=True).start()

    def watch(self, conn, now: float | None = None) -> None:
        """Look at ``conn`` again by its next deadline; call it after anything that makes one earlier.

        An entry already due sooner stands, and looks again when it comes.
        ``now``: the ticker's own call, after enforcing what was due; a
        deadline still not met then is looked at again a period later.
        """
        c = self.config
        when = conn.next_check(c.ping_interval, c.ping_timeout, c.write_timeout)
        if when is None:
            return
        if now is not None and when <= now:
            when = now + self.period
        with self._lock:
            entry = conn.ticker_entry
            if entry is GONE or (entry is not None and entry[0] <= when):
                return
            if entry is not None:
                entry[2] = None  # superseded: popped in its turn, ignored
            conn.ticker_entry = entry = [when, conn.id, conn]
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._lock.notify()  # sooner than the ticker sleeps until

    def forget(self, conn) -> None:
        """``conn`` is gone: drop the heap's hold on it now, not when its entry comes up."""
        with self._lock:
            entry = conn.ticker_entry
            if entry:
                entry[2] = None
            conn.ticker_entry = GONE

    def _due(self) -> tuple[float, list]:
        """Wait until some deadline is due, a period after the last wake-up at least; then the
        time, and the connections due, taken off the heap."""
        heap = self._heap
        with self._lock:
            while True:
                now = time.monotonic()
                if heap and heap[0][0] <= now and now >= self._woken + self.period:
                    break
                self._lock.wait(max(heap[0][0], self._woken + self.period) - now if heap else None)
            self._woken = now
            due = []
            while heap and heap[0][0] <= now:
                entry = heapq.heappop(heap)
                conn = entry[2]
                if conn is not None:
                    conn.ticker_entry = None
                    due.append(conn)
            return now, due

    def _run(self) -> None:
        c = self.config
        while True:
            now, due = self._due()
            for conn in due:
                try:
                    conn.tick(now, c.ping_interval, c.ping_timeout, c.write_timeout)
                    self.watch(conn, now)
                except Exception:  # keep every other connection's keepalive going
                    log.exception("ticker failed on %s", conn.label)
                    conn.abort("internal error")
