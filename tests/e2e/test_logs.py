"""--log-format json (issue 12, point 4): one JSON object a line, with the fields a shipper indexes.

A real server process on 127.0.0.1 and real clients; its whole stderr is
read back after a graceful stop. The text format stays the default, and
the other e2e tests read it as before.
"""

from __future__ import annotations

import json

import pytest
from websockets.exceptions import InvalidStatus

from support.process import SERVER, run
from support.wsclients import ws_connect

WAIT = 5.0  # seconds for any single expected event
REQUIRED = ("ts", "level", "event", "message")


def records(server) -> list[dict]:
    """Every stderr line of a stopped ``server``, each parsed; fails on a line that is not one JSON object."""
    assert server.stop() == 0, server.log
    parsed = []
    for line in server.stderr.all(WAIT):
        record = json.loads(line)  # raises on anything else: a traceback, a text line
        assert isinstance(record, dict) and all(key in record for key in REQUIRED), line
        parsed.append(record)
    return parsed


def one(found: list[dict], **fields) -> dict:
    matches = [r for r in found if all(r.get(k) == v for k, v in fields.items())]
    assert len(matches) == 1, (fields, found)
    return matches[0]


def test_every_line_is_json_with_the_fields_of_connect_disconnect_and_refusal(start_server):
    server = start_server("--log-format", "json")
    with pytest.raises(InvalidStatus):
        ws_connect(server.url + "?username=Al%E2%80%8Bice")  # a zero-width space: 400
    with ws_connect(server.url + "?username=Alice") as ws:
        server.wait_for_log(r'"event": "connect"', WAIT)
        ws.close(1000, "bye\nfake line")
    server.wait_for_log(r'"event": "disconnect"', WAIT)
    found = records(server)

    connect = one(found, event="connect")
    assert connect["user"] == "Alice" and connect["room"] == "lobby", connect
    assert connect["peer"].startswith("127.0.0.1:")
    assert connect["level"] == "INFO" and connect["ts"].startswith("20")
    assert connect["message"] == f"connect Alice@{connect['peer']} (1 online), room lobby"  # the text line's wording
    disconnect = one(found, event="disconnect")
    assert (disconnect["user"], disconnect["room"], disconnect["peer"]) == ("Alice", "lobby", connect["peer"])
    assert (disconnect["code"], disconnect["reason"]) == (1000, "client"), disconnect
    assert "bye\nfake line" in disconnect["message"]  # kept exactly: one line, since JSON escapes it
    refused = one(found, event="refused")
    assert (refused["status"], refused["peer"][:10]) == (400, "127.0.0.1:"), refused
    assert refused["reason"] == "invalid username: must not contain control or formatting characters"
    listening = one(found, event="listening")
    assert listening["url"] == server.url
    assert one(found, event="log", message="stopped")["level"] == "INFO"  # lines without an event too


def test_control_characters_stay_escaped_in_text_and_exact_in_json(start_server):
    """The text format escapes what a client sent; JSON carries it exactly, on one line."""
    reason = "bye\x1b[31m\nINFO forged"  # a colour, and a forged second line
    escaped = r"bye\x1b[31m\x0aINFO forged"
    for log_format in ("text", "json"):
        server = start_server("--log-format", log_format)
        with ws_connect(server.url) as ws:
            server.wait_for_log("connect anonymous", WAIT)
            ws.close(1000, reason)
        if log_format == "text":
            line = server.wait_for_log(r"disconnect anonymous\S+: closed by client: 1000 \(OK\) (.*) \(0 online\)",
                                       WAIT)
            assert line.group(1) == escaped
            assert server.stop() == 0
            assert not any(text.startswith("INFO forged") for text in server.stderr.all(WAIT))
        else:
            server.wait_for_log('"event": "disconnect"', WAIT)
            assert reason in one(records(server), event="disconnect")["message"]


def test_an_unknown_log_format_costs_one_line_and_exit_2():
    result = run(SERVER, "--log-format", "xml")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--log-format" in result.stderr and "xml" in result.stderr
