"""broadcast/bus/streams.py against a real redis-server: ids, order, history, catch-up, presence, names.

And bus/redis.py's pipelined publisher over it, delivering into a recording room.

A "node" here is a StreamsBus instance with its own redis-py clients; two of
them in one test process talk to each other only through Redis, as two
servers would. The node that must die without a word is a real process,
killed with SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from websockets.frames import Opcode

from broadcast.bus import streams
from broadcast.bus.redis import RedisBus
from support.process import ROOT, clean_env

pytestmark = pytest.mark.redis

WAIT_S = 10.0  # every wait here ends by then; far past what any step takes unloaded
SHORT_TTL_S = 1.0  # presence TTL for the tests that watch it expire
SHORT_RETAIN_S = 0.2  # stream retention for the tests that watch it pass


class Node:
    """A StreamsBus and what its reader delivered: entries and gaps, in arrival order."""

    def __init__(self, url: str, name: str, gate: threading.Event | None = None, **kwargs) -> None:
        self.events: list = []  # Entry, or ("gap", room, epoch, missed)
        self._cond = threading.Condition()
        self.gate = gate  # when given, the reader is held on each entry until it is set
        self.held = threading.Event()  # the reader has been held
        self.names_lost: list[tuple[str, str]] = []
        self.bus = streams.StreamsBus(url, name, self._entry, self._gap, on_name_lost=self._name_lost, **kwargs)
        self.bus.start()

    def _entry(self, entry) -> None:
        if self.gate is not None and not self.gate.is_set():
            self.held.set()
            assert self.gate.wait(WAIT_S)
        with self._cond:
            self.events.append(entry)
            self._cond.notify_all()

    def _gap(self, room, epoch, missed) -> None:
        with self._cond:
            self.events.append(("gap", room, epoch, missed))
            self._cond.notify_all()

    def _name_lost(self, room, name) -> None:
        with self._cond:
            self.names_lost.append((room, name))
            self._cond.notify_all()

    def wait_name_lost(self) -> list:
        with self._cond:
            assert self._cond.wait_for(lambda: self.names_lost, WAIT_S), f"no name lost after {WAIT_S}s"
            return self.names_lost

    def entries(self) -> list:
        with self._cond:
            return [e for e in self.events if isinstance(e, streams.Entry)]

    def gaps(self) -> list:
        with self._cond:
            return [e for e in self.events if not isinstance(e, streams.Entry)]

    def wait_entries(self, n: int) -> list:
        with self._cond:
            done = self._cond.wait_for(lambda: len([e for e in self.events if isinstance(e, streams.Entry)]) >= n,
                                       WAIT_S)
        assert done, f"{len(self.entries())} of {n} entries after {WAIT_S}s"
        return self.entries()

    def close(self) -> None:
        self.bus.close(time.monotonic() + 5)


@pytest.fixture
def nodes(redis_server):
    made: list[Node] = []

    def make(name: str, **kwargs) -> Node:
        node = Node(redis_server.url, name, **kwargs)
        made.append(node)
        return node

    yield make
    for node in made:
        node.close()


def texts(entries) -> list[bytes]:
    return [e.fields["text"] for e in entries]


def seqs(entries) -> list[int]:
    return [e.id.seq for e in entries]


def publish_all(bus, room: str, prefix: str, n: int) -> list:
    return [bus.publish(room, {"text": f"{prefix}{i}"}) for i in range(n)]


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} after {WAIT_S}s"
        time.sleep(0.02)


def redis_ms(admin) -> int:
    """Redis's clock, which stream ids and so the retention go by, in ms."""
    seconds, micros = admin.time()
    return seconds * 1000 + micros // 1000


def kill_readers(redis_server, name: str) -> int:
    """CLIENT KILL the reader connection of node ``name``: a network cut of that node alone."""
    admin = redis_server.admin
    return sum(admin.client_kill_filter(_id=c["id"]) for c in admin.client_list()
               if c["name"] == f"broadcast-reader-{name}")


