"""The Redis envelope: the format alone (bus/envelope.py), then what a RedisBus publishes and delivers.

No Redis: the bus's publishing client is a fake that records what it would
send, and the listener's part is fed envelopes by hand, as Redis would hand
them over. The rooms are fakes that record what they would broadcast. What
a real Redis does with it all is tests/e2e/test_redis.py's.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
from websockets.frames import Opcode

from broadcast.bus import envelope
from broadcast.bus.base import encode
from broadcast.bus.envelope import VERSION, Envelope
from broadcast.bus.redis import DEDUP_WINDOW, RedisBus

CHANNEL = "broadcast"
ROOM = "lobby"  # the default room of these fakes
OTHER_ROOM = "kitchen"


class FakeRoom:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, int | None]] = []

    def broadcast(self, frame: bytes, skip: int | None = None) -> None:
        self.sent.append((frame, skip))


class FakeRooms(dict):
    """Rooms by name with a ``default``, as chat.rooms.Rooms; this node has ROOM and OTHER_ROOM."""

    def __init__(self) -> None:
        super().__init__({ROOM: FakeRoom(), OTHER_ROOM: FakeRoom()})
        self.default = self[ROOM]


class FakeRedis:
    """The publishing client: keeps what it is given, in order."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, channel: str, data: bytes) -> int:
        self.published.append((channel, data))
        return 1


def make_bus(node_id: str) -> tuple[RedisBus, FakeRooms, FakeRedis]:
    """A bus that believes it is subscribed and heard from Redis just now; nothing is connected."""
    rooms, client = FakeRooms(), FakeRedis()
    bus = RedisBus(rooms, "redis://127.0.0.1:1/0", CHANNEL, node_id)
    bus._client = client
    bus._listening = True
    bus._heard_at = time.monotonic()
    return bus, rooms, client


def raw(node, seq, op: str = "text", payload: bytes = b"[Bob] hi", v: int = VERSION, **extra) -> bytes:
    """An envelope built by hand, so that a test can make it any shape, wrong ones included."""
    header = {"v": v, "node": node, "seq": seq, "op": op, **extra}
    return json.dumps(header).encode() + b"\n" + payload


def v1(op: str = "text", skip=None, payload: bytes = b"[Old] hi", **extra) -> bytes:
    """What a node from before ids published: no ``seq``, a ``skip`` instead."""
    return json.dumps({"v": 1, "node": "old", "skip": skip, "op": op, **extra}).encode() + b"\n" + payload


# The format


def test_a_message_is_one_json_header_line_then_the_payload_exactly():
    payload = b"[Alice] line one\nline two \xff"
    head, _, body = envelope.encode("nodeA", 1, ROOM, Opcode.BINARY, payload).partition(b"\n")
    assert json.loads(head) == {"v": VERSION, "node": "nodeA", "seq": 1, "op": "binary", "room": ROOM}
    assert body == payload


@pytest.mark.parametrize("opcode, payload, room", [
    (Opcode.TEXT, "[Ann] héllo".encode(), ROOM),
    (Opcode.BINARY, bytes(range(256)), "zimmer ü"),
    (Opcode.TEXT, b"", ""),
    (Opcode.TEXT, b"a\nb\n\n", "a\nroom"),  # newlines in the payload and the room: the header is still one line
], ids=["text", "every byte", "empty", "newlines"])
def test_what_is_encoded_decodes_to_the_same_message(opcode, payload, room):
    data = envelope.encode("nodeA", 42, room, opcode, payload)
    assert envelope.decode(data) == Envelope("nodeA", 42, opcode, room, payload)


def test_a_sync_decodes_as_no_message_and_names_no_room():
    data = envelope.encode_sync("nodeA", 7)
    assert json.loads(data) == {"v": VERSION, "node": "nodeA", "seq": 7, "op": "sync"}
    assert envelope.decode(data) == Envelope("nodeA", 7, None, None, b"")


def test_an_envelope_without_a_room_is_for_the_default_room():
    assert envelope.decode(raw("nodeA", 3)) == Envelope("nodeA", 3, Opcode.TEXT, None, b"[Bob] hi")


@pytest.mark.parametrize("data, expected", [
    (v1(), Envelope("old", None, Opcode.TEXT, None, b"[Old] hi")),
    (v1(op="binary", skip=9, payload=b"\x00"), Envelope("old", None, Opcode.BINARY, None, b"\x00")),
    (v1(room=OTHER_ROOM), Envelope("old", None, Opcode.TEXT, OTHER_ROOM, b"[Old] hi")),
], ids=["plain", "binary with a skip", "with a room"])
def test_a_version_1_envelope_decodes_without_an_id(data, expected):
    assert envelope.decode(data) == expected


