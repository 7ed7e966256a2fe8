"""Real server and client processes on 127.0.0.1, from this checkout, with a clean environment.

One launcher for every test: ``Child`` runs a program of this checkout with
``clean_env`` and reads its output pipes in threads (``Lines``), so that a test
waits on a line or on the exit with a timeout, never on a blocking read.
``ServerProcess`` adds what a server has (its port, its log, /healthz);
``ClientProcess`` is ``scripts/client.py`` fed line by line; ``run`` is one
program run to its end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support import rawws

ROOT = Path(__file__).resolve().parents[2]  # the checkout: this file is tests/support/process.py
SERVER = [sys.executable, str(ROOT / "scripts" / "server.py")]
CLIENT = [sys.executable, str(ROOT / "scripts" / "client.py")]
LISTENING = re.compile(r"listening on wss?://([0-9.]+|\[[0-9a-f:.]+\]):(\d+)/ws")  # IPv6 in brackets
START_TIMEOUT_S = 10.0  # a server's start under a loaded CI machine
RUN_TIMEOUT_S = 20.0  # one short-lived program (a bad flag, --version, a pipe of a few lines)
WAIT_S = 5.0  # any one expected line or state
HEALTH_PATH = "/healthz"
PLAIN_GET = ("Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version")  # not an upgrade


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus any BROADCAST_* the developer has set, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCAST_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(program: list[str], *args: str, env: dict[str, str] | None = None, input: str = "",
        timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``program`` (e.g. ``SERVER`` or ``CLIENT``) run to its end with ``input`` on stdin."""
    return subprocess.run([*program, *args], cwd=ROOT, env=env or clean_env(), input=input,
                          capture_output=True, text=True, timeout=timeout)


class Lines:
    """The lines of a child's pipe, read by a thread so that a test can wait with a timeout.

    ``lines`` is everything so far; ``expect`` consumes them in order and
    ``seen`` is what it has consumed.
    """

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.seen: list[str] = []
        self.ended = False
        self._changed = threading.Condition()  # guards lines and ended
        self._reader = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._reader.start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_until(self, ready, timeout: float = WAIT_S) -> bool:
        """Wait until ``ready(lines)`` or the stream ends; whether ``ready`` holds."""
        with self._changed:
            self._changed.wait_for(lambda: self.ended or ready(self.lines), timeout)
            return bool(ready(self.lines))

    def wait_for(self, pattern, timeout: float = WAIT_S, count: int = 1) -> re.Match:
        """Wait until ``count`` lines match ``pattern``; return the last match."""
        pattern = re.compile(pattern)

        def matches(lines):
            return [m for m in map(pattern.search, lines) if m]

        if not self.wait_until(lambda lines: len(matches(lines)) >= count, timeout):
            raise AssertionError(f"no line matching {pattern.pattern!r} (x{count}) within {timeout}s; lines:\n"
                                 + "\n".join(self.lines[-40:]))
        with self._changed:
            return matches(self.lines)[count - 1]

    def expect(self, wanted: str, timeout: float = WAIT_S) -> str:
        """The first line not yet consumed that contains ``wanted``."""
        start = len(self.seen)
        if not self.wait_until(lambda lines: any(wanted in line for line in lines[start:]), timeout):
            raise AssertionError(f"no line with {wanted!r} within {timeout}s (ended={self.ended}); "
                                 f"lines: {self.lines}")
        with self._changed:
            at = next(i for i in range(start, len(self.lines)) if wanted in self.lines[i])
            self.seen.extend(self.lines[start:at + 1])
            return self.lines[at]

    def all(self, timeout: float = WAIT_S) -> list[str]:
        """Every line, once the stream has ended."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.ended, timeout):
                raise AssertionError(f"stream still open after {timeout}s; lines: {self.lines}")
            self.seen = list(self.lines)
            return self.seen

    def join(self, timeout: float) -> None:
        self._reader.join(timeout)


class Child:
    """A program of this checkout running on its own, its output pipes read by ``Lines``."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, *, stdin: bool = False,
                 stdout: bool = False, preexec_fn=None) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env or clean_env(), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=preexec_fn,
        )
        self.stdout = Lines(self.proc.stdout) if stdout else None
        self.stderr = Lines(self.proc.stderr)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float = 10.0) -> int:
        rc = self.proc.wait(timeout)
        for lines in (self.stdout, self.stderr):
            if lines is not None:
                lines.join(timeout)
        return rc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class ServerProcess(Child):
    """A running ``scripts/server.py`` (or ``program``), with its log lines collected as they come.

    ``--port 0`` is added unless ``args`` name a port or ``add_port`` is off (a
    test of where the port comes from); with ``expect_listening`` the start
    waits for the "listening on" line and learns the port from it.
    """

    def __init__(self, args, env=None, expect_listening: bool = True, program=None, preexec_fn=None,
                 add_port: bool = True) -> None:
        cmd = [*(program or SERVER), "--host", "127.0.0.1", *args]
        if add_port and not any(a == "--port" or a.startswith("--port=") for a in args):
            cmd += ["--port", "0"]
        super().__init__(cmd, env, preexec_fn=preexec_fn)
        self.host = "127.0.0.1"
        self.port = 0
        if expect_listening:
            self.port = int(self.wait_for_log(LISTENING, START_TIMEOUT_S).group(2))

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def lines(self) -> list[str]:
        return self.stderr.lines

    @property
    def log(self) -> str:
        return self.stderr.text

    def wait_for_log(self, pattern, timeout: float = 5.0, count: int = 1) -> re.Match:
        """Wait until ``count`` log lines match; return the last match."""
        return self.stderr.wait_for(pattern, timeout, count)

    def listening_port(self, timeout: float = START_TIMEOUT_S) -> int | None:
        """The port it listens on, or None if it exited instead."""
        if self.stderr.wait_until(lambda lines: any(map(LISTENING.search, lines)), timeout):
            self.port = int(self.stderr.wait_for(LISTENING, 0).group(2))
            return self.port
        assert self.stderr.ended, f"server neither listened nor exited within {timeout}s"
        return None


