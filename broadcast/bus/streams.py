"""Rooms across nodes on Redis Streams: one order per room, ids every node agrees on, and catch-up.

Plain pub/sub (the bus before this one) forgets what it relayed: a node cut
off from Redis loses every other node's messages of that time. A stream keeps them,
so a node that comes back reads on from the last entry it delivered and its
clients miss nothing, within the stream's reach (RETAIN_S, MAX_ENTRIES).

One stream per room, not one for all rooms. Measured with 3,000 messages
spread over 1, 10 and 100 rooms (redis-server 7.0 on 127.0.0.1, redis-py
8.1, one client thread, a loaded 2-core machine, so +-30 %):

- a publish (this module's script) costs the same either way, 105-190 us;
- a node following every room reads 14-28 us per entry either way;
- a node following 1 of 100 rooms reads its 30 entries in 0.6-0.8 ms from
  its own stream, but 46-66 ms from a shared one (1.5-2.2 ms per entry it
  keeps), since it must fetch and drop every other room's entries: with one
  stream a node's cost grows with the whole deployment's traffic, not with
  its own rooms'; a joiner's history and a recovery would walk past other
  rooms' entries too;
- the price of per room: an empty XREAD over 100 streams costs 0.3-0.4 ms
  against 0.05-0.1 ms for one, paid once per READ_BLOCK_MS while idle.

The reach is per room as well, so a busy room cannot push a quiet room's
history out, the rule the node's own history keeps (chat/history.py). Notes
(notices and binary frames: in order, but no SEQ and in no history) count in
it too.

Keys (``P`` is the prefix, one per deployment)::

    P:room:ROOM:stream          the room's entries (trimmed to RETAIN_S, MAX_ENTRIES, CAP_ENTRIES)
    P:room:ROOM:seq             the room's last SEQ (INCR, in the same script as the XADD)
    P:room:ROOM:epoch           the room's epoch (set once; gone only if Redis lost the room)
    P:room:ROOM:nodes           the nodes that have written presence for the room
    P:room:ROOM:presence:NODE   NODE's members of the room, JSON, with PRESENCE_TTL_S
    P:room:ROOM:name:NAME       the session token holding NAME in the room, with PRESENCE_TTL_S
    P:rooms                     every room some node has members in, scored by when that lapses (ms)
    P:node:NODE                 NODE's heartbeat, with PRESENCE_TTL_S

The envelope is the entry's fields: ``v`` (ENVELOPE_VERSION), ``epoch``,
``seq`` (a message) or ``after`` (a note: the SEQ of the last message before
it), then the caller's own fields. A reader meets a version it does not
speak (a newer node in a rolling upgrade) by skipping the entry and logging
that once per version; it still advances past it and counts its SEQ, so
the rest of the room keeps flowing. Upgrade path: deploy nodes that read the
new version first, then let nodes write it.

Outages: ``publish`` never retries (a retried script could append the
message twice, under two SEQs) and raises Unavailable when Redis does not
answer; the caller refuses the client's message with a notice. A publish
that timed out may still have reached Redis: then it is delivered, to every
node, in the stream's one order, never in a second one. The reader resumes
each room from the last stream id it delivered; an entry whose SEQ is not
the next one (the stream was trimmed past it) or whose epoch changed (Redis
lost the room) is preceded by a gap.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

import hiredis
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from broadcast.ids import MessageId, new_epoch
from broadcast.redact import redact_url

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1  # of the stream entry's fields (the pub/sub bus's envelope, gone, counted apart)
# Entries each room's stream keeps at least, whatever their age (trims are
# in whole macro-nodes, so a few more): how far back the history a room
# takes from Redis as it opens on a node reaches.
MAX_ENTRIES = 1000
# Every entry younger than this stays too (the newest entry's time less
# this, Redis's clock): a node that falls behind, or is cut off, for less
# reads on with nothing lost. A count alone was a tenth of a second at ten
# thousand messages a second, and lost messages on a node whose reader
# lagged by no more; an outage of seconds in a lively room lost them too.
RETAIN_S = 60.0
# ... but never more than this many entries in one room: a busy room's share
# of Redis's memory stays bounded (measured: 174 bytes an entry of a 64-byte
# message, so ~17 MiB), at the price of a shorter reach past ~1,700 a second.
CAP_ENTRIES = 100_000
# XTRIM's MINID and LIMIT, which the retention trims with, came in Redis 6.2;
# on an older Redis the script keeps the count alone (MAX_ENTRIES), as
# before the retention, and the node warns at start.
TRIMS_BY_TIME_SINCE = (6, 2)
# A node's heartbeat, presence and name claims live this long unless
# refreshed: a node that dies without a word leaves presence, and frees its
# names, within PRESENCE_TTL_S. Long enough that a Redis stall of a few
# seconds does not empty presence. The heartbeat refreshes them every TTL/3,
# so two refreshes in a row can fail without a live node dropping out.
PRESENCE_TTL_S = 10.0
# One command (publish, claim, read for history) waits at most this long.
COMMAND_TIMEOUT_S = 1.0
# Shared by every caller thread; a burst beyond this waits for a free one.
CONNECTIONS = 8
# XREAD BLOCK: how long the reader waits for new entries before it looks at
# the rooms followed again, so a newly followed room's live entries start
# within this, and a stop is noticed within it.
READ_BLOCK_MS = 250
# Entries one XREAD returns per stream at most, so one busy room cannot hold
# the reader for long while the others wait.
READ_COUNT = 500
# Field names decoded once and kept (_Names); a stream with more decodes the rest each time.
MAX_FIELD_NAMES = 64
# Redis answers an XREAD BLOCK within its block time; past this margin on
# top, the reader takes Redis for stalled and reconnects.
READ_MARGIN_S = 1.0
# Reconnect delays double from the first to the cap: catch-up starts within
# about a second of Redis coming back, and an outage costs an attempt a second.
RECONNECT_FIRST_S = 0.05
RECONNECT_CAP_S = 1.0

# Both scripts find a room's epoch with this; ARGV[1] is a fresh one, KEYS[k]
# and KEYS[k + 1] the room's epoch and seq. An epoch is made once; a room
# whose epoch is gone lost its data, so its SEQ starts again.
_EPOCH = """
local function room_epoch(k)
  local epoch = redis.call('GET', KEYS[k])
  if not epoch then
    epoch = ARGV[1]
    redis.call('SET', KEYS[k], epoch)
    redis.call('DEL', KEYS[k + 1])
  end
  return epoch
