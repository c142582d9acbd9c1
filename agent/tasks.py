"""Typed task objects: what a handler receives and how it talks back."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class TaskType:
    """A task type a plugin serves (registered via ``dsagent_task_types``)."""

    name: str
    default_timeout: int = 3600
    description: str = ""


@dataclass(frozen=True)
class Task:
    """One task instance from a <ClientTasks> document."""

    id: str
    type: str
    parameters: dict[str, str] = field(default_factory=dict)
    timeout: int | None = None  # seconds; None -> the type's default

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "parameters": dict(self.parameters),
                "timeout": self.timeout}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Task":
        return cls(data["id"], data["type"], dict(data["parameters"]), data.get("timeout"))


class TaskContext:
    """Handed to ``dsagent_run_task``: configuration, logging, progress.

    ``progress`` is throttled so a chatty handler cannot flood the outbox:
    a call is reported when the percent moved by at least 1 or 1 s passed.
    """

    def __init__(self, task: Task, config: dict[str, Any],
                 send_progress: Callable[[float | None, str, dict], None],
                 logger: logging.LoggerAdapter, settings: dict[str, Any] | None = None):
        self.task = task
        self.config = config
        self.settings = settings or {}   # the plugin's own [handlers.<plugin>] table
        self.log = logger
        self._send = send_progress
        self._last_pct: float | None = None
        self._last_at = 0.0
        self._cancel = threading.Event()

    def cancelled(self) -> bool:
        """True once the task was asked to stop (timeout, shutdown): long
        handlers can poll this instead of implementing dsagent_cancel_task."""
        return self._cancel.is_set()

    def request_cancel(self) -> None:
        self._cancel.set()

    def progress(self, percent: float | None = None, message: str = "", **details: Any) -> None:
        """Report progress (0-100 or None) with an optional message and details."""
        if percent is not None:
            percent = max(0.0, min(100.0, float(percent)))
        now = time.monotonic()
        moved = (percent is not None and self._last_pct is not None
                 and abs(percent - self._last_pct) >= 1)
        if self._last_at and not moved and now - self._last_at < 1.0:
            return
        self._last_pct, self._last_at = percent, now
        self._send(percent, message, details)
