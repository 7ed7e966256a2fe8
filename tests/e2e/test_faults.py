"""Faults around the server process: graceful shutdown under load, shutdown against
clients that will not close, and a server killed outright under the project's client.
"""

from __future__ import annotations

import re
import selectors
import signal
import threading
import time
from collections import defaultdict

from support.process import ClientProcess, wait_joined
from support.rawws import (
    OP_CLOSE, OP_TEXT, FrameParser, RawWS, build_frame, is_eof_or_reset,
)
from support.wsclients import Watcher

WAIT = 5.0
SHUTDOWN_TIMEOUT = 3.0
CLIENTS = 100
PUBLISHERS = 5
PUBLISH_EVERY_S = 0.005  # per publisher: a steady stream the test's single reader can parse
MESSAGE = re.compile(r"pub(\d) seq=(\d+) (x*) end")


def published(p: int, seq: int) -> str:
    # The padding length depends on the sequence number, so a torn or spliced
    # message cannot parse as a whole one.
    return f"pub{p} seq={seq} {'x' * (seq % 300)} end"


class Fleet:
    """Many raw clients read by one thread; each answers the server's close and waits for EOF."""

    def __init__(self, port: int, count: int) -> None:
        self.conns = [RawWS.connect(port) for _ in range(count)]
        self.parsers = [FrameParser() for _ in self.conns]
        self.texts: list[list[str]] = [[] for _ in self.conns]
        self.closes: list[int | None] = [None] * count
        self.closed_at: list[float | None] = [None] * count
        self.eof = [False] * count
        self.errors: list[str] = []
        self.cond = threading.Condition()
        self._sel = selectors.DefaultSelector()
        for i, conn in enumerate(self.conns):
            conn.sock.settimeout(WAIT)
            self._sel.register(conn.sock, selectors.EVENT_READ, i)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 50
        while not all(self.eof) and time.monotonic() < deadline:
            for key, _ in self._sel.select(0.5):
                self._read(key.data)

    def _read(self, i: int) -> None:
        conn = self.conns[i]
        try:
            data = conn.sock.recv(65536)
        except OSError as exc:
            data = b""
            if self.closes[i] is None:
                self._error(f"client {i}: {exc!r} before any close frame")
        if not data:
            self._sel.unregister(conn.sock)
            with conn.send_lock:  # the server is done: so are we, as a client should
                conn.eof = True
                conn.sock.close()
            with self.cond:
                self.eof[i] = True
                if self.closes[i] is None:
                    self.errors.append(f"client {i}: EOF without a close frame")
                self.cond.notify_all()
            return
        try:
            frames = self.parsers[i].feed(data)
        except AssertionError as exc:
            self._error(f"client {i}: {exc}")
            return
        with self.cond:
            for frame in frames:
                if self.closes[i] is not None:
                    self.errors.append(f"client {i}: {frame!r} after the close frame")
                elif frame.opcode == OP_TEXT:
                    self.texts[i].append(frame.payload.decode("utf-8"))
                elif frame.opcode == OP_CLOSE:
                    self.closes[i] = frame.close_code
                    self.closed_at[i] = time.monotonic()
                    with conn.send_lock:  # never inside a publisher's frame
                        conn.eof = True  # tells a publisher to stop
                        try:
                            conn.sock.sendall(build_frame(OP_CLOSE, frame.payload[:2]))
                        except OSError as exc:
                            self.errors.append(f"client {i}: could not answer the close: {exc!r}")
            self.cond.notify_all()

    def _error(self, text: str) -> None:
        with self.cond:
            self.errors.append(text)
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"timed out waiting for {what}; errors: {self.errors[:5]}"

    def close(self) -> None:
        self._thread.join(WAIT)
        for conn in self.conns:
            conn.close()


