"""Checks a plugin adds to ``dsagent doctor`` (hook ``dsagent_doctor_checks``).

A handler knows its own classic failures (an SBS folder nobody empties,
driver packages not replicated yet, a full image store); it registers a
``DoctorCheck`` and the doctor runs it with the [handlers] config section
and prints its ``CheckResult`` like any of its own checks. A check only
reads (or probes and cleans up after itself). Where its finding or action
would name the config file, it says "the agent's config": the doctor puts
that file's path there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

CHECK_STATUSES = ("ok", "warn", "fail", "skip")
CHECK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")   # one word in the doctor's table


@dataclass(frozen=True)
class CheckResult:
    """``status``: ok, warn, fail or skip (not configured here); ``finding``:
    one line naming the file, folder or package; ``action``: what to do."""

    status: str
    finding: str
    action: str = ""

    def __post_init__(self) -> None:
        if self.status not in CHECK_STATUSES:
            raise ValueError(f"status must be one of {', '.join(CHECK_STATUSES)}, "
                             f"got {self.status!r}")


@dataclass(frozen=True)
class DoctorCheck:
    """``name`` is what the doctor's table shows (unique across plugins);
    ``run(config)`` gets the [handlers] section and returns a CheckResult."""

    name: str
    run: Callable[[dict[str, Any]], CheckResult]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not CHECK_NAME.fullmatch(self.name):
            raise ValueError(f"a doctor check's name is a letter or digit, then up to 63 "
                             f"letters, digits, '.', '_' or '-', got {self.name!r}")
        if not callable(self.run):
            raise TypeError(f"doctor check {self.name!r}: run must be callable")