def test_two_nodes_see_the_same_ids_in_the_same_order(nodes):
    a, b = nodes("a"), nodes("b")
    for node in (a, b):
        assert node.bus.follow("room", 0).entries == []
    n = 60
    sent = {}
    threads = [threading.Thread(target=lambda node=node, p=p: sent.setdefault(p, publish_all(node.bus, "room", p, n)))
               for node, p in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    got_a, got_b = a.wait_entries(2 * n), b.wait_entries(2 * n)
    assert [(e.id, e.fields) for e in got_a] == [(e.id, e.fields) for e in got_b]
    assert seqs(got_a) == list(range(1, 2 * n + 1))
    assert len({e.id.epoch for e in got_a}) == 1
    # the id publish returned is the id every node delivered the message under
    by_text = {e.fields["text"]: e.id for e in got_a}
    assert all(by_text[f"{p}{i}".encode()] == sent[p][i] for p in "ab" for i in range(n))
    assert a.gaps() == b.gaps() == []


def test_rooms_are_apart(nodes):
    a, b = nodes("a"), nodes("b")
    a.bus.follow("one", 0)
    b.bus.follow("two", 0)
    a.bus.publish("two", {"text": "for two"})
    b.bus.publish("one", {"text": "for one"})
    assert texts(a.wait_entries(1)) == [b"for one"]
    assert texts(b.wait_entries(1)) == [b"for two"]
    assert a.entries()[0].id.seq == b.entries()[0].id.seq == 1  # each room counts its own


def test_history_then_live_with_no_gap_and_no_duplicate(nodes):
    a, b = nodes("a"), nodes("b")
    n = 300
    half = threading.Event()

    def publisher():
        for i in range(n):
            b.bus.publish("room", {"text": f"m{i}"})
            if i == n // 3:
                half.set()

    t = threading.Thread(target=publisher)
    t.start()
    assert half.wait(WAIT_S)
    history = a.bus.follow("room", streams.MAX_ENTRIES)  # while b keeps publishing
    t.join(WAIT_S)
    assert history.entries, "the joiner came in mid-stream"
    live = a.wait_entries(n - len(history.entries))
    assert seqs(history.entries + live) == list(range(1, n + 1))
    assert texts(history.entries + live) == [f"m{i}".encode() for i in range(n)]
    assert history.entries[-1].id.seq == history.last_seq
    assert a.gaps() == []


def test_notes_come_in_order_without_a_seq_and_stay_out_of_history(nodes):
    a, b = nodes("a"), nodes("b")
    a.bus.follow("room", 0)
    b.bus.publish("room", {"text": "m1"})
    note = b.bus.publish("room", {"text": "joined"}, message=False)
    b.bus.publish("room", {"text": "m2"})
    got = a.wait_entries(3)
    assert [(e.fields["text"], e.id.seq, e.message) for e in got] == [
        (b"m1", 1, True), (b"joined", 1, False), (b"m2", 2, True)]
    assert note == got[1].id  # a note carries the id of the last message before it
    assert a.gaps() == []
    assert texts(b.bus.follow("room", 10).entries) == [b"m1", b"m2"]


def test_follow_bounds_the_history(nodes):
    a = nodes("a")
    publish_all(a.bus, "room", "m", 20)
    history = a.bus.follow("room", 5)
    assert seqs(history.entries) == [16, 17, 18, 19, 20]
    a.bus.publish("room", {"text": "live"})
    assert seqs(a.wait_entries(1)) == [21]


def test_catch_up_after_client_kill_while_another_node_publishes(redis_server, nodes):
    a, b = nodes("a"), nodes("b")
    a.bus.follow("room", 0)
    n = 300
    for i in range(n):
        b.bus.publish("room", {"text": f"m{i}"})
        if i % 100 == 50:
            wait_until(lambda: kill_readers(redis_server, "a") == 1, "a's reader connected, to be cut")
    got = a.wait_entries(n)
    assert texts(got) == [f"m{i}".encode() for i in range(n)]
    assert a.gaps() == []


def test_catch_up_after_a_redis_restart_that_kept_the_data(redis_server, nodes):
    release = threading.Event()
    a, b = nodes("a", gate=release), nodes("b")  # a is held on its first entry; 4 more follow it
    a.bus.follow("room", 0)
    b.bus.publish("room", {"text": "before0"})
    assert a.held.wait(WAIT_S)
    for i in range(1, 5):
        b.bus.publish("room", {"text": f"before{i}"})
    redis_server.admin.save()  # what appendonly or RDB snapshots do in production
    redis_server.stop()
    release.set()
    wait_until(lambda: a.bus.state == "reconnecting", "reconnecting")
    with pytest.raises(streams.Unavailable, match=r"redis redis://127\.0\.0\.1"):
        b.bus.publish("room", {"text": "refused"})
    with pytest.raises(streams.Unavailable):
        b.bus.check()
    redis_server.start()
    b.bus.check()
    publish_all(b.bus, "room", "after", 5)  # before a has reconnected, or after: both must hold
    got = a.wait_entries(10)
    assert texts(got) == [f"before{i}".encode() for i in range(5)] + [f"after{i}".encode() for i in range(5)]
    assert seqs(got) == list(range(1, 11))
    assert a.gaps() == []
    wait_until(lambda: a.bus.state == "ok", "ok")


def test_a_redis_that_lost_the_room_gives_a_gap_and_a_new_epoch(redis_server, nodes):
    a, b = nodes("a"), nodes("b")
    a.bus.follow("room", 0)
    publish_all(b.bus, "room", "old", 3)
    old = a.wait_entries(3)[0].id.epoch
    redis_server.crash()  # persistence is off: the room is gone
    redis_server.start()
    wait_until(lambda: a.bus.state == "ok", "ok")
    b.bus.publish("room", {"text": "new"})
    got = a.wait_entries(4)
    assert got[3].id.seq == 1 and got[3].id.epoch != old
    assert a.gaps() == [("gap", "room", got[3].id.epoch, None)]


STREAM = "broadcast:room:room:stream"


def test_a_reader_behind_by_more_than_the_count_but_within_the_retention_loses_nothing(redis_server, nodes):
    redis_server.admin.config_set("stream-node-max-entries", 5)  # so that a trim would take few
    release = threading.Event()
    a = nodes("a", gate=release, max_entries=10)  # a falls behind: its reader is held on the first entry
    b = nodes("b", max_entries=10)
    a.bus.follow("room", 0)
    b.bus.publish("room", {"text": "m0"})
    assert a.held.wait(WAIT_S)
    publish_all(b.bus, "room", "x", 100)
    b.bus.publish_many([("room", {"text": f"y{i}"}, True) for i in range(100)])  # and a burst, in one batch
    release.set()
    got = a.wait_entries(201)
    assert a.gaps() == []
    assert seqs(got) == list(range(1, 202))
    assert redis_server.admin.xlen(STREAM) == 201  # all of it within streams.RETAIN_S


@pytest.mark.parametrize("reach", [{"retain_s": 0}, {"cap_entries": 20}], ids=["no retention", "capped"])
def test_a_reader_behind_the_streams_reach_gets_a_counted_gap(redis_server, nodes, reach):
    redis_server.admin.config_set("stream-node-max-entries", 5)  # so that a trim takes few at a time
    release = threading.Event()
    a = nodes("a", gate=release, max_entries=10, **reach)  # a falls behind: its reader is held on the first entry
    b = nodes("b", max_entries=10, **reach)
    a.bus.follow("room", 0)
    b.bus.publish("room", {"text": "m0"})
    assert a.held.wait(WAIT_S)
    publish_all(b.bus, "room", "x", 100)
    release.set()
    got = a.wait_entries(2)
    gap = a.gaps()[0]
    assert gap[3] == got[1].id.seq - 2 > 0  # exactly the entries between 1 and the first still there
    assert seqs(got[1:]) == list(range(got[1].id.seq, 102))


@pytest.mark.parametrize("burst", [False, True], ids=["one at a time", "one batch"])
def test_past_the_retention_a_room_still_keeps_its_last_entries(redis_server, nodes, burst):
    redis_server.admin.config_set("stream-node-max-entries", 5)
    admin = redis_server.admin
    a = nodes("a", max_entries=10, retain_s=SHORT_RETAIN_S)
    if burst:
        last = a.bus.publish_many([("room", {"text": f"m{i}"}, True) for i in range(100)])[-1]
    else:
        last = publish_all(a.bus, "room", "m", 100)[-1]
    assert admin.xlen(STREAM) == 100  # all within the retention still
    newest_ms = int(admin.xrevrange(STREAM, count=1)[0][0].split(b"-")[0])
    wait_until(lambda: redis_ms(admin) > newest_ms + SHORT_RETAIN_S * 1000, "past the retention by Redis's clock")
    a.bus.publish("room", {"text": "now"})  # a publish trims what is older than the retention
    assert 10 <= admin.xlen(STREAM) < 10 + 5  # the last 10, in whole macro-nodes of 5
    assert seqs(a.bus.follow("room", 10).entries) == list(range(last.seq - 8, last.seq + 2))


def test_an_unknown_envelope_version_is_skipped_and_logged_once(redis_server, nodes, caplog):
    a, b = nodes("a"), nodes("b")
    history = a.bus.follow("room", 0)
    admin = redis_server.admin
    for _ in range(2):  # what a newer node writes: the same counter, a version this one does not speak
        seq = admin.incr("broadcast:room:room:seq")
        admin.xadd("broadcast:room:room:stream", {"v": "99", "epoch": history.epoch, "seq": seq, "x": "?"})
    admin.xadd("broadcast:room:room:stream", {"v": "1", "text": "no id"})  # not a message: no SEQ taken
    with caplog.at_level(logging.WARNING):
        b.bus.publish("room", {"text": "after"})
        got = a.wait_entries(1)
    assert texts(got) == [b"after"] and seqs(got) == [3]
    assert a.gaps() == []  # the skipped entries were messages, not losses
    warnings = [r.getMessage() for r in caplog.records if "envelope version" in r.getMessage()]
    assert len(warnings) == 1 and "99" in warnings[0]
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 1


def test_presence_merges_the_live_nodes(nodes):
    a, b = nodes("a"), nodes("b")
    a.bus.set_presence("room", ["Bob", "Alice"], 1)
    b.bus.set_presence("room", ["Carol"], 2)
    assert a.bus.presence("room") == b.bus.presence("room") == (["Alice", "Bob", "Carol"], 3)
    b.bus.set_presence("room", [], 0)
    assert a.bus.presence("room") == (["Alice", "Bob"], 1)
    assert a.bus.presence("elsewhere") == ([], 0)


def test_presence_and_names_outlive_the_ttl_while_the_heartbeat_runs(nodes):
    a, b = nodes("a", presence_ttl_s=SHORT_TTL_S), nodes("b", presence_ttl_s=SHORT_TTL_S)
    a.bus.set_presence("room", ["Alice"], 0)
    assert a.bus.claim("room", "Alice", "token-a")
    end = time.monotonic() + 3 * SHORT_TTL_S  # a span of time is the point: three TTLs, renewed all along
    while time.monotonic() < end:
        assert b.bus.presence("room") == (["Alice"], 0)
        assert not b.bus.claim("room", "Alice", "token-b")
        time.sleep(SHORT_TTL_S / 10)


DYING_NODE = """
import sys, time
from broadcast.bus import streams
bus = streams.StreamsBus(sys.argv[1], "dying", lambda e: None, lambda *g: None, presence_ttl_s=float(sys.argv[2]))
bus.start()
bus.set_presence("room", ["Carol"], 2)
assert bus.claim("room", "Carol", "token-c")
print("ready", flush=True)
time.sleep(60)
"""


def test_a_killed_node_drops_out_of_presence_and_frees_its_names(redis_server, nodes):
    a = nodes("a", presence_ttl_s=SHORT_TTL_S)
    a.bus.set_presence("room", ["Alice"], 0)
    dying = subprocess.Popen([sys.executable, "-c", DYING_NODE, redis_server.url, str(SHORT_TTL_S)],
                             cwd=ROOT, env=clean_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert dying.stdout.readline().strip() == "ready"
        assert a.bus.presence("room") == (["Alice", "Carol"], 2)
        assert not a.bus.claim("room", "Carol", "token-other")
        os.kill(dying.pid, signal.SIGKILL)  # no goodbye
        dying.wait(WAIT_S)
        wait_until(lambda: a.bus.presence("room") == (["Alice"], 0), "Carol gone from presence")
        # the claim expires within the same TTL, a moment after the heartbeat key it was renewed with
        wait_until(lambda: a.bus.claim("room", "Carol", "token-other"), "Carol's name freed")
    finally:
        dying.kill()
        dying.wait(WAIT_S)
        dying.stdout.close()


def test_names_are_unique_across_nodes_and_released_on_leave(nodes):
    a, b = nodes("a"), nodes("b")
    assert a.bus.claim("room", "Alice", "token-1")
    assert not b.bus.claim("room", "Alice", "token-2")
    assert b.bus.claim("other", "Alice", "token-2")  # per room
    a.bus.release("room", "Alice", "token-wrong")  # not the holder: nothing freed
    assert not b.bus.claim("room", "Alice", "token-2")
    a.bus.release("room", "Alice", "token-1")
    assert b.bus.claim("room", "Alice", "token-2")


def test_a_resume_on_another_node_takes_the_name_over(nodes):
    a = nodes("a", presence_ttl_s=SHORT_TTL_S)
    b = nodes("b", presence_ttl_s=SHORT_TTL_S)
    assert a.bus.claim("room", "Alice", "token-1")
    assert b.bus.claim("room", "Alice", "token-1")  # the session token: a resume on another node
    assert a.wait_name_lost() == [("room", "Alice")]  # a's heartbeat finds it held elsewhere
    a.bus.release("room", "Alice", "token-1")  # a's former connection closes: b's claim stays
    assert not a.bus.claim("room", "Alice", "token-2")
    assert b.names_lost == []


def test_close_is_bounded_when_redis_is_frozen(redis_server):
    node = Node(redis_server.url, "a")
    node.bus.follow("room", 0)
    node.bus.set_presence("room", ["Alice"], 0)
    redis_server.freeze()
    closing = threading.Thread(target=node.bus.close, args=(time.monotonic() + 2,), daemon=True)
    closing.start()
    closing.join(WAIT_S)
    assert not closing.is_alive(), "close() waited on a frozen Redis past its deadline"


def test_the_redis_password_reaches_no_error_and_no_log_line(redis_server, caplog):
    secret = "s3cret-pw"
    redis_server.admin.config_set("requirepass", secret)  # gone at the restart below
    node = Node(f"redis://:{secret}@{redis_server.host}:{redis_server.port}/0", "a")
    try:
        with caplog.at_level(logging.DEBUG):
            node.bus.follow("room", 0)
            node.bus.publish("room", {"text": "hi"})
            node.wait_entries(1)
            redis_server.crash()
            wait_until(lambda: node.bus.state == "reconnecting", "reconnecting")
            with pytest.raises(streams.Unavailable) as refused:
                node.bus.publish("room", {"text": "refused"})
        assert "***" in str(refused.value) and secret not in str(refused.value)
        assert "unreachable" in caplog.text and secret not in caplog.text
    finally:
        node.close()
        redis_server.start()


def test_publish_many_appends_a_burst_in_order_and_again_once_redis_lost_its_scripts(redis_server, nodes):
    a, b = nodes("a"), nodes("b")
    a.bus.follow("room", 0)
    burst = [("room", {"text": f"m{i}"}, i % 10 != 9) for i in range(100)]  # every 10th a note
    ids = b.bus.publish_many(burst)
    got = a.wait_entries(100)
    assert texts(got) == [f"m{i}".encode() for i in range(100)]
    assert [e.id for e in got] == ids
    assert [e.message for e in got] == [message for _, _, message in burst]
    assert seqs([e for e in got if e.message]) == list(range(1, 91))
    redis_server.admin.script_flush()  # as a restarted Redis without persistence would have it
    assert b.bus.publish_many([("room", {"text": "after flush"}, True)]) == [a.wait_entries(101)[100].id]
    assert texts(a.entries()[100:]) == [b"after flush"]


def test_a_burst_over_two_rooms_keeps_each_entrys_own_fields_and_order(redis_server, nodes):
    """A burst sends each room's keys and each set of field names once; every entry still gets its own."""
    a, b = nodes("a"), nodes("b")
    a.bus.follow("one", 0)
    a.bus.follow("two", 0)
    burst = [("one", {"text": b"a", "from": b"Ann"}, True), ("two", {"text": b"b"}, False),
             ("one", {"from": b"Bo", "text": b"c", "skip": b"7"}, True), ("two", {"text": b"d", "from": b"Cy"}, True),
             ("one", {"text": b"e"}, False), ("two", {"text": "f\u00e9"}, True)]
    ids = b.bus.publish_many(burst)
    got = a.wait_entries(len(burst))
    for room in ("one", "two"):
        sent = [(fields, message) for r, fields, message in burst if r == room]
        heard = [e for e in got if e.room == room]
        assert [(e.fields, e.message) for e in heard] == [
            ({k: v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}, message)
            for fields, message in sent]
        assert [e.id for e in heard] == [i for (r, _, _), i in zip(burst, ids) if r == room]
    assert [e.id.seq for e in got if e.room == "one"] == [1, 2, 2]  # a note carries the SEQ before it
    assert [e.id.seq for e in got if e.room == "two"] == [0, 1, 2]


def test_an_append_redis_refuses_in_a_burst_refuses_that_one_alone(redis_server, nodes):
    a, b = nodes("a"), nodes("b")
    a.bus.follow("room", 0)
    redis_server.admin.set(b.bus._room_key("broken", "stream"), "not a stream")
    answers = b.bus.publish_many([("room", {"text": "before"}, True), ("broken", {"text": "lost"}, True),
                                  ("room", {"text": "after"}, True)])
    assert isinstance(answers[1], streams.Unavailable) and "WRONGTYPE" in str(answers[1])
    got = a.wait_entries(2)
    assert texts(got) == [b"before", b"after"] and [e.id for e in got] == [answers[0], answers[2]]


class Room:
    """What a bus delivers into (chat.rooms.Room's part of it): every message, in arrival order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.got: list[bytes] = []
        self._cond = threading.Condition()

    def restore_locked(self, epoch, last_seq, messages) -> None:
        assert self.lock.locked()

    def deliver(self, opcode, payload, skip=None, sender=None, kind="message", id=None, ts=None) -> None:
        with self._cond:
            self.got.append(payload)
            self._cond.notify_all()

    def wait_got(self, n: int) -> list[bytes]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.got) >= n, WAIT_S), f"{len(self.got)} of {n}"
            return self.got


@pytest.fixture
def redis_bus(redis_server):
    """A RedisBus (bus/redis.py, the pipelined publisher over StreamsBus) delivering into one Room."""
    room = Room("room")
    bus = RedisBus({"room": room}, redis_server.url, "broadcast", "node-a")
    bus.start()
    with room.lock:
        bus.open_locked(room)
    yield bus, room
    bus.close(time.monotonic() + 5)


def test_pipelined_publishes_keep_the_senders_order_and_refuse_to_the_sender_while_redis_is_gone(
        redis_server, redis_bus):
    bus, room = redis_bus
    refused: list[int] = []
    told = threading.Condition()

    def refuse(i: int) -> None:
        with told:
            refused.append(i)
            told.notify_all()

    # One sender that does not wait for Redis, and one that does, at the same time.
    mids = [bus.publish("room", Opcode.TEXT, f"a{i}".encode(), refused=lambda i=i: refuse(i)) for i in range(300)]
    waiting = threading.Thread(target=lambda: [bus.publish("room", Opcode.TEXT, f"b{i}".encode())
                                               for i in range(30)])
    waiting.start()
    waiting.join(WAIT_S)
    got = room.wait_got(330)
    assert [m for m in got if m.startswith(b"a")] == [f"a{i}".encode() for i in range(300)]
    assert [m for m in got if m.startswith(b"b")] == [f"b{i}".encode() for i in range(30)]
    bus.settle(mids[-1])
    assert refused == []

    redis_server.stop()
    try:
        mid = bus.publish("room", Opcode.TEXT, b"lost", refused=lambda: refuse(-1))  # returns before Redis answers
        with told:
            assert told.wait_for(lambda: refused == [-1], WAIT_S), refused
        bus.settle(mid)  # no echo is coming, and settle knows it
        with pytest.raises(streams.Unavailable):
            bus.publish("room", Opcode.TEXT, b"refused")
    finally:
        redis_server.start()
    assert b"lost" not in room.got and b"refused" not in room.got
