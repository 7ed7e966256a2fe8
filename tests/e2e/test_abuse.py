"""Hostile and careless peers: broken handshakes, slowloris, silent TCP connections, churn.

Whatever they do, the server answers (an HTTP error or a close), stays up,
keeps serving a well-behaved watcher, and gives back every thread and file
descriptor it took (read from /proc/<pid>, polled until a deadline).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from support import herd
from support.process import module_server, wait_joined, wait_left
from support.rawws import (
    OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWS, Timeout, assert_chat_works, build_frame,
    close_payload, handshake_request, is_eof_or_reset, open_socket, proc_stats, read_http_response, settled_stats,
    wait_baseline,
)
from support.wsclients import Watcher

OPEN_TIMEOUT = 1.0
WAIT = 5.0


abuse_server = module_server("abuse_server", "--open-timeout", str(OPEN_TIMEOUT))


@pytest.fixture
def watcher(abuse_server):
    with Watcher(abuse_server.url) as w:
        yield w


# Broken handshakes.

_HEADER_LINE_TOO_LONG = [("X-Big", "a" * 9000)]  # one line over websockets' 8 KiB
_HEADERS_TOO_BIG = [(f"X-Filler-{i}", "b" * 2000) for i in range(40)]  # 80 KB, each line < 8 KiB
_TOO_MANY_HEADERS = [(f"X-H{i}", "c") for i in range(200)]  # websockets allows 128

HOSTILE = {
    # name: (request bytes, given the port; expected HTTP status or None for a bare close)
    "garbage": (lambda p: b"\x00\xffGARBAGE\x01\x02 not http at all\r\n\r\n", None),
    "tls-client-hello": (lambda p: bytes.fromhex("16030100a5010000a10303") + os.urandom(32), None),
    "header-line-over-8KiB": (lambda p: handshake_request(p, extra_headers=_HEADER_LINE_TOO_LONG), 431),
    "headers-over-64KiB": (lambda p: handshake_request(p, extra_headers=_HEADERS_TOO_BIG), 431),
    "too-many-headers": (lambda p: handshake_request(p, extra_headers=_TOO_MANY_HEADERS), 431),
    "request-line-over-8KiB": (lambda p: handshake_request(p, path="/ws?x=" + "u" * 9000), 414),
    "wrong-version": (lambda p: handshake_request(p, version="8"), 400),
    "missing-version": (lambda p: handshake_request(p, version=None), 400),
    "missing-key": (lambda p: handshake_request(p, omit=("Sec-WebSocket-Key",)), 400),
    "malformed-key": (lambda p: handshake_request(p, key="too-short"), 400),
    "missing-upgrade": (lambda p: handshake_request(p, omit=("Upgrade",)), 426),
    "post": (lambda p: handshake_request(p, method="POST"), 405),
    "http-1.0": (lambda p: handshake_request(p).replace(b"HTTP/1.1", b"HTTP/1.0", 1), 505),
    "wrong-path": (lambda p: handshake_request(p, path="/admin"), 404),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_handshake(abuse_server, watcher, case):
    build, status = HOSTILE[case]
    pid = abuse_server.proc.pid
    baseline = settled_stats(pid)
    sock = open_socket(abuse_server.port)
    try:
        started = time.monotonic()
        try:
            sock.sendall(build(abuse_server.port))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before we finished talking: the response is what counts
        response = read_http_response(sock, OPEN_TIMEOUT + WAIT)
        if status is None:
            assert response is None or 400 <= response.status < 500, response
        else:
            assert response is not None, "closed without an HTTP response"
            assert response.status == status, (response.status, response.reason, response.body[:200])
            assert response.headers.get("connection", "").lower() == "close" or response.body
        assert is_eof_or_reset(sock, OPEN_TIMEOUT + WAIT), "the server kept the connection open"
        took = time.monotonic() - started
    finally:
        sock.close()
    assert took < OPEN_TIMEOUT + 2, f"took {took:.2f}s to be shown the door"
    assert abuse_server.proc.poll() is None
    assert_chat_works(abuse_server.url, watcher, server=abuse_server)
    wait_baseline(pid, baseline, timeout=WAIT)


def test_frame_sent_with_the_handshake_is_not_lost(abuse_server, watcher):
    """A client that sends its first frame right behind the request, without waiting for 101.

    RFC 6455 4.1 says a client must wait, so the server may refuse such a
    frame (close 1002) or serve it; what it must not do is accept the
    connection and silently drop the message.
    """
    sock = open_socket(abuse_server.port)
    try:
        text = f"eager {time.monotonic_ns()}"
        sock.sendall(handshake_request(abuse_server.port) + build_frame(OP_TEXT, text.encode()))
        response = read_http_response(sock, WAIT)
        assert response is not None and response.status == 101
        conn = RawWS(sock, response.rest)
        try:
            frame, _ = conn.recv_until(
                lambda f: f.opcode == OP_CLOSE or (f.opcode == OP_TEXT and f.payload == text.encode()), 2.0)
        except Timeout:
            raise AssertionError("the message sent with the handshake was silently dropped") from None
        if frame.opcode == OP_CLOSE:
            assert frame.close_code == 1002, (frame.close_code, frame.close_reason)
        else:
            watcher.wait_message(text)
            conn.send_close(1000)
            assert conn.expect_close(WAIT).close_code == 1000
    finally:
        sock.close()
    assert_chat_works(abuse_server.url, watcher, server=abuse_server)


# Slowloris and silent connections.

SLOWLORIS = 200


def _eof_times(socks: list[socket.socket], started: float, timeout: float) -> dict[int, float]:
    """Seconds from ``started`` to EOF (or reset) for each socket, watched in one thread."""
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    done: dict[int, float] = {}
    deadline = started + timeout
    while len(done) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            try:
                data = key.fileobj.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                done[key.data] = time.monotonic() - started
                sel.unregister(key.fileobj)
    sel.close()
    return done


def test_slowloris_dropped_after_open_timeout(abuse_server, watcher):
    pid = abuse_server.proc.pid
    baseline = settled_stats(pid)
    half = handshake_request(abuse_server.port).split(b"\r\n")
    half = b"\r\n".join(half[:3]) + b"\r\n"  # request line and two headers, no end
    socks = []
    try:
        started = time.monotonic()
        for _ in range(SLOWLORIS):
            s = open_socket(abuse_server.port)
            socks.append(s)
            s.sendall(half)
        opened = time.monotonic() - started
        # While they hang on, others come and talk.
        chat: list = []

        def chatter() -> None:
            try:
                for _ in range(3):
                    chat.append(assert_chat_works(abuse_server.url, watcher, server=abuse_server))
            except BaseException as exc:
                chat.append(exc)

        talking = threading.Thread(target=chatter, daemon=True)
        talking.start()
        dropped = _eof_times(socks, started, opened + OPEN_TIMEOUT + WAIT)
        talking.join(WAIT)
        failed = [c for c in chat if isinstance(c, BaseException)]
        assert not failed, f"a fresh client could not chat while the slowloris connections hung on: {failed[0]}"
        assert len(chat) == 3, "fresh clients were still not done chatting"
    finally:
        for s in socks:
            s.close()
    assert len(dropped) == SLOWLORIS, f"{SLOWLORIS - len(dropped)} slowloris connection(s) never dropped"
    first, last = min(dropped.values()), max(dropped.values())
    print(f"\n{SLOWLORIS} slowloris connections opened in {opened:.2f}s, dropped after {first:.2f}-{last:.2f}s "
          f"(--open-timeout {OPEN_TIMEOUT})")
    assert first >= OPEN_TIMEOUT * 0.8, f"dropped too early: {first:.2f}s"
    assert last <= opened + OPEN_TIMEOUT + 2.0, f"dropped too late: {last:.2f}s"
    after = wait_baseline(pid, baseline, timeout=WAIT)
    print(f"baseline {baseline}, after {after}")


def test_trickled_handshake_dropped_at_open_timeout(abuse_server, watcher):
    """--open-timeout bounds the whole handshake, not each recv.

    A slowloris that sends one byte of a never-ending header every 0.2 s
    must not outlive the open timeout by resetting the clock with each byte.
    """
    pid = abuse_server.proc.pid
    baseline = settled_stats(pid)
    timed_out = r"refused 127\.0\.0\.1:\d+: opening handshake timed out"
    before = len(re.findall(timed_out, abuse_server.log))  # the module's earlier tests' own
    head = handshake_request(abuse_server.port)[:-2] + b"X-Slow: " + b"z" * 1000
    socks = [open_socket(abuse_server.port) for _ in range(5)]
    started = time.monotonic()
    dropped: dict[int, float] = {}
    limit = OPEN_TIMEOUT + 2.0
    try:
        for pos in range(len(head)):
            for i, s in enumerate(socks):
                if i in dropped:
                    continue
                try:
                    s.sendall(head[pos:pos + 1])
                except OSError:
                    dropped[i] = time.monotonic() - started
            if len(dropped) == len(socks) or time.monotonic() - started > limit:
                break
            # A short wait for the server's EOF doubles as the trickle's pace.
            for i, s in enumerate(socks):
                if i not in dropped and is_eof_or_reset(s, 0.2 / len(socks)):
                    dropped[i] = time.monotonic() - started
    finally:
        for s in socks:
            s.close()
    assert len(dropped) == len(socks), (
        f"{len(socks) - len(dropped)} trickling connection(s) still open {limit:.1f}s after connecting "
        f"(--open-timeout {OPEN_TIMEOUT})")
    assert max(dropped.values()) <= limit
    abuse_server.wait_for_log(timed_out, WAIT, count=before + len(socks))  # a refusal line each
    assert_chat_works(abuse_server.url, watcher, server=abuse_server)
    wait_baseline(pid, baseline, timeout=WAIT)


def test_silent_tcp_connections_leave_nothing_behind(abuse_server, watcher):
    """1,000 connections opened and dropped without a word: half with FIN, half with RST."""
    pid = abuse_server.proc.pid
    baseline = settled_stats(pid)
    linger_rst = struct.pack("ii", 1, 0)
    started = time.monotonic()
    peak = baseline
    for batch in range(4):
        socks = [open_socket(abuse_server.port) for _ in range(250)]
        if batch == 0:
            # All 250 accepted and each given a reader before any goes away.
            deadline = time.monotonic() + WAIT
            while (peak := proc_stats(pid)).threads < baseline.threads + 250 and time.monotonic() < deadline:
                time.sleep(0.02)
        for i, s in enumerate(socks):
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_rst)
            s.close()
    elapsed = time.monotonic() - started
    assert peak.threads >= baseline.threads + 250, f"connections were not served concurrently: {peak}"
    assert_chat_works(abuse_server.url, watcher, server=abuse_server)
    after = wait_baseline(pid, baseline, timeout=OPEN_TIMEOUT + WAIT)
    print(f"\n1000 silent connections in {elapsed:.2f}s; baseline {baseline}, peak {peak}, after {after}")
    assert abuse_server.proc.poll() is None


def test_half_closed_handshake_is_dropped(abuse_server, watcher):
    """A client that sends half a handshake and shuts down its side gets closed at once."""
    pid = abuse_server.proc.pid
    baseline = settled_stats(pid)
    socks = []
    for _ in range(20):
        s = open_socket(abuse_server.port)
        s.sendall(handshake_request(abuse_server.port)[:30])
        s.shutdown(socket.SHUT_WR)
        socks.append(s)
    started = time.monotonic()
    try:
        dropped = _eof_times(socks, started, WAIT)
    finally:
        for s in socks:
            s.close()
    assert len(dropped) == len(socks)
    assert max(dropped.values()) < OPEN_TIMEOUT, "waited for the open timeout instead of the EOF"
    assert_chat_works(abuse_server.url, watcher, server=abuse_server)
    wait_baseline(pid, baseline, timeout=WAIT)


# Dead peers.


def test_dead_peer_removed_by_keepalive(start_server):
    """A client that completes the handshake, then never reads nor answers pings, is dropped."""
    interval = timeout = 0.5
    server = start_server("--ping-interval", str(interval), "--ping-timeout", str(timeout))
    with Watcher(server.url) as watcher:
        # A well-behaved client answers pings (websockets does it by itself)
        # and must survive several keepalive rounds.
        dead = RawWS.connect(server.port, username="zombie")
        try:
            joined = time.monotonic()
            watcher.wait_message("* zombie joined")
            watcher.wait_message("* zombie left", timeout=interval + timeout + 3.0)
            gone_after = time.monotonic() - joined
            server.wait_for_log(r"disconnect zombie@.*keepalive ping timeout", timeout=2.0)
        finally:
            dead.close()
        print(f"\ndead peer removed {gone_after:.2f}s after joining "
              f"(--ping-interval {interval} --ping-timeout {timeout})")
        # The ticker looks every ping_timeout / 4; the rest of the margin is for a loaded machine.
        assert gone_after <= interval + timeout + 1.5, f"took {gone_after:.2f}s"
        assert gone_after >= interval, "dropped before it was ever pinged"
        # The watcher went through the same pings and is still here.
        assert_chat_works(server.url, watcher, server=server)
        assert "* zombie left" in watcher.messages


def test_peer_answering_pings_is_kept(start_server):
    """The other side of keepalive: a raw client that does answer pings is not dropped."""
    server = start_server("--ping-interval", "0.4", "--ping-timeout", "1")
    with Watcher(server.url) as watcher:
        with RawWS.connect(server.port, username="alive") as alive:
            watcher.wait_message("* alive joined")
            pings = 0
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    frame = alive.recv_frame(timeout=max(0.01, deadline - time.monotonic()))
                except Timeout:
                    break
                assert frame.opcode != OP_CLOSE, (frame.close_code, frame.close_reason)
                if frame.opcode == OP_PING:
                    pings += 1
                    alive.send_frame(OP_PONG, frame.payload)
            assert pings >= 3, f"only {pings} keepalive pings in 2s at --ping-interval 0.4"
            alive.send_text("still here")
            watcher.wait_message("[alive] still here")
            assert "* alive left" not in watcher.messages
            alive.send_frame(OP_CLOSE, close_payload(1000))
            assert alive.expect_close(WAIT).close_code == 1000
        watcher.wait_message("* alive left")


# Churn.

CHURN_CYCLES = 5000
CHURN_THREADS = 20
# Clients that drop at once, each without a close frame (support/herd.py).
# Before the server let a thread sleep 1 s waiting for the GIL (5 ms, the
# default), their 5,000 readers took 9-60 s to leave, and nobody else's
# message moved meanwhile; since, a few seconds here.
HERD = 5000
# The others' messages flow again, and every one of the herd has left, within this.
HERD_LEAVE_S = 15.0
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_thousands_dropping_at_once_leave_in_seconds_while_the_others_keep_chatting(start_server):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < HERD + herd.SPARE_FILES:
        pytest.skip(f"{HERD:,} clients need {HERD + herd.SPARE_FILES:,} open files; ulimit -Hn is {hard:,}")
    server = start_server()
    with Watcher(server.url) as watcher:
        with subprocess.Popen([sys.executable, "-m", "support.herd", str(server.port), str(HERD)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": TESTS_DIR}) as clients:
            try:
                assert clients.stdout.readline() == "ready\n", f"the herd exited with {clients.wait()}"
                wait_joined(server, HERD + 1)
            finally:
                clients.kill()  # the kernel closes its sockets, all at once
        watcher.ws.send("after the herd")
        watcher.wait_message("after the herd", HERD_LEAVE_S)
        wait_left(server, 1, HERD_LEAVE_S)
        server.wait_for_log(r": connection lost \(", HERD_LEAVE_S, count=HERD)
        assert watcher.connected


@pytest.mark.slow
def test_churn(start_server):
    """5,000 connect/send/disconnect cycles from 20 threads while two watchers listen."""
    server = start_server()
    pid = server.proc.pid
    with Watcher(server.url, max_size=None) as w1, Watcher(server.url, max_size=None) as w2:
        baseline = settled_stats(pid)
        next_cycle = iter(range(CHURN_CYCLES))
        lock = threading.Lock()
        sent: list[str] = []
        errors: list[BaseException] = []

        def churner() -> None:
            try:
                while True:
                    with lock:
                        n = next(next_cycle, None)
                    if n is None:
                        return
                    text = f"churn-{n}"
                    with RawWS.connect(server.port, timeout=WAIT) as conn:
                        conn.send_text(text)
                        # Close as a polite client does: the close comes after the
                        # message, so the server has relayed it before it answers.
                        conn.send_close(1000)
                        close = conn.expect_close(WAIT)
                        assert close.close_code == 1000, close
                    with lock:
                        sent.append(text)
            except BaseException as exc:
                errors.append(exc)

        started = time.monotonic()
        threads = [threading.Thread(target=churner, daemon=True) for _ in range(CHURN_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(50)
        elapsed = time.monotonic() - started
        assert not errors, f"{len(errors)} churner(s) failed, first: {errors[0]!r}"
        assert len(sent) == CHURN_CYCLES
        expected = set(sent)
        for w in (w1, w2):
            got = w.wait_for(lambda msgs: expected <= set(msgs), 10.0, f"all {CHURN_CYCLES} churn messages")
            churn = [m for m in got if isinstance(m, str) and m.startswith("churn-")]
            assert len(churn) == CHURN_CYCLES, f"{len(churn) - CHURN_CYCLES} extra or duplicate messages"
            assert set(churn) == expected
        peak_rss = proc_stats(pid).rss_kb
        after = wait_baseline(pid, baseline, timeout=10.0)
        growth_mb = (after.rss_kb - baseline.rss_kb) / 1024
        print(f"\nchurn: {CHURN_CYCLES} cycles from {CHURN_THREADS} threads in {elapsed:.2f}s "
              f"({CHURN_CYCLES / elapsed:.0f}/s); baseline {baseline}; after {after}; "
              f"peak RSS right after {peak_rss / 1024:.1f}MiB; RSS growth {growth_mb:.2f}MB")
        assert growth_mb < 20
        assert_chat_works(server.url, w1, server=server)
        assert w2.connected


# One client cannot deny service to the others (issue 8, points 10 to 14).
# Memory is the server's VmRSS, sampled by a thread; bounds are generous on
# purpose (they are about what is unbounded today, not about a few MiB).

MIB = 1024 * 1024


class RssProbe:
    """The server's VmRSS, sampled every 20 ms until stopped; ``peak_mib`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before_mib = proc_stats(pid).rss_kb / 1024
        self.peak_mib = self.before_mib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak_mib = max(self.peak_mib, proc_stats(self.pid).rss_kb / 1024)
            except (FileNotFoundError, ProcessLookupError):
                return

    def now_mib(self) -> float:
        return proc_stats(self.pid).rss_kb / 1024

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __repr__(self) -> str:
        return f"RSS before {self.before_mib:.1f} MiB, peak {self.peak_mib:.1f} MiB"


