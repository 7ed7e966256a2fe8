"""Interactive chat client for a broadcast server.

Two threads share one WebSocket: the main thread reads what the user types (or
what is piped in) and sends it; a reader thread prints what arrives. The main
thread spends its life blocked in ``input()`` or a read of stdin, which nothing
but a signal interrupts, so when the server goes away the reader thread
records why and sends SIGINT to the main thread until it stops reading input.
A SIGINT handler that raises KeyboardInterrupt once, and then ignores SIGINT,
gives the user's Ctrl+C and the reader's signal one single path out, and no
second signal can land while the client is closing.
"""

from __future__ import annotations

import collections
import signal
import struct
import sys
import threading
from urllib.parse import quote, urlsplit, urlunsplit

import websocket
from websockets.frames import CLOSE_CODE_EXPLANATIONS

from broadcast.config import parse_client_args
from broadcast.redact import redact_url

PROG = "broadcast-client"
PROMPT = "> "
WS_PATH = "/ws"
CONNECT_TIMEOUT = 10.0  # seconds to resolve, connect and finish the handshake
CLOSE_TIMEOUT = 2.0  # seconds to wait for the server's reply to our close frame
SIGNAL_REPEAT = 0.2  # seconds between SIGINTs until the main thread stops reading input
CLEAN_CLOSE_CODES = {1000, 1001}  # normal closure, going away
CLEAR_LINE = "\r\x1b[2K"
# Other people's messages reach a terminal: escape sequences in them could
# move the cursor, retitle the window or hide text, so control characters
# (C0 but tab, DEL, C1) are shown as \xNN instead.
_VISIBLE = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c != 0x09}


def server_url(addr: str, username: str | None) -> str:
    """The WebSocket URL for ``--addr`` and ``--username``; ValueError if unusable.

    Checking host and port here turns a bad address into a usage error
    instead of a connection failure deep inside websocket-client.
    """
    scheme, sep, _ = addr.partition("://")
    if not sep:
        addr = "ws://" + addr
    elif scheme.lower() not in ("ws", "wss"):
        raise ValueError(f"scheme must be ws or wss, not {scheme}")
    parts = urlsplit(addr)
    if not parts.hostname:
        raise ValueError("no host name")
    parts.port  # raises ValueError for a port that is not a number or out of range
    path = parts.path if parts.path not in ("", "/") else WS_PATH
    query = parts.query
    if username is not None:
        # quote(), not urlencode(): a space must read %20 in messages, not +.
        query = "&".join(filter(None, [query, "username=" + quote(username, safe="")]))
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, query, ""))


class _WebSocket(websocket.WebSocket):
    """A WebSocket that sends at most one close frame and never fails doing so.

    websocket-client answers every close frame it receives with one of its
    own, even when ours went first; and a server that hangs up right after
    its close frame would turn that answer into an error hiding the reason
    the server gave.
    """

    def send_close(self, status: int = websocket.STATUS_NORMAL, reason: bytes | str = b"") -> None:
        if not self.connected:
            return
        try:
            super().send_close(status, reason)
        except (websocket.WebSocketException, OSError):
            pass


