"""Interactive chat client for a broadcast server.

Two threads share one WebSocket: the main thread reads what the user types (or
what is piped in) and sends it; a reader thread shows what arrives. At a
terminal the main thread sits in prompt_toolkit's prompt, and the reader
prints through ``patch_stdout``, which hands each line to the prompt's event
loop to print above the prompt and redraw it whole: the typed text, the
cursor and a reverse search survive every message.

The main thread spends its life blocked reading input, which nothing but a
signal interrupts, so when the server goes away the reader thread records why
and sends SIGINT to the main thread until it stops reading input. A SIGINT
handler that raises KeyboardInterrupt once, and then ignores SIGINT, gives the
user's Ctrl+C and the reader's signal one single path out, and no second
signal can land while the client is closing. Inside prompt_toolkit's prompt
it raises nothing: an exception at any point there could cut its event
loop's making or closing short, so the prompt is told to end instead, as
its own Ctrl+C ends it (``Session._on_signal``).

A server that speaks ``broadcast.v1`` sends JSON objects with ids: the reader
shows them as the same lines a plain-text server sends, keeps the last id,
and when the connection is lost (or the server restarts) it reconnects by
itself with ``?since=`` that id, so the session carries on with nothing
missed or doubled. The main thread meanwhile holds its next line until the
new connection is up. A server that does not select the subprotocol (an
older one, the Go original) gets today's plain text, and no reconnection:
without ids, a reconnected session could not say what it missed.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import io
import json
import os
import random
import signal
import ssl
import sys
import termios
import threading
import time
from urllib.parse import quote, urlsplit, urlunsplit

from prompt_toolkit import PromptSession
from prompt_toolkit.data_structures import Size
from prompt_toolkit.output import ColorDepth, create_output
from prompt_toolkit.output.vt100 import Vt100_Output
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.renderer import print_formatted_text as render_fragments
from prompt_toolkit.styles import Style
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, InvalidStatus, InvalidURI
from websockets.frames import CLOSE_CODE_EXPLANATIONS
from websockets.sync.client import connect

from broadcast.chat.app import ONLINE_HEADER, SESSION_HEADER
from broadcast.chat.names import room_problem
from broadcast.chat.structured import SUBPROTOCOL, gap_line
from broadcast.config import parse_client_args
from broadcast.net.limits import LIMITS_HEADER, TokenBucket, parse_limits_header
from broadcast.redact import redact_url

PROG = "broadcast-client"
PROMPT = "> "
WS_PATH = "/ws"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8080  # the server's default --port
CLOSE_TIMEOUT_S = 2.0  # to wait for the server's reply to our close frame
SIGNAL_REPEAT_S = 0.2  # between SIGINTs until the main thread stops reading input
WHO_TIMEOUT_S = 5.0  # for /who's question to an older server's /healthz
WHO_BODY_BYTES = 4096  # /healthz answers a few dozen bytes; a hostile server gets no more read
CLEAN_CLOSE_CODES = {1000, 1001}  # normal closure, going away
# A structured server sends the history, then a presence object, then live
# messages: what we send waits for the presence (at most this long) so that
# our own echo is never taken for a replayed line of the same text.
JOIN_WAIT_S = 5.0
# Close codes after which the server wants us back: going away (a restart),
# internal error, service restart, try again later. Any other code (1000,
# 1008 policy, 4000 replaced by our own new connection) ends the session.
RESUME_CLOSE_CODES = {1001, 1011, 1012, 1013}
KEEPALIVE_CLOSE_CODE = 1011  # what we send ourselves when the server stops answering pings: a lost connection
# Reconnection backoff: the first try comes soon (a cut connection is often
# back at once), each later one waits twice as long up to the cap (a server
# that is down for minutes is found within RECONNECT_MAX_DELAY_S of its
# return), and each wait is drawn from its upper half, so that all the
# clients of a restarted server do not come back in the same instant.
RECONNECT_FIRST_DELAY_S = 0.5
RECONNECT_MAX_DELAY_S = 10.0
RECONNECT_BACKOFF_FACTOR = 2.0
PRESENCE_REQUEST = '{"kind":"presence"}'  # what /who asks a broadcast.v1 server
# A timestamp past this (the year 9999) would make time.localtime fail: a
# hostile server's ts must not end the session.
MAX_TS_S = 253402300799.0
SHOWN_KINDS = {"message", "history", "join", "leave", "presence"}  # gap and error are told apart
# Whatever a server says in an error or a close reason is cut to this, so a
# hostile one cannot fill the screen with a single line.
ERROR_TEXT_CHARS = 200
CONTINUATION_INDENT = "  "  # marks the second and later lines of one message
# The server's clock starts when our message arrives, not when we sent it, so
# two sends can land closer than we spaced them: pace a tenth slower, with one
# message less of burst.
PACE_RATE_FACTOR = 0.9
# Other people's messages reach a terminal: escape sequences in them could
# move the cursor, retitle the window or hide text, so control characters
# (C0 but tab, DEL, C1) are shown as \xNN instead.
_VISIBLE = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c != 0x09}
STYLE = Style.from_dict({
    "own": "ansibrightblack",  # what you sent, as the server echoes it
    "name": "bold ansicyan",  # [Name] before someone else's message
    "system": "ansiyellow",  # * Name joined / left
    "time": "ansibrightblack",
})
COMMANDS = {
    "/help": "list the commands",
    "/who": "who is in the room",
    "/quit": "leave (so do Ctrl+D and Ctrl+C)",
    "//text": "send /text",
}


def server_url(addr: str, username: str | None, room: str | None = None) -> str:
    """The WebSocket URL for ``--addr``, ``--username`` and ``--room``; ValueError if unusable.

    Checking host and port here turns a bad address into a usage error
    instead of a connection failure deep inside the WebSocket library.
    A bare HOST or :PORT fills in the rest from the server's defaults.
    ``room`` is a segment after the address's path, so that a server behind
    a proxy's prefix (``wss://example.org/chat/ws``) has rooms too.
    """
    scheme, sep, _ = addr.partition("://")
    if not sep:
        host, colon, port = addr.rpartition(":")
        if not colon or "]" in port:  # no port, or the end of a bare [IPv6] address
            host, port = addr, str(DEFAULT_PORT)
        addr = f"ws://{host or DEFAULT_HOST}:{port}"
    elif scheme.lower() not in ("ws", "wss"):
        raise ValueError(f"scheme must be ws or wss, not {scheme}")
    parts = urlsplit(addr)
    if not parts.hostname:
        raise ValueError("no host name")
    parts.port  # raises ValueError for a port that is not a number or out of range
    path = parts.path if parts.path not in ("", "/") else WS_PATH
    if room is not None:
        problem = room_problem(room)
        if problem:
            raise ValueError(f"invalid --room {_bounded(room)!r}: {problem}")
        path = path.rstrip("/") + "/" + room
    query = parts.query
    if username is not None:
        # quote(), not urlencode(): a space must read %20 in messages, not +.
        query = "&".join(filter(None, [query, "username=" + quote(username, safe="")]))
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, query, ""))


def _bounded(text: str) -> str:
    """Server-sent text fit for an error line: escaped, on one line, and short."""
    text = text.translate(_VISIBLE)
    return text if len(text) <= ERROR_TEXT_CHARS else text[:ERROR_TEXT_CHARS] + "..."


def _interrupt_once(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionClosed):  # cut before the request went out: websockets says so, not OSError
        return "the server hung up during the handshake"
    if isinstance(exc, InvalidMessage) and exc.__cause__ is not None:
        exc = exc.__cause__  # why the response was not valid HTTP: too long, too many headers, EOF
        if isinstance(exc, EOFError):
            return "the server hung up during the handshake"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return _bounded(text[:1].lower() + text[1:])


def _ended(exc: ConnectionClosed, max_size: int) -> tuple[int, str]:
    """The exit status and the one line that tell how the connection ended."""
    if exc.rcvd is not None:
        code, reason = exc.rcvd.code, exc.rcvd.reason
        why = f"{code} {CLOSE_CODE_EXPLANATIONS.get(code, 'unknown code')}"
        status = 0 if code in CLEAN_CLOSE_CODES else 1
        return status, f"connection closed by server: {why}" + (f" ({_bounded(reason)})" if reason else "")
    if exc.sent is not None and exc.sent.code == 1009:
        return 1, f"connection closed: the server sent a message over --max-message-size ({max_size} bytes)"
    if exc.sent is not None:
        reason = f" ({_bounded(exc.sent.reason)})" if exc.sent.reason else ""
        return 1, f"connection closed: the server broke the protocol: {exc.sent.code}{reason}"
    return 1, "connection lost: the server hung up without a close frame"


def _split_message(text: str) -> list[str]:
    """A message's lines; the one trailing newline many clients add is no line of its own."""
    return text.removesuffix("\n").split("\n")