def _connect_from(port: int, source_ip: str, timeout: float = WAIT) -> socket.socket:
    """A TCP connection from another loopback address: to the server, another client machine."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source_ip, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _ws_from(port: int, source_ip: str, timeout: float = WAIT) -> RawWS:
    sock = _connect_from(port, source_ip, timeout)
    sock.sendall(handshake_request(port))
    response = read_http_response(sock, timeout)
    assert response is not None and response.status == 101, response
    return RawWS(sock, response.rest)


def _non_reader(port: int) -> RawWS:
    """A client whose receive buffer is tiny and never read: its server-side socket fills at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", port))
    sock.sendall(handshake_request(port))
    response = read_http_response(sock, WAIT)
    assert response is not None and response.status == 101, response
    return RawWS(sock, response.rest)


def _local_port(ws: RawWS) -> int:
    return ws.sock.getsockname()[1]


HANDSHAKE_FLOOD = 300


def test_handshake_flood_from_one_address_does_not_keep_others_out(start_server):
    """Point 10: hundreds of silent sockets from 127.0.0.1, renewed as they are dropped;
    127.0.0.2 still joins and chats, and the flood never takes a joined slot."""
    server = start_server("--open-timeout", "1", "--max-connections", "50", "--max-handshakes-per-ip", "100")
    stop = threading.Event()
    held: list[socket.socket] = []

    def flood() -> None:  # keeps HANDSHAKE_FLOOD sockets open, reopening those the server drops
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            for i, s in enumerate(held):
                if is_eof_or_reset(s, 0):
                    s.close()
                    held[i] = open_socket(server.port)
            while len(held) < HANDSHAKE_FLOOD:
                held.append(open_socket(server.port))
            stop.wait(0.05)

    probe = RssProbe(server.proc.pid)
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        deadline = time.monotonic() + WAIT
        while len(held) < HANDSHAKE_FLOOD and time.monotonic() < deadline:
            time.sleep(0.05)
        waited = []
        for round_ in range(3):  # across open-timeout renewals
            started = time.monotonic()
            with _ws_from(server.port, "127.0.0.2") as ws:
                waited.append(time.monotonic() - started)
                text = f"still served {round_}".encode()
                ws.send_text(text)
                frame, _ = ws.recv_until(lambda f: f.opcode == OP_TEXT, WAIT)
                assert frame.payload == text
                ws.send_close(1000)
                ws.expect_close(WAIT)
            time.sleep(0.5)
    finally:
        stop.set()
        flooder.join(10)
        for s in held:
            s.close()
        probe.stop()
    print(f"\nwith {HANDSHAKE_FLOOD} handshakes held from 127.0.0.1, 127.0.0.2 joined in "
          + ", ".join(f"{w * 1000:.0f} ms" for w in waited) + f"; {probe}, after {probe.now_mib():.1f} MiB")
    assert not re.search(r"refused \S+: 503", server.log), "the flood took joined slots"
    assert re.search(r"refused 127\.0\.0\.1:\d+: too many connections in their opening handshake "
                     r"from this address", server.log)
    assert server.proc.poll() is None


