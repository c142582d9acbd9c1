"""Fixtures shared by test files: the reference task server on loopback; the
built package and a throwaway root to install it in (tests/packaged.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from packaged import Root, build
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
