"""The status outbox: the ``outbox`` table in the agent's state DB, and every
SQL statement on it.

Events not yet accepted by the server wait here in the order they happened.
The CTA appends them inside its own transaction (``append``, ``requeue``:
a task's state and its event are committed together, agent/cta/taskdb.py);
the uploader reads them oldest first and deletes only the ids the server
accepted (``Outbox``); ``dsagent status``, doctor and the benches look at
``summary``. Until accepted, an event survives any crash, reboot or outage.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.errors import DsagentError
from agent.common.statedb import connect, connect_read_only, db_path, write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL UNIQUE,
    task_id    TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


def create_table(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)


# ---- the CTA's writes, inside its transaction --------------------------------
def append(conn: sqlite3.Connection, event_id: str, task_id: str, body: str,
           created_at: float) -> None:
    conn.execute("INSERT INTO outbox(event_id, task_id, body, created_at) VALUES (?,?,?,?)",
                 (event_id, task_id, body, created_at))


def requeue(conn: sqlite3.Connection, event_id: str, task_id: str, body: str) -> bool:
    """Queue an event again (same event_id); False if it is still waiting."""
    cur = conn.execute("INSERT OR IGNORE INTO outbox(event_id, task_id, body, created_at) "
                       "VALUES (?,?,?,?)", (event_id, task_id, body, time.time()))
    return cur.rowcount == 1


def events_waiting(conn: sqlite3.Connection, event_ids: list[str]) -> int:
    """How many of ``event_ids`` the server has not accepted yet."""
    count = 0
    for start in range(0, len(event_ids), 500):       # SQLite's variable limit
        chunk = event_ids[start:start + 500]
        count += conn.execute(f"SELECT COUNT(*) FROM outbox WHERE event_id IN "
                              f"({','.join('?' * len(chunk))})", chunk).fetchone()[0]
    return count


def tasks_waiting(conn: sqlite3.Connection) -> set[str]:
    """Tasks with an event still waiting (the CTA must not forget them yet)."""
    return {tid for (tid,) in conn.execute("SELECT DISTINCT task_id FROM outbox")}


# ---- how deep it is ----------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    waiting: int                # events not yet accepted by the server
    oldest_s: float | None      # age of the oldest one, None if none waits
    body_bytes: int = 0         # their JSON bodies together (only when asked: sizes=True)


def _depth(conn: sqlite3.Connection, sizes: bool = False) -> Summary:
    """The one depth query; ``sizes`` reads every body, so not on the uploader's path."""
    count, oldest, size = conn.execute(
        "SELECT COUNT(*), MIN(created_at), " + ("TOTAL(LENGTH(body))" if sizes else "0")
        + " FROM outbox").fetchone()
    return Summary(count, (time.time() - oldest) if oldest else None, int(size))


def summary(state_dir: str | Path, sizes: bool = False) -> Summary:
    """The outbox of the agent in ``state_dir``, read only (it may be running).
    ``sizes`` also adds up the bodies (reads every row: not for status or doctor).

    Raises DsagentError naming the file if there is none yet or it cannot be read.
    """
    path = db_path(state_dir)
    if not path.exists():
        raise DsagentError(f"no state DB at {path} yet")
    try:
        conn = connect_read_only(path)
        try:
            return _depth(conn, sizes=sizes)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise DsagentError(f"cannot read {path}: {exc}") from exc


# ---- the uploader's side -----------------------------------------------------
class Outbox:
    def __init__(self, path: str | Path):
        # Deleting accepted events need not wait for fsync: a delete lost to a
        # power cut only re-sends events the server de-duplicates by event_id.
        self._conn = connect(path, synchronous="NORMAL")
        create_table(self._conn)
        self._lock = threading.Lock()

    def batch(self, limit: int = 500, skip_tasks: set[str] = frozenset()) -> list[dict[str, Any]]:
        """Up to ``limit`` events, in the order they happened, none of ``skip_tasks``."""
        marks = ",".join("?" * len(skip_tasks))
        with self._lock:
            rows = self._conn.execute(
                f"SELECT body FROM outbox WHERE task_id NOT IN ({marks}) ORDER BY id LIMIT ?",
                (*skip_tasks, limit)).fetchall()
        return [json.loads(body) for (body,) in rows]

    def depth_of(self, task_ids: set[str]) -> int:
        """Events waiting for the given tasks."""
        if not task_ids:
            return 0
        with self._lock:
            return self._conn.execute(
                f"SELECT COUNT(*) FROM outbox WHERE task_id IN ({','.join('?' * len(task_ids))})",
                tuple(task_ids)).fetchone()[0]

    def delete(self, event_ids: list[str]) -> int:
        """Forget accepted events; return how many were removed."""
        if not event_ids:
            return 0
        removed = 0
        with self._lock, write_transaction(self._conn):
            for start in range(0, len(event_ids), 500):
                chunk = event_ids[start:start + 500]
                cur = self._conn.execute(
                    f"DELETE FROM outbox WHERE event_id IN ({','.join('?' * len(chunk))})",
                    chunk)
                removed += cur.rowcount
        return removed

    def depth(self) -> Summary:
        """How many events wait and the age of the oldest (no body sizes)."""
        with self._lock:
            return _depth(self._conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