def test_ping_flood_without_reading_is_evicted(start_server):
    """Point 11: pongs count against --send-queue-bytes; the pinger is evicted and memory stays bounded."""
    queue = 1 * MIB
    server = start_server("--send-queue-bytes", str(queue), "--ping-interval", "0")
    pid = server.proc.pid
    settled_stats(pid)
    with Watcher(server.url) as watcher:
        pinger = _non_reader(server.port)
        port = _local_port(pinger)
        probe = RssProbe(pid)
        batch = build_frame(OP_PING, b"p" * 125) * 500  # the largest pings: the most owed per ping parsed
        deadline = time.monotonic() + 20
        evicted = re.compile(rf"closing anonymous@127\.0\.0\.1:{port}: 1008 slow consumer")
        try:
            while time.monotonic() < deadline and not evicted.search(server.log):
                try:
                    pinger.send_raw(batch, timeout=0.5)
                except (socket.timeout, OSError):
                    pass  # the server stopped reading us: it is deciding our fate
            server.wait_for_log(evicted.pattern, WAIT)
            server.wait_for_log(rf"disconnect anonymous@127\.0\.0\.1:{port}: failed: 1008 slow consumer", 2 * WAIT)
        finally:
            probe.stop()
            pinger.close()
        assert_chat_works(server.url, watcher, server=server)
    print(f"\nping flood: evicted with 1008; {probe}; after {probe.now_mib():.1f} MiB")
    # The owed pongs (<= 1 MiB) plus what one read parses at once and the kernel's buffers.
    assert probe.peak_mib - probe.before_mib < queue / MIB + 8, probe


