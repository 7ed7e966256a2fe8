"""The outbox in-process: its bound, its verdicts, and flush against a fake transport.

The transport is a fake because the outbox only ever calls five methods on
it; what it takes per send is what a test sets, so a full socket is one
assignment, not a client that stops reading. The writer is a fake that only
records what was scheduled: these tests call ``flush`` themselves, as the
writer thread would. Time, for "the socket has stalled", is a fake clock.
"""

from __future__ import annotations

import threading

import pytest

from broadcast.net import outbox as outbox_module
from broadcast.net.app import SEGMENT_BYTES, SEGMENT_FRAMES, Feed
from broadcast.net.outbox import (AGAIN, BEHIND, BLOCKED, CHUNK_OVERHEAD_BYTES, EVICTED, FLUSHED, GONE, QUEUED,
                              STALLED_AFTER_S, Outbox, Writer)
from support.fakes import FakeTime

WAIT_S = 5.0  # bound on any wait for another thread


class FakeTransport:
    """Takes at most ``takes`` bytes per send (None: all of them); records what it got."""

    def __init__(self, takes: int | None = None) -> None:
        self.takes = takes
        self.sent = bytearray()
        self.fail: OSError | None = None
        self.during_send = None  # called inside send_nowait, as if another thread ran then
        self.shut = False
        self.aborted = False
        self.closed = False
        self.notify = b""  # what finish() owes before the half-close (TLS's close_notify)

    def encode(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return self.notify

    def send_nowait(self, data) -> int:
        if self.during_send is not None:
            self.during_send()
        if self.fail is not None:
            raise self.fail
        n = len(data) if self.takes is None else min(self.takes, len(data))
        if n == 0:
            raise BlockingIOError
        self.sent += bytes(data[:n])
        return n

    def send_first(self, data: bytes) -> int:
        try:
            return self.send_nowait(data)
        except BlockingIOError:
            return 0

    def shutdown_write(self) -> None:
        self.shut = True

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class FakeWriter:
    def __init__(self) -> None:
        self.scheduled: list[Outbox] = []
        self.sent_bytes = 0  # the outbox adds what its socket took, for the metrics

    def schedule(self, outbox: Outbox) -> None:
        self.scheduled.append(outbox)

    def sent_first(self, nbytes: int) -> None:
        self.sent_bytes += nbytes


@pytest.fixture
def clock(monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(outbox_module, "time", clock)
    return clock


def make(limit: int = 100, takes: int | None = None) -> tuple[Outbox, FakeTransport, FakeWriter]:
    transport, writer = FakeTransport(takes), FakeWriter()
    return Outbox(transport, writer, limit), transport, writer


def until(predicate) -> bool:
    """Whether ``predicate()`` came true within WAIT_S (another thread's progress)."""
    pause = threading.Event()
    for _ in range(int(WAIT_S / 0.01)):
        if predicate():
            return True
        pause.wait(0.01)
    return predicate()


def stall(outbox: Outbox, transport: FakeTransport, clock: FakeTime) -> None:
    """Make the socket take nothing, and let STALLED_AFTER_S pass."""
    transport.takes = 0
    assert outbox.flush() == BLOCKED
    clock.now += STALLED_AFTER_S + 0.1


# put: the bound and its verdicts


def test_put_under_the_bound_queues_and_schedules_the_outbox_once():
    outbox, _, writer = make()
    assert outbox.put(b"a" * 10) == QUEUED
    assert outbox.put(b"b" * 10) == QUEUED
    assert writer.scheduled == [outbox]
    assert outbox.queued == 20


def test_the_metrics_tallies_count_frames_queued_and_bytes_the_socket_took(clock):
    outbox, transport, writer = make(limit=4, takes=3)
    assert [outbox.put(b"abcd"), outbox.put(b"efgh")] == [QUEUED, QUEUED]
    assert outbox.flush() == BLOCKED  # the socket took 3 of 8 bytes
    stall(outbox, transport, clock)  # then nothing
    assert outbox.put(b"ijkl") == EVICTED  # dropped, so not counted
    assert (outbox.frames, writer.sent_bytes) == (2, 3)


def test_a_frame_larger_than_the_bound_is_admitted_to_an_empty_outbox():
    outbox, transport, _ = make(limit=10)
    assert outbox.put(b"x" * 50) == QUEUED
    assert outbox.flush() == FLUSHED
    assert transport.sent == b"x" * 50


def test_past_the_bound_with_a_socket_that_takes_data_is_behind_and_keeps_the_frame(clock):
    outbox, transport, _ = make(limit=10)
    outbox.put(b"x" * 11)
    assert outbox.put(b"y") == BEHIND
    assert outbox.flush() == FLUSHED
    assert transport.sent == b"x" * 11 + b"y"


def test_past_the_bound_with_a_stalled_socket_is_evicted_and_the_backlog_dropped(clock):
    outbox, transport, _ = make(limit=10, takes=4)
    outbox.put(b"x" * 30)
    assert outbox.flush() == BLOCKED  # 4 sent, 26 in the head
    stall(outbox, transport, clock)
    assert outbox.put(b"y") == EVICTED
    assert (outbox.closing, outbox.chunks, outbox.queued) == (True, [], 0)
    assert outbox.put(b"z") == QUEUED  # closing: nothing more is kept
    assert outbox.chunks == []


def test_a_socket_blocked_for_less_than_the_stall_time_is_only_behind(clock):
    outbox, transport, _ = make(limit=10)
    outbox.put(b"x" * 30)
    transport.takes = 0
    assert outbox.flush() == BLOCKED
    clock.now += STALLED_AFTER_S / 2
    assert outbox.put(b"y") == BEHIND


def test_over_and_stalled_follow_the_bound_and_the_clock(clock):
    outbox, transport, _ = make(limit=10)
    outbox.put(b"x" * 30)
    assert outbox.over()
    assert not outbox.stalled()  # never blocked
    stall(outbox, transport, clock)
    assert outbox.stalled()
    assert outbox.closing


# put_control: protocol output


def test_control_writes_are_one_chunk_that_counts_its_overhead():
    outbox, transport, _ = make()
    assert outbox.put_control([b"pong1", b"pong2"], closing=False)
    assert outbox.chunks == [b"pong1pong2"]
    assert outbox.queued == len(b"pong1pong2") + CHUNK_OVERHEAD_BYTES
    assert outbox.flush() == FLUSHED
    assert transport.sent == b"pong1pong2"


def test_control_past_the_bound_with_a_stalled_socket_asks_for_eviction(clock):
    outbox, transport, _ = make(limit=10)
    outbox.put(b"x" * 30)
    stall(outbox, transport, clock)
    assert outbox.put_control([b"pong"], closing=False) is False
    assert (outbox.chunks, outbox.queued, outbox.closing) == ([], 0, True)


def test_the_close_frame_goes_through_even_past_the_bound(clock):
    outbox, transport, _ = make(limit=10)
    outbox.put(b"x" * 30)
    stall(outbox, transport, clock)
    assert outbox.put_control([b"close"], closing=True)
    assert outbox.closing
    transport.takes = None
    assert outbox.flush() == FLUSHED  # the rest of the head and the close frame, joined into one send
    assert transport.sent == b"x" * 30 + b"close"


def test_an_empty_write_half_closes_once_everything_before_it_is_sent():
    outbox, transport, _ = make()
    outbox.put(b"last")
    assert outbox.put_control([b"close", b""], closing=True)
    while outbox.flush() == AGAIN:
        pass
    assert transport.sent == b"lastclose"
    assert transport.shut


# flush with a transport that takes N bytes


def test_flush_sends_in_order_what_the_socket_takes_and_keeps_the_rest(clock):
    outbox, transport, _ = make(limit=1000, takes=7)
    frames = [bytes([65 + i]) * (i + 3) for i in range(6)]
    for frame in frames:
        outbox.put(frame)
    results = []
    while (result := outbox.flush()) == BLOCKED:
        results.append(result)
        assert len(transport.sent) == 7 * len(results)
    assert result == FLUSHED
    assert transport.sent == b"".join(frames)
    assert not outbox.scheduled and outbox.head == b""


def test_what_arrives_during_a_send_makes_flush_answer_again():
    outbox, transport, _ = make()
    outbox.put(b"first")
    transport.during_send = lambda: outbox.put(b"second")
    assert outbox.flush() == AGAIN
    transport.during_send = None
    assert outbox.flush() == FLUSHED
    assert transport.sent == b"firstsecond"


def test_a_blocked_socket_starts_the_stall_clock_and_progress_resets_it(clock):
    outbox, transport, _ = make(takes=0)
    outbox.put(b"x" * 10)
    assert outbox.flush() == BLOCKED
    assert outbox.blocked_since == clock.now
    clock.now += 1
    transport.takes = 3
    assert outbox.flush() == BLOCKED
    assert outbox.blocked_since == clock.now  # sent something: counted from now again


def test_a_failed_send_aborts_the_transport_and_drops_what_is_owed():
    outbox, transport, _ = make()
    outbox.put(b"x" * 10)
    transport.fail = ConnectionResetError()
    assert outbox.flush() == FLUSHED
    assert transport.aborted
    assert (outbox.closing, outbox.queued, outbox.head) == (True, 0, b"")
    outbox.drain(WAIT_S)  # returns at once: nothing more can be sent


# following a room's feed


def following(limit: int = 100) -> tuple[Outbox, FakeTransport, FakeWriter, Feed]:
    """An outbox that follows a new feed as member 1."""
    outbox, transport, writer = make(limit)
    feed = Feed()
    outbox.follow(feed, 1)
    return outbox, transport, writer, feed


def test_a_follower_gets_the_feed_in_order_after_what_it_was_sent_alone_and_across_segments():
    outbox, transport, writer = make(limit=1 << 20)
    feed = Feed()
    feed.append(b"before")  # not for a follower that comes later
    outbox.put(b"<alone>")
    outbox.follow(feed, 7)
    frames = [b"%d," % i for i in range(SEGMENT_FRAMES * 2 + 3)]
    filled = [feed.append(f) for f in frames[:5]]
    outbox.put(b"<told>")  # after the first five, before the rest
    filled += [feed.append(f) for f in frames[5:]]
    assert filled.count(True) == 2  # the room checks the bounds twice
    assert writer.scheduled == [outbox]  # scheduled once, by its own put; the feed found it busy
    assert outbox.over() is False and outbox._owed() == len(b"<alone><told>") + len(b"".join(frames))
    while outbox.flush() == AGAIN:
        pass
    assert transport.sent == b"<alone>" + b"".join(frames[:5]) + b"<told>" + b"".join(frames[5:])
    assert outbox._owed() == 0 and outbox.segment is feed.tail  # it holds no passed segment


def test_a_frame_that_skips_one_member_reaches_every_other_follower():
    feed = Feed()
    (joiner, joiner_sent, _), (other, other_sent, _) = make(), make()
    joiner.follow(feed, 1)
    other.follow(feed, 2)
    for frame, skip in ((b"a", None), (b"* joiner joined", 1), (b"b", None)):
        feed.append(frame, skip)
    for outbox in (joiner, other):
        assert outbox.flush() == FLUSHED
    assert (bytes(joiner_sent.sent), bytes(other_sent.sent)) == (b"ab", b"a* joiner joinedb")
    assert joiner._owed() == other._owed() == 0


def test_a_follower_that_caught_up_is_woken_by_the_next_append_once():
    outbox, transport, writer, feed = following()
    assert writer.scheduled == [] and list(feed.idle) == [outbox]
    feed.append(b"one")
    feed.append(b"two")
    assert writer.scheduled == [outbox] and not feed.idle
    assert outbox.flush() == FLUSHED
    assert list(feed.idle) == [outbox]  # idle again: the next append wakes it
    feed.append(b"three")
    assert writer.scheduled == [outbox, outbox]
    assert outbox.flush() == FLUSHED
    assert transport.sent == b"onetwothree"


def test_what_the_feed_gets_while_a_flush_goes_idle_is_not_missed():
    outbox, transport, _, feed = following()
    feed.append(b"one")
    transport.during_send = lambda: feed.append(b"two")  # appended while the writer sends, idle list empty
    assert outbox.flush() == AGAIN
    transport.during_send = None
    assert outbox.flush() == FLUSHED
    assert transport.sent == b"onetwo"


def test_real_writers_send_every_frame_of_a_busy_feed_in_order():
    """No wake-up is lost between followers going idle and a publisher appending, on real writer threads."""
    writers = [Writer(f"test-writer-{i}") for i in range(2)]
    feed, lock = Feed(), threading.Lock()  # the lock stands for the room's
    followers = [(Outbox(transport, writers[i % 2], 1 << 30), transport)
                 for i, transport in enumerate(FakeTransport() for _ in range(4))]
    with lock:
        for i, (outbox, _) in enumerate(followers):
            outbox.follow(feed, i)
    frames = [b"%d," % n for n in range(3 * SEGMENT_FRAMES)]
    pause = threading.Event()
    for n, frame in enumerate(frames):
        with lock:
            feed.append(frame)
        if n % 50 == 0:
            pause.wait(0.001)  # let the followers catch up and go idle, again and again
    expected = b"".join(frames)
    assert until(lambda: all(len(t.sent) == len(expected) for _, t in followers))
    assert all(bytes(t.sent) == expected for _, t in followers)


def test_the_feed_counts_toward_the_bound_and_a_stalled_follower_is_dropped_from_it(clock):
    outbox, transport, _, feed = following(SEGMENT_BYTES // 2)
    big = b"x" * (SEGMENT_BYTES // 4)
    assert feed.append(big) is False
    assert outbox.check() == QUEUED
    feed.append(big)
    feed.append(big)  # over the bound now, socket never blocked: only behind
    assert outbox.over() and outbox.check() == BEHIND
    transport.takes = 0
    assert outbox.flush() == BLOCKED
    clock.now += STALLED_AFTER_S + 0.1
    assert outbox.check() == EVICTED
    assert (outbox.feed, outbox.chunks, outbox.queued) == (None, [], 0)
    feed.append(b"more")
    assert outbox._owed() == len(outbox.head)  # it owes the feed nothing more


def test_wait_counts_what_the_feed_owes():
    outbox, transport, _, feed = following(10)
    feed.append(b"x" * 30)
    assert outbox.wait(0) is False
    assert outbox.flush() == FLUSHED
    assert outbox.wait(0) is True


def test_follow_none_keeps_what_came_before_and_nothing_after():
    outbox, transport, _, feed = following()
    feed.append(b"kept")
    outbox.follow(None, 1)
    assert not feed.idle  # a silent room keeps no outbox that left
    feed.append(b"after")
    assert outbox.flush() == FLUSHED
    assert transport.sent == b"kept"


def test_the_close_frame_is_the_last_thing_a_follower_is_sent():
    outbox, transport, _, feed = following()
    feed.append(b"owed")
    assert outbox.put_control([b"close"], closing=True)
    feed.append(b"late")
    while outbox.flush() == AGAIN:
        pass
    assert transport.sent == b"owedclose"


# drain, wait and release


def test_drain_waits_until_the_writer_has_sent_everything():
    outbox, transport, _ = make()
    outbox.put(b"owed")
    done = threading.Event()
    drainer = threading.Thread(target=lambda: (outbox.drain(30), done.set()), daemon=True)
    drainer.start()
    assert until(lambda: outbox.drained is not None)  # the drainer is waiting
    assert not done.is_set()
    assert outbox.flush() == FLUSHED
    assert done.wait(WAIT_S)
    assert transport.sent == b"owed"


def test_hang_up_once_all_is_sent_half_closes_and_closes_from_the_calling_thread():
    outbox, transport, _ = make()
    outbox.put(b"last")
    assert outbox.put_control([b"close"], closing=True)
    assert outbox.flush() == FLUSHED
    assert outbox.put_control([b""], closing=True)  # the server hangs up first: queued for the writer
    assert outbox.hang_up()
    assert transport.sent == b"lastclose" and transport.shut and transport.closed
    assert outbox.flush() == GONE  # the writer that still had it queued finds it dead


def test_hang_up_with_bytes_still_owed_leaves_them_and_the_socket_to_the_writer():
    outbox, transport, _ = make()
    outbox.put(b"owed")
    assert not outbox.hang_up()
    assert not transport.closed and not transport.shut
    assert outbox.flush() == FLUSHED
    assert transport.sent == b"owed"


def test_hang_up_leaves_what_the_transport_owes_before_its_half_close_to_the_writer():
    outbox, transport, writer = make()
    transport.notify = b"close_notify"
    assert outbox.put_control([b""], closing=True)
    assert not outbox.hang_up()
    assert writer.scheduled == [outbox] and not transport.closed
    while outbox.flush() == AGAIN:
        pass
    assert transport.sent == b"close_notify" and transport.shut


def test_drain_of_an_idle_outbox_returns_at_once():
    outbox, _, _ = make()
    outbox.drain(30)
    assert outbox.drained is None


def test_wait_returns_once_the_writer_brings_the_client_back_under_its_bound():
    outbox, transport, _ = make(limit=10)
    outbox.put(b"x" * 30)
    assert outbox.wait(0) is False
    caught_up = []
    waiter = threading.Thread(target=lambda: caught_up.append(outbox.wait(30)), daemon=True)
    waiter.start()
    assert until(lambda: outbox.caught_up is not None)  # the waiter is waiting
    assert outbox.flush() == FLUSHED
    waiter.join(WAIT_S)
    assert caught_up == [True]


def test_release_drops_what_is_owed_wakes_waiters_and_lets_the_writer_close():
    outbox, transport, writer = make(limit=10)
    outbox.put(b"x" * 30)
    waiter_result = []
    waiter = threading.Thread(target=lambda: waiter_result.append(outbox.wait(30)), daemon=True)
    waiter.start()
    assert until(lambda: outbox.caught_up is not None)
    outbox.release()
    waiter.join(WAIT_S)
    assert waiter_result == [True]
    assert writer.scheduled[-1] is outbox
    assert outbox.flush() == GONE
    assert transport.sent == b""
    assert outbox.put_control([b"pong"], closing=False)  # a dead outbox takes nothing more
    assert outbox.chunks == []


def test_a_first_response_goes_out_at_once_without_waking_the_writer():
    outbox, transport, writer = make()
    outbox.put_first([b"HTTP/1.1 101 ", b"Switching Protocols\r\n\r\n"])
    assert bytes(transport.sent) == b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    assert writer.scheduled == [] and not outbox.scheduled
    assert writer.sent_bytes == len(transport.sent)
    assert outbox.put(b"m") == QUEUED  # what follows goes the usual way
    assert writer.scheduled == [outbox]


def test_what_a_first_send_leaves_over_is_the_writers_and_comes_first():
    outbox, transport, writer = make(takes=4)
    outbox.put_first([b"response"])
    assert bytes(transport.sent) == b"resp" and writer.scheduled == [outbox]
    outbox.put(b"-frame")
    transport.takes = None
    assert outbox.flush() == FLUSHED
    assert bytes(transport.sent) == b"response-frame"


def test_a_first_response_behind_queued_bytes_waits_its_turn():
    outbox, transport, writer = make()
    outbox.put_control([b"early"], closing=False)
    outbox.put_first([b"-late"])
    assert transport.sent == b"" and writer.scheduled == [outbox]
    assert outbox.flush() == FLUSHED
    assert bytes(transport.sent) == b"early-late"


def test_a_first_send_to_a_gone_peer_leaves_it_to_the_writer():
    outbox, transport, writer = make()
    transport.fail = ConnectionResetError()
    outbox.put_first([b"response"])
    assert writer.scheduled == [outbox] and writer.sent_bytes == 0
    assert outbox.flush() == FLUSHED  # the writer finds the peer gone, and wakes the reader
    assert transport.aborted


def test_the_owner_hears_when_the_socket_fills_and_not_again_until_it_drained(clock):
    calls = []
    transport, writer = FakeTransport(takes=4), FakeWriter()
    outbox = Outbox(transport, writer, 1 << 20, on_block=lambda: calls.append(outbox.blocked_since))
    outbox.put(b"x" * 30)
    assert outbox.flush() == BLOCKED
    assert calls == [clock.now]  # its write timeout starts now
    clock.now += 1
    assert outbox.flush() == BLOCKED  # took a little more: the timeout moves later, nothing sooner to say
    assert calls == [clock.now - 1]
    transport.takes = None
    assert outbox.flush() == FLUSHED  # drained
    transport.takes = 0
    outbox.put(b"y" * 10)
    assert outbox.flush() == BLOCKED
    assert calls == [clock.now - 1, clock.now]
