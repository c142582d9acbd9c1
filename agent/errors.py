"""Deprecated: handlers written for dsagent 0.1 imported their errors here.
Import them from ``agent.plugin`` (docs/handler-guide.md, "Upgrading a
handler written for 0.1"). Kept for 0.2, removed in 0.3."""

import warnings

from agent.common.errors import BadParameters, DsagentError, TaskFailed, TaskRejected

__all__ = ["BadParameters", "DsagentError", "TaskFailed", "TaskRejected"]

warnings.warn("agent.errors is deprecated: import the errors from agent.plugin",
              DeprecationWarning, stacklevel=2)
