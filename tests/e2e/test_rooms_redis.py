"""Rooms across nodes (issue 11 point 7): real server processes on one real redis-server.

Each node is a ``scripts/server.py`` process with ``--redis-url``; the
clients are websockets' sync client, structured (``broadcast.v1``) unless a
test says plain. A node cut off from Redis alone reaches it through a
``support.proxy.Relay`` that the test cuts and heals; stopping Redis would
cut every node at once. Every wait is bounded and ends on an event.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from broadcast.chat.rooms import GAP_LOST
from support.process import wait_connections
from support.proxy import Relay
from support.redis import wait_health
from support.wsclients import Closed, http_get, recv, send, url_for, ws_connect

pytestmark = pytest.mark.redis

WAIT = 10.0  # any one expected event
V1 = ["broadcast.v1"]
SHORT_TTL_S = 1.5  # --presence-ttl for the test that watches a dead node drop out
CUT_S = 10.0  # how long the cut-off node stays cut off (issue 11: "for 10 s")
BEHIND_BY = 1500  # messages a held-back node misses: past the 1,000 (and a macro-node) a count would keep


@pytest.fixture
def node(start_server, redis_server):
    """Factory: a node on ``redis_server`` (or on ``url``), ready (/healthz ok)."""

    def start(*args: str, url: str | None = None):
        server = start_server("--redis-url", url or redis_server.url, *args)
        wait_health(server, "ok", WAIT)
        return server

    return start


def structured(server, username: str | None = None, query: str = "", **kwargs):
    url = url_for(server, username)
    if query:
        url += ("&" if "?" in url else "?") + query
    return ws_connect(url, subprotocols=V1, **kwargs)


def objects(ws, kinds=("message", "history")) -> "Reader":
    return Reader(ws, kinds)


class Reader:
    """The objects of ``kinds`` a structured client gets, read in the test's thread with a deadline."""

    def __init__(self, ws, kinds) -> None:
        self.ws = ws
        self.kinds = kinds
        self.seen: list[dict] = []  # every object, of any kind

    def next(self, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            obj = json.loads(recv(self.ws, max(0.01, deadline - time.monotonic())))
            self.seen.append(obj)
            if obj["kind"] in self.kinds:
                return obj

    def take(self, n: int, timeout: float = WAIT) -> list[dict]:
        deadline = time.monotonic() + timeout
        return [self.next(max(0.01, deadline - time.monotonic())) for _ in range(n)]


def said(ws, timeout: float = WAIT) -> str:
    """A plain client's next line that is not a join or leave notice."""
    deadline = time.monotonic() + timeout
    while (line := recv(ws, max(0.01, deadline - time.monotonic()))).endswith((" joined", " left")):
        pass
    return line


def texts(objs) -> list[str]:
    return [o["text"] for o in objs]


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} after {timeout}s"
        time.sleep(0.05)


def lost_messages(server) -> float:
    """broadcast_redis_lost_messages_total on ``server``'s /metrics."""
    status, body = http_get(server, "/metrics")
    assert status == 200, (status, body)
    (total,) = [s.value for family in text_string_to_metric_families(body) for s in family.samples
                if s.name == "broadcast_redis_lost_messages_total"]
    return total


def room_info(server, room: str = "lobby") -> dict:
    status, body = http_get(server, f"/rooms/{room}")
    assert status == 200, (status, body)
    return json.loads(body)


def test_two_nodes_deliver_one_order_under_the_same_ids(node):
    a, b = node(), node()
    with structured(a, "Ann") as on_a, structured(b, "Ben") as on_b:
        wait_until(lambda: room_info(a)["users"] == ["Ann", "Ben"], "both in presence")
        n = 30
        senders = [threading.Thread(target=lambda ws=ws, p=p: [send(ws, f"{p}{i}") for i in range(n)])
                   for ws, p in ((on_a, "a"), (on_b, "b"))]
        for t in senders:
            t.start()
        for t in senders:
            t.join(WAIT)
        got_a, got_b = objects(on_a).take(2 * n), objects(on_b).take(2 * n)
    assert [(o["id"], o["from"], o["text"]) for o in got_a] == [(o["id"], o["from"], o["text"]) for o in got_b]
    assert [int(o["id"].split(":")[1]) for o in got_a] == sorted(int(o["id"].split(":")[1]) for o in got_a)
    assert len({o["id"].split(":")[0] for o in got_a}) == 1  # one epoch, Redis's
    assert [t for t in texts(got_a) if t[0] == "a"] == [f"a{i}" for i in range(n)]


def test_a_joiner_on_another_node_gets_the_rooms_history_then_live(node):
    a = node()
    with structured(a, "Ann") as on_a:
        for i in range(5):
            send(on_a, f"m{i}")
        sent = objects(on_a).take(5)
    b = node()  # a node that never saw them
    with structured(b, "Ben") as on_b:
        history = objects(on_b).take(5)
        assert [o["kind"] for o in history] == ["history"] * 5
        assert [o["id"] for o in history] == [o["id"] for o in sent]
        assert objects(on_b, ("presence",)).next()["users"] == ["Ben"]
        send(on_b, "live")
        live = objects(on_b).next()
        assert live["kind"] == "message" and live["id"].split(":") == [
            sent[0]["id"].split(":")[0], "6"]  # Redis's epoch, the room's next SEQ


