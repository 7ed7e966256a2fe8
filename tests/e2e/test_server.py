"""End-to-end tests of the broadcast server (issue 2), against real server processes.

Every test starts ``scripts/server.py`` on 127.0.0.1 port 0 (conftest's
fixtures) and drives it over real sockets with two independent client
libraries, ``websockets`` (sync) and ``websocket-client``, plus a raw socket
client for the misbehaving peers neither library will play. Nothing is
mocked; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import websocket
from websockets.exceptions import InvalidStatus

from support.process import wait_joined, wait_left
from support.rawws import OP_CLOSE, OP_PING, RawWS
from support.wsclients import (
    Closed,
    Collector,
    expect_silence,
    http_get,
    raw_exchange,
    recv,
    recv_n,
    send,
    url_for,
    ws_connect,
    wsc_connect,
)

WAIT = 5.0  # seconds for any single expected event
WINDOW = 8  # messages a publisher may be ahead of the readers that keep up


def log_time(stamp: str) -> float:
    """A log line's "2026-01-02 03:04:05,678" timestamp, as time.time() would say."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def assert_no_traceback(server) -> None:
    assert "Traceback" not in server.log, server.log


@contextlib.contextmanager
def client(kind: str, url: str, **kwargs):
    """A connected client of either library, closed on exit."""
    if kind == "websockets":
        with ws_connect(url, **kwargs) as ws:
            yield ws
    else:
        ws = wsc_connect(url, **kwargs)
        try:
            yield ws
        finally:
            with contextlib.suppress(Exception):
                ws.close(timeout=1)


def wait_online(server, n: int, timeout: float = WAIT) -> None:
    """Wait until /healthz counts n joined: everyone up to the n-th has joined."""
    wait_joined(server, n, timeout)


def wait_online_before_shutdown(server, n: int, timeout: float = WAIT) -> None:
    """The same, from the n-th client's log line, for the tests that count what the shutdown closes.

    A /healthz probe is one of the server's connections until it has seen
    the probe hang up, which nothing outside it can observe: it would be one
    more in "closing N connection(s)".
    """
    server.wait_for_log(rf" INFO connect \S+ \({n} online\)", timeout)


def refused_status(kind: str, url: str) -> tuple[int, str]:
    """Try to open a WebSocket that must be refused: (HTTP status, body)."""
    if kind == "websockets":
        with pytest.raises(InvalidStatus) as info:
            with ws_connect(url):
                pass
        response = info.value.response
        return response.status_code, response.body.decode("utf-8", "replace")
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        wsc_connect(url)
    return info.value.status_code, (info.value.resp_body or b"").decode("utf-8", "replace")


KINDS = ["websockets", "websocket-client"]


# 1. The path, and plain HTTP


def test_listening_line_reports_the_real_port(server):
    match = server.wait_for_log(r"listening on ws://([0-9.]+):(\d+)/ws", WAIT)
    assert match.group(1) == "127.0.0.1"
    port = int(match.group(2))
    assert port != 0
    with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
        ws.send("hello")
        assert ws.recv(timeout=WAIT) == "hello"


OTHER_PATHS = ["/WS", "/wss", "/chat?path=/ws", "/healthz/ws"]  # /ws/ROOM: test_rooms.py; /: the page


@pytest.mark.parametrize("kind", KINDS)
def test_websocket_on_another_path_gets_404(server, kind):
    for path in OTHER_PATHS:
        status, _ = refused_status(kind, url_for(server, path=path))
        assert status == 404, path
    assert_no_traceback(server)


def test_plain_http_get_to_ws_gets_426_without_traceback(server):
    status, body = http_get(server, "/ws")
    assert status == 426
    assert body.strip()
    status, _ = http_get(server, "/ws?username=alice")
    assert status == 426
    # A browser-like request: Upgrade missing but other headers present.
    status, _ = http_get(server, "/ws", headers={"Connection": "keep-alive", "Accept": "text/html"})
    assert 400 <= status < 500
    server.wait_for_log(r"refused .*426", WAIT, count=2)
    assert_no_traceback(server)
    with ws_connect(server.url) as ws:  # and it still serves WebSockets
        ws.send("still here")
        assert ws.recv(timeout=WAIT) == "still here"


