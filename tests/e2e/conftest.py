"""Fixtures shared by the end-to-end modules: piped clients, and one real redis-server per test that asks for it."""

from __future__ import annotations

import pytest
from pytest_redis.config import get_config

from support.process import ClientProcess, clean_env
from support.redis import NOT_INSTALLED, TestRedis


@pytest.fixture
def piped():
    """Factory: ``piped("--addr", ...)`` -> a ClientProcess in pipe mode, killed at the end of the test."""
    clients: list[ClientProcess] = []

    def start(*args: str) -> ClientProcess:
        clients.append(ClientProcess(*args, env=clean_env()))
        return clients[-1]

    yield start
    for client in clients:
        client.kill()


@pytest.fixture
def redis_server(request, tmp_path_factory):
    """A redis-server on a free port, stopped at teardown; SKIPPED, saying why, without the binary."""
    if not get_config(request).exec:
        pytest.skip(NOT_INSTALLED)
    server = TestRedis(request, tmp_path_factory.mktemp("redis")).start()
    yield server
    server.close()
