"""Status events (PROTOCOL.md §3) and their state machine.

received -> running -> progress* -> exactly one terminal state; a task refused
before it starts goes received -> failed.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
STATES = frozenset({"received", "running", "progress"}) | TERMINAL

# state -> states that may follow it
NEXT = {
    None: {"received"},
    "received": {"running", "failed", "cancelled"},
    "running": {"progress"} | TERMINAL,
    "progress": {"progress"} | TERMINAL,
}


class TransitionError(ValueError):
    """An event that the state machine does not allow (a bug, never input)."""


def check_transition(previous: str | None, state: str) -> None:
    if state not in NEXT.get(previous, set()):
        raise TransitionError(f"status {previous!r} cannot be followed by {state!r}")


def now_rfc3339() -> str:
    """The current time as RFC 3339 UTC with milliseconds, e.g. 2026-11-25T11:06:49.123Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(task_id: str, seq: int, state: str, progress: float | None = None,
               message: str = "", details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A §3 status event with a fresh event_id."""
    if state not in STATES:
        raise TransitionError(f"unknown state {state!r}")
    return {
        "event_id": str(uuid.uuid4()),
        "task_id": task_id,
        "seq": seq,
        "state": state,
        "progress": progress,
        "message": message,
        "details": details or {},
        "at": now_rfc3339(),
    }
