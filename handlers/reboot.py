"""Reboot (PROTOCOL.md §4, §8): restart this computer, into production or automation.

Parameter ``to``: ``production`` (boot from the local disk) or ``automation``
(boot the automation environment), required. Where the computer boots is the
PXE answer, which the task server changes when it receives this task's
``running`` status (docs/automation.md); the handler only checks ``to`` and
succeeds, with ``{"to": ..., "restart": ...}`` in its details.

The restart itself is the agent's, not the handler's: a handler runs in a
worker while its statuses are still on their way to the server. Once this
task's ``succeeded`` is recorded, the CTA starts no new task and asks ``dsagent
run`` to restart the machine (agent/cta/reboot.py); the supervisor waits until
every status -- this one included -- has been accepted by the server, then
runs ``[agent] reboot_command`` (agent/supervisor.py). ``dsagent run-task``
reports the task and restarts nothing.
"""

from __future__ import annotations

from agent.plugin import Param, TaskType, hookimpl

TARGETS = ("production", "automation")
PARAMETERS = (
    Param("to", required=True, pattern="|".join(TARGETS),
          description="production (boot from the disk) or automation (the automation "
                      "environment)"),
)


@hookimpl
def dsagent_task_types(register):
    register(TaskType("Reboot", default_timeout=60, parameters=PARAMETERS,
                      description="restart this computer once every status reached the server"))


@hookimpl
def dsagent_validate_task(task, config):
    """Nothing beyond the declared parameter: ``to`` is production or automation."""


@hookimpl
def dsagent_run_task(task, ctx):
    to = task.parameters["to"]
    ctx.log.info("reboot to %s: the agent restarts this computer once every status has "
                 "reached the task server", to)
    return {"to": to, "restart": "once every status has reached the task server"}
