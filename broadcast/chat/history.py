"""A room's recent messages, kept so that joiners get context and reconnecting clients what they missed.

Only messages are kept (notices and binary frames are not): the plain-text
frame the fan-out already built, which is the same live and replayed, and
the payload it carries, from which a structured joiner's ``history`` frames
are decoded and encoded as it joins. Doing either at append, for every
message whether anyone joins or not, cost the fan-out: encoding the frame a
tenth of its rate; decoding the text (building the sender's prefix to strip
it, and measuring the str) and reading the clock with no TTL to keep took
keeping a message from 1.0 to 2.3 us of the room's lock (Room.deliver to 100
members). A structured joiner pays it per message replayed instead.
The byte bounds count what is held.

A History is not thread-safe by itself: its room's lock guards it, and the
lock is passed in so that every method that reads or changes it can assert
that it is held, and so that the HistoryBudget can take it to shed entries.
Lock order: room lock, then the budget's lock (never the other way round,
and never two room locks at once).
"""

from __future__ import annotations

import bisect
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from operator import itemgetter
from typing import NamedTuple

from broadcast.ids import format_id

# What one kept entry costs beyond its frame's bytes and its payload (counted
# by sys.getsizeof): the Entry object, the frame's bytes header, its two
# floats and its two ints, and its deque slot (sys.getsizeof on CPython 3.11;
# tests/unit/test_chat_history.py checks it).
ENTRY_OVERHEAD_BYTES = 233
# When the node's histories pass their total, the budget sheds down to this
# fraction of it, so that the walk over every room runs once per 1/16 of the
# total appended rather than once per message.
LOW_WATER_FRACTION = 15 / 16


class Entry:
    """One kept message, as the room's fan-out built it.

    ``plain`` is the very bytes object queued to plain-text clients live,
    and ``payload`` the very one it was built from (references, not
    copies): the plain-text line, "[Alice] hi". ``born`` is set by
    ``History.append`` from its injected monotonic clock, where a TTL needs it.
    """

    __slots__ = ("seq", "ts", "sender", "plain", "payload", "size", "born")

    def __init__(self, seq: int, ts: float, sender: str | None, plain: bytes, payload: bytes) -> None:
        self.seq = seq
        self.ts = ts  # server time, Unix seconds: what the frames say
        self.sender = sender
        self.plain = plain  # the plain-text frame, as broadcast
        self.payload = payload
        self.size = len(plain) + sys.getsizeof(payload) + ENTRY_OVERHEAD_BYTES  # what it holds, for the bounds
        self.born = 0.0

    @property
    def text(self) -> str:
        """The structured objects' "text": the payload less its sender's prefix, decoded when asked for."""
        return text_of(self.payload, self.sender)


def prefix(name: str | None) -> bytes:
    """What the plain protocol puts before a named client's text; the structured one goes without it."""
    return f"[{name}] ".encode() if name is not None else b""


def text_of(payload: bytes, sender: str | None) -> str:
    """A message's text for structured clients: its plain payload less ``sender``'s prefix."""
    head = prefix(sender)
    return (payload[len(head):] if payload.startswith(head) else payload).decode(errors="replace")


class Recovery(NamedTuple):
    """What ``since`` can give back: ``entries`` after the client's SEQ, and how many are ``missed``.

    ``missed == 0``: ``entries`` is exactly what the client missed; replay it.
    ``missed > 0``: send a gap object with ``missed``, then ``entries`` (all
    that is left after the client's SEQ, so nothing it has seen comes twice).
    ``missed is None``: the id is of another epoch (or a SEQ this history never
    reached): send a gap object with ``missed`` null, then what a new joiner
    gets (``last``); ``entries`` is empty.
    """

    entries: list[Entry]
    missed: int | None