READERS, NON_READERS = 10, 2
BIG = 1 * MIB


def test_fast_publisher_is_slowed_and_only_stuck_sockets_are_evicted(start_server):
    """Point 12: 1 MiB messages flat out to 10 readers and 2 non-readers."""
    queue = 4 * MIB
    server = start_server("--send-queue-bytes", str(queue), "--max-message-size", str(BIG + 16),
                          "--ping-interval", "0", "--write-timeout", "60")
    pid = server.proc.pid
    settled_stats(pid)
    received = [0] * (READERS + 1)

    def drain(i: int, ws) -> None:  # a websockets client reading as fast as it can
        try:
            for message in ws:
                received[i] += 1
        except ConnectionClosed:
            pass

    def drain_echoes(ws: RawWS) -> None:  # the publisher reads its echoes in a thread of its own
        try:
            while True:
                if ws.recv_frame(60).opcode == OP_BINARY:
                    received[READERS] += 1
        except (AssertionError, OSError):
            pass  # closed, or nothing for a minute

    contexts = contextlib.ExitStack()  # websockets wants its clients entered
    readers = [contexts.enter_context(connect(server.url, max_size=None, close_timeout=1)) for _ in range(READERS)]
    publisher = RawWS.connect(server.port)
    stuck = [_non_reader(server.port) for _ in range(NON_READERS)]
    stuck_ports = {_local_port(w) for w in stuck}
    threads = [threading.Thread(target=drain, args=(i, ws), daemon=True) for i, ws in enumerate(readers)]
    threads.append(threading.Thread(target=drain_echoes, args=(publisher,), daemon=True))
    for t in threads:
        t.start()
    probe = RssProbe(pid)
    evictions = re.compile(r"closing anonymous@127\.0\.0\.1:(\d+): 1008 slow consumer")
    sent = 0
    payload = os.urandom(BIG)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and (sent < 30 or len(evictions.findall(server.log)) < NON_READERS):
            publisher.send_binary(payload, timeout=30)
            sent += 1
        stop_at = time.monotonic() + 30
        while time.monotonic() < stop_at and min(received) < sent and all(t.is_alive() for t in threads):
            time.sleep(0.05)
    finally:
        probe.stop()
        for ws in [publisher, *stuck]:
            ws.close()
        contexts.close()
        for t in threads:
            t.join(5)
    evicted = {int(p) for p in evictions.findall(server.log)}
    print(f"\n{sent} messages of 1 MiB; evicted {sorted(evicted)}; non-readers {sorted(stuck_ports)}; "
          f"readers got {received[:READERS]}, the publisher {received[READERS]}; {probe}, after {probe.now_mib():.1f} MiB")
    assert evicted == stuck_ports, server.log[-3000:]
    assert min(received) == sent, (received, sent)
    # Each client owes at most --send-queue-bytes plus one message, in its own joined copy.
    assert probe.peak_mib - probe.before_mib < (READERS + NON_READERS + 1) * (queue + BIG) / MIB + 32, probe