def test_plain_http_get_elsewhere_gets_404(start_server):
    server = start_server("--no-web")  # else / is the chat page (tests/e2e/test_page.py)
    status, body = http_get(server, "/")
    assert status == 404
    assert "/ws" in body  # the refusal says where to go
    assert http_get(server, "/index.html")[0] == 404
    assert_no_traceback(server)


MALFORMED_REQUESTS = {
    "not-http": b"hello\r\n\r\n",
    "http-0.9": b"GET /ws\r\n\r\n",
    "no-key": b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # TLS on a ws:// port
    "nothing": b"",
}


def test_malformed_requests_do_not_hurt_the_server(server):
    for name, junk in MALFORMED_REQUESTS.items():
        reply = raw_exchange(server, junk)
        if reply:
            assert re.match(rb"HTTP/1\.1 4\d\d ", reply), (name, reply[:200])
        assert_no_traceback(server)
    with ws_connect(server.url) as ws:
        ws.send("ok")
        assert ws.recv(timeout=WAIT) == "ok"
    assert_no_traceback(server)


# 2. Broadcast


def test_every_text_message_reaches_every_client_including_the_sender(server):
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(client(kind, server.url)) for kind in KINDS * 2]
        wait_online(server, len(clients))
        for i, sender in enumerate(clients):
            send(sender, f"message {i} from client {i}")
            for receiver in clients:
                assert recv(receiver) == f"message {i} from client {i}"
        for receiver in clients:
            expect_silence(receiver, 0.2)


def test_named_client_text_is_prefixed_with_its_name(server):
    with client("websockets", url_for(server, "alice")) as alice:
        wait_online(server, 1)
        with client("websocket-client", server.url) as anon:
            wait_online(server, 2)
            send(alice, "hi all")
            assert recv(alice) == "[alice] hi all"
            assert recv(anon) == "[alice] hi all"
            send(anon, "hello alice")
            assert recv(alice) == "hello alice"
            assert recv(anon) == "hello alice"


def test_names_with_spaces_unicode_and_brackets_are_used_verbatim(server):
    for name in ["Zoë 李", "x" * 32, "[bob]", "é" * 32]:
        with client("websocket-client", url_for(server, name)) as ws:
            send(ws, "hi")
            assert recv(ws) == f"[{name}] hi"


RELAYED_AS_IS = ["[bob] written by an old Go client", "* carol joined", "plain", "ünïcödé ✓ 🙂", " padded ",
                 "a\nb", "x" * 70000]


def test_anonymous_text_is_relayed_unchanged(server):
    with client("websockets", server.url) as sender, client("websocket-client", server.url) as other:
        wait_online(server, 2)
        for text in RELAYED_AS_IS:
            send(sender, text)
            assert recv(sender) == text
            assert recv(other) == text


@pytest.mark.parametrize("username", [None, "dave"])
def test_binary_is_relayed_as_binary_unchanged(server, username):
    payload = bytes(range(256)) * 3 + b"[dave] "
    with client("websockets", server.url) as other:
        wait_online(server, 1)
        with client("websocket-client", url_for(server, username)) as sender:
            wait_online(server, 2)
            if username:
                assert recv(other) == "* dave joined"
            send(sender, payload)
            for ws in (sender, other):
                got = recv(ws)
                assert isinstance(got, bytes)
                assert got == payload
            # And text stays text.
            send(sender, "t")
            assert recv(other) == ("[dave] t" if username else "t")


def test_fragmented_message_is_relayed_whole_with_one_prefix(server):
    with client("websockets", server.url) as other:
        wait_online(server, 1)
        with client("websocket-client", url_for(server, "frag")) as sender:
            wait_online(server, 2)
            assert recv(other) == "* frag joined"
            sender.send_frame(websocket.ABNF.create_frame("one ", websocket.ABNF.OPCODE_TEXT, fin=0))
            sender.send_frame(websocket.ABNF.create_frame("two ", websocket.ABNF.OPCODE_CONT, fin=0))
            sender.send_frame(websocket.ABNF.create_frame("three", websocket.ABNF.OPCODE_CONT, fin=1))
            assert recv(other) == "[frag] one two three"
            assert recv(sender) == "[frag] one two three"


