"""The hooks a handler plugin implements (pluggy project name ``dsagent``).

A handler plugin is any module or object named by an entry point in the group
``dsagent.handlers``; the built-in handlers are registered the same way. A
plugin declares its task types through :func:`dsagent_task_types`; dsagent
then calls the other hooks **only on the plugin that registered the task's
type**, so an implementation never has to check ``task.type`` itself.

Hooks run inside a worker process, never in the CTA: a plugin that hangs,
crashes or leaks is killed without taking the agent down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from agent.common.task import Task
    from agent.plugin.checks import DoctorCheck
    from agent.plugin.tasks import TaskContext, TaskType

PROJECT = "dsagent"
ENTRY_POINT_GROUP = "dsagent.handlers"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dsagent_task_types(register: Callable[["TaskType"], None]) -> None:
    """Declare the task types this plugin serves.

    Called once when the plugin manager is built. Call ``register(TaskType(
    name=..., default_timeout=..., description=..., parameters=(Param(...),
    ...)))`` for each type. With ``parameters`` declared, the core refuses
    unknown, missing or malformed parameters before ``dsagent_validate_task``
    is called. A type registered by two plugins is refused, and the error
    names both. Returns nothing.
    """


@hookspec
def dsagent_validate_task(task: "Task", config: dict[str, Any]) -> None:
    """Check a task's parameters before it runs.

    Called once per task, before the ``running`` state, with the [handlers]
    config section, after the core checked the declared ``parameters``:
    check here only what a ``Param`` cannot say (a folder that must exist,
    a combination of values). Raise :class:`agent.plugin.BadParameters` with a message
    naming the parameter to refuse it (the task goes received -> failed).
    Returns nothing.
    """


@hookspec(firstresult=True)
def dsagent_run_task(task: "Task", ctx: "TaskContext") -> dict[str, Any] | None:
    """Run one task.

    Called after validation, in the ``running`` state. Report progress with
    ``ctx.progress(percent, message, **details)``. Return a JSON-able dict of
    details (or None) for ``succeeded`` (a ``warning`` key in it also becomes
    the succeeded event's message); raise
    :class:`agent.plugin.TaskFailed` to fail with a message and details. Any
    other exception fails the task and is logged with its traceback.
    """


@hookspec
def dsagent_cancel_task(task: "Task") -> None:
    """Ask a running task to stop (optional).

    Called from another thread of the worker while ``dsagent_run_task`` is
    running, when the task timed out or the agent is shutting down (just
    after ``ctx.cancelled()`` turns True, which a handler may poll instead).
    Make ``dsagent_run_task`` return or raise soon. If it has not stopped after a
    short grace period, the worker and its whole process tree are killed.
    Returns nothing.
    """


@hookspec
def dsagent_doctor_checks(register: Callable[["DoctorCheck"], None]) -> None:
    """Add checks to ``dsagent doctor`` (optional).

    Called once per ``dsagent doctor`` run, after the plugin manager is
    built. Call ``register(DoctorCheck(name=..., run=...))`` for each check;
    ``run(config)`` gets the [handlers] config section and returns a
    :class:`agent.plugin.CheckResult`. A check name registered twice (or
    one of the doctor's own), or a check that raises or returns anything
    else, is reported as a failed check naming the plugin. Returns nothing.
    """
