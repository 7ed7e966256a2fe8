"""Fixtures for every test: real server processes on 127.0.0.1, started on port 0."""

from __future__ import annotations

import os

import pytest

from support.process import ServerProcess


@pytest.fixture
def start_server():
    """Factory: ``start_server("--max-connections", "2", **ServerProcess options)`` -> ServerProcess."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, **options):
        server = ServerProcess(list(args), env=env, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server(start_server):
    return start_server()


@pytest.fixture
def no_broadcast_env(monkeypatch):
    """Parser tests read os.environ: start each one without the developer's BROADCAST_*."""
    for key in list(os.environ):
        if key.startswith("BROADCAST_"):
            monkeypatch.delenv(key)
