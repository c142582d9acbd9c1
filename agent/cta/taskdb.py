"""The CTA's task states in the state DB (agent/common/statedb.py).

Every status event is committed in one transaction with its task's new state
(the event goes to the outbox, ctdataloader/outbox.py), so after a crash the
two never disagree. The DB is in WAL mode with ``synchronous=FULL``: a commit
is on disk (fsync'd) before the CTA acts on the event it recorded.

``tasks`` has one row per task id ever received (so a re-delivered task is
never run twice), its last state, next seq and, once finished, its terminal
event (re-sent with the same event_id if the server lists the task again).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.events import TERMINAL, TransitionError, check_transition, make_event
from agent.common.statedb import connect, connect_read_only, write_transaction
from agent.common.task import Task
from ctdataloader import outbox

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id        TEXT PRIMARY KEY,
    type           TEXT NOT NULL,
    task_json      TEXT,
    state          TEXT NOT NULL,
    next_seq       INTEGER NOT NULL,
    terminal_event TEXT,
    updated_at     REAL NOT NULL
);
"""


def open_db(path: str | Path) -> sqlite3.Connection:
    """The state DB as the CTA opens it: its settings, both tables there."""
    conn = connect(path)
    conn.executescript(SCHEMA)
    outbox.create_table(conn)
    return conn


@dataclass
class Change:
    """One status event to record (see AgentDB.record)."""

    task_id: str
    state: str
    type_name: str = ""
    task: Task | None = None
    progress: float | None = None
    message: str = ""
    details: dict[str, Any] | None = None
    event: dict[str, Any] | None = None       # set once committed
    error: BaseException | None = None
    done: bool = False


class AgentDB:
    """The CTA's side of the state DB, safe to use from many threads.

    Writes use group commit: changes queued by threads that arrive while a
    commit is in flight are committed together by the next one, so N threads
    finishing at once pay one fsync, not N.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._conn = open_db(self.path)
        self._lock = threading.Lock()          # the connection; held by the committer
        self._pending: list[Change] = []
        self._pending_lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def record(self, task_id: str, state: str, *, type_name: str = "",
               task: Task | None = None, progress: float | None = None,
               message: str = "", details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Append one status event for a task, durably; return the event.

        ``received`` creates the task's row (``task`` is kept so a task that
        was queued but never started can be resumed after a restart).
        """
        [change] = self.record_many([Change(task_id, state, type_name, task, progress,
                                            message, details)])
        return change.event

    def record_many(self, changes: list[Change]) -> list[Change]:
        """Record several events durably, in order; raise the first error."""
        self.enqueue(changes)
        return self.wait(changes)

    def enqueue(self, changes: list[Change]) -> None:
        """Queue changes without waiting: any later change from any thread is
        committed after them (so a caller can start dependent work while the
        fsync runs, then ``wait``)."""
        with self._pending_lock:
            self._pending.extend(changes)

    def wait(self, changes: list[Change]) -> list[Change]:
        """Commit queued changes (with whatever else is queued) unless a
        concurrent commit already did; raise the first error among them."""
        with self._lock:
            if not all(c.done for c in changes):
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._commit(batch)
        for change in changes:
            if change.error is not None:
                raise change.error
        return changes

    def _commit(self, batch: list[Change]) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for change in batch:
                try:
                    self._apply(conn, change)
                except TransitionError as exc:  # a bug in the caller, not the batch's fault
                    change.error = exc
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for change in batch:
                change.event, change.error = None, change.error or exc
        finally:
            for change in batch:
                change.done = True

    @staticmethod
    def _apply(conn: sqlite3.Connection, change: Change) -> None:
        task_id, state = change.task_id, change.state
        row = conn.execute("SELECT state, next_seq FROM tasks WHERE task_id=?",
                           (task_id,)).fetchone()
        previous, seq = (row[0], row[1]) if row else (None, 1)
        check_transition(previous, state)
        event = make_event(task_id, seq, state, change.progress, change.message, change.details)
        body = json.dumps(event, separators=(",", ":"))
        now = time.time()
        outbox.append(conn, event["event_id"], task_id, body, now)
        terminal = body if state in TERMINAL else None
        if row is None:
            task = change.task
            conn.execute(
                "INSERT INTO tasks(task_id, type, task_json, state, next_seq, terminal_event, "
                "updated_at) VALUES (?,?,?,?,?,?,?)",
                (task_id, change.type_name or (task.type if task else ""),
                 json.dumps(task.to_json()) if task else None, state, seq + 1, terminal, now))
        else:
            conn.execute("UPDATE tasks SET state=?, next_seq=?, updated_at=?, "
                         "terminal_event=COALESCE(?, terminal_event) WHERE task_id=?",
                         (state, seq + 1, now, terminal, task_id))
        change.event = event

    def state_of(self, task_id: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT state FROM tasks WHERE task_id=?",
                                     (task_id,)).fetchone()
        return row[0] if row else None

    def resend_terminal(self, task_id: str) -> bool:
        """Queue a finished task's terminal event again (same event_id).

        Returns True if it was not already waiting in the outbox.
        """
        with self._lock:
            row = self._conn.execute("SELECT terminal_event FROM tasks WHERE task_id=?",
                                     (task_id,)).fetchone()
            if not row or not row[0]:
                return False
            return outbox.requeue(self._conn, json.loads(row[0])["event_id"], task_id, row[0])

    def waiting(self, event_ids: list[str]) -> int:
        """How many of these events are still in the outbox (not accepted yet)."""
        with self._lock:
            return outbox.events_waiting(self._conn, event_ids)

    def unfinished(self) -> list[tuple[str, str, Task | None]]:
        """Tasks not in a terminal state: (task_id, state, task) in arrival order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT task_id, state, task_json FROM tasks WHERE terminal_event IS NULL "
                "ORDER BY rowid").fetchall()
        return [(tid, state, Task.from_json(json.loads(tj)) if tj else None)
                for tid, state, tj in rows]

    def prune(self, older_than_s: float) -> int:
        """Forget finished tasks whose terminal event left the outbox long ago."""
        with self._lock, write_transaction(self._conn) as conn:
            waiting = outbox.tasks_waiting(conn)
            old = [(tid,) for (tid,) in conn.execute(
                "SELECT task_id FROM tasks WHERE terminal_event IS NOT NULL AND updated_at < ?",
                (time.time() - older_than_s,)).fetchall() if tid not in waiting]
            conn.executemany("DELETE FROM tasks WHERE task_id=?", old)
        return len(old)


def unfinished_tasks(path: str | Path) -> list[tuple[str, str, str, float]]:
    """Read only, for ``dsagent status`` while the CTA runs: (task_id, type,
    state, updated_at) of every task not in a terminal state, in arrival
    order. A file the CTA has not set up yet (the ctdataloader made it) has none."""
    conn = connect_read_only(path)
    try:
        return conn.execute(
            "SELECT task_id, type, state, updated_at FROM tasks WHERE terminal_event IS NULL "
            "ORDER BY rowid").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return []
    finally:
        conn.close()
