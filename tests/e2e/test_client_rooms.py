"""The chat client with rooms, broadcast.v1, /who by presence, and resuming a lost session.

A lost connection is made by a small TCP forwarder between the client and
the server that the test cuts (and holds shut while the room goes on), so the
server stays up with its history in memory. Which close codes end a session
is told by a small websockets server that closes with the code asked for,
as test_client.py does for the close frames the client sends.
"""

from __future__ import annotations

import io
import json
import queue
import signal
import sys
import threading
from types import SimpleNamespace

import pexpect
import pytest
from websockets.sync.client import connect
from websockets.sync.server import serve

from support.process import CLIENT, ROOT, START_TIMEOUT_S, ClientProcess, clean_env
from support.proxy import Relay

from broadcast.client import RECONNECT_MAX_DELAY_S

WAIT = 5.0  # seconds for any one expected event
STARTED = START_TIMEOUT_S  # for a client's first connection: a Python program's start under load
# For a reconnection: the backoff may have grown to its cap while the test
# held the connection shut, and the attempt after it may come a cap later.
REJOIN_WAIT_S = 2 * RECONNECT_MAX_DELAY_S + START_TIMEOUT_S
ENV = clean_env()
CUT_MESSAGES = 10  # published before the cut, while the client reads
MISSED_MESSAGES = 20  # published while the client is cut off
LIVE_MESSAGES = 10  # published once the client is back
LOST = "connection lost: the server hung up without a close frame; reconnecting"


@pytest.fixture
def proxy(server):
    cutter = Relay(server.port)
    yield cutter
    cutter.close()


def receive_until(ws, wanted: str, timeout: float = WAIT) -> list[str]:
    """Messages received up to and including ``wanted``, each within ``timeout``."""
    got: list[str] = []
    while not got or got[-1] != wanted:
        got.append(ws.recv(timeout=timeout))
    return got


def publish(ws, numbers: range) -> None:
    """Send m0, m1 ... and wait for the echo of the last: the server has them all in the room's order."""
    for i in numbers:
        ws.send(f"m{i}")
    receive_until(ws, f"m{numbers[-1]}")


def numbered(numbers) -> list[str]:
    return [f"m{i}" for i in numbers]


def cut_while_the_room_goes_on(server, proxy, piped, *client_args: str):
    """A client through ``proxy``, cut off while MISSED_MESSAGES are published: (client, its stdout lines)."""
    total = CUT_MESSAGES + MISSED_MESSAGES + LIVE_MESSAGES
    with connect(server.url, open_timeout=WAIT, close_timeout=1) as observer:
        client = piped("--addr", f"127.0.0.1:{proxy.port}", "--username", "Reader", *client_args)
        receive_until(observer, "* Reader joined", STARTED)
        publish(observer, range(CUT_MESSAGES))
        client.stdout.wait_for(rf"^m{CUT_MESSAGES - 1}$")
        proxy.down()
        receive_until(observer, "* Reader left")  # the server has seen the cut
        publish(observer, range(CUT_MESSAGES, CUT_MESSAGES + MISSED_MESSAGES))
        proxy.up()
        receive_until(observer, "* Reader joined", REJOIN_WAIT_S)
        publish(observer, range(CUT_MESSAGES + MISSED_MESSAGES, total))
        client.stdout.wait_for(rf"^m{total - 1}$")
    client.proc.stdin.close()
    assert client.wait() == 0
    return client, client.stdout.all()


def test_recovery_after_the_connection_is_cut_mid_stream(server, proxy, piped):
    client, lines = cut_while_the_room_goes_on(server, proxy, piped)
    assert lines == numbered(range(CUT_MESSAGES + MISSED_MESSAGES + LIVE_MESSAGES))  # each once, in order
    assert client.stderr.all() == [LOST, f"reconnected; recovered {MISSED_MESSAGES} messages"]


def test_a_gap_is_told_when_the_history_cannot_cover_the_cut(start_server, piped):
    history = 5
    server = start_server("--history-size", str(history))
    proxy = Relay(server.port)
    try:
        client, lines = cut_while_the_room_goes_on(server, proxy, piped)
    finally:
        proxy.close()
    kept = CUT_MESSAGES + MISSED_MESSAGES - history  # the first of the missed the history still holds
    assert lines == numbered([*range(CUT_MESSAGES), *range(kept, CUT_MESSAGES + MISSED_MESSAGES + LIVE_MESSAGES)])
    assert client.stderr.all() == [LOST, f"reconnected; {MISSED_MESSAGES - history} messages could not be recovered"]


