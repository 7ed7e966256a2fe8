"""Start, observe and stop the servers under test, the same way for all of them.

Each measurement gets a fresh server process, so memory and thread counts
start from zero and no run inherits another's backlog. Everything observed
about a server comes from /proc and the kernel's socket diagnostics, which
cost it nothing.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
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
_TCP_ESTABLISHED = 1
# sock_diag(7): ask the kernel about one TCP socket by its addresses.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF

# Redis for the multi-node scenario: Debian's, or the first on PATH.
REDIS_SERVER = "/usr/bin/redis-server"
# A node with --redis-url answers /healthz {"redis": "ok"} once subscribed;
# it normally is before it listens, but gives up waiting after 2 s.
SUBSCRIBED_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 2.0  # one /healthz request
_PR_SET_PDEATHSIG = 1
# Loopback HTTP must not go through an http_proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

NAMES = {"ours": "broadcast", "ref": "websockets", "picows": "picows", "socketify": "socketify",
         "gorilla": "gorilla hub", "floor": "design floor"}
# The peers written in Python: the module each runs, and what it imports.
PYTHON_PEERS = {"ref": ("benchmarks.reference_server", "websockets"),
                "picows": ("benchmarks.peers.picows_server", "picows"),
                "socketify": ("benchmarks.peers.socketify_server", "socketify"),
                "floor": ("benchmarks.peers.threaded_floor", "websockets")}
# The Go peer is built at every run (go's build cache makes a rebuild ~0.1 s)
# against Debian's golang-github-gorilla-websocket-dev in GOPATH mode, since
# Go modules cannot be fetched here.
GORILLA_SOURCE = ROOT / "benchmarks" / "peers" / "gorilla_hub"
GORILLA_BINARY = ROOT / "benchmarks" / "results" / "gorilla-hub"  # git-ignored
GO_PATH = "/usr/share/gocode"
# A first build of the Go peer takes ~2 s here; far longer means something is wrong.
BUILD_TIMEOUT_S = 120.0
PIP_HINT = "pip install -e '.[bench]'"
GO_HINT = "apt-get install golang-go golang-github-gorilla-websocket-dev"


def _failure(cmd: list[str], what: str, hint: str, last_only: bool, **kwargs) -> str | None:
    """Run a preparation step; None if it succeeded, else what went wrong, with its stderr on one line.

    ``last_only``: just the last line, where it says it all (a Python traceback's).
    """
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, **kwargs)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{what}: {exc}"
    if done.returncode:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        said = (lines[-1:] if last_only else lines) or [f"exit {done.returncode}"]
        return f"{what}: {' '.join(said)} ({hint})"
    return None


def prepare(kind: str) -> str | None:
    """Make peer ``kind`` ready to start; None if it is, else why it is missing (shown in the report)."""
    if kind in PYTHON_PEERS:  # imported in a child: a library that fails to load must not take the harness along
        module = PYTHON_PEERS[kind][1]
        return _failure([sys.executable, "-c", f"import {module}"], f"import {module}", PIP_HINT, True, cwd=ROOT)
    if kind == "gorilla":
        go = shutil.which("go")
        if go is None:
            return f"go not found ({GO_HINT})"
        GORILLA_BINARY.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GO111MODULE="off", GOPATH=GO_PATH, GOFLAGS="")
        return _failure([go, "build", "-o", str(GORILLA_BINARY), "."], "go build", GO_HINT, False,
                        cwd=GORILLA_SOURCE, env=env)
    return None


def _command(kind: str, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    if kind == "ours":
        return [sys.executable, str(ROOT / "scripts" / "server.py"), "--host", HOST,
                "--port", str(port), "--log-level", "WARNING", "--ping-interval", "0", *extra]
    if kind == "redis":
        exe = REDIS_SERVER if os.access(REDIS_SERVER, os.X_OK) else shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        # Loopback only, no persistence, logs to stdout (the servers' log).
        return [exe, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--protected-mode", "yes", "--logfile", "", "--loglevel", "warning",
                *extra]
    if kind == "gorilla":
        return [str(GORILLA_BINARY), "-host", HOST, "-port", str(port), *extra]
    return [sys.executable, "-m", PYTHON_PEERS[kind][0], "--host", HOST, "--port", str(port), *extra]


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies, even by SIGKILL: no server or load process outlives the harness."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def machine_idle_seconds() -> float:
    """CPU time all cores spent idle since boot (idle + iowait in /proc/stat).

    Busy time is then cores x wall time minus this: the kernel measures idle
    time exactly, while its busy counters are tick samples that miss much of
    a workload that sleeps and wakes thousands of times a second. Beside the
    server's and the load generator's own CPU, the busy time shows what else
    ran: other work on a shared machine, and kernel time no process is
    charged for.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / _CLK_TCK


def tcp_state(local_port: int, remote_port: int) -> int | None:
    """The TCP state (1 = ESTABLISHED) of the loopback socket with these ports, None if there is none.

    One netlink round trip (~25 us) for one socket, where reading
    /proc/net/tcp costs milliseconds per thousand sockets on the machine.
    """
    ip = socket.inet_aton(HOST)
    sockid = (struct.pack("!HH", local_port, remote_port) + ip + bytes(12) + ip + bytes(12)
              + struct.pack("=III", 0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE))
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, _ALL_STATES) + sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.send(header + request)
        reply = nl.recv(65536)
    if struct.unpack_from("=H", reply, 4)[0] == _NLMSG_ERROR:
        return None
    return reply[17]  # inet_diag_msg.idiag_state, after the 16-byte netlink header and family


