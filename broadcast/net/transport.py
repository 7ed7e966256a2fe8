"""Byte transport under one connection: a plain TCP socket.

The reader thread blocks in ``recv`` while writer threads push bytes with
non-blocking sends, so a client that stops reading can never pin a thread.
``encode`` is the hook where TLS (a separate transport) encrypts outgoing
bytes in stream order; for plain TCP it is the identity.
"""

from __future__ import annotations

import socket
from typing import Protocol

from . import quick

# What a reader asks for after a short read. It waits for the next bytes
# with a 1-byte peek first: blocked in recv() it would hold a buffer of the
# size it asked for, and 10,000 idle clients must not pin 2 KiB each.
RECV_IDLE_BYTES = 2048
# A new connection's first read asks for this at once, without the peek:
# its request is on its way, usually there already, so the peek would only
# cost one more system call (and GIL hand-off) per connect; and the buffer
# is held while waiting only by connections still in their handshake,
# which the handshake caps bound.
RECV_FIRST_BYTES = 4096
# A reader whose reads come back full asks for four times more, up to this,
# so a big message or a fast publisher still costs few syscalls; and no
# more, because one read is parsed at once, and a read full of tiny frames
# (pings, 1-byte fragments) becomes ~150 bytes of objects per 6 bytes read:
# at 256 KiB, 1-byte fragments held 8 MiB for 0.25 MiB of payload.
RECV_MAX_BYTES = 16 * 1024


class Transport(Protocol):
    """What a connection and its outbox need of the bytes underneath; PlainTransport and TLSTransport are it.

    The reader thread calls handshake and recv; the one
    writer that holds the outbox calls encode, finish, send_nowait and
    shutdown_write, and the reader calls encode and send_first for the
    first bytes out, before any writer holds the outbox; any thread may abort.
    The acceptor may call recv_ready, encode and send_first before the
    reader thread exists (Connection.open_now).
    """

    peer: str

    def fileno(self) -> int: ...
    def handshake(self) -> bool: ...
    def recv(self) -> bytes: ...
    def recv_ready(self) -> bytes | None: ...
    def encode(self, data: bytes) -> bytes: ...
    def finish(self) -> bytes: ...
    def send_nowait(self, data: bytes | memoryview) -> int: ...
    def send_first(self, data: bytes) -> int: ...
    def shutdown_write(self) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


class PlainTransport:
    __slots__ = ("sock", "peer", "_want")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self._want = RECV_FIRST_BYTES

    def fileno(self) -> int:
        return self.sock.fileno()

    def handshake(self) -> bool:
        """Transport-level handshake before HTTP; nothing to do in plain TCP."""
        return True

    def recv(self) -> bytes:
        """Block for incoming bytes; ``b""`` means the peer is gone."""
        want = self._want
        # Only the first read asks for RECV_FIRST_BYTES (later ones, for
        # RECV_IDLE_BYTES times a power of 4): the request, if it is here.
        data = self._ready(want) if want == RECV_FIRST_BYTES else None
        if data is not None:
            return data
        try:
            if want == RECV_IDLE_BYTES and not self.sock.recv(1, socket.MSG_PEEK):
                return b""
            data = self.sock.recv(want)
        except OSError:  # reset, timeout, or aborted by another thread
            return b""
        self._read(want, len(data))
        return data

    def recv_ready(self) -> bytes | None:
        """What has come in already, without waiting: None if nothing yet (or off Linux), ``b""`` if gone."""
        return self._ready(self._want)

    def _ready(self, want: int) -> bytes | None:
        """Up to ``want`` bytes the socket holds now, keeping the GIL (net/quick.py); as ``recv_ready``."""
        if not quick.AVAILABLE:
            return None
        try:
            data = quick.recv_now(self.sock.fileno(), want)
        except OSError:
            return b""
        if data:
            self._read(want, len(data))
        return data

    def _read(self, want: int, got: int) -> None:
        """Size the next read by how full this one came back."""
        if got < want:
            self._want = RECV_IDLE_BYTES
        elif want < RECV_MAX_BYTES:
            self._want = min(want * 4, RECV_MAX_BYTES)

    def encode(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        """Bytes that must precede our half-close (TLS close_notify)."""
        return b""

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Send what the kernel takes now; raise BlockingIOError if nothing."""
        return self.sock.send(data, socket.MSG_DONTWAIT)

    def send_first(self, data: bytes) -> int:
        """Send a few hundred bytes into the empty socket buffer of a new connection, keeping the GIL."""
        if quick.AVAILABLE:
            return quick.send_now(self.sock.fileno(), data)
        return self.send_nowait(data)

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
