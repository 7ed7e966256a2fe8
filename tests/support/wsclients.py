"""Client helpers for the server's end-to-end tests.

Two independent libraries to talk to the server with:

* ``ws_connect``: the ``websockets`` sync client (use it as a context manager);
* ``wsc_connect``: ``websocket-client``.

The clients the libraries will not impersonate (a tiny receive buffer that
never reads, pings never answered, a TCP reset instead of a close) are
``support.rawws.RawWS``.

Every blocking call here takes a timeout.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from urllib.parse import quote

import websocket  # websocket-client
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as _websockets_connect

TIMEOUT = 5.0  # default for any single blocking operation


class Closed(Exception):
    """The server closed the WebSocket; ``code`` is its close code (None: no close frame)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed: {code} {reason}")
        self.code = code
        self.reason = reason


def url_for(server, username: str | None = None, path: str = "/ws") -> str:
    url = f"ws://{server.host}:{server.port}{path}"
    if username is not None:
        url += ("&" if "?" in path else "?") + "username=" + quote(username, safe="")
    return url


# websockets (sync)


def ws_connect(url: str, **kwargs):
    """A websockets sync client; use it as ``with ws_connect(url) as ws:``.

    Client-side keepalive is off so that the only pings on the wire are the
    server's, and messages of any size are accepted.
    """
    options = dict(proxy=None, open_timeout=TIMEOUT, close_timeout=2, ping_interval=None,
                   compression=None, max_size=None)
    options.update(kwargs)
    return _websockets_connect(url, **options)


# websocket-client


def wsc_connect(url: str, timeout: float = TIMEOUT, **kwargs) -> websocket.WebSocket:
    return websocket.create_connection(url, timeout=timeout, **kwargs)


@contextlib.contextmanager
def ws_joined(url: str, **kwargs):
    """``ws_connect``, entered once the server is done joining it, its join notice included.

    The 101 comes first (the reader sends it as it joins) and the notice
    right after, from the same reader; a ping read after that is answered
    after it too. A test that needs "Alice joined" in the room's order
    before the next client comes waits for the pong, not for the 101.
    """
    with ws_connect(url, **kwargs) as ws:
        assert ws.ping().wait(TIMEOUT), f"no pong within {TIMEOUT}s"
        yield ws


