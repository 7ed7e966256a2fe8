"""Hypothesis-driven frame sequences, valid and not, from several raw connections at once.

One server lives through every example. Each example opens one to three raw
connections and sends, interleaved, sequences of frames drawn at random:
whole messages cut into fragments with control frames between them, frames
with random opcode, FIN, RSV, mask and length, close frames with valid and
invalid codes and reasons; each connection then closes, or hangs up mid-frame.

A model of RFC 6455 (with the few leniencies noted in ``expected_outcomes``)
predicts, per connection, the server's close code, its pongs and which
messages reach everyone. Throughout, the server must not die, a watcher must
keep receiving (a probe every few examples) and, at the end, the server's
thread count must be back to where it started.
"""

from __future__ import annotations

import codecs
import itertools
import socket
import struct
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from support.process import module_server
from support.rawws import (
    CONTROL_OPCODES, KNOWN_OPCODES, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, SENDABLE_CLOSE_CODES,
    PeerClosed, RawWS, Timeout, assert_chat_works, build_frame, settled_stats, wait_baseline,
)
from support.wsclients import Watcher

MAX_SIZE = 1000  # the fuzz server's --max-message-size
EXAMPLES = 400
PROBE_EVERY = 10
WAIT = 5.0


# What a connection sends.


@dataclass
class Spec:
    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    mask: bool = True
    length: int | None = None  # a header claiming this many bytes, sent alone

    @property
    def announced(self) -> int:
        return len(self.payload) if self.length is None else self.length

    def wire(self) -> bytes:
        if self.length is not None:
            return build_frame(self.opcode, b"", fin=self.fin, rsv=self.rsv, mask=self.mask, length=self.length)
        return build_frame(self.opcode, self.payload, fin=self.fin, rsv=self.rsv, mask=self.mask)


@dataclass
class Plan:
    frames: list[Spec]
    ending: str  # "close": a close 1000 frame; "hangup": half a header, then EOF


_small = st.binary(max_size=40) | st.text(max_size=20).map(str.encode)
_near_limit = st.integers(MAX_SIZE - 30, MAX_SIZE + 30).map(lambda n: b"a" * n)
_payload = st.one_of(_small, _small, _small, _near_limit)
_control_payload = st.binary(max_size=125) | st.integers(126, 130).map(lambda n: b"c" * n)


@st.composite
def control_frames(draw) -> Spec:
    return Spec(draw(st.sampled_from([OP_PING, OP_PING, OP_PONG])), draw(_control_payload),
                fin=draw(st.sampled_from([True] * 9 + [False])))


@st.composite
def message(draw) -> list[Spec]:
    """A message in 1-4 fragments (cut anywhere, even inside a character), control frames between."""
    opcode = draw(st.sampled_from([OP_TEXT, OP_TEXT, OP_BINARY]))
    body = draw(_payload)
    parts = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), min_size=parts - 1, max_size=parts - 1)))
    bounds = [0, *cuts, len(body)]
    frames = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if i and draw(st.integers(0, 3)) == 0:
            frames.append(draw(control_frames()))
        frames.append(Spec(OP_CONT if i else opcode, body[a:b], fin=i == parts - 1))
    return frames


@st.composite
def raw_frame(draw) -> list[Spec]:
    """Anything at all in the header."""
    length = draw(st.sampled_from([None] * 12 + [2 ** 63, 2 ** 63 - 1, 2 ** 64 - 1, MAX_SIZE + 1]))
    return [Spec(
        opcode=draw(st.integers(0, 15)),
        payload=draw(_payload),
        fin=draw(st.booleans()),
        rsv=draw(st.sampled_from([0] * 8 + list(range(1, 8)))),
        mask=draw(st.sampled_from([True] * 9 + [False])),
        length=length,
    )]


