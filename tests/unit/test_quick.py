"""net/quick.py's GIL-keeping calls on a real socket pair: data, nothing yet, end of stream, a gone peer."""

from __future__ import annotations

import socket

import pytest

from broadcast.net import quick

pytestmark = pytest.mark.skipif(not quick.AVAILABLE, reason="glibc's recv/send through ctypes: Linux only")


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_recv_now_returns_what_is_there_and_none_when_nothing_is(pair):
    a, b = pair
    assert quick.recv_now(a.fileno(), 4096) is None  # blocking socket, yet no wait
    b.sendall(b"GET /ws HTTP/1.1\r\n")
    assert quick.recv_now(a.fileno(), 4096) == b"GET /ws HTTP/1.1\r\n"
    b.sendall(b"0123456789")
    assert quick.recv_now(a.fileno(), 4) == b"0123"
    assert a.recv(100) == b"456789"


def test_recv_now_sees_the_end_of_the_stream(pair):
    a, b = pair
    b.shutdown(socket.SHUT_WR)
    assert quick.recv_now(a.fileno(), 4096) == b""


def test_send_now_sends_and_says_how_much_the_socket_took(pair):
    a, b = pair
    assert quick.send_now(a.fileno(), b"HTTP/1.1 101\r\n\r\n") == 16
    assert b.recv(100) == b"HTTP/1.1 101\r\n\r\n"
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunk = b"x" * 65536
    taken = [quick.send_now(a.fileno(), chunk) for _ in range(64)]  # bounded: the buffer fills long before
    assert taken[-1] == 0 and sum(taken) < 64 * len(chunk)


def test_send_now_to_a_gone_peer_raises(pair):
    a, b = pair
    b.close()
    with pytest.raises(OSError):
        quick.send_now(a.fileno(), b"late")