class History:
    """The kept messages of one room and the count of all its messages so far.

    Bounds: ``size`` entries (0 keeps none, but SEQ still counts so ids and
    gaps stay true), ``max_bytes`` for this room, ``ttl_s`` seconds (0: no
    expiry) by ``clock``, and the node-wide ``budget``.
    """

    def __init__(self, epoch: str, lock: threading.Lock, budget: HistoryBudget, *, size: int,
                 max_bytes: int, ttl_s: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 last_seq: int = 0) -> None:
        self.epoch = epoch
        self.lock = lock
        self.size = size
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._budget = budget
        self.last_seq = last_seq
        self.bytes = 0  # sum of the kept entries' sizes
        self._entries: deque[Entry] = deque()
        budget.track(self)

    def __len__(self) -> int:
        assert self.lock.locked()
        return len(self._entries)

    @property
    def last_id(self) -> str:
        """The id of the room's last message, ``EPOCH:0`` before the first: what notices carry."""
        assert self.lock.locked()
        return format_id(self.epoch, self.last_seq)

    @property
    def next_seq(self) -> int:
        """The SEQ a message appended now gets, for building its frames before ``append``."""
        assert self.lock.locked()
        return self.last_seq + 1

    def append(self, entry: Entry) -> bool:
        """Keep ``entry`` (whose SEQ must be past the last) within the bounds; True if the node is over budget.

        SEQ is normally ``next_seq``; a larger one (SEQ assigned elsewhere, as
        by Redis, with messages this node never saw) leaves a hole that
        ``since`` counts as missed, and one not past the last (a stream read
        again after an outage) is a ValueError, so a caller can skip it. When
        this returns True the caller calls ``budget.enforce()`` once it has
        released the room's lock.
        """
        assert self.lock.locked()
        if entry.seq <= self.last_seq:
            raise ValueError(f"SEQ {entry.seq} is not after {self.last_seq}")
        self.last_seq = entry.seq
        freed = 0
        if self.ttl_s:
            entry.born = now = self._clock()
            freed = self._expire_locked(now)
        added = 0
        if self.size:
            self._entries.append(entry)
            added = entry.size
            self.bytes += added
        while len(self._entries) > self.size or self.bytes > self.max_bytes:
            freed += self._drop_oldest_locked()
        return self._budget.charge(added - freed)

    def expire(self) -> int:
        """Drop the entries past their TTL now; returns how many remain (0: the room may go)."""
        assert self.lock.locked()
        self._expire_now_locked()
        return len(self._entries)

    def last(self, n: int) -> list[Entry]:
        """The last ``n`` kept entries, oldest first: what a joiner is replayed."""
        assert self.lock.locked()
        self._expire_now_locked()
        if n <= 0:
            return []
        return list(islice(self._entries, max(0, len(self._entries) - n), None))

    def since(self, epoch: str, seq: int) -> Recovery:
        """What a client that last saw ``EPOCH:SEQ`` missed; see Recovery for what to send."""
        assert self.lock.locked()
        if epoch != self.epoch or seq > self.last_seq:
            return Recovery([], None)
        self._expire_now_locked()
        entries = self._entries
        after = list(islice(entries, bisect.bisect_right(entries, seq, key=_seq), None))
        return Recovery(after, self.last_seq - seq - len(after))

    def shed_locked(self, target_bytes: int) -> int:
        """Drop oldest entries until this room holds ``target_bytes`` or less; returns the bytes freed.

        For the budget, which does its own accounting; takes no budget lock.
        """
        assert self.lock.locked()
        freed = 0
        while self._entries and self.bytes > target_bytes:
            freed += self._drop_oldest_locked()
        return freed

    def close(self) -> None:
        """Give every kept byte back to the budget and leave it: the room is gone."""
        assert self.lock.locked()
        self._budget.untrack(self)
        self._entries.clear()
        self.bytes = 0

    def _drop_oldest_locked(self) -> int:
        assert self.lock.locked()
        size = self._entries.popleft().size
        self.bytes -= size
        return size

    def _expire_now_locked(self) -> None:
        assert self.lock.locked()
        self._budget.charge(-self._expire_locked(self._clock()))

    def _expire_locked(self, now: float) -> int:
        """Drop what is past its TTL; returns the bytes freed, not yet given back to the budget."""
        assert self.lock.locked()
        freed = 0
        if self.ttl_s:
            entries, deadline = self._entries, now - self.ttl_s
            while entries and entries[0].born <= deadline:
                freed += self._drop_oldest_locked()
        return freed


def _seq(entry: Entry) -> int:
    return entry.seq


class HistoryBudget:
    """The bytes held by every room's history on this node, bounded by ``total_bytes``.

    Rooms charge it as they keep and drop entries (under their own lock, then
    this one). When a room's append puts the node over, that room's thread
    calls ``enforce`` with no lock held: it takes the largest rooms' locks
    one at a time and drops their oldest entries first, down to
    LOW_WATER_FRACTION of the total, so one busy room cannot push every other
    room's context out and a quiet room keeps its few messages.
    """

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.used = 0  # under _lock
        self._lock = threading.Lock()  # guards used and _rooms
        self._rooms: set[History] = set()
        self._enforcing = threading.Lock()  # one shedding pass at a time

    def track(self, history: History) -> None:
        with self._lock:
            self._rooms.add(history)

    def untrack(self, history: History) -> None:
        """Forget ``history`` and the bytes it held; its room's lock is held."""
        with self._lock:
            self._rooms.discard(history)
            self.used -= history.bytes

    def charge(self, delta: int) -> bool:
        """Add ``delta`` bytes (negative: freed); True if the node is now over its total."""
        with self._lock:
            self.used += delta
            return self.used > self.total_bytes

    def enforce(self) -> None:
        """If the node is over its total, shed the largest rooms' oldest entries down to the low water.

        Call it with no room lock held. If another thread is already shedding,
        this returns at once: that pass brings the total down for both. A room
        left with no entries and no members is its registry's to remove (its
        ``expire()`` returns 0).
        """
        if not self._enforcing.acquire(blocking=False):
            return
        try:
            with self._lock:
                if self.used <= self.total_bytes:
                    return
                excess = self.used - int(self.total_bytes * LOW_WATER_FRACTION)
                # Sizes read here may move before each room's lock is taken: a
                # pass picks good victims, not exact ones, and every room
                # still charges what it frees.
                held = sorted(((room.bytes, room) for room in self._rooms), key=itemgetter(0), reverse=True)
            level, count = water_level([size for size, _ in held], excess)
            for _, room in held[:count]:
                with room.lock:
                    freed = room.shed_locked(level)
                    with self._lock:
                        self.used -= freed
        finally:
            self._enforcing.release()


def water_level(sizes: list[int], excess: int) -> tuple[int, int]:
    """Cut the largest rooms down to one level that frees ``excess``: (that level, how many rooms).

    ``sizes`` is sorted largest first. The largest rooms shrink together, so
    none is emptied while another stays larger than it.
    """
    held = 0  # by the rooms before k
    for k, size in enumerate(sizes):
        if held - k * size >= excess:
            return (held - excess) // k, k
        held += size
    return max(0, (held - excess) // len(sizes)), len(sizes)