def test_a_restarted_server_is_rejoined_with_the_room_going_on(start_server, piped):
    """SIGTERM closes with 1001; the client finds the new server on the port, whose history is new.

    The client dials through a relay that the test holds shut while the new
    server starts, so the observer is in the room before the client can be:
    otherwise a quick rejoin lands before the observer, and its notice is missed.
    """
    server = start_server()
    relay = Relay(server.port)
    try:
        client = piped("--addr", f"127.0.0.1:{relay.port}", "--username", "Reader", "--room", "dev")
        with connect(f"{server.url}/dev", open_timeout=WAIT, close_timeout=1) as observer:
            receive_until(observer, "* Reader joined", STARTED)
            publish(observer, range(2))
            client.stdout.wait_for("^m1$")
        server.stop(signal.SIGTERM)
        client.stderr.wait_for(r"^connection closed by server: 1001 .*; reconnecting$", STARTED)
        relay.down()  # after the 1001: the close the client reads is the server's own
        again = start_server("--port", str(server.port))
        with connect(f"{again.url}/dev", open_timeout=WAIT, close_timeout=1) as observer:
            relay.up()
            receive_until(observer, "* Reader joined", REJOIN_WAIT_S)
            publish(observer, range(2, 4))
        client.stdout.wait_for("^m3$")
        client.send("back")
        client.stdout.wait_for(r"^\[Reader\] back$")
        client.proc.stdin.close()
        assert client.wait() == 0
    finally:
        relay.close()
    assert client.stdout.all() == [*numbered(range(4)), "[Reader] back"]
    assert client.stderr.all()[1:] == ["reconnected; some messages could not be recovered"]


def test_a_name_taken_while_cut_off_ends_the_session_with_the_409(server, proxy, piped):
    client = piped("--addr", f"127.0.0.1:{proxy.port}", "--username", "Alice")
    with connect(server.url, open_timeout=WAIT, close_timeout=1) as observer:
        receive_until(observer, "* Alice joined", STARTED)
        client.send("here")  # sent once the client has the handshake's answer: the cut is not in the handshake
        receive_until(observer, "[Alice] here")
        proxy.down()
        receive_until(observer, "* Alice left")
        with connect(f"{server.url}?username=Alice", open_timeout=WAIT, close_timeout=1):
            receive_until(observer, "* Alice joined")
            proxy.up()
            assert client.wait(REJOIN_WAIT_S) == 1  # refused once, not tried again
    errors = client.stderr.all()
    assert errors[0] == LOST
    assert errors[1:] == [f"broadcast-client: ws://127.0.0.1:{proxy.port}/ws?username=Alice rejected the handshake: "
                          "HTTP 409 name Alice is taken in room lobby"]


@pytest.fixture
def scripted_server():
    """A websockets server that speaks broadcast.v1, sends ``state.frames`` and presence, then closes with ``state.code``.

    Each request's path goes to ``paths``: how often, and with what, the client came back.
    """
    state = SimpleNamespace(code=1000, paths=queue.Queue(), frames=[])

    def handler(ws) -> None:
        state.paths.put(ws.request.path)
        for frame in state.frames:
            ws.send(json.dumps(frame))
        ws.send(json.dumps({"kind": "presence", "id": "E:3", "room": "lobby", "ts": 1.0,
                            "users": ["Alice"], "anonymous": 0}))
        ws.close(state.code, "scripted")

    def with_session(connection, request, response):
        response.headers["Broadcast-Session"] = "tok3n"
        return response

    with serve(handler, "127.0.0.1", 0, subprotocols=["broadcast.v1"], process_response=with_session) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        state.addr = f"127.0.0.1:{srv.socket.getsockname()[1]}"
        yield state
        srv.shutdown()


@pytest.mark.parametrize("code", [1000, 1008, 4000])
def test_no_reconnection_after_a_close_that_says_stay_away(scripted_server, piped, code):
    scripted_server.code = code
    client = piped("--addr", scripted_server.addr, "--username", "Alice", "--listen-only")
    assert client.wait(STARTED) == (0 if code == 1000 else 1)
    errors = client.stderr.all()
    assert len(errors) == 1 and errors[0].startswith(f"connection closed by server: {code} "), errors
    assert scripted_server.paths.get(timeout=0) == "/ws?username=Alice&history=0"
    assert scripted_server.paths.empty()


@pytest.mark.parametrize("code", [1011, 1012, 1013])
def test_reconnection_after_a_restart_close_resumes_with_the_last_id_and_session(scripted_server, piped, code):
    scripted_server.code = code
    client = piped("--addr", scripted_server.addr, "--username", "Alice", "--listen-only")
    assert scripted_server.paths.get(timeout=STARTED) == "/ws?username=Alice&history=0"
    assert scripted_server.paths.get(timeout=REJOIN_WAIT_S) == "/ws?username=Alice&since=E%3A3&session=tok3n"
    client.stderr.wait_for(r"^reconnected; recovered 0 messages$")
    assert client.stop(signal.SIGTERM) == 0
    assert "tok3n" not in client.stderr.text