@pytest.mark.parametrize("kind", KINDS)
def test_single_anonymous_client_gets_an_exact_echo_and_nothing_else(server, kind):
    messages = ["first", "[name] second", b"\x00third\xff"]
    with client(kind, server.url) as ws:
        for message in messages:
            send(ws, message)
        assert recv_n(ws, 3) == messages
        expect_silence(ws, 0.75)


# 3. Usernames and presence notices


BAD_NAMES = [("", "1 to 32"), ("x" * 33, "1 to 32"), (" bob", "whitespace"), ("bob\n", "whitespace"),
             ("a\x07b", "control"), ("a\u202eb", "control")]


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_username_gets_400_with_the_reason(server, kind):
    for name, reason in BAD_NAMES:
        status, body = refused_status(kind, url_for(server, name))
        assert status == 400, name
        assert "username" in body and reason in body, (name, body)
    server.wait_for_log(r"refused .*: 400 invalid username", WAIT, count=len(BAD_NAMES))
    assert " connect " not in server.log  # nobody joined
    assert_no_traceback(server)


def test_username_given_twice_gets_400(server):
    status, body = refused_status("websocket-client", server.url + "?username=a&username=b")
    assert status == 400 and "username" in body


def test_refused_clients_join_nobody(server):
    with client("websockets", url_for(server, "watcher")) as watcher:
        wait_online(server, 1)
        refused_status("websocket-client", url_for(server, " bad"))
        send(watcher, "after")
        assert recv(watcher) == "[watcher] after"  # no "* bad joined" before it
        expect_silence(watcher, 0.2)


def test_join_and_leave_notices_go_to_the_others(server):
    with contextlib.ExitStack() as stack:
        anon = stack.enter_context(client("websocket-client", server.url))
        wait_online(server, 1)
        alice = stack.enter_context(client("websockets", url_for(server, "alice")))
        wait_online(server, 2)
        assert recv(anon) == "* alice joined"
        with client("websocket-client", url_for(server, "carol")) as carol:
            assert recv(alice) == "* carol joined"
            assert recv(anon) == "* carol joined"
            # The joiner does not hear about itself: its first message is its own echo.
            send(carol, "hello")
            assert recv(carol) == "[carol] hello"
            assert recv(alice) == "[carol] hello"
            assert recv(anon) == "[carol] hello"
        assert recv(alice) == "* carol left"
        assert recv(anon) == "* carol left"
        send(alice, "bye")
        assert recv(alice) == "[alice] bye"
        assert recv(anon) == "[alice] bye"


def test_anonymous_clients_cause_no_notices(server):
    with client("websocket-client", url_for(server, "alice")) as alice:
        wait_online(server, 1)
        with client("websockets", server.url), client("websocket-client", server.url):
            wait_online(server, 3)
        server.wait_for_log(r"disconnect anonymous@.*\(1 online\)", WAIT)
        send(alice, "marker")
        assert recv(alice) == "[alice] marker"  # the first and only thing alice saw
        expect_silence(alice, 0.2)


def test_with_duplicates_allowed_each_leave_is_announced(start_server):
    server = start_server("--allow-duplicate-names")
    with client("websockets", server.url) as anon:
        wait_online(server, 1)
        with client("websockets", url_for(server, "twin")), client("websocket-client", url_for(server, "twin")):
            assert recv_n(anon, 2) == ["* twin joined", "* twin joined"]
        assert recv_n(anon, 2) == ["* twin left", "* twin left"]


def test_a_client_gets_every_message_sent_after_its_handshake(server):
    """Once the 101 has arrived the client is in: nothing broadcast afterwards may pass it by.

    Each worker opens a connection, and only when websocket-client has
    returned from the handshake has its speaker send a tag; the new connection
    must receive that tag. Eight workers at once make the server's threads
    contend, as they do under load.
    """
    workers, rounds = 8, 25

    def worker(w: int) -> list[str]:
        missed = []
        with ws_connect(server.url) as speaker:
            for i in range(rounds):
                newcomer = wsc_connect(server.url)
                try:
                    tag = f"w{w}-{i}"
                    speaker.send(tag)
                    deadline = time.monotonic() + 2
                    while True:  # other workers' tags arrive too
                        try:
                            if recv(newcomer, max(0.01, deadline - time.monotonic())) == tag:
                                break
                        except TimeoutError:
                            missed.append(tag)
                            break
                finally:
                    newcomer.close()
        return missed

    with ThreadPoolExecutor(workers) as pool:
        missed = [tag for result in pool.map(worker, range(workers), timeout=50) for tag in result]
    assert not missed, f"{len(missed)} of {workers * rounds} newcomers missed a message sent after their handshake"


