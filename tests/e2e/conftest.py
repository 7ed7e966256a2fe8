"""Fixtures for the client's tests (test_client.py, test_client_rooms.py)."""

from __future__ import annotations

import pytest

from support.process import ClientProcess, clean_env


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
