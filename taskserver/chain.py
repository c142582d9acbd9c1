"""Tasks that wait for other tasks: the steps the seed leaves manual, chained.

"There are often no automatic triggers between the steps": BootWiz was run
before the drivers had replicated, a deploy started before its image was
there. Here a task may be queued *after* others (any client's): it is
**held** (``tasks.held = 1``, so no pull lists it) until every task it waits
for has succeeded; then it is released and its client tickled. When one of
them fails or is cancelled, the waiting task is cancelled by the server with
a message naming the task that did not succeed, and so are the tasks waiting
for it in turn. Rows: ``task_after (task_id, after_task_id)``, one per task
still awaited.

Who waits for what is decided when a task is queued: ``dsagent-server queue
--after TASK``, or by taskserver/packages.py for a BootWizRebuild or a
DeployImage that needs a package replicated first.

Concurrency: ``hold`` locks the awaited task's row (PostgreSQL ``FOR
UPDATE``; SQLite writes are serial anyway) before it reads its state, and a
status ingest updates that same row when it stores the terminal state, so
either the hold sees the task ended, or the ingest sees the hold's rows.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from taskserver.checks import InvalidRequest, utc_now

SCHEMA = """
CREATE TABLE IF NOT EXISTS task_after (
    task_id       TEXT NOT NULL,
    after_task_id TEXT NOT NULL,
    PRIMARY KEY (task_id, after_task_id)
);
CREATE INDEX IF NOT EXISTS task_after_awaited ON task_after(after_task_id);
ALTER TABLE tasks ADD COLUMN held INTEGER NOT NULL DEFAULT 0
"""


def hold(store, conn, task_id: str, after: Iterable[str]) -> list[str]:
    """Make ``task_id`` (queued in ``conn``'s transaction) wait for ``after``;
    the ids it now waits for (those not succeeded yet). An awaited task that
    does not exist or ended otherwise than succeeded is an InvalidRequest."""
    lock = " FOR UPDATE" if store.db.dialect == "postgresql" else ""
    waits = []
    for awaited in dict.fromkeys(after):
        if awaited == task_id:
            raise InvalidRequest(f"task {task_id} cannot wait for itself")
        row = conn.execute(f"SELECT terminal_state FROM tasks WHERE task_id = ?{lock}",
                           (awaited,)).fetchone()
        if row is None:
            raise InvalidRequest(f"task {awaited} (to wait for) is not queued here")
        if row["terminal_state"] == "succeeded":
            continue
        if row["terminal_state"]:
            raise InvalidRequest(f"task {awaited} (to wait for) already ended "
                                 f"{row['terminal_state']}")
        conn.execute("INSERT INTO task_after (task_id, after_task_id) VALUES (?, ?) "
                     "ON CONFLICT DO NOTHING", (task_id, awaited))
        waits.append(awaited)
    if waits:
        conn.execute("UPDATE tasks SET held = 1 WHERE task_id = ?", (task_id,))
    return waits


def task_ended(store, conn, task_id: str, state: str, message: str | None) -> list[str]:
    """A task's first terminal status is stored (in ``conn``'s transaction):
    release the tasks that waited only for it, or cancel them if it did not
    succeed. Returns the clients to tickle after the commit."""
    waiting = [row[0] for row in conn.execute(
        "SELECT task_id FROM task_after WHERE after_task_id = ?", (task_id,)).fetchall()]
    if not waiting:
        return []
    conn.execute("DELETE FROM task_after WHERE after_task_id = ?", (task_id,))
    tickle: list[str] = []
    for waiter in waiting:
        row = conn.execute("SELECT client_id, type, terminal_state FROM tasks WHERE task_id = ?",
                           (waiter,)).fetchone()
        if row is None or row["terminal_state"]:
            continue
        if state != "succeeded":
            why = f"not run: task {task_id}, which it waited for, ended {state}" + (
                f" ({message})" if message else "")
            end_at_server(store, conn, waiter, why, {"by": "server", "after": task_id})
            tickle += task_ended(store, conn, waiter, "cancelled", why)
        elif not conn.execute("SELECT 1 FROM task_after WHERE task_id = ?",
                              (waiter,)).fetchone():
            conn.execute("UPDATE tasks SET held = 0 WHERE task_id = ?", (waiter,))
            tickle.append(row["client_id"])
    return tickle


def end_at_server(store, conn, task_id: str, message: str, details: Mapping[str, Any],
                  state: str = "cancelled") -> None:
    """End a task with a status made by the server (after the last stored one)."""
    now = utc_now()
    seq = conn.execute("SELECT MAX(seq) FROM events WHERE task_id = ?",
                       (task_id,)).fetchone()[0] or 0
    store.insert_event(conn, {
        "event_id": str(uuid.uuid4()), "task_id": task_id, "seq": seq + 1, "state": state,
        "progress": None, "message": message, "details": json.dumps(dict(details)),
        "at": now}, now)
    conn.execute("UPDATE tasks SET terminal_state = ?, delivered = 1 WHERE task_id = ?",
                 (state, task_id))


def awaited(store, task_id: str) -> list[str]:
    """The tasks ``task_id`` still waits for."""
    return [row[0] for row in store._read(
        "SELECT after_task_id FROM task_after WHERE task_id = ? ORDER BY after_task_id",
        (task_id,))]
