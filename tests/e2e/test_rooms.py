"""Rooms, the broadcast.v1 protocol, history, recovery, presence and names, on one node (issue 11).

Real server processes; three independent clients: websockets' sync client
(with ``subprotocols=["broadcast.v1"]`` for the structured protocol, without
for plain text), websocket-client, and the raw socket client of rawws.py
where the exact bytes matter.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest
from websockets.exceptions import InvalidStatus

from support.process import wait_connections, wait_joined
from support.rawws import (OP_PONG, OP_TEXT, Frame, RawWS, handshake_request, open_socket,
                           read_http_response)
from support.wsclients import (Closed, expect_silence, http_get, recv, recv_n, url_for, ws_connect, ws_joined,
                               wsc_connect)

WAIT = 10.0  # any one expected message or state
V1 = ["broadcast.v1"]
MAX_MESSAGES = 20_000  # bounds the background publisher of the join and recovery tests
FIRST = 50  # what a client sees before it is joined late, or cut
LIVE_BEFORE_STOP = 5  # live messages a client sees after joining again before the publisher stops
# Room for everything the publisher can send, so that history covers it all.
BIG_HISTORY = ("--history-size", str(MAX_MESSAGES), "--history-bytes", str(64 * 1024 * 1024),
               "--history-total-bytes", str(64 * 1024 * 1024))


def structured(server, path: str = "/ws", username: str | None = None, **kwargs):
    return ws_connect(url_for(server, username, path), subprotocols=V1, **kwargs)


def objects(ws, n: int) -> list[dict]:
    return [json.loads(text) for text in recv_n(ws, n, WAIT)]


def until(ws, kind: str) -> list[dict]:
    """Every object up to and including the first of ``kind``."""
    got = []
    while not got or got[-1]["kind"] != kind:
        got.append(json.loads(recv(ws, WAIT)))
    return got


def seq(obj: dict) -> int:
    return int(obj["id"].rpartition(":")[2])


def refused(url: str, **kwargs) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        with ws_connect(url, **kwargs):
            pass
    response = info.value.response
    return response.status_code, response.body.decode().strip()


class Publisher(threading.Thread):
    """Sends m0, m1 ... into a room from its own plain connection until told to stop (or MAX_MESSAGES)."""

    def __init__(self, server, path: str) -> None:
        super().__init__(daemon=True)
        self.ws = wsc_connect(url_for(server, "pub", path))
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stop.is_set() and self.sent < MAX_MESSAGES:
            self.ws.send(f"m{self.sent}")
            self.sent += 1

    def finish(self) -> str:
        """Stop; the text of the last message sent."""
        self.stop.set()
        self.join(WAIT)
        assert not self.is_alive()
        return f"m{self.sent - 1}"

    def close(self) -> None:
        self.ws.close()


def publishing(server, path: str, ws) -> tuple[Publisher, list[dict]]:
    """Start a publisher into the room ``ws`` joined; return once ``ws`` has seen its first FIRST messages."""
    objects(ws, 1)  # its presence
    publisher = Publisher(server, path)
    publisher.start()
    return publisher, objects(ws, FIRST)


def live_until(ws, got: list[dict], publisher: Publisher) -> list[dict]:
    """Read a few live messages, stop the publisher, then read on to its last message."""
    while sum(obj["kind"] == "message" for obj in got) < LIVE_BEFORE_STOP:
        got.append(json.loads(recv(ws, WAIT)))
    last = publisher.finish()
    while last not in [obj.get("text") for obj in got[-2:]]:
        got.append(json.loads(recv(ws, WAIT)))
    publisher.close()
    return [obj for obj in got if obj["kind"] in ("history", "message")]


# 1. Rooms


def test_two_rooms_never_see_each_others_messages(server):
    anon = wsc_connect(url_for(server, path="/ws/blue"))
    try:
        with ws_connect(url_for(server, "ann", "/ws/red")) as ann, structured(server, "/ws/blue", "bob") as bob:
            assert objects(bob, 1)[0]["kind"] == "presence"
            wait_connections(server, 3)
            ann.send("red one")
            anon.send("blue one")
            assert recv(ann, WAIT) == "[ann] red one"
            said = objects(bob, 1)[0]
            assert (said["kind"], said["room"], said["from"], said["text"]) == ("message", "blue", None, "blue one")
            assert recv_n(anon, 2, WAIT) == ["* bob joined", "blue one"]
            for ws in (ann, bob, anon):
                expect_silence(ws, 0.3)
    finally:
        anon.close()


@pytest.mark.parametrize("path, problem", [
    ("/ws/", "must be 1 to 64 characters"),
    ("/ws/" + "r" * 65, "must be 1 to 64 characters"),
    ("/ws/caf%C3%A9", "may contain only A-Z a-z 0-9 _ . -"),
    ("/ws/-dash", "must start with a letter or digit"),
])
def test_a_bad_room_name_gets_400_with_the_reason(server, path, problem):
    assert refused(url_for(server, path=path)) == (400, f"invalid room name: {problem}")


def test_past_max_rooms_a_new_room_gets_503_and_a_room_goes_with_its_last_member(start_server):
    server = start_server("--max-rooms", "2", "--history-size", "0")
    with ws_connect(url_for(server, path="/ws/a")) as a, ws_connect(url_for(server, path="/ws/b")):
        assert refused(url_for(server, path="/ws/c")) == (503, "too many rooms")
        with ws_connect(url_for(server, path="/ws/a")):  # an existing room is no new room
            pass
        a.close()
        wait_connections(server, 1)
        status, body = http_get(server, "/rooms")
        assert (status, [r["room"] for r in json.loads(body)["rooms"]]) == (200, ["b"])
        with ws_connect(url_for(server, path="/ws/c")) as c:
            c.send("in c")
            assert recv(c, WAIT) == "in c"


def test_a_room_with_history_outlives_its_members(server):
    with structured(server, "/ws/kept", "ann") as ann:
        objects(ann, 1)
        ann.send("remember me")
        objects(ann, 1)
    wait_connections(server, 0)
    with structured(server, "/ws/kept") as later:
        first, presence = objects(later, 2)
    assert (first["kind"], first["text"], first["from"]) == ("history", "remember me", "ann")
    assert (presence["kind"], presence["users"], presence["anonymous"]) == ("presence", [], 1)


# 2. The two protocols


def test_a_plain_client_of_the_go_original_gets_todays_bytes_beside_a_structured_one(server):
    """No subprotocol asked: no Sec-WebSocket-Protocol back, no history replayed, and the very frames of before."""
    with structured(server, username="old") as old:
        objects(old, 1)
        old.send("before you came")
        objects(old, 1)
        sock = open_socket(server.port, WAIT)
        sock.sendall(handshake_request(server.port, "/ws?username=Alice"))
        response = read_http_response(sock, WAIT)
        assert response.status == 101
        assert "sec-websocket-protocol" not in response.headers
        with RawWS(sock, response.rest) as alice:
            alice.ping(b"joined?")  # answered once "* Alice joined" is out, before Bob comes
            assert alice.recv_frame(WAIT) == Frame(True, 0, OP_PONG, b"joined?")
            with structured(server, username="Bob") as bob:
                objects(bob, 2)  # its history and presence
                assert alice.recv_frame(WAIT) == Frame(True, 0, OP_TEXT, b"* Bob joined")
                assert objects(old, 2)[1]["kind"] == "join"  # Alice's, then Bob's
                alice.send_text("hi")
                assert alice.recv_frame(WAIT) == Frame(True, 0, OP_TEXT, b"[Alice] hi")
                said = objects(bob, 1)[0]
                assert (said["kind"], said["from"], said["text"], said["room"]) == ("message", "Alice", "hi", "lobby")
                assert objects(old, 1)[0]["text"] == "hi"
                bob.send(b"\x00\xffbinary")
                assert alice.recv_frame(WAIT) == Frame(True, 0, 0x2, b"\x00\xffbinary")
                assert recv(old, WAIT) == b"\x00\xffbinary"  # binary is binary to both
                bob.send('{"kind":"message","text":"from json"}')
                assert alice.recv_frame(WAIT) == Frame(True, 0, OP_TEXT, b"[Bob] from json")


def test_a_plain_client_gets_history_only_when_it_asks(server):
    with ws_connect(url_for(server, "ann")) as ann:
        for i in range(3):
            ann.send(f"h{i}")
        assert recv_n(ann, 3, WAIT) == ["[ann] h0", "[ann] h1", "[ann] h2"]
        with ws_connect(url_for(server, path="/ws?history=2")) as asked, ws_connect(server.url) as not_asked:
            assert recv_n(asked, 2, WAIT) == ["[ann] h1", "[ann] h2"]
            ann.send("live")
            assert recv(asked, WAIT) == "[ann] live"
            assert recv(not_asked, WAIT) == "[ann] live"


def test_a_bad_request_gets_an_error_object_and_the_client_stays(server):
    with structured(server) as ws:
        objects(ws, 1)
        for frame, reason in [('{"kind":"shout"}', "unknown kind"), ('{"text":"hi"}', "missing kind"),
                              ('{"kind":"message"', "not valid JSON")]:
            ws.send(frame)
            error = objects(ws, 1)[0]
            assert (error["kind"], error["id"], error["reason"]) == ("error", None, reason)
        ws.send("still here")
        assert objects(ws, 1)[0]["text"] == "still here"


# 3. History: a late joiner


def test_a_late_joiner_gets_the_history_then_live_with_nothing_missing_or_doubled(start_server):
    server = start_server(*BIG_HISTORY)
    with structured(server, "/ws/busy", "early") as early:
        publisher, _ = publishing(server, "/ws/busy", early)
        with structured(server, "/ws/busy", "late") as late:  # mid-stream
            got = until(late, "presence")
            replayed = len(got) - 1
            said = live_until(late, got, publisher)
    assert [obj["text"] for obj in said] == [f"m{i}" for i in range(publisher.sent)]
    assert [seq(obj) for obj in said] == list(range(1, publisher.sent + 1))
    assert replayed > FIRST
    kinds = [obj["kind"] for obj in got]
    assert set(kinds[:replayed]) == {"history"} and set(kinds[replayed + 1:]) == {"message"}


# 4. Recovery


def test_recovery_after_a_connection_is_cut_mid_stream_gives_every_message_once_in_order(start_server):
    server = start_server(*BIG_HISTORY)
    with structured(server, "/ws/flow", "cut") as first:
        publisher, seen = publishing(server, "/ws/flow", first)
        first.socket.shutdown(socket.SHUT_RDWR)  # cut: no close frame, mid-stream
    wait_connections(server, 1)  # only the publisher is left
    with structured(server, f"/ws/flow?username=cut&since={seen[-1]['id']}") as again:
        said = live_until(again, seen, publisher)
    assert [obj["text"] for obj in said] == [f"m{i}" for i in range(publisher.sent)]
    assert "gap" not in [obj["kind"] for obj in seen]


def test_a_gap_notice_when_history_cannot_cover_what_was_missed(start_server):
    server = start_server("--history-size", "5")
    with ws_connect(url_for(server, "pub", "/ws/small")) as pub:
        with structured(server, "/ws/small") as reader:
            objects(reader, 1)
            pub.send("m0")
            last = objects(reader, 1)[0]["id"]
        for i in range(1, 21):
            pub.send(f"m{i}")
        recv_n(pub, 21, WAIT)
        with structured(server, f"/ws/small?since={last}") as back:
            gap, *history, presence = objects(back, 7)
        assert (gap["kind"], gap["missed"], gap["reason"]) == ("gap", 15, "history does not reach back that far")
        assert [h["text"] for h in history] == [f"m{i}" for i in range(16, 21)]
        assert presence["kind"] == "presence"
        epoch = last.partition(":")[0]
        other = ("A" if epoch[0] != "A" else "B") + epoch[1:]
        with structured(server, f"/ws/small?since={other}:3") as lost:
            gap, *history, presence = objects(lost, 7)
        assert (gap["kind"], gap["missed"], gap["reason"]) == ("gap", None, "history restarted")
        assert [h["text"] for h in history] == [f"m{i}" for i in range(16, 21)]
        with structured(server, f"/ws/small?since={history[-1]['id']}") as current:
            assert objects(current, 1)[0]["kind"] == "presence"  # nothing missed: no gap, no history


# 5. Presence


def test_presence_on_request_and_over_http(start_server):
    server = start_server("--token", "s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    with structured(server, "/ws/den?token=s3cret", "zed") as zed, \
            ws_connect(url_for(server, "amy", "/ws/den?token=s3cret")), \
            ws_connect(url_for(server, path="/ws/den?token=s3cret")), \
            ws_connect(url_for(server, path="/ws?token=s3cret")):
        wait_joined(server, 4)
        until(zed, "join")  # its own presence, then amy's join: a presence is where it stands in the order
        zed.send('{"kind":"presence"}')
        presence = until(zed, "presence")[-1]
        assert (presence["users"], presence["anonymous"], presence["room"]) == (["amy", "zed"], 1, "den")
        assert http_get(server, "/rooms/den", auth) == (
            200, json.dumps({"room": "den", "users": ["amy", "zed"], "anonymous": 1}) + "\n")
        status, body = http_get(server, "/rooms?token=s3cret")
        assert (status, json.loads(body)) == (200, {"rooms": [{"room": "den", "users": 2, "anonymous": 1},
                                                              {"room": "lobby", "users": 0, "anonymous": 1}]})
        assert http_get(server, "/rooms/nowhere", auth)[0] == 404
        assert http_get(server, "/rooms")[0] == 401
        assert http_get(server, "/rooms/den")[0] == 401
    assert "s3cret" not in server.log


# 6. Names


def test_a_duplicate_name_gets_409_and_its_session_token_takes_it_over(server):
    with structured(server, "/ws/hall", "Alice") as alice, structured(server, "/ws/hall", "Bob") as bob:
        token = alice.response.headers["Broadcast-Session"]
        objects(alice, 1)
        objects(bob, 1)
        assert objects(alice, 1)[0]["kind"] == "join"  # Bob's
        assert refused(url_for(server, "Alice", "/ws/hall")) == (409, "name Alice is taken in room hall")
        assert refused(url_for(server, "Alice", "/ws/hall?session=not-the-token"))[0] == 409
        assert refused(url_for(server, "Bob", f"/ws/hall?session={token}"))[0] == 409  # a token is for its name
        with ws_connect(url_for(server, "Alice", "/ws/other")):  # unique per room, not per server
            pass
        bob.send("marker")  # what Bob heard before the resume ends here
        assert until(bob, "message")[-1]["text"] == "marker"
        with structured(server, "/ws/hall?session=" + token, "Alice") as resumed:
            assert resumed.response.headers["Broadcast-Session"] == token
            with pytest.raises(Closed) as closed:
                while True:
                    recv(alice, WAIT)
            assert (closed.value.code, closed.value.reason) == (4000, "replaced by a new connection")
            resumed.send("me again")
            said = until(bob, "message")
            # A resume is no leave and no join: Bob hears only the message.
            assert [obj["kind"] for obj in said] == ["message"], said
            assert said[-1]["from"] == "Alice"


def test_duplicate_names_are_allowed_when_the_operator_says_so(start_server):
    server = start_server("--allow-duplicate-names")
    with ws_connect(url_for(server, "twin")) as one, ws_connect(url_for(server, "twin")):
        assert recv(one, WAIT) == "* twin joined"


def test_a_structured_joiner_alone_gets_its_session_token_and_resumes_with_it(server):
    # Each named joiner's notice is out before the next client comes: else
    # Alice could hear "Carol joined" after her presence, and Carol hear Bob's before Alice's.
    with ws_joined(url_for(server, "Carol", "/ws/keys")) as carol, \
            ws_joined(url_for(server, "Alice", "/ws/keys"), subprotocols=V1) as alice, \
            structured(server, "/ws/keys") as anon:
        token = until(alice, "presence")[-1]["session"]
        assert token == alice.response.headers["Broadcast-Session"]
        others = until(anon, "presence")
        assert "session" not in others[-1]  # anonymous: no name, no token
        with structured(server, "/ws/keys", "Bob") as bob:
            others += until(bob, "presence")
            bobs = others[-1]["session"]
            assert bobs == bob.response.headers["Broadcast-Session"] and bobs != token
            heard = until(alice, "join")  # Bob's
            alice.send('{"kind":"presence"}')  # asked for: the room's names, no token
            heard += until(alice, "presence")
            assert [obj["kind"] for obj in heard] == ["join", "presence"]
            assert all("session" not in obj for obj in heard)
            # Plain text is as it was: no presence, no token, the very lines of the Go original.
            assert recv_n(carol, 2, WAIT) == ["* Alice joined", "* Bob joined"]

            with structured(server, "/ws/keys?session=" + token, "Alice") as resumed:
                assert until(resumed, "presence")[-1]["session"] == token
                with pytest.raises(Closed) as closed:
                    while True:
                        recv(alice, WAIT)
                assert (closed.value.code, closed.value.reason) == (4000, "replaced by a new connection")
                resumed.send("me again")
                others += until(bob, "message") + until(anon, "message")
                assert others[-1]["text"] == "me again"
                assert recv(carol, WAIT) == "[Alice] me again"  # no leave, no join: a resume
                # Everything the others got, Bob's own token in his presence aside: never Alice's.
                assert [obj for obj in others if token in json.dumps(obj)] == []
    assert token not in server.log and bobs not in server.log