FD_LIMIT = 200


def _open_files_limit(limit: int):
    def apply() -> None:  # in the server's process, before it starts: soft and hard, so it cannot raise it
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


def test_admissions_stop_short_of_the_open_files_limit(start_server):
    """Point 13: past what its descriptors allow, clients get 503 and everyone joined still gets every message."""
    server = start_server("--ping-interval", "0", preexec_fn=_open_files_limit(FD_LIMIT))
    probe = RssProbe(server.proc.pid)
    joined: list[RawWS] = []
    silent: list[socket.socket] = []
    statuses: dict[int, int] = {}
    try:
        for i in range(FD_LIMIT + 50):
            sock = open_socket(server.port)
            sock.sendall(handshake_request(server.port))
            try:
                response = read_http_response(sock, WAIT)
            except Timeout:
                response = None
            assert response is not None, f"client {i} got no answer ({len(joined)} joined)"
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status == 101:
                joined.append(RawWS(sock, response.rest))
            else:
                sock.close()
        cap = len(joined)
        assert 0 < cap < FD_LIMIT and statuses == {101: cap, 503: FD_LIMIT + 50 - cap}, statuses
        # More sockets than descriptors are left, held open while we broadcast.
        silent = [open_socket(server.port) for _ in range(FD_LIMIT)]
        for round_ in range(3):
            text = f"to all {cap}, round {round_}".encode()
            started = time.monotonic()
            joined[round_].send_text(text)
            for ws in joined:
                ws.recv_until(lambda f: f.opcode == OP_TEXT and f.payload == text, WAIT)
            print(f"\nround {round_}: all {cap} joined clients had the broadcast in "
                  f"{(time.monotonic() - started) * 1000:.0f} ms, {FD_LIMIT} silent sockets pending")
    finally:
        for s in silent:
            s.close()
        for ws in joined:
            ws.close()
        probe.stop()
    print(f"{statuses}; {probe}, after {probe.now_mib():.1f} MiB")
    assert "accept failed" not in server.log
    assert re.search(rf"--max-connections 10000 is more than the open-files limit allows; admitting at most {cap}\b",
                     server.log)
    assert server.proc.poll() is None