MALFORMED = {
    "not json": b"{nope\n[Bob] hi",
    "no header line": b"[Bob] hi",
    "header not an object": b"[1, 2]\nx",
    "missing op": json.dumps({"v": 2, "node": "n", "seq": 1}).encode() + b"\nx",
    "missing node": json.dumps({"v": 2, "seq": 1, "op": "text"}).encode() + b"\nx",
    "missing seq": json.dumps({"v": 2, "node": "n", "op": "text"}).encode() + b"\nx",
    "unknown op": raw("n", 1, op="ping"),
    "seq not a number": raw("n", "1"),
    "seq a bool": raw("n", True),
    "node not a string": raw(7, 1),
    "room not a string": raw("n", 1, room=["lobby"]),
    "future version": raw("n", 1, v=3),
    "v1 without skip": json.dumps({"v": 1, "node": "n", "op": "text"}).encode() + b"\nx",
    "v1 skip not an id": v1(skip="x"),
    "a sync without seq": v1(op="sync", payload=b""),
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_envelope_decodes_to_none(data):
    assert envelope.decode(data) is None


# What a node publishes


def test_a_node_publishes_the_envelope_of_its_room_on_the_channel():
    bus, rooms, client = make_bus("nodeA")
    payload = b"[Alice] line one\nline two \xff"
    seq = bus.publish(OTHER_ROOM, Opcode.BINARY, payload)
    ((channel, data),) = client.published
    assert channel == CHANNEL
    assert envelope.decode(data) == Envelope("nodeA", seq, Opcode.BINARY, OTHER_ROOM, payload)
    assert all(room.sent == [] for room in rooms.values())  # not before Redis brings it back


def test_each_message_of_a_node_has_its_own_increasing_seq():
    bus, _, client = make_bus("nodeA")
    seqs = [bus.publish(ROOM, Opcode.TEXT, f"m{i}".encode()) for i in range(3)]
    assert seqs == [1, 2, 3]
    assert [envelope.decode(data).seq for _, data in client.published] == [1, 2, 3]


def test_what_one_node_publishes_another_delivers_as_the_same_frame_in_the_same_room():
    a, _, a_redis = make_bus("nodeA")
    b, b_rooms, _ = make_bus("nodeB")
    for room, opcode, payload in [(ROOM, Opcode.TEXT, "[Ann] héllo".encode()),
                                  (OTHER_ROOM, Opcode.BINARY, bytes(range(256))),
                                  (ROOM, Opcode.TEXT, b"")]:
        a.publish(room, opcode, payload)
        b._deliver(a_redis.published[-1][1])
        assert b_rooms[room].sent[-1] == (encode(opcode, payload), None)
    assert (len(b_rooms[ROOM].sent), len(b_rooms[OTHER_ROOM].sent)) == (2, 1)


# What a node delivers


def test_an_own_message_is_delivered_once_when_it_comes_back_with_its_skip():
    bus, rooms, client = make_bus("nodeA")
    joiner = 17  # the member id of the joiner, who must not get its own notice
    seq = bus.publish(OTHER_ROOM, Opcode.TEXT, b"* Ann joined", skip=joiner)
    assert rooms[OTHER_ROOM].sent == []  # not before Redis brings it back
    bus._deliver(client.published[0][1])
    bus._deliver(client.published[0][1])  # a retry that also got through
    assert rooms[OTHER_ROOM].sent == [(encode(Opcode.TEXT, b"* Ann joined"), joiner)]
    bus.settle(seq)  # already delivered: returns at once, delivers nothing more
    assert len(rooms[OTHER_ROOM].sent) == 1
    assert rooms[ROOM].sent == []


def test_another_nodes_id_is_delivered_once_even_late_and_out_of_order():
    bus, rooms, _ = make_bus("nodeB")
    for seq in [5, 7, 5, 6, 7, 6]:
        bus._deliver(raw("nodeA", seq, payload=f"m{seq}".encode(), room=ROOM))
    assert [frame for frame, _ in rooms[ROOM].sent] == [encode(Opcode.TEXT, f"m{s}".encode()) for s in (5, 7, 6)]


def test_an_id_further_back_than_the_window_is_not_delivered_again():
    bus, rooms, _ = make_bus("nodeB")
    bus._deliver(raw("nodeA", 1, room=ROOM))
    bus._deliver(raw("nodeA", 2 + DEDUP_WINDOW, room=ROOM))
    bus._deliver(raw("nodeA", 1, room=ROOM))
    assert len(rooms[ROOM].sent) == 2


def test_an_envelope_without_a_room_goes_to_the_default_room():
    bus, rooms, _ = make_bus("nodeB")
    bus._deliver(raw("nodeA", 1))
    assert rooms.default.sent == [(encode(Opcode.TEXT, b"[Bob] hi"), None)]
    assert rooms[OTHER_ROOM].sent == []


def test_an_envelope_for_a_room_this_node_lacks_is_dropped_and_the_bus_goes_on():
    bus, rooms, _ = make_bus("nodeB")
    bus._deliver(raw("nodeA", 1, room="nowhere"))
    assert all(room.sent == [] for room in rooms.values())
    bus._deliver(raw("nodeA", 2, room=OTHER_ROOM))
    assert len(rooms[OTHER_ROOM].sent) == 1


def test_a_version_1_envelope_is_still_delivered():
    bus, rooms, _ = make_bus("nodeB")
    bus._deliver(v1())
    assert rooms.default.sent == [(encode(Opcode.TEXT, b"[Old] hi"), None)]


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_envelope_is_dropped_with_a_warning(data, caplog):
    bus, rooms, _ = make_bus("nodeB")
    with caplog.at_level(logging.WARNING):
        bus._deliver(data)
    assert all(room.sent == [] for room in rooms.values())
    assert [r.getMessage() for r in caplog.records] == [f"ignoring a malformed message on channel {CHANNEL}"]
    bus._deliver(raw("nodeA", 1))  # the bus goes on
    assert len(rooms.default.sent) == 1


def test_another_nodes_sync_is_not_a_message():
    bus, rooms, _ = make_bus("nodeB")
    bus._deliver(envelope.encode_sync("nodeA", 1))
    assert all(room.sent == [] for room in rooms.values())