def _frame(line: str, structured: bool) -> str:
    """What to send for ``line``: a structured server would read a line that opens with ``{`` as a request."""
    if structured and line.lstrip(" \t\r\n").startswith("{"):
        return json.dumps({"kind": "message", "text": line}, ensure_ascii=False, separators=(",", ":"))
    return line


def _said(obj: dict) -> str:
    """A message or history object as the line a plain-text server sends for it."""
    sender, text = obj.get("from"), str(obj.get("text"))
    return text if sender is None else f"[{sender}] {text}"


def _resume_line(recovered: int, gap: dict | None) -> str:
    """The one line that tells what a resumed session got back."""
    if gap is None:
        return f"reconnected; recovered {recovered} message{'' if recovered == 1 else 's'}"
    missed = gap.get("missed")
    if isinstance(missed, int):
        return f"reconnected; {missed} message{'' if missed == 1 else 's'} could not be recovered"
    return "reconnected; some messages could not be recovered"


def _lost_line(gap: dict) -> str:
    """A live gap, as the line a plain-text server sends for it."""
    missed = gap.get("missed")
    return gap_line(missed if isinstance(missed, int) else None, _bounded(str(gap.get("reason"))))


def _with_query(url: str, **params: str | None) -> str:
    """``url`` with the ``params`` that are not None added to its query."""
    parts = urlsplit(url)
    added = [f"{key}={quote(value, safe='')}" for key, value in params.items() if value is not None]
    return urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, *added]))))


