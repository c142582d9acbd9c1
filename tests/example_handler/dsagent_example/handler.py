"""Task types of a third-party package.

- ``Example.Echo``: returns its ``text`` parameter reversed, with progress.
- ``Example.Sleep``: sleeps ``seconds`` (used to test timeouts and cancels).
- ``Example.Crash``: kills its own worker process (tests containment).
- ``Example.Hog``: allocates memory until it runs out (tests the memory limit).
- ``Example.Poll``: works until ``ctx.cancelled()`` (cancel without the hook).
"""

import os
import signal
import threading

from agent.plugin import Param, TaskFailed, TaskType, hookimpl

_cancelled: dict[str, threading.Event] = {}


@hookimpl
def dsagent_task_types(register):
    # the core refuses unknown, missing and malformed parameters: no validate hook needed
    register(TaskType("Example.Echo", default_timeout=60, description="reverse the text parameter",
                      parameters=(Param("text", required=True, allow_empty=True),)))
    register(TaskType("Example.Sleep", default_timeout=60, description="sleep N seconds",
                      parameters=(Param("seconds", required=True, type="number"),)))
    register(TaskType("Example.Crash", default_timeout=60, description="kill its worker",
                      parameters=()))
    register(TaskType("Example.Hog", default_timeout=60, description="eat memory until refused",
                      parameters=()))
    register(TaskType("Example.Poll", default_timeout=60, description="work until cancelled",
                      parameters=()))


@hookimpl
def dsagent_run_task(task, ctx):
    if task.type == "Example.Echo":
        text = task.parameters["text"]
        if text == "fail":
            raise TaskFailed("asked to fail", {"text": text})
        ctx.progress(50, "half way")
        return {"reversed": text[::-1]}
    if task.type == "Example.Sleep":
        stop = _cancelled.setdefault(task.id, threading.Event())
        if stop.wait(float(task.parameters["seconds"])):
            raise TaskFailed("cancelled while sleeping")
        return {"slept": float(task.parameters["seconds"])}
    if task.type == "Example.Crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if task.type == "Example.Poll":
        rounds = 0
        while not ctx.cancelled():
            rounds += 1
            threading.Event().wait(0.01)
        raise TaskFailed("stopped on request", {"rounds": rounds})
    if task.type == "Example.Hog":
        hog = []
        while True:
            hog.append(bytearray(64 * 2**20))


@hookimpl
def dsagent_cancel_task(task):
    _cancelled.setdefault(task.id, threading.Event()).set()