def test_presence_covers_two_nodes_and_a_killed_nodes_members_go_within_the_ttl(node):
    ttl = ("--presence-ttl", str(SHORT_TTL_S))
    a, b = node(*ttl), node(*ttl)
    with structured(a, "Ann") as on_a, structured(b, "Ben"), structured(b):
        wait_until(lambda: room_info(a) == {"room": "lobby", "users": ["Ann", "Ben"], "anonymous": 1},
                   "Ann, Ben and one anonymous in a's /rooms/lobby")
        send(on_a, json.dumps({"kind": "presence"}))
        presence = objects(on_a, ("presence",))
        presence.next()  # the one after history, on join
        asked = presence.next()
        assert (asked["users"], asked["anonymous"]) == (["Ann", "Ben"], 1)
        b.proc.send_signal(signal.SIGKILL)  # no goodbye: only the TTL takes Ben out
        wait_until(lambda: room_info(a) == {"room": "lobby", "users": ["Ann"], "anonymous": 0},
                   "Ben and the anonymous one gone from a's presence", timeout=SHORT_TTL_S + WAIT)


def rooms_list(server) -> list[dict]:
    status, body = http_get(server, "/rooms")
    assert status == 200, (status, body)
    return json.loads(body)["rooms"]


def test_get_rooms_lists_every_nodes_rooms_and_a_killed_nodes_go_within_the_ttl(node):
    ttl = ("--presence-ttl", str(SHORT_TTL_S))
    a, b = node(*ttl), node(*ttl)
    with ws_connect(url_for(a, "Ann", "/ws/alpha")), ws_connect(url_for(a, path="/ws/alpha")), \
            ws_connect(url_for(b, "Cat", "/ws/alpha")), ws_connect(url_for(b, "Bob", "/ws/beta")):
        both = [{"room": "alpha", "users": 2, "anonymous": 1}, {"room": "beta", "users": 1, "anonymous": 0}]
        for server in (a, b):
            wait_until(lambda server=server: rooms_list(server) == both, f"both nodes' rooms in {server.port}'s /rooms")
        b.proc.send_signal(signal.SIGKILL)  # no goodbye: only the TTL takes its rooms out
        wait_until(lambda: rooms_list(a) == [{"room": "alpha", "users": 1, "anonymous": 1}],
                   "b's members and its room gone from a's /rooms", timeout=SHORT_TTL_S + WAIT)


def test_a_duplicate_name_is_refused_across_two_nodes_and_a_resume_takes_it_over(node):
    a, b = node(), node()
    with structured(a, "Ann") as first:
        token = first.response.headers["Broadcast-Session"]
        with pytest.raises(InvalidStatus) as refused:
            structured(b, "Ann").close()
        assert refused.value.response.status_code == 409
        assert b"name Ann is taken in room lobby" in refused.value.response.body
        with structured(b, "Ann", f"session={token}") as resumed:
            with pytest.raises(Closed) as closed:
                while True:
                    recv(first, WAIT)
            assert closed.value.code == 4000
            send(resumed, "still Ann")
            assert objects(resumed).next()["from"] == "Ann"


def test_recovery_when_the_clients_node_is_restarted_while_another_keeps_publishing(node, start_server,
                                                                                 redis_server):
    a, b = node(), node()
    total = 60
    published = threading.Event()

    def publish():
        with structured(b, "Pub") as pub:
            for i in range(total):
                send(pub, f"m{i}")
                time.sleep(0.02)  # a steady stream, so the restart falls in its middle
            objects(pub).take(total)
        published.set()

    got: list[dict] = []
    with structured(a, "Reader") as on_a:
        token = on_a.response.headers["Broadcast-Session"]  # the dead node's claim on the name is this
        publisher = threading.Thread(target=publish)
        publisher.start()
        got += objects(on_a).take(5)
        a.proc.send_signal(signal.SIGKILL)  # the client's node dies mid-stream
    a2 = node()  # its replacement: a new process, a new port
    last = got[-1]["id"]
    with structured(a2, "Reader", f"since={last}&session={token}") as again:
        reader = objects(again)
        while len(got) < total:
            got.append(reader.next())
        assert not any(o["kind"] == "gap" for o in reader.seen)
    publisher.join(WAIT)
    assert published.is_set()
    assert texts(got) == [f"m{i}" for i in range(total)]
    assert len({o["id"] for o in got}) == total


def messages_until(ws, last: str) -> list[str]:
    """A structured client's message texts up to ``last``; a gap on the way fails the test."""
    reader, got = objects(ws, ("message", "gap")), []
    while not got or got[-1] != last:
        obj = reader.next()
        assert obj["kind"] == "message", f"after {len(got)} messages: {obj}"
        got.append(obj["text"])
    return got


