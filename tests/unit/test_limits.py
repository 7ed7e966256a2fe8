"""The abuse limits in-process: the token bucket on a fake clock, per-address counts, the byte budget,
and the limits header the client paces itself by.
"""

from __future__ import annotations

import threading

import pytest

from broadcast.net import limits as limits_module
from broadcast.net.limits import AddressCounts, ByteBudget, TokenBucket, limits_header, parse_limits_header
from support.fakes import FakeTime

THREADS = 4
ROUNDS = 2000  # per thread: enough interleaving to lose an update without the lock


@pytest.fixture
def clock(monkeypatch):
    clock = FakeTime()  # the bucket reads monotonic() only
    monkeypatch.setattr(limits_module, "time", clock)
    return clock


# TokenBucket


def test_a_full_bucket_allows_the_burst_at_once_and_then_refuses(clock):
    bucket = TokenBucket(rate=2, burst=3)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_the_bucket_refills_at_its_rate(clock):
    bucket = TokenBucket(rate=2, burst=3)
    for _ in range(3):
        bucket.take()
    clock.now += 0.4  # 0.8 of a token
    assert not bucket.take()
    clock.now += 0.1  # one token
    assert bucket.take()
    assert not bucket.take()


def test_an_idle_bucket_refills_only_up_to_its_burst(clock):
    bucket = TokenBucket(rate=10, burst=2)
    bucket.take()
    clock.now += 3600
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_a_refused_message_takes_no_token(clock):
    bucket = TokenBucket(rate=1, burst=1)
    assert bucket.take()
    for _ in range(10):
        assert not bucket.take()
    clock.now += 1
    assert bucket.take()


# AddressCounts


def test_address_counts_count_each_address_apart():
    counts = AddressCounts()
    assert [counts.add("10.0.0.1"), counts.add("10.0.0.1"), counts.add("10.0.0.2")] == [1, 2, 1]
    assert (counts["10.0.0.1"], counts["10.0.0.2"], counts["10.0.0.3"]) == (2, 1, 0)
    counts.remove("10.0.0.1")
    assert counts["10.0.0.1"] == 1


def test_an_address_with_no_connection_left_is_forgotten():
    counts = AddressCounts()
    for i in range(100):
        counts.add(f"10.0.{i}.1")
        counts.remove(f"10.0.{i}.1")
    assert counts._counts == {}  # a scan of many addresses leaves nothing behind
    assert counts["10.0.0.1"] == 0


# ByteBudget


def test_the_budget_refuses_past_its_limit_and_counts_nothing_then():
    budget = ByteBudget(100)
    assert budget.take(60)
    assert not budget.take(41)
    assert budget.used == 60
    assert budget.take(40)
    assert budget.used == 100


def test_giving_back_always_succeeds_and_frees_room():
    budget = ByteBudget(100)
    budget.take(100)
    assert budget.take(-30)
    assert budget.used == 70
    assert budget.take(30)


def test_a_zero_budget_is_no_limit():
    budget = ByteBudget(0)
    assert budget.take(10 ** 12)
    assert budget.used == 10 ** 12


def test_threads_taking_and_giving_back_keep_the_count_exact():
    budget = ByteBudget(THREADS * 10)
    refused = []

    def churn() -> None:
        for _ in range(ROUNDS):
            if budget.take(10):
                budget.take(-10)
            else:
                refused.append(1)

    threads = [threading.Thread(target=churn) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert budget.used == 0
    assert refused == []  # THREADS holders of 10 bytes each always fit


# The limits header


@pytest.mark.parametrize("size, rate, burst", [(1048576, 20.0, 40), (0, 0.0, 1), (64, 0.5, 1), (1, 1e-3, 10 ** 6)])
def test_the_limits_header_round_trips(size, rate, burst):
    assert parse_limits_header(limits_header(size, rate, burst)) == (size, rate, burst)


def test_the_limits_header_reads_as_the_readme_writes_it():
    assert limits_header(1048576, 20, 40) == "max-message-size=1048576; rate=20; burst=40"
    assert parse_limits_header("burst=40;rate=20;max-message-size=1048576") == (1048576, 20.0, 40)


@pytest.mark.parametrize("value", ["", "max-message-size=big; rate=1; burst=1", "max-message-size=1; rate=1"],
                         ids=["empty", "not-a-number", "missing-field"])
def test_a_malformed_limits_header_is_an_error_the_client_can_catch(value):
    with pytest.raises((KeyError, ValueError)):  # what broadcast.client catches, falling back to no pacing
        parse_limits_header(value)