def _interrupt_once(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _reason(exc: BaseException) -> str:
    if isinstance(exc, websocket.WebSocketConnectionClosedException):
        return "the server hung up without a close frame"
    if isinstance(exc, websocket.WebSocketAddressException) and exc.args:
        exc = exc.args[0]  # the socket.gaierror websocket-client wraps
    if isinstance(exc, websocket.WebSocketTimeoutException):
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def _close_reason(payload: bytes) -> tuple[int, str]:
    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
    why = f"{code} {CLOSE_CODE_EXPLANATIONS.get(code, 'unknown code')}"
    reason = payload[2:].decode("utf-8", "replace")
    return code, f"{why} ({reason})" if reason else why


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Session:
    """What the two threads share, so that how the session ends is decided once."""

    def __init__(self, ws: websocket.WebSocket, username: str | None, linger: float) -> None:
        self.ws = ws
        self.username = username
        self.linger = linger
        self.interactive = sys.stdin.isatty()
        self.to_terminal = sys.stdout.isatty()
        self.readline = None
        if self.interactive:
            import readline  # line editing and history, and redrawing the typed line

            self.readline = readline
        # One lock orders the screen, the end of the session and the echo FIFO.
        self.cond = threading.Condition()
        self.status: int | None = None  # exit status, once the server ended the session
        self.closing = False  # the user ended the session; the reader stays quiet
        self.expected: collections.deque[str] = collections.deque()  # pipe mode echoes
        self.input_done = threading.Event()  # the main thread no longer reads input
        self.reader_done = threading.Event()

    def run(self) -> int:
        try:
            # Started inside the try: the reader may signal as soon as it runs.
            threading.Thread(target=self._read, name="reader", daemon=True).start()
            self._send_input()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except KeyboardInterrupt:
            pass  # the user's Ctrl+C, or the reader saying the server is gone
        self.input_done.set()
        return self._close()

    def _lines(self):
        if not self.interactive:
            for line in sys.stdin:
                yield line.rstrip("\r\n")
            return
        while True:
            try:
                yield input(PROMPT)
            except EOFError:
                return

    def _send_input(self) -> None:
        for line in self._lines():
            if line == "/quit":
                break
            if not line:
                continue
            if not self.interactive:
                with self.cond:
                    self.expected.append(f"[{self.username}] {line}" if self.username is not None else line)
            try:
                self.ws.send_text(line)
            except (websocket.WebSocketException, OSError) as exc:
                self._settle(1, f"connection lost: {_reason(exc)}")
                return
        if not self.interactive:
            # Closing now could drop the echo of the last lines on the floor:
            # a pipe's output should hold what was sent.
            with self.cond:
                self.cond.wait_for(lambda: not self.expected, timeout=self.linger)

    def _read(self) -> None:
        try:
            while True:
                opcode, data = self.ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    code, why = _close_reason(data)
                    status = 0 if code in CLEAN_CLOSE_CODES else 1
                    message = f"connection closed by server: {why}"
                    break
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    self._show(f"[binary {len(data)} bytes]")
                else:
                    self._show(data.decode("utf-8", "replace"))
        except (websocket.WebSocketException, OSError) as exc:
            status, message = 1, f"connection lost: {_reason(exc)}"
        if self._settle(status, message):
            # A signal that lands just before the main thread blocks in read()
            # or select() is only handled once that call returns: repeat it.
            while True:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                if self.input_done.wait(SIGNAL_REPEAT):
                    break
        self.reader_done.set()

    def _show(self, text: str) -> None:
        with self.cond:
            if self.expected and self.expected[0] == text:
                self.expected.popleft()
                self.cond.notify_all()
            if self.to_terminal:
                text = text.translate(_VISIBLE)
            if self.interactive:
                redraw = "" if self.closing else PROMPT + self.readline.get_line_buffer()
                sys.stdout.write(f"{CLEAR_LINE}{text}\n{redraw}")
            else:
                sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def _settle(self, status: int, message: str) -> bool:
        """Let the first of server and user to end the session say how it ended.

        False tells a later caller that the end is already told.
        """
        with self.cond:
            if self.closing or self.status is not None:
                return False
            self.status = status
            sys.stderr.write(f"{CLEAR_LINE if self.interactive else ''}{message}\n")
            sys.stderr.flush()
            return True

    def _close(self) -> int:
        with self.cond:
            settled = self.status is not None
            self.closing = True
            if self.interactive and not settled:
                sys.stdout.write(CLEAR_LINE)  # the prompt, and whatever Ctrl+C left
                sys.stdout.flush()
        if not settled:
            # ws.close() would read the socket too, racing the reader thread.
            self.ws.send_close(websocket.STATUS_NORMAL)
            self.reader_done.wait(CLOSE_TIMEOUT)
        self.ws.shutdown()
        return self.status if settled else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_client_args(argv)
    try:
        url = server_url(args.addr, args.username)
    except ValueError as exc:
        print(f"{PROG}: error: invalid --addr {redact_url(args.addr)!r}: {exc}", file=sys.stderr)
        return 2
    # A peer's message or a stray byte in the input must not end the client.
    sys.stdin.reconfigure(errors="replace")
    sys.stdout.reconfigure(errors="replace")
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        # No Origin header: that is how a server tells a program from a browser
        # page, and an origin list on the server is for pages only.
        ws = websocket.create_connection(
            url, timeout=CONNECT_TIMEOUT, class_=_WebSocket, suppress_origin=True,
            header=[f"Authorization: Bearer {args.token}"] if args.token else None,
            sslopt={"ca_certs": args.ca_file} if args.ca_file else None,
        )
        ws.settimeout(None)  # the reader thread waits for messages for as long as it takes
        session = Session(ws, args.username, args.linger)
    except KeyboardInterrupt:
        return 130
    except websocket.WebSocketBadStatusException as exc:
        body = _one_line((exc.resp_body or b"").decode("utf-8", "replace"))
        print(f"{PROG}: {redact_url(url)} rejected the handshake: HTTP {exc.status_code} "
              f"{body or exc.status_message or ''}".rstrip(), file=sys.stderr)
        return 1
    except (websocket.WebSocketException, OSError) as exc:
        print(f"{PROG}: cannot connect to {redact_url(url)}: {_reason(exc)}", file=sys.stderr)
        return 1
    return session.run()
