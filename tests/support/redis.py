"""Helpers for the multi-node tests (tests/e2e/test_redis.py): a real Redis, its /healthz state, receivers.

Redis is a real ``redis-server`` run by pytest-redis's ``RedisExecutor``
(mirakuru), on a free port chosen by ``port_for`` as pytest-redis does, with
persistence off. The executor, unlike pytest-redis's session-scoped
``redis_proc`` fixture, can be stopped and started again on the same port,
which the outage tests need. Every blocking call here takes a timeout.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import redis
from port_for import get_port
from pytest_redis.config import get_config
from pytest_redis.executor import RedisExecutor

from support import process

NOT_INSTALLED = "redis-server not installed: Redis tests SKIPPED (install redis-server or pass --redis-exec)"
START_TIMEOUT_S = 10


class TestRedis:
    """One redis-server: ``url``, ``stop()``/``start()`` on the same port, a redis-py client."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, request, datadir: Path) -> None:
        config = get_config(request)  # honours --redis-exec and the redis_exec ini key
        self.host = "127.0.0.1"
        self.port = get_port(None)
        self.executor = RedisExecutor(
            executable=config.exec,
            databases=1,
            redis_timeout=0,  # never drop idle clients
            loglevel="notice",
            host=self.host,
            port=self.port,
            startup_timeout=START_TIMEOUT_S,
            save='""',  # no RDB snapshots; appendonly is "no" by default
            datadir=datadir,
        )
        # DEBUG SLEEP, for the stall tests: Redis 7 refuses DEBUG unless told
        # (and an older one refuses the option).
        if self.executor.version.major >= 7:
            self.executor.command_parts += ["--enable-debug-command", "local"]
        self._clients: list[redis.Redis] = []
        self._admin: redis.Redis | None = None
        self._frozen = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> "TestRedis":
        self.executor.start()
        return self

    def stop(self) -> None:
        """A graceful stop (SIGTERM): Redis closes every client connection."""
        self.executor.stop()

    def crash(self) -> None:
        """SIGKILL: connections die with the process."""
        self.executor.kill(wait=True, sig=9)

    def freeze(self) -> None:
        """SIGSTOP: Redis keeps its sockets open and answers nothing, like a stalled host."""
        os.kill(self.executor.process.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        os.kill(self.executor.process.pid, signal.SIGCONT)
        self._frozen = False

    def running(self) -> bool:
        return self.executor.running()

    def client(self, timeout: float = 5.0) -> redis.Redis:
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=timeout,
                             socket_connect_timeout=timeout)
        self._clients.append(client)
        return client

    @property
    def admin(self) -> redis.Redis:
        """One shared redis-py client for the test's own queries."""
        if self._admin is None:
            self._admin = self.client()
        return self._admin

    def close(self) -> None:
        if self._frozen:
            self.thaw()
        for client in self._clients:
            client.close()
        self.executor.stop()


# /healthz


def wait_health(node, state: str, timeout: float = 5.0) -> dict:
    """Poll /healthz until its ``redis`` is ``state``; the body, parsed."""
    return process.wait_health(node, lambda body: body["redis"] == state, timeout, repr(state))


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil
    return sorted_values[int(rank) - 1]
