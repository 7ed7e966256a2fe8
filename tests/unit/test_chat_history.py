"""A room's history and the node's history budget (broadcast.chat.history)."""

from __future__ import annotations

import sys
import threading

import pytest

from broadcast.chat.history import (ENTRY_OVERHEAD_BYTES, LOW_WATER_FRACTION, Entry, History,
                                    HistoryBudget, water_level)

EPOCH = "ep0ch_A1"
FRAME_BYTES = 100  # each test entry: a plain frame and a payload of this many bytes
PAYLOAD = b"[Alice] " + b"r" * (FRAME_BYTES - 8)
ENTRY_BYTES = FRAME_BYTES + sys.getsizeof(PAYLOAD) + ENTRY_OVERHEAD_BYTES


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(size=100, max_bytes=1 << 20, ttl_s=0.0, clock=None, budget=None):
    lock = threading.Lock()
    lock.acquire()  # as the room's code would, around every call
    budget = budget or HistoryBudget(1 << 30)
    return History(EPOCH, lock, budget, size=size, max_bytes=max_bytes, ttl_s=ttl_s,
                   clock=clock or Clock())


def entry(seq: int) -> Entry:
    return Entry(seq, 1764627286.5, "Alice", b"p" * FRAME_BYTES, PAYLOAD)


def fill(history: History, count: int) -> None:
    for _ in range(count):
        history.append(entry(history.next_seq))


def seqs(entries) -> list[int]:
    return [e.seq for e in entries]


def test_seq_counts_from_one_and_ids_follow():
    history = make()
    assert history.last_id == f"{EPOCH}:0"
    fill(history, 3)
    assert history.last_seq == 3 and history.last_id == f"{EPOCH}:3"
    assert seqs(history.last(10)) == [1, 2, 3]


def test_a_seq_that_is_not_past_the_last_is_refused():
    history = make()
    fill(history, 2)
    with pytest.raises(ValueError, match="SEQ 2 is not after 2"):
        history.append(entry(2))
    assert seqs(history.last(10)) == [1, 2]


def test_last_n():
    history = make()
    fill(history, 5)
    assert seqs(history.last(2)) == [4, 5]
    assert history.last(0) == []
    assert seqs(history.last(99)) == [1, 2, 3, 4, 5]


def test_bounded_by_count_oldest_first():
    history = make(size=3)
    fill(history, 5)
    assert seqs(history.last(10)) == [3, 4, 5]
    assert history.bytes == 3 * ENTRY_BYTES


def test_size_zero_keeps_nothing_but_still_counts():
    budget = HistoryBudget(1 << 20)
    history = make(size=0, budget=budget)
    fill(history, 4)
    assert history.last(10) == [] and len(history) == 0
    assert history.last_id == f"{EPOCH}:4"
    assert history.since(EPOCH, 1) == ([], 3)
    assert budget.used == 0