@st.composite
def close_frame(draw) -> list[Spec]:
    kind = draw(st.sampled_from(["code", "code", "empty", "one-byte"]))
    if kind == "empty":
        payload = b""
    elif kind == "one-byte":
        payload = b"\x03"
    else:
        code = draw(st.sampled_from(sorted(SENDABLE_CLOSE_CODES) + [3000, 4999, 0, 999, 1004, 1005, 1006, 1015, 2999, 5000]))
        reason = draw(st.text(max_size=20).map(str.encode) | st.sampled_from([b"\xff", b"ok \xe2\x82"]))
        payload = struct.pack("!H", code) + reason
    return [Spec(OP_CLOSE, payload)]


plans = st.builds(
    lambda actions, ending: Plan([f for action in actions for f in action], ending),
    st.lists(st.one_of(message(), message(), raw_frame(), control_frames().map(lambda f: [f]), close_frame()),
             max_size=5),
    st.sampled_from(["close", "close", "close", "hangup"]),
)


# What the server should make of it.


@dataclass
class Outcome:
    codes: set  # acceptable: an int close code, "empty" for an empty close frame, None for no close frame
    pongs_min: list[bytes]
    pongs_max: list[bytes]  # pongs received must be a prefix of this, at least pongs_min long
    delivered: list[tuple[int, bytes]]  # (opcode, tagged payload) of messages that reach everyone
    note: str = ""


def _close_codes(payload: bytes) -> tuple[set, object]:
    """(violation codes, echo) for a close frame's payload."""
    if not payload:
        return set(), "empty"
    if len(payload) == 1:
        return {1002}, None
    code = struct.unpack("!H", payload[:2])[0]
    bad = set()
    if not (code in SENDABLE_CLOSE_CODES or 3000 <= code <= 4999):
        bad.add(1002)
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        bad.add(1007)
    return bad, code


@dataclass
class _State:
    frag: int | None = None  # opcode of the message being reassembled
    size: int = 0
    decoder: object = None
    parts: list = field(default_factory=list)


def _protocol_step(state: _State, f: Spec, control_budget: bool):
    """The RFC 6455 checks on one frame: (codes, echo) if it ends the connection, else None."""
    codes = set()
    if f.opcode not in KNOWN_OPCODES:
        codes.add(1002)
    if not f.mask:
        codes.add(1002)
    control = f.opcode in CONTROL_OPCODES
    budget = MAX_SIZE - state.size if state.frag is not None and (control_budget or not control) else MAX_SIZE
    if f.announced > budget:
        codes.add(1009)
    if f.rsv:
        codes.add(1002)
    if control and (f.announced > 125 or not f.fin):
        codes.add(1002)
    if codes:
        return codes, None
    if f.opcode in (OP_TEXT, OP_BINARY) and state.frag is not None:
        return {1002}, None
    if f.opcode == OP_CONT and state.frag is None:
        return {1002}, None
    if f.opcode == OP_CLOSE:
        codes, echo = _close_codes(f.payload)
        if state.frag is not None:
            codes.add(1002)
        return (codes, None) if codes else (set(), echo)
    return None


def _model(frames: list[Spec], ending: str, control_budget: bool) -> Outcome:
    state = _State()
    pongs: list[bytes] = []
    delivered: list[tuple[int, bytes]] = []
    failed_utf8 = False
    strict_pongs: list[bytes] = []
    for f in frames:
        end = _protocol_step(state, f, control_budget)
        if end is not None:
            codes, echo = end
            if failed_utf8:
                # The protocol layer got this far in the same recv: it may have
                # answered with this instead of our 1007 (see test_wire).
                return Outcome({1007, *(codes or {echo})}, strict_pongs, pongs, delivered, "utf8+batch")
            return Outcome(codes or {echo}, pongs, pongs, delivered)
        if f.opcode == OP_PING:
            pongs.append(f.payload)
            continue
        if f.opcode == OP_PONG:
            continue
        # A data frame the protocol accepts.
        if f.opcode != OP_CONT:
            state.frag = f.opcode
            state.size = 0
            state.parts = []
            state.decoder = codecs.getincrementaldecoder("utf-8")() if f.opcode == OP_TEXT else None
        state.size += len(f.payload)
        state.parts.append(f.payload)
        if not failed_utf8 and state.decoder is not None:
            try:
                state.decoder.decode(f.payload, f.fin)
            except UnicodeDecodeError:
                failed_utf8 = True
                strict_pongs = list(pongs)
        if f.fin:
            if not failed_utf8:
                delivered.append((state.frag, b"".join(state.parts)))
            state.frag = None
            state.size = 0
    # Only a hangup gets here: no close frame, the server just ends too.
    assert ending == "hangup"
    if failed_utf8:
        return Outcome({1007, None}, strict_pongs, pongs, delivered, "utf8+eof")
    return Outcome({None}, pongs, pongs, delivered)