# 4. Ordering and slow clients


def test_concurrent_senders_every_client_sees_one_total_order(server):
    senders_n, per_sender = 3, 200
    total = senders_n * per_sender
    with contextlib.ExitStack() as stack:
        receivers = [stack.enter_context(client(kind, server.url)) for kind in KINDS * 2]
        wait_online(server, 4)
        kinds = ["websockets", "websocket-client", "websockets"]
        senders = []
        for i, kind in enumerate(kinds):
            senders.append(stack.enter_context(client(kind, url_for(server, f"s{i}") if i == 0 else server.url)))
            wait_online(server, 5 + i)
        # s0 is named: the receivers, connected before it, got "* s0 joined" first.
        for ws in receivers:
            assert recv(ws) == "* s0 joined"
        collectors = [Collector(ws, total, timeout=30, name=f"reader-{i}")
                      for i, ws in enumerate(receivers + senders)]
        for c in collectors:
            c.start()
        barrier = threading.Barrier(senders_n)

        def blast(i: int) -> None:
            barrier.wait(WAIT)
            for k in range(per_sender):
                send(senders[i], f"s{i}-{k}")

        with ThreadPoolExecutor(senders_n) as pool:
            for future in [pool.submit(blast, i) for i in range(senders_n)]:
                future.result(timeout=30)
        lists = [c.result() for c in collectors]

    expected = {("[s0] " if i == 0 else "") + f"s{i}-{k}" for i in range(senders_n) for k in range(per_sender)}
    for got in lists:
        assert len(got) == total
        assert set(got) == expected  # every message, and (with the length) each exactly once
    first = lists[0]
    for i, got in enumerate(lists[1:], 1):
        assert got == first, f"client {i} saw another order than client 0"
    for i in range(senders_n):  # and each sender's messages in the order it sent them
        prefix = "[s0] " if i == 0 else ""
        mine = [m for m in first if m.startswith(f"{prefix}s{i}-")]
        assert mine == [f"{prefix}s{i}-{k}" for k in range(per_sender)]


@pytest.mark.parametrize("queue_args", [("--send-queue-bytes", "262144"), ()], ids=["256KiB-queue", "default-queue"])
def test_stuck_client_is_evicted_and_nobody_else_waits(start_server, queue_args):
    count, size = 2000, 10 * 1024
    server = start_server(*queue_args)
    stuck = RawWS.connect(server.port, rcvbuf=4096)  # never reads again
    with ws_connect(server.url) as publisher, ws_connect(server.url) as r1, client("websocket-client", server.url) as r2:
        wait_online(server, 4)
        readers = [Collector(ws, count, timeout=40, name=name)
                   for ws, name in ((r1, "r1"), (r2, "r2"), (publisher, "publisher-echo"))]
        for reader in readers:
            reader.start()
        filler = bytes(size - 4)
        t0, t0_wall = time.monotonic(), time.time()
        for i in range(count):
            # Readers that keep up stay at most WINDOW messages behind: the
            # test process is one client among several, sharing one GIL, and
            # must not become a slow consumer itself.
            if i >= WINDOW:
                for reader in readers:
                    reader.wait_for(i - WINDOW, timeout=20)
            publisher.send(i.to_bytes(4, "big") + filler)
        sent_at = time.monotonic() - t0
        evicted = server.wait_for_log(
            rf"^(\S+ \S+) .*anonymous@127\.0\.0\.1:{stuck.port}: .*(slow consumer|write timeout)", 30)
        evicted_at = log_time(evicted.group(1)) - t0_wall  # when the server decided, by its log
        server.wait_for_log(
            rf"disconnect anonymous@127\.0\.0\.1:{stuck.port}: .*(slow consumer|write timeout)", 30)
        disconnected_at = time.monotonic() - t0
        for reader in readers:
            messages = reader.result()
            assert [int.from_bytes(m[:4], "big") for m in messages] == list(range(count))
            assert all(len(m) == size for m in messages)
        done_at = max(reader.finished_at for reader in readers) - t0
        # The publisher kept its connection.
        publisher.send("still connected")
        assert r1.recv(timeout=WAIT) == "still connected"
        assert publisher.recv(timeout=WAIT) == "still connected"
    # The stuck client's socket, once drained, ends.
    drained, how = stuck.drain_until_eof(timeout=20)
    stuck.close()
    print(f"\n[slow consumer, {queue_args or 'default queue'}] publisher sent {count}x{size} B in {sent_at:.2f}s; "
          f"others received all in {done_at:.2f}s; stuck client evicted after {evicted_at:.2f}s, "
          f"disconnected after {disconnected_at:.2f}s; it then drained {drained} B and saw {how}")
    assert_no_traceback(server)