def _ansi(fragments: list[tuple[str, str]]) -> str:
    """Styled text as terminal escapes, rendered by prompt_toolkit, for printing through patch_stdout."""
    buffer = io.StringIO()
    output = Vt100_Output(buffer, lambda: Size(rows=1, columns=1), default_color_depth=ColorDepth.DEPTH_8_BIT)
    render_fragments(output, fragments, STYLE)
    output.flush()
    return buffer.getvalue()


class Limits:
    """What the server's handshake response says it takes."""

    def __init__(self, headers) -> None:
        try:
            self.max_message_size, rate, burst = parse_limits_header(headers.get(LIMITS_HEADER, ""))
        except (KeyError, ValueError):  # an older or foreign server: send as before, it decides
            self.max_message_size, rate, burst = 0, 0.0, 1
        self.bucket = TokenBucket(rate * PACE_RATE_FACTOR, max(1, burst - 1)) if rate > 0 else None
        self.online = headers.get(ONLINE_HEADER)

    def pace(self) -> None:
        """Wait until the server's rate limit lets one more message through."""
        while self.bucket is not None and not self.bucket.take():
            time.sleep(1 / self.bucket.rate)


class Session:
    """What the two threads share, so that how the session ends is decided once."""

    def __init__(self, ws, url: str, args, tls: ssl.SSLContext | None, headers: list[tuple[str, str]]) -> None:
        self.url = url  # as given, without a resume's ?since= and ?session=
        self.args = args
        self.tls = tls
        self.headers = headers
        self.listen_only = args.listen_only
        self.interactive = sys.stdin.isatty() and not args.listen_only
        self.to_terminal = sys.stdout.isatty()
        self.color = self.to_terminal and not args.no_color and not os.environ.get("NO_COLOR")
        # Local notes (command output, refusals) are not part of the transcript.
        self.notes = sys.stdout if self.to_terminal else sys.stderr
        # One lock orders the screen, the end of the session and the echo FIFO;
        # it also guards the connection (ws, limits, structured, joined), which
        # the reader replaces on a reconnection, and whos.
        self.cond = threading.Condition()
        self.status: int | None = None  # exit status, once the server or a closed stdout ended it
        self.closing = False  # the user ended the session; the reader stays quiet
        # While the prompt owns the terminal, the line that tells how the
        # session ended waits here until the prompt is gone (see _settle).
        self.prompting = False
        self.last_words: str | None = None
        self.expected: collections.deque[str] = collections.deque()  # echoes of what we sent
        self.whos = 0  # presence objects owed to /who
        self.input_done = threading.Event()  # the main thread no longer reads input
        # The main thread's own, and its signal handler's (see _on_signal): the
        # prompt, whether the thread is inside it, and whether a signal came meanwhile.
        self.prompt: PromptSession | None = None
        self.in_prompt = False
        self.interrupted = False
        self.reader_done = threading.Event()
        self.stopped = threading.Event()  # the user ended the session: a reconnection stops waiting
        # The reader's own: where the session is, and what a resume has replayed so far.
        self.token: str | None = None  # the server's session token: a resume keeps our name with it
        self.last_id: str | None = None
        self.replay: list[tuple[str, float | None]] | None = None  # held until the resume's outcome is known
        self.gap: dict | None = None  # the resume's gap object, if the server sent one
        self._use(ws)

    def _use(self, ws) -> None:
        """Make ``ws`` the session's connection (under ``cond`` once the reader runs)."""
        self.ws = ws
        self.limits = Limits(ws.response.headers)
        self.structured = ws.subprotocol == SUBPROTOCOL
        self.token = ws.response.headers.get(SESSION_HEADER, self.token)
        self.joined = threading.Event()  # the history is in: what we send now is live
        if not self.structured:
            self.joined.set()

    def run(self) -> int:
        # Ends the session the way Ctrl+C does: a logger under systemd gets SIGTERM.
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        # Started inside the try: the reader may signal as soon as it runs.
        reader = threading.Thread(target=self._read, name="reader", daemon=True)
        try:
            if self.listen_only:
                reader.start()
                self.reader_done.wait()
            elif self.interactive:
                # Under `| tee log` nothing prints above the prompt: it is on stderr.
                printing = patch_stdout(raw=True) if self.to_terminal else contextlib.nullcontext()
                with _typeahead_unechoed(), printing:
                    self._note(self._connected_line())  # before the room's history
                    with self.cond:
                        self.prompting = self.to_terminal
                    reader.start()
                    self._send_input()
            else:
                reader.start()
                self._send_input()
        except KeyboardInterrupt:
            pass  # the user's Ctrl+C, or the reader saying the session is over
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self._prompt_gone()  # with the reader's repeated SIGINT ignored, so that nothing cuts it short
        self.input_done.set()
        return self._close()

    def _connected_line(self) -> str:
        who = f" as {self.args.username}" if self.args.username is not None else ""
        online = f" ({_bounded(self.limits.online)} online)" if self.limits.online else ""
        return f"connected to {redact_url(server_url(self.args.addr, None, self.args.room))}{who}{online}"

    def _lines(self):
        if not self.interactive:
            for line in sys.stdin:
                yield line.rstrip("\r\n")
            return
        # The prompt goes to whichever of stdout and stderr is the terminal:
        # under `| tee log` the typed line stays on screen and out of the log.
        output = create_output(always_prefer_tty=True)
        # A position report only sizes menus below the prompt, which we have
        # none of; a terminal that cannot answer would get a warning instead.
        output.enable_cpr = False
        self.prompt = prompt = PromptSession(PROMPT, output=output)
        while True:
            self.in_prompt = True
            try:
                # Not prompt_toolkit's SIGINT handler: it would answer each of
                # the reader's repeated signals, and end a prompt already ended.
                line = prompt.prompt(pre_run=self._prompt_started, handle_sigint=False)
            except EOFError:
                return
            finally:
                self.in_prompt = False
            if self.interrupted:
                raise KeyboardInterrupt  # it came as the line did
            yield line

    def _on_signal(self, signum, frame) -> None:
        """The user's Ctrl+C or SIGTERM, or the reader's SIGINT: the session ends, once.

        Outside the prompt it raises KeyboardInterrupt where the main thread
        is. Inside, it asks the prompt's event loop to end it; before the
        loop runs, the prompt ends as it starts (``_prompt_started``), and
        one that returns a line meanwhile is ended after it.
        """
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not self.in_prompt:
            raise KeyboardInterrupt
        self.interrupted = True
        loop = self.prompt.app.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: the prompt is returning
                loop.call_soon_threadsafe(self._end_prompt)

    def _prompt_started(self) -> None:
        if self.interrupted:
            self._end_prompt()

    def _end_prompt(self) -> None:
        """In the prompt's event loop: end it as Ctrl+C does, unless it is over already."""
        future = self.prompt.app.future
        if future is not None and not future.done():
            self.prompt.app.exit(exception=KeyboardInterrupt())

    def _send_input(self) -> None:
        for line in self._lines():
            stripped = line.strip()
            if stripped.startswith("//"):
                line = line.replace("/", "", 1)
            elif stripped.startswith("/"):
                if not self._command(stripped.split()[0]):
                    break
                continue
            if not line:
                continue
            with self.cond:
                frame, limits = _frame(line, self.structured), self.limits
            size = len(frame.encode("utf-8", "surrogateescape"))
            if limits.max_message_size and size > limits.max_message_size:
                self._note(f"not sent: the line is {size} bytes; the server takes at most "
                           f"{limits.max_message_size}")
                continue
            limits.pace()
            with self.cond:
                self.expected.append(f"[{self.args.username}] {line}" if self.args.username is not None else line)
            if not self._send(frame):
                return
        if not self.interactive:
            # Closing now could drop the echo of the last lines on the floor:
            # a pipe's output should hold what was sent.
            with self.cond:
                self.cond.wait_for(lambda: not self.expected, timeout=self.args.linger)

    def _send(self, frame: str) -> bool:
        """Send on the session's connection, waiting out a reconnection; False once the session is over."""
        while True:
            with self.cond:
                ws, joined = self.ws, self.joined
            joined.wait(JOIN_WAIT_S)
            try:
                ws.send(frame)
                return True
            except ConnectionClosed:
                # The reader says why, and reconnects or ends the session.
                with self.cond:
                    self.cond.wait_for(lambda: self.ws is not ws or self.status is not None)
                    if self.status is not None:
                        return False

    def _command(self, word: str) -> bool:
        """Run a local command; False for /quit."""
        if word == "/quit":
            return False
        if word == "/help":
            self._note("\n".join(f"{name:8} {what}" for name, what in COMMANDS.items()))
        elif word == "/who":
            with self.cond:
                structured = self.structured
                self.whos += structured  # the reader prints the presence object that answers
            if structured:
                self._send(PRESENCE_REQUEST)
            else:
                self._note(self._who())
        else:
            self._note(f"unknown command {_bounded(word)}; /help lists them")
        return True

    def _who(self) -> str:
        """The head count from the server's /healthz: an older server has no presence to ask for names."""
        parts = urlsplit(self.url)
        if parts.scheme == "wss":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=WHO_TIMEOUT_S,
                                               context=self.tls)
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=WHO_TIMEOUT_S)
        try:
            conn.request("GET", "/healthz")
            count = int(json.loads(conn.getresponse().read(WHO_BODY_BYTES))["connections"])
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as exc:
            return f"cannot ask the server who is online: {_reason(exc)}"
        finally:
            conn.close()
        return f"{count} online"

    def _note(self, text: str) -> None:
        with self.cond:
            print(text, file=self.notes, flush=True)

    def _read(self) -> None:
        try:
            while True:
                try:
                    self._receive()
                except ConnectionClosed as exc:
                    status, message = _ended(exc, self.args.max_message_size)
                    if not self._resumable(exc):
                        break
                    ended = self._reconnect(message)
                    if ended is not None:
                        status, message = ended
                        break
        except BrokenPipeError:
            # `| head -1` has what it wanted: leave quietly, as a pipe's writer should.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            status, message = 0, None
        if self._settle(status, message):
            # A signal that lands just before the main thread blocks in read()
            # or select() is only handled once that call returns: repeat it.
            while True:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                if self.input_done.wait(SIGNAL_REPEAT_S):
                    break
        self.reader_done.set()

    def _receive(self) -> None:
        """Show what arrives on the session's connection until it closes."""
        ws = self.ws  # only this thread replaces it
        while True:
            data = ws.recv()
            if isinstance(data, bytes):
                self._show(f"[binary {len(data)} bytes]")
            elif self.structured:
                self._receive_object(data)
            else:
                self._show(data)

    def _receive_object(self, data: str) -> None:
        """Show a ``broadcast.v1`` object as the line a plain-text server would have sent."""
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            self._show(data)  # not an object of ours: shown as it came (escaped at a terminal)
            return
        kind = obj.get("kind")
        if isinstance(obj.get("id"), str):
            self.last_id = obj["id"]
        ts = obj.get("ts")
        if not isinstance(ts, (int, float)) or not 0 <= ts <= MAX_TS_S:
            ts = None  # shown with the time it arrived
        if kind == "gap":
            if self.replay is None:  # live: the server lost messages of the room (cut off from its other nodes)
                self._note(_lost_line(obj))
            else:
                self.gap = obj  # told with the resume's line
            return
        if kind == "error":
            self._note(f"refused by the server: {_bounded(str(obj.get('reason')))}")
            return
        if kind not in SHOWN_KINDS:
            return  # a kind of a later version
        if kind == "history" and self.replay is not None:
            self.replay.append((_said(obj), ts))
            return
        self._resumed()
        if kind == "presence":
            self._answer_who(obj)
        elif kind in ("join", "leave"):
            self._show(f"* {obj.get('from')} {'joined' if kind == 'join' else 'left'}", ts)
        else:
            self._show(_said(obj), ts)

    def _resumed(self) -> None:
        """The first live object ends a resume's replay: say how it went, then show what it recovered."""
        if self.replay is not None:
            replay, self.replay = self.replay, None
            self._note(_resume_line(len(replay), self.gap))
            for line, ts in replay:
                self._show(line, ts)
        self.joined.set()

    def _answer_who(self, presence: dict) -> None:
        with self.cond:
            if not self.whos:
                return  # the one after the history on joining
            self.whos -= 1
        users = presence.get("users")
        names = [str(name).translate(_VISIBLE) for name in users] if isinstance(users, list) else []
        anonymous = presence.get("anonymous")
        if isinstance(anonymous, int) and anonymous:
            names.append(f"{anonymous} anonymous")
        self._note(f"in {_bounded(str(presence.get('room')))}: {', '.join(names) or 'nobody'}")

    def _resumable(self, exc: ConnectionClosed) -> bool:
        """Whether the server wants us back, or the network lost us; never after the user's own close."""
        with self.cond:
            if not self.structured or not self.args.reconnect_timeout or self.closing or self.status is not None:
                return False
        if exc.rcvd is not None:
            return exc.rcvd.code in RESUME_CLOSE_CODES
        return exc.sent is None or exc.sent.code == KEEPALIVE_CLOSE_CODE

    def _reconnect(self, why: str) -> tuple[int, str | None] | None:
        """Connect again, backing off, to resume after the last id; None once resumed, else how the session ends."""
        self._note(f"{why}; reconnecting")
        deadline = time.monotonic() + self.args.reconnect_timeout
        delay = RECONNECT_FIRST_DELAY_S
        while True:
            if self.stopped.wait(random.uniform(delay / 2, delay)):
                return 0, None  # the user ended the session; it has said so
            try:
                ws = _connect(_with_query(self.url, since=self.last_id, session=self.token),
                              self.args, self.tls, self.headers)
            except InvalidStatus as exc:
                if exc.response.status_code < 500:  # refused, not overloaded: asking again changes nothing
                    return 1, _refusal(redact_url(self.url), exc)
                reason = f"HTTP {exc.response.status_code}"
            except CONNECT_ERRORS as exc:
                reason = _reason(exc)
            else:
                return self._resume_on(ws)
            if time.monotonic() >= deadline:
                return 1, (f"{PROG}: gave up reconnecting to {redact_url(self.url)} after "
                           f"{self.args.reconnect_timeout:g} s: {reason}")
            delay = min(RECONNECT_MAX_DELAY_S, delay * RECONNECT_BACKOFF_FACTOR)

    def _resume_on(self, ws) -> tuple[int, None] | None:
        with self.cond:
            stale = self.closing
            if not stale:
                self._use(ws)
                self.replay, self.gap = ([] if self.structured else None), None
                self.cond.notify_all()
        if stale:
            ws.close()
            return 0, None
        if self.replay is None:  # the server no longer speaks broadcast.v1: no ids to resume from
            self._note(_resume_line(0, {"missed": None}))
        return None

    def _show(self, text: str, ts: float | None = None) -> None:
        with self.cond:
            own = bool(self.expected) and self.expected[0] == text
            if own:
                self.expected.popleft()
                self.cond.notify_all()
            if self.closing:
                return
            if not self.to_terminal:
                sys.stdout.write(text + "\n")  # the transcript: byte for byte
            else:
                sys.stdout.write(self._styled(text, own, ts))
            sys.stdout.flush()

    def _styled(self, text: str, own: bool, ts: float | None) -> str:
        first, *rest = (line.translate(_VISIBLE) for line in _split_message(text))
        fragments = []
        if self.args.timestamps:
            # The server's time where it says (broadcast.v1), else the arrival's.
            fragments.append(("class:time", time.strftime("%H:%M:%S ", time.localtime(ts))))
        if own:
            fragments.append(("class:own", "\n".join([first, *(CONTINUATION_INDENT + r for r in rest)])))
        else:
            if first.startswith("* "):
                fragments.append(("class:system", first))
            else:
                name, bracket, body = first.partition("] ")
                if first.startswith("[") and bracket:
                    fragments.append(("class:name", name + bracket))
                    first = body
                fragments.append(("", first))
            fragments.extend(("", "\n" + CONTINUATION_INDENT + r) for r in rest)
        fragments.append(("", "\n"))
        if not self.color:
            return "".join(text for _, text in fragments)
        return _ansi(fragments)

    def _settle(self, status: int, message: str | None) -> bool:
        """Let the first of server and user to end the session say how it ended.

        False tells a later caller that the end is already told. Under the
        prompt the line is said once the prompt is gone: printed above it,
        it went through the prompt's event loop, which the reader's signal
        to end the session could stop before it printed anything.
        """
        with self.cond:
            if self.closing or self.status is not None:
                return False
            self.status = status
            self.cond.notify_all()  # a send waiting out a reconnection gives up
            self.last_words = message
            if not self.prompting:
                self._say_last_words_locked()
            return True

    def _prompt_gone(self) -> None:
        """The terminal is ours again: say how the session ended, if the reader told it meanwhile."""
        with self.cond:
            self.prompting = False
            self._say_last_words_locked()

    def _say_last_words_locked(self) -> None:
        assert self.cond._is_owned()
        words, self.last_words = self.last_words, None
        if words is not None:
            sys.stderr.write(words + "\n")
            sys.stderr.flush()

    def _close(self) -> int:
        with self.cond:
            self.closing = self.status is None
            ws = self.ws
        self.stopped.set()
        # Sends our close frame unless the connection is already closed, and
        # waits at most CLOSE_TIMEOUT_S for the server's answer.
        ws.close()
        self.reader_done.wait(CLOSE_TIMEOUT_S)
        return 0 if self.closing else self.status


