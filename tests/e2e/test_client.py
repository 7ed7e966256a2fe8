"""The chat client, run as a real process against real servers on 127.0.0.1.

Most tests use the project's server (the ``server`` and ``start_server``
fixtures). The close code a client sends is not visible to the other clients
of a broadcast server, so the tests about it use a small websockets server
that records the close frame it receives.
"""

from __future__ import annotations

import io
import itertools
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import pexpect
import pytest
import trustme
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import serve

from support.process import CLIENT, ROOT, Lines, clean_env, run
from support.rawws import accept_for, build_frame, close_payload

from broadcast.client import CONTINUATION_INDENT as CONTINUATION
from broadcast.client import server_url

WAIT = 5.0  # seconds for any one expected event
READY = r"connected to [^\r\n]+\r\n"  # the line an interactive client prints once connected
# A developer's BROADCAST_USERNAME and the like would change what the client does.
ENV = clean_env()


# A pipe client's run is bounded past its own 10 s --connect-timeout, so that an opening handshake
# that never completes fails with the client's own words, not as a kill with nothing printed.
CLIENT_RUN_TIMEOUT_S = 15.0


def run_client(*args: str, input: str = "", timeout: float = CLIENT_RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return run(CLIENT, *args, env=ENV, input=input, timeout=timeout)


@pytest.fixture
def terminal():
    """Start the client under a pseudo-terminal; everything it shows is in ``.screen``."""
    children: list[pexpect.spawn] = []

    def start(*args: str) -> pexpect.spawn:
        child = pexpect.spawn(sys.executable, [*CLIENT[1:], *args], cwd=str(ROOT),
                              env={**ENV, "TERM": "xterm"}, encoding="utf-8",
                              timeout=WAIT, dimensions=(24, 160))
        child.screen = io.StringIO()
        child.logfile_read = child.screen
        children.append(child)
        return child

    yield start
    for child in children:
        child.close(force=True)


@pytest.fixture
def observer(server):
    """An anonymous raw WebSocket client of ``server``."""
    with connect(server.url, open_timeout=WAIT, close_timeout=1) as ws:
        yield ws


def receive_until(ws, wanted: str | bytes, timeout: float = WAIT) -> list:
    """Messages received up to and including ``wanted``."""
    deadline = time.monotonic() + timeout
    got = []
    while not got or got[-1] != wanted:
        got.append(ws.recv(timeout=max(0.0, deadline - time.monotonic())))
    return got


@pytest.fixture
def recording_server():
    """A websockets server that reads and drops messages, and records each close code received."""
    close_codes: queue.Queue[int | None] = queue.Queue()

    def handler(ws) -> None:
        try:
            while True:
                ws.recv()
        except ConnectionClosed as exc:
            close_codes.put(exc.rcvd.code if exc.rcvd else None)

    with serve(handler, "127.0.0.1", 0) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        yield SimpleNamespace(addr=f"127.0.0.1:{srv.socket.getsockname()[1]}",
                              close_codes=close_codes)
        srv.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompted(child: pexpect.spawn) -> None:
    """Wait for the prompt: keys sent before it is up meet a terminal not yet in raw mode."""
    child.expect(READY)
    child.expect_exact(">")


def wait_exit(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


# URL

@pytest.mark.parametrize(("addr", "username", "url"), [
    ("localhost:8080", "Alice", "ws://localhost:8080/ws?username=Alice"),
    ("localhost:8080", None, "ws://localhost:8080/ws"),
    ("127.0.0.1:9", " x&y=z/ö", "ws://127.0.0.1:9/ws?username=%20x%26y%3Dz%2F%C3%B6"),
    ("[::1]:8080", None, "ws://[::1]:8080/ws"),
    ("ws://example.com:81", "Al", "ws://example.com:81/ws?username=Al"),
    ("wss://example.com/", None, "wss://example.com/ws"),
    ("ws://example.com/chat", "Al", "ws://example.com/chat?username=Al"),
    ("ws://example.com/ws?room=1", "Al", "ws://example.com/ws?room=1&username=Al"),
    ("localhost", None, "ws://localhost:8080/ws"),  # the server's default port
    (":9000", None, "ws://localhost:9000/ws"),  # and the local host
    ("[::1]", None, "ws://[::1]:8080/ws"),
])
def test_server_url(addr, username, url):
    assert server_url(addr, username) == url


@pytest.mark.parametrize("addr", ["http://example.com", "example.com:99999", "example.com:x", "[::1]:x"])
def test_unusable_addr_is_a_usage_error(addr):
    result = run_client("--addr", addr)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and addr in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("form", ["ws://{addr}", "ws://{addr}/", "ws://{addr}/ws"])
def test_addr_as_url(server, form):
    result = run_client("--addr", form.format(addr=server.addr), "--username", "Bob", input="hi\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "[Bob] hi\n", "")


def test_server_that_checks_origins_accepts_the_client(start_server):
    """Browsers must come from an allowed Origin; a program sends none."""
    server = start_server("--allowed-origin", "https://chat.example")
    result = run_client("--addr", server.addr, "--username", "Bob", input="hi\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "[Bob] hi\n", "")


def test_token_in_addr_url_is_kept(start_server):
    server = start_server("--token", "s3cret")
    result = run_client("--addr", f"ws://{server.addr}/ws?token=s3cret", "--username", "Bob", input="hi\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "[Bob] hi\n", "")


# Pipe mode

def test_pipe_prints_own_echo_and_exits_0(server):
    result = run_client("--addr", server.addr, "--username", "Bob", input="hi\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "[Bob] hi\n", "")


def test_pipe_anonymous_echo_is_unchanged(server):
    result = run_client("--addr", server.addr, input="hello [world]\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello [world]\n", "")


def test_pipe_skips_empty_lines_and_keeps_order(server, observer):
    result = run_client("--addr", server.addr, "--username", "Bob",
                        input="one\n\ntwo\n\n\nthree\n/quit\nnot sent\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[Bob] one", "[Bob] two", "[Bob] three"]
    assert receive_until(observer, "* Bob left") == [
        "* Bob joined", "[Bob] one", "[Bob] two", "[Bob] three", "* Bob left"]


def test_pipe_input_that_is_not_utf8_is_replaced_not_fatal(server):
    result = subprocess.run([*CLIENT, "--addr", server.addr], cwd=ROOT, env=ENV,
                            input=b"caf\xe9\n", capture_output=True, timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (0, "caf\ufffd\n".encode(), b"")


def test_pipe_prints_messages_of_others_and_binary(server, observer, piped):
    client = piped("--addr", server.addr, "--username", "Carol")
    receive_until(observer, "* Carol joined")
    observer.send("from observer")
    observer.send(b"\x00\x01\x02")
    client.stdout.expect("from observer")
    client.stdout.expect("[binary 3 bytes]")
    client.proc.stdin.close()
    assert client.wait() == 0
    assert client.stdout.seen == ["from observer", "[binary 3 bytes]"]
    receive_until(observer, "* Carol left")


def test_pipe_end_of_input_closes_with_1000_after_linger(recording_server):
    """This server never echoes: the client waits --linger, then closes cleanly."""
    started = time.monotonic()
    result = run_client("--addr", recording_server.addr, "--username", "Bob", "--linger", "0.5",
                        input="hi\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert time.monotonic() - started >= 0.5
    assert recording_server.close_codes.get(timeout=WAIT) == 1000


# Interactive mode

def test_interactive_sends_typed_lines_with_history(server, terminal):
    child = terminal("--addr", server.addr, "--username", "Alice")
    prompted(child)
    child.send("hello there\r")
    child.expect_exact("[Alice] hello there")
    child.send("\r")  # an empty line is not sent
    child.send("\x1b[A\r")  # Up: the history brings the line back
    child.expect_exact("[Alice] hello there")
    child.send("/quit\r")
    assert wait_exit(child) == 0
    assert child.screen.getvalue().count("[Alice]") == 2  # nothing for the empty line


QUIT_KEYS = {
    "ctrl-d": lambda child: child.sendeof(),
    "ctrl-c": lambda child: child.sendintr(),
    "/quit": lambda child: child.send("/quit\r"),
}


@pytest.mark.parametrize("key", QUIT_KEYS)
def test_interactive_quit_leaves_cleanly(key, server, observer, terminal):
    child = terminal("--addr", server.addr, "--username", "Alice")
    prompted(child)
    receive_until(observer, "* Alice joined")
    QUIT_KEYS[key](child)
    assert wait_exit(child) == 0
    receive_until(observer, "* Alice left")
    assert "Traceback" not in child.screen.getvalue()


@pytest.mark.parametrize("key", QUIT_KEYS)
def test_interactive_quit_sends_close_1000(key, recording_server, terminal):
    child = terminal("--addr", recording_server.addr)
    prompted(child)
    child.send("half typed")  # Ctrl+C with a half-typed line, Ctrl+D on an empty one
    child.expect_exact("half typed")
    if key != "ctrl-c":
        child.send("\r")
    QUIT_KEYS[key](child)
    assert wait_exit(child) == 0
    assert recording_server.close_codes.get(timeout=WAIT) == 1000
    assert "Traceback" not in child.screen.getvalue()


# The server goes away (and the client, told not to reconnect, ends: test_client_rooms.py has the rest)

NO_RECONNECT = ("--reconnect-timeout", "0")


def test_interactive_server_shutdown(server, terminal):
    child = terminal("--addr", server.addr, "--username", "Alice", *NO_RECONNECT)
    prompted(child)
    child.send("hal")
    child.expect_exact("hal")
    server.stop(signal.SIGTERM)
    child.expect(r"connection closed by server: 1001[^\r\n]*\r\n")
    assert wait_exit(child) == 0
    screen = child.screen.getvalue()
    assert screen.count("connection") == 1
    assert "Traceback" not in screen


def test_interactive_server_killed(server, terminal):
    child = terminal("--addr", server.addr, "--username", "Alice", *NO_RECONNECT)
    prompted(child)
    server.stop(signal.SIGKILL)
    child.expect(r"connection lost: [^\r\n]+\r\n")
    assert wait_exit(child) == 1
    screen = child.screen.getvalue()
    assert screen.count("connection") == 1
    assert "Traceback" not in screen


@pytest.mark.parametrize(("sig", "line", "status"), [
    (signal.SIGTERM, "connection closed by server: 1001", 0),
    (signal.SIGKILL, "connection lost: ", 1),
])
def test_pipe_server_goes_away_while_input_is_open(server, piped, sig, line, status):
    client = piped("--addr", server.addr, "--username", "Bob", *NO_RECONNECT)
    client.send("hi")
    client.stdout.expect("[Bob] hi")
    server.stop(sig)
    assert client.wait() == status
    errors = client.stderr.all()
    assert len(errors) == 1 and errors[0].startswith(line), errors
    assert client.stdout.all() == ["[Bob] hi"]


def test_pipe_skips_a_line_over_the_servers_limit_and_goes_on(start_server):
    """The server advertises its limit: a line over it is reported and skipped, not a 1009 close."""
    server = start_server("--max-message-size", "100")
    result = run_client("--addr", server.addr, input="x" * 200 + "\nafter\n")
    assert (result.returncode, result.stdout) == (0, "after\n")
    assert result.stderr == "not sent: the line is 200 bytes; the server takes at most 100\n"


# Cannot connect

def test_refused_connection():
    url = f"ws://127.0.0.1:{free_port()}/ws"
    result = run_client("--addr", url.removeprefix("ws://").removesuffix("/ws"))
    assert result.returncode == 1
    assert result.stderr == f"broadcast-client: cannot connect to {url}: connection refused\n"


def test_unknown_host():
    result = run_client("--addr", "nonexistent.invalid:80")
    assert result.returncode == 1
    assert result.stderr.startswith("broadcast-client: cannot connect to ws://nonexistent.invalid:80/ws: ")
    assert result.stderr.count("\n") == 1


def test_rejected_handshake_names_url_and_reason(server):
    name = "x" * 40
    result = run_client("--addr", server.addr, "--username", name)
    assert result.returncode == 1
    prefix = f"broadcast-client: {server.url}?username={name} rejected the handshake: HTTP 400 "
    assert result.stderr.startswith(prefix)
    assert "username" in result.stderr.removeprefix(prefix)
    assert result.stderr.count("\n") == 1


def test_wrong_path_is_rejected_with_404(server):
    result = run_client("--addr", f"ws://{server.addr}/nope")
    assert result.returncode == 1
    prefix = f"broadcast-client: ws://{server.addr}/nope rejected the handshake: HTTP 404"
    assert result.stderr.startswith(prefix)
    assert result.stderr.count("\n") == 1


# Token, TLS with a private CA, and what reaches the terminal.


def test_token_flag_and_environment(start_server):
    server = start_server("--token", "s3cret")
    refused = run_client("--addr", server.addr, "--username", "Bob", input="hi\n")
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr and len(refused.stderr.splitlines()) == 1
    done = run_client("--addr", server.addr, "--username", "Bob", "--token", "s3cret", input="hi\n")
    assert (done.returncode, done.stdout) == (0, "[Bob] hi\n")
    env_done = run(CLIENT, "--addr", server.addr, env={**ENV, "BROADCAST_TOKEN": "s3cret"}, input="yo\n",
                   timeout=10)
    assert (env_done.returncode, env_done.stdout) == (0, "yo\n")


def test_wss_with_a_private_ca_file(start_server, tmp_path):
    ca = trustme.CA()
    chain = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(chain)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    server = start_server("--certfile", str(chain))
    url = f"wss://127.0.0.1:{server.port}"
    untrusted = run_client("--addr", url, input="hi\n")
    assert untrusted.returncode == 1
    assert "certificate" in untrusted.stderr.lower() and len(untrusted.stderr.splitlines()) == 1
    done = run_client("--addr", url, "--username", "Tess", "--ca-file", str(ca_file), input="hi\n")
    assert (done.returncode, done.stdout) == (0, "[Tess] hi\n")


def test_escape_sequences_from_others_are_shown_not_obeyed(server, terminal, observer):
    child = terminal("--addr", server.addr, "--username", "Alice")
    prompted(child)
    assert receive_until(observer, "* Alice joined")
    observer.send("\x1b]0;pwned\x07\x1b[2Jcleared?")
    child.expect_exact("\\x1b]0;pwned\\x07\\x1b[2Jcleared?")
    assert "\x1b]0;" not in child.screen.getvalue()
    child.sendcontrol("d")
    assert wait_exit(child) == 0


def test_piped_output_keeps_messages_byte_for_byte(server, piped, observer):
    client = piped("--addr", server.addr)
    client.send("ready")
    client.stdout.expect("ready")
    observer.send("tab\there \x1b[1mbold")
    assert client.stdout.expect("tab") == "tab\there \x1b[1mbold"
    client.proc.stdin.close()
    assert client.wait() == 0


# At a real terminal: tmux keeps the screen, so a test can read what a user
# sees, and where the cursor is.

POLL_S = 0.05  # between looks at the screen
SCREEN_WAIT_S = 10.0  # for any one screen condition
COLUMNS, ROWS = 100, 25


class Tmux:
    """One client in its own tmux server, in a COLUMNS x ROWS window."""

    def __init__(self, command: str, env: dict[str, str]) -> None:
        # A socket path must be short; pytest's tmp_path can be too long for one.
        self.dir = tempfile.mkdtemp(prefix="bc-tmux-")
        self.socket = os.path.join(self.dir, "sock")
        conf = os.path.join(self.dir, "conf")
        with open(conf, "w") as f:
            # The pane outlives the client, so its exit status and last screen can be read.
            f.write("set -g remain-on-exit on\nset -g history-limit 5000\n")
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in {"TERM": "xterm-256color", **env}.items())
        self.tmux("-f", conf, "new-session", "-d", "-x", str(COLUMNS), "-y", str(ROWS),
                  f"cd {shlex.quote(str(ROOT))} && exec env {UNSET_BROADCAST} {assigns} {command}")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], check=True, capture_output=True,
                              text=True, timeout=WAIT).stdout

    def screen(self, history: bool = False, escapes: bool = False) -> list[str]:
        args = ["capture-pane", "-p"] + (["-S", "-"] if history else []) + (["-e"] if escapes else [])
        return self.tmux(*args).removesuffix("\n").split("\n")

    def cursor(self) -> tuple[int, int]:
        x, y = self.tmux("display", "-p", "#{cursor_x},#{cursor_y}").split(",")
        return int(x), int(y)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-l", text)

    def keys(self, *names: str) -> None:
        self.tmux("send-keys", *names)

    def wait(self, condition, what: str):
        """Poll the screen until ``condition(self)`` is true; return its value."""
        deadline = time.monotonic() + SCREEN_WAIT_S
        while not (value := condition(self)):
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never showed {what}:\n" + "\n".join(self.screen()))
            time.sleep(POLL_S)
        return value

    def wait_text(self, text: str) -> None:
        self.wait(lambda t: any(text in row for row in t.screen()), repr(text))

    def exit_status(self) -> int:
        self.wait(lambda t: t.tmux("display", "-p", "#{pane_dead}").strip() == "1", "the client exit")
        return int(self.tmux("display", "-p", "#{pane_dead_status}"))

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=WAIT)
        shutil.rmtree(self.dir, ignore_errors=True)


UNSET_BROADCAST = " ".join(f"-u {k}" for k in os.environ if k.startswith("BROADCAST_"))


@pytest.fixture
def tmux():
    """Start the client at a terminal: ``tmux("--addr", addr, env={...}, shell="| tee log")``."""
    started: list[Tmux] = []

    def start(*args: str, env: dict[str, str] | None = None, shell: str = "") -> Tmux:
        command = shlex.join([sys.executable, *CLIENT[1:], *args])
        if shell:
            command = f"sh -c {shlex.quote(command + ' ' + shell)}"
        started.append(Tmux(command, env or {}))
        return started[-1]

    yield start
    for t in started:
        t.kill()


def prompt_row(t: Tmux) -> str:
    return t.screen()[t.cursor()[1]]


def at_prompt(t: Tmux) -> bool:
    return prompt_row(t) == ">" and t.cursor()[0] == len("> ")  # tmux trims the trailing space


def test_left_then_a_message_then_typing_keeps_the_cursor(server, observer, tmux):
    t = tmux("--addr", server.addr, "--username", "Alice")
    t.wait(at_prompt, "the prompt")
    receive_until(observer, "* Alice joined")
    t.type("half typed line")
    t.keys(*["Left"] * 5)
    t.wait(lambda t: t.cursor()[0] == len("> half typed line") - 5, "the cursor 5 left")
    observer.send("ping from observer")
    t.wait_text("ping from observer")
    t.wait(lambda t: prompt_row(t) == "> half typed line", "the typed line redrawn")
    assert t.cursor()[0] == len("> half typed line") - 5
    t.type("X")
    t.wait(lambda t: prompt_row(t) == "> half typedX line", "the X where the cursor is")
    t.keys("Enter")
    assert receive_until(observer, "[Alice] half typedX line")[-1] == "[Alice] half typedX line"
    t.wait_text("[Alice] half typedX line")
    assert not any("lineX" in row for row in t.screen())


def test_wide_input_is_redrawn_whole_while_messages_arrive(server, observer, tmux):
    t = tmux("--addr", server.addr, "--username", "Alice")
    t.wait(at_prompt, "the prompt")
    receive_until(observer, "* Alice joined")
    typed = "".join(chr(ord("a") + i % 26) for i in range(150))
    for i in range(20):
        t.type(typed[i * 8:(i + 1) * 8])
        observer.send(f"message {i:02}")
    t.type(typed[160:])
    t.wait_text("message 19")
    wrapped = ["> " + typed[:COLUMNS - 2], typed[COLUMNS - 2:]]
    t.wait(lambda t: t.screen()[t.cursor()[1] - 1:t.cursor()[1] + 1] == wrapped, "the whole typed line")
    screen = [row for row in t.screen(history=True) if row]
    messages = [row for row in screen if row.startswith("message ")]
    assert messages == [f"message {i:02}" for i in range(20)]
    # Every row is a message, a line the client printed, or the input: no stale row.
    input_rows = [row for row in screen if row not in messages and not row.startswith(("connected", "* "))]
    assert input_rows == wrapped
    t.keys("Enter")
    assert receive_until(observer, f"[Alice] {typed}")[-1] == f"[Alice] {typed}"


def test_many_typed_lines_while_messages_arrive_never_double_the_prompt(server, observer, tmux):
    t = tmux("--addr", server.addr, "--username", "Alice")
    t.wait(at_prompt, "the prompt")
    receive_until(observer, "* Alice joined")
    for i in range(200):
        t.type(f"line {i:03}")
        t.keys("Enter")
        if i % 4 == 0:
            observer.send(f"incoming {i:03}")
    receive_until(observer, "[Alice] line 199", timeout=SCREEN_WAIT_S * 3)
    t.wait_text("[Alice] line 199")
    history = t.screen(history=True)
    assert not [row for row in history if "> > " in row]
    typed_rows = [row for row in history if row.startswith("> line ")]
    assert typed_rows == [f"> line {i:03}" for i in range(200)], "\n".join(history[:60])


def test_reverse_search_indicator_survives_a_message(server, observer, tmux):
    t = tmux("--addr", server.addr, "--username", "Alice")
    t.wait(at_prompt, "the prompt")
    receive_until(observer, "* Alice joined")
    t.type("the secret word")
    t.keys("Enter")
    t.wait_text("[Alice] the secret word")
    t.keys("C-r")
    t.type("secr")
    t.wait_text("(reverse-i-search)`secr'")
    observer.send("interrupting message")
    t.wait_text("interrupting message")
    t.wait_text("(reverse-i-search)`secr'")
    t.keys("Enter")
    t.keys("Enter")
    assert receive_until(observer, "[Alice] the secret word")[-1] == "[Alice] the secret word"


def test_display_multiline_colours_own_and_timestamps(server, observer, tmux):
    t = tmux("--addr", server.addr, "--username", "Alice", "--timestamps")
    t.wait(at_prompt, "the prompt")
    receive_until(observer, "* Alice joined")
    observer.send("first line\nsecond line\n")  # websocat ends every message with \n
    t.wait_text("second line")
    t.type("mine")
    t.keys("Enter")
    t.wait_text("[Alice] mine")
    rows = t.screen()
    first = next(i for i, row in enumerate(rows) if row.endswith("first line"))
    assert re.fullmatch(r"\d\d:\d\d:\d\d first line", rows[first])
    assert rows[first + 1] == CONTINUATION + "second line"  # indented; no \x0a, no empty line
    assert not rows[first + 2].strip() or not rows[first + 2].startswith(" ")
    coloured = t.screen(escapes=True)
    own = next(row for row in coloured if "[Alice] mine" in row)
    other = next(row for row in coloured if "first line" in row)
    assert "\x1b[90m" in own  # dim: your own message
    assert "\x1b[90m[Alice]" not in other and "first line" in other


@pytest.mark.parametrize(("flags", "env"), [(["--no-color"], {}), ([], {"NO_COLOR": "1"})])
def test_no_color_flag_and_environment(server, observer, tmux, flags, env):
    t = tmux("--addr", server.addr, "--username", "Alice", *flags, env=env)
    t.wait(at_prompt, "the prompt")
    receive_until(observer, "* Alice joined")
    observer.send("[Bob] plain please")
    t.wait_text("plain please")
    row = next(row for row in t.screen(escapes=True) if "plain please" in row)
    assert row == "[Bob] plain please"


def test_connect_line_at_a_terminal(server, observer, tmux):
    t = tmux("--addr", server.addr, "--username", "Alice")
    t.wait(at_prompt, "the prompt")
    assert t.screen()[0] == f"connected to {server.url} as Alice (2 online)"


# Pipes, at a real terminal

def test_tee_keeps_the_typed_line_on_screen_and_the_log_clean(server, observer, tmux, tmp_path):
    log = tmp_path / "chat.log"
    t = tmux("--addr", server.addr, "--username", "Alice", shell=f"| tee {shlex.quote(str(log))}")
    t.wait(lambda t: any(row == ">" for row in t.screen()), "the prompt")
    receive_until(observer, "* Alice joined")
    t.type("still visible")
    t.wait_text("> still visible")
    observer.send("while typing")
    t.wait_text("while typing")
    t.wait_text("> still visible")
    t.keys("Enter")
    assert receive_until(observer, "[Alice] still visible")[-1] == "[Alice] still visible"
    deadline = time.monotonic() + SCREEN_WAIT_S
    while "[Alice] still visible\n" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert log.read_text() == "while typing\n[Alice] still visible\n"  # messages only


def test_head_ends_the_client_quietly_with_a_close_frame(server, observer):
    """`| head -1`: once head is gone, the next message ends the client with status 0."""
    script = (f"{shlex.join([*CLIENT, '--addr', server.addr, '--username', 'Lee', '--listen-only'])}"
              " | head -1; echo status=${PIPESTATUS[0]} >&2")
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        receive_until(observer, "* Lee joined")
        for i in range(50):  # head may still be reading the first: send until the client has gone
            observer.send(f"message {i}")
            try:
                out, err = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        proc.kill()
    assert (out, err) == ("message 0\n", "status=0\n")
    server.wait_for_log(r"disconnect .*Lee.*: closed by client: .*1000")


def test_listen_only_stays_connected_without_input_until_sigterm(server, observer):
    proc = subprocess.Popen([*CLIENT, "--addr", server.addr, "--username", "Ann", "--listen-only"], cwd=ROOT,
                            env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out = Lines(proc.stdout)
        receive_until(observer, "* Ann joined")
        observer.send("for the log")
        out.expect("for the log")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        receive_until(observer, "* Ann left")
        assert proc.stderr.read() == ""
    finally:
        proc.kill()


# Commands are local

def test_help_and_quit_with_spaces_send_nothing(server, observer):
    result = run_client("--addr", server.addr, "--username", "Bob", input="/help\n  /quit  \nnot sent\n")
    assert (result.returncode, result.stdout) == (0, "")
    assert [line.split()[0] for line in result.stderr.splitlines()] == ["/help", "/who", "/quit", "//text"]
    assert receive_until(observer, "* Bob left") == ["* Bob joined", "* Bob left"]


def test_unknown_command_is_not_sent_and_double_slash_sends_one(server, observer):
    result = run_client("--addr", server.addr, "--username", "Bob", input="/nope\n//slash\n")
    assert (result.returncode, result.stdout) == (0, "[Bob] /slash\n")
    assert result.stderr == "unknown command /nope; /help lists them\n"
    assert receive_until(observer, "* Bob left") == ["* Bob joined", "[Bob] /slash", "* Bob left"]


def test_who_gives_the_online_count(server, observer):
    result = run_client("--addr", server.addr, input="/who\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "in lobby: 2 anonymous\n")


# Limits without hanging up

def test_limits_are_advertised_in_the_handshake_response(start_server):
    server = start_server("--max-message-size", "1000", "--rate-limit", "2.5", "--rate-burst", "4")
    with connect(server.url, open_timeout=WAIT) as ws:
        assert ws.response.headers["Broadcast-Limits"] == "max-message-size=1000; rate=2.5; burst=4"
        assert ws.response.headers["Broadcast-Online"] == "1"


def test_pipe_paces_itself_under_a_rate_limit(start_server):
    server = start_server("--rate-limit", "4", "--rate-burst", "2")
    lines = [f"line {i}" for i in range(8)]
    result = run_client("--addr", server.addr, input="".join(f"{line}\n" for line in lines), timeout=20)
    assert (result.returncode, result.stdout.splitlines(), result.stderr) == (0, lines, "")


def test_a_line_over_the_limit_is_refused_at_the_prompt_and_the_session_goes_on(start_server, tmux):
    server = start_server("--max-message-size", "100")
    t = tmux("--addr", server.addr, "--username", "Alice")
    t.wait(at_prompt, "the prompt")
    t.type("y" * 150)
    t.keys("Enter")
    t.wait_text("not sent: the line is 150 bytes; the server takes at most 100")
    t.type("short")
    t.keys("Enter")
    t.wait_text("[Alice] short")


# Conventions

def test_version_on_both_programs():
    client = run_client("--version")
    assert (client.returncode, client.stdout) == (0, "broadcast-client 0.1.0\n")
    server = run([sys.executable, "-m", "broadcast.server"], "--version", env={**ENV, "PYTHONPATH": str(ROOT)},
                 timeout=10)
    assert (server.returncode, server.stdout) == (0, "broadcast-server 0.1.0\n")


def test_python_dash_m_runs_both_programs(start_server):
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    server = start_server(program=[sys.executable, "-m", "broadcast.server"], env=env)
    client = run([sys.executable, "-m", "broadcast.client"], "--addr", server.addr, "--username", "Mo", env=env,
                 input="hi\n", timeout=10)
    assert (client.returncode, client.stdout, client.stderr) == (0, "[Mo] hi\n", "")


def test_refusals_say_which_flag_to_use(start_server):
    named = start_server("--require-username")
    result = run_client("--addr", named.addr)
    assert result.returncode == 1 and result.stderr.endswith("; use --username NAME\n")
    locked = start_server("--token", "s3cret")
    result = run_client("--addr", locked.addr)
    assert result.returncode == 1 and result.stderr.endswith("; use --token TOKEN\n")


@pytest.fixture
def tls_files(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(chain)
    cert_only = tmp_path / "cert.pem"
    cert.cert_chain_pems[0].write_to_path(cert_only)
    return SimpleNamespace(chain=chain, cert_only=cert_only)


def test_ws_to_a_tls_server_hints_at_wss(start_server, tls_files):
    server = start_server("--certfile", str(tls_files.chain))
    result = run_client("--addr", server.addr)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "use wss://" in result.stderr


def test_insecure_skips_verification_with_a_warning(start_server, tls_files):
    server = start_server("--certfile", str(tls_files.chain))
    result = run_client("--addr", f"wss://{server.addr}", "--insecure", "--username", "Ivy", input="hi\n")
    assert (result.returncode, result.stdout) == (0, "[Ivy] hi\n")
    assert result.stderr == "broadcast-client: warning: --insecure: the server's certificate is not checked\n"


@pytest.mark.parametrize("content", [None, "not a certificate\n"])
def test_bad_ca_file_is_a_configuration_error(tmp_path, content):
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_text(content)
    result = run_client("--addr", "wss://127.0.0.1:9", "--ca-file", str(ca_file))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(ca_file) in result.stderr


def test_certificate_without_a_key_says_pass_keyfile(start_server, tls_files):
    server = start_server("--certfile", str(tls_files.cert_only), expect_listening=False)
    assert server.wait_exit() == 2
    assert f"no private key in {tls_files.cert_only}; pass --keyfile" in server.log


def test_header_and_origin_flags_reach_the_server():
    seen: queue.Queue = queue.Queue()

    def handler(ws) -> None:
        seen.put(ws.request.headers)

    with serve(handler, "127.0.0.1", 0) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        run_client("--addr", f"127.0.0.1:{srv.socket.getsockname()[1]}", "--header", "X-Team: blue",
                   "--header", "X-Room:1", "--origin", "https://chat.example")
        headers = seen.get(timeout=WAIT)
        srv.shutdown()
    assert (headers["X-Team"], headers["X-Room"], headers["Origin"]) == ("blue", "1", "https://chat.example")


def test_a_token_in_the_address_is_never_printed(start_server):
    server = start_server("--token", "s3cret")
    result = run_client("--addr", f"ws://{server.addr}/ws?token=wr0ngT0ken", "--username", "Bob")
    assert result.returncode == 1
    assert "HTTP 401" in result.stderr and "wr0ngT0ken" not in result.stderr
    assert f"ws://{server.addr}/ws?token=***&username=Bob rejected" in result.stderr


def test_header_without_a_colon_is_a_usage_error():
    result = run_client("--header", "nocolon")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "nocolon" in result.stderr


# Against a hostile server: a raw socket server in the test, on 127.0.0.1.

HOSTILE_BYTES = 200 * 1024 * 1024  # what a hostile server offers: far past any limit of the client's
CHUNK_BYTES = 1024 * 1024  # sent at once
# While all of that comes at it, the client's peak resident memory may pass
# what the same client needs for a refused handshake by at most this: its
# 4 MiB message limit and a few read buffers, with room.
RSS_HEADROOM_KIB = 48 * 1024
TERMINAL_GRABS = "\x1b]0;pwned\x07\x1b[31mred"  # retitle the window, turn the text red


class HostileServer:
    """Answers one client with ``behave(sock)``; the client hanging up on it is what tests want."""

    def __init__(self, behave) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = 0
        self.done = threading.Event()
        threading.Thread(target=self._serve, args=(behave,), daemon=True).start()

    def _serve(self, behave) -> None:
        self.listener.settimeout(WAIT)
        try:
            sock, _ = self.listener.accept()
            with sock:
                behave(self, sock)
        except OSError:
            pass
        finally:
            self.listener.close()
            self.done.set()

    def request_key(self, sock) -> str:
        request = b""
        while b"\r\n\r\n" not in request:
            request += sock.recv(4096)
        return re.search(rb"Sec-WebSocket-Key: *(\S+)", request, re.I)[1].decode()

    def accept(self, sock) -> None:
        key = self.request_key(sock)
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     + f"Sec-WebSocket-Accept: {accept_for(key)}\r\n\r\n".encode())

    def pour(self, sock, chunk: bytes) -> None:
        """Send ``chunk`` again and again, up to HOSTILE_BYTES, until the client hangs up."""
        while self.sent < HOSTILE_BYTES:
            sock.sendall(chunk)
            self.sent += len(chunk)


# Runs the client and reports its peak RSS. The kernel's ru_maxrss for a child
# counts the address space it forked from until it execs, so straight from
# pytest it would report pytest's own size; from this small parent it reports
# the client's.
MEASURE = ("import os, sys; pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ); "
           "_, status, usage = os.wait4(pid, 0); print(usage.ru_maxrss); "
           "sys.exit(os.waitstatus_to_exitcode(status))")


def run_against(server: HostileServer, *args: str, timeout: float = 30) -> SimpleNamespace:
    """Run the client in listen-only mode; its status, its stderr, and its peak RSS from the kernel."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", MEASURE, *CLIENT, "--addr", server.addr, "--listen-only",
                                 *args], cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
        # A client that waits forever fails, not hangs: the group holds the client and its parent.
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            out, _ = proc.communicate()
        finally:
            timer.cancel()
        err.seek(0)
        return SimpleNamespace(status=proc.returncode, stderr=err.read(), max_rss_kib=int(out or 0))


def test_trickled_handshake_is_bounded_by_the_connect_timeout():
    def trickle(server, sock) -> None:
        server.request_key(sock)
        for byte in itertools.cycle(b"HTTP/1.1 101 Switching Protocols\r\nX-Slow: y\r\n"):
            if server.sent > 600:  # 2 minutes of it: far past the client's 2 s
                return
            sock.sendall(bytes([byte]))
            server.sent += 1
            time.sleep(0.2)

    server = HostileServer(trickle)
    result = run_against(server, "--connect-timeout", "2")
    assert result.status == 1
    assert result.stderr == f"broadcast-client: cannot connect to ws://{server.addr}/ws: timed out\n"
    assert server.sent < 600


# A hang-up before the request is written reaches websockets' reader thread
# first or its handshake first, by the scheduler's choice: a few tries see both.
HANG_UP_TRIES = 5


def test_a_server_that_hangs_up_at_once_costs_one_line():
    for _ in range(HANG_UP_TRIES):
        server = HostileServer(lambda server, sock: None)  # accepted, then closed unread
        result = run_against(server)
        assert result.status == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"broadcast-client: cannot connect to ws://{server.addr}/ws: "), result.stderr


@pytest.fixture(scope="module")
def rss_bound_kib() -> int:
    """The client's peak RSS against a server that refuses at once, plus the headroom."""
    def refuse(server, sock) -> None:
        server.request_key(sock)
        sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    result = run_against(HostileServer(refuse))
    assert result.status == 1
    return result.max_rss_kib + RSS_HEADROOM_KIB


@pytest.mark.parametrize("header", [b"X-Pad: " + b"a" * (CHUNK_BYTES - 9) + b"\r\n",  # one endless line
                                    b"X-Pad: aaaa\r\n" * (CHUNK_BYTES // 13)],  # endless lines
                         ids=["one-line", "many-lines"])
def test_huge_response_headers_cost_one_line_and_flat_memory(header, rss_bound_kib):
    def huge(server, sock) -> None:
        server.request_key(sock)
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\n")
        server.pour(sock, header)

    server = HostileServer(huge)
    result = run_against(server)
    assert result.status == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("broadcast-client: cannot connect")
    assert result.max_rss_kib < rss_bound_kib, result


def test_refusal_body_cannot_drive_the_terminal():
    def refuse(server, sock) -> None:
        server.request_key(sock)
        body = f"go away {TERMINAL_GRABS}".encode()
        sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    result = run_against(HostileServer(refuse))
    assert result.status == 1
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "go away \\x1b]0;pwned\\x07\\x1b[31mred" in result.stderr


def test_close_reason_cannot_drive_the_terminal():
    def close(server, sock) -> None:
        server.accept(sock)
        sock.sendall(build_frame(0x8, close_payload(4000, TERMINAL_GRABS), mask=False))
        sock.recv(1024)

    result = run_against(HostileServer(close))
    assert result.status == 1
    assert result.stderr == "connection closed by server: 4000 unknown code (\\x1b]0;pwned\\x07\\x1b[31mred)\n"


def test_a_200_mb_message_is_refused_with_flat_memory(rss_bound_kib):
    def big(server, sock) -> None:
        server.accept(sock)
        sock.sendall(build_frame(0x1, b"", length=HOSTILE_BYTES, mask=False))
        server.pour(sock, b"a" * CHUNK_BYTES)

    server = HostileServer(big)
    result = run_against(server)
    assert result.status == 1
    assert result.stderr == ("connection closed: the server sent a message over --max-message-size "
                             f"({4 * 1024 * 1024} bytes)\n")
    assert result.max_rss_kib < rss_bound_kib, result


def test_an_endless_fragmented_message_is_refused_with_flat_memory(rss_bound_kib):
    def endless(server, sock) -> None:
        server.accept(sock)
        sock.sendall(build_frame(0x1, b"a" * 1024, fin=False, mask=False))
        server.pour(sock, build_frame(0x0, b"a" * (64 * 1024), fin=False, mask=False) * 16)

    server = HostileServer(endless)
    result = run_against(server, "--max-message-size", "1000000")
    assert result.status == 1
    assert result.stderr == ("connection closed: the server sent a message over --max-message-size "
                             "(1000000 bytes)\n")
    assert result.max_rss_kib < rss_bound_kib, result


def test_an_error_line_is_bounded_in_length():
    def invalid(server, sock) -> None:
        server.accept(sock)
        sock.sendall(build_frame(0x1, b"\xff" * CHUNK_BYTES, mask=False))
        sock.recv(1024)

    result = run_against(HostileServer(invalid))
    assert result.status == 1
    assert result.stderr.count("\n") == 1 and len(result.stderr) < 300, result.stderr
    assert result.stderr.startswith("connection closed: the server broke the protocol: 1007")
