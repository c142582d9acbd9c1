"""Log lines a support engineer can follow task by task.

Every record carries the process name and pid and, when one is set for the
current thread, the task id (``task=...``) and the status event id
(``event=...``), so one task can be followed across CTA -> worker ->
ctdataloader with ``dsagent logs --task ID`` or a grep. A tickle carries no
task, so the objecthost's lines carry the tickle's nonce (``tickle=...``), and
so does the CTA's ``received`` line of each task that pull brought:
``dsagent logs --task`` follows that link back to the objecthost.

Two outputs:

- **stderr**, human-readable (``DSAGENT_LOG_FORMAT=json`` or ``[logging]
  format = "json"`` for JSON lines). Under systemd (``$JOURNAL_STREAM``
  names our stderr) each line starts with its syslog priority (``<3>``...)
  and has no timestamp: journald adds both to the journal.
- **a file per process** in the log dir (``[logging] dir``, default
  ``<state_dir>/logs``): ``<process>.log``, always JSON lines (what ``dsagent
  logs`` and the remote trace read), rotated by size. Worker processes share
  ``worker.log``; rotation takes an flock and every writer reopens a file
  that was rotated under it, so several processes can append to one file.

Child processes inherit the settings through ``DSAGENT_LOG_*`` variables
(:func:`export_settings`), so a worker started by the CTA logs like it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_local = threading.local()

FORMATS = ("text", "json")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
_ENV = {"dir": "DSAGENT_LOG_DIR", "format": "DSAGENT_LOG_FORMAT", "level": "DSAGENT_LOG_LEVEL",
        "max_bytes": "DSAGENT_LOG_MAX_BYTES", "backups": "DSAGENT_LOG_BACKUPS"}
# syslog priorities, the sd-daemon(3) prefix journald understands
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


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


def utc_timestamp(seconds: float) -> str:
    """RFC 3339 UTC with milliseconds (the same shape as a §3 event's ``at``)."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + \
        f".{int((seconds - whole) * 1000):03d}Z"


class _Tags(logging.Filter):
    """Fill ``task_id``/``event_id`` (from ``extra=`` or the thread) and the text tags."""

    def filter(self, record: logging.LogRecord) -> bool:
        task = getattr(record, "task_id", None) or current_task()
        event = getattr(record, "event_id", None) or ""
        tickle = getattr(record, "tickle", None) or ""
        record.task_id, record.event_id, record.tickle = task, event, tickle
        record.tags = (f" task={task}" if task else "") + (f" event={event}" if event else "") \
            + (f" tickle={tickle}" if tickle else "")
        return True


def record_dict(record: logging.LogRecord, process: str) -> dict[str, Any]:
    """One log record as the JSON object written to files and streams."""
    out = {"ts": utc_timestamp(record.created), "level": record.levelname,
           "process": process, "pid": record.process, "logger": record.name,
           "task_id": getattr(record, "task_id", "") or None,
           "event_id": getattr(record, "event_id", "") or None,
           "msg": record.getMessage()}
    if getattr(record, "tickle", None):  # links the objecthost's line to the CTA's pull
        out["tickle"] = record.tickle
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_dict(record, self.process), ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level process[pid] task=... event=...: message``; journald: ``<N>`` prefix."""

    def __init__(self, process: str, journald: bool = False):
        self.journald = journald
        fmt = f"{process}[%(process)d]%(tags)s: %(message)s"
        super().__init__(f"%(levelname)s {fmt}" if journald else f"%(asctime)s %(levelname)s {fmt}")

    def formatTime(self, record, datefmt=None) -> str:
        return utc_timestamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
            text = "\n".join(prefix + line for line in text.splitlines())
        return text


class SharedRotatingFileHandler(logging.handlers.WatchedFileHandler):
    """Append to a file several processes share, rotating it by size.

    WatchedFileHandler reopens the path when another process rotated it; the
    rotation itself runs under an flock on ``<file>.lock`` and re-checks the
    size, so two writers never rotate the same generation twice.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.close(fd)
        super().__init__(str(path), encoding="utf-8")
        self.max_bytes = max_bytes
        self.backups = backups

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        try:
            if self.max_bytes > 0 and self.stream and \
                    os.fstat(self.stream.fileno()).st_size >= self.max_bytes:
                self._rotate()
        except OSError:
            pass  # a log that cannot rotate must not stop the agent

    def _rotate(self) -> None:
        with open(self.baseFilename + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if os.stat(self.baseFilename).st_size >= self.max_bytes:
                    for n in range(self.backups - 1, 0, -1):
                        older = f"{self.baseFilename}.{n}"
                        if os.path.exists(older):
                            os.replace(older, f"{self.baseFilename}.{n + 1}")
                    if self.backups > 0:
                        os.replace(self.baseFilename, self.baseFilename + ".1")
                    else:
                        os.truncate(self.baseFilename, 0)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.reopenIfNeeded()


@dataclass
class LogSettings:
    dir: str = ""           # "" = no log files (stderr only)
    format: str = "text"    # of stderr; files are always JSON lines
    level: str = "INFO"
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS

    @classmethod
    def from_config(cls, config) -> "LogSettings":
        directory = config.get("logging", "dir") or str(config.state_dir / "logs")
        return cls(directory, config.get("logging", "format"), config.get("logging", "level").upper(),
                   config.get("logging", "max_bytes"), config.get("logging", "backups"))

    @classmethod
    def from_env(cls) -> "LogSettings":
        env = {key: os.environ.get(var, "") for key, var in _ENV.items()}
        settings = cls(dir=env["dir"])
        if env["format"] in FORMATS:
            settings.format = env["format"]
        if env["level"]:
            settings.level = env["level"].upper()
        for key in ("max_bytes", "backups"):
            if env[key].isascii() and env[key].isdigit():
                setattr(settings, key, int(env[key]))
        return settings


def log_dir(config) -> Path:
    """Where the agent of ``config`` writes its log files."""
    return Path(LogSettings.from_config(config).dir)


def export_settings(settings: LogSettings) -> None:
    """Make child processes started from now on log with ``settings``."""
    for key, var in _ENV.items():
        os.environ[var] = str(getattr(settings, key))


def _journald_stderr() -> bool:
    """True when stderr is the journal stream systemd gave us (systemd.exec(5))."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(process: str, level: str | None = None, *, config=None,
                  settings: LogSettings | None = None) -> LogSettings:
    """Log to stderr and, with a log dir, to ``<dir>/<process>.log``.

    Settings come from ``settings``, else ``config``'s ``[logging]`` section,
    else the inherited ``DSAGENT_LOG_*`` environment. ``level`` overrides the
    level (the CLI's quiet commands). The settings are exported to the
    environment, so processes started from here on log the same way.
    Returns the settings used.
    """
    if settings is None:
        settings = LogSettings.from_config(config) if config is not None else LogSettings.from_env()
    tags = _Tags()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.addFilter(tags)
    stderr.setFormatter(JsonFormatter(process) if settings.format == "json"
                        else TextFormatter(process, journald=_journald_stderr()))
    handlers: list[logging.Handler] = [stderr]
    if settings.dir:
        try:
            to_file = SharedRotatingFileHandler(Path(settings.dir) / f"{process}.log",
                                                settings.max_bytes, settings.backups)
            to_file.addFilter(tags)
            to_file.setFormatter(JsonFormatter(process))
            handlers.append(to_file)
        except OSError as exc:
            print(f"dsagent: cannot write logs to {settings.dir}: {exc}; logging to stderr only",
                  file=sys.stderr)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(level or settings.level)
    for noisy in ("httpx", "httpcore", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    export_settings(settings)
    return settings
