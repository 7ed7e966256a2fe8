"""Raw RFC 6455 over a plain socket, for tests that must misbehave on purpose.

Well-behaved clients (websockets, websocket-client) refuse to send a frame
with RSV bits, a reserved opcode, an unmasked payload or a header announcing
2**63 bytes. This module builds such frames byte by byte, does the opening
handshake by hand (so that it can be broken too), and parses what the server
sends back, close code included. The same client misbehaves by omission
too, as the libraries will not: a tiny receive buffer it never reads, pings
and closes it never answers, a TCP reset instead of a goodbye.

It also holds the few probes the hardening tests share: ``assert_chat_works``
(through a ``support.wsclients.Watcher``) and readers of ``/proc/<pid>`` for a
server's thread count, file descriptors and RSS.

Every blocking call takes a timeout; nothing here waits forever.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from support.wsclients import Watcher

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
DATA_OPCODES = (OP_CONT, OP_TEXT, OP_BINARY)
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
KNOWN_OPCODES = DATA_OPCODES + CONTROL_OPCODES
RESERVED_OPCODES = (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF)

# Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry as
# websockets applies it), and the 3000-4999 range left to applications.
SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})

DEFAULT_TIMEOUT = 5.0


class Timeout(AssertionError):
    """Nothing (or not enough) arrived within the timeout."""


class PeerClosed(AssertionError):
    """The server ended the TCP stream (EOF or reset) where a frame was expected."""


# Frames.


def build_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    mask_key: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """One frame's bytes, exactly as told: any opcode (0-15), RSV bits (0-7), length.

    ``length`` overrides the announced payload length (up to 2**64 - 1), so a
    header can claim far more than ``payload``; the 64-bit form is used when
    it needs it, or always when ``length >= 2**16``.
    """
    if not 0 <= opcode <= 0xF or not 0 <= rsv <= 7:
        raise ValueError("opcode is 4 bits, rsv 3 bits")
    announced = len(payload) if length is None else length
    head1 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask else 0
    if announced < 126:
        header = struct.pack("!BB", head1, mask_bit | announced)
    elif announced < 1 << 16:
        header = struct.pack("!BBH", head1, mask_bit | 126, announced)
    else:
        header = struct.pack("!BBQ", head1, mask_bit | 127, announced)
    if not mask:
        return header + payload
    key = os.urandom(4) if mask_key is None else mask_key
    return header + key + apply_mask(payload, key)


def apply_mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    # XOR as one big integer: fast enough for a MiB without numpy.
    n = len(data)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def close_payload(code: int | None = 1000, reason: bytes | str = b"") -> bytes:
    if code is None:
        return b""
    if isinstance(reason, str):
        reason = reason.encode()
    return struct.pack("!H", code) + reason


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    masked: bool = False

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")

    @property
    def close_code(self) -> int | None:
        """The code of a close frame; None when its payload is empty (1005)."""
        assert self.opcode == OP_CLOSE, self
        if len(self.payload) < 2:
            return None
        return struct.unpack("!H", self.payload[:2])[0]

    @property
    def close_reason(self) -> str:
        assert self.opcode == OP_CLOSE, self
        return self.payload[2:].decode("utf-8", "replace")

    def __repr__(self) -> str:
        data = self.payload if len(self.payload) <= 40 else self.payload[:40] + b"..."
        return f"Frame(op={self.opcode:#x}, fin={self.fin}, rsv={self.rsv}, len={len(self.payload)}, {data!r})"


class FrameParser:
    """Incremental parser of server-to-client frames; raises on anything a server must not send."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buf)

    def _next(self) -> Frame | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        head1, head2 = buf[0], buf[1]
        length = head2 & 0x7F
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = struct.unpack_from("!H", buf, 2)[0]
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = struct.unpack_from("!Q", buf, 2)[0]
            pos = 10
        masked = bool(head2 & 0x80)
        if masked:
            pos += 4
        if len(buf) < pos + length:
            return None
        payload = bytes(buf[pos:pos + length])
        if masked:
            payload = apply_mask(payload, bytes(buf[pos - 4:pos]))
        del buf[:pos + length]
        frame = Frame(bool(head1 & 0x80), (head1 >> 4) & 7, head1 & 0xF, payload, masked)
        if masked or frame.rsv or frame.opcode not in KNOWN_OPCODES:
            raise AssertionError(f"server sent an invalid frame: {frame!r}, masked={masked}")
        if frame.opcode in CONTROL_OPCODES and (not frame.fin or length > 125):
            raise AssertionError(f"server sent an invalid control frame: {frame!r}")
        return frame


# Opening handshake.


