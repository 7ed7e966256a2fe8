"""The Redis envelope in-process: what a node publishes, and what it delivers of what it reads.

No Redis: the bus's publishing client is a fake that records what it would
send, and the listener's part is fed envelopes by hand, as Redis would hand
them over. The hub is a fake that records what it would broadcast. What a
real Redis does with it all is tests/e2e/test_redis.py's.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
from websockets.frames import Opcode

from broadcast.bus import encode
from broadcast.bus.redis import DEDUP_WINDOW, ENVELOPE_VERSION, RedisBus

CHANNEL = "broadcast"


class FakeHub:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []

    def broadcast(self, frame: bytes, skip=None) -> None:
        self.sent.append((frame, skip))


class FakeRedis:
    """The publishing client: keeps what it is given, in order."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, channel: str, data: bytes) -> int:
        self.published.append((channel, data))
        return 1


def make_bus(node_id: str) -> tuple[RedisBus, FakeHub, FakeRedis]:
    """A bus that believes it is subscribed and heard from Redis just now; nothing is connected."""
    hub, client = FakeHub(), FakeRedis()
    bus = RedisBus(hub, "redis://127.0.0.1:1/0", CHANNEL, node_id)
    bus._client = client
    bus._listening = True
    bus._heard_at = time.monotonic()
    return bus, hub, client


def envelope(node: str, seq, op: str = "text", payload: bytes = b"[Bob] hi", v: int = ENVELOPE_VERSION, **extra):
    header = {"v": v, "node": node, "seq": seq, "op": op, **extra}
    return json.dumps(header).encode() + b"\n" + payload


# What a node publishes


def test_a_message_is_one_json_header_line_then_the_payload_exactly():
    bus, _, client = make_bus("nodeA")
    payload = b"[Alice] line one\nline two \xff"
    bus.publish(Opcode.BINARY, payload)
    ((channel, data),) = client.published
    head, _, body = data.partition(b"\n")
    assert channel == CHANNEL
    assert json.loads(head) == {"v": ENVELOPE_VERSION, "node": "nodeA", "seq": 1, "op": "binary"}
    assert body == payload


def test_each_message_of_a_node_has_its_own_increasing_seq():
    bus, _, client = make_bus("nodeA")
    seqs = [bus.publish(Opcode.TEXT, f"m{i}".encode()) for i in range(3)]
    assert seqs == [1, 2, 3]
    assert [json.loads(data.partition(b"\n")[0])["seq"] for _, data in client.published] == [1, 2, 3]


def test_what_one_node_publishes_another_delivers_as_the_same_frame():
    a, _, a_redis = make_bus("nodeA")
    b, b_hub, _ = make_bus("nodeB")
    for opcode, payload in [(Opcode.TEXT, "[Ann] héllo".encode()), (Opcode.BINARY, bytes(range(256))), (Opcode.TEXT, b"")]:
        a.publish(opcode, payload)
        b._deliver(a_redis.published[-1][1])
        assert b_hub.sent[-1] == (encode(opcode, payload), None)
    assert len(b_hub.sent) == 3


# What a node delivers


def test_an_own_message_is_delivered_once_when_it_comes_back_with_its_skip():
    bus, hub, client = make_bus("nodeA")
    joiner = object()
    seq = bus.publish(Opcode.TEXT, b"* Ann joined", skip=joiner)
    assert hub.sent == []  # not before Redis brings it back
    bus._deliver(client.published[0][1])
    bus._deliver(client.published[0][1])  # a retry that also got through
    assert hub.sent == [(encode(Opcode.TEXT, b"* Ann joined"), joiner)]
    bus.settle(seq)  # already delivered: returns at once, delivers nothing more
    assert len(hub.sent) == 1


def test_another_nodes_id_is_delivered_once_even_late_and_out_of_order():
    bus, hub, _ = make_bus("nodeB")
    for seq in [5, 7, 5, 6, 7, 6]:
        bus._deliver(envelope("nodeA", seq, payload=f"m{seq}".encode()))
    assert [frame for frame, _ in hub.sent] == [encode(Opcode.TEXT, f"m{s}".encode()) for s in (5, 7, 6)]


def test_an_id_further_back_than_the_window_is_not_delivered_again():
    bus, hub, _ = make_bus("nodeB")
    bus._deliver(envelope("nodeA", 1))
    bus._deliver(envelope("nodeA", 2 + DEDUP_WINDOW))
    bus._deliver(envelope("nodeA", 1))
    assert len(hub.sent) == 2


def test_a_version_1_envelope_is_still_delivered():
    bus, hub, _ = make_bus("nodeB")
    data = json.dumps({"v": 1, "node": "old", "skip": None, "op": "text"}).encode() + b"\n[Old] hi"
    bus._deliver(data)
    assert hub.sent == [(encode(Opcode.TEXT, b"[Old] hi"), None)]


MALFORMED = {
    "not json": b"{nope\n[Bob] hi",
    "no header line": b"[Bob] hi",
    "missing op": json.dumps({"v": 2, "node": "n", "seq": 1}).encode() + b"\nx",
    "unknown op": envelope("n", 1, op="ping"),
    "seq not a number": envelope("n", "1"),
    "seq a bool": envelope("n", True),
    "node not a string": envelope(7, 1),
    "future version": envelope("n", 1, v=3),
    "v1 skip not an id": json.dumps({"v": 1, "node": "n", "skip": "x", "op": "text"}).encode() + b"\nx",
    "a sync without seq": json.dumps({"v": 1, "node": "n", "skip": None, "op": "sync"}).encode() + b"\n",
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_envelope_is_dropped_with_a_warning(data, caplog):
    bus, hub, _ = make_bus("nodeB")
    with caplog.at_level(logging.WARNING):
        bus._deliver(data)
    assert hub.sent == []
    assert [r.getMessage() for r in caplog.records] == [f"ignoring a malformed message on channel {CHANNEL}"]
    bus._deliver(envelope("nodeA", 1))  # the bus goes on
    assert len(hub.sent) == 1


def test_another_nodes_sync_is_not_a_message():
    bus, hub, _ = make_bus("nodeB")
    bus._deliver(envelope("nodeA", 1, op="sync", payload=b""))
    assert hub.sent == []