def test_sigterm_under_load_closes_everyone_with_1001(start_server):
    server = start_server("--shutdown-timeout", str(SHUTDOWN_TIMEOUT))
    fleet = Fleet(server.port, CLIENTS)
    publishers = fleet.conns[:PUBLISHERS]
    sent = [0] * PUBLISHERS
    stop = threading.Event()

    def publish(p: int) -> None:
        conn = publishers[p]
        seq = 0
        while not stop.is_set() and seq < 5000:
            frame = build_frame(OP_TEXT, published(p, seq).encode())
            with conn.send_lock:
                if conn.eof:  # the server's close arrived: no more data (RFC 6455 5.5.1)
                    return
                try:
                    conn.sock.sendall(frame)
                except OSError:
                    return
            seq += 1
            sent[p] = seq
            stop.wait(PUBLISH_EVERY_S)

    threads = [threading.Thread(target=publish, args=(p,), daemon=True) for p in range(PUBLISHERS)]
    try:
        for t in threads:
            t.start()

        def everyone_has_some() -> bool:
            return all(sum(1 for t in texts if t.endswith(" end")) >= 40 * PUBLISHERS for texts in fleet.texts)

        fleet.wait_for(everyone_has_some, 20, "every client to receive messages")
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rc = server.wait_exit(SHUTDOWN_TIMEOUT + 5)
        exited = time.monotonic() - signalled
        fleet.wait_for(lambda: all(fleet.eof), WAIT, "every client's EOF")
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)
        fleet.close()

    last_close = max(fleet.closed_at) - signalled
    received = sum(len(t) for t in fleet.texts)
    print(f"\nSIGTERM with {CLIENTS} clients, {PUBLISHERS} publishing ({sum(sent)} messages sent, "
          f"{received} delivered): exit {rc} after {exited:.3f}s; last close frame after {last_close:.3f}s")
    assert rc == 0, server.log[-2000:]
    assert exited <= SHUTDOWN_TIMEOUT + 1.0
    assert "shutdown timeout" not in server.log, "some clients had to be dropped: " + server.log[-2000:]
    assert not fleet.errors, fleet.errors[:10]
    assert fleet.closes == [1001] * CLIENTS, defaultdict(int, {c: fleet.closes.count(c) for c in set(fleet.closes)})

    for i, texts in enumerate(fleet.texts):
        seqs: dict[int, list[int]] = defaultdict(list)
        for text in texts:
            m = MESSAGE.fullmatch(text)
            assert m, f"client {i} received a torn or unknown message: {text[:80]!r}"
            p, seq = int(m.group(1)), int(m.group(2))
            assert len(m.group(3)) == seq % 300, f"client {i}: wrong padding in {text[:80]!r}"
            seqs[p].append(seq)
        for p in range(PUBLISHERS):
            got = seqs[p]
            # Everything up to the close frame, in order, nothing skipped.
            assert got == list(range(len(got))), f"client {i}, publisher {p}: {got[:20]}..."
            assert len(got) <= sent[p]


def test_shutdown_timeout_drops_clients_that_never_close(start_server):
    """Clients that ignore the close frame cannot hold the server past --shutdown-timeout."""
    timeout = 1.0
    server = start_server("--shutdown-timeout", str(timeout))
    deaf = [RawWS.connect(server.port) for _ in range(3)]  # never read, never answer
    try:
        with Watcher(server.url) as polite:
            hello = f"before {time.monotonic_ns()}"
            deaf[0].send_text(hello)
            polite.wait_message(hello)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            rc = server.wait_exit(timeout + 5)
            exited = time.monotonic() - signalled
            closed = polite.wait_closed(WAIT)
            assert closed.rcvd is not None and closed.rcvd.code == 1001, closed
        for conn in deaf:
            close = conn.expect_close(WAIT, then_eof=False)
            assert close.close_code == 1001
            assert is_eof_or_reset(conn.sock, WAIT)
    finally:
        for conn in deaf:
            conn.close()
    print(f"\nSIGINT with 3 unresponsive clients: exit {rc} after {exited:.3f}s (--shutdown-timeout {timeout})")
    assert rc == 0
    assert timeout * 0.9 <= exited <= timeout + 1.5
    server.wait_for_log(r"shutdown timeout: dropped 3 connection", timeout=1)


def test_client_reports_a_killed_server_without_traceback(start_server):
    server = start_server()
    # Told not to reconnect: how a session ends (test_client_rooms.py has the reconnection).
    client = ClientProcess("--addr", server.addr, "--username", "survivor", "--reconnect-timeout", "0")
    out, err = client.stdout.lines, client.stderr.lines
    try:
        wait_joined(server, 1, WAIT)
        with RawWS.connect(server.port, username="talker") as talker:
            for n in range(20):
                talker.send_text(f"line {n}")
            assert client.stdout.wait_until(lambda out: "[talker] line 19" in out, WAIT), (out, err)
            # Mid-stream: more is on its way when the server dies.
            for n in range(20, 200):
                talker.send_text(f"line {n}")
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(WAIT)
        rc = client.wait(WAIT)
    finally:
        client.kill()
        client.proc.stdin.close()
    print(f"\nclient after SIGKILL: exit {rc}, stderr {err!r}")
    assert rc != 0
    assert not any("Traceback" in line for line in out + err), "\n".join(err)
    said = [line for line in err if line.strip()]
    assert len(said) == 1, said
    assert re.search(r"connection|server", said[0], re.I), said
    assert all(line.startswith("[talker] line ") or line.startswith("* ") for line in out), out
