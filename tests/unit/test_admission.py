"""The admission rules of broadcast.handshake, as pure functions: no sockets here.

Names are 1 to 32 characters, with no control (or formatting) characters and
no surrounding whitespace; the WebSocket lives at /ws and nowhere else.
"""

from __future__ import annotations

import inspect
from urllib.parse import quote

import pytest
from websockets.datastructures import Headers

from broadcast.chat import admission as handshake
from broadcast.chat.admission import Admission, Refused, name_problem


def admit(path: str, *headers: tuple[str, str], policy: handshake.Policy = handshake.Policy()):
    """``handshake.admit`` for a request with a Host and ``headers``, under ``policy``."""
    if len(inspect.signature(handshake.admit).parameters) == 1:
        return handshake.admit(path)
    return handshake.admit(path, Headers([("Host", "chat.example"), *headers]), policy)

GOOD_NAMES = [
    "a",
    "alice",
    "Bob_42",
    "x" * 32,
    "é" * 32,  # 32 characters, 64 bytes: the limit counts characters
    "李" * 32,
    "Zoë",
    "a b",  # inner spaces are fine
    "[bob]",
    "* x",
    "🙂",
]

BAD_NAMES = {
    "empty": "",
    "33 characters": "x" * 33,
    "33 wide characters": "李" * 33,
    "leading space": " alice",
    "trailing space": "alice ",
    "only spaces": "   ",
    "leading tab": "\talice",
    "trailing newline": "alice\n",
    "non-breaking space around": "\u00a0alice",
    "NUL": "a\x00b",
    "BEL": "a\x07b",
    "newline inside": "a\nb",
    "carriage return inside": "a\rb",
    "tab inside": "a\tb",
    "escape": "a\x1b[31mb",
    "DEL": "a\x7fb",
    "C1 control": "a\x85b",
    "right-to-left override": "a\u202eb",
    "zero-width space": "a\u200bb",
    "line separator": "a\u2028b",
    "paragraph separator": "a\u2029b",
}


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_have_no_problem(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_bad_names_have_a_problem(name):
    problem = name_problem(name)
    assert isinstance(problem, str) and problem.strip()


def test_length_problem_names_the_limit():
    assert "32" in name_problem("x" * 33)
    assert "1" in name_problem("")


def test_whitespace_and_control_problems_are_explained():
    assert "whitespace" in name_problem(" alice")
    assert "control" in name_problem("a\x01b")


def test_ws_path_is_slash_ws():
    assert handshake.WS_PATH == "/ws"


@pytest.mark.parametrize("path", ["/ws", "/ws?", "/ws?other=1", "/ws?other=1&more=2"])
def test_anonymous_admission(path):
    assert admit(path) == Admission(None)


@pytest.mark.parametrize(
    "path, name",
    [
        ("/ws?username=alice", "alice"),
        ("/ws?username=a%20b", "a b"),
        ("/ws?username=Zo%C3%AB", "Zoë"),
        ("/ws?username=%5Bbob%5D", "[bob]"),
        ("/ws?x=1&username=carol&y=2", "carol"),
        ("/ws?username=" + "x" * 32, "x" * 32),
    ],
)
def test_named_admission(path, name):
    assert admit(path) == Admission(name)


@pytest.mark.parametrize("path", ["/", "", "/w", "/WS", "/wss", "/api/ws", "/x?p=/ws", "//ws"])
def test_other_paths_are_not_found(path):
    with pytest.raises(Refused) as info:
        admit(path)
    assert info.value.status == 404
    assert info.value.reason


@pytest.mark.parametrize("path, room", [("/ws", "lobby"), ("/ws/x", "x"), ("/ws/Kitchen-2.b_c", "Kitchen-2.b_c"),
                                        ("/ws/" + "r" * 64 + "?username=ann", "r" * 64)])
def test_the_path_names_the_room(path, room):
    assert admit(path).room == room


@pytest.mark.parametrize("path, problem", [
    ("/ws/", "must be 1 to 64 characters"),
    ("/ws/" + "r" * 65, "must be 1 to 64 characters"),
    ("/ws/a%20b", "may contain only A-Z a-z 0-9 _ . -"),
    ("/ws/a/b", "may contain only A-Z a-z 0-9 _ . -"),
    ("/ws/.hidden", "must start with a letter or digit"),
])
def test_a_bad_room_name_is_refused_with_the_reason(path, problem):
    with pytest.raises(Refused) as info:
        admit(path)
    assert (info.value.status, info.value.reason) == (400, f"invalid room name: {problem}")


@pytest.mark.parametrize("query, reason", [
    ("history=x", "invalid history: must be a whole number of messages"),
    ("history=-1", "invalid history: must be a whole number of messages"),
    ("history=1&history=2", "invalid history: given more than once"),
    ("since=42", "invalid since: malformed message id: expected EPOCH:SEQ"),
    ("since=ab:01", "invalid since: malformed message id: expected EPOCH:SEQ"),
])
def test_a_bad_history_or_since_is_refused(query, reason):
    with pytest.raises(Refused) as info:
        admit("/ws?" + query)
    assert (info.value.status, info.value.reason) == (400, reason)


def test_history_since_and_session_are_read_from_the_query():
    asked = admit("/ws/r?history=5&since=kq3VZ0aB:42&session=tok")
    assert (asked.history, tuple(asked.since), asked.session) == (5, ("kq3VZ0aB", 42), "tok")


@pytest.mark.parametrize(
    "path",
    [
        "/ws?username=",
        "/ws?username=" + "x" * 33,
        "/ws?username=%20alice",
        "/ws?username=alice%20",
        "/ws?username=a%00b",
        "/ws?username=a%0Ab",
        "/ws?username=a%0Db",
        "/ws?username=a%1Bb",
        "/ws?username=a%E2%80%AEb",  # U+202E
        "/ws?username=alice&username=bob",
        "/ws?username=%FF",  # not UTF-8
    ],
)
def test_bad_usernames_are_bad_requests(path):
    with pytest.raises(Refused) as info:
        admit(path)
    assert info.value.status == 400
    assert info.value.reason.strip()


def test_bad_request_reason_says_what_is_wrong():
    with pytest.raises(Refused) as info:
        admit("/ws?username=" + "x" * 33)
    assert "username" in info.value.reason and "32" in info.value.reason
    with pytest.raises(Refused) as info:
        admit("/ws?username=%20bob")
    assert "whitespace" in info.value.reason


def test_refusal_is_checked_on_path_before_username():
    with pytest.raises(Refused) as info:
        admit("/chat?username=%00")
    assert info.value.status == 404


# Issue 8, point 19: the HTTP rules a proxy or a browser relies on.

@pytest.mark.parametrize("hosts", [[], ["chat.example", "evil.example"], ["a", "a"]],
                         ids=["no Host", "two Hosts", "the same Host twice"])
def test_a_request_needs_exactly_one_host(hosts):
    headers = Headers([("Host", h) for h in hosts])
    for path in ("/ws", "/healthz"):
        with pytest.raises(Refused) as info:
            handshake.request_target(path, headers)
        assert info.value.status == 400 and "Host" in info.value.reason
    with pytest.raises(Refused) as info:
        handshake.admit("/ws", headers, handshake.Policy())
    assert info.value.status == 400


@pytest.mark.parametrize("path", ["//[::1/ws", "http://[x/ws", "//[/healthz"])
def test_an_unparsable_target_is_a_bad_request(path):
    with pytest.raises(Refused) as info:
        handshake.request_target(path, Headers([("Host", "x")]))
    assert info.value.status == 400


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_authorization_scheme_is_case_insensitive(scheme):
    policy = handshake.Policy(token="s3cret")
    assert admit("/ws", ("Authorization", f"{scheme} s3cret"), policy=policy) == Admission(None)
    with pytest.raises(Refused) as info:
        admit("/ws", ("Authorization", f"{scheme} wrong"), policy=policy)
    assert info.value.status == 401


@pytest.mark.parametrize("value", ["Basic s3cret", "Bearers3cret", "s3cret", "Token s3cret"])
def test_other_schemes_are_not_a_bearer_token(value):
    with pytest.raises(Refused) as info:
        admit("/ws", ("Authorization", value), policy=handshake.Policy(token="s3cret"))
    assert info.value.status == 401


FILLERS = {
    "hangul filler": "\u3164",
    "braille blank": "\u2800",
    "hangul choseong filler": "\u115f",
    "hangul jungseong filler": "\u1160",
    "halfwidth hangul filler": "\uffa0",
}


@pytest.mark.parametrize("filler", list(FILLERS.values()), ids=list(FILLERS))
def test_a_name_of_invisible_fillers_is_refused_like_an_empty_one(filler):
    for name in (filler, filler * 3, f"{filler} {filler}", f" {filler}\u3000"):
        assert name_problem(name), repr(name)
        with pytest.raises(Refused) as info:
            admit("/ws?username=" + quote(name))
        assert info.value.status == 400 and "username" in info.value.reason
    assert name_problem(f"a{filler}b") is None  # inside a visible name it is just a letter
