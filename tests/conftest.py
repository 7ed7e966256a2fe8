"""Real server processes on 127.0.0.1, started on port 0, for every test that needs one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on wss?://([0-9.]+|\[[0-9a-f:.]+\]):(\d+)/ws")  # IPv6 in brackets
START_TIMEOUT_S = 10.0


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus any BROADCAST_* the developer has set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCAST_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class ServerProcess:
    """A running ``scripts/server.py``, with its log lines collected as they come."""

    def __init__(self, args, env=None, expect_listening: bool = True, program=None, preexec_fn=None) -> None:
        # ``program``: what runs the server, when not this interpreter on this checkout.
        program = program or [sys.executable, str(ROOT / "scripts" / "server.py")]
        cmd = [*program, "--host", "127.0.0.1", *args]
        if not any(a == "--port" or a.startswith("--port=") for a in args):
            cmd += ["--port", "0"]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env or clean_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        self.host = "127.0.0.1"
        self.port = 0
        if expect_listening:
            match = self.wait_for_log(LISTENING, START_TIMEOUT_S)
            self.port = int(match.group(2))

    def _collect(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern, timeout: float = 5.0, count: int = 1):
        """Wait until ``count`` log lines match; return the last match."""
        pattern = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [m for m in map(pattern.search, self.lines) if m]
                if len(matches) >= count:
                    return matches[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no log line matching {pattern.pattern!r} (x{count}) within {timeout}s; log:\n"
                        + "\n".join(self.lines[-40:])
                    )
                self._changed.wait(remaining)

    def wait_exit(self, timeout: float = 10.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def start_server():
    """Factory: ``start_server("--max-connections", "2")`` -> ServerProcess."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, expect_listening: bool = True, program=None,
              preexec_fn=None):
        server = ServerProcess(list(args), env=env, expect_listening=expect_listening, program=program,
                               preexec_fn=preexec_fn)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server(start_server):
    return start_server()