def module_server(name: str, *args: str):
    """A module-scoped fixture called ``name``: one server for all of a module's tests that ask for it.

    For suites of many short exchanges with one server configuration, where
    a server per test would be most of the run time.
    """
    @pytest.fixture(scope="module", name=name)
    def fixture():
        server = ServerProcess(list(args))
        yield server
        server.kill()
    return fixture


class ClientProcess(Child):
    """``scripts/client.py`` in pipe mode whose stdin stays open until the test closes it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, stdin: bool = True) -> None:
        super().__init__([*CLIENT, *args], env, stdin=stdin, stdout=True)

    def wait(self, timeout: float = WAIT_S) -> int:
        return self.wait_exit(timeout)


def health(server, timeout: float = WAIT_S) -> tuple[int, list[str], str]:
    """GET /healthz: (status, every Content-Type header, body text)."""
    url = f"http://{server.host}:{server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers.get_all("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers.get_all("Content-Type"), error.read().decode()


def settled_health(server, timeout: float = WAIT_S) -> tuple[int, dict]:
    """GET /healthz and read on until the server hangs up: (status, parsed body).

    The probe is one of the server's connections while it lasts (towards the
    per-address limits, and one more in the shutdown's "closing N
    connection(s)") until the server has seen it hang up, a moment after
    this returns: a test that counts the server's connections right after
    must wait on something else. ``health`` is the one for what a real HTTP
    client sees, headers and all.
    """
    with rawws.open_socket(server.port, timeout) as sock:
        sock.sendall(rawws.handshake_request(server.port, HEALTH_PATH, omit=PLAIN_GET))
        response = rawws.read_http_response(sock, timeout)
        assert response is not None, "server hung up without answering /healthz"
        assert rawws.is_eof_or_reset(sock, timeout), "server kept the /healthz connection open"
    return response.status, json.loads(response.body)


def wait_health(server, ready, timeout: float = WAIT_S, what: str = "") -> dict:
    """Poll /healthz until ``ready(body)`` holds for its parsed JSON body; that body.

    Readiness by state, not by the wording of a log line.
    """
    deadline = time.monotonic() + timeout
    while True:
        status, body = settled_health(server)
        if ready(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz still {status} {body} after {timeout}s, not {what}")
        time.sleep(0.02)


def wait_connections(server, n: int, timeout: float = WAIT_S) -> dict:
    """Wait until /healthz counts exactly ``n`` joined clients."""
    return wait_health(server, lambda body: body["connections"] == n, timeout, f"{n} joined")


def wait_joined(server, n: int, timeout: float = WAIT_S) -> dict:
    """Wait until /healthz counts at least ``n`` joined clients: everyone up to the n-th is in."""
    return wait_health(server, lambda body: body["connections"] >= n, timeout, f"{n} or more joined")


def wait_left(server, n: int, timeout: float = WAIT_S) -> dict:
    """Wait until /healthz counts at most ``n`` joined clients: the others are gone."""
    return wait_health(server, lambda body: body["connections"] <= n, timeout, f"{n} or fewer joined")
