"""A reusable worker process that runs handler plugins (``python -m agent.cta.worker``).

The CTA keeps a few of these alive and hands them one task at a time, so no
interpreter starts per task, and a handler that hangs, crashes or leaks is
killed with its process tree while the CTA goes on.

Protocol: JSON lines; commands on the worker's stdin, messages on its stdout.
The worker moves both to private descriptors at start and points fds 0/1 at
/dev/null and stderr, so a handler's print() lands in the log, never in the
protocol.

    worker -> CTA  {"op": "ready", "pid": N}
    CTA -> worker  {"op": "task", "task": {...}, "config": {...}}
    worker -> CTA  {"op": "valid", "timeout": S} | {"op": "invalid", "message": "..."}
    CTA -> worker  {"op": "go"} | {"op": "skip"}
    worker -> CTA  {"op": "progress", "percent": P, "message": "...", "details": {...}}*
    worker -> CTA  {"op": "done", "state": "succeeded"|"failed", "message": "...", "details": {...}}
    CTA -> worker  {"op": "cancel"}   (any time while running)
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import sys
import threading
import traceback
from typing import Any

log = logging.getLogger("dsagent.worker")

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us if the CTA dies, so no orphan runs on.

    The request only covers a parent that dies *after* it: if the CTA died
    while this interpreter was starting, we were re-parented already (to the
    supervisor, a subreaper), so exit at once instead of starting a handler.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    expected = os.environ.get("DSAGENT_WORKER_PARENT")
    if expected and expected != str(os.getppid()):
        os._exit(0)


class Channel:
    """Line-oriented JSON messages over two private file descriptors."""

    def __init__(self, cmd_fd: int, msg_fd: int):
        self._cmd = os.fdopen(cmd_fd, "rb", buffering=0)
        self._msg = os.fdopen(msg_fd, "wb", buffering=0)
        self._write_lock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, default=str, separators=(",", ":")).encode() + b"\n"
        with self._write_lock:
            self._msg.write(data)

    def read_commands(self, into: "queue.Queue[dict | None]", on_cancel) -> None:
        buffer = b""
        while True:
            chunk = self._cmd.read(65536)
            if not chunk:
                into.put(None)
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = json.loads(line)
                if command.get("op") == "cancel":
                    on_cancel()
                else:
                    into.put(command)


def _take_protocol_fds() -> Channel:
    cmd_fd, msg_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return Channel(cmd_fd, msg_fd)


class Worker:
    def __init__(self, channel: Channel):
        from agent.common.logsetup import task_context
        from agent.plugin.manager import load_handlers

        self.channel = channel
        self.registry = load_handlers()
        self.task_context = task_context
        self.current = None
        self.current_ctx = None
        self.commands: "queue.Queue[dict | None]" = queue.Queue()

    def cancel_current(self) -> None:
        task, ctx = self.current, self.current_ctx
        if task is None:
            return
        if ctx is not None:
            ctx.request_cancel()
        with self.task_context(task.id):
            log.info("cancel requested")
            try:
                self.registry.cancel(task)
            except Exception:
                log.error("cancel hook of %s raised:\n%s", task.type, traceback.format_exc())

    def serve(self) -> None:
        threading.Thread(target=self.channel.read_commands,
                         args=(self.commands, self.cancel_current), daemon=True).start()
        self.channel.send({"op": "ready", "pid": os.getpid()})
        while True:
            command = self.commands.get()
            if command is None:
                return
            if command.get("op") == "task":
                self.handle(command)

    def handle(self, command: dict[str, Any]) -> None:
        from agent.common.errors import DsagentError, TaskFailed
        from agent.common.task import Task
        from agent.plugin.tasks import TaskContext

        task = Task.from_json(command["task"])
        config = command.get("config") or {}
        with self.task_context(task.id):
            try:
                registered = self.registry.lookup(task.type)
                self.registry.validate(task, config)
            except DsagentError as exc:
                self.channel.send({"op": "invalid", "message": str(exc)})
                return
            except Exception as exc:
                log.error("validate hook of %s raised:\n%s", task.type, traceback.format_exc())
                self.channel.send({"op": "invalid", "message":
                                   f"handler '{registered.plugin}' failed validating "
                                   f"parameters: {type(exc).__name__}: {exc}"})
                return
            self.channel.send({"op": "valid", "timeout": self.registry.timeout_for(task)})
            go = self.commands.get()
            if go is None:
                sys.exit(0)
            if go.get("op") != "go":
                return

            def send_progress(percent, message, details):
                self.channel.send({"op": "progress", "percent": percent,
                                   "message": message, "details": details})

            _limit_memory(config.get("max_memory_mb"))
            settings = config.get(registered.plugin)  # its [handlers.<plugin>] table, if any
            ctx = TaskContext(task, config, send_progress,
                              logging.LoggerAdapter(logging.getLogger(f"dsagent.handler.{task.type}")),
                              settings=settings if isinstance(settings, dict) else None)
            self.current, self.current_ctx = task, ctx
            log.info("handler '%s' %s running %s", registered.plugin, registered.version, task.type)
            try:
                details = self.registry.run(task, ctx)
                if not isinstance(details, dict):
                    details = {} if details is None else {"result": details}
                # a succeeded task's message is its warning, if it has one (§4)
                result = {"state": "succeeded", "message": str(details.get("warning") or ""),
                          "details": details}
            except TaskFailed as exc:
                result = {"state": "failed", "message": str(exc), "details": exc.details}
            except MemoryError:
                log.error("handler '%s' ran out of memory running %s", registered.plugin, task.type)
                result = {"state": "failed", "details": {},
                          "message": f"handler '{registered.plugin}' ran out of memory (limit "
                                     f"[handlers] max_memory_mb = {config.get('max_memory_mb')})"}
            except BaseException as exc:  # noqa: BLE001 - a handler must not kill the worker
                if isinstance(exc, KeyboardInterrupt):
                    raise
                log.error("handler '%s' raised while running %s:\n%s", registered.plugin,
                          task.type, traceback.format_exc())
                result = {"state": "failed", "details": {},
                          "message": f"handler '{registered.plugin}' raised "
                                     f"{type(exc).__name__}: {exc}"}
            finally:
                self.current = self.current_ctx = None
            log.info("handler '%s' returned: %s%s", registered.plugin, result["state"],
                     f": {result['message']}" if result["message"] else "")
            self.channel.send({"op": "done", **result})


def _limit_memory(megabytes) -> None:
    """Cap the worker's (and its children's) address space: a leaking handler
    gets MemoryError instead of dragging the machine into swap or the OOM killer."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = resource.RLIM_INFINITY if not megabytes else megabytes * 2**20
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
        soft = hard
    try:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot set the memory limit: %s", exc)


def main() -> None:
    _die_with_parent()
    channel = _take_protocol_fds()
    from agent.common.logsetup import setup_logging

    setup_logging("worker")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the CTA decides when we stop
    Worker(channel).serve()


if __name__ == "__main__":
    main()
