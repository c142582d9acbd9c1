"""Deprecated: handlers written for dsagent 0.1 imported TaskType here.
Import it from ``agent.plugin`` (docs/handler-guide.md, "Upgrading a
handler written for 0.1"). Kept for 0.2, removed in 0.3."""

import warnings

from agent.common.task import Task
from agent.plugin.tasks import TaskContext, TaskType

__all__ = ["Task", "TaskContext", "TaskType"]

warnings.warn("agent.tasks is deprecated: import TaskType and Task from agent.plugin",
              DeprecationWarning, stacklevel=2)
