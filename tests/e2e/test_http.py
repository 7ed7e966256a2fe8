"""HTTP and logs (issue 8, points 18 to 21), against real server processes.

The opening handshake is where a proxy, a browser and an attacker all meet
the server: these tests speak raw HTTP over sockets (``rawws``) to send what
no client library would, and read the server's log as an operator would.
"""

from __future__ import annotations

import os
import re
import signal
import time
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus

from broadcast import logs as logsafe
from support.process import wait_joined
from support.rawws import (
    OP_TEXT,
    RawWS,
    Timeout,
    Watcher,
    assert_chat_works,
    build_frame,
    handshake_request,
    is_eof_or_reset,
    open_socket,
    read_http_response,
    settled_stats,
    unread_by_server,
    wait_baseline,
)
from support.wsclients import Closed, recv, ws_connect

WAIT = 5.0  # seconds for any single expected event
# A control character that reached the log raw (tab and newline included:
# lines are split on newlines, so one inside a line is a forged line).
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def assert_clean_log(server) -> None:
    assert "Traceback" not in server.log, server.log
    for line in server.lines:
        assert not RAW_CONTROL.search(line), repr(line)


def exchange(port: int, data: bytes, timeout: float = WAIT):
    """Send ``data`` at once; the first response, and whether the server then hung up."""
    sock = open_socket(port, timeout)
    try:
        sock.sendall(data)
        response = read_http_response(sock, timeout)
        closed = response is None or response.status == 101 or is_eof_or_reset(sock, timeout)
        return response, closed
    finally:
        sock.close()