def sent_while_stopped(behind, sender) -> tuple[list[str], list[str]]:
    """BEHIND_BY messages from ``sender`` while ``behind`` is stopped (SIGSTOP): what was sent, and
    the texts of the sender's own echoes up to the last, every one in the stream by then."""
    wanted = [f"m{i:04d}" for i in range(BEHIND_BY)]
    behind.proc.send_signal(signal.SIGSTOP)
    try:
        for text in wanted:
            send(sender, text)
        reader, echoes = objects(sender), []
        while echoes[-1:] != wanted[-1:]:
            echoes.append(reader.next()["text"])
    finally:
        behind.proc.send_signal(signal.SIGCONT)
    return wanted, echoes


def test_a_node_held_back_past_the_streams_last_1000_catches_up_with_nothing_lost(node):
    """A node whose reader falls behind (a GC pause, a full CPU; here SIGSTOP) by more than the
    1,000 entries every room keeps, but for less than --redis-retention, reads on with no gap;
    so does the sender's own node, whose reader a burst of 1,500 can outrun as well."""
    behind, ahead = node(), node()
    with structured(behind, "Bea") as bea, structured(ahead, "Al") as al:
        wait_connections(behind, 1)
        wanted, echoes = sent_while_stopped(behind, al)
        assert echoes == wanted
        assert messages_until(bea, wanted[-1]) == wanted
    for server in (behind, ahead):
        assert "went past this node" not in server.log
        assert "--redis-retention needs" not in server.log  # this Redis trims by time
        assert lost_messages(server) == 0


def test_past_the_streams_reach_every_client_of_the_node_is_told_how_many_it_lost(node, piped):
    """With --redis-retention 0 the stream keeps its last 1,000 alone (the node that publishes trims):
    a node held back further tells its structured, plain and CLI clients what it lost, in order."""
    behind, ahead = node("--redis-retention", "0"), node("--redis-retention", "0")
    # Its clients are anonymous: a join notice still on its way at SIGSTOP would be appended
    # after the burst, and its trim would take more than the burst's own, or make a second gap.
    cli = piped("--addr", behind.addr)
    with structured(behind) as bea, ws_connect(url_for(behind)) as pat, structured(ahead, "Al") as al:
        wait_connections(behind, 3)
        wanted, _ = sent_while_stopped(behind, al)  # Al's node may fall behind too, with no retention
        got = []  # what Bea got: texts, and the gap object where it came
        reader = objects(bea, ("message", "gap"))
        while got[-1:] != [wanted[-1]]:
            obj = reader.next()
            got.append(obj["text"] if obj["kind"] == "message" else obj)
        (gap,) = [g for g in got if isinstance(g, dict)]
        assert (gap["kind"], gap["reason"]) == ("gap", GAP_LOST), gap
        read, missed = got.index(gap), gap["missed"]  # the node may read a first batch before it falls behind
        assert BEHIND_BY - 1000 - 100 - read <= missed <= BEHIND_BY - 1000 - read  # past the last 1,000
        assert got == [*wanted[:read], gap, *wanted[read + missed:]]
        line = f"{missed} messages lost: {GAP_LOST}"
        assert [said(pat) for _ in range(BEHIND_BY - missed + 1)] == [
            *[f"[Al] {t}" for t in wanted[:read]], f"* {line}", *[f"[Al] {t}" for t in wanted[read + missed:]]]
    cli.stderr.wait_for(f"^{re.escape(line)}$", WAIT)
    cli.stdout.wait_for(f"^\\[Al\\] {wanted[-1]}$", WAIT)
    assert behind.log.count(f"{missed} messages went past this node") == 1
    assert lost_messages(behind) == missed


def test_a_node_cut_off_for_10_s_catches_up_in_order_and_refuses_its_own(node, redis_server):
    proxy = Relay(redis_server.port)
    try:
        cut_off = node(url=f"redis://127.0.0.1:{proxy.port}/0")
        other = node()
        with structured(cut_off, "Cat") as cat, ws_connect(url_for(cut_off, "Plain")) as plain, \
                structured(other, "Oz") as oz:
            wait_connections(cut_off, 2)
            send(oz, "before")
            assert objects(cat).next()["text"] == "before"
            assert said(plain) == "[Oz] before"
            proxy.down()
            wait_health(cut_off, "reconnecting", WAIT)
            send(cat, "lost?")
            error = objects(cat, ("error",)).next()
            assert error["reason"].startswith("not sent:")
            send(plain, "lost too?")
            assert said(plain).startswith("* not sent:")
            during = []
            end = time.monotonic() + CUT_S
            i = 0
            while time.monotonic() < end and i < 100:  # bounded in time and count
                send(oz, f"during{i}")
                during.append(f"during{i}")
                i += 1
                time.sleep(CUT_S / 20)
            proxy.up()
            wait_health(cut_off, "ok", WAIT)
            send(oz, "after")
            wanted = during + ["after"]
            assert texts(objects(cat).take(len(wanted))) == wanted
            plain_lines = [said(plain) for _ in wanted]
            assert plain_lines == [f"[Oz] {t}" for t in wanted]
            oz_got = texts(objects(oz).take(1 + len(wanted)))
            assert oz_got == ["before", *wanted]  # the refused ones never came, in any order
    finally:
        proxy.close()
