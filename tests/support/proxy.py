"""A TCP proxy on 127.0.0.1 that a test can cut and heal: one node cut off from Redis, the others not.

Stopping Redis (or SIGSTOP) takes every node away from it at once; a node
cut off alone needs its own path to Redis, which this is. ``cut()`` drops
every connection through it and refuses new ones (accepted, then closed at
once, as a firewall that resets would); ``heal()`` lets them through again.
"""

from __future__ import annotations

import contextlib
import socket
import threading

CHUNK_BYTES = 65536
ACCEPT_POLL_S = 0.1  # how often the acceptor looks whether the proxy is closing


class CutProxy:
    """Forwards 127.0.0.1:``port`` to ``target`` (host, port) until ``close()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(ACCEPT_POLL_S)
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()  # guards _open and _cut
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closing = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="cut-proxy", daemon=True)
        self._acceptor.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            dropped, self._open = self._open, set()
        for sock in dropped:
            _shut(sock)

    def heal(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closing.set()
        self.cut()
        self._acceptor.join(5)
        self._server.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            with self._lock:
                cut = self._cut
            if cut:
                _shut(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _shut(client)
                continue
            with self._lock:
                if self._cut:  # cut while connecting
                    _shut(client)
                    _shut(upstream)
                    continue
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(CHUNK_BYTES):
                dst.sendall(data)
        _shut(src)
        _shut(dst)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