FRAGMENTED = 256 * 1024
EMPTY_FRAMES = 1_000_000


def _sync(ws: RawWS) -> None:
    """Everything sent so far has been parsed: pongs are answered in order."""
    token = os.urandom(8)
    ws.ping(token)
    ws.recv_until(lambda f: f.opcode == OP_PONG and f.payload == token, 60)


def test_fragmented_message_memory_is_a_small_multiple_of_its_payload(start_server):
    """Point 14: 1-byte fragments and empty continuation frames do not grow memory beyond the payload."""
    server = start_server("--ping-interval", "0")
    pid = server.proc.pid
    settled_stats(pid)
    with Watcher(server.url) as watcher, RawWS.connect(server.port) as ws:
        probe = RssProbe(pid)
        ws.send_raw(build_frame(OP_BINARY, b"x", fin=False))
        one_byte = build_frame(OP_CONT, b"x", fin=False, mask_key=b"\0\0\0\0")
        ws.send_raw(one_byte * (FRAGMENTED - 1), timeout=60)
        _sync(ws)
        fragments_mib = probe.now_mib() - probe.before_mib
        ws.send_raw(build_frame(OP_CONT, b"", fin=False) * EMPTY_FRAMES, timeout=60)
        _sync(ws)
        empty_mib = probe.now_mib() - probe.before_mib
        ws.send_raw(build_frame(OP_CONT, b"", fin=True))
        watcher.wait_for(lambda msgs: b"x" * FRAGMENTED in msgs, WAIT, "the reassembled message")
        probe.stop()
    print(f"\n{FRAGMENTED} 1-byte fragments: +{fragments_mib:.1f} MiB; then {EMPTY_FRAMES} empty ones: "
          f"+{empty_mib:.1f} MiB; {probe}")
    payload_mib = FRAGMENTED / MIB
    # The payload, a copy of it, and what one 16 KiB read parses into frames at once.
    assert fragments_mib < 4 * payload_mib + 4, fragments_mib
    # Empty frames add nothing to hold (today about 10 bytes each).
    assert empty_mib - fragments_mib < 3, (fragments_mib, empty_mib)


