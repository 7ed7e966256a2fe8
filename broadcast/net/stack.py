"""Give back the stack pages a reader's opening handshake touched and an idle reader never uses.

A thread's stack keeps every page it ever touched. The handshake
(websockets' parser generators, the response, the first log line) runs
one page (4 KiB) deeper than a reader blocked in recv() ever goes again:
measured, 2 pages at a reader's start, 3 after its handshake, 2 again
after this, at 10,000 idle clients 40 MB. madvise(MADV_DONTNEED) on the
pages below the stack pointer returns them; touched again, they come back
zeroed, which is all the stack below its pointer may hold.

The stack pointer comes from getcontext(), whose ucontext layout is
known for Linux on x86-64 with glibc; elsewhere ``give_back_stack`` does
nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import struct
import sys

# Kept below the stack pointer that getcontext() saw: the calls that do the
# trimming (ctypes, madvise) run there, well within 200 bytes; 128 of it
# are the x86-64 ABI's red zone.
KEEP_BELOW_SP_BYTES = 1024
# Room for glibc's ucontext_t (968 bytes on x86-64) and pthread_attr_t (56).
UCONTEXT_BUFFER_BYTES = 2048
PTHREAD_ATTR_BUFFER_BYTES = 128
# Where getcontext() puts RSP in an x86-64 ucontext_t: after uc_flags,
# uc_link and uc_stack (40 bytes), gregs[REG_RSP], REG_RSP being 15.
RSP_OFFSET_BYTES = 40 + 15 * 8
_PAGE_BYTES = mmap.PAGESIZE


def _libc():
    """glibc on x86-64 Linux, typed for the four calls below; None elsewhere."""
    if not (sys.platform == "linux" and platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc"):
        return None
    # PyDLL keeps the GIL across each call: they return in microseconds, and
    # with a burst of clients handshaking, every release is a hand-off to
    # another thread and a wait to get it back.
    libc = ctypes.PyDLL(None, use_errno=True)
    libc.pthread_self.restype = ctypes.c_ulong
    libc.pthread_getattr_np.argtypes = (ctypes.c_ulong, ctypes.c_void_p)
    libc.pthread_attr_getstack.argtypes = (
        ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t))
    libc.pthread_attr_destroy.argtypes = (ctypes.c_void_p,)
    libc.getcontext.argtypes = (ctypes.c_void_p,)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


_LIBC = _libc()


def give_back_stack() -> None:
    """Return the calling thread's stack pages below its current depth to the OS."""
    libc = _LIBC
    if libc is None:
        return
    attr = ctypes.create_string_buffer(PTHREAD_ATTR_BUFFER_BYTES)
    if libc.pthread_getattr_np(libc.pthread_self(), attr):
        return
    low, size = ctypes.c_void_p(), ctypes.c_size_t()
    failed = libc.pthread_attr_getstack(attr, ctypes.byref(low), ctypes.byref(size))
    libc.pthread_attr_destroy(attr)
    context = ctypes.create_string_buffer(UCONTEXT_BUFFER_BYTES)
    if failed or libc.getcontext(context):
        return
    sp = struct.unpack_from("Q", context, RSP_OFFSET_BYTES)[0]
    end = (sp - KEEP_BELOW_SP_BYTES) & ~(_PAGE_BYTES - 1)
    if low.value < end <= low.value + size.value:
        libc.madvise(low.value, end - low.value, mmap.MADV_DONTNEED)
