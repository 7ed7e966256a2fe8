"""Rooms without sockets (broadcast.chat.rooms): frames built once per protocol, catch-up on join, lifetimes."""

from __future__ import annotations

import json

import pytest
from websockets.frames import Frame, Opcode

from broadcast.ids import MessageId
from broadcast.chat.presence import NameTaken
from broadcast.chat.rooms import GAP_LOST, JOIN, LEAVE, Rooms, RoomSettings
from broadcast.net.app import Refused
from broadcast.net.outbox import Outbox
from support.fakes import FakeTime


class Member:
    """A joined connection as a room sees it: a real outbox, whose writer never sends.

    ``frames`` is what it is owed, in order: what it was sent alone and
    what its feed brought, the very objects the room encoded.
    """

    def __init__(self, id: int) -> None:
        self.id = id
        self.outbox = Outbox(None, Unsent(), 1 << 30)
        self.send = self.outbox.put
        self.follow = self.outbox.follow
        self.check = self.outbox.check
        self.behind = self.outbox.over
        self.accepted_first = None

    @property
    def frames(self) -> list[bytes]:
        with self.outbox.lock:
            if self.outbox.feed is not None:
                self.outbox._pull_locked()
            return self.outbox.chunks

    def accept(self) -> None:
        self.accepted_first = not self.frames


class Unsent:
    """A writer that is never scheduled to run: the test reads the outbox's queue."""

    def schedule(self, outbox) -> None:
        pass


def payload(frame: bytes) -> bytes:
    """The payload of an unmasked frame under 64 KiB: a two-byte header, or four past 125 bytes."""
    return frame[4:] if frame[1] == 126 else frame[2:]


def decoded(member: Member) -> list[dict]:
    return [json.loads(payload(f)) for f in member.frames]


def joined(rooms: Rooms, name: str, id: int, structured: bool, username=None, history=None, since=None):
    """Seated and joined, its join notice not yet out (as between ChatApp.opened and ChatApp.ready)."""
    member, session = Member(id), object()
    room, _ = rooms.seat(name, session, username, None)
    room.join(member, structured, history, since, joining=username)
    return room, member, session


def users(member: Member) -> list[str]:
    """The names in the last presence ``member`` got, counted up with the notices it got after it."""
    names: list[str] = []
    for obj in decoded(member):
        if obj["kind"] == "presence":
            names = list(obj["users"])
        elif obj["kind"] == "join":
            names.append(obj["from"])
        elif obj["kind"] == "leave":
            names.remove(obj["from"])
    return sorted(names)


def test_a_name_seated_before_its_notice_is_counted_once_by_a_joiner_in_between():
    rooms = Rooms()
    room, ann, ann_session = joined(rooms, "r", 1, True, username="Ann")
    assert users(ann) == ["Ann"]  # its own presence lists it; its own notice skips it
    _, bo, _ = joined(rooms, "r", 2, True, username="Bo")  # Ann's notice is not out yet
    room.deliver(Opcode.TEXT, b"* Ann joined", skip=1, sender="Ann", kind=JOIN)
    room.deliver(Opcode.TEXT, b"* Bo joined", skip=2, sender="Bo", kind=JOIN)
    assert users(bo) == users(ann) == ["Ann", "Bo"]
    room.leave(ann, ann_session)  # gone from the room; its leave notice not out yet
    _, cy, _ = joined(rooms, "r", 3, True)
    assert users(cy) == ["Ann", "Bo"]
    room.deliver(Opcode.TEXT, b"* Ann left", sender="Ann", kind=LEAVE)
    assert users(cy) == users(bo) == ["Bo"]
    assert [o["kind"] for o in decoded(cy)] == ["presence", "leave"]


class OtherNodes:
    """The Redis bus as the rooms see it: Zed and one anonymous client are on another node.

    ``asked`` records, for each time the other nodes are asked, whether the
    room's lock was held then: a round trip to Redis must not hold it.
    """

    def __init__(self) -> None:
        self.room = None
        self.asked: list[bool] = []

    def open_locked(self, room) -> None:
        self.room = room

    def claim(self, room: str, name: str, token: str) -> bool:
        return True

    def seated(self, room: str, users: list[str], anonymous: int) -> None:
        pass

    def elsewhere(self, room: str) -> tuple[list[str], int]:
        self.asked.append(self.room.lock.locked())
        return ["Zed"], 1


