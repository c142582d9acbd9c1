"""The plugin API: everything a handler author imports, and nothing else.

    from agent.plugin import BadParameters, Param, TaskFailed, TaskType, hookimpl

    @hookimpl
    def dsagent_task_types(register):
        register(TaskType("Acme.Inventory", 600, "list installed software",
                          parameters=(Param("items", required=True),)))

    @hookimpl
    def dsagent_run_task(task, ctx):
        ctx.progress(50, "half way")
        return {"count": 3}

The hooks are in ``agent.plugin.hookspecs`` (docs/handler-guide.md walks
through them); ``agent.plugin.manager`` builds the plugin manager the same
way for built-in and third-party handlers; ``agent.plugin.testing`` is the
``dsagent_run`` pytest fixture. Anything outside ``agent.plugin`` is the
agent's own business and may change without notice.
"""

from agent.common.errors import BadParameters, DsagentError, TaskFailed, TaskRejected
from agent.common.logsetup import task_context
from agent.common.task import Task
from agent.plugin.checks import CheckResult, DoctorCheck
from agent.plugin.hookspecs import hookimpl
from agent.plugin.progress import Progress
from agent.plugin.tasks import Param, TaskContext, TaskType

__all__ = [
    "BadParameters", "CheckResult", "DoctorCheck", "DsagentError", "Param", "Progress",
    "Task", "TaskContext", "TaskFailed", "TaskRejected", "TaskType", "hookimpl", "task_context",
]
