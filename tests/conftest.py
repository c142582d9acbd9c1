"""Fixtures shared by test files: the reference task server on loopback; the
built package and a throwaway root to install it in (tests/packaged.py); the
one way to wait for a condition (``from conftest import wait_until``); a
stand-in objecthost for the server's tickles (``TickleListener``); and a
PostgreSQL cluster of the run with a fresh database per test (tests/pgcluster.py)."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from agent.common.tickle import ReplayCache, check_tickle
from packaged import Root, build
from pgcluster import PgCluster
from taskserver import TaskServer, TaskStore

ENROLL_KEY = "let-me-in"


class TickleListener:
    """An objecthost stand-in on loopback: notes each tickle line and when it came.
    Given the client's id and tickle key it checks the line and answers OK or
    ``ERR <code>`` as the objecthost does; without them it answers OK."""

    def __init__(self, client_id: str | None = None, key: bytes | None = None):
        self.client_id, self.key, self.cache = client_id, key, ReplayCache()
        self.lines: list[bytes] = []
        self.times: list[float] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _answer(self, line: bytes) -> bytes:
        if self.key is None:
            return b"OK\n"
        try:
            self.cache.remember(check_tickle(line, self.client_id, self.key, self.cache),
                                time.time())
            return b"OK\n"
        except Exception as exc:
            return f"ERR {getattr(exc, 'code', 'bad-frame')}\n".encode()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    line = conn.makefile("rb").readline(600)
                    self.lines.append(line)
                    self.times.append(time.monotonic())
                    conn.sendall(self._answer(line))
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def wait_until(condition, timeout: float, what: str, interval: float = 0.02):
    """Call ``condition`` until it returns something true, and return that.

    An exception from it counts as "not yet" (an ``assert`` in it can say
    what was seen); past ``timeout`` s the test fails naming ``what`` and the
    last value or exception. ``pytest.fail()`` in it stops at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        error = None
        try:
            value = condition()
        except Exception as exc:
            value, error = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            last = f"{type(error).__name__}: {error}" if error else f"{value!r}"[:2000]
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; "
                                 f"last seen: {last}") from error
        time.sleep(interval)


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` (a condition)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def pytest_generate_tests(metafunc):
    """A test module with ``BACKENDS = ("sqlite", "postgresql")`` runs each test that
    uses the task server's database on both; others on SQLite only."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", getattr(metafunc.module, "BACKENDS", ("sqlite",)))


@pytest.fixture
def store_target(backend, tmp_path, request) -> str:
    """Where the task server keeps its state: an SQLite file, or a fresh
    PostgreSQL database of the run's cluster."""
    if backend == "postgresql":
        return request.getfixturevalue("pg_dsn")
    return str(tmp_path / "server.db")


@pytest.fixture
def store(store_target):
    with TaskStore(store_target) as s:
        yield s


@pytest.fixture
def server(store):
    """A task server on a free loopback port: registration with ENROLL_KEY, polls every 17 s."""
    srv = TaskServer(store, enrollment_key=ENROLL_KEY, poll_interval_s=17).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, Path]:
    """The sdist, wheel and .deb of `make package`, built once per run."""
    return build(tmp_path_factory.mktemp("dist"))


@pytest.fixture
def root(tmp_path):
    """A Root (tests/packaged.py), mounted; skips where that cannot be done."""
    if os.geteuid() != 0:
        pytest.skip("installing the .deb into a throwaway root needs root (mount namespaces)")
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("util-linux unshare/nsenter not found")
    try:
        tree = Root(tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        why = tree.mount()
        if why:
            pytest.skip(f"cannot mount an overlay of / here: {why}")
        yield tree
    finally:
        tree.close()


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL cluster of this run (tests/pgcluster.py); fails if it cannot start."""
    with PgCluster() as cluster:
        yield cluster


_database_numbers = itertools.count()


@pytest.fixture
def pg_dsn(pg_cluster, request):
    """The DSN of a fresh database for this test, named after it, dropped afterwards."""
    test_id = request.node.nodeid.rsplit("/", 1)[-1].lower()
    slug = re.sub(r"[^a-z0-9]+", "_", test_id).strip("_")[:48]
    name = f"t{next(_database_numbers)}_{slug}"
    yield pg_cluster.create_database(name)
    pg_cluster.drop_database(name)