def test_across_nodes_a_presence_asks_redis_with_the_rooms_lock_free():
    rooms = Rooms()
    rooms.feed = nodes = OtherNodes()
    room, ann, _ = joined(rooms, "r", 1, True, username="Ann")
    room.tell_presence(ann)
    presences = [o for o in decoded(ann) if o["kind"] == "presence"]
    assert [(p["users"], p["anonymous"]) for p in presences] == [(["Ann", "Zed"], 1)] * 2
    assert room.summary() == {"room": "r", "users": ["Ann", "Zed"], "anonymous": 1}
    assert nodes.asked == [False, False, False]  # the join, the request, GET /rooms/r


def test_a_duplicate_name_is_counted_once_per_holder_until_each_leaves():
    rooms = Rooms(RoomSettings(allow_duplicate_names=True))
    room, one, _ = joined(rooms, "r", 1, True, username="twin")
    room.deliver(Opcode.TEXT, b"* twin joined", skip=1, sender="twin", kind=JOIN)
    _, two, two_session = joined(rooms, "r", 2, True, username="twin")
    room.deliver(Opcode.TEXT, b"* twin joined", skip=2, sender="twin", kind=JOIN)
    room.leave(two, two_session)
    _, late, _ = joined(rooms, "r", 3, True)  # before the leave notice is out
    assert users(late) == ["twin", "twin"]
    room.deliver(Opcode.TEXT, b"* twin left", sender="twin", kind=LEAVE)
    assert users(one) == users(late) == ["twin"]


def test_a_message_is_encoded_once_per_protocol_and_shared_by_every_member():
    rooms = Rooms()
    room, plain1, _ = joined(rooms, "r", 1, False)
    _, plain2, _ = joined(rooms, "r", 2, False)
    _, v1a, _ = joined(rooms, "r", 3, True)
    _, v1b, _ = joined(rooms, "r", 4, True)
    for m in (v1a, v1b):
        m.frames.clear()  # their presence on joining
    room.deliver(Opcode.TEXT, "[Ann] héllo".encode(), sender="Ann")
    assert plain1.frames[0] is plain2.frames[0]
    assert plain1.frames[0] == Frame(Opcode.TEXT, "[Ann] héllo".encode()).serialize(mask=False)
    assert v1a.frames[0] is v1b.frames[0]
    said = decoded(v1a)[0]
    assert (said["kind"], said["from"], said["text"], said["room"]) == ("message", "Ann", "héllo", "r")
    assert said["id"] == f"{room.history.epoch}:1"


def test_binary_reaches_both_protocols_as_it_is_and_is_not_kept():
    rooms = Rooms()
    room, plain, _ = joined(rooms, "r", 1, False)
    _, v1, _ = joined(rooms, "r", 2, True)
    room.deliver(Opcode.BINARY, b"\x00\xff")
    assert plain.frames[-1] is v1.frames[-1]
    with room.lock:
        assert len(room.history) == 0 and room.history.last_seq == 0


def test_a_notice_carries_the_last_message_id_and_skips_the_joiner():
    rooms = Rooms()
    room, v1, _ = joined(rooms, "r", 1, True)
    room.deliver(Opcode.TEXT, b"m")
    room.deliver(Opcode.TEXT, b"* Bo joined", skip=1, sender="Bo", kind=JOIN)
    room.deliver(Opcode.TEXT, b"* Cy joined", skip=2, sender="Cy", kind=JOIN)
    notice = decoded(v1)[-1]
    assert (notice["kind"], notice["from"], notice["id"]) == ("join", "Cy", f"{room.history.epoch}:1")
    assert len(v1.frames) == 3  # presence, m, Cy's join: not its own skipped one


def test_a_joiner_is_accepted_then_gets_history_then_presence_before_anything_live():
    rooms = Rooms(RoomSettings(history_size=3))
    room, _, _ = joined(rooms, "r", 1, False, username="Ann")
    room.deliver(Opcode.TEXT, b"* Ann joined", skip=1, sender="Ann", kind=JOIN)
    for i in range(5):
        room.deliver(Opcode.TEXT, f"[Ann] m{i}".encode(), sender="Ann")
    _, late, _ = joined(rooms, "r", 2, True)
    _, plain, _ = joined(rooms, "r", 3, False, history=2)
    assert late.accepted_first and plain.accepted_first
    got = decoded(late)
    assert [(o["kind"], o.get("text")) for o in got] == [("history", "m2"), ("history", "m3"), ("history", "m4"),
                                                        ("presence", None)]
    assert got[-1]["users"] == ["Ann"] and got[-1]["anonymous"] == 1  # itself; the plain one came after
    assert [payload(f) for f in plain.frames] == [b"[Ann] m3", b"[Ann] m4"]


