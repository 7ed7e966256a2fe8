"""Room names and the paths that join them (broadcast.chat.names)."""

from __future__ import annotations

import pytest

from broadcast.chat.names import DEFAULT_ROOM, MAX_ROOM_CHARS, RoomPathError, room_from_path, room_problem


@pytest.mark.parametrize("name", ["lobby", "a", "Z9", "0day", "team-1.ops_x", "a" * MAX_ROOM_CHARS])
def test_valid_room_names(name):
    assert room_problem(name) is None


@pytest.mark.parametrize(("name", "problem"), [
    ("", "must be 1 to 64 characters"),
    ("a" * (MAX_ROOM_CHARS + 1), "must be 1 to 64 characters"),
    ("_x", "must start with a letter or digit"),
    (".hidden", "must start with a letter or digit"),
    ("-x", "must start with a letter or digit"),
    ("a b", "may contain only A-Z a-z 0-9 _ . -"),
    ("a/b", "may contain only A-Z a-z 0-9 _ . -"),
    ("caf\u00e9", "may contain only A-Z a-z 0-9 _ . -"),
    ("\u0661\u0662", "may contain only A-Z a-z 0-9 _ . -"),  # Arabic-Indic digits are not 0-9
    ("a%20b", "may contain only A-Z a-z 0-9 _ . -"),
    ("a\n", "may contain only A-Z a-z 0-9 _ . -"),
])
def test_invalid_room_names_say_why(name, problem):
    assert room_problem(name) == problem


def test_ws_joins_the_default_room():
    assert room_from_path("/ws") == DEFAULT_ROOM == "lobby"


def test_ws_room_joins_that_room():
    assert room_from_path("/ws/team-1") == "team-1"
    assert room_from_path("/ws/Lobby") == "Lobby"  # case-sensitive: another room


@pytest.mark.parametrize("path", ["/ws/", "/ws/a/b", "/ws/_x", "/ws/a%2Db", "/ws/" + "a" * 65])
def test_a_bad_name_under_ws_is_400_with_the_problem(path):
    with pytest.raises(RoomPathError) as caught:
        room_from_path(path)
    assert caught.value.status == 400
    assert caught.value.reason == f"invalid room name: {room_problem(path[len('/ws/'):])}"
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("path", ["/", "/wss", "/ws2/a", "/x/ws/a", "/WS", "ws/a", "/wsx"])
def test_any_other_path_is_404_naming_both_forms(path):
    with pytest.raises(RoomPathError) as caught:
        room_from_path(path)
    assert caught.value.status == 404
    assert caught.value.reason == f"no WebSocket at {path}; use /ws or /ws/ROOM"
