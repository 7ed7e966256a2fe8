"""A stream entry read back from Redis's flat reply, and commands packed for it, without a Redis."""

from __future__ import annotations

import logging

import pytest
import redis

from broadcast.bus.streams import Entry, StreamsBus, _Packer, trims_by_time
from broadcast.ids import MessageId


@pytest.fixture
def bus():
    # Nothing connects until a command is sent; these tests send none.
    return StreamsBus("redis://127.0.0.1:1/0", "node", lambda entry: None, lambda room, epoch, missed: None)


def test_an_entry_as_our_scripts_write_it(bus):
    flat = [b"v", b"1", b"epoch", b"E", b"seq", b"7", b"data", b"hi", b"from", b"Al\xc3\xafce"]
    assert bus._decode("room", flat) == Entry("room", MessageId("E", 7), {"data": b"hi", "from": "Alïce".encode()})


def test_a_note_carries_the_seq_before_it(bus):
    flat = [b"v", b"1", b"epoch", b"E", b"after", b"7", b"data", b"joined"]
    assert bus._decode("room", flat) == Entry("room", MessageId("E", 7), {"data": b"joined"}, False)


@pytest.mark.parametrize("flat", [
    [b"seq", b"7", b"data", b"hi", b"epoch", b"E", b"v", b"1"],  # another writer's order
    [b"v", b"1", b"epoch", b"E", b"seq", b"7", b"data", b"hi", b"v", b"1"],  # an envelope field again
])
def test_any_other_layout_is_read_by_name(bus, flat):
    assert bus._decode("room", flat) == Entry("room", MessageId("E", 7), {"data": b"hi"})


@pytest.mark.parametrize(("flat", "logged"), [
    ([b"v", b"9", b"epoch", b"E", b"seq", b"7"], "entries of envelope version b'9'"),
    ([b"garbage", b"x"], "entries of envelope version None"),
    ([b"v", b"1", b"epoch", b"E"], "malformed entries"),
    ([b"v", b"1", b"seq", b"7"], "malformed entries"),
    ([b"v", b"1", b"epoch", b"E", b"seq", b"x7"], "malformed entries"),
    ([b"v", b"1", b"epoch", b"\xff", b"seq", b"7"], "malformed entries"),
    ([b"v", b"1", b"epoch", b"E", b"seq", b"7", b"\xff", b"x"], "malformed entries"),
])
def test_an_entry_this_node_cannot_read_is_skipped_and_logged_once(bus, caplog, flat, logged):
    with caplog.at_level(logging.WARNING, "broadcast.bus.streams"):
        assert bus._decode("room", flat) is None
        assert bus._decode("room", flat) is None
    assert [logged in r.getMessage() for r in caplog.records] == [True]


def test_the_packer_sends_what_redis_py_would():
    pack = _Packer().pack
    assert pack("EVALSHA", "sha", 1, "key", b"\x00raw", 1000) == [
        b"*6\r\n$7\r\nEVALSHA\r\n$3\r\nsha\r\n$1\r\n1\r\n$3\r\nkey\r\n$4\r\n\x00raw\r\n$4\r\n1000\r\n"]
    assert pack("CLIENT SETNAME", "reader") == [b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$6\r\nreader\r\n"]
    with pytest.raises(redis.DataError):
        pack("SET", "key", None)


@pytest.mark.parametrize("version, trims", [
    ("7.0.15", True), ("6.2.0", True), ("6.0.16", False), ("5.0.7", False), ("", True), ("255.255.255", True),
])
def test_a_redis_before_6_2_is_known_not_to_trim_by_time(version, trims):
    assert trims_by_time(version) is trims