@pytest.mark.parametrize("since, first, texts", [
    (1, {"kind": "gap", "missed": 1}, ["m2", "m3", "m4"]),  # seq 2 was trimmed; 3..5 are kept
    (3, None, ["m3", "m4"]),
    (5, None, []),
    (9, {"kind": "gap", "missed": None, "reason": "that id is past the room's last message"}, ["m2", "m3", "m4"]),
])
def test_since_replays_what_was_missed_or_says_what_was_lost(since, first, texts):
    rooms = Rooms(RoomSettings(history_size=3))
    room, _, _ = joined(rooms, "r", 1, False)
    for i in range(5):
        room.deliver(Opcode.TEXT, f"m{i}".encode())
    _, back, _ = joined(rooms, "r", 2, True, since=MessageId(room.history.epoch, since))
    got = decoded(back)
    if first is not None:
        assert {k: got[0][k] for k in first} == first
        got = got[1:]
    assert [o["text"] for o in got[:-1]] == texts
    assert got[-1]["kind"] == "presence"


def test_since_from_another_epoch_is_a_gap_then_the_joiners_history():
    rooms = Rooms(RoomSettings(history_size=2))
    room, _, _ = joined(rooms, "r", 1, False)
    room.deliver(Opcode.TEXT, b"m0")
    _, back, _ = joined(rooms, "r", 2, True, since=MessageId("elsewhere", 1))
    gap, history, presence = decoded(back)
    assert (gap["kind"], gap["missed"], gap["reason"]) == ("gap", None, "history restarted")
    assert (history["kind"], history["text"], presence["kind"]) == ("history", "m0", "presence")


@pytest.mark.parametrize("missed, line, reason", [
    (40, b"* 40 messages lost: " + GAP_LOST.encode(), GAP_LOST),
    (1, b"* 1 message lost: " + GAP_LOST.encode(), GAP_LOST),
    (None, b"* messages may have been lost: history restarted", "history restarted"),
])
def test_messages_lost_across_nodes_are_told_to_every_member_in_the_rooms_order(missed, line, reason):
    rooms = Rooms()
    room, plain, _ = joined(rooms, "r", 1, False)
    _, shared, _ = joined(rooms, "r", 2, True)
    room.deliver(Opcode.TEXT, b"before")
    room.lost(missed)
    room.deliver(Opcode.TEXT, b"after")
    assert [payload(f) for f in plain.frames] == [b"before", line, b"after"]
    before, gap, after = decoded(shared)[-3:]
    assert (gap["kind"], gap["id"], gap["missed"], gap["reason"]) == ("gap", before["id"], missed, reason)
    assert (before["text"], after["text"]) == ("before", "after")
    with room.lock:
        assert [e.payload for e in room.history.last(10)] == [b"before", b"after"]  # the gap is kept nowhere


def test_a_member_that_left_keeps_what_came_before_and_gets_nothing_after():
    rooms = Rooms()
    room, stays, _ = joined(rooms, "r", 1, False)
    _, goes, session = joined(rooms, "r", 2, False)
    room.deliver(Opcode.TEXT, b"both")
    assert room.leave(goes, session) == 1
    room.deliver(Opcode.TEXT, b"one")
    assert [payload(f) for f in goes.frames] == [b"both"]
    assert [payload(f) for f in stays.frames] == [b"both", b"one"]


def test_past_max_rooms_a_new_room_is_refused_and_an_idle_room_goes():
    rooms = Rooms(RoomSettings(history_size=0), max_rooms=1)
    room, member, session = joined(rooms, "a", 1, False)
    with pytest.raises(Refused) as refused:
        rooms.seat("b", object(), None, None)
    assert (refused.value.status, refused.value.reason) == (503, "too many rooms")
    room.leave(member, session)
    rooms.unseat(room, session)
    assert "a" not in rooms
    rooms.seat("b", object(), None, None)


def test_a_room_lives_while_it_has_history_and_goes_once_it_expires():
    clock = FakeTime()
    rooms = Rooms(RoomSettings(history_ttl_s=60.0), max_rooms=1, clock=clock.monotonic)
    room, member, session = joined(rooms, "a", 1, False)
    room.deliver(Opcode.TEXT, b"kept")
    room.leave(member, session)
    rooms.unseat(room, session)
    assert rooms.listing() == [{"room": "a", "users": 0, "anonymous": 0}]
    with pytest.raises(Refused):
        rooms.seat("b", object(), None, None)
    clock.now += 61.0
    assert rooms.listing() == []
    rooms.seat("b", object(), None, None)


def test_a_name_is_seated_once_per_room():
    rooms = Rooms()
    rooms.seat("a", object(), "Ann", None)
    with pytest.raises(NameTaken):
        rooms.seat("a", object(), "Ann", None)
    rooms.seat("b", object(), "Ann", None)