def make_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def handshake_request(
    port: int,
    path: str = "/ws",
    *,
    key: str | None = None,
    method: str = "GET",
    version: str | None = "13",
    extra_headers: list[tuple[str, str]] | tuple = (),
    omit: tuple[str, ...] = (),
) -> bytes:
    """An opening handshake request; ``omit`` drops headers by (case-insensitive) name."""
    headers = [
        ("Host", f"127.0.0.1:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key or make_key()),
        ("Sec-WebSocket-Version", version),
    ]
    dropped = {name.lower() for name in omit}
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers if v is not None and k.lower() not in dropped]
    lines += [f"{k}: {v}" for k, v in extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class HTTPResponse:
    status: int
    reason: str
    headers: dict[str, str]  # lower-cased names
    body: bytes = b""
    rest: bytes = b""  # bytes after the head of a 101 response: the first frames


def open_socket(port: int, timeout: float = DEFAULT_TIMEOUT, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            # Before connect(), so that the window the server sees is small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_some(sock: socket.socket, deadline: float) -> bytes:
    """One recv bounded by ``deadline``; b"" on EOF or reset, Timeout when the deadline passes."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Timeout("deadline passed")
    sock.settimeout(remaining)
    try:
        return sock.recv(65536)
    except socket.timeout:
        raise Timeout("nothing received in time") from None
    except (ConnectionResetError, BrokenPipeError):
        return b""


def read_http_response(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> HTTPResponse | None:
    """The server's response to a handshake; None if it hung up without one."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = recv_some(sock, deadline)
        if not chunk:
            if data:
                raise AssertionError(f"truncated HTTP response: {data[:200]!r}")
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, *reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    response = HTTPResponse(int(status), reason[0] if reason else "", headers)
    if response.status == 101:
        response.rest = rest
        return response
    # A refusal: the body is Content-Length bytes (the server closes after it).
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = recv_some(sock, deadline)
        if not chunk:
            break
        rest += chunk
    response.body = rest
    return response


# Connections.


class RawWS:
    """One client connection that sends whatever it is told to.

    It never reads, and never answers a ping or a close, unless asked to.
    """

    def __init__(self, sock: socket.socket, leftover: bytes = b"") -> None:
        self.sock = sock
        self.port = sock.getsockname()[1]  # local: how the server's log names us, even once closed
        self.parser = FrameParser()
        self.backlog: list[Frame] = self.parser.feed(leftover) if leftover else []
        self.eof = False
        self.send_lock = threading.Lock()

    @classmethod
    def connect(cls, port: int, *, username: str | None = None, path: str = "/ws",
                timeout: float = DEFAULT_TIMEOUT, rcvbuf: int | None = None) -> RawWS:
        """Open a WebSocket by hand; asserts a correct 101 response."""
        if username is not None:
            path = f"{path}?username={username}"
        sock = open_socket(port, timeout, rcvbuf=rcvbuf)
        try:
            key = make_key()
            sock.sendall(handshake_request(port, path, key=key))
            response = read_http_response(sock, timeout)
            assert response is not None, "server hung up during the handshake"
            assert response.status == 101, (response.status, response.reason, response.body)
            assert response.headers.get("sec-websocket-accept") == accept_for(key), response.headers
            assert response.headers.get("upgrade", "").lower() == "websocket", response.headers
        except BaseException:
            sock.close()
            raise
        return cls(sock, response.rest)

    # Sending.

    def send_raw(self, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        with self.send_lock:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", timeout: float = DEFAULT_TIMEOUT, **kw) -> None:
        self.send_raw(build_frame(opcode, payload, **kw), timeout)

    def send_text(self, text: str | bytes, **kw) -> None:
        self.send_frame(OP_TEXT, text.encode() if isinstance(text, str) else text, **kw)

    def send_binary(self, data: bytes, **kw) -> None:
        self.send_frame(OP_BINARY, data, **kw)

    def ping(self, payload: bytes = b"", **kw) -> None:
        self.send_frame(OP_PING, payload, **kw)

    def send_close(self, code: int | None = 1000, reason: bytes | str = b"", **kw) -> None:
        self.send_frame(OP_CLOSE, close_payload(code, reason), **kw)

    # Receiving.

    def recv_frame(self, timeout: float = DEFAULT_TIMEOUT, *, reply: bool = False) -> Frame:
        """The next frame; Timeout, or PeerClosed when the server ended the stream first.

        With ``reply`` a ping is answered with its pong and a close with its echo,
        as a well-behaved client would.
        """
        deadline = time.monotonic() + timeout
        while not self.backlog:
            if self.eof:
                raise PeerClosed(f"server closed the connection (pending {self.parser.pending} bytes)")
            data = recv_some(self.sock, deadline)
            if not data:
                self.eof = True
                continue
            self.backlog.extend(self.parser.feed(data))
        frame = self.backlog.pop(0)
        if reply and frame.opcode in (OP_PING, OP_CLOSE):
            self.send_frame(OP_PONG if frame.opcode == OP_PING else OP_CLOSE, frame.payload)
        return frame

    def recv_until(self, predicate, timeout: float = DEFAULT_TIMEOUT) -> tuple[Frame, list[Frame]]:
        """The first frame matching ``predicate``, and the frames before it."""
        deadline = time.monotonic() + timeout
        skipped = []
        while True:
            frame = self.recv_frame(max(0.0, deadline - time.monotonic()) or 0.001)
            if predicate(frame):
                return frame, skipped
            skipped.append(frame)

    def expect_close(self, timeout: float = DEFAULT_TIMEOUT, *, then_eof: bool = True) -> Frame:
        """Skip data and pongs up to the server's close frame; then (optionally) its EOF."""
        deadline = time.monotonic() + timeout
        frame, _ = self.recv_until(lambda f: f.opcode == OP_CLOSE, timeout)
        if then_eof:
            self.wait_eof(max(0.001, deadline - time.monotonic()))
        return frame

    def wait_eof(self, timeout: float = DEFAULT_TIMEOUT) -> list[Frame]:
        """Read until the server ends the stream; returns the frames read meanwhile."""
        deadline = time.monotonic() + timeout
        frames = self.backlog
        self.backlog = []
        while not self.eof:
            data = recv_some(self.sock, deadline)
            if not data:
                self.eof = True
            else:
                frames.extend(self.parser.feed(data))
        return frames

    def drain_until_eof(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str]:
        """Read and discard raw bytes until the server ends the stream: (bytes read, "eof" or "reset").

        Its own recv loop, not ``recv_some``, which folds a reset into an EOF:
        how a server lets go of a client it gave up on is worth reporting.
        """
        deadline = time.monotonic() + timeout
        total = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"connection still open after {timeout}s ({total} bytes read)")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except ConnectionResetError:
                self.eof = True
                return total, "reset"
            if not data:
                self.eof = True
                return total, "eof"
            total += len(data)

    def vanish(self) -> None:
        """Disappear without a close frame or FIN: SO_LINGER 0 makes close() send RST."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawWS:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_eof_or_reset(sock: socket.socket, timeout: float) -> bool:
    """True once the peer has closed the connection (EOF or RST) within ``timeout``; drains data."""
    deadline = time.monotonic() + timeout
    try:
        while recv_some(sock, deadline):
            pass
        return True
    except Timeout:
        return False


# A probe of the chat through a well-behaved client, and process probes.


_probe_counter = iter(range(10 ** 9))
_probe_lock = threading.Lock()


def assert_chat_works(url: str, watcher: Watcher, timeout: float = DEFAULT_TIMEOUT, server=None) -> str:
    """A fresh well-behaved client says something unique; ``watcher`` must hear it.

    ``server`` (a support.process.ServerProcess) adds the tail of its log to a failure.
    """
    with _probe_lock:
        n = next(_probe_counter)
    text = f"probe {os.getpid()}-{n}-{time.monotonic_ns()}"
    try:
        assert watcher.connected, f"watcher was disconnected: {watcher.closed!r}"
        with connect(url, open_timeout=timeout, close_timeout=2) as ws:
            ws.send(text)
            watcher.wait_message(text, timeout)
        assert watcher.connected, f"watcher was disconnected: {watcher.closed!r}"
    except (AssertionError, OSError, ConnectionClosed) as exc:
        if server is None:
            raise
        tail = "\n".join(server.lines[-30:])
        raise AssertionError(f"{exc!r}\nserver alive: {server.proc.poll() is None}; log tail:\n{tail}") from exc
    return text


def unread_by_server(server_port: int, client_port: int) -> int | None:
    """Bytes from our loopback socket ``client_port`` that the server has not read yet (/proc/net/tcp).

    Before the server accepts the connection, what the client sent waits
    in the kernel; once the server reads it, this drops to 0. None if no
    such socket.
    """
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return int(fields[4].split(":")[1], 16)  # tx_queue:rx_queue
    return None


@dataclass
class ProcStats:
    threads: int
    fds: int
    rss_kb: int

    def __str__(self) -> str:
        return f"threads={self.threads} fds={self.fds} rss={self.rss_kb / 1024:.1f}MiB"


def proc_stats(pid: int) -> ProcStats:
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            status[name] = value.strip()
    return ProcStats(
        threads=int(status["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        rss_kb=int(status["VmRSS"].split()[0]),
    )


def settled_stats(pid: int, timeout: float = DEFAULT_TIMEOUT) -> ProcStats:
    """The figures once they stop moving (earlier connections fully gone), for a baseline."""
    previous = proc_stats(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = proc_stats(pid)
        if (now.threads, now.fds) == (previous.threads, previous.fds):
            return now
        previous = now
    return previous


def wait_baseline(pid: int, baseline: ProcStats, timeout: float = 10.0, slack_fds: int = 0) -> ProcStats:
    """Poll /proc until threads and FDs are back to ``baseline``; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        now = proc_stats(pid)
        if now.threads <= baseline.threads and now.fds <= baseline.fds + slack_fds:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"server did not return to baseline within {timeout}s: "
                                 f"baseline {baseline}, now {now}")
        time.sleep(0.05)
