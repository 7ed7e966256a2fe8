"""Byte transport under one connection: a plain TCP socket.

The reader thread blocks in ``recv`` while writer threads push bytes with
non-blocking sends, so a client that stops reading can never pin a thread.
``encode`` is the hook where TLS (a separate transport) encrypts outgoing
bytes in stream order; for plain TCP it is the identity.
"""

from __future__ import annotations

import socket

# Big enough to take a whole burst of small frames in one syscall, small
# enough that 10,000 idle readers do not each pin a large buffer.
RECV_BYTES = 64 * 1024


class PlainTransport:
    __slots__ = ("sock", "peer")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer

    def fileno(self) -> int:
        return self.sock.fileno()

    def handshake(self) -> bool:
        """Transport-level handshake before HTTP; nothing to do in plain TCP."""
        return True

    def recv(self) -> bytes:
        """Block for incoming bytes; ``b""`` means the peer is gone."""
        try:
            return self.sock.recv(RECV_BYTES)
        except (ConnectionError, TimeoutError, OSError):
            return b""

    def encode(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        """Bytes that must precede our half-close (TLS close_notify)."""
        return b""

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Send what the kernel takes now; raise BlockingIOError if nothing."""
        return self.sock.send(data, socket.MSG_DONTWAIT)

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def abort(self) -> None:
        """Wake the blocked reader and stop all traffic, from any thread."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
