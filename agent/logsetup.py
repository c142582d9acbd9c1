"""Log lines a support engineer can follow task by task.

Every record carries the process name and, when one is set for the current
thread, the task id (``task=...``), so one task can be followed across
objecthost -> CTA -> worker -> ctdataloader with a grep.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

_local = threading.local()


def current_task() -> str:
    return getattr(_local, "task_id", "") or ""


@contextlib.contextmanager
def task_context(task_id: str):
    """Tag the log lines of this thread with ``task_id`` for the block's duration."""
    previous = current_task()
    _local.task_id = task_id
    try:
        yield
    finally:
        _local.task_id = previous


class _TaskFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        task = getattr(record, "task_id", None) or current_task()
        record.task = f" task={task}" if task else ""
        return True


def setup_logging(process: str, level: str | None = None) -> None:
    """Log to stderr as ``time level process[pid] task=...: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TaskFilter())
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {process}[%(process)d]%(task)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("DSAGENT_LOG_LEVEL", "INFO"))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