def test_who_lists_the_room_by_name_with_the_anonymous_count(server, piped):
    with connect(f"{server.url}/dev?username=Bob", open_timeout=WAIT, close_timeout=1) as bob, \
            connect(f"{server.url}/dev", open_timeout=WAIT, close_timeout=1), \
            connect(f"{server.url}?username=Elsewhere", open_timeout=WAIT, close_timeout=1):
        client = piped("--addr", server.addr, "--username", "Alice", "--room", "dev")
        receive_until(bob, "* Alice joined", STARTED)
        client.send("/who")
        assert client.stderr.expect("in dev:") == "in dev: Alice, Bob, 1 anonymous"
    client.proc.stdin.close()
    assert client.wait() == 0


def test_rooms_never_see_each_others_messages(server, piped):
    red = piped("--addr", server.addr, "--username", "Ann", "--room", "red")
    blue = piped("--addr", server.addr, "--username", "Ben", "--room", "blue")
    with connect(f"{server.url}/red", open_timeout=WAIT, close_timeout=1) as in_red, \
            connect(server.url, open_timeout=WAIT, close_timeout=1) as in_lobby:
        red.send("to red")
        red.stdout.wait_for(r"^\[Ann\] to red$", STARTED)
        blue.send("to blue")
        blue.stdout.wait_for(r"^\[Ben\] to blue$", STARTED)
        in_lobby.send("to lobby")
        receive_until(in_lobby, "to lobby")
        in_red.send("red again")
        red.stdout.wait_for("^red again$")
        assert "to blue" not in receive_until(in_red, "red again")
    for client in (red, blue):
        client.proc.stdin.close()
        assert client.wait() == 0
    assert red.stdout.all() == ["[Ann] to red", "red again"]
    assert blue.stdout.all() == ["[Ben] to blue"]


def test_bad_room_is_a_usage_error():
    client = ClientProcess("--addr", "127.0.0.1:1", "--room", "no/slash", env=ENV, stdin=False)
    assert client.wait(STARTED) == 2
    assert client.stderr.all() == ["broadcast-client: error: invalid --room 'no/slash': "
                                   "may contain only A-Z a-z 0-9 _ . -"]


def test_terminal_shows_the_room_in_the_connect_line_and_its_history_first(server):
    with connect(f"{server.url}/dev?username=Bob", open_timeout=WAIT, close_timeout=1) as bob:
        bob.send("before you came")
        receive_until(bob, "[Bob] before you came")
        child = pexpect.spawn(sys.executable, [*CLIENT[1:], "--addr", server.addr, "--username", "Alice",
                                               "--room", "dev", "--no-color"],
                              cwd=str(ROOT), env={**ENV, "TERM": "xterm"}, encoding="utf-8", timeout=WAIT,
                              dimensions=(24, 160))
        child.logfile_read = io.StringIO()
        try:
            child.expect_exact(f"connected to ws://{server.addr}/ws/dev as Alice (2 online)", timeout=STARTED)
            child.expect_exact("[Bob] before you came")
            receive_until(bob, "* Alice joined")
            bob.send("live")
            child.expect_exact("[Bob] live")
        finally:
            child.close(force=True)


def test_timestamps_are_the_servers_and_a_wild_one_is_survived(scripted_server):
    """ts 3723 is 01:02:03 UTC; a ts past any calendar is shown with the time it arrived."""
    scripted_server.frames = [
        {"kind": "history", "id": "E:1", "room": "lobby", "ts": 3723.0, "from": "Bob", "text": "long ago"},
        {"kind": "message", "id": "E:2", "room": "lobby", "ts": 1e300, "from": "Bob", "text": "wild"},
    ]
    child = pexpect.spawn(sys.executable, [*CLIENT[1:], "--addr", scripted_server.addr, "--timestamps",
                                           "--no-color", "--reconnect-timeout", "0"],
                          cwd=str(ROOT), env={**ENV, "TERM": "xterm", "TZ": "UTC"}, encoding="utf-8",
                          timeout=WAIT, dimensions=(24, 160))
    child.logfile_read = io.StringIO()
    try:
        child.expect_exact("01:02:03 [Bob] long ago", timeout=STARTED)
        child.expect(r"\d\d:\d\d:\d\d \[Bob\] wild")
        child.expect_exact("connection closed by server: 1000")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Traceback" not in child.logfile_read.getvalue()