end
"""
# KEYS: the epoch, seq and stream of each room of the batch, once each.
# ARGV: a fresh epoch, the entries kept at least, at most, and the ms kept
# (see RETAIN_S), version; the number of field-name lists
# (a batch's entries share a few), then each: its length and the names; then
# for each entry: its room's first key's index, 'seq' (a message: the next
# SEQ) or 'after' (a note: the SEQ of the last message before it), its names'
# list, and the values. Names and keys sent once a batch, not once an entry:
# redis-py encodes each argument in Python, and that was a third of the
# publishing node's time. One reply per entry, {epoch, seq, stream id}, or
# {why} for one that Redis refused (a key of the wrong type): not a
# transaction, so the others are appended all the same. Each room's stream
# is trimmed once a batch, after its appends: to CAP_ENTRIES, then of what
# is older than the ms kept, but never below the entries kept at least
# (LIMIT, which trims whole macro-nodes only); a Redis older than
# TRIMS_BY_TIME_SINCE trims to the entries kept at least. A trim that fails
# takes nothing back: the entries are in.
_PUBLISH = _EPOCH + """
local names, a = {}, 7
for s = 1, tonumber(ARGV[6]) do
  local n = tonumber(ARGV[a])
  names[s] = {unpack(ARGV, a + 1, a + n)}
  a = a + 1 + n