def test_bounded_by_bytes_per_room():
    history = make(max_bytes=3 * ENTRY_BYTES + ENTRY_BYTES // 2)
    fill(history, 6)
    assert seqs(history.last(10)) == [4, 5, 6]
    assert history.bytes <= history.max_bytes


def test_an_entry_larger_than_the_room_is_not_kept():
    history = make(max_bytes=ENTRY_BYTES - 1)
    fill(history, 2)
    assert history.last(10) == [] and history.bytes == 0
    assert history.last_seq == 2


def test_entries_expire_after_the_ttl_by_the_injected_clock():
    clock = Clock()
    budget = HistoryBudget(1 << 20)
    history = make(ttl_s=10, clock=clock, budget=budget)
    fill(history, 2)
    clock.now += 6
    fill(history, 1)
    clock.now += 4  # the first two are 10 s old now
    assert seqs(history.last(10)) == [3]
    assert budget.used == ENTRY_BYTES
    clock.now += 6
    assert history.expire() == 0  # the room may go
    assert budget.used == 0
    assert history.since(EPOCH, 0) == ([], 3)


def test_since_returns_exactly_what_came_after():
    history = make()
    fill(history, 5)
    recovery = history.since(EPOCH, 2)
    assert seqs(recovery.entries) == [3, 4, 5] and recovery.missed == 0
    assert history.since(EPOCH, 5) == ([], 0)  # up to date
    assert seqs(history.since(EPOCH, 0).entries) == [1, 2, 3, 4, 5]


def test_since_counts_what_was_trimmed_and_gives_the_rest_once():
    history = make(size=3)
    fill(history, 10)
    recovery = history.since(EPOCH, 4)
    assert recovery.missed == 3  # 5, 6, 7
    assert seqs(recovery.entries) == [8, 9, 10]


def test_since_counts_a_hole_left_by_seqs_assigned_elsewhere():
    history = make()
    fill(history, 3)
    history.append(entry(9))  # Redis assigned 4..8 to messages this node never got
    recovery = history.since(EPOCH, 2)
    assert recovery.missed == 5
    assert seqs(recovery.entries) == [3, 9]


def test_since_another_epoch_or_a_future_seq_is_unknown():
    history = make()
    fill(history, 3)
    assert history.since("otherEp", 2) == ([], None)
    assert history.since(EPOCH, 4) == ([], None)


def test_every_method_asserts_the_rooms_lock_is_held():
    history = make()
    fill(history, 1)
    history.lock.release()
    for call in (lambda: history.append(entry(2)), lambda: history.last(1), lambda: history.since(EPOCH, 0),
                 history.expire, lambda: history.last_id, lambda: history.next_seq, lambda: len(history),
                 lambda: history.shed_locked(0), history.close):
        with pytest.raises(AssertionError):
            call()


def test_entry_overhead_is_what_cpython_holds_for_an_entry():
    e = entry(123456)
    e.born = 1000.5
    held = (sys.getsizeof(e) + sys.getsizeof(b"") + sys.getsizeof(e.ts) + sys.getsizeof(e.born)
            + sys.getsizeof(e.seq) + sys.getsizeof(e.size) + 8)  # b"": the frame's header; 8: its deque slot
    assert ENTRY_OVERHEAD_BYTES == held
    assert e.size == ENTRY_BYTES
    assert not hasattr(e, "__dict__")


@pytest.mark.parametrize(("payload", "sender", "text"), [
    (b"[Alice] hi", "Alice", "hi"),  # the prefix the plain protocol put there goes
    (b"hi", None, "hi"),  # anonymous: nothing to strip
    (b"[Bob] hi", "Alice", "[Bob] hi"),  # only its own sender's prefix
    ("[Zoë] héllo".encode(), "Zoë", "héllo"),
    (b"[Alice] \xff", "Alice", "\ufffd"),  # kept as sent; replaced only in the text
])
def test_an_entrys_text_is_its_payload_less_its_senders_prefix(payload, sender, text):
    assert Entry(1, 1.0, sender, b"frame", payload).text == text


def test_the_budget_sheds_the_largest_rooms_oldest_first_and_keeps_the_quiet_ones():
    budget = HistoryBudget(20 * ENTRY_BYTES)
    busy, medium, quiet = (make(budget=budget) for _ in range(3))
    fill(quiet, 2)
    fill(medium, 6)
    assert not any([busy.append(entry(busy.next_seq)) for _ in range(12)])
    assert budget.used == 20 * ENTRY_BYTES  # 2 + 6 + 12: at the total, not past it
    assert busy.append(entry(busy.next_seq))  # past it: the caller is told to enforce
    for history in (busy, medium, quiet):
        history.lock.release()  # enforce runs with no room lock held, and takes each in turn
    budget.enforce()
    for history in (busy, medium, quiet):
        history.lock.acquire()
    assert budget.used <= 20 * ENTRY_BYTES * LOW_WATER_FRACTION
    assert budget.used == busy.bytes + medium.bytes + quiet.bytes
    assert len(quiet) == 2 and len(medium) == 6  # only the largest room gave anything back
    assert seqs(busy.last(99))[-1] == 13 and seqs(busy.last(99))[0] > 1  # its oldest went


def test_the_budget_levels_the_largest_rooms_together():
    budget = HistoryBudget(10 * ENTRY_BYTES)
    a, b = make(budget=budget), make(budget=budget)
    fill(a, 6)
    fill(b, 5)
    for history in (a, b):
        history.lock.release()
    budget.enforce()
    for history in (a, b):
        history.lock.acquire()
    assert budget.used <= 10 * ENTRY_BYTES * LOW_WATER_FRACTION
    assert (len(a), len(b)) == (4, 4)  # down to one level, not one room emptied


def test_enforce_under_the_total_does_nothing():
    budget = HistoryBudget(10 * ENTRY_BYTES)
    history = make(budget=budget)
    fill(history, 10)
    history.lock.release()
    budget.enforce()
    history.lock.acquire()
    assert len(history) == 10


def test_close_gives_the_bytes_back():
    budget = HistoryBudget(1 << 20)
    history = make(budget=budget)
    fill(history, 3)
    history.close()
    assert budget.used == 0 and history.last(9) == []


@pytest.mark.parametrize(("sizes", "excess", "expected"), [
    ([100, 10, 10], 50, (50, 1)),
    ([100, 90, 10], 50, (70, 2)),
    ([10, 10], 20, (0, 2)),
    ([30, 20, 10], 100, (0, 3)),
    ([100], 1, (99, 1)),
])
def test_water_level(sizes, excess, expected):
    level, count = water_level(sizes, excess)
    assert (level, count) == expected
    assert sum(max(0, s - level) for s in sizes) >= min(excess, sum(sizes))


def test_rooms_appending_on_their_own_threads_keep_the_budget_true_and_bounded():
    # Each thread is a room's reader: append under its own lock, enforce with
    # none held, as the module says. Bounded by count; no thread may hang.
    budget = HistoryBudget(50 * ENTRY_BYTES)
    rooms = [History(EPOCH, threading.Lock(), budget, size=1000, max_bytes=1 << 20) for _ in range(4)]

    def run(history: History) -> None:
        for _ in range(300):
            with history.lock:
                over = history.append(entry(history.next_seq))
            if over:
                budget.enforce()

    threads = [threading.Thread(target=run, args=(room,)) for room in rooms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
    budget.enforce()
    assert budget.used == sum(room.bytes for room in rooms)
    assert budget.used <= budget.total_bytes
    for room in rooms:
        with room.lock:
            assert room.last_seq == 300
            kept = seqs(room.last(1000))
            assert kept == list(range(301 - len(kept), 301))  # the newest, oldest first, none doubled