def expected_outcomes(frames: list[Spec], ending: str) -> list[Outcome]:
    """What the server may do: the RFC, or websockets' reading of the size limit.

    websockets applies a message's remaining --max-message-size budget to
    control frames between its fragments too (see test_wire's
    test_ping_inside_a_max_size_message_is_answered); both readings pass
    here, so that the fuzz looks for new failures.
    """
    return [_model(frames, ending, control_budget=False), _model(frames, ending, control_budget=True)]


# Running one connection.


@dataclass
class Observed:
    closes: list = field(default_factory=list)  # close codes ("empty" for no payload)
    pongs: list[bytes] = field(default_factory=list)
    after_close: list = field(default_factory=list)
    eof: bool = False


_tags = itertools.count()


def tag_messages(frames: list[Spec]) -> set[bytes]:
    """Put a unique ASCII tag at the start of every message, to find it at the watcher."""
    tags = set()
    for f in frames:
        if f.opcode in (OP_TEXT, OP_BINARY) and f.length is None:
            tag = f"#{next(_tags)}#".encode()
            f.payload = tag + f.payload
            tags.add(tag)
    return tags


def outcome_ok(obs: Observed, outcome: Outcome) -> bool:
    code = obs.closes[0] if obs.closes else None
    return (code in outcome.codes
            and len(obs.closes) <= 1
            and len(outcome.pongs_min) <= len(obs.pongs) <= len(outcome.pongs_max)
            and obs.pongs == outcome.pongs_max[:len(obs.pongs)])