def get(port: int, path: str, *headers: tuple[str, str], host: bool = True) -> bytes:
    lines = [f"GET {path} HTTP/1.1"]
    if host:
        lines.append(f"Host: 127.0.0.1:{port}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# 18. Pipelined requests


def test_pipelined_healthz_requests_get_the_first_answer_then_a_clean_close(server):
    response, closed = exchange(server.port, get(server.port, "/healthz") * 2)
    assert response is not None, "no answer at all"
    assert response.status == 200, response
    assert b'"connections"' in response.body
    assert closed, "the server kept the connection after a Connection: close response"
    assert_clean_log(server)


def test_a_refused_upgrade_with_a_request_behind_it_gets_its_400(server):
    port = server.port
    data = handshake_request(port, "/ws?username=%20bad") + handshake_request(port, "/ws")
    response, closed = exchange(port, data)
    assert response is not None and response.status == 400, response
    assert b"invalid username" in response.body
    assert closed
    server.wait_for_log(r"refused \S+: 400 invalid username", WAIT)
    assert_clean_log(server)


@pytest.mark.parametrize("bad_frame", [
    build_frame(0x3, b"x"),  # reserved opcode
    build_frame(OP_TEXT, b"x", mask=False),  # a client must mask
    build_frame(OP_TEXT, b"x", rsv=4),  # no extension gives RSV1 a meaning
], ids=["reserved-opcode", "unmasked", "rsv1"])
def test_an_upgrade_followed_by_an_invalid_frame_gets_1002_and_never_joins(server, bad_frame):
    with Watcher(server.url + "?username=watcher") as watcher:
        wait_joined(server, 1)
        sock = open_socket(server.port)
        sock.sendall(handshake_request(server.port, "/ws?username=ghost") + bad_frame)
        response = read_http_response(sock)
        assert response is not None and response.status == 101, response
        conn = RawWS(sock, response.rest)
        with conn:
            close = conn.expect_close(WAIT)
        assert close.close_code == 1002, close
        server.wait_for_log(r"refused \S+: closed by server: 1002", WAIT)
        assert_chat_works(server.url, watcher, server=server)  # anything about ghost would be here by now
        assert not [m for m in watcher.messages if "ghost" in m], watcher.messages
    assert "connect ghost" not in server.log
    assert_clean_log(server)


def test_an_early_ping_is_answered_after_the_101(server):
    sock = open_socket(server.port)
    with RawWS(sock) as conn:
        sock.sendall(handshake_request(server.port) + build_frame(0x9, b"early"))
        response = read_http_response(sock)
        assert response is not None and response.status == 101, response
        conn.backlog = conn.parser.feed(response.rest)
        pong = conn.recv_frame(WAIT)
        assert (pong.opcode, pong.payload) == (0xA, b"early")
    assert_clean_log(server)


def test_a_request_taken_in_two_pieces_is_answered_once_whole(server):
    """What is in at accept is read then (by the acceptor); the rest, later, by the connection's own thread."""
    request = handshake_request(server.port, "/ws?username=halves")
    cut = request.index(b"\r\n") + 2  # the request line alone
    sock = open_socket(server.port)
    with RawWS(sock) as conn:
        sock.sendall(request[:cut])
        deadline = time.monotonic() + WAIT
        while unread_by_server(server.port, conn.port) != 0:  # read, and not answered: not whole yet
            assert time.monotonic() < deadline, "the server never read the request line"
            time.sleep(0.01)
        sock.sendall(request[cut:])
        response = read_http_response(sock)
        assert response is not None and response.status == 101, response
        conn.backlog = conn.parser.feed(response.rest)
        conn.send_text(b"whole")
        frame, _ = conn.recv_until(lambda f: f.opcode == OP_TEXT, WAIT)
    assert frame.payload == b"[halves] whole"
    server.wait_for_log(r"connect halves@", WAIT)
    assert_clean_log(server)


def test_a_message_and_a_close_right_behind_the_upgrade_are_both_answered(server):
    sock = open_socket(server.port)
    with RawWS(sock) as conn:
        sock.sendall(handshake_request(server.port, "/ws?username=hasty")
                     + build_frame(OP_TEXT, b"hi") + build_frame(0x8, b"\x03\xe8"))
        response = read_http_response(sock)
        assert response is not None and response.status == 101, response
        conn.backlog = conn.parser.feed(response.rest)
        frames = conn.wait_eof(WAIT)
    assert [(f.opcode, f.payload) for f in frames] == [(OP_TEXT, b"[hasty] hi"), (0x8, b"\x03\xe8")]
    server.wait_for_log(r"disconnect hasty@\S+: closed by client: 1000", WAIT)
    assert_clean_log(server)


# 19. The HTTP rules a proxy or a browser relies on


@pytest.mark.parametrize("path", ["/ws", "/healthz"])
def test_no_host_or_two_hosts_is_a_400(server, path):
    port = server.port
    for data in (get(port, path, ("Upgrade", "websocket"), host=False),
                 get(port, path, ("Host", "evil.example"))):
        response, closed = exchange(port, data)
        assert response is not None and response.status == 400, (data, response)
        assert b"Host" in response.body
        assert closed
    server.wait_for_log(r"refused \S+: 400 exactly one Host header", WAIT, count=2)
    assert_clean_log(server)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_case_insensitive(start_server, scheme):
    server = start_server("--token", "s3cret")
    with ws_connect(server.url, additional_headers={"Authorization": f"{scheme} s3cret"}) as ws:
        ws.send("in")
        assert recv(ws, WAIT) == "in"
    with pytest.raises(InvalidStatus) as info:
        with ws_connect(server.url, additional_headers={"Authorization": f"{scheme} wrong"}):
            pass
    assert info.value.response.status_code == 401
    assert "s3cret" not in server.log


@pytest.mark.parametrize("name", ["\u3164", "\u2800", "\u115f", "\u3164\u3164\u3164", "\u2800 \u2800"],
                         ids=["hangul-filler", "braille-blank", "choseong-filler", "three-fillers", "blank-space-blank"])
def test_a_username_of_invisible_fillers_is_refused(server, name):
    with Watcher(server.url + "?username=watcher") as watcher:
        with pytest.raises(InvalidStatus) as info:
            with ws_connect(server.url + "?username=" + quote(name)):
                pass
        assert info.value.response.status_code == 400
        assert b"invalid username" in info.value.response.body
        assert_chat_works(server.url, watcher, server=server)
        assert not [m for m in watcher.messages if "joined" in m], watcher.messages


# 20. No traceback, no raw control character in the log


@pytest.mark.parametrize("raw, shown", [
    ("a\x1b[31mb", "a\\x1b[31mb"),
    ("line\nforged INFO connect x", "line\\x0aforged INFO connect x"),
    ("\x00\t\r\x7f\x85\x9b", "\\x00\\x09\\x0d\\x7f\\x85\\x9b"),
    ("Zoë 李 🙂 [bob]", "Zoë 李 🙂 [bob]"),  # printable text is left as it is
])
def test_escape_writes_control_characters_as_hex(raw, shown):
    assert logsafe.escape(raw) == shown


def test_a_target_urlsplit_cannot_parse_is_a_400_not_a_traceback(server):
    for path in ("//[::1/ws", "http://[x/healthz", "//[/ws?username=a"):
        response, closed = exchange(server.port, handshake_request(server.port, path))
        assert response is not None and response.status == 400, (path, response)
        assert closed
    server.wait_for_log(r"refused \S+: 400 malformed request target", WAIT, count=3)
    assert_clean_log(server)


def test_a_malformed_request_is_answered_and_logged_escaped(server):
    port = server.port
    shapes = [
        handshake_request(port, extra_headers=[("X-Note", "a\x1b[31mred")]),  # ESC in a header value
        handshake_request(port, extra_headers=[("Origin", "http://a\x1b]0;owned\x07")]),
        b"GET /ws\xff HTTP/1.1\r\nHost: x\r\n\r\n",  # not ASCII
        get(port, "/healthz", ("Content-Length", "5")) + b"hello",  # a body
        get(port, "/ws", ("Transfer-Encoding", "chunked")),
    ]
    for data in shapes:
        response, closed = exchange(port, data)
        assert response is not None and response.status == 400, (data, response)
        assert closed
    server.wait_for_log(r"refused \S+: malformed request: ", WAIT, count=len(shapes))
    assert "a\\x1b[31mred" in server.log  # shown, escaped
    assert_clean_log(server)


def test_control_characters_from_a_request_are_escaped_in_the_log(start_server):
    server = start_server("--allowed-origin", "https://good.example")
    port = server.port
    # The path reaches the 404 line; a C1 CSI (0x9b, a legal obs-text byte in
    # a header) reaches the refused-origin line.
    exchange(port, handshake_request(port, "/x\x1b[2J\x7f"))
    exchange(port, handshake_request(port, extra_headers=[("Origin", "https://e\x9b2Jvil.example")]))
    server.wait_for_log(r"refused \S+: 404", WAIT)
    server.wait_for_log(r"refused \S+: 403", WAIT)
    assert "/x\\x1b[2J\\x7f" in server.log
    assert "https://e\\x9b2Jvil.example" in server.log
    assert_clean_log(server)


# Header values: mostly legal (visible ASCII and obs-text, which the parser
# passes on as Latin-1, C1 controls included), some not, some that admit.
_VALUES = st.one_of(
    st.binary(max_size=24).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7f)),
    st.binary(max_size=24),
    st.sampled_from([b"https://good.example", b"https://e\x9b31mvil.example", b"Bearer tok", b"bearer tok",
                     b"Basic tok", b"permessage-deflate", b"chat, chat", b"0", b"13", b""]),
)
_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x2FFF), max_size=12)


