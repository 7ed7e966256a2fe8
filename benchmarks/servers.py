"""Start, observe and stop the servers under test, the same way for both.

Each measurement gets a fresh server process, so memory and thread counts
start from zero and no run inherits another's backlog. Everything observed
about a server comes from /proc, which costs it nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # all benchmark traffic stays on loopback
# A server that cannot listen within this is broken, not slow (ours imports
# configargparse and websockets, ~0.3 s).
START_TIMEOUT_S = 15.0
# SIGTERM, then SIGKILL after this: ours waits up to its shutdown timeout
# (5 s) for clients, which a benchmark has no use for.
STOP_TIMEOUT_S = 3.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_TCP_ESTABLISHED = "01"

NAMES = {"ours": "broadcast", "ref": "reference"}


def _command(kind: str, port: int) -> list[str]:
    if kind == "ours":
        return [sys.executable, str(ROOT / "scripts" / "server.py"), "--host", HOST,
                "--port", str(port), "--log-level", "WARNING", "--ping-interval", "0"]
    return [sys.executable, "-m", "benchmarks.reference_server", "--host", HOST, "--port", str(port)]


def free_port() -> int:
    """A port nobody listens on now; our server hides its port at WARNING, so we choose it."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    kind: str  # "ours" or "ref"
    proc: subprocess.Popen
    port: int

    @classmethod
    def start(cls, kind: str, log) -> ServerProcess:
        """Start a ``kind`` server whose stderr goes to the open file ``log``; return once it accepts."""
        port = free_port()
        proc = subprocess.Popen(_command(kind, port), cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log)
        server = cls(kind, proc, port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited with {proc.returncode} at start")
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                return server
            except OSError:
                time.sleep(0.05)
        server.stop()
        raise RuntimeError(f"{kind} server did not listen on {port} within {START_TIMEOUT_S} s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """utime + stime of all the server's threads so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            after_comm = f.read().rsplit(")", 1)[1].split()
        return (int(after_comm[11]) + int(after_comm[12])) / _CLK_TCK  # fields 14 and 15

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def rss_bytes(self) -> int:
        return self._status("VmRSS") * 1024

    def threads(self) -> int:
        return self._status("Threads")

    def still_connected(self, client_port: int) -> bool:
        """Whether the server's end of the connection from ``client_port`` is still ESTABLISHED.

        Read from the kernel, so it works for a client that never reads and
        cannot see a close frame or FIN queued behind data it never takes.
        """
        local = f"0100007F:{self.port:04X}"
        remote = f"0100007F:{client_port:04X}"
        with open("/proc/net/tcp") as f:
            for line in f:
                parts = line.split()
                if parts[1] == local and parts[2] == remote:
                    return parts[3] == _TCP_ESTABLISHED
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
