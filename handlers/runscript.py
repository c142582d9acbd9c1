"""RunScript (PROTOCOL.md §4): run a script's text with an interpreter.

Parameters: ``script`` (the text, required), ``interpreter`` (absolute path,
default /bin/sh). The script runs in its own process group, and whatever it leaves running in
that group is killed when it exits (processes that escape the group are
killed by the agent's subreaper, see agent/common/reaper.py); ``exit_code`` and
the last 4 KiB of stdout and stderr go into details; a non-zero exit fails the
task. ``[handlers] run_script = false`` disables it on a machine.
"""

from __future__ import annotations

import collections
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time

from agent import __version__  # noqa: F401 - the plugin's version when registered directly (tests)
from agent.plugin import BadParameters, Param, TaskFailed, TaskType, hookimpl

TAIL_BYTES = 4096
PARAMETERS = (
    Param("script", required=True, description="the script's text"),
    Param("interpreter", type="path", description="the program that runs it (default /bin/sh)"),
)

TMP_PREFIX = "dsagent-runscript-"
DRAIN_S = 1.0  # output read after the script exits, at most

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
    register(TaskType("RunScript", default_timeout=3600, description="run a script",
                      parameters=PARAMETERS))


@hookimpl
def dsagent_validate_task(task, config):
    if config.get("run_script") is False:
        raise BadParameters("RunScript is disabled on this machine ([handlers] run_script = false)")
    if "\0" in task.parameters["script"]:
        raise BadParameters("parameter 'script' contains a NUL byte")
    interpreter = task.parameters.get("interpreter", "/bin/sh")
    if not (os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)):
        raise BadParameters(f"interpreter {interpreter} is not an executable file on this machine")


def _collect(proc: subprocess.Popen) -> tuple[int, collections.deque, collections.deque]:
    """Wait for the script while keeping the last TAIL_BYTES of its output.

    One thread, select() on both pipes. After the script exits, what it left
    in its process group is killed, and output is drained for at most
    DRAIN_S: a process that escaped the group (setsid) and still holds the
    pipes must not keep the task open (the subreaper kills it).
    """
    tails = {proc.stdout: collections.deque(), proc.stderr: collections.deque()}
    sel = selectors.DefaultSelector()
    for stream in tails:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    exited_at = None
    try:
        while sel.get_map():
            for key, _ in sel.select(timeout=0.2):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                into = tails[key.fileobj]
                into.append(chunk)
                while sum(map(len, into)) - len(into[0]) >= TAIL_BYTES:
                    into.popleft()
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
                _kill_group(proc.pid)  # what the script left running in its group
            if exited_at is not None and time.monotonic() - exited_at > DRAIN_S:
                break
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return proc.wait(), tails[proc.stdout], tails[proc.stderr]


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
        try:
            code, out, err = _collect(proc)
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