fuzz_server = module_server("fuzz_server", "--max-message-size", str(MAX_SIZE), "--ping-interval", "0")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fuzz_frames(fuzz_server):
    server = fuzz_server
    pid = server.proc.pid
    with Watcher(server.url, max_size=None) as watcher:
        assert_chat_works(server.url, watcher, server=server)
        baseline = settled_stats(pid)
        examples = itertools.count(1)
        forbidden: set[bytes] = set()  # tags of messages that must never be relayed
        started = time.monotonic()

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                  phases=[Phase.generate, Phase.shrink], report_multiple_bugs=False, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example])
        @given(st.lists(plans, min_size=1, max_size=3))
        def example(conn_plans: list[Plan]) -> None:
            n = next(examples)
            conns, wires, outcomes, tags = [], [], [], []
            try:
                for plan in conn_plans:
                    frames = [Spec(**vars(f)) for f in plan.frames]  # a copy: hypothesis may reuse plans
                    tags.append(tag_messages(frames))
                    if plan.ending == "close":
                        frames.append(Spec(OP_CLOSE, struct.pack("!H", 1000)))
                    wires.append([f.wire() for f in frames])
                    outcomes.append(expected_outcomes(frames, plan.ending))
                    conns.append(RawWS.connect(server.port, timeout=WAIT))
                # Interleave the connections frame by frame.
                for i in range(max(map(len, wires))):
                    for conn, wire in zip(conns, wires):
                        if i < len(wire):
                            try:
                                conn.send_raw(wire[i], timeout=WAIT)
                            except OSError:
                                pass  # the server already gave up on this one; its answer is read below
                # Hang-ups: half a header, then EOF. Let what the server owes
                # (pongs, a close frame) arrive first: it can be lost to a client
                # that half-closes at once, a known bug covered by test_wire's
                # test_client_that_half_closes_still_gets_the_servers_answer.
                for conn, plan, options in zip(conns, conn_plans, outcomes):
                    if plan.ending == "hangup":
                        _await_answers(conn, min(len(o.pongs_min) for o in options),
                                       not any(None in o.codes for o in options))
                        try:
                            conn.send_raw(b"\x81", timeout=WAIT)
                            conn.sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                observed = [_observe(conn) for conn in conns]
            finally:
                for conn in conns:
                    conn.close()
            assert server.proc.poll() is None, "the server died"

            for k, (obs, options) in enumerate(zip(observed, outcomes)):
                assert obs.eof, f"connection {k}: the server never ended it"
                assert not obs.after_close, f"connection {k}: frames after the close: {obs.after_close}"
                matching = [o for o in options if outcome_ok(obs, o)]
                assert matching, (f"connection {k}: got close {obs.closes} pongs {obs.pongs}; "
                                  f"expected one of {[(o.codes, o.pongs_min, o.pongs_max, o.note) for o in options]}; "
                                  f"frames {conn_plans[k].frames} ending {conn_plans[k].ending}")
                # What the connection completed before it failed reaches everyone.
                # With two readings of the rules, only what both deliver is required.
                must = [m for m in matching[0].delivered if all(m in o.delivered for o in matching)]
                for opcode, payload in must:
                    want = payload.decode() if opcode == OP_TEXT else payload
                    watcher.wait_for(lambda msgs, w=want: w in msgs, WAIT, f"message {payload[:30]!r}")
                may = {_tag(payload) for o in options for _, payload in o.delivered}
                forbidden.update(tags[k] - may)
            if n % PROBE_EVERY == 0:
                assert_chat_works(server.url, watcher, server=server)

        example()
        elapsed = time.monotonic() - started
        assert_chat_works(server.url, watcher, server=server)
        relayed = {_tag(m if isinstance(m, bytes) else m.encode()) for m in watcher.messages}
        leaked = forbidden & relayed
        assert not leaked, f"messages relayed that should have failed: {sorted(leaked)[:10]}"
        after = wait_baseline(pid, baseline, timeout=WAIT)
        print(f"\nfuzz: {next(examples) - 1} examples in {elapsed:.1f}s; watcher got {len(watcher.messages)} "
              f"messages; server baseline {baseline}, after {after}")
    assert server.proc.poll() is None
    assert "Traceback" not in server.log, server.log[-3000:]


def _await_answers(conn: RawWS, pongs: int, close: bool) -> None:
    """Read until ``pongs`` pongs (and a close frame, if ``close``) came; keep the frames for _observe."""
    seen = []
    try:
        while (sum(f.opcode == OP_PONG for f in seen) < pongs
               or close and not any(f.opcode == OP_CLOSE for f in seen)):
            seen.append(conn.recv_frame(WAIT))
            if seen[-1].opcode == OP_CLOSE:
                break
    except (Timeout, PeerClosed):
        pass
    conn.backlog[:0] = seen


def _observe(conn: RawWS) -> Observed:
    obs = Observed()
    try:
        for frame in conn.wait_eof(WAIT):
            if obs.closes:
                obs.after_close.append(frame)
            elif frame.opcode == OP_CLOSE:
                obs.closes.append(frame.close_code if frame.payload else "empty")
            elif frame.opcode == OP_PONG:
                obs.pongs.append(frame.payload)
        obs.eof = True
    except (Timeout, PeerClosed):
        pass
    return obs


def _tag(message: bytes) -> bytes:
    return message[:message.index(b"#", 1) + 1] if message.startswith(b"#") and b"#" in message[1:] else b""
