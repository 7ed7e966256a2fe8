"""RFC 6455 on the wire: frames no well-behaved client sends, sent by hand (tests/support/rawws.py).

One server serves the whole module (default options: 1 MiB max message);
every test has its own watcher, a well-behaved client that must stay
connected through whatever the raw connection does and still hear a message
sent afterwards.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from support.process import ServerProcess, module_server
from support.rawws import (
    OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RESERVED_OPCODES, RawWS, assert_chat_works,
    build_frame, close_payload, proc_stats,
)
from support.wsclients import Watcher

MIB = 1024 * 1024
WAIT = 5.0


wire_server = module_server("wire_server")


@pytest.fixture
def watcher(wire_server):
    with Watcher(wire_server.url) as w:
        yield w


@pytest.fixture
def raw(wire_server):
    with RawWS.connect(wire_server.port) as conn:
        yield conn


def tag(length: int = 0) -> str:
    """A unique ASCII text of exactly ``length`` characters (or just the unique part)."""
    unique = f"<{os.getpid()}-{time.monotonic_ns()}>"
    if length == 0:
        return unique
    assert length >= len(unique)
    return unique + "x" * (length - len(unique))


def expect_fail(raw: RawWS, code: int, timeout: float = WAIT) -> None:
    """The server closes with ``code`` and then ends the TCP stream."""
    close = raw.expect_close(timeout)
    assert close.close_code == code, f"expected close {code}, got {close.close_code} {close.close_reason!r}"


def still_chatting(server: ServerProcess, watcher: Watcher) -> None:
    assert server.proc.poll() is None, "server died"
    assert_chat_works(server.url, watcher, server=server)


def own_echo(raw: RawWS, payload: bytes, opcode: int = OP_TEXT) -> None:
    """The sender is a client too: it gets its own message back, whole."""
    frame, _ = raw.recv_until(lambda f: f.opcode in (opcode, OP_CLOSE) and (f.opcode == OP_CLOSE or f.payload == payload))
    assert frame.opcode == opcode, f"closed instead: {frame.close_code} {frame.close_reason!r}"
    assert frame.fin


# Messages that must go through.


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, MIB])
def test_text_sizes_delivered_intact(wire_server, watcher, raw, size):
    text = tag(size) if size >= 40 else ("" if size == 0 else tag()[:size])
    assert len(text) == size
    raw.send_text(text)
    got = watcher.wait_for(lambda msgs: text in msgs, WAIT, f"a {size}-byte text")
    assert got.count(text) == 1
    own_echo(raw, text.encode())
    still_chatting(wire_server, watcher)


def test_binary_message_delivered_intact(wire_server, watcher, raw):
    data = os.urandom(70000)
    raw.send_binary(data)
    watcher.wait_message(data)
    own_echo(raw, data, OP_BINARY)


def test_one_byte_over_max_size_is_1009(wire_server, watcher, raw):
    raw.send_text(tag(MIB + 1))
    expect_fail(raw, 1009)
    still_chatting(wire_server, watcher)


@pytest.mark.parametrize("parts", [2, 10])
def test_fragmented_message_reassembled(wire_server, watcher, raw, parts):
    # Multibyte characters, and cuts that fall inside them: only the whole
    # message must be valid UTF-8, not each fragment.
    text = tag() + " héllo wörld € 😀 " * 20
    data = text.encode()
    pieces = _split_inside_characters(data, parts)
    assert len(pieces) == parts and b"".join(pieces) == data
    assert all(_cuts_a_character(p) for p in pieces[:-1])
    for i, piece in enumerate(pieces):
        raw.send_frame(OP_TEXT if i == 0 else OP_CONT, piece, fin=i == parts - 1)
    got = watcher.wait_for(lambda msgs: text in msgs, WAIT, "the reassembled message")
    assert got.count(text) == 1
    assert not any(isinstance(m, str) and m != text and m and m in text for m in got), "a fragment leaked"
    own_echo(raw, data)
    still_chatting(wire_server, watcher)


def _split_inside_characters(data: bytes, parts: int) -> list[bytes]:
    """``parts`` pieces of ``data``, each cut (but the end) between two bytes of one character."""
    cuts = []
    for k in range(1, parts):
        cut = k * len(data) // parts
        while data[cut] & 0xC0 != 0x80:  # move onto a continuation byte
            cut += 1
        cuts.append(cut)
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _cuts_a_character(piece: bytes) -> bool:
    try:
        piece.decode()
        return False
    except UnicodeDecodeError:
        return True


def test_ping_between_fragments(wire_server, watcher, raw):
    text = tag() + " in three parts"
    data = text.encode()
    raw.send_frame(OP_TEXT, data[:5], fin=False)
    raw.ping(b"mid-message")
    pong, skipped = raw.recv_until(lambda f: f.opcode in (OP_PONG, OP_CLOSE))
    assert pong.opcode == OP_PONG and pong.payload == b"mid-message", pong
    raw.send_frame(OP_CONT, data[5:10], fin=False)
    raw.send_frame(OP_CONT, data[10:], fin=True)
    watcher.wait_message(text)
    own_echo(raw, data)
    still_chatting(wire_server, watcher)


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(125))], ids=["empty", "1", "125"])
def test_ping_answered_with_same_payload(wire_server, watcher, raw, payload):
    raw.ping(payload)
    pong, _ = raw.recv_until(lambda f: f.opcode in (OP_PONG, OP_CLOSE))
    assert pong.opcode == OP_PONG
    assert pong.payload == payload
    still_chatting(wire_server, watcher)


def test_unsolicited_pong_ignored(wire_server, watcher, raw):
    raw.send_frame(OP_PONG, b"nobody asked")
    raw.send_frame(OP_PONG, b"")
    text = tag()
    raw.send_text(text)
    own_echo(raw, text.encode())  # not closed: the connection is still usable
    watcher.wait_message(text)
    raw.ping(b"still there?")
    pong, _ = raw.recv_until(lambda f: f.opcode in (OP_PONG, OP_CLOSE))
    assert pong.opcode == OP_PONG and pong.payload == b"still there?"


# Protocol errors: 1002.


@pytest.mark.parametrize("rsv", range(1, 8))
def test_rsv_bits_are_1002(wire_server, watcher, raw, rsv):
    raw.send_frame(OP_TEXT, b"hello", rsv=rsv)
    expect_fail(raw, 1002)
    assert "hello" not in watcher.messages
    still_chatting(wire_server, watcher)


@pytest.mark.parametrize("opcode", RESERVED_OPCODES, ids=hex)
def test_reserved_opcode_is_1002(wire_server, watcher, raw, opcode):
    raw.send_frame(opcode, b"what is this")
    expect_fail(raw, 1002)
    still_chatting(wire_server, watcher)


def test_continuation_without_start_is_1002(wire_server, watcher, raw):
    raw.send_frame(OP_CONT, b"orphan", fin=True)
    expect_fail(raw, 1002)
    assert "orphan" not in watcher.messages
    still_chatting(wire_server, watcher)


def test_new_message_inside_fragmented_one_is_1002(wire_server, watcher, raw):
    raw.send_frame(OP_TEXT, b"first half", fin=False)
    raw.send_frame(OP_TEXT, b"interloper", fin=True)
    expect_fail(raw, 1002)
    still_chatting(wire_server, watcher)


def test_unmasked_client_frame_is_1002(wire_server, watcher, raw):
    raw.send_frame(OP_TEXT, b"naked", mask=False)
    expect_fail(raw, 1002)
    assert "naked" not in watcher.messages
    still_chatting(wire_server, watcher)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE], ids=["ping", "pong", "close"])
def test_control_frame_over_125_bytes_is_1002(wire_server, watcher, raw, opcode):
    payload = close_payload(1000, "r" * 124) if opcode == OP_CLOSE else b"p" * 126
    assert len(payload) == 126
    raw.send_frame(opcode, payload)
    expect_fail(raw, 1002)
    still_chatting(wire_server, watcher)


def test_fragmented_ping_is_1002(wire_server, watcher, raw):
    raw.send_frame(OP_PING, b"part", fin=False)
    expect_fail(raw, 1002)
    still_chatting(wire_server, watcher)


# Invalid UTF-8: 1007.


@pytest.mark.parametrize("bad", [
    b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82", b"\x80 stray continuation",
], ids=["ff", "overlong", "surrogate", "above-10ffff", "truncated", "stray"])
def test_invalid_utf8_in_one_frame_is_1007(wire_server, watcher, raw, bad):
    raw.send_frame(OP_TEXT, b"prefix " + bad)
    expect_fail(raw, 1007)
    still_chatting(wire_server, watcher)


def test_invalid_utf8_split_across_fragments_is_1007(wire_server, watcher, raw):
    # Each fragment alone could be a piece of valid text: "\xe2\x82" starts
    # a 3-byte character; the next fragment's "(" is no continuation byte.
    raw.send_frame(OP_TEXT, b"ok \xe2\x82", fin=False)
    raw.send_frame(OP_CONT, b"( rest", fin=True)
    expect_fail(raw, 1007)
    still_chatting(wire_server, watcher)


def test_message_ending_inside_a_character_is_1007(wire_server, watcher, raw):
    raw.send_frame(OP_TEXT, b"complete ", fin=False)
    raw.send_frame(OP_CONT, b"cut \xf0\x9f\x98", fin=True)
    expect_fail(raw, 1007)
    still_chatting(wire_server, watcher)


def test_invalid_first_fragment_fails_without_waiting_for_the_rest(wire_server, watcher, raw):
    raw.send_frame(OP_TEXT, b"\xff never valid", fin=False)
    expect_fail(raw, 1007)  # the last fragment never comes
    still_chatting(wire_server, watcher)


def test_invalid_utf8_then_close_in_one_packet_is_1007(wire_server, watcher, raw):
    """The invalid message fails the connection even when a close frame is right behind it.

    The bytes arrive in one recv; the connection must not answer the close as
    if nothing had happened (a clean 1000) and so hide the 1007.
    """
    raw.send_raw(build_frame(OP_TEXT, b"bad \xff") + build_frame(OP_CLOSE, close_payload(1000)))
    expect_fail(raw, 1007)
    still_chatting(wire_server, watcher)


def test_frames_after_invalid_utf8_are_not_answered(wire_server, watcher, raw):
    """RFC 6455 7.1.7: once failed, nothing more is processed: no pong for a later ping."""
    raw.send_raw(build_frame(OP_TEXT, b"bad \xff") + build_frame(OP_PING, b"after")
                 + build_frame(OP_TEXT, b"later valid"))
    frames = raw.wait_eof(WAIT)
    replies = [f for f in frames if f.opcode not in (OP_TEXT, OP_BINARY)]
    assert len(replies) == 1 and replies[0].opcode == OP_CLOSE and replies[0].close_code == 1007, \
        f"expected nothing but a 1007 close, got {replies}"
    assert "later valid" not in watcher.messages
    still_chatting(wire_server, watcher)


def test_binary_is_not_checked_for_utf8(wire_server, watcher, raw):
    raw.send_binary(b"\xff\xfe not text")
    own_echo(raw, b"\xff\xfe not text", OP_BINARY)
    watcher.wait_message(b"\xff\xfe not text")


# Closing handshake.


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4999])
def test_close_answered_with_same_code(wire_server, watcher, raw, code):
    raw.send_close(code, "bye")
    close = raw.expect_close(WAIT)
    assert close.close_code == code
    still_chatting(wire_server, watcher)


def test_empty_close_answered_with_empty_close(wire_server, watcher, raw):
    raw.send_frame(OP_CLOSE, b"")
    close = raw.expect_close(WAIT)
    assert close.payload == b""
    still_chatting(wire_server, watcher)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_invalid_close_code_is_1002(wire_server, watcher, raw, code):
    raw.send_frame(OP_CLOSE, struct.pack("!H", code))
    expect_fail(raw, 1002)
    still_chatting(wire_server, watcher)


def test_one_byte_close_payload_is_1002(wire_server, watcher, raw):
    raw.send_frame(OP_CLOSE, b"\x03")
    expect_fail(raw, 1002)
    still_chatting(wire_server, watcher)


def test_close_reason_invalid_utf8_is_1007(wire_server, watcher, raw):
    raw.send_frame(OP_CLOSE, close_payload(1000, b"\xff\xfe"))
    expect_fail(raw, 1007)
    still_chatting(wire_server, watcher)


def test_close_inside_fragmented_message_is_1002(wire_server, watcher, raw):
    raw.send_frame(OP_TEXT, b"never finished", fin=False)
    raw.send_close(1000)
    expect_fail(raw, 1002)
    assert "never finished" not in watcher.messages
    still_chatting(wire_server, watcher)


def test_message_then_close_in_one_packet(wire_server, watcher, raw):
    """Frames are answered in order: the sender's own message comes back before the close echo.

    A client may send its last message and its close frame together; the
    message is broadcast to everyone, sender included, and only then is the
    close answered (nothing may follow a close frame).
    """
    text = tag()
    raw.send_raw(build_frame(OP_TEXT, text.encode()) + build_frame(OP_CLOSE, close_payload(1000)))
    frames = raw.wait_eof(WAIT)
    watcher.wait_message(text)  # the others get it
    got = [(f.opcode, f.close_code if f.opcode == OP_CLOSE else f.payload) for f in frames]
    assert got == [(OP_TEXT, text.encode()), (OP_CLOSE, 1000)], got
    still_chatting(wire_server, watcher)


def test_pings_fragments_and_close_in_one_read_are_answered_in_arrival_order(wire_server, watcher, raw):
    """Issue 8, point 15: a reply keeps its place among the messages.

    A ping that arrives before a message's last fragment is answered before
    that message is relayed; one that arrives after it, after; and the close
    reply comes last, all from one read.
    """
    first, second = tag().encode(), tag().encode()
    raw.send_raw(
        build_frame(OP_PING, b"before")
        + build_frame(OP_TEXT, first)
        + build_frame(OP_TEXT, second[:3], fin=False)
        + build_frame(OP_PING, b"inside")
        + build_frame(OP_CONT, second[3:6], fin=False)
        + build_frame(OP_CONT, second[6:], fin=True)
        + build_frame(OP_PING, b"after")
        + build_frame(OP_CLOSE, close_payload(1000)))
    frames = raw.wait_eof(WAIT)
    got = [(f.opcode, f.close_code if f.opcode == OP_CLOSE else f.payload) for f in frames]
    assert got == [(OP_PONG, b"before"), (OP_TEXT, first), (OP_PONG, b"inside"), (OP_TEXT, second),
                   (OP_PONG, b"after"), (OP_CLOSE, 1000)], got
    watcher.wait_message(second.decode())
    still_chatting(wire_server, watcher)


HALF_CLOSE_TRIES = 30


@pytest.mark.parametrize("case", ["close-echo", "protocol-error"])
def test_client_that_half_closes_still_gets_the_servers_answer(wire_server, watcher, case):
    """A client may send its last frames and shut down its side (SHUT_WR) at once.

    What the server owes it (its own message back, the close frame) must
    still go out before the server closes the socket. Racy by nature, so
    tried many times.
    """
    sent, want = {
        "close-echo": (build_frame(OP_CLOSE, close_payload(1000)), [(OP_CLOSE, 1000)]),
        "protocol-error": (build_frame(OP_TEXT, b"x", rsv=1), [(OP_CLOSE, 1002)]),
    }[case]
    lost = 0
    for _ in range(HALF_CLOSE_TRIES):
        with RawWS.connect(wire_server.port) as conn:
            conn.send_raw(sent)
            conn.sock.shutdown(socket.SHUT_WR)
            frames = conn.wait_eof(WAIT)
        got = [(f.opcode, f.close_code if f.opcode == OP_CLOSE else f.payload) for f in frames]
        if got != want:
            lost += 1
            last = got
    assert lost == 0, f"{lost}/{HALF_CLOSE_TRIES} half-closed clients did not get {want}; e.g. got {last}"
    still_chatting(wire_server, watcher)


# Too big: 1009, decided from headers, without buffering.


@pytest.mark.parametrize("length", [2 ** 63, 2 ** 63 - 1, 2 ** 64 - 1, MIB + 1], ids=["2^63", "2^63-1", "2^64-1", "1MiB+1"])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_huge_length_header_is_1009_at_once(wire_server, watcher, raw, length, opcode):
    # Only the header (and mask key): the payload never comes, so the
    # server can only answer if it judges the announced length.
    raw.send_raw(build_frame(opcode, b"", length=length))
    expect_fail(raw, 1009, timeout=2.0)
    still_chatting(wire_server, watcher)


def _send_one_mib_of_fragments(raw: RawWS) -> bytes:
    piece = b"f" * (64 * 1024)
    raw.send_frame(OP_TEXT, piece, fin=False)
    for _ in range(15):  # 16 x 64 KiB: exactly 1 MiB, the most a message may hold
        raw.send_frame(OP_CONT, piece, fin=False)
    return piece * 16


def test_max_size_message_in_fragments_delivered(wire_server, watcher, raw):
    data = _send_one_mib_of_fragments(raw)
    raw.send_frame(OP_CONT, b"", fin=True)
    watcher.wait_for(lambda msgs: data.decode() in msgs, WAIT, "the 1 MiB fragmented message")
    own_echo(raw, data)
    still_chatting(wire_server, watcher)


def test_fragments_beyond_max_size_are_1009_before_buffering(wire_server, watcher, raw):
    _send_one_mib_of_fragments(raw)  # allowed: see the test above
    # One more fragment's header, no payload: over the limit by its length
    # alone, so the server must answer without waiting for the payload.
    raw.send_raw(build_frame(OP_CONT, b"", fin=False, length=1))
    expect_fail(raw, 1009, timeout=2.0)
    assert not any(len(m) >= MIB for m in watcher.messages)
    still_chatting(wire_server, watcher)


def test_ping_inside_a_large_fragmented_message_is_answered(wire_server, watcher, raw):
    """RFC 6455 5.4: control frames may come between fragments; they are not part of the message.

    (websockets counts a control frame against what is left of the message's
    budget, so a ping within 125 bytes of --max-message-size closes with 1009:
    the price of refusing oversized frames from their header, README Wire
    protocol. Half the limit leaves room to spare.)
    """
    piece = b"h" * (64 * 1024)
    raw.send_frame(OP_TEXT, piece, fin=False)
    for _ in range(7):  # 8 x 64 KiB: half a MiB
        raw.send_frame(OP_CONT, piece, fin=False)
    raw.ping(b"keepalive")
    pong, _ = raw.recv_until(lambda f: f.opcode in (OP_PONG, OP_CLOSE))
    assert pong.opcode == OP_PONG, f"ping mid-message closed the connection: {pong.close_code} {pong.close_reason!r}"
    assert pong.payload == b"keepalive"
    raw.send_frame(OP_CONT, b"", fin=True)
    data = piece * 8
    watcher.wait_for(lambda msgs: data.decode() in msgs, WAIT, "the 512 KiB fragmented message")
    still_chatting(wire_server, watcher)


def test_memory_stays_flat_under_oversized_input(wire_server, watcher):
    """The 2^63 header and a fragmented stream ~1 MiB over the limit cost no memory."""
    pid = wire_server.proc.pid
    before = proc_stats(pid)

    with RawWS.connect(wire_server.port) as raw:
        raw.send_raw(build_frame(OP_BINARY, b"", length=2 ** 63))
        expect_fail(raw, 1009, timeout=2.0)
    after_header = proc_stats(pid)

    sent = 0
    piece = b"z" * (16 * 1024)
    budget = 2 * MIB + 64 * 1024  # about 1 MiB more than the server may take
    with RawWS.connect(wire_server.port) as raw:
        raw.send_frame(OP_TEXT, piece, fin=False)
        sent += len(piece)
        try:
            while sent < budget:
                raw.send_frame(OP_CONT, piece, fin=False, timeout=2.0)
                sent += len(piece)
        except OSError:
            pass  # the server may be done with us; the close frame is what counts
        close = raw.expect_close(WAIT)
        assert close.close_code == 1009, (close.close_code, close.close_reason)
    after_stream = proc_stats(pid)

    growth_mb = (after_stream.rss_kb - before.rss_kb) / 1024
    print(f"\nRSS before: {before.rss_kb} kB; after the 2^63 header: {after_header.rss_kb} kB; "
          f"after sending {sent} bytes of fragments (limit {MIB}): {after_stream.rss_kb} kB; "
          f"growth {growth_mb:.2f} MB")
    assert (after_header.rss_kb - before.rss_kb) / 1024 < 10
    assert growth_mb < 10
    still_chatting(wire_server, watcher)


def test_watcher_survives_a_burst_of_bad_connections(wire_server, watcher):
    """Many failing connections at once do not disturb a connected client."""
    conns = [RawWS.connect(wire_server.port) for _ in range(20)]
    try:
        bad = [build_frame(OP_TEXT, b"x", rsv=4), build_frame(0x3, b""), build_frame(OP_TEXT, b"\xff"),
               build_frame(OP_BINARY, b"", length=2 ** 63), build_frame(OP_PING, b"", fin=False)]
        codes = [1002, 1002, 1007, 1009, 1002]
        for i, conn in enumerate(conns):
            conn.send_raw(bad[i % len(bad)])
        for i, conn in enumerate(conns):
            assert conn.expect_close(WAIT).close_code == codes[i % len(codes)]
    finally:
        for conn in conns:
            conn.close()
    still_chatting(wire_server, watcher)
