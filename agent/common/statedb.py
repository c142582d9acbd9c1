"""The agent's state DB file, ``<state_dir>/dsagent.db``, and its durability settings.

One SQLite file holds the CTA's task states (agent/cta/taskdb.py) and the
status outbox (ctdataloader/outbox.py), so that a state change and its event
are one transaction. Both sides open it here: WAL, and ``synchronous=FULL``
for the CTA; the uploader's deletes may use NORMAL (a lost delete only
re-sends an event the server de-duplicates).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def db_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "dsagent.db"


def connect(path: str | Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open the state DB for writing: WAL; ``synchronous=FULL`` unless the
    caller's writes may be lost to a power cut (docs/reliability.md)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def connect_read_only(path: str | Path) -> sqlite3.Connection:
    """Open the state DB to look at it (``dsagent status``, doctor): never writes."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back if the body raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
