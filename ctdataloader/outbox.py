"""The uploader's view of the outbox table in the agent's state DB.

Events are read oldest first and deleted only once the server has accepted
their ids; until then they survive any crash, reboot or outage.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from agent.cta.statedb import connect


class Outbox:
    def __init__(self, path: str | Path):
        self._conn = connect(path)
        # Deleting accepted events need not wait for fsync: a delete lost to a
        # power cut only re-sends events the server de-duplicates by event_id.
        self._conn.execute("PRAGMA synchronous=NORMAL")
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
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                for start in range(0, len(event_ids), 500):
                    chunk = event_ids[start:start + 500]
                    cur = self._conn.execute(
                        f"DELETE FROM outbox WHERE event_id IN ({','.join('?' * len(chunk))})",
                        chunk)
                    removed += cur.rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        return removed

    def depth(self) -> tuple[int, float | None]:
        """(events waiting, age in seconds of the oldest one or None)."""
        with self._lock:
            count, oldest = self._conn.execute(
                "SELECT COUNT(*), MIN(created_at) FROM outbox").fetchone()
        return count, (time.time() - oldest) if oldest else None

    def close(self) -> None:
        with self._lock:
            self._conn.close()
