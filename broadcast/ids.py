"""Message ids, ``EPOCH:SEQ``: where a message sits in its room's one order.

SEQ counts the room's messages from 1; EPOCH names the history that SEQ
belongs to, so that a SEQ from before a node restart (a new history, counting
from 1 again) is never taken for one of the new history's. To a client the
id is opaque; it only hands it back as ``?since=``.

Top level, beside config and redact, because two layers share it: chat/
numbers a room's history with it on one node, and bus/ has Redis assign it
across nodes.
"""

from __future__ import annotations

import re
import secrets
from typing import NamedTuple

# 48 random bits: epochs only need to differ between the histories a room
# has had, and 8 URL-safe characters keep every id short on the wire.
EPOCH_BYTES = 6
MAX_SEQ = 2**63 - 1  # Redis INCR's range, where SEQ is assigned across nodes
# EPOCH: what token_urlsafe makes (or Redis holds), bounded; SEQ: decimal, one
# spelling per number (no sign, no leading zero). 0 is "before the first message".
_ID = re.compile(r"([A-Za-z0-9_-]{1,32}):(0|[1-9][0-9]{0,18})")


class BadId(ValueError):
    """A client's id is not one this server could have made."""


class MessageId(NamedTuple):
    epoch: str
    seq: int


def new_epoch() -> str:
    """A fresh random epoch for a history that starts now."""
    return secrets.token_urlsafe(EPOCH_BYTES)


def format_id(epoch: str, seq: int) -> str:
    return f"{epoch}:{seq}"


def parse_id(text: str) -> MessageId:
    """The epoch and SEQ of ``text``; BadId (a ValueError) if it is not ``EPOCH:SEQ``."""
    match = _ID.fullmatch(text)
    if match is None or int(match[2]) > MAX_SEQ:
        raise BadId("malformed message id: expected EPOCH:SEQ")
    return MessageId(match[1], int(match[2]))