def _often(common, *rare):
    """Mostly ``common``, so that most requests get past the first check."""
    return st.sampled_from([common] * 12 + list(rare))


@st.composite
def hostile_request(draw, port: int) -> bytes:
    """A handshake broken in one or more of the places a parser has to look."""
    method = draw(_often(b"GET", b"POST", b"G\x1bT", b"", b"GET GET"))
    path = draw(st.sampled_from([b"/ws", b"/ws?token=tok", b"/ws?token=tok&username=", b"/healthz",
                                 b"//[", b"http://[::1", b"*"]))
    path += quote(draw(_TEXT), safe="/?&=[]%:@").encode() + draw(_often(b"", b"%", b"%ff", b"\x1b"))
    version = draw(_often(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b""))
    headers = [(b"Host", f"127.0.0.1:{port}".encode())] * draw(_often(1, 0, 2))
    headers += [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"Sec-WebSocket-Version", b"13")]
    names = st.sampled_from([b"Origin", b"Authorization", b"Sec-WebSocket-Key", b"Sec-WebSocket-Protocol",
                             b"Sec-WebSocket-Extensions", b"Sec-WebSocket-Version", b"Content-Length",
                             b"Host", b"Upgrade", b"X\x1b", b"X-Forwarded-For"])
    headers += draw(st.lists(st.tuples(names, _VALUES), max_size=4))
    if draw(st.booleans()):
        headers = draw(st.permutations(headers))
    head = method + b" " + path + b" " + version + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    tail = draw(st.sampled_from([b"", head, build_frame(0x9, b"p"), build_frame(0x3), b"\x47\x45\x54 /",
                                 build_frame(OP_TEXT, b"\xff"), build_frame(OP_TEXT, b"x" * 100),
                                 build_frame(0x8, b"\x03\xe8")]))
    return head + tail