def recv(ws, timeout: float = TIMEOUT):
    """The next message from either library's client: ``str`` or ``bytes``.

    Raises ``Closed`` for a close frame (or a connection that ends without
    one) and ``TimeoutError`` when nothing arrives in time.
    """
    if isinstance(ws, websocket.WebSocket):
        ws.settimeout(timeout)
        try:
            opcode, data = ws.recv_data()
        except websocket.WebSocketTimeoutException:
            raise TimeoutError(f"no message within {timeout}s") from None
        except (websocket.WebSocketConnectionClosedException, ConnectionError) as exc:
            raise Closed(None, str(exc)) from None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
            raise Closed(code, data[2:].decode("utf-8", "replace"))
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return data.decode("utf-8")
        return bytes(data)
    try:
        return ws.recv(timeout=timeout)
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        raise Closed(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from None


def recv_n(ws, n: int, timeout: float = 10.0) -> list:
    """Exactly ``n`` messages, all within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    out = []
    while len(out) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"got {len(out)} of {n} messages within {timeout}s")
        out.append(recv(ws, remaining))
    return out


def send(ws, message) -> None:
    if isinstance(ws, websocket.WebSocket):
        if isinstance(message, str):
            ws.send(message)
        else:
            ws.send_binary(message)
    else:
        ws.send(message)


def expect_silence(ws, timeout: float = 0.5) -> None:
    """Assert that not a single frame, data or control, arrives for ``timeout``."""
    if isinstance(ws, websocket.WebSocket):
        ws.settimeout(timeout)
        try:
            frame = ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            return
        raise AssertionError(f"expected nothing, got {frame!r}")
    try:
        message = ws.recv(timeout=timeout)
    except TimeoutError:
        return
    raise AssertionError(f"expected nothing, got {message!r}")


class Collector(threading.Thread):
    """Reads messages from a client in the background, each with its arrival time.

    ``n`` messages within ``timeout`` seconds (fewer is an error, reported by
    ``result``), or with ``n=None`` everything until the server ends the
    connection. The one background reader of the suite: ``TimedReceiver`` and
    ``Watcher`` are this thread on a connection of their own.
    """

    ENDS: tuple[type[BaseException], ...] = ()  # exceptions that end the reading normally, kept in .closed

    def __init__(self, ws, n: int | None, timeout: float | None, name: str = "collector") -> None:
        super().__init__(name=name, daemon=True)
        self.ws = ws
        self.n = n
        self.timeout = timeout
        self.messages: list = []
        self.arrivals: list[int] = []  # time.monotonic_ns() at each message's arrival
        self.error: BaseException | None = None
        self.closed: BaseException | None = None
        self.finished_at: float | None = None
        self.progress = threading.Condition()  # guards messages, arrivals, closed, error

    def _receive(self, timeout: float | None):
        return recv(self.ws, timeout)

    def run(self) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while self.n is None or len(self.messages) < self.n:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"got {len(self.messages)} of {self.n} messages")
                message = self._receive(remaining)
                with self.progress:
                    self.messages.append(message)
                    self.arrivals.append(time.monotonic_ns())
                    self.progress.notify_all()
            self.finished_at = time.monotonic()
        except self.ENDS as exc:
            self.closed = exc
        except BaseException as exc:  # reported by result()
            self.error = exc
        finally:
            with self.progress:
                self.progress.notify_all()

    def wait_until(self, predicate, timeout: float) -> bool:
        """Block until ``predicate(messages)`` (or the reader stopped); whether it holds."""
        with self.progress:
            self.progress.wait_for(lambda: predicate(self.messages) or not self.is_alive(), timeout)
            return bool(predicate(self.messages))

    def wait_for(self, count: int, timeout: float) -> None:
        """Block until ``count`` messages have arrived (or the reader stopped)."""
        if not self.wait_until(lambda messages: len(messages) >= count, timeout) and self.is_alive():
            raise TimeoutError(f"{self.name}: {len(self.messages)} of {count} messages after {timeout}s")

    def result(self, timeout: float | None = None) -> list:
        self.join(self.timeout + 5 if timeout is None else timeout)
        assert not self.is_alive(), f"{self.name} still reading"
        if self.error is not None:
            raise AssertionError(f"{self.name}: {self.error!r} after {len(self.messages)} messages")
        return self.messages


class TimedReceiver(Collector):
    """A websocket-client reading ``n`` messages; ``result()`` pairs each with its arrival in ns."""

    def __init__(self, url: str, n: int, timeout: float) -> None:
        super().__init__(wsc_connect(url, timeout=timeout), n, timeout, name="timed-receiver")

    def result(self) -> list[tuple[int, str]]:
        return list(zip(self.arrivals, super().result()))

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except Exception:
            pass


class Watcher(Collector):
    """A websockets sync client whose thread records every message it receives until it is closed."""

    ENDS = (ConnectionClosed,)

    def __init__(self, url: str, *, max_size: int | None = 2 ** 21, open_timeout: float = TIMEOUT) -> None:
        # Entered as a context manager, which websockets >= 17 wants, but
        # held open across the test; close() exits it.
        self._cm = _websockets_connect(url, max_size=max_size, open_timeout=open_timeout, close_timeout=2)
        super().__init__(self._cm.__enter__(), None, None, name="watcher")
        self.start()

    def _receive(self, timeout: float | None):
        return self.ws.recv(timeout)  # ConnectionClosed (kept in .closed) once the server ends it

    def wait_for(self, predicate, timeout: float = TIMEOUT, what: str = "") -> list:
        """Wait until ``predicate(messages)``; returns the messages."""
        if not self.wait_until(predicate, timeout):
            shown = [m if isinstance(m, str) and len(m) < 80 else f"<{len(m)}>" for m in self.messages[-10:]]
            raise AssertionError(
                f"watcher did not get {what or 'what was expected'} within {timeout}s "
                f"(closed={self.closed!r}, {len(self.messages)} messages, last: {shown})")
        with self.progress:
            return list(self.messages)

    def wait_message(self, message, timeout: float = TIMEOUT):
        self.wait_for(lambda msgs: message in msgs, timeout, repr(message)[:80])

    def wait_closed(self, timeout: float = TIMEOUT) -> ConnectionClosed:
        """Wait for the server to end the connection; returns how it ended."""
        self.join(timeout)
        assert not self.is_alive(), f"watcher still connected after {timeout}s"
        assert self.closed is not None, self.error
        return self.closed

    @property
    def connected(self) -> bool:
        return self.closed is None and self.is_alive()

    def close(self) -> None:
        try:
            self._cm.__exit__(None, None, None)
        except Exception:
            pass
        self.join(5)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def http_get(server, path: str, headers: dict | None = None, timeout: float = TIMEOUT):
    """A plain HTTP GET: (status, body text)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def raw_exchange(server, data: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send ``data`` on a fresh TCP connection; everything the server sends until it hangs up."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
