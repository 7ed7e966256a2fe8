"""Who is in a room and who holds which name (broadcast.chat.presence)."""

from __future__ import annotations

import pytest

from broadcast.chat.presence import NameTaken, Presence, Seated


class Member:
    """A stand-in for a connection: presence only needs a hashable identity."""


def test_names_sorted_and_anonymous_counted():
    room = Presence("lobby")
    a, b, c, d = Member(), Member(), Member(), Member()
    room.add(a, "carol")
    room.add(b, None)
    room.add(c, "Alice")
    room.add(d, None)
    assert room.names() == ["Alice", "carol"]  # by code point
    assert room.anonymous == 2
    assert len(room) == 4
    room.remove(b)
    room.remove(c)
    assert room.names() == ["carol"]
    assert room.anonymous == 1
    assert not room.is_taken("Alice")


def test_a_second_holder_of_a_name_is_refused_with_the_reason():
    room = Presence("lobby")
    first = room.add(Member(), "Alice")
    with pytest.raises(NameTaken) as caught:
        room.add(Member(), "Alice")
    assert caught.value.reason == "name Alice is taken in room lobby"
    assert first.token not in str(caught.value)
    assert room.names() == ["Alice"]


def test_a_name_is_free_again_once_its_holder_leaves():
    room = Presence("lobby")
    alice = Member()
    room.add(alice, "Alice")
    assert room.is_taken("Alice")
    room.remove(alice)
    assert not room.is_taken("Alice")
    assert room.add(Member(), "Alice").replaced is None


def test_duplicates_allowed_when_configured():
    room = Presence("lobby", allow_duplicate_names=True)
    room.add(Member(), "Alice")
    room.add(Member(), "Alice")
    assert room.names() == ["Alice", "Alice"]


def test_the_right_session_token_takes_the_name_over_and_returns_the_former_holder():
    room = Presence("lobby")
    old, new = Member(), Member()
    seated = room.add(old, "Alice")
    assert seated.token and len(seated.token) >= 22  # 128 bits, URL-safe
    resumed = room.add(new, "Alice", session=seated.token)
    assert resumed == Seated(seated.token, old)
    assert room.names() == ["Alice"]
    room.remove(old)  # the replaced connection closes afterwards: it must not unseat the new one
    assert room.is_taken("Alice")
    assert room.names() == ["Alice"]


def test_a_wrong_session_token_is_refused_like_any_duplicate():
    room = Presence("lobby")
    seated = room.add(Member(), "Alice")
    with pytest.raises(NameTaken):
        room.add(Member(), "Alice", session=seated.token[:-1] + ("A" if seated.token[-1] != "A" else "B"))


def test_a_token_is_for_its_own_name_only():
    room = Presence("lobby")
    alice = room.add(Member(), "Alice")
    room.add(Member(), "Bob")
    with pytest.raises(NameTaken):
        room.add(Member(), "Bob", session=alice.token)


def test_a_session_for_a_free_name_gets_a_fresh_token():
    # The former connection's node may have restarted: the name is free, and
    # the client does not get to choose its own token.
    room = Presence("lobby")
    seated = room.add(Member(), "Alice", session="chosen-by-the-client")
    assert seated.replaced is None
    assert seated.token != "chosen-by-the-client"


def test_with_duplicates_a_session_replaces_only_its_own_connection():
    room = Presence("lobby", allow_duplicate_names=True)
    one, two, back = Member(), Member(), Member()
    room.add(one, "Alice")
    second = room.add(two, "Alice")
    assert room.add(back, "Alice", session=second.token).replaced is two
    assert room.names() == ["Alice", "Alice"]


def test_tokens_differ_per_claim():
    room = Presence("lobby")
    tokens = {room.add(Member(), f"user{i}").token for i in range(50)}
    assert len(tokens) == 50


def test_remove_of_an_unknown_member_is_a_no_op():
    room = Presence("lobby")
    room.add(Member(), "Alice")
    room.remove(Member())
    assert room.names() == ["Alice"]
    assert room.anonymous == 0
