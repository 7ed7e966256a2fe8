"""The broadcast.v1 JSON protocol (broadcast.chat.structured)."""

from __future__ import annotations

import json

import pytest

from broadcast.chat import structured
from broadcast.chat.structured import BadFrame, Message, PresenceRequest, parse_client_frame

TS = 1764627286.123456
HOSTILE = 'quote " backslash \\ newline \n tab \t nul \x00 bidi \u202e emoji \U0001f600 caf\u00e9 </script>'


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def common(kind, id="e:7", room="lobby"):
    return {"kind": kind, "id": id, "room": room, "ts": TS}


@pytest.mark.parametrize(("built", "expected"), [
    (structured.message("e:7", "lobby", TS, "Alice", "hi"), {**common("message"), "from": "Alice", "text": "hi"}),
    (structured.message("e:7", "lobby", TS, None, "hi"), {**common("message"), "from": None, "text": "hi"}),
    (structured.history("e:7", "lobby", TS, "Alice", "hi"), {**common("history"), "from": "Alice", "text": "hi"}),
    (structured.join("e:7", "lobby", TS, "Alice"), {**common("join"), "from": "Alice"}),
    (structured.leave("e:7", "lobby", TS, "Alice"), {**common("leave"), "from": "Alice"}),
    (structured.presence("e:7", "lobby", TS, ["Alice", "Bob"], 3),
     {**common("presence"), "users": ["Alice", "Bob"], "anonymous": 3}),
    (structured.presence("e:0", "lobby", TS, [], 0), {**common("presence", "e:0"), "users": [], "anonymous": 0}),
    (structured.presence("e:7", "lobby", TS, ["Alice"], 0, "t0k-EN_"),
     {**common("presence"), "users": ["Alice"], "anonymous": 0, "session": "t0k-EN_"}),
    (structured.presence("e:7", "lobby", TS, [], 0, HOSTILE),
     {**common("presence"), "users": [], "anonymous": 0, "session": HOSTILE}),
    (structured.gap("e:7", "lobby", TS, 40, "too old"), {**common("gap"), "missed": 40, "reason": "too old"}),
    (structured.gap(None, "lobby", TS, None, "unknown epoch"),
     {**common("gap", None), "missed": None, "reason": "unknown epoch"}),
    (structured.error("lobby", TS, "unknown kind"), {**common("error", None), "reason": "unknown kind"}),
])
def test_each_object_is_exactly_compact_json_in_protocol_order(built, expected):
    assert built == compact(expected)
    assert list(json.loads(built)) == list(expected)  # key order: kind, id, room, ts, then the rest


def test_hostile_text_and_names_are_escaped_and_non_ascii_kept_as_is():
    built = structured.message("e:1", "r", TS, HOSTILE, HOSTILE)
    assert built == compact({**common("message", "e:1", "r"), "from": HOSTILE, "text": HOSTILE})
    assert json.loads(built)["text"] == HOSTILE
    assert "caf\u00e9" in built and "\\u00e9" not in built


def test_ts_is_the_float_exactly():
    for ts in (0.0, 1.5, 1e16, TS):
        assert json.loads(structured.join("e:1", "r", ts, "A"))["ts"] == ts


def test_plain_text_is_a_message_as_it_stands():
    for text in ("hi", "", "[1,2]", "42", '"quoted"', "null", " hi {", "x{\"kind\":\"presence\"}"):
        assert parse_client_frame(text) == Message(text)


def test_json_requests():
    assert parse_client_frame('{"kind":"message","text":"hi"}') == Message("hi")
    assert parse_client_frame(' \n{"text": "", "kind": "message"}') == Message("")
    assert parse_client_frame('{"kind":"presence"}') == PresenceRequest()
    assert parse_client_frame(compact({"kind": "message", "text": HOSTILE})) == Message(HOSTILE)


@pytest.mark.parametrize(("text", "reason"), [
    ("{", "not valid JSON"),
    ("{hi}", "not valid JSON"),
    ('{"kind":"message","text":"hi"} trailing', "not valid JSON"),
    ('{"kind":"message","text":' + "1" * 5000 + "}", "not valid JSON"),  # past int's digit limit
    ("{}", "missing kind"),
    ('{"kind":5}', "missing kind"),
    ('{"kind":"shout"}', "unknown kind"),
    ('{"kind":"join","from":"x"}', "unknown kind"),  # server kinds are not requests
    ('{"kind":"message"}', "missing text"),
    ('{"kind":"message","text":5}', "text must be a string"),
    ('{"kind":"message","text":null}', "text must be a string"),
    ('{"kind":"message","text":{"a":1}}', "nested values are not allowed"),
    ('{"kind":"message","text":["hi"]}', "nested values are not allowed"),
    ('{"kind":"presence","x":{"y":1}}', "nested values are not allowed"),
    ('{"kind":"message","text":"hi","to":"Bob"}', "unknown field for message"),
    ('{"kind":"presence","text":"hi"}', "unknown field for presence"),
    ('{"kind":"message","kind":"presence"}', "duplicate field"),
    pytest.param('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply", id="deep"),
])
def test_anything_else_is_refused_with_a_reason(text, reason):
    with pytest.raises(BadFrame) as caught:
        parse_client_frame(text)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)