def test_vanished_peers_do_not_stall_the_broadcast_or_cost_the_sender(server):
    count = 600
    vanishing = [RawWS.connect(server.port, rcvbuf=4096) for _ in range(5)]
    with ws_connect(server.url) as publisher, client("websocket-client", server.url) as receiver:
        wait_online(server, 7)
        readers = [Collector(receiver, count, 30, "receiver"), Collector(publisher, count, 30, "publisher-echo")]
        for reader in readers:
            reader.start()
        payload = "m" * 2000

        def publish(first: int, last: int) -> None:
            for i in range(first, last):
                publisher.send(f"{i:05d} {payload}")

        publish(0, count // 3)
        for peer in vanishing:
            peer.vanish()  # RST, no close frame, with frames still owed to it
        publish(count // 3, count)
        for reader in readers:
            assert [int(m[:5]) for m in reader.result()] == list(range(count))
        for peer in vanishing:
            server.wait_for_log(rf"disconnect anonymous@127\.0\.0\.1:{peer.port}:", WAIT)
        publisher.send("after")
        assert publisher.recv(timeout=WAIT) == "after"
        assert recv(receiver) == "after"
    assert_no_traceback(server)


def test_vanished_peer_that_was_idle(server):
    """The RST reaches the server while nothing is owed to the peer."""
    with client("websockets", url_for(server, "pub")) as publisher:
        peer = RawWS.connect(server.port)
        wait_online(server, 2)
        peer.vanish()
        server.wait_for_log(rf"disconnect anonymous@127\.0\.0\.1:{peer.port}:", WAIT)
        for i in range(50):
            publisher.send(f"{i}")
        assert recv_n(publisher, 50) == [f"[pub] {i}" for i in range(50)]


# 5. Graceful shutdown


def _read_to_close(ws, timeout: float, hang_up: bool = True) -> tuple[list, int | None]:
    """Messages until the close frame, and its code.

    Both libraries answer the close frame by themselves. With ``hang_up`` a
    websocket-client connection is then closed as its applications do
    (``WebSocketApp`` tears the socket down on a close frame); websockets
    closes its socket on its own once the server has closed TCP.
    """
    messages = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            messages.append(recv(ws, max(0.01, deadline - time.monotonic())))
        except Closed as closed:
            if hang_up and isinstance(ws, websocket.WebSocket):
                ws.shutdown()
            return messages, closed.code


def test_sigterm_closes_50_clients_with_1001_and_exits_0(server):
    n = 50
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(client(KINDS[i % 2], server.url)) for i in range(n)]
        wait_online_before_shutdown(server, n)
        with ThreadPoolExecutor(n) as pool:
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            futures = [pool.submit(_read_to_close, ws, 10) for ws in clients]
            results = [f.result(timeout=15) for f in futures]
            rc = server.wait_exit(15)
            elapsed = time.monotonic() - t0
    print(f"\n[shutdown] SIGTERM with {n} clients: server exited {rc} after {elapsed:.2f}s")
    assert [code for _, code in results] == [1001] * n
    assert all(messages == [] for messages, _ in results)
    assert rc == 0
    assert f"closing {n} connection(s)" in server.log
    # Every client answered: nobody had to be dropped, the default 5 s was not needed.
    assert "shutdown timeout" not in server.log
    assert elapsed < 5.0
    assert_no_traceback(server)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_messages_queued_before_the_signal_arrive_before_the_close_frame(start_server, sig):
    # 4 MB owed to a reader with a 16 KiB receive buffer: more than the
    # kernel's socket buffers hold (about 3 MB here), so the rest waits in the
    # server's queue.
    count, size = 400, 10 * 1024
    server = start_server("--shutdown-timeout", "20", "--send-queue-bytes", str(16 * 1024 * 1024))
    slow = wsc_connect(server.url, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 16384),))
    try:
        with ws_connect(server.url) as publisher, ws_connect(server.url) as fast:
            wait_online(server, 3)
            readers = [Collector(publisher, count, 20, "publisher"), Collector(fast, count, 20, "fast")]
            for reader in readers:
                reader.start()
            for i in range(count):
                if i >= WINDOW:
                    for reader in readers:
                        reader.wait_for(i - WINDOW, timeout=20)
                publisher.send(f"{i:05d}" + "q" * (size - 5))
            for reader in readers:
                reader.result()  # relayed to everyone, the slow reader's share still queued
            t0 = time.monotonic()
            server.proc.send_signal(sig)
            messages, code = _read_to_close(slow, 15)
            _, fast_code = _read_to_close(fast, WAIT)
            rc = server.wait_exit(15)
            elapsed = time.monotonic() - t0
    finally:
        slow.close()
    print(f"\n[shutdown] {signal.Signals(sig).name} with {count}x{size} B owed to a slow reader: "
          f"exited {rc} after {elapsed:.2f}s")
    assert [int(m[:5]) for m in messages] == list(range(count))
    assert code == 1001 and fast_code == 1001
    assert rc == 0
    assert f"received {signal.Signals(sig).name}" in server.log
    assert "shutdown timeout" not in server.log
    assert_no_traceback(server)