end
local newest = {}  -- a room's first key's index -> the id of its last entry appended
local function append(k, a, fields)
  local epoch = room_epoch(k)
  local seq
  if ARGV[a] == 'seq' then seq = redis.call('INCR', KEYS[k + 1]) else seq = tonumber(redis.call('GET', KEYS[k + 1]) or '0') end
  local entry = {'v', ARGV[5], 'epoch', epoch, ARGV[a], seq}
  for i, name in ipairs(fields) do
    entry[#entry + 1] = name
    entry[#entry + 1] = ARGV[a + 1 + i]
  end
  local id = redis.call('XADD', KEYS[k + 2], '*', unpack(entry))
  newest[k] = id
  return {epoch, seq, id}
end
local function trim(k, id)
  local stream = KEYS[k + 2]
  local length = redis.call('XLEN', stream)
  if length > tonumber(ARGV[3]) then length = length - redis.call('XTRIM', stream, 'MAXLEN', '~', ARGV[3]) end
  local over = length - tonumber(ARGV[2])
  if over > 0 then
    local oldest_kept = math.max(0, tonumber(string.match(id, '^%d+')) - tonumber(ARGV[4]))
    local trimmed = redis.pcall('XTRIM', stream, 'MINID', '~', string.format('%d-0', oldest_kept), 'LIMIT', over)
    if type(trimmed) == 'table' and trimmed.err then redis.call('XTRIM', stream, 'MAXLEN', '~', ARGV[2]) end
  end
end
local replies = {}
while a <= #ARGV do
  local fields = names[tonumber(ARGV[a + 2])]
  local ok, reply = pcall(append, tonumber(ARGV[a]), a + 1, fields)
  if not ok then reply = {type(reply) == 'table' and reply.err or tostring(reply)} end
  replies[#replies + 1] = reply
  a = a + 3 + #fields
end
for k, id in pairs(newest) do pcall(trim, k, id) end
return replies
"""
# ARGV: a fresh epoch, how many messages at most (the last ones). Newest
# first, notes left out; the newest stream
# id comes back even when no entry is asked for, as the reader's cursor.
_READ = _EPOCH + """
local epoch = room_epoch(1)
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local n = tonumber(ARGV[2])
local newest = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local top = '0-0'
if newest[1] then top = newest[1][1] end
local entries, from = {}, '+'
while #entries < n do
  local batch = redis.call('XREVRANGE', KEYS[3], from, '-', 'COUNT', n - #entries)
  if not batch[1] then break end
  for _, entry in ipairs(batch) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'seq' then entries[#entries + 1] = entry break end
    end
  end
  from = '(' .. batch[#batch][1]
end
return {epoch, last, top, entries}
"""
# A name's claim holds "TOKEN NODE": the token lets a resume take the name
# over from any node, the node tells the former holder it has lost it.
# KEYS: the claim. ARGV: token, "TOKEN NODE", TTL ms. Claims a free name, or
# takes over one held under the same token.
_CLAIM = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
# ARGV: "TOKEN NODE", TTL ms. Renews this node's claim, or makes it again if
# Redis lost it; 0 if someone else holds the name now.
_RENEW = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# ARGV: "TOKEN NODE". A claim taken over by another node is not this node's to free.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_OWN = frozenset({b"v", b"epoch", b"seq", b"after"})
_SEQ, _AFTER = b"seq", b"after"  # what publish_many tells its script each entry takes
_VERSION = str(ENVELOPE_VERSION).encode()
_V1 = [b"v", _VERSION, b"epoch"]  # how our scripts' entries start: then the epoch, then _SEQ or _AFTER


class Unavailable(ConnectionError):
    """Redis did not answer (down, cut off, stalled); the message names the URL without its secrets."""


class Entry(NamedTuple):
    """One entry of ``room``: its id, and the caller's fields as it published them (values bytes).

    A message (``message`` true) has the next SEQ of its room; a note
    (a notice or a binary frame, which take no SEQ and are kept in no
    history) carries the id of the last message before it.
    """

    room: str
    id: MessageId
    fields: dict[str, bytes]
    message: bool = True


class Replay(NamedTuple):
    """What Redis holds of a room: its ``epoch``, its ``last_seq``, ``entries`` oldest first.
    """

    epoch: str
    last_seq: int
    entries: list[Entry]


class _Cursor:
    """Where the reader is in one room's stream; only the reader thread moves it, after ``follow``."""

    __slots__ = ("key", "stream_id", "epoch", "seq")

    def __init__(self, key: bytes, stream_id: bytes, epoch: str, seq: int) -> None:
        self.key = key
        self.stream_id = stream_id  # the last entry delivered (or skipped)
        self.epoch = epoch
        self.seq = seq


class StreamsBus:
    """A node's rooms on Redis Streams: publish, follow with history, presence, names.

    ``on_entry(entry)`` and ``on_gap(room, epoch, missed)`` are called from
    the reader thread only, in each room's order; ``missed`` is None when
    Redis lost the room (a new epoch). ``on_read()`` is called from the
    reader thread after the entries of each read that brought some: a
    caller can leave work common to them until then. ``on_name_lost(room, name)`` is
    called from the heartbeat thread when a name this node claimed is held
    elsewhere now (a resume on another node took it over): the caller closes
    its former connection. ``follow`` returns what the room held
    and the reader continues right after it, so a caller that runs
    ``follow`` under its room's lock, and takes that lock in ``on_entry``,
    gives its history then live with no gap and no duplicate. After an
    ``unfollow`` and ``follow`` in quick succession an entry may come twice:
    chat.history.History.append refuses a SEQ not past its last (a
    ValueError), which is the caller's signal to drop it.
    """

    def __init__(self, url: str, node_id: str, on_entry: Callable[[Entry], None],
                 on_gap: Callable[[str, str, int | None], None], *,
                 on_name_lost: Callable[[str, str], None] = lambda room, name: None,
                 on_read: Callable[[], None] = lambda: None, prefix: str = "broadcast",
                 max_entries: int = MAX_ENTRIES, retain_s: float = RETAIN_S, cap_entries: int = CAP_ENTRIES,
                 presence_ttl_s: float = PRESENCE_TTL_S) -> None:
        self.url = redact_url(url)  # for log lines and errors: the password never reaches them
        self.node_id = node_id
        self.prefix = prefix
        self.max_entries = max_entries
        self.cap_entries = max(cap_entries, max_entries)
        self.retain_ms = int(retain_s * 1000)
        self.presence_ttl_ms = int(presence_ttl_s * 1000)
        self._heartbeat_s = presence_ttl_s / 3  # see PRESENCE_TTL_S
        self._on_entry = on_entry
        self._on_gap = on_gap
        self._on_name_lost = on_name_lost
        self._on_read = on_read
        no_retry = Retry(NoBackoff(), 0)  # a retried publish could append twice; we own retrying
        self._client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            url, max_connections=CONNECTIONS, timeout=COMMAND_TIMEOUT_S, protocol=2,
            socket_timeout=COMMAND_TIMEOUT_S, socket_connect_timeout=COMMAND_TIMEOUT_S, retry=no_retry,
            command_packer=_Packer(),
        ))
        self._reader_client = redis.Redis.from_url(
            url, protocol=2, client_name=f"broadcast-reader-{node_id}",  # for CLIENT LIST and CLIENT KILL
            socket_timeout=READ_BLOCK_MS / 1000 + READ_MARGIN_S, socket_connect_timeout=COMMAND_TIMEOUT_S,
            retry=no_retry,
        )
        # XREAD's reply as hiredis builds it, each entry's fields a flat list:
        # redis-py's callback makes a dict and tuples of every entry first.
        self._reader_client.set_response_callback("XREAD", lambda reply, **options: reply)
        self._publish = self._client.register_script(_PUBLISH)
        self._read = self._client.register_script(_READ)
        self._claim = self._client.register_script(_CLAIM)
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)
        # _lock guards _cursors, _presence, _claims and _skipped; never held over a callback.
        self._lock = threading.Lock()
        self._cursors: dict[str, _Cursor] = {}
        self._presence: dict[str, bytes] = {}  # room -> this node's members, as written
        self._claims: dict[tuple[str, str], str] = {}  # (room, name) -> token
        self._skipped: set[str] = set()  # what _decode skipped, each logged once
        self._reading = False  # the last XREAD answered (reader thread writes it)
        self._failures = 0  # failed reads in the current outage (reader thread only)
        self._backoff = ExponentialBackoff(cap=RECONNECT_CAP_S, base=RECONNECT_FIRST_S)
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="streams-reader", daemon=True)
        self._heart = threading.Thread(target=self._heartbeat_loop, name="streams-heartbeat", daemon=True)

    # Keys.

    def _room_key(self, room: str, part: str) -> str:
        return f"{self.prefix}:room:{room}:{part}"

    def _room_keys(self, room: str) -> list[str]:
        return [self._room_key(room, "epoch"), self._room_key(room, "seq"), self._room_key(room, "stream")]

    @property
    def _node_key(self) -> str:
        return f"{self.prefix}:node:{self.node_id}"

    # Life.

    @property
    def state(self) -> str:
        """For /healthz: "ok" while the reader's reads are answered, else "reconnecting"."""
        return "ok" if self._reading else "reconnecting"

    def check(self) -> None:
        """Raise Unavailable unless Redis answers now (at start, before taking clients).

        The check is the node's first heartbeat: a node is alive to the
        others before its first client joins, not only once the presence
        writer or the heartbeat gets to it. It also says whether this Redis
        can keep --redis-retention (``_check_version``).
        """
        self._call(self._client.set, self._node_key, b"1", px=self.presence_ttl_ms)
        self._check_version()

    def _check_version(self) -> None:
        """Warn if this Redis cannot trim by time: --redis-retention is then the last MAX_ENTRIES alone."""
        version = self._call(self._client.info, "server").get("redis_version", "")
        if not trims_by_time(str(version)):
            log.warning("redis %s is version %s: --redis-retention needs %d.%d or later; until then each room's "
                        "stream keeps its last %d entries alone", self.url, version, *TRIMS_BY_TIME_SINCE,
                        self.max_entries)

    def start(self) -> None:
        self._reader.start()
        self._heart.start()

    def close(self, deadline: float) -> None:
        """Stop both threads and leave presence and the names held, by ``deadline`` (monotonic) at most.

        Leaving is a courtesy (the TTL would drop them anyway), so a Redis
        that does not answer costs at most COMMAND_TIMEOUT_S of it.
        """
        self._stop.set()
        for thread in (self._reader, self._heart):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        if deadline - time.monotonic() > COMMAND_TIMEOUT_S:
            with self._lock:
                rooms, claims = list(self._presence), list(self._claims.items())
            try:
                pipe = self._client.pipeline(transaction=False)
                pipe.delete(self._node_key, *(self._room_key(room, f"presence:{self.node_id}") for room in rooms))
                for room in rooms:
                    pipe.srem(self._room_key(room, "nodes"), self.node_id)
                for (room, name), token in claims:
                    self._release(keys=[self._room_key(room, f"name:{name}")], args=[self._holder(token)],
                                  client=pipe)
                pipe.execute()
            except redis.RedisError as exc:
                log.info("redis %s: presence not cleared at close (%s); it expires within %.0f s",
                         self.url, exc, self.presence_ttl_ms / 1000)
        self._client.connection_pool.disconnect()
        self._reader_client.close()

    def _call(self, command, *args, **kwargs):
        try:
            return command(*args, **kwargs)
        except redis.RedisError as exc:
            raise Unavailable(f"redis {self.url}: {exc}") from None

    # Messages.

    def publish(self, room: str, fields: Mapping[str, bytes | str], message: bool = True) -> MessageId:
        """Append a message (or a note, see Entry) to ``room``; its id, the same on every node.

        Unavailable if Redis does not answer.
        """
        (answer,) = self.publish_many([(room, fields, message)])
        if isinstance(answer, Unavailable):
            raise answer
        return answer

    def publish_many(self, items: list[tuple[str, Mapping[str, bytes | str], bool]]) -> list[MessageId | Unavailable]:
        """Append each ``(room, fields, message)``, in this order, in one round trip; each one's id or why not.

        One script appends them all, in order, so a burst costs one round
        trip and keeps its order. Not a transaction: one append refused (a
        key of the wrong type) does not refuse the others. Unavailable, for
        all of them, if Redis does not answer.
        """
        keys: list[str] = []
        rooms: dict[str, bytes] = {}  # room -> the index of its first key, 1-based (Lua's)
        shapes: dict[tuple, bytes] = {}  # field names -> their list's index, likewise
        entries: list = []
        for room, fields, message in items:
            k = rooms.get(room)
            if k is None:
                k = rooms[room] = b"%d" % (len(keys) + 1)
                keys += self._room_keys(room)
            shape = tuple(fields)
            s = shapes.get(shape)
            if s is None:
                s = shapes[shape] = b"%d" % (len(shapes) + 1)
            entries += (k, _SEQ if message else _AFTER, s, *fields.values())
        args = [new_epoch(), self.max_entries, self.cap_entries, self.retain_ms, ENVELOPE_VERSION, len(shapes)]
        for shape in shapes:
            args += (len(shape), *shape)
        # One script for the whole burst (the library loads it again if a
        # restarted Redis lost it: a missing script ran nothing): a pipeline
        # of one script per entry cost the publishing node most of its time
        # in redis-py, packing and parsing each command.
        replies = self._call(self._publish, keys=keys, args=args + entries)
        return [MessageId(r[0].decode(), r[1]) if len(r) == 3 else Unavailable(f"redis {self.url}: {r[0].decode()}")
                for r in replies]

    def follow(self, room: str, history: int) -> Replay:
        """Start delivering ``room`` after its last ``history`` entries, which come back here.

        Following a room already followed returns its history without
        moving the reader. Unavailable if Redis does not answer.
        """
        epoch, last, top, raw = self._call(self._read, keys=self._room_keys(room),
                                           args=[new_epoch(), min(history, self.max_entries)])
        epoch = epoch.decode()
        entries = []
        for _, flat in reversed(raw):
            entry = self._decode(room, flat)
            if entry is not None and entry.id.epoch == epoch:
                entries.append(entry)
        key = self._room_key(room, "stream").encode()
        with self._lock:
            if room not in self._cursors:
                self._cursors[room] = _Cursor(key, top, epoch, last)
        return Replay(epoch, last, entries)

    def unfollow(self, room: str) -> None:
        """Deliver nothing more of ``room``; its stream stays in Redis for the other nodes."""
        with self._lock:
            self._cursors.pop(room, None)

    def _decode(self, room: str, flat: list[bytes]) -> Entry | None:
        """The entry from its fields as Redis sends them (name, value, ...), or None for an envelope
        this node does not speak (each version logged once).

        Our scripts write the envelope's three fields first, then the
        caller's, and that layout is read without a dict of every field: an
        entry costs each node that reads it, and a node reads every entry of
        its rooms.
        """
        names = flat[6::2]
        if (len(flat) >= 6 and len(flat) % 2 == 0 and flat[:3] == _V1 and flat[4] in (_SEQ, _AFTER)
                and _OWN.isdisjoint(names)):
            values = flat[7::2]
            epoch, kind, seq = flat[3], flat[4], flat[5]
        else:
            fields = _fields(flat)
            names = [k for k in fields if k not in _OWN]
            values = [fields[k] for k in names]
            epoch, seq = fields.get(b"epoch"), None
            kind = _SEQ if _SEQ in fields else _AFTER
            if fields.get(b"v") == _VERSION:
                seq = fields.get(kind)
        if seq is not None:
            try:
                own = dict(zip(map(_NAMES.__getitem__, names), values))
                return Entry(room, MessageId(epoch.decode(), int(seq)), own, kind == _SEQ)
            except (AttributeError, ValueError):  # no epoch; UnicodeDecodeError is a ValueError
                pass
            problem = "malformed entries"
        else:  # only ever the layout read by name
            version = fields.get(b"v")
            problem = "malformed entries" if version == _VERSION else f"entries of envelope version {version!r}"
        with self._lock:
            first = problem not in self._skipped
            self._skipped.add(problem)
        if first:
            log.warning("skipping stream %s (this node speaks version %d); upgrade this node if newer",
                        problem, ENVELOPE_VERSION)
        return None

    # Reader thread.

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                cursors = dict(self._cursors)
            try:
                if cursors:
                    streams = {c.key: c.stream_id for c in cursors.values()}
                    reply = self._reader_client.xread(streams, count=READ_COUNT, block=READ_BLOCK_MS)
                else:
                    self._reader_client.ping()
                    reply = []
                    self._stop.wait(READ_BLOCK_MS / 1000)
            except redis.RedisError as exc:
                if self._failures == 0:  # one error line per outage
                    log.error("redis %s unreachable: %s; catching up once it is back", self.url, exc)
                self._reading = False
                self._failures += 1
                self._stop.wait(self._backoff.compute(self._failures))
                continue
            if self._failures:
                log.info("redis %s is back; catching up from the last entries delivered", self.url)
                self._failures = 0
                try:
                    self._check_version()  # a node started without Redis (--redis-optional) meets it here
                except Unavailable as exc:
                    log.debug("version check failed: %s", exc)
            self._reading = True
            by_key = {c.key: (room, c) for room, c in cursors.items()}
            # Looked up without _lock, once an entry: a stale answer delivers one
            # entry more, as an unfollow that came right after the lookup would.
            following = self._cursors
            for key, entries in reply or ():
                room, cursor = by_key[key]
                for stream_id, flat in entries:
                    if following.get(room) is not cursor:
                        break  # unfollowed meanwhile
                    try:
                        self._deliver(room, cursor, stream_id, flat)
                    except Exception:  # the caller's callback failed: the room goes on
                        log.exception("delivering an entry of room %s failed", room)
            if reply:
                self._on_read()

    def _deliver(self, room: str, cursor: _Cursor, stream_id: bytes, flat: list[bytes]) -> None:
        cursor.stream_id = stream_id
        entry = self._decode(room, flat)
        if entry is None:
            fields = _fields(flat)
            seq = fields.get(b"seq", b"")
            if fields.get(b"epoch", b"").decode() == cursor.epoch and seq.isdigit():
                cursor.seq = int(seq)  # a message all the same: not a gap later
            return
        epoch, seq = entry.id
        before = seq - 1 if entry.message else seq  # the SEQ the last message before it had
        if epoch != cursor.epoch:
            self._on_gap(room, epoch, None)
        elif before > cursor.seq:
            self._on_gap(room, epoch, before - cursor.seq)
        cursor.epoch, cursor.seq = epoch, seq
        self._on_entry(entry)

    # Presence and names.

    def set_presence(self, room: str, users: list[str], anonymous: int) -> None:
        """This node's members of ``room`` now; kept alive by the heartbeat, shown by ``presence``.

        Written at once when Redis answers, else by the next heartbeat.
        """
        key = self._room_key(room, f"presence:{self.node_id}")
        value = json.dumps({"users": users, "anonymous": anonymous}).encode()
        with self._lock:
            if users or anonymous:
                self._presence[room] = value
            else:
                self._presence.pop(room, None)
        pipe = self._client.pipeline(transaction=False)
        if users or anonymous:
            pipe.set(self._node_key, b"1", px=self.presence_ttl_ms)
            pipe.set(key, value, px=self.presence_ttl_ms)
            pipe.sadd(self._room_key(room, "nodes"), self.node_id)
            pipe.zadd(self._rooms_key, {room: self._lapses_ms()})
        else:
            pipe.delete(key)
            pipe.srem(self._room_key(room, "nodes"), self.node_id)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("presence of %s not written now (%s); the heartbeat will", room, exc)

    @property
    def _rooms_key(self) -> str:
        return f"{self.prefix}:rooms"

    def _lapses_ms(self) -> int:
        """When what this node writes of its rooms now lapses unless the heartbeat renews it, in ms."""
        return int(time.time() * 1000) + self.presence_ttl_ms

    def rooms(self, others: bool = False) -> dict[str, tuple[int, int]]:
        """Every room some live node (``others``: but this one) has members in: name -> (named, anonymous).

        Three round trips whatever the number of rooms. Unavailable if Redis does not answer.
        """
        pipe = self._client.pipeline(transaction=False)
        pipe.zremrangebyscore(self._rooms_key, "-inf", int(time.time() * 1000))
        pipe.zrange(self._rooms_key, 0, -1)
        names = [name.decode() for name in self._call(pipe.execute)[1]]
        pipe = self._client.pipeline(transaction=False)
        for room in names:
            pipe.smembers(self._room_key(room, "nodes"))
        sets = self._call(pipe.execute)
        wanted = [(room, self._nodes(nodes, others)) for room, nodes in zip(names, sets, strict=True)]
        pipe = self._client.pipeline(transaction=False)
        for room, nodes in wanted:
            if nodes:
                for keys in self._presence_keys(room, nodes):
                    pipe.mget(keys)
        answers = iter(self._call(pipe.execute))
        counts = {}
        for room, nodes in wanted:
            if not nodes:
                continue
            members, _ = self._live(nodes, next(answers), next(answers))
            if members:
                counts[room] = (sum(len(m["users"]) for m in members), sum(m["anonymous"] for m in members))
        return counts

    def presence(self, room: str, others: bool = False) -> tuple[list[str], int]:
        """Every live node's members of ``room`` (``others``: but this node's): (sorted names, anonymous count).

        Unavailable if Redis does not answer.
        """
        nodes_key = self._room_key(room, "nodes")
        nodes = self._nodes(self._call(self._client.smembers, nodes_key), others)
        if not nodes:
            return [], 0
        beats, held = self._presence_keys(room, nodes)
        members, lapsed = self._live(nodes, self._call(self._client.mget, beats), self._call(self._client.mget, held))
        for node in lapsed:
            self._call(self._client.srem, nodes_key, node)
        return sorted(name for m in members for name in m["users"]), sum(m["anonymous"] for m in members)

    def _nodes(self, members: set[bytes], others: bool) -> list[str]:
        """A room's ``nodes`` set as node ids, sorted; ``others``: but this node."""
        return sorted(node for node in (m.decode() for m in members) if not (others and node == self.node_id))

    def _presence_keys(self, room: str, nodes: list[str]) -> tuple[list[str], list[str]]:
        """Each of ``nodes``' heartbeat key, and its presence key for ``room``."""
        return [f"{self.prefix}:node:{n}" for n in nodes], [self._room_key(room, f"presence:{n}") for n in nodes]

    @staticmethod
    def _live(nodes: list[str], beats: list, held: list) -> tuple[list[dict], list[str]]:
        """The members of each node whose heartbeat and presence are there, decoded; and those whose
        are not (it died, or left)."""
        members, lapsed = [], []
        for node, beat, value in zip(nodes, beats, held, strict=True):
            if beat is None or value is None:
                lapsed.append(node)
            else:
                members.append(json.loads(value))
        return members, lapsed

    def claim(self, room: str, name: str, token: str) -> bool:
        """Hold ``name`` in ``room`` across nodes under ``token``; False if another token holds it.

        The same token takes the name over (a resume, even from a node that
        died). The heartbeat renews it until ``release``. Unavailable if
        Redis does not answer.
        """
        held = self._call(self._claim, keys=[self._room_key(room, f"name:{name}")],
                          args=[token, self._holder(token), self.presence_ttl_ms])
        if held:
            with self._lock:
                self._claims[(room, name)] = token
        return bool(held)

    def release(self, room: str, name: str, token: str) -> None:
        """Free ``name`` if this node still holds it under ``token`` (a resume elsewhere may have taken it).

        Call it when the name leaves the room on this node, not when a
        connection replaced by a resume on this node closes: the claim is
        the resumed one's now.
        """
        with self._lock:
            if self._claims.get((room, name)) == token:
                del self._claims[(room, name)]
        try:
            self._release(keys=[self._room_key(room, f"name:{name}")], args=[self._holder(token)])
        except redis.RedisError as exc:
            log.debug("name claim not released now (%s); it expires within %.0f s", exc,
                      self.presence_ttl_ms / 1000)

    def _holder(self, token: str) -> str:
        return f"{token} {self.node_id}"

    # Heartbeat thread.

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            with self._lock:
                presence, claims = dict(self._presence), list(self._claims.items())
            pipe = self._client.pipeline(transaction=False)
            pipe.set(self._node_key, b"1", px=self.presence_ttl_ms)
            lapses = self._lapses_ms()
            for room, value in presence.items():
                pipe.set(self._room_key(room, f"presence:{self.node_id}"), value, px=self.presence_ttl_ms)
                pipe.sadd(self._room_key(room, "nodes"), self.node_id)
                pipe.zadd(self._rooms_key, {room: lapses})
            for (room, name), token in claims:
                self._renew(keys=[self._room_key(room, f"name:{name}")],
                            args=[self._holder(token), self.presence_ttl_ms], client=pipe)
            try:
                renewed = pipe.execute()[1 + 3 * len(presence):]
            except redis.RedisError as exc:
                log.debug("heartbeat failed: %s", exc)
                continue
            for ((room, name), token), held in zip(claims, renewed):
                if not held:
                    with self._lock:
                        lost = self._claims.get((room, name)) == token
                        if lost:
                            del self._claims[(room, name)]
                    if lost:
                        log.info("name %s in room %s is held elsewhere now", name, room)
                        self._on_name_lost(room, name)


def trims_by_time(version: str) -> bool:
    """Whether a Redis of ``version`` ("7.0.15") has XTRIM MINID and LIMIT; an unreadable one is taken to."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= TRIMS_BY_TIME_SINCE


def _fields(flat: list[bytes]) -> dict[bytes, bytes]:
    """An entry's fields by name, from Redis's flat list of names and values."""
    return dict(zip(flat[::2], flat[1::2]))


class _Packer:
    """Commands packed by hiredis alone, in C, for the connections that publish.

    redis-py's own packer hands each argument to its encoder in Python
    before hiredis packs them: 8-9 % of the publishing node's time at ten
    thousand entries a second (a publish batch has about ten arguments an
    entry). hiredis encodes str, int, float and bytes itself, the only
    arguments this module sends.
    """

    def pack(self, *args) -> list[bytes]:
        command = args[0]
        if isinstance(command, str) and " " in command:  # redis-py's "CLIENT SETNAME" and the like
            args = (*command.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # what redis-py's packer raises for an argument it cannot send
            raise redis.DataError(str(exc)) from None


class _Names(dict):
    """Field names, decoded once each: a room's entries share a handful of them.

    Bounded, since any writer to the stream can add names. Any thread that
    decodes an entry may add one: two that race store the same text.
    """

    def __missing__(self, name: bytes) -> str:
        text = name.decode()
        if len(self) < MAX_FIELD_NAMES:
            self[name] = text
        return text


_NAMES = _Names()