EXAMPLES = 150  # hostile requests in the batch
HOSTILE_WAIT = 2.0  # the hostile server's --open-timeout is 1 s: nothing waits longer


def _send_hostile(port: int, request: bytes) -> None:
    """Send one request; a refusal must be followed by the server's hang-up."""
    sock = open_socket(port, HOSTILE_WAIT)
    try:
        sock.sendall(request)
        try:
            response = read_http_response(sock, HOSTILE_WAIT)
        except Timeout:  # a request the parser is still waiting on: the open timeout ends it
            return
        if response is not None and response.status != 101:
            assert is_eof_or_reset(sock, HOSTILE_WAIT), "refused, yet kept the connection"
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()


@pytest.mark.timeout(300)
def test_a_batch_of_hostile_requests_leaves_no_traceback_and_nothing_raw(start_server):
    server = start_server("--token", "tok", "--allowed-origin", "https://good.example",
                          "--max-message-size", "64", "--open-timeout", "1")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def example(data) -> None:
        _send_hostile(server.port, data.draw(hostile_request(server.port)))
        assert server.proc.poll() is None, server.log
        assert_clean_log(server)

    example()
    with ws_connect(server.url + "?token=tok") as ws:  # and it still serves
        ws.send("still here")
        assert recv(ws, WAIT) == "still here"
    assert_clean_log(server)


# 21. Every disconnect with its real reason


def test_a_1009_close_is_logged_as_closed_by_server(start_server):
    server = start_server("--max-message-size", "100")
    with ws_connect(server.url + "?username=big") as ws:
        ws.send("x" * 200)
        with pytest.raises(Closed) as info:
            recv(ws, WAIT)
        assert info.value.code == 1009
    line = server.wait_for_log(r"disconnect big@\S+: (.*) \(\d+ online\)", WAIT)
    assert line.group(1).startswith("closed by server: 1009"), line.group(0)
    assert_clean_log(server)


def test_a_refused_origin_is_logged_with_the_origin(start_server):
    server = start_server("--allowed-origin", "https://good.example")
    with pytest.raises(InvalidStatus) as info:
        with ws_connect(server.url, origin="https://evil.example"):
            pass
    assert info.value.response.status_code == 403
    server.wait_for_log(r"refused \S+: 403 .*https://evil\.example", WAIT)


def test_each_client_dropped_at_the_shutdown_timeout_gets_a_disconnect_line(start_server):
    server = start_server("--shutdown-timeout", "1")
    deaf = [RawWS.connect(server.port, username=f"deaf{i}", rcvbuf=4096) for i in range(3)]
    try:
        server.wait_for_log(r"connect deaf\d@", WAIT, count=3)  # not /healthz: it would be one more to close
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit(WAIT + 5) == 0
    finally:
        for client in deaf:
            client.sock.close()
    for i in range(3):
        assert re.search(rf"disconnect deaf{i}@\S+: shutdown timeout", server.log), server.log
    assert "shutdown timeout: dropped 3 connection(s)" in server.log


def _signal_mask(status: str, field: str) -> int:
    """A signal mask (``SigBlk``, ``SigIgn``) from a /proc status file: bit n - 1 is signal n."""
    with open(status) as f:
        return int(re.search(rf"^{field}:\s*([0-9a-f]+)$", f.read(), re.MULTILINE).group(1), 16)