def test_shutdown_timeout_bounds_the_wait_for_a_client_that_never_answers(start_server):
    timeout = 1.0
    server = start_server("--shutdown-timeout", str(timeout))
    deaf = RawWS.connect(server.port, rcvbuf=4096)  # never reads our close frame, never answers it
    with ws_connect(server.url) as polite:
        wait_online_before_shutdown(server, 2)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(Closed) as info:
            recv(polite, WAIT)
        assert info.value.code == 1001
        rc = server.wait_exit(timeout + 5)
        elapsed = time.monotonic() - t0
    print(f"\n[shutdown] --shutdown-timeout {timeout} with a deaf client: exited {rc} after {elapsed:.2f}s")
    assert rc == 0
    assert elapsed < timeout + 2.0
    assert "shutdown timeout: dropped 1 connection(s)" in server.log
    deaf.drain_until_eof(WAIT)
    deaf.close()


def test_client_that_answered_the_close_is_not_waited_for(start_server):
    """After the closing handshake the server owes the client nothing more.

    websocket-client answers the close frame by itself but keeps its socket
    until the application closes it; the server must not hold its shutdown
    (up to --shutdown-timeout) waiting for that TCP FIN.
    """
    server = start_server("--shutdown-timeout", "30")
    with client("websocket-client", server.url) as ws:
        wait_online_before_shutdown(server, 1)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        _, code = _read_to_close(ws, WAIT, hang_up=False)  # close answered, socket kept open
        assert code == 1001
        server.wait_for_log(r"disconnect anonymous", 15)
        rc = server.wait_exit(15)
        elapsed = time.monotonic() - t0
    print(f"\n[shutdown] client answered the close but kept its socket: exited {rc} after {elapsed:.2f}s")
    assert rc == 0
    assert elapsed < 3.0, f"shutdown waited {elapsed:.2f}s for a client that had completed the closing handshake"


@pytest.mark.parametrize("sig, tries", [(signal.SIGTERM, 6), (signal.SIGINT, 12)], ids=["SIGTERM", "SIGINT"])
def test_signal_right_after_the_listening_line_is_graceful(start_server, sig, tries):
    """Once "listening" is logged (the readiness signal), SIGTERM/SIGINT must shut down cleanly.

    Any window is short, so several servers in turn, each signalled the
    moment its line appears.
    """
    for _ in range(tries):
        server = start_server()
        server.proc.send_signal(sig)
        rc = server.wait_exit(10)
        assert rc == 0, f"exit status {rc} after {signal.Signals(sig).name}; log:\n{server.log}"
        assert_no_traceback(server)
        assert "stopped" in server.log