def _redis_pong(sock: socket.socket) -> bool:
    """Whether the Redis on ``sock`` answers PING (a connected socket with a timeout)."""
    sock.sendall(b"PING\r\n")
    return sock.recv(64).startswith(b"+PONG")


def free_port() -> int:
    """A port nobody listens on now; our server hides its port at WARNING, so we choose it."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    kind: str  # a key of NAMES, or "redis"
    proc: subprocess.Popen
    port: int

    @classmethod
    def start(cls, kind: str, log, extra: tuple[str, ...] = (), cwd: Path = ROOT) -> ServerProcess:
        """Start a ``kind`` server whose stderr goes to the open file ``log``; return once it accepts.

        ``kind`` "redis" is a redis-server (stdout to ``log`` too), ready once it answers PING.
        """
        port = free_port()
        proc = subprocess.Popen(_command(kind, port, extra), cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=log if kind == "redis" else subprocess.DEVNULL, stderr=log,
                                preexec_fn=die_with_parent)
        server = cls(kind, proc, port)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"{kind} server exited with {proc.returncode} at start")
                try:
                    with socket.create_connection((HOST, port), timeout=0.5) as s:
                        if kind != "redis" or _redis_pong(s):
                            return server
                except OSError:
                    pass
                time.sleep(0.05)
            raise RuntimeError(f"{kind} server did not listen on {port} within {START_TIMEOUT_S} s")
        except BaseException:
            server.stop()
            raise

    def health(self) -> dict:
        """Our server's /healthz answer (200 or 503 alike); raises OSError or ValueError."""
        url = f"http://{HOST}:{self.port}/healthz"
        try:
            with _NO_PROXY.open(url, timeout=HEALTH_TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return json.loads(error.read())

    def wait_subscribed(self, timeout: float = SUBSCRIBED_TIMEOUT_S) -> None:
        """Return once this node of ours reports its Redis subscription; raise after ``timeout``."""
        deadline = time.monotonic() + timeout
        state = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode} at start")
            try:
                state = self.health().get("redis")
                if state == "ok":
                    return
            except (OSError, ValueError) as exc:
                state = str(exc)
            time.sleep(0.05)
        raise RuntimeError(f"node on {self.port} not subscribed to Redis within {timeout:.0f} s ({state})")

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

        Asked of the kernel, so it works for a client that never reads and so
        never sees the close frame or FIN queued behind data it does not take.
        """
        return tcp_state(self.port, client_port) == _TCP_ESTABLISHED

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
