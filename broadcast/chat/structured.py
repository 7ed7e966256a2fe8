"""The ``broadcast.v1`` subprotocol: every server frame a JSON object.

The server objects are built from templates rather than by ``json.dumps`` of
a dict: only the strings that can hold anything (a name, a text, a reason)
go through the JSON string encoder, so a message costs well under a
microsecond to encode, once for every client of the protocol. Ids and room
names are from ASCII sets that need no escaping (see ids.py and names.py),
and ``ts`` is a float's repr, which is what JSON writes for it. The output is
exactly ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False)`` with
the keys in the order of PROTOCOL.md: kind, id, room, ts, then the rest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SUBPROTOCOL = "broadcast.v1"

# Strings only: the fast path of JSONEncoder.encode, the C string encoder,
# without non-ASCII text growing sixfold into \u escapes.
_string = json.JSONEncoder(ensure_ascii=False).encode
# A frame that opens like an object is meant as one; anything else is text.
_LOOKS_LIKE_OBJECT = re.compile(r"[ \t\r\n]*\{")
_CLIENT_FIELDS = {"message": {"kind", "text"}, "presence": {"kind"}}


def _name(name: str | None) -> str:
    return "null" if name is None else _string(name)


def _head(kind: str, id: str | None, room: str, ts: float) -> str:
    quoted = "null" if id is None else f'"{id}"'
    return f'{{"kind":"{kind}","id":{quoted},"room":"{room}","ts":{ts!r}'


def _said(kind: str, id: str, room: str, ts: float, sender: str | None, text: str) -> str:
    return f'{_head(kind, id, room, ts)},"from":{_name(sender)},"text":{_string(text)}}}'


def message(id: str, room: str, ts: float, sender: str | None, text: str) -> str:
    """A live message; ``sender`` None for an anonymous client."""
    return _said("message", id, room, ts, sender, text)


def history(id: str, room: str, ts: float, sender: str | None, text: str) -> str:
    """A message replayed on join or recovery, before anything live."""
    return _said("history", id, room, ts, sender, text)


def join(id: str, room: str, ts: float, name: str) -> str:
    """``name`` entered; ``id`` is the last message before it."""
    return f'{_head("join", id, room, ts)},"from":{_string(name)}}}'


def leave(id: str, room: str, ts: float, name: str) -> str:
    """``name`` left; ``id`` is the last message before it."""
    return f'{_head("leave", id, room, ts)},"from":{_string(name)}}}'


def presence(id: str, room: str, ts: float, users: list[str], anonymous: int,
             session: str | None = None) -> str:
    """Who is in the room: ``users`` already sorted, and how many have no name.

    ``session`` is the joiner's own session token, in the presence it alone
    gets on joining: a browser cannot read the handshake's response headers.
    """
    names = ",".join(map(_string, users))
    own = "" if session is None else f',"session":{_string(session)}'
    return f'{_head("presence", id, room, ts)},"users":[{names}],"anonymous":{anonymous:d}{own}}}'


def gap(id: str | None, room: str, ts: float, missed: int | None, reason: str) -> str:
    """``since`` could not be served in full: ``missed`` messages lost, None when unknown."""
    count = "null" if missed is None else f"{missed:d}"
    return f'{_head("gap", id, room, ts)},"missed":{count},"reason":{_string(reason)}}}'


def gap_line(missed: int | None, reason: str) -> str:
    """A live gap as a line of text: what a plain client is sent for it, and what the chat client prints."""
    if missed is None:
        return f"messages may have been lost: {reason}"
    return f"{missed} message{'' if missed == 1 else 's'} lost: {reason}"


def error(room: str, ts: float, reason: str) -> str:
    """A bad request from this one client; it stays connected."""
    return f'{_head("error", None, room, ts)},"reason":{_string(reason)}}}'


class BadFrame(ValueError):
    """A client frame that is neither text nor a ``broadcast.v1`` request; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    text: str


@dataclass(frozen=True, slots=True)
class PresenceRequest:
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Two "kind"s would mean whatever the last one says here and maybe the
    # first one in a proxy or a log reader: refuse rather than pick.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise BadFrame("duplicate field")
    return obj


def parse_client_frame(text: str) -> Message | PresenceRequest:
    """What a structured client's text frame asks for; BadFrame (a ValueError) if nothing valid.

    Text that does not open like a JSON object is a message as it stands, so
    a client may type plain lines. Reasons never quote the frame back.
    """
    if not _LOOKS_LIKE_OBJECT.match(text):
        return Message(text)
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise BadFrame("nested too deeply") from None
    except BadFrame:
        raise
    except ValueError:  # JSONDecodeError, or an integer of too many digits
        raise BadFrame("not valid JSON") from None
    kind = obj.get("kind")
    if not isinstance(kind, str):
        raise BadFrame("missing kind")
    fields = _CLIENT_FIELDS.get(kind)
    if fields is None:
        raise BadFrame("unknown kind")
    if any(isinstance(value, (dict, list)) for value in obj.values()):
        raise BadFrame("nested values are not allowed")
    extra = obj.keys() - fields
    if extra:
        raise BadFrame(f"unknown field for {kind}")
    if kind == "presence":
        return PresenceRequest()
    if "text" not in obj:
        raise BadFrame("missing text")
    if not isinstance(obj["text"], str):
        raise BadFrame("text must be a string")
    return Message(obj["text"])
