"""The few bytes of RFC 6455 the load generator needs, and our payload layout.

Kept minimal on purpose: the load generator must be cheaper per message than
the servers it measures. Server frames are unmasked and, from both servers,
never fragmented, so a receiver only finds frame boundaries and reads our own
payload fields. Client frames must be masked; we use the all-zero mask key,
which RFC 6455 permits (the key only defeats cache poisoning through proxies,
irrelevant on loopback) and which makes masking a no-op, so publishers send
precomputed bytes. The servers still run their unmasking code.
"""

from __future__ import annotations

import base64
import hashlib

WS_PATH = "/ws"
# A fixed key is fine: it proves nothing on loopback, and fixing it lets us
# check the server's answer with one comparison.
HANDSHAKE_KEY = base64.b64encode(b"broadcast-bench!").decode()
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HANDSHAKE_ACCEPT = base64.b64encode(
    hashlib.sha1((HANDSHAKE_KEY + _GUID).encode()).digest()
).decode().encode()
# The server's handshake response must fit in this; real ones are ~130 bytes.
MAX_RESPONSE_BYTES = 16 * 1024

OP_TEXT, OP_BINARY, OP_CLOSE = 1, 2, 8
ZERO_MASK = b"\0\0\0\0"

# Payload: "PPPP SSSSSSSSSSSS TTTTTTTTTTTTTTTTTTTT " then padding, all ASCII so
# it is valid text: publisher id, sequence number, CLOCK_MONOTONIC send time
# in ns (0 when the scenario does not measure latency).
_PUB, _SEQ, _TS = slice(0, 4), slice(5, 17), slice(18, 38)
PAYLOAD_MIN_BYTES = 39
MAX_PUBLISHERS = 9999


def handshake_request(host: str, port: int, path: str = WS_PATH) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {HANDSHAKE_KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def handshake_ok(head: bytes) -> bool:
    """True for a 101 response carrying the accept value our key calls for."""
    return head.startswith(b"HTTP/1.1 101 ") and HANDSHAKE_ACCEPT in head


def payload(pub: int, seq: int, send_ns: int, size: int) -> bytes:
    head = b"%04d %012d %020d " % (pub, seq, send_ns)
    return head + b"x" * (size - len(head))


def _header(opcode: int, length: int, mask_bit: int) -> bytes:
    if length < 126:
        return bytes((0x80 | opcode, mask_bit | length))
    if length < 65536:
        return bytes((0x80 | opcode, mask_bit | 126)) + length.to_bytes(2, "big")
    return bytes((0x80 | opcode, mask_bit | 127)) + length.to_bytes(8, "big")


def client_frame(data: bytes) -> bytes:
    """A masked text frame (zero key, so ``data`` goes out unchanged)."""
    return _header(OP_TEXT, len(data), 0x80) + ZERO_MASK + data


def server_frame(data: bytes) -> bytes:
    """The exact bytes a server sends for text ``data``: the receivers' fast path compares against these."""
    return _header(OP_TEXT, len(data), 0) + data


def fields(buf: bytes, start: int) -> tuple[int, int, int]:
    """(publisher, seq, send_ns) from a payload starting at ``buf[start]``."""
    return (
        int(buf[start + _PUB.start:start + _PUB.stop]),
        int(buf[start + _SEQ.start:start + _SEQ.stop]),
        int(buf[start + _TS.start:start + _TS.stop]),
    )


def split_frames(buf: bytes):
    """Complete frames in ``buf`` as (opcode, payload start, payload end), and the bytes consumed.

    One pass over the buffer with integer indexing only; no frame objects.
    """
    frames = []
    i, n = 0, len(buf)
    while n - i >= 2:
        length = buf[i + 1] & 0x7F
        if length < 126:
            start = i + 2
        elif length == 126:
            if n - i < 4:
                break
            length = (buf[i + 2] << 8) | buf[i + 3]
            start = i + 4
        else:
            if n - i < 10:
                break
            length = int.from_bytes(buf[i + 2:i + 10], "big")
            start = i + 10
        end = start + length
        if end > n:
            break
        frames.append((buf[i] & 0x0F, start, end))
        i = end
    return frames, i