def _blocked_signals(pid: int) -> dict[str, int]:
    """Each thread's blocked-signal mask, from /proc: thread id -> mask."""
    masks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            masks[tid] = _signal_mask(f"/proc/{pid}/task/{tid}/status", "SigBlk")
        except FileNotFoundError:
            pass  # a thread that ended meanwhile (wait_joined's /healthz reader)
    return masks


def test_no_thread_can_take_a_shutdown_signal_from_the_main_thread_which_waits_for_it(start_server):
    """A signal handled by a handler runs only when the main thread runs Python: one that landed as
    the main thread began to wait was lost (about 1 start in 9 under load). Every other thread blocks
    them, readers and writers included, and the main thread takes them with sigwait: none is lost."""
    server = start_server()
    with ws_connect(server.url):
        wait_joined(server, 1)  # a reader thread, started by the acceptor
        masks = _blocked_signals(server.proc.pid)
        del masks[str(server.proc.pid)]  # the main thread: its sigwait() unblocks them while it waits
        wanted = 1 << (signal.SIGINT - 1) | 1 << (signal.SIGTERM - 1)
        assert len(masks) >= 4 and all(mask & wanted == wanted for mask in masks.values()), masks
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_log(r"received SIGTERM, shutting down", WAIT)
    assert server.wait_exit(WAIT) == 0


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_sigint_shuts_down_a_server_started_with_it_ignored(start_server):
    """A shell starts a background job ("python scripts/server.py &") with SIGINT ignored. An ignored
    signal may be dropped rather than kept pending for sigwait, so the server takes it back."""
    server = start_server(preexec_fn=_ignore_sigint)
    ignored = _signal_mask(f"/proc/{server.proc.pid}/status", "SigIgn")
    assert not ignored & 1 << (signal.SIGINT - 1), hex(ignored)
    server.proc.send_signal(signal.SIGINT)
    server.wait_for_log(r"received SIGINT, shutting down", WAIT)
    assert server.wait_exit(WAIT) == 0


def test_a_second_signal_logs_one_line_before_exiting(start_server):
    server = start_server("--shutdown-timeout", "30")
    deaf = RawWS.connect(server.port, rcvbuf=4096)
    try:
        server.wait_for_log(r"connect anonymous", WAIT)  # not /healthz: it would be one more to close
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_log(r"shutting down: closing 1 connection", WAIT)
        server.proc.send_signal(signal.SIGINT)
        server.wait_exit(WAIT)
    finally:
        deaf.sock.close()
    lines = [line for line in server.lines if "SIGINT" in line]
    assert len(lines) == 1 and "again" in lines[0], server.lines


def test_a_stalled_client_is_reported_once(start_server):
    # The ticker looks every write-timeout / 4 (10 ms at least): it gets
    # several looks at the stalled client before the reader has let it go.
    server = start_server("--write-timeout", "0.04", "--send-queue-bytes", str(64 << 20))
    baseline = settled_stats(server.proc.pid)
    stalled = RawWS.connect(server.port, username="stalled", rcvbuf=4096)  # never reads
    try:
        with ws_connect(server.url) as publisher:
            wait_joined(server, 2)  # the stalled client and the publisher
            payload = "x" * 65536
            deadline = time.monotonic() + 20
            for _ in range(400):  # enough to fill any socket buffer many times over
                publisher.send(payload)
                while True:  # our own echo, but the stalled client's notices too
                    if recv(publisher, WAIT) == payload:
                        break
                if "nothing written" in server.log or time.monotonic() > deadline:
                    break
            server.wait_for_log(r"dropping stalled@\S+: nothing written", WAIT)
            server.wait_for_log(r"disconnect stalled@\S+: write timeout", 10)
        # Until the server has let go of the stalled socket, the ticker still
        # sees it: count the lines only once the server is back to baseline.
        wait_baseline(server.proc.pid, baseline, timeout=15)
    finally:
        stalled.sock.close()
    assert len(re.findall(r"dropping stalled@\S+: nothing written", server.log)) == 1, server.log
    assert_clean_log(server)
