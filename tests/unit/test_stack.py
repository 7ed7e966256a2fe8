"""A reader gives back the stack pages its handshake touched (broadcast.net.stack)."""

from __future__ import annotations

import ctypes
import mmap
import threading

import pytest

from broadcast.net import stack

THREAD_TIMEOUT_S = 10.0
# Levels of Python calls made through C (sorted's key), each a C frame of
# several hundred bytes: deep enough to touch many pages, as a handshake does.
DEPTH = 200

pytestmark = pytest.mark.skipif(stack._LIBC is None, reason="glibc on x86-64 Linux only")


def _resident_stack_pages() -> int:
    """Pages of the calling thread's stack that are in memory (mincore)."""
    libc = ctypes.CDLL(None)
    libc.pthread_self.restype = ctypes.c_ulong
    attr = ctypes.create_string_buffer(stack.PTHREAD_ATTR_BUFFER_BYTES)
    assert libc.pthread_getattr_np(ctypes.c_ulong(libc.pthread_self()), attr) == 0
    low, size = ctypes.c_void_p(), ctypes.c_size_t()
    assert libc.pthread_attr_getstack(attr, ctypes.byref(low), ctypes.byref(size)) == 0
    libc.pthread_attr_destroy(attr)
    pages = size.value // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(low.value), ctypes.c_size_t(size.value), vec) == 0
    return sum(v & 1 for v in vec)


def _deep(n: int) -> int:
    return n if n == 0 else sorted([n], key=lambda _: _deep(n - 1))[0]


def test_the_pages_below_the_stack_pointer_go_back_and_the_thread_runs_on():
    seen = {}

    def reader() -> None:
        seen["start"] = _resident_stack_pages()
        _deep(DEPTH)
        seen["deep"] = _resident_stack_pages()
        stack.give_back_stack()
        seen["after"] = _resident_stack_pages()
        seen["again"] = _deep(DEPTH)  # the pages come back, zeroed, when needed

    thread = threading.Thread(target=reader)
    thread.start()
    thread.join(THREAD_TIMEOUT_S)
    assert not thread.is_alive()
    assert seen["deep"] > seen["start"] + 4
    assert seen["after"] <= seen["start"] + 1
    assert seen["again"] == DEPTH
