"""Fixtures shared by the end-to-end modules: piped clients, and real redis-servers for the tests marked redis."""

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
def redis_factory(request, tmp_path_factory):
    """Factory: ``redis_factory(start=True)`` -> a TestRedis, stopped at teardown."""
    assert request.node.get_closest_marker("redis"), "a test that needs Redis is marked redis"
    if not get_config(request).exec:
        pytest.skip(NOT_INSTALLED)
    made: list[TestRedis] = []

    def make(start: bool = True) -> TestRedis:
        # mktemp's short path keeps Redis's unix socket path under 107 bytes.
        server = TestRedis(request, tmp_path_factory.mktemp("redis"))
        made.append(server)
        return server.start() if start else server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def redis_server(redis_factory):
    return redis_factory()
