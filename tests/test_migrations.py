"""The task server's schema migrations (taskserver/store.py ``migrations()``,
taskserver/db.py): an older database is brought up to date with its rows
kept, a newer one is refused by name, and both engines end at one version."""

from __future__ import annotations

import json
import sqlite3
import uuid

import pytest

from taskserver.checks import StoreError
from taskserver.store import SCHEMA, TaskStore, migrations

LATEST = max(migrations())


def test_a_version_1_sqlite_database_is_migrated_with_its_rows(tmp_path):
    path = tmp_path / "old.db"
    taken, waiting = str(uuid.uuid4()), str(uuid.uuid4())
    with sqlite3.connect(path) as db:                     # what the first server made
        db.executescript(SCHEMA)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO clients (client_id, token, tickle_key, registered_at) "
                   "VALUES ('pc-1', 't', '00', '2026-01-01T00:00:00Z')")
        for task_id in (taken, waiting):
            db.execute("INSERT INTO tasks (task_id, client_id, type, params, queued_at) "
                       "VALUES (?, 'pc-1', 'RunScript', ?, '2026-01-01T00:00:00Z')",
                       (task_id, json.dumps({"script": "true"})))
        db.execute("INSERT INTO events (event_id, task_id, seq, state, at, received_at) "
                   "VALUES (?, ?, 1, 'received', '2026-01-01T00:00:01Z', "
                   "'2026-01-01T00:00:01Z')", (str(uuid.uuid4()), taken))
    with TaskStore(str(path)) as store:
        assert store.db.read("PRAGMA user_version")[0][0] == LATEST
        # the agent had taken one: only the other is listed (docs/protocol-notes.md)
        assert [t["task_id"] for t in store.deliverable_tasks("pc-1", 10)] == [waiting]
        assert [t["task_id"] for t in store.pending_tasks("pc-1")] == [taken, waiting]
        assert store.db.read("SELECT COUNT(*) FROM pxe_settings")[0][0] == 0   # version 3
    with TaskStore(str(path)) as store:                   # opened again: nothing to do
        assert store.db.read("PRAGMA user_version")[0][0] == LATEST


def test_a_database_newer_than_the_server_is_refused(tmp_path):
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {LATEST + 1}")
    with pytest.raises(StoreError, match=f"schema version {LATEST + 1} is newer than this "
                                         f"server's \\({LATEST}\\)"):
        TaskStore(str(path))


def test_postgresql_ends_at_the_same_version_and_migrates_once(pg_dsn):
    with TaskStore(pg_dsn) as store:
        assert store.db.read("SELECT version FROM dsagent_schema")[0][0] == LATEST
        store.enroll("pc-1")
    with TaskStore(pg_dsn) as store:
        assert [r[0] for r in store.db.read("SELECT version FROM dsagent_schema")] == [LATEST]
        assert store.client("pc-1") is not None