@contextlib.contextmanager
def _typeahead_unechoed():
    """No echo from the terminal between two prompts.

    The prompt puts the terminal in raw mode only while it reads a line, and
    gives it back as it found it: keys typed while a line is sent would be
    echoed by the terminal itself, in the middle of the screen, and then
    again by the next prompt.
    """
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _tls_context(args) -> ssl.SSLContext:
    """Raises OSError or ssl.SSLError for an unreadable --ca-file."""
    context = ssl.create_default_context(cafile=args.ca_file)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _headers(args) -> list[tuple[str, str]]:
    """Raises ValueError for a --header without a colon."""
    headers = []
    for header in args.header or ():
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            raise ValueError(f"invalid --header {header!r}: expected NAME:VALUE")
        headers.append((name.strip(), value.strip()))
    if args.token:
        headers.append(("Authorization", f"Bearer {args.token}"))
    return headers


# What a failed connect() raises; ConnectionClosed when the peer hangs up
# before websockets could even send the request (a server shutting down, a
# proxy turning connections away).
CONNECT_ERRORS = (OSError, InvalidHandshake, InvalidURI, TimeoutError, ConnectionClosed)


def _connect(url: str, args, tls: ssl.SSLContext | None, headers: list[tuple[str, str]]):
    """The WebSocket to ``url``, asking for broadcast.v1; the library's exception if none."""
    # No Origin header unless asked: that is how a server tells a program
    # from a browser page, and an origin list on the server is for pages.
    return connect(
        url, ssl=tls if url.startswith("wss:") else None, origin=args.origin, subprotocols=[SUBPROTOCOL],
        additional_headers=headers, open_timeout=args.connect_timeout or None, close_timeout=CLOSE_TIMEOUT_S,
        max_size=args.max_message_size or None, compression=None, proxy=None,
    )


