"""Typed task objects: what a handler receives and how it talks back."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from agent.common.errors import BadParameters
from agent.common.task import Task


@dataclass(frozen=True)
class Param:
    """One parameter a task type takes. The core checks it before the
    handler's ``dsagent_validate_task`` runs, so every handler refuses a bad
    parameter in the same words.

    ``required``: the task must carry it, and not empty (nor only blanks)
    unless ``allow_empty``. ``type``: ``text`` (anything), ``int`` (a whole
    number), ``number`` (a decimal number, as ``float()`` reads it, not
    inf/nan) or ``path`` (an absolute path without NUL or newline).
    ``pattern``: a regular expression the whole value must match
    (``re.fullmatch``). ``description`` shows in ``dsagent handlers``.
    """

    name: str
    required: bool = False
    type: str = "text"
    pattern: str | None = None
    description: str = ""
    allow_empty: bool = False

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"parameter '{self.name}': type must be one of "
                             f"{', '.join(PARAM_TYPES)}, got {self.type!r}")
        if self.pattern is not None:
            re.compile(self.pattern)

    def describe(self) -> str:
        """One line for ``dsagent handlers``."""
        shape = ["required" if self.required else "optional"]
        if self.type != "text" or self.pattern is None:
            shape.append(self.type)
        if self.pattern is not None:
            shape.append(f"matching {self.pattern}")
        if self.allow_empty:
            shape.append("may be empty")
        return (f"{self.name} ({', '.join(shape)})"
                + (f": {self.description}" if self.description else ""))

    def check(self, value: str | None) -> None:
        """Raise BadParameters if ``value`` (None: not given) does not fit."""
        if value is None:
            if self.required:
                raise BadParameters(f"parameter '{self.name}' is missing")
            return
        if not value.strip():
            if self.allow_empty:
                return
            if self.required:
                raise BadParameters(f"parameter '{self.name}' is empty")
        regex, what = PARAM_TYPES[self.type]
        if not re.fullmatch(regex, value):
            raise BadParameters(f"parameter '{self.name}' must be {what}, got {value!r}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise BadParameters(f"parameter '{self.name}' must match {self.pattern}, "
                                f"got {value!r}")


# type -> (what its value must fullmatch, how a refusal names it); blanks around
# numbers are allowed because int() and float() read them
PARAM_TYPES = {
    "text": (r"(?s).*", "text"),
    "int": (r"\s*[-+]?[0-9]+\s*", "a whole number"),
    "number": (r"\s*[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?\s*", "a number"),
    "path": (r"/[^\x00\n]*", "an absolute path"),
}


@dataclass(frozen=True)
class TaskType:
    """A task type a plugin serves (registered via ``dsagent_task_types``).

    ``parameters``: the parameters it takes. ``None`` (the default, as
    handlers written before ``Param`` existed) leaves every check to the
    handler; a tuple (even empty) makes the core refuse unknown, missing and
    malformed parameters before the handler is asked.
    """

    name: str
    default_timeout: int = 3600
    description: str = ""
    parameters: tuple[Param, ...] | None = None

    def __post_init__(self) -> None:
        if self.parameters is None:
            return
        params = tuple(self.parameters)
        if not all(isinstance(p, Param) for p in params):
            raise TypeError(f"task type '{self.name}': parameters must be Param objects")
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise ValueError(f"task type '{self.name}': a parameter is declared twice ({names})")
        object.__setattr__(self, "parameters", params)  # a list given is kept as a tuple

    def check_parameters(self, parameters: dict[str, str]) -> None:
        """Raise BadParameters naming the first unknown, missing or malformed parameter."""
        if self.parameters is None:
            return
        known = [p.name for p in self.parameters]
        unknown = sorted(set(parameters) - set(known))
        if unknown:
            takes = ", ".join(known) or "no parameters"
            raise BadParameters(f"unknown parameter '{unknown[0]}' ({self.name} takes {takes})")
        for param in self.parameters:
            param.check(parameters.get(param.name))


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
