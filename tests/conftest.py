"""Fixtures shared by test files: the reference task server on loopback."""

from __future__ import annotations

import pytest

from taskserver import TaskServer, TaskStore

ENROLL_KEY = "let-me-in"


@pytest.fixture
def store(tmp_path):
    with TaskStore(str(tmp_path / "server.db")) as s:
        yield s


@pytest.fixture
def server(store):
    """A task server on a free loopback port: registration with ENROLL_KEY, polls every 17 s."""
    srv = TaskServer(store, enrollment_key=ENROLL_KEY, poll_interval_s=17).start()
    yield srv
    srv.stop()
