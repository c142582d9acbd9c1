"""RunScript (PROTOCOL.md §4): run a script's text with an interpreter.

Parameters: ``script`` (the text, required), ``interpreter`` (absolute path,
default /bin/sh). The script runs in its own process group, and whatever it leaves running in
that group is killed when it exits (processes that escape the group are
killed by the agent's subreaper, see agent/reaper.py); ``exit_code`` and
the last 4 KiB of stdout and stderr go into details; a non-zero exit fails the
task. ``[handlers] run_script = false`` disables it on a machine.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import tempfile
import threading

from agent import __version__, hookimpl
from agent.errors import BadParameters, TaskFailed
from agent.tasks import TaskType

TAIL_BYTES = 4096
PARAMETERS = {"script", "interpreter"}

TMP_PREFIX = "dsagent-runscript-"

_running: dict[str, subprocess.Popen] = {}


def _sweep_stale_tmpdirs() -> None:
    """Remove script folders left by workers that were killed mid-task."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        if not name.startswith(TMP_PREFIX):
            continue
        pid = name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


_sweep_stale_tmpdirs()


@hookimpl
def dsagent_task_types(register):
    register(TaskType("RunScript", default_timeout=3600,
                      description="run a script (script, interpreter=/bin/sh)"))


@hookimpl
def dsagent_validate_task(task, config):
    if config.get("run_script") is False:
        raise BadParameters("RunScript is disabled on this machine ([handlers] run_script = false)")
    unknown = sorted(set(task.parameters) - PARAMETERS)
    if unknown:
        raise BadParameters(f"unknown parameter '{unknown[0]}' (RunScript takes script, interpreter)")
    if not task.parameters.get("script", "").strip():
        raise BadParameters("parameter 'script' is missing or empty")
    if "\0" in task.parameters["script"]:
        raise BadParameters("parameter 'script' contains a NUL byte")
    interpreter = task.parameters.get("interpreter", "/bin/sh")
    if not os.path.isabs(interpreter) or "\0" in interpreter:
        raise BadParameters(f"parameter 'interpreter' must be an absolute path, got {interpreter!r}")
    if not (os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)):
        raise BadParameters(f"interpreter {interpreter} is not an executable file on this machine")


def _tail(stream, into: collections.deque) -> None:
    for chunk in iter(lambda: stream.read(8192), b""):
        into.append(chunk)
        while sum(map(len, into)) - len(into[0]) >= TAIL_BYTES:
            into.popleft()


def _text(chunks: collections.deque) -> str:
    return b"".join(chunks)[-TAIL_BYTES:].decode("utf-8", "replace")


@hookimpl
def dsagent_run_task(task, ctx):
    interpreter = task.parameters.get("interpreter", "/bin/sh")
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp:
        path = os.path.join(tmp, "script")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(task.parameters["script"])
        env = dict(os.environ, DSAGENT_TASK_ID=task.id)
        proc = subprocess.Popen([interpreter, path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, env=env, cwd=tmp)
        _running[task.id] = proc
        out, err = collections.deque(), collections.deque()
        readers = [threading.Thread(target=_tail, args=(proc.stdout, out), daemon=True),
                   threading.Thread(target=_tail, args=(proc.stderr, err), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            code = proc.wait()
            _kill_group(proc.pid)  # what the script left running in its group
            for reader in readers:
                reader.join()
        finally:
            _running.pop(task.id, None)
    details = {"exit_code": code, "stdout_tail": _text(out), "stderr_tail": _text(err)}
    if code < 0:
        raise TaskFailed(f"script killed by signal {-code}", details)
    if code != 0:
        raise TaskFailed(f"script exited with code {code}", details)
    ctx.log.info("script exited with code 0")
    return details


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@hookimpl
def dsagent_cancel_task(task):
    proc = _running.get(task.id)
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


__all__ = ["__version__"]
