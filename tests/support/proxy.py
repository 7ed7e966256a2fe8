"""A TCP relay on 127.0.0.1 that a test can cut, like a network that drops and comes back.

A browser's WebSocket cannot be broken from outside the browser; putting
this relay between the page and the server can. ``down()`` cuts every
relayed connection (no close frame: a connection lost, 1006, to both ends)
and turns new ones away until ``up()``; the server stays up the whole time,
with its history. ``down(half_open=True)`` cuts the browser's side only,
as a network that drops without a word to the server: the server finds out
by its keepalive. ``requests`` are the request lines that came through,
to see what the page asked for.
"""

from __future__ import annotations

import socket
import threading

CHUNK_BYTES = 64 * 1024  # one recv
ACCEPT_BACKLOG = 16


class Relay:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=ACCEPT_BACKLOG)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()  # guards _open, _held, _up and requests
        self._open: set[tuple[socket.socket, socket.socket]] = set()  # (browser's side, server's side)
        self._held: set[socket.socket] = set()  # servers' sides left open by down(half_open=True)
        self.requests: list[str] = []
        self._up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                up = self._up
            if not up:
                _cut(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                _cut(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._open.add((client, server))
            for a, b, first in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(a, b, first), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, request: bool) -> None:
        try:
            while data := source.recv(CHUNK_BYTES):
                if request:  # the request line: a browser sends its whole request at once
                    with self._lock:
                        self.requests.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                    request = False
                sink.sendall(data)
            with self._lock:
                held = sink in self._held
            if not held:  # pass the end on, unless the server is not to hear of it
                sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # cut, or the other side went away

    def down(self, half_open: bool = False) -> None:
        """Cut every relayed connection (only the browser's side if ``half_open``), and refuse new ones."""
        with self._lock:
            self._up = False
            cut, self._open = self._open, set()
            if half_open:
                self._held.update(server for _, server in cut)
        for client, server in cut:
            _cut(client)
            if not half_open:
                _cut(server)

    def up(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self.down()
        with self._lock:
            held, self._held = self._held, set()
        for server in held:
            _cut(server)
        self._listener.close()


def _cut(sock: socket.socket) -> None:
    """Shut down (which wakes a pump blocked in recv, as close would not) and close."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
    sock.close()
