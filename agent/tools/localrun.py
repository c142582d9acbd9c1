"""``dsagent run-task TASKS.xml``: run tasks here, contact no server.

The same dispatch as the CTA (workers, validation, timeouts); events are
printed instead of uploaded. Exit codes (PROTOCOL.md §5): 0 all succeeded,
1 a task failed (bad parameters included), 2 the document or config cannot
be read.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from agent.common.config import check_config, load_config
from agent.common.errors import DsagentError, TaskDocumentError
from agent.common.events import make_event
from agent.tools.progressbar import ProgressBar
from agent.common.reaper import become_subreaper, kill_adopted
from agent.cta.runner import execute
from agent.common.taskxml import MAX_DOCUMENT_BYTES, parse_client_tasks
from agent.common.task import Task
from agent.cta.workerpool import WorkerPool


class PrintRecorder:
    """Prints §3 events (one JSON object per line with ``as_json``); a task's
    progress also redraws ``bar`` (a no-op unless stderr is a terminal)."""

    def __init__(self, out: TextIO, as_json: bool, bar: ProgressBar | None = None):
        self.out = out
        self.as_json = as_json
        self.bar = bar or ProgressBar(enabled=False)
        self.seq: dict[str, int] = {}
        self.final: dict[str, str] = {}

    def record(self, task: Task, state: str, *, progress=None, message="", details=None) -> None:
        seq = self.seq[task.id] = self.seq.get(task.id, 0) + 1
        event = make_event(task.id, seq, state, progress, message, details)
        if state in ("succeeded", "failed", "cancelled", "timed_out"):
            self.final[task.id] = state
        self.bar.clear()
        if self.as_json:
            self.out.write(json.dumps(event) + "\n")
        else:
            pct = "" if progress is None else f" {progress:.0f}%"
            text = f" {message}" if message else ""
            self.out.write(f"{event['at']} {task.id} {task.type} {seq} {state}{pct}{text}\n")
            if state in ("succeeded", "failed") and details:
                for key, value in details.items():
                    self.out.write(f"    {key}: {value!r}\n")
        self.out.flush()
        if progress is not None and state in ("running", "progress"):
            self.bar.update(progress, f"{task.type} {message or state}".strip(), force=True)


def run_tasks(path: str, config_path: str | None, as_json: bool,
              out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        config = (load_config(config_path, require=()) if config_path
                  else check_config({}, "<no config>", require=()))
        with open(path, "rb") as fh:
            data = fh.read(MAX_DOCUMENT_BYTES + 1)   # the limit of a pulled page (§3)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise TaskDocumentError(
                f"{path} is over {MAX_DOCUMENT_BYTES:,} bytes, the most a task document may "
                "hold (as a pulled page): split it into several files")
        document = parse_client_tasks(data)
    except (DsagentError, OSError) as exc:
        reason = exc if isinstance(exc, DsagentError) else f"{path}: {exc.strerror}"
        kind = "task document" if isinstance(exc, (TaskDocumentError, OSError)) else "config"
        err.write(f"dsagent run-task: cannot read the {kind}: {reason}\n")
        return 2
    recorder = PrintRecorder(out, as_json, ProgressBar(err))
    for message in document.skipped:
        err.write(f"dsagent run-task: {message}\n")
    for bad in document.rejected:
        task = Task(bad.task_id, bad.type or "?", {})
        recorder.record(task, "received")
        recorder.record(task, "failed", message=bad.message)
    become_subreaper()
    pool = WorkerPool(1)
    handler_config: dict[str, Any] = config.handlers
    try:
        for task in document.tasks:
            recorder.record(task, "received")
            execute(task, pool, recorder, handler_config)
    finally:
        pool.close()
        kill_adopted(set())
    ok = (not document.skipped and not document.rejected
          and all(state == "succeeded" for state in recorder.final.values()))
    return 0 if ok else 1