HOLDERS = 500
HOLD_LIMIT = 256 * 1024
BUDGET = 16 * MIB


def test_unfinished_messages_share_one_budget_and_give_it_back(start_server):
    """Point 14: 500 clients each holding a message just under the limit; past the budget, 1013."""
    server = start_server("--max-message-size", str(HOLD_LIMIT), "--max-pending-bytes", str(BUDGET),
                          "--ping-interval", "0")
    pid = server.proc.pid
    settled_stats(pid)
    held = HOLD_LIMIT - 1024
    piece = HOLD_LIMIT // 4
    frames = (build_frame(OP_BINARY, b"h" * piece, fin=False)
              + build_frame(OP_CONT, b"h" * piece, fin=False) * 2
              + build_frame(OP_CONT, b"h" * (held - 3 * piece), fin=False))
    holders: list[RawWS] = []
    with Watcher(server.url) as watcher:
        probe = RssProbe(pid)
        try:
            for _ in range(HOLDERS):
                ws = RawWS.connect(server.port)
                holders.append(ws)
                try:
                    ws.send_raw(frames, timeout=WAIT)
                except OSError:
                    pass  # refused and closed while we sent: that is the point
            most = BUDGET // held
            refused = server.wait_for_log(r"closing anonymous@\S+: 1013 server busy", 4 * WAIT, count=HOLDERS - most)
            assert refused
            assert_chat_works(server.url, watcher, server=server)
            peak = probe.now_mib()
        finally:
            for ws in holders:
                ws.close()
        wait_left(server, 1, 4 * WAIT)  # only the watcher stays
        wait_baseline(pid, settled_stats(pid), timeout=4 * WAIT)
        probe.stop()
        after = probe.now_mib()
        assert_chat_works(server.url, watcher, server=server)
    print(f"\n{HOLDERS} holders of {held} bytes, budget {BUDGET // MIB} MiB: "
          f"{len(re.findall('closing .*1013 server busy', server.log))} refused with 1013; {probe}, "
          f"with all holding {peak:.1f} MiB, after they left {after:.1f} MiB")
    # The budget, plus what 500 connections cost anyway (threads, protocol objects, a read each).
    assert probe.peak_mib - probe.before_mib < BUDGET / MIB + HOLDERS * 0.25 + 32, probe
    assert after - probe.before_mib < 32, (after, probe)


