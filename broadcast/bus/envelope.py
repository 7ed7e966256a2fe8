"""The envelope of a message on the Redis channel: one JSON header line, then the payload bytes.

::

    {"v": 2, "node": "3f2a9c1e4b7d", "seq": 17, "op": "text", "room": "lobby", "from": "Alice",
     "kind": "message"}\\n[Alice] hi

``op`` is ``text``, ``binary`` or ``sync`` (the watchdog's, with no
payload); the payload is the message exactly as clients get it, already
attributed. ``node`` and ``seq`` name the message once and for all.
``from`` and ``kind`` (message, join or leave) let a room build the
structured object from the plain payload; without them (older nodes) it is
an anonymous message. ``room`` says whose members get it; an envelope without one (version 1,
or a node from before rooms) is for the default room. Version 1 envelopes
(no ``seq``, a ``skip`` instead) are still delivered. Pure: no Redis, no
threads, so it is tested as a format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from websockets.frames import Opcode

VERSION = 2
SYNC = "sync"
_OPS = {Opcode.TEXT: "text", Opcode.BINARY: "binary"}
_OPCODES = {name: op for op, name in _OPS.items()}


@dataclass(frozen=True)
class Envelope:
    node: str
    seq: int | None  # None for version 1, which had no ids
    opcode: Opcode | None  # None for a sync
    room: str | None  # None: the default room
    payload: bytes
    sender: str | None = None
    kind: str = "message"


_KINDS = frozenset({"message", "join", "leave"})


def encode(node: str, seq: int, room: str, opcode: Opcode, payload: bytes,
           sender: str | None = None, kind: str = "message") -> bytes:
    header = {"v": VERSION, "node": node, "seq": seq, "op": _OPS[opcode], "room": room,
              "from": sender, "kind": kind}
    return json.dumps(header).encode() + b"\n" + payload


def encode_sync(node: str, seq: int) -> bytes:
    return json.dumps({"v": VERSION, "node": node, "seq": seq, "op": SYNC}).encode() + b"\n"


def decode(data: bytes) -> Envelope | None:
    """The envelope in ``data``, or None if it is not one we can deliver."""
    try:
        head, _, payload = data.partition(b"\n")
        header = json.loads(head)
        version, node, op = header["v"], header["node"], header["op"]
        if version == 1:
            if header["skip"] is not None and type(header["skip"]) is not int:
                raise TypeError("skip must be a connection id")
            seq = None
        else:
            seq = header["seq"]
            if type(seq) is not int or version != VERSION or type(node) is not str:
                raise TypeError("an id is a node and a number")
        room = header.get("room")
        if room is not None and type(room) is not str:
            raise TypeError("a room is a name")
        sender, kind = header.get("from"), header.get("kind", "message")
        if (sender is not None and type(sender) is not str) or kind not in _KINDS:
            raise TypeError("a sender is a name, and a kind one of ours")
        opcode = None if op == SYNC and seq is not None else _OPCODES[op]
    except (ValueError, KeyError, TypeError):
        return None
    return Envelope(node, seq, opcode, room, payload, sender, kind)