def test_a_second_signal_exits_at_once(start_server):
    server = start_server("--shutdown-timeout", "30")
    deaf = RawWS.connect(server.port, rcvbuf=4096)
    try:
        wait_online_before_shutdown(server, 1)
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_log(r"shutting down: closing 1 connection", WAIT)
        assert server.proc.poll() is None  # still waiting for the deaf client
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rc = server.wait_exit(WAIT)
        elapsed = time.monotonic() - t0
    finally:
        deaf.close()
    # The deaf client alone would hold the server for several more seconds.
    assert elapsed < 2.5, elapsed
    assert rc is not None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_no_clients_exits_0(server, sig):
    with ws_connect(server.url) as ws:  # accepting, so past its start-up
        ws.send("up")
        assert ws.recv(timeout=WAIT) == "up"
    server.wait_for_log(r"disconnect anonymous", WAIT)
    assert server.stop(sig, WAIT) == 0
    assert f"received {signal.Signals(sig).name}" in server.log
    assert "stopped" in server.log
    assert_no_traceback(server)


# 6. Protective limits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_max_message_size(start_server, kind, binary):
    limit = 1000
    server = start_server("--max-message-size", str(limit))
    make = (lambda n: b"b" * n) if binary else (lambda n: "t" * n)
    with client("websockets", server.url) as watcher, client(kind, server.url) as ws:
        wait_online(server, 2)
        send(ws, make(limit))  # exactly at the limit: fine
        assert recv(ws) == make(limit)
        assert recv(watcher) == make(limit)
        send(ws, make(limit + 1))
        with pytest.raises(Closed) as info:
            recv(ws)
        assert info.value.code == 1009
        # Nobody got the oversized message, and the others carry on.
        send(watcher, "next")
        assert recv(watcher) == "next"


def test_max_message_size_counts_the_whole_fragmented_message(start_server):
    server = start_server("--max-message-size", "1000")
    with client("websocket-client", server.url) as ws:
        ws.send_frame(websocket.ABNF.create_frame("a" * 600, websocket.ABNF.OPCODE_TEXT, fin=0))
        ws.send_frame(websocket.ABNF.create_frame("a" * 400, websocket.ABNF.OPCODE_CONT, fin=1))
        assert recv(ws) == "a" * 1000
        ws.send_frame(websocket.ABNF.create_frame("a" * 600, websocket.ABNF.OPCODE_TEXT, fin=0))
        ws.send_frame(websocket.ABNF.create_frame("a" * 401, websocket.ABNF.OPCODE_CONT, fin=1))
        with pytest.raises(Closed) as info:
            recv(ws)
        assert info.value.code == 1009


def test_default_max_message_size_is_1_mib(server):
    mib = 1024 * 1024
    with ws_connect(server.url) as ws:
        ws.send(b"x" * mib)
        assert len(ws.recv(timeout=WAIT)) == mib
        ws.send(b"x" * (mib + 1))
        with pytest.raises(Closed) as info:
            recv(ws)
        assert info.value.code == 1009


def _pings(ws, window: float) -> int:
    """How many pings websocket-client sees in ``window`` seconds (it answers them)."""
    pings = 0
    deadline = time.monotonic() + window
    while (remaining := deadline - time.monotonic()) > 0:
        ws.settimeout(remaining)
        try:
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            break
        assert opcode == websocket.ABNF.OPCODE_PING, (opcode, frame)
        pings += 1
    return pings


def test_server_pings_at_the_interval(start_server):
    server = start_server("--ping-interval", "0.2", "--ping-timeout", "5")
    with client("websocket-client", server.url) as ws:
        pings = _pings(ws, 2.0)
        assert pings >= 3, pings  # ~10 expected; generous for a loaded machine
        send(ws, "still open")  # answered pings keep the connection
        assert recv(ws) == "still open"


