"""TLS for wss://, as a transport that encrypts in memory.

A blocking ``SSLSocket.sendall`` ignores socket timeouts, and an SSL object
must not be read and written by two threads at once. So the socket stays a
plain, raw one (sent to without blocking by the writers, exactly as for
ws://) and OpenSSL works on memory buffers (``ssl.MemoryBIO``) under a lock:
the reader decrypts what it received, the one active writer encrypts what it
is about to send. A slow TLS client is then evicted exactly like a plain one.
"""

from __future__ import annotations

import ssl
import threading

from .transport import RECV_IDLE_BYTES, PlainTransport

# SSL_read returns at most one TLS record of plaintext: 16 KiB (RFC 8446 5.1).
TLS_RECORD_BYTES = 16 * 1024


def server_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    """Raises OSError or ssl.SSLError when the certificate cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if keyfile is None:
        with open(certfile, "rb") as f:
            if b"PRIVATE KEY-----" not in f.read():
                # OpenSSL's own word for this is "[SSL] PEM lib".
                raise ssl.SSLError(f"no private key in {certfile}; pass --keyfile")
    context.load_cert_chain(certfile, keyfile)
    return context


class TLSTransport(PlainTransport):
    __slots__ = ("_tls", "_incoming", "_outgoing", "_lock")

    def __init__(self, sock, peer: str, context: ssl.SSLContext) -> None:
        super().__init__(sock, peer)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._lock = threading.Lock()

    def handshake(self) -> bool:
        """Complete the TLS handshake in the reader thread; the ticker's abort ends one that takes too long."""
        while True:
            with self._lock:
                try:
                    self._tls.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLError:
                    return False
                out = self._outgoing.read()
            try:
                if out:
                    self.sock.sendall(out)  # an abort wakes it
                if done:
                    return True
                data = self.sock.recv(RECV_IDLE_BYTES)
            except OSError:
                return False
            if not data:
                return False
            with self._lock:
                self._incoming.write(data)

    def recv_ready(self) -> None:
        """Nothing, ever: the TLS handshake comes first, on the reader's thread."""

    def recv(self) -> bytes:
        while True:
            with self._lock:
                try:
                    return self._tls.read(TLS_RECORD_BYTES)  # b"" after close_notify
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return b""
            data = super().recv()
            if not data:
                return b""
            with self._lock:
                self._incoming.write(data)

    def encode(self, data: bytes) -> bytes:
        with self._lock:
            try:
                self._tls.write(data)
            except ssl.SSLError:
                self.abort()  # the session is broken; the reader will notice
            return self._outgoing.read()

    def finish(self) -> bytes:
        with self._lock:
            try:
                self._tls.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: the peer's close_notify is not here yet
            return self._outgoing.read()
