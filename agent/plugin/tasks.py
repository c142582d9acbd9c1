"""Typed task objects: what a handler receives and how it talks back."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.common.errors import BadParameters
from agent.common.task import Task


@dataclass(frozen=True)
class Param:
    """One parameter a task type takes; the core checks it before the
    handler's ``dsagent_validate_task`` runs, with the same words for every
    handler.

    ``required``: the task must carry it. ``pattern``: a regular expression
    the whole text must match (``re.fullmatch``); without one, a required
    parameter must not be empty. ``type``: ``text`` (anything), ``int``
    (ASCII digits, optional minus), ``number`` (a decimal number) or
    ``path`` (an absolute path without NUL or newline).
    """

    name: str
    required: bool = False
    type: str = "text"
    pattern: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"parameter '{self.name}': type must be one of "
                             f"{', '.join(PARAM_TYPES)}, got {self.type!r}")
        if self.pattern is not None:
            re.compile(self.pattern)

    def describe(self) -> str:
        """One line for ``dsagent handlers``."""
        shape = self.type if self.pattern is None else f"{self.type} matching {self.pattern}"
        return (f"{self.name} ({'required' if self.required else 'optional'}, {shape})"
                + (f": {self.description}" if self.description else ""))


PARAM_TYPES = {
    "text": (r"(?s).*", "text"),
    "int": (r"-?[0-9]+", "a whole number"),
    "number": (r"-?[0-9]+(\.[0-9]+)?", "a number"),
    "path": (r"/[^\x00\n]*", "an absolute path"),
}


@dataclass(frozen=True)
class TaskType:
    """A task type a plugin serves (registered via ``dsagent_task_types``).

    ``parameters``: the parameters it takes. ``None`` (the default) leaves
    every check to the handler; a tuple (even empty) makes the core refuse
    unknown, missing and malformed parameters before the handler is asked.
    """

    name: str
    default_timeout: int = 3600
    description: str = ""
    parameters: tuple[Param, ...] | None = None

    def check_parameters(self, parameters: dict[str, str]) -> None:
        """Raise BadParameters naming the first unknown, missing or malformed parameter."""
        if self.parameters is None:
            return
        known = {p.name: p for p in self.parameters}
        unknown = sorted(set(parameters) - set(known))
        if unknown:
            takes = ", ".join(known) or "no parameters"
            raise BadParameters(f"unknown parameter '{unknown[0]}' ({self.name} takes {takes})")
        for param in self.parameters:
            value = parameters.get(param.name)
            if value is None:
                if param.required:
                    raise BadParameters(f"parameter '{param.name}' is missing")
                continue
            if value == "" and param.required and param.pattern is None:
                raise BadParameters(f"parameter '{param.name}' is empty")
            regex, what = PARAM_TYPES[param.type]
            if not re.fullmatch(regex, value, re.ASCII):
                raise BadParameters(f"parameter '{param.name}' must be {what}, got {value!r}")
            if param.pattern is not None and not re.fullmatch(param.pattern, value):
                raise BadParameters(f"parameter '{param.name}' must match {param.pattern}, "
                                    f"got {value!r}")


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