def _refusal(shown: str, exc: InvalidStatus) -> str:
    status = exc.response.status_code
    body = " ".join(exc.response.body.decode("utf-8", "replace").split())
    line = f"{PROG}: {shown} rejected the handshake: HTTP {status} {_bounded(body)}".rstrip()
    if status == 401:
        line += "; use --token TOKEN"
    elif status == 400 and body.startswith("username required"):
        line += "; use --username NAME"
    return line


def main(argv: list[str] | None = None) -> int:
    args = parse_client_args(argv)
    try:
        url = server_url(args.addr, args.username, args.room)
        headers = _headers(args)
    except ValueError as exc:
        message = str(exc) if str(exc).startswith(("invalid --header", "invalid --room")) else \
            f"invalid --addr {redact_url(args.addr)!r}: {exc}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    try:
        tls = _tls_context(args) if url.startswith("wss:") or args.ca_file else None
    except (OSError, ssl.SSLError) as exc:
        print(f"{PROG}: error: --ca-file {args.ca_file}: {_reason(exc)}", file=sys.stderr)
        return 2
    if args.insecure:
        print(f"{PROG}: warning: --insecure: the server's certificate is not checked", file=sys.stderr)
    shown = redact_url(url)
    # A peer's message or a stray byte in the input must not end the client.
    sys.stdin.reconfigure(errors="replace")
    sys.stdout.reconfigure(errors="replace")
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        # A transcript (a pipe, a file) starts where it starts, as before rooms
        # had history; a person at a terminal gets the room's history first.
        ws = _connect(url if sys.stdout.isatty() else _with_query(url, history="0"), args, tls, headers)
    except KeyboardInterrupt:
        return 130
    except InvalidStatus as exc:
        print(_refusal(shown, exc), file=sys.stderr)
        return 1
    except InvalidMessage as exc:
        hint = "; if it serves TLS, use wss://" if url.startswith("ws:") else ""
        print(f"{PROG}: cannot connect to {shown}: no valid handshake response: {_reason(exc)}{hint}",
              file=sys.stderr)
        return 1
    except CONNECT_ERRORS as exc:
        print(f"{PROG}: cannot connect to {shown}: {_reason(exc)}", file=sys.stderr)
        return 1
    with ws:
        return Session(ws, url, args, tls, headers).run()


if __name__ == "__main__":
    sys.exit(main())
