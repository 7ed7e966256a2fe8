"""The ticker in-process: it calls each connection's tick when its next_check says, and holds nothing else.

The connections are fakes with the two methods and the one attribute the
ticker uses; the ticker and its thread are real, and time is the real
monotonic clock, since the ticker sleeps on a Condition until a deadline.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
import weakref
from types import SimpleNamespace

from broadcast.net.ticker import TICK_MIN_S, Ticker

WAIT_S = 5.0  # bound on any wait for the ticker's thread
_ids = itertools.count(1)


def config(**periods) -> SimpleNamespace:
    values = {"ping_interval": 0.0, "ping_timeout": 0.0, "write_timeout": 0.0, "open_timeout": 0.0}
    values.update(periods)
    return SimpleNamespace(**values)


class FakeConn:
    """Due at ``due`` (None: nothing to do); each tick is recorded, and moves ``due`` to ``then``."""

    def __init__(self, due: float | None, then: float | None = None) -> None:
        self.id = next(_ids)
        self.label = f"fake{self.id}"
        self.ticker_entry = None
        self.due = due
        self.then = then
        self.ticks: list[float] = []
        self.ticked = threading.Event()

    def next_check(self, ping_interval, ping_timeout, write_timeout):
        return self.due

    def tick(self, now, ping_interval, ping_timeout, write_timeout):
        self.ticks.append(now)
        self.due = self.then
        self.ticked.set()


def started(**periods) -> Ticker:
    ticker = Ticker(config(**periods))
    ticker.start()
    return ticker


def test_a_connection_is_ticked_once_its_deadline_comes_and_not_before():
    ticker = started()
    due = time.monotonic() + 0.05
    conn = FakeConn(due)
    ticker.watch(conn)
    assert conn.ticked.wait(WAIT_S)
    assert conn.ticks[0] >= due
    assert conn.ticker_entry is None  # nothing more to do: off the heap
    assert ticker._heap == []


def test_a_connection_with_nothing_due_costs_the_ticker_nothing():
    ticker = Ticker(config(ping_interval=20.0))
    conns = [FakeConn(None) for _ in range(100)]
    for conn in conns:
        ticker.watch(conn)
    assert ticker._heap == []


def test_a_sooner_deadline_replaces_a_later_one_and_a_later_one_waits_for_it():
    ticker = started()
    conn = FakeConn(time.monotonic() + 3600)
    ticker.watch(conn)
    later = conn.ticker_entry
    conn.due = time.monotonic() + 7200
    ticker.watch(conn)
    assert conn.ticker_entry is later  # the sooner look stands; it will see the later one then
    conn.due = time.monotonic()
    ticker.watch(conn)  # the ticker sleeps until an hour from now: this must wake it
    assert conn.ticked.wait(WAIT_S)
    assert later[2] is None  # superseded: it no longer holds the connection
    assert len(conn.ticks) == 1


def test_a_deadline_tick_did_not_clear_is_looked_at_again_a_period_later_not_at_once():
    ticker = started(write_timeout=0.08)  # looked at again after 0.08 / 4 = 20 ms
    assert ticker.period == 0.02 > TICK_MIN_S
    conn = FakeConn(time.monotonic())
    conn.then = conn.due  # still due after each tick: as a connection whose abort has not ended it yet
    ticker.watch(conn)
    for _ in range(int(WAIT_S / 0.01)):
        if len(conn.ticks) >= 3:
            break
        threading.Event().wait(0.01)
    first, second, third = conn.ticks[:3]
    assert second >= first + ticker.period and third >= second + ticker.period


def test_a_forgotten_connection_is_let_go_at_once_and_never_watched_again():
    ticker = Ticker(config())
    conn = FakeConn(time.monotonic() + 3600)
    ticker.watch(conn)
    ticker.forget(conn)
    conn.due = time.monotonic()
    ticker.watch(conn)  # a late call, from a thread that had not heard yet
    gone = weakref.ref(conn)
    del conn
    gc.collect()
    assert gone() is None  # the heap's entry does not keep it alive until its time
    assert all(entry[2] is None for entry in ticker._heap)


def test_a_deadline_just_after_a_wake_up_waits_for_the_period_so_many_go_in_one_batch():
    ticker = started(write_timeout=0.08)  # a period of 20 ms
    first = FakeConn(time.monotonic())
    ticker.watch(first)
    assert first.ticked.wait(WAIT_S)
    woken = first.ticks[0]
    soon = FakeConn(woken + 0.001)
    ticker.watch(soon)
    assert soon.ticked.wait(WAIT_S)
    assert soon.ticks[0] >= woken + ticker.period


class BrokenConn(FakeConn):
    """A connection whose deadline check fails: a bug must cost it alone."""

    def __init__(self, due: float) -> None:
        super().__init__(due)
        self.aborted = threading.Event()

    def tick(self, now, ping_interval, ping_timeout, write_timeout):
        raise RuntimeError("a bug in tick")

    def abort(self, why: str) -> None:
        self.aborted.set()


def test_a_connection_whose_tick_fails_is_aborted_and_the_others_are_still_ticked():
    ticker = started()
    broken = BrokenConn(time.monotonic())
    ticker.watch(broken)
    assert broken.aborted.wait(WAIT_S)
    later = FakeConn(time.monotonic())
    ticker.watch(later)
    assert later.ticked.wait(WAIT_S)
