"""Run one received task through a worker: validate, run, time out, report.

Shared by the CTA and by ``dsagent run-task``; they differ only in the
recorder (durable outbox vs. printing). The ``running`` event is recorded
before the worker is told to go, so a crash can never make a task run twice.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from .logsetup import task_context
from .tasks import Task
from .workerpool import WorkerDied, WorkerPool

log = logging.getLogger("dsagent.runner")

VALIDATE_TIMEOUT_S = 60.0
CANCEL_GRACE_S = 5.0
DEFAULT_TIMEOUT_S = 3600


class Recorder(Protocol):
    def record(self, task: Task, state: str, *, progress: float | None = None,
               message: str = "", details: dict[str, Any] | None = None) -> None: ...


def execute(task: Task, pool: WorkerPool, recorder: Recorder, handler_config: dict[str, Any],
            drain: threading.Event | None = None, stop: threading.Event | None = None) -> str:
    """Run ``task`` (already ``received``) to a terminal state; return that state.

    If ``drain`` is set before the handler starts, the task is left
    ``received`` (a restarted CTA runs it) and "received" is returned; if
    ``stop`` is set while it runs, it is cancelled.
    """
    drain = drain or threading.Event()
    stop = stop or threading.Event()
    if drain.is_set():
        return "received"
    with task_context(task.id):
        try:
            worker = pool.acquire()
        except (WorkerDied, OSError) as exc:
            return _finish(recorder, task, "failed", f"could not start a worker process: {exc}")
        try:
            state = _converse(task, worker, recorder, handler_config, drain, stop)
        except WorkerDied as exc:
            pool.discard(worker)
            phase = "running" if worker.running else "validating"
            log.error("%s while %s the task", exc, phase)
            return _finish(recorder, task, "failed", f"{exc} while {phase} the task")
        except BaseException:
            pool.discard(worker)
            raise
        if worker.alive() and not worker.dirty:
            pool.release(worker)
        else:
            pool.discard(worker)
        return state


def _finish(recorder: Recorder, task: Task, state: str, message: str,
            details: dict[str, Any] | None = None, progress: float | None = None) -> str:
    recorder.record(task, state, message=message, details=details, progress=progress)
    log.info("task %s (%s) %s%s", task.id, task.type, state, f": {message}" if message else "")
    return state


def _converse(task: Task, worker, recorder: Recorder, handler_config: dict[str, Any],
              drain: threading.Event, stop: threading.Event) -> str:
    worker.running = worker.dirty = False
    worker.send({"op": "task", "task": task.to_json(), "config": handler_config})
    answer = worker.recv(VALIDATE_TIMEOUT_S)
    if answer is None:
        worker.dirty = True
        return _finish(recorder, task, "failed",
                       f"handler did not validate the task within {VALIDATE_TIMEOUT_S:.0f} s")
    if answer["op"] == "invalid":
        return _finish(recorder, task, "failed", str(answer.get("message", "invalid task")))
    if answer["op"] != "valid":
        raise WorkerDied(f"worker {worker.pid} answered {answer['op']!r} to a task")
    if drain.is_set():
        worker.send({"op": "skip"})
        log.info("agent stopping; task %s left for the next start", task.id)
        return "received"
    timeout = float(task.timeout or answer.get("timeout") or DEFAULT_TIMEOUT_S)
    recorder.record(task, "running", message=f"started (timeout {timeout:.0f} s)")
    log.info("task %s (%s) running in worker %s", task.id, task.type, worker.pid)
    worker.running = True
    worker.send({"op": "go"})
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return _abort(task, worker, recorder, "timed_out",
                          f"timed out after {timeout:.0f} s; handler stopped")
        if stop.is_set():
            return _abort(task, worker, recorder, "cancelled", "agent shutting down; task cancelled")
        message = worker.recv(min(left, 0.5))
        if message is None:
            continue
        if message["op"] == "progress":
            recorder.record(task, "progress", progress=message.get("percent"),
                            message=str(message.get("message") or ""),
                            details=_as_dict(message.get("details")))
        elif message["op"] == "done":
            state = message.get("state")
            if state not in ("succeeded", "failed"):
                raise WorkerDied(f"worker {worker.pid} reported state {state!r}")
            return _finish(recorder, task, state, str(message.get("message") or ""),
                           _as_dict(message.get("details")),
                           progress=100.0 if state == "succeeded" else None)
        else:
            raise WorkerDied(f"worker {worker.pid} sent {message['op']!r} while running")


def _abort(task: Task, worker, recorder: Recorder, state: str, message: str) -> str:
    """Cancel politely, then kill the worker's process tree; report ``state``."""
    worker.dirty = True
    details: dict[str, Any] = {}
    try:
        worker.send({"op": "cancel"})
        deadline = time.monotonic() + CANCEL_GRACE_S
        while (left := deadline - time.monotonic()) > 0:
            reply = worker.recv(left)
            if reply is None:
                break
            if reply["op"] == "done":
                details = _as_dict(reply.get("details"))
                break
    except WorkerDied:
        pass
    worker.kill_tree()
    return _finish(recorder, task, state, message, details)


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else ({} if value is None else {"value": value})