def test_raw_client_sees_pings_too(start_server):
    server = start_server("--ping-interval", "0.2", "--ping-timeout", "5")
    raw = RawWS.connect(server.port)
    try:
        frame = raw.recv_frame(WAIT, reply=True)
        assert frame.opcode == OP_PING
        frame = raw.recv_frame(WAIT, reply=True)
        assert frame.opcode == OP_PING
    finally:
        raw.close()


def test_ping_interval_0_disables_pings(start_server):
    server = start_server("--ping-interval", "0")
    with client("websocket-client", server.url) as ws:
        assert _pings(ws, 1.5) == 0
        send(ws, "x")
        assert recv(ws) == "x"


def test_unanswered_pings_drop_the_client(start_server):
    server = start_server("--ping-interval", "0.2", "--ping-timeout", "0.6")
    mute = RawWS.connect(server.port)  # reads, but never answers
    try:
        frames = mute.wait_eof(WAIT)  # until the server hangs up
        assert frames and frames[0].opcode == OP_PING
        assert all(f.opcode in (OP_PING, OP_CLOSE) for f in frames)
        server.wait_for_log(rf"disconnect anonymous@127\.0\.0\.1:{mute.port}: .*ping timeout", WAIT)
    finally:
        mute.close()


def test_ping_timeout_sends_1011_before_hanging_up(start_server):
    """The server logs "closing ...: 1011 keepalive ping timeout": the client must get that close frame."""
    server = start_server("--ping-interval", "0.05", "--ping-timeout", "0.15")
    mutes = [RawWS.connect(server.port) for _ in range(10)]  # a race, so try it ten times at once
    try:
        for mute in mutes:
            frames = mute.wait_eof(WAIT)
            assert frames[-1].opcode == OP_CLOSE, (
                f"{mute.port}: TCP closed after {[f.opcode for f in frames]}, no close frame")
            assert frames[-1].close_code == 1011
    finally:
        for mute in mutes:
            mute.close()


@pytest.mark.parametrize("kind", KINDS)
def test_max_connections(start_server, kind):
    server = start_server("--max-connections", "2")
    with client("websockets", server.url) as first:
        with client("websocket-client", server.url):
            wait_online(server, 2)
            status, body = refused_status(kind, server.url)
            assert status == 503
            assert body.strip()
            send(first, "the two still chat")
            assert recv(first) == "the two still chat"
        # A place is free again once someone leaves.
        wait_left(server, 1)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with client(kind, server.url) as third:
                    send(third, "in")
                    assert recv(third) == "in"
                break
            except (InvalidStatus, websocket.WebSocketBadStatusException):
                # The leaver's socket may take a moment more to be released.
                assert time.monotonic() < deadline, "still refused after a client left"
                time.sleep(0.05)


def _start_quiet(start_server, *args):
    """A server whose log level hides the listening line: pick its port ourselves."""
    for _ in range(3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = start_server(*args, "--port", str(port), expect_listening=False)
        server.port = port
        deadline = time.monotonic() + 10
        while server.proc.poll() is None:
            try:
                socket.create_connection((server.host, port), timeout=1).close()
                return server
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "server not listening after 10s"
                time.sleep(0.05)  # nothing in the log to wait for at this level
        # It exited: someone took the port in between. Try another.
    raise AssertionError("could not start a server on a free port")


@pytest.mark.parametrize("level", ["DEBUG", "debug", "INFO"])
def test_log_level_at_or_below_info_logs_connections(start_server, level):
    server = start_server("--log-level", level)
    with client("websockets", server.url) as ws:
        send(ws, "hi")
        assert recv(ws) == "hi"
    server.wait_for_log(r"INFO disconnect anonymous", WAIT)
    assert server.stop(signal.SIGTERM, WAIT) == 0
    assert_no_traceback(server)


@pytest.mark.parametrize("level", ["warning", "ERROR", "critical"])
def test_log_level_above_info_hides_info_lines(start_server, level):
    server = _start_quiet(start_server, "--log-level", level)
    with client("websocket-client", server.url) as ws:
        send(ws, "hi")
        assert recv(ws) == "hi"
    assert server.stop(signal.SIGTERM, WAIT) == 0
    assert " INFO " not in server.log
    assert_no_traceback(server)
