"""Run one received task through a worker: validate, run, time out, report.

Shared by the CTA and by ``dsagent run-task``; they differ only in the
recorder (durable outbox vs. printing). The ``running`` event is recorded
before the worker is told to go, so a crash can never make a task run twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
import time
from typing import Any, Protocol

from agent.common.logsetup import task_context
from agent.common.task import Task
from agent.cta.workerpool import WorkerDied, WorkerPool

log = logging.getLogger("dsagent.runner")

VALIDATE_TIMEOUT_S = 60.0
CANCEL_GRACE_S = 5.0
DEFAULT_TIMEOUT_S = 3600


class Recorder(Protocol):
    def record(self, task: Task, state: str, *, progress: float | None = None,
               message: str = "", details: dict[str, Any] | None = None
               ) -> dict[str, Any] | None:
        """Record one event; return it (its ``event_id`` tags the log line) or None."""


def _event_tag(event: dict[str, Any] | None) -> dict[str, Any]:
    return {"event_id": event.get("event_id")} if isinstance(event, dict) else {}


@dataclass
class Outcome:
    """How a task ended, before it is recorded."""

    state: str
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    progress: float | None = None


def execute(task: Task, pool: WorkerPool, recorder: Recorder, handler_config: dict[str, Any],
            drain: threading.Event | None = None, stop: threading.Event | None = None) -> str:
    """Run ``task`` (already ``received``) to a terminal state; return that state.

    If ``drain`` is set before the handler starts, the task is left
    ``received`` (a restarted CTA runs it) and "received" is returned; if
    ``stop`` is set while it runs, it is cancelled. The worker goes back to
    the pool *before* the terminal event is committed, so the next task can
    start while that fsync runs (its own `running` commit then shares it).
    """
    drain = drain or threading.Event()
    stop = stop or threading.Event()
    if drain.is_set():
        return "received"
    with task_context(task.id):
        try:
            worker = pool.acquire()
        except (WorkerDied, OSError) as exc:
            return _finish(recorder, task, Outcome("failed",
                                                   f"could not start a worker process: {exc}"))
        try:
            outcome = _converse(task, worker, recorder, handler_config, drain, stop)
        except WorkerDied as exc:
            pool.discard(worker)
            phase = "running" if worker.running else "validating"
            log.error("%s while %s the task", exc, phase)
            return _finish(recorder, task, Outcome("failed", f"{exc} while {phase} the task"))
        except BaseException:
            pool.discard(worker)
            raise
        if worker.alive() and not worker.dirty:
            pool.release(worker)
        else:
            pool.discard(worker)
        if outcome is None:
            return "received"
        return _finish(recorder, task, outcome)


def fail_unrun(task: Task, recorder: Recorder, message: str) -> str:
    """End a ``received`` task as failed without running it (a Reboot whose
    earlier tasks failed); return "failed"."""
    with task_context(task.id):
        return _finish(recorder, task, Outcome("failed", message))


def _finish(recorder: Recorder, task: Task, outcome: Outcome) -> str:
    event = recorder.record(task, outcome.state, message=outcome.message,
                            details=outcome.details, progress=outcome.progress)
    log.info("task %s (%s) %s%s", task.id, task.type, outcome.state,
             f": {outcome.message}" if outcome.message else "", extra=_event_tag(event))
    return outcome.state


def _converse(task: Task, worker, recorder: Recorder, handler_config: dict[str, Any],
              drain: threading.Event, stop: threading.Event) -> Outcome | None:
    """Validate and run the task in ``worker``; None if left for the next start."""
    worker.running = worker.dirty = False
    worker.send({"op": "task", "task": task.to_json(), "config": handler_config})
    answer = worker.recv(VALIDATE_TIMEOUT_S)
    if answer is None:
        worker.dirty = True
        return Outcome("failed", f"handler did not validate the task within "
                                 f"{VALIDATE_TIMEOUT_S:.0f} s")
    if answer["op"] == "invalid":
        return Outcome("failed", str(answer.get("message", "invalid task")))
    if answer["op"] != "valid":
        raise WorkerDied(f"worker {worker.pid} answered {answer['op']!r} to a task")
    if drain.is_set():
        worker.send({"op": "skip"})
        log.info("agent stopping; task %s left for the next start", task.id)
        return None
    timeout = float(task.timeout or answer.get("timeout") or DEFAULT_TIMEOUT_S)
    event = recorder.record(task, "running", message=f"started (timeout {timeout:.0f} s)")
    log.info("task %s (%s) running in worker %s (timeout %.0f s)", task.id, task.type,
             worker.pid, timeout, extra=_event_tag(event))
    worker.running = True
    worker.send({"op": "go"})
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return _abort(worker, Outcome("timed_out",
                                          f"timed out after {timeout:.0f} s; handler stopped"))
        if stop.is_set():
            return _abort(worker, Outcome("cancelled", "agent shutting down; task cancelled"))
        message = worker.recv(min(left, 0.5))
        if message is None:
            continue
        if message["op"] == "progress":
            text = str(message.get("message") or "")
            event = recorder.record(task, "progress", progress=message.get("percent"),
                                    message=text, details=_as_dict(message.get("details")))
            log.info("progress %s%%%s", message.get("percent"), f": {text}" if text else "",
                     extra=_event_tag(event))
        elif message["op"] == "done":
            state = message.get("state")
            if state not in ("succeeded", "failed"):
                raise WorkerDied(f"worker {worker.pid} reported state {state!r}")
            return Outcome(state, str(message.get("message") or ""),
                           _as_dict(message.get("details")),
                           100.0 if state == "succeeded" else None)
        else:
            raise WorkerDied(f"worker {worker.pid} sent {message['op']!r} while running")


def _abort(worker, outcome: Outcome) -> Outcome:
    """Cancel politely, then kill the worker's process tree; the task ends as ``outcome``."""
    worker.dirty = True
    try:
        worker.send({"op": "cancel"})
        deadline = time.monotonic() + CANCEL_GRACE_S
        while (left := deadline - time.monotonic()) > 0:
            reply = worker.recv(left)
            if reply is None:
                break
            if reply["op"] == "done":
                outcome.details = _as_dict(reply.get("details"))
                break
    except WorkerDied:
        pass
    worker.kill_tree()
    return outcome


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else ({} if value is None else {"value": value})
