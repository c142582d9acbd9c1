"""The writer the CTA calls: record a task's event in the outbox, then wake
the uploader (it runs in the CTA's process)."""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any, Protocol

from agent.common.notify import Notifier
from agent.common.task import Task

log = logging.getLogger("dsagent.cta")


class TaskDB(Protocol):
    """The CTA's AgentDB: commits a task's state and its outbox event together."""

    def record(self, task_id: str, state: str, *, type_name: str = "",
               task: Task | None = None, progress: float | None = None,
               message: str = "", details: dict[str, Any] | None = None) -> dict[str, Any]: ...


class OutboxRecorder:
    """Records events in the durable outbox, then wakes the uploader.

    When the state DB cannot be written (disk full, I/O error), a progress
    event is dropped with a warning, and any other event is retried with
    backoff until it is on disk: the task waits (its outcome is kept in
    memory) instead of being lost. Only ``stop`` (shutdown) ends the retries;
    the next start then reports the task as interrupted.
    """

    RETRY_MAX_S = 30.0

    def __init__(self, db: TaskDB, notifier: Notifier, stop: threading.Event | None = None):
        self.db = db
        self.notifier = notifier
        self.stop = stop or threading.Event()

    def record(self, task: Task, state: str, *, progress=None, message="", details=None):
        delay = 1.0
        while True:
            try:
                event = self.db.record(task.id, state, task=task if state == "received" else None,
                                       type_name=task.type, progress=progress, message=message,
                                       details=details)
                break
            except sqlite3.OperationalError as exc:
                if state == "progress":
                    log.warning("progress of task %s not recorded: %s", task.id, exc)
                    return None
                if self.stop.is_set():
                    raise
                log.error("cannot record %s of task %s: %s; retrying in %.0f s",
                          state, task.id, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, self.RETRY_MAX_S)
        self.notifier.notify()
        return event