PIDS_CGROUPS = "/sys/fs/cgroup/pids"  # cgroup v1's pids controller, where this machine mounts it


@contextlib.contextmanager
def _pids_cgroup():
    """A fresh pids cgroup for one server: its thread count can be capped, as root's RLIMIT_NPROC cannot."""
    if not os.access(PIDS_CGROUPS, os.W_OK):
        pytest.skip(f"needs a writable {PIDS_CGROUPS} (cgroup v1 pids controller) to run out of threads")
    path = os.path.join(PIDS_CGROUPS, f"broadcast-test-{os.getpid()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        with open(os.path.join(path, "cgroup.procs")) as f:
            for pid in f.read().split():  # a cgroup with a task in it cannot go: back to the root one
                _cgroup_write(PIDS_CGROUPS, "cgroup.procs", pid)
        os.rmdir(path)


def _cgroup_write(path: str, name: str, value: str) -> None:
    with open(os.path.join(path, name), "w") as f:
        f.write(value)


def test_a_connection_that_gets_no_thread_is_dropped_and_everyone_else_carries_on(start_server):
    """Out of threads, the acceptor hangs up on the one client it cannot serve, leaves its room and goes on."""
    with _pids_cgroup() as cgroup:
        server = start_server("--ping-interval", "0",
                              preexec_fn=lambda: _cgroup_write(cgroup, "cgroup.procs", str(os.getpid())))
        with Watcher(server.url) as watcher:
            with open(os.path.join(cgroup, "pids.current")) as f:
                threads = int(f.read())
            _cgroup_write(cgroup, "pids.max", str(threads + 1))  # one more client's thread
            with RawWS.connect(server.port, username="served") as served:
                watcher.wait_message("* served joined")
                with contextlib.closing(open_socket(server.port)) as unserved:
                    unserved.sendall(handshake_request(server.port, "/ws?username=unserved"))
                    server.wait_for_log(r"cannot serve 127\.0\.0\.1:\d+: can't start new thread", WAIT)
                    # A request in by accept was answered and joined by the
                    # acceptor before the thread failed; it leaves as it came.
                    response = read_http_response(unserved, WAIT)
                    if response is not None:
                        assert response.status == 101
                        server.wait_for_log(r"disconnect unserved@\S+: out of threads", WAIT)
                        watcher.wait_message("* unserved left")
                    assert is_eof_or_reset(unserved, WAIT)
                served.send_text(b"still here")
                watcher.wait_message("[served] still here")
                _cgroup_write(cgroup, "pids.max", "max")
                assert_chat_works(server.url, watcher, server=server)  # a new client gets a thread again
        assert server.proc.poll() is None
